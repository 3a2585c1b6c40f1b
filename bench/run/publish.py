"""One checkpoint for many nodes, through the tracking store's artifacts: the pretraining
run publishes its checkpoint (publish), and a node whose cache lacks it fetches it before
pretraining (fetch), using it only when its sha256 equals the run's tag and the published
sidecar.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from bench import tracking
from bench.checkpoints import Checkpoint, sha256_file


def publish(ckpt: Checkpoint, run_id: str) -> str | None:
    """The committed checkpoint and its sidecar as artifacts (checkpoint/) of the
    pretraining run that made it, tagged tlbench.checkpoint_key and checkpoint_sha256, so a
    node with the same tracking store fetches it instead of pretraining again. None when
    published, else why not: the local checkpoint is usable either way."""
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
