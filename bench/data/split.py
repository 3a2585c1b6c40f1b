"""The split manifest: train / val / test indices, seeded and stratified, one per dataset,
subset and seed. Written once under the cache and read by every framework, so both see the
same images in the same splits."""

from __future__ import annotations

import hashlib
import json

import numpy as np

from bench.data.sources import DatasetError
from bench.paths import atomic_write_text, cache_dir


def _stratified_take(labels: np.ndarray, idx: np.ndarray, fraction: float,
                     rng: np.random.Generator, exact: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Split `idx` into (taken, rest): round(fraction * len(idx)) samples in all, shared
    between classes by largest remainder so each class gets its proportional share.
    `exact`: take exactly that many (fraction = exact / len(idx)), without the rule that
    keeps one of each class on both sides (it could change the count)."""
    classes, counts = np.unique(labels[idx], return_counts=True)
    want = fraction * counts
    k = np.floor(want).astype(int)
    left = (int(round(fraction * len(idx))) if exact is None else exact) - k.sum()
    k[np.argsort(-(want - k), kind="stable")[:max(left, 0)]] += 1
    if exact is not None:
        k = np.minimum(k, counts)
        short = exact - k.sum()  # float rounding only: even out from classes with room
        for c in np.flatnonzero(k < counts)[:max(short, 0)]:
            k[c] += 1
        for c in np.flatnonzero(k > 0)[:max(-short, 0)]:
            k[c] -= 1
    elif fraction > 0:  # keep one of each class on both sides where the class allows it
        k = np.where(counts > 1, np.clip(k, 1, counts - 1), k)
    taken, rest = [], []
    for c, kc in zip(classes, k, strict=True):
        members = rng.permutation(idx[labels[idx] == c])
        taken.append(members[:kc])
        rest.append(members[kc:])
    return np.sort(np.concatenate(taken)), np.sort(np.concatenate(rest))


def make_split(labels: np.ndarray, seed: int, subset: int, split: dict,
               official_test: np.ndarray | None = None) -> dict[str, list[int]]:
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, 20141108])  # fixed salt: independent of training RNG
    idx = np.arange(len(labels))
    if split.get("test") == "official":
        if official_test is None:
            raise ValueError("split.test = 'official' but the source has no official test split")
        test, pool = idx[official_test], idx[~official_test]
    elif split.get("test") == "val":  # nothing held out: the val part is also the test part
        test, pool = idx[:0], idx
    else:
        test, pool = _stratified_take(labels, idx, split["test_fraction"], rng)
    if "train_size" in split:
        m = _sized(labels, test, pool, subset, split, rng)
        return {**m, "test": m["val"]} if split.get("test") == "val" else m
    if subset and subset < len(pool):
        # subset = the number of labelled training+validation samples (test kept whole),
        # drawn per class so every class keeps its share
        pool, _ = _stratified_take(labels, pool, subset / len(pool), rng)
    val, train = _stratified_take(labels, pool, split["val_fraction"], rng)
    if split.get("test") == "val":
        test = val
    return {"train": train.tolist(), "val": val.tolist(), "test": test.tolist()}


def _sized(labels: np.ndarray, test: np.ndarray, pool: np.ndarray, subset: int, split: dict,
           rng: np.random.Generator) -> dict[str, list[int]]:
    """train_size + val_size images (VTAB-1k: 800 + 200) drawn from the non-test pool,
    stratified; a smaller `subset` (e.g. --smoke) scales both down in proportion."""
    n_train, n_val = split["train_size"], split["val_size"]
    if subset and subset < n_train + n_val:
        n_val = int(round(subset * n_val / (n_train + n_val)))
        n_train = subset - n_val
    if n_train + n_val > len(pool):
        raise DatasetError(
            f"split.train_size + split.val_size = {n_train} + {n_val} = {n_train + n_val}, "
            f"but the dataset has only {len(pool)} images outside its test split; allowed: "
            f"train_size + val_size <= {len(pool)}")
    if n_train + n_val < len(pool):
        pool, _ = _stratified_take(labels, pool, (n_train + n_val) / len(pool), rng,
                                   exact=n_train + n_val)
    val, train = _stratified_take(labels, pool, n_val / len(pool), rng, exact=n_val)
    return {"train": train.tolist(), "val": val.tolist(), "test": test.tolist()}


def manifest(name: str, labels: np.ndarray, seed: int, subset: int, split: dict,
             official_test: np.ndarray | None = None) -> dict[str, list[int]]:
    """The cached manifest, made on first use. Keyed by everything that determines it."""
    key = hashlib.sha256(json.dumps(
        [np.asarray(labels).tolist(), seed, subset, split,
         None if official_test is None else np.asarray(official_test).tolist()],
        sort_keys=True).encode()).hexdigest()[:12]
    path = cache_dir() / "splits" / f"{name}-n{subset}-seed{seed}-{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    m = make_split(labels, seed, subset, split, official_test)
    atomic_write_text(path, json.dumps(m))
    return m
