"""The checkpoint of a `pretrained:` weights value on this host: cache/pretrained/<key>.ckpt
with a JSON sidecar holding its sha256 (bench/config/pretrained.py says what the weights
syntax means). The runner makes or fetches it (bench/run/execute.py, bench/run/publish.py);
a cell verifies it right before loading (checkpoint_for). No MLflow here: a cell process
imports this module.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from bench.config.pretrained import WeightsError, is_pretrained
from bench.paths import atomic_write_text, cache_dir, file_lock, inside

# a spec hash (letters and digits, never '/' or '.'): all a checkpoint's files are named by
KEY = re.compile(r"[0-9A-Za-z]{8,64}")


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

    def __post_init__(self):
        if not isinstance(self.key, str) or not KEY.fullmatch(self.key):
            raise WeightsError(f"checkpoint key {self.key!r} must be a spec hash (8 to 64 "
                               f"letters and digits): it names files under {self.folder}")

    @classmethod
    def of(cls, pspec) -> Checkpoint:
        return cls(pspec.hash[:20])

    @property
    def folder(self) -> Path:
        return cache_dir() / "pretrained"

    @property
    def path(self) -> Path:
        return inside(self.folder, self.folder / f"{self.key}.ckpt")

    @property
    def meta_path(self) -> Path:
        return inside(self.folder, self.folder / f"{self.key}.json")

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
