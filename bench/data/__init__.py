"""Datasets as framework-free arrays or file lists, plus one split manifest per dataset,
subset and seed. Cards live in datasets/*.toml (or a grid's [datasets.<name>] tables)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from bench.data.cards import CardError, card_digest, check_card, shipped_cards
from bench.data.sources import DatasetError, DataSource, load, scan_image_folder
from bench.data.split import manifest

__all__ = ["CardError", "DataSource", "DatasetError", "Prepared", "card_digest", "check_card",
           "dataset_inputs", "prepare",
           "scan_image_folder", "shipped_cards"]


@dataclass
class Prepared:
    source: DataSource
    split: dict[str, np.ndarray]

    def part(self, name: str) -> tuple[np.ndarray | list[str], np.ndarray]:
        """(images or files, labels) of one split part."""
        idx = self.split[name]
        labels = self.source.labels[idx]
        if self.source.images is not None:
            return self.source.images[idx], labels
        return [self.source.files[i] for i in idx], labels


def dataset_inputs(card: dict, prepared: Prepared, seed: int, subset: int) -> list[dict]:
    """The three split parts as MLflow dataset inputs (bench/tracking.log_inputs): named by
    the card, the digest a hash of the part's indices and labels (equal digests: the same
    images with the same labels, whichever framework or cell read them), the source the
    card and the split rule, the profile its size and classes."""
    source = {"card": card["name"], "source": card["source"], "split": card["split"],
              "seed": seed, "subset": subset,
              **{k: card[k] for k in ("root", "url", "classes", "corruption", "label_permutation")
                 if k in card}}
    out = []
    for part in ("train", "val", "test"):
        idx = prepared.split[part]
        labels = prepared.source.labels[idx]
        digest = hashlib.sha256(np.asarray(idx, np.int64).tobytes()
                                + np.asarray(labels, np.int64).tobytes()).hexdigest()[:12]
        out.append({"name": card["name"], "digest": digest, "source_type": card["source"],
                    "source": json.dumps(source, sort_keys=True), "context": part,
                    "profile": json.dumps({"num_rows": len(idx),
                                           "num_classes": len(np.unique(labels))})})
    return out


def prepare(card: dict, seed: int, subset: int, train_on: str = "train") -> Prepared:
    """The card's data and its split manifest; with train_on = "train+val" the train part
    is train then val (a tuned comparison's refit, VTAB's protocol), and val stays as it
    is, now images the cell trains on."""
    src = load(card)
    strata = src.labels if src.strata is None else src.strata
    m = manifest(card["name"], strata, seed, subset, card["split"], src.official_test)
    split = {k: np.asarray(v, dtype=np.int64) for k, v in m.items()}
    if train_on == "train+val":
        split["train"] = np.concatenate([split["train"], split["val"]])
    return Prepared(src, split)
