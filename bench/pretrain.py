"""Weights the harness pretrains itself: `weights = "pretrained:<dataset>[k=v,...]"`.

A cell with such weights starts from a backbone the harness trained from scratch on the
source dataset, in the cell's own framework: the pretraining is a RunSpec of its own (the
cell's backbone, image size, batch size, optimizer, weight decay, precision and augmentation;
strategy `full`, weights `none`, a linear head, the source dataset), run by the runner as an
MLflow run tagged `tlbench.kind = pretrain` that the cells using it link to
(`tlbench.pretrain_run_id`). Its spec hash is the checkpoint's cache key, so a grid
pretrains once per key, also across invocations, and changing anything that determines the
checkpoint makes a new one.

    pretrained:digits_a                     defaults: epochs=10, all source samples, and
                                            the cell's lr and seed
    pretrained:digits_a[epochs=20,lr=0.01]

The checkpoint holds the backbone and its trained linear head (each backend writes its own
format; a cell loads the head only with `head_init = "source"`, else its head is new) and a
JSON sidecar with its sha256; a file that does not match it (truncated, corrupted) is
deleted and made again, never loaded. A file lock around check-and-make means two runners
(or two cells on two GPUs) needing the same pretraining make it once. Across machines the
tracking store carries it: the pretraining run publishes the checkpoint as artifacts
(publish), and a node whose cache lacks it fetches it before pretraining (fetch), using it
only when its sha256 equals the run's tag and the published sidecar.

Yosinski et al. 2014's transfer protocol (AnB, BnB and their fine-tuned `+` forms) is
`pretrained:<A or B>` with strategy `reinit_top`: see bench/grids/yosinski.toml.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from bench.paths import atomic_write_text, cache_dir, file_lock
from bench.selector import SelectorError, parse_selector
from strategies.constraint import Constraint

PREFIX = "pretrained:"


@dataclass(frozen=True)
class PretrainParam:
    default: object
    check: Constraint  # kind, minimum and help, the same Constraint a RunSpec field declares


PARAMS = {
    "epochs": PretrainParam(10, Constraint(int, minimum=1,
                                           help="epochs of training on the source dataset")),
    # the cell's seed by default: with source == target (Yosinski's BnB) the pretraining
    # then sees the cell's own train split, never its test images
    "seed": PretrainParam(None, Constraint(int, minimum=0,
                                           help="seed of the pretraining (split, init); "
                                                "default: the cell's")),
    "subset": PretrainParam(0, Constraint(int, minimum=0, help="source samples used, 0 = all")),
    "lr": PretrainParam(None, Constraint(float, minimum=0, exclusive=True,
                                         help="learning rate; defaults to the cell's lr")),
}


class WeightsError(ValueError):
    pass


def is_pretrained(weights: str) -> bool:
    return weights.startswith(PREFIX)


def parse(weights: str) -> tuple[str, dict]:
    """`pretrained:digits_a[epochs=5]` -> ('digits_a', {'epochs': 5}); raises WeightsError
    naming what is wrong and what is allowed."""
    body = weights[len(PREFIX):]
    if not body.strip():
        raise WeightsError("no source dataset; expected pretrained:<dataset>[k=v,...]")
    try:
        dataset, given = parse_selector(body)
    except SelectorError as e:
        raise WeightsError(f"{e}; expected pretrained:<dataset>[k=v,...]") from None
    if not dataset:
        raise WeightsError("no source dataset; expected pretrained:<dataset>[k=v,...]")
    params = {}
    for k, vals in given.items():
        p = PARAMS.get(k)
        if p is None:
            raise WeightsError(f"unknown parameter {k!r}; allowed: {', '.join(PARAMS)}")
        if len(vals) != 1:
            raise WeightsError(f"{k} has {len(vals)} values; one pretraining per weights "
                               f"value (list several weights values to sweep)")
        v = vals[0]
        msg = p.check.check(v)  # stated whole: kind and bound in one phrase
        if msg:
            raise WeightsError(f"{k} = {v!r}: {msg}")
        params[k] = p.check.kind(v)
    return dataset, params


def normalize(weights: str) -> str:
    """The canonical spelling: parameters sorted, defaults dropped, floats as repr. Equal
    pretrainings hash equal however they were written; a malformed value stays as written
    (grid validation reports it)."""
    if not is_pretrained(weights):
        return weights
    try:
        dataset, params = parse(weights)
    except WeightsError:
        return weights
    shown = [f"{k}={params[k]!r}" for k in sorted(params)
             if params[k] != PARAMS[k].default]
    return f"{PREFIX}{dataset}" + (f"[{','.join(shown)}]" if shown else "")


def shrink(weights: str, smoke: dict) -> str:
    """`--smoke` shrinks the pretraining a cell names as it shrinks the cell: its epochs
    and source samples capped by the smoke values (a malformed value is left to
    validation)."""
    try:
        dataset, params = parse(weights)
    except WeightsError:
        return weights
    for key in ("epochs", "subset"):
        if key in smoke:
            current = params.get(key, PARAMS[key].default) or smoke[key]
            params[key] = min(current, smoke[key])
    return normalize(f"{PREFIX}{dataset}[{','.join(f'{k}={v!r}' for k, v in params.items())}]")


def pretrain_spec(cell):
    """The RunSpec of the pretraining a cell's weights name (None for other weights)."""
    if not is_pretrained(cell.weights):
        return None
    dataset, params = parse(cell.weights)
    p = {k: params.get(k, v.default) for k, v in PARAMS.items()}
    digests = dict(d.split("=", 1) for d in cell.card_digests.split(",") if d)
    return dataclasses.replace(
        cell, dataset=dataset,
        card_digests=f"{dataset}={digests[dataset]}" if dataset in digests else "",
        subset=p["subset"], strategy="full", strategy_params=(),
        weights="none", epochs=p["epochs"], head="linear", head_init="new", select="last",
        lr=cell.lr if p["lr"] is None else p["lr"],
        seed=cell.seed if p["seed"] is None else p["seed"])


# ---- the cached checkpoint -----------------------------------------------------------------
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Checkpoint:
    """The backbone checkpoint of one pretraining spec, under cache/pretrained/<hash>."""

    key: str

    @classmethod
    def of(cls, pspec) -> Checkpoint:
        return cls(pspec.hash[:20])

    @property
    def folder(self) -> Path:
        return cache_dir() / "pretrained"

    @property
    def path(self) -> Path:
        return self.folder / f"{self.key}.ckpt"

    @property
    def meta_path(self) -> Path:
        return self.folder / f"{self.key}.json"

    @property
    def partial_path(self) -> Path:
        """Where the pretraining cell writes; renamed to `path` once its checksum is noted."""
        return self.folder / f".{self.key}.{os.getpid()}.partial"

    def lock(self):
        """Exclusive across processes on this host, held while checking and making."""
        return file_lock(self.folder / f"{self.key}.lock")

    def meta(self) -> dict | None:
        try:
            return json.loads(self.meta_path.read_text())
        except (OSError, ValueError):
            return None

    def problem(self) -> str | None:
        """None when the checkpoint is present and matches its recorded checksum; else what
        is wrong with it."""
        meta = self.meta()
        if not self.path.exists():
            return "missing"
        if meta is None or "sha256" not in meta:
            return f"{self.path} has no readable checksum record ({self.meta_path.name})"
        actual = sha256_file(self.path)
        if actual != meta["sha256"]:
            return (f"{self.path} does not match its recorded sha256 ({actual[:12]} != "
                    f"{meta['sha256'][:12]}, {self.path.stat().st_size} bytes vs "
                    f"{meta.get('bytes')}): truncated or corrupted")
        return None

    def discard(self) -> None:
        for p in (self.path, self.meta_path):
            p.unlink(missing_ok=True)

    def commit(self, written: Path, run_id: str, pspec, **provenance: str) -> dict:
        """Record the checksum of a freshly written checkpoint and move it into place;
        `provenance` (where a fetched copy came from) joins the record."""
        meta = {"sha256": sha256_file(written), "bytes": written.stat().st_size,
                "run_id": run_id, "spec": pspec.to_params(), "name": pspec.name, **provenance}
        os.replace(written, self.path)
        atomic_write_text(self.meta_path, json.dumps(meta, indent=1, sort_keys=True))
        return meta


# ---- one checkpoint for many nodes, through the tracking store's artifacts ------------------
# tracking is imported inside these functions: it imports bench.spec, which imports this
# module, and a cell process loads a checkpoint (checkpoint_for) without MLflow.
def publish(ckpt: Checkpoint, run_id: str) -> str | None:
    """The committed checkpoint and its sidecar as artifacts (checkpoint/) of the
    pretraining run that made it, tagged tlbench.checkpoint_key and checkpoint_sha256, so a
    node with the same tracking store fetches it instead of pretraining again. None when
    published, else why not: the local checkpoint is usable either way."""
    from bench import tracking

    meta = ckpt.meta() or {}
    try:
        tracking.log_checkpoint(run_id, [ckpt.path, ckpt.meta_path], ckpt.key,
                                meta.get("sha256", ""))
    except Exception as e:  # noqa: BLE001 - a store that refuses it costs other nodes a rerun
        return f"{type(e).__name__}: {e}"
    return None


def fetch(ckpt: Checkpoint, pspec, say=print) -> dict | None:
    """The checkpoint `ckpt` from the newest FINISHED run of the tracking store that
    published it (any active experiment), committed to the local cache once its sha256
    matches both the run's tag and the published sidecar; its record names that run
    (run_id) and the store (fetched_from). None when no published copy passes: each one
    refused is discarded and `say` tells why. Call it holding ckpt.lock()."""
    from bench import tracking

    try:
        runs = tracking.find_checkpoint_runs(ckpt.key)
    except Exception as e:  # noqa: BLE001 - no store to ask: pretrain here, as before
        say(f"could not look for a published checkpoint {ckpt.key} in the tracking store "
            f"({type(e).__name__}: {e}); pretraining here")
        return None
    for run in runs:
        source = run.info.run_id
        staging = ckpt.folder / f".{ckpt.key}.{os.getpid()}.fetch"
        try:
            problem = _download_checked(ckpt, source,
                                        run.data.tags.get(tracking.TAG + "checkpoint_sha256"),
                                        staging)
            if problem is None:
                meta = ckpt.commit(ckpt.partial_path, source, pspec,
                                   fetched_from=tracking.tracking_uri())
                say(f"pretrained checkpoint {ckpt.key} fetched from the tracking store "
                    f"(run {source}), sha256 {meta['sha256'][:12]} verified")
                return meta
        except Exception as e:  # noqa: BLE001 - a failed download is one refused copy
            problem = f"download failed ({type(e).__name__}: {e})"
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            ckpt.partial_path.unlink(missing_ok=True)
        say(f"published checkpoint {ckpt.key} of run {source} refused and discarded: "
            f"{problem}")
    return None


def _download_checked(ckpt: Checkpoint, run_id: str, tagged: str | None,
                      staging: Path) -> str | None:
    """The run's published checkpoint into ckpt.partial_path; None when its sha256 equals
    the run's tag and its sidecar's record, else the mismatch."""
    from bench import tracking

    staging.mkdir(parents=True, exist_ok=True)
    folder = tracking.CHECKPOINT_FOLDER
    side = tracking.download_artifact(run_id, f"{folder}/{ckpt.meta_path.name}", staging)
    got = tracking.download_artifact(run_id, f"{folder}/{ckpt.path.name}", staging)
    os.replace(got, ckpt.partial_path)
    try:
        recorded = json.loads(side.read_text()).get("sha256")
    except ValueError:
        recorded = None
    actual = sha256_file(ckpt.partial_path)
    if actual == tagged == recorded:
        return None
    return (f"sha256 mismatch: the downloaded file has {actual[:12]} "
            f"({ckpt.partial_path.stat().st_size} bytes), the run's tag says "
            f"{(tagged or 'nothing')[:12]}, its sidecar {(recorded or 'nothing')[:12]}")


def checkpoint_for(spec, ctx) -> str | None:
    """The verified checkpoint path of a cell's `pretrained:` weights (None for other
    weights), from the cell context the runner filled in; a backend loads it right after
    building the model."""
    if not is_pretrained(spec.weights):
        return None
    path = getattr(ctx, "weights_file", None)
    if not path:
        raise WeightsError(f"weights = {spec.weights!r} need the checkpoint of their "
                           f"pretraining run; the runner makes it (python -m bench run <grid>)")
    verify(path, ctx.weights_sha256)
    return path


def verify(path: str | Path, sha256: str) -> None:
    """Raise unless `path` has the checksum the runner recorded: a backend calls this right
    before loading, so a file changed after the runner's check is not used either."""
    actual = sha256_file(Path(path))
    if actual != sha256:
        raise WeightsError(f"pretrained checkpoint {path} changed since it was checked "
                           f"(sha256 {actual[:12]} != {sha256[:12]}); run the grid again to "
                           f"re-make it")
