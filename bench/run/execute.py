"""One cell from its claim to its record, wherever it runs.

The same code runs in a thread of the local runner (bench/run/runner.py, one thread per slot:
a GPU, or a share of the CPU cores) and inside a Ray task on a cluster node
(bench/run/cluster.py). Whoever supervises the cell's process owns its MLflow calls, so a cell
that dies hard is still recorded, and what a cell makes on a worker (cell.log, error.txt,
history.json) goes to the tracking store from that worker.

For each cell: claim it (bench/run/claims.py; a cell another runner holds is left to it), find
or make its `pretrained:` checkpoint, start its process (forked or fresh, bench/run/forkserver.py)
with its slot's GPU and CPUs, stream the process's events into MLflow and to the runner's
console (bench/run/progress.py events), and record the outcome: FINISHED, FAILED with the error
or the signal that ended the process, KILLED when the runner is stopped.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field

from bench import checkpoints, tracking
from bench.config import pretrained
from bench.config.grid import Grid
from bench.config.spec import RunSpec
from bench.run import claims, publish
from bench.run.supervise import run_child
from bench.run.task import HELD, CellTask, Outcome, RunnerContext, Slot


def run_names(grid: Grid, spec: RunSpec) -> dict:
    """claims.claim's keywords for how a cell's run reads in the UI: its run name (what
    tells it apart first), its configuration across frameworks and seeds (tag
    tlbench.config, to group by) and the command that made it (MLflow's Source)."""
    tags = {"config": grid.config(spec), "mlflow.source.name": tracking.source_name(grid)}
    if grid.cards.get(spec.dataset, {}).get("split", {}).get("test") == "val":
        tags["test_split"] = "val: no held-out test split, test_acc is the validation part's"
    return {"run_name": grid.run_name(spec), "tags": tags}


def execute(task: CellTask, slot: Slot, ctx: RunnerContext) -> Outcome:
    """Claim, prepare, run and record one cell; never raises for the cell's own failure."""
    spec, grid = task.spec, task.grid
    got = claims.claim(task.exp_id, task.parent, spec, grid.label(spec), grid.device,
                       since_ms=task.since_ms, task_id=task.task_id, **run_names(grid, spec))
    if got.run_id is None:
        ctx.events({"event": "done", "index": task.index, "head": task.head, "status": HELD,
                    "text": f"HELD by another runner: {got.holder}"})
        return Outcome(spec, HELD, error=got.holder)
    run_id = got.run_id
    ctx.heartbeat.add(run_id)
    ctx.events({"event": "start", "index": task.index, "head": task.head})
    started = time.perf_counter()
    try:
        extra: dict = {"prune_below": task.prune_below} if task.prune_below else {}
        if pretrained.is_pretrained(spec.weights):
            made = ensure_pretrained(task, slot, ctx)
            fetched = made.checkpoint_meta.get("fetched_from")
            tracking.set_tags(run_id, {"pretrain_run_id": made.run_id or "",
                                       **({"pretrain_fetched_from": fetched} if fetched
                                          else {})})
            if made.status != tracking.FINISHED:
                return _fail(run_id, task, ctx, f"PretrainingFailed: {made.error}", started,
                             status=tracking.KILLED if ctx.stop.stopped else tracking.FAILED)
            extra.update(weights_file=str(made.checkpoint.path),
                         weights_sha256=made.checkpoint_meta["sha256"])
            tracking.set_tags(run_id, {"pretrain_checkpoint": extra["weights_file"]})
        return run_child(run_id, task, slot, ctx, extra)
    except Exception as e:  # noqa: BLE001 - the runner's own failure ends the cell only
        return _fail(run_id, task, ctx, f"{type(e).__name__} in the runner: {e}", started,
                     traceback.format_exc())
    finally:
        ctx.heartbeat.discard(run_id)


def _fail(run_id: str, task: CellTask, ctx: RunnerContext, error: str, started: float,
          tb: str = "", status: str = tracking.FAILED) -> Outcome:
    """Record a claimed cell that could not run (its pretraining failed or was stopped, the
    runner broke)."""
    outcome = Outcome(task.spec, status, run_id, error, time.perf_counter() - started)
    try:
        tracking.set_tags(run_id, {"error": error[:5000]})
        if tb:
            tracking.log_text(run_id, tb, "error.txt")
        tracking.end_run(run_id, status)
    except Exception:  # noqa: BLE001, S110 - the store is down; the console still says why
        pass
    ctx.events({"event": "done", "index": task.index, "head": task.head,
                "status": status, "seconds": outcome.seconds,
                "text": f"{status}  {error.splitlines()[0][:200]}"})
    return outcome


@dataclass
class Pretrained:
    """What ensure_pretrained found or made: the checkpoint and its record, or why not."""

    status: str
    checkpoint: checkpoints.Checkpoint
    checkpoint_meta: dict = field(default_factory=dict)
    run_id: str | None = None
    error: str = ""


# (parent run, checkpoint key) -> a pretraining that failed in that invocation: its other
# cells fail with the same cause instead of trying again
_FAILED_PRETRAININGS: dict[tuple[str, str], Pretrained] = {}
WAIT_FOR_PRETRAINING_S = 10.0  # how often a cell looks whether another host's pretraining ended


def ensure_pretrained(task: CellTask, slot: Slot, ctx: RunnerContext) -> Pretrained:
    """The checkpoint the cell's weights name: from this host's cache when it matches its
    checksum, else made by a pretraining run (kind `pretrain`) under the grid's parent run.

    Held under a file lock, so the runners and slots of one host make it once; across hosts
    the pretraining is claimed like a cell, and a cell whose pretraining runs elsewhere waits
    for it."""
    pspec = pretrained.pretrain_spec(task.spec)
    ckpt = checkpoints.Checkpoint.of(pspec)
    key = (task.parent, ckpt.key)

    def say(text: str) -> None:
        ctx.events({"event": "note", "text": text})

    while True:
        if key in _FAILED_PRETRAININGS:  # tried in this invocation: not again
            return _FAILED_PRETRAININGS[key]
        with ckpt.lock():
            problem = ckpt.problem()
            if problem is None:
                meta = ckpt.meta()
                return Pretrained(tracking.FINISHED, ckpt, meta, meta.get("run_id"))
            if problem != "missing":
                ctx.events({"event": "note", "text": f"pretrained checkpoint for "
                            f"{task.spec.weights} is unusable: {problem}; discarding it and "
                            f"pretraining again"})
                ckpt.discard()
            else:  # another node's, published in the tracking store, sha256-checked
                fetched = publish.fetch(ckpt, pspec, say)
                if fetched is not None:
                    return Pretrained(tracking.FINISHED, ckpt, fetched, fetched["run_id"])
            label = f"pretrain {pspec.name} (for {task.spec.weights})"
            # a finished pretraining whose file this host lacks does not hold the claim
            got = claims.claim(task.exp_id, task.parent, pspec, label, task.grid.device,
                               kind="pretrain", since_ms=int(time.time() * 1000),
                               task_id=task.task_id, run_name=f"pretrain {pspec.name}",
                               tags={"mlflow.source.name": tracking.source_name(task.grid)})
            if got.run_id is not None:
                return _pretrain(task, slot, ctx, pspec, ckpt, got.run_id)
        ctx.events({"event": "note", "text": f"{task.head}: waiting for its pretraining, "
                                             f"{got.holder}"})
        if ctx.stop.event.wait(WAIT_FOR_PRETRAINING_S):
            return Pretrained(tracking.KILLED, ckpt, error="interrupted while waiting for "
                                                           "the pretraining on another node")


def _pretrain(task: CellTask, slot: Slot, ctx: RunnerContext, pspec: RunSpec,
              ckpt: checkpoints.Checkpoint, run_id: str) -> Pretrained:
    """Run the pretraining `run_id` claimed, and commit its checkpoint to this host's cache."""
    ctx.heartbeat.add(run_id)
    partial = ckpt.partial_path
    head = f"[pretrain] {pspec.name}"
    # the pretraining's epochs show under its own name; the cell's start again after it
    ctx.events({"event": "start", "index": task.index, "head": head})
    try:
        outcome = run_child(run_id, task, slot, ctx, {"save_backbone_to": str(partial)},
                             spec=pspec, head=head)
        failed = None
        if outcome.status != tracking.FINISHED:
            failed = Pretrained(outcome.status, ckpt, run_id=run_id,
                                error=f"pretraining run {run_id} ({pspec.name}): "
                                      f"{outcome.error}")
        elif not partial.exists():
            failed = Pretrained(tracking.FAILED, ckpt, run_id=run_id,
                                error=f"pretraining run {run_id} wrote no checkpoint")
        if failed:
            _FAILED_PRETRAININGS[task.parent, ckpt.key] = failed
            return failed
        meta = ckpt.commit(partial, run_id, pspec)
    finally:
        partial.unlink(missing_ok=True)
        ctx.heartbeat.discard(run_id)
        ctx.events({"event": "start", "index": task.index, "head": task.head})
    tracking.set_tags(run_id, {"checkpoint": str(ckpt.path), "checkpoint_sha256": meta["sha256"]})
    unpublished = publish.publish(ckpt, run_id)  # for the other nodes of a cluster
    if unpublished:
        ctx.events({"event": "note", "text": f"pretrained checkpoint {ckpt.key} not "
                                             f"published to the tracking store "
                                             f"({unpublished}): other nodes will pretrain it "
                                             f"again"})
    return Pretrained(tracking.FINISHED, ckpt, meta, run_id)








