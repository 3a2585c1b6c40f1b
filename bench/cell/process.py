"""The child process that runs one cell: `python -m bench.cell.process job.json`.

It talks to the runner through marked JSON lines on stdout (everything else a library
prints is the cell's log), so the child needs no MLflow client and the runner owns every
tracking call. An exception becomes an `error` event with its traceback, exit status 1.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

MARK = "\x1etlbench "


def emit(event: str, **payload) -> None:
    sys.stdout.write(MARK + json.dumps({"event": event, **payload}, default=float) + "\n")
    sys.stdout.flush()


class CellContext:
    """What a backend reports through. Metric names follow DESIGN.md."""

    def __init__(self, device: str, started: float, weights_file: str | None = None,
                 weights_sha256: str | None = None, save_backbone_to: str | None = None,
                 deterministic: bool | None = None, prune_below: list | None = None):
        self.device = device
        self.started = started
        self.deterministic = deterministic  # None: auto (on for a CPU, off for a GPU)
        self.weights_file = weights_file  # the checkpoint of `pretrained:` weights
        self.weights_sha256 = weights_sha256
        self.save_backbone_to = save_backbone_to  # set for a pretraining run
        # a tuned trial under median pruning: epoch -> the val_acc below which it stops
        self.prune_below = {int(e): float(v) for e, v in prune_below or ()}

    def log_epoch(self, step: int, metrics: dict[str, float]) -> None:
        emit("metrics", step=step, metrics=_clean(metrics))

    def log_final(self, metrics: dict[str, float]) -> None:
        emit("metrics", step=None, metrics=_clean(metrics))

    def set_tags(self, tags: dict[str, str]) -> None:
        emit("tags", tags={k: str(v) for k, v in tags.items()})

    def progress(self, **state) -> None:
        emit("progress", **state)

    def step_progress(self, phase: str, epoch: int, total_epochs: int, steps: int):
        """A per-step callback for a training epoch: progress every 10 steps (for the
        runner's ETA), the same in every backend."""
        def on_step(i: int) -> None:
            if i % 10 == 0 or i == steps - 1:
                self.progress(phase=phase, epoch=epoch, epochs=total_epochs,
                              fraction=(epoch - 1 + (i + 1) / steps) / total_epochs)
        return on_step

    def artifact(self, name: str, text: str) -> None:
        emit("artifact", name=name, text=text)

    def log_inputs(self, inputs: list[dict]) -> None:
        """The cell's data as MLflow dataset inputs (tracking.log_inputs: name, digest,
        source_type, source, profile, context)."""
        emit("inputs", inputs=inputs)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def _clean(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items() if v is not None}


def die_with_parent() -> None:
    """Ask Linux to end this process if its parent (the runner, or the fork server) dies,
    even by SIGKILL."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        try:
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def take_slot(job: dict) -> dict[str, str]:
    """Apply the cell's slot (bench/run/task.py Slot) before its framework touches a device:
    its GPU (CUDA_VISIBLE_DEVICES, read by CUDA and TensorFlow when they start) and its CPU
    cores (this process and what it starts are pinned to them). Returns the tags that say
    where the cell ran, as this process sees it."""
    os.environ.update(job.get("env", {}))
    cpus = job.get("cpus")
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(len(cpus))
    return {"slot": job.get("slot", "local"), "cell_pid": str(os.getpid()),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)"),
            "cpus": ",".join(map(str, cpus)) if cpus else "all",
            "threads": str(job.get("threads") or "default")}


def main(argv: list[str]) -> int:
    started = time.perf_counter()
    die_with_parent()
    with open(argv[0]) as fh:
        job = json.load(fh)
    from bench.config.spec import RunSpec
    from strategies import backend

    try:
        spec = RunSpec.from_params(job["spec"])
        ctx = CellContext(job["device"], started, job.get("weights_file"),
                          job.get("weights_sha256"), job.get("save_backbone_to"),
                          job.get("deterministic"), job.get("prune_below"))
        placed = take_slot(job)
        be = backend(spec.framework)
        if job.get("threads"):
            be.set_threads(job["threads"])
        emit("startup", seconds=time.perf_counter() - started, pid=os.getpid())
        emit("tags", tags=placed)
        be.run_cell(spec, job["card"], ctx)
    except BaseException as e:  # noqa: BLE001 - every failure is recorded, then re-raised
        emit("error", type=type(e).__name__, message=str(e) or type(e).__name__,
             traceback=traceback.format_exc())
        return 130 if isinstance(e, KeyboardInterrupt) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
