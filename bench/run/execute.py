"""One cell from its claim to its record, wherever it runs.

The same code runs in a thread of the local runner (bench/run/runner.py, one thread per slot:
a GPU, or a share of the CPU cores) and inside a Ray task on a cluster node
(bench/run/cluster.py). Whoever supervises the cell's process owns its MLflow calls, so a cell
that dies hard is still recorded, and what a cell makes on a worker (cell.log, error.txt,
history.json) goes to the tracking store from that worker.

For each cell: claim it (bench/run/claims.py; a cell another runner holds is left to it), find
or make its `pretrained:` checkpoint, start its process (forked or fresh, bench/run/forkserver.py)
with its slot's GPU and CPUs, stream the process's events into MLflow and to the driver's
console (bench/run/progress.py events), and record the outcome: FINISHED, FAILED with the error
or the signal that ended the process, KILLED when the runner is stopped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench import checkpoints, tracking
from bench.cell.process import MARK
from bench.config import pretrained
from bench.config.grid import Grid
from bench.config.spec import RunSpec
from bench.run import claims, publish
from bench.run.progress import fmt_s

HELD = "HELD"  # another runner holds the cell (running or finished it): not run here
SKIPPED = "SKIPPED"  # finished before this invocation started

Events = Callable[[dict], None]  # progress events to the driver (bench/run/progress.py)


@dataclass
class Outcome:
    spec: RunSpec
    status: str  # FINISHED | FAILED | KILLED | SKIPPED | HELD
    run_id: str | None = None
    error: str = ""
    seconds: float = 0.0
    metrics: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Slot:
    """Where a cell runs on its machine: the GPU its process sees (CUDA_VISIBLE_DEVICES;
    None: as inherited), the CPU cores it is pinned to (empty: all) and its framework's
    threads (None: the framework's default; else `threads`, or one per pinned core)."""

    name: str = "local"
    gpu: str | None = None
    cpus: tuple[int, ...] = ()
    threads: int | None = None

    def job(self) -> dict:
        """What the cell process applies before its framework starts (bench/cell/process.py)."""
        out: dict = {"slot": self.name}
        if self.gpu is not None:
            out["env"] = {"CUDA_VISIBLE_DEVICES": self.gpu}
        if self.cpus:
            out["cpus"] = list(self.cpus)
        if self.threads or self.cpus:
            out["threads"] = self.threads or len(self.cpus)
        return out


@dataclass
class CellTask:
    """One cell as the driver hands it to a slot or a Ray task (picklable)."""

    exp_id: str
    parent: str
    grid: Grid
    spec: RunSpec
    index: int
    total: int
    since_ms: int | None = None  # --rerun: FINISHED runs before this do not hold the cell
    task_id: str = ""  # the Ray task's id (a retried task takes over its first attempt)
    # a tuned grid's trial under median pruning: [[epoch, val_acc below which it stops]]
    prune_below: list | None = None

    @property
    def head(self) -> str:
        return f"[{self.index + 1}/{self.total}] {self.grid.label(self.spec)}"


class Stop:
    """The cell processes one runner process supervises, to end them all at once (Ctrl-C,
    SIGTERM): each is signalled, and its run is then recorded KILLED."""

    def __init__(self):
        self.event = threading.Event()
        self._procs: set = set()
        self._lock = threading.Lock()

    def add(self, proc) -> None:
        with self._lock:
            self._procs.add(proc)
        if self.event.is_set():
            _signal_group(proc, signal.SIGTERM)

    def discard(self, proc) -> None:
        with self._lock:
            self._procs.discard(proc)

    def __call__(self, grace_s: float = 10.0) -> None:
        """SIGTERM to every cell's process group; SIGKILL to those alive after grace."""
        self.event.set()
        with self._lock:
            procs = list(self._procs)
        for p in procs:
            _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in procs:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                _signal_group(p, signal.SIGKILL)
            except Exception:  # noqa: BLE001, S110 - its own thread also waits on it
                pass

    @property
    def stopped(self) -> bool:
        return self.event.is_set()


@dataclass
class Context:
    """What the cells of one runner process share: the console, the process launcher, the
    heartbeat of owned runs and the stop switch."""

    events: Events
    launcher: object  # bench.run.forkserver.Launcher or anything with start/refused/close
    heartbeat: claims.Heartbeat
    stop: Stop


def run_names(grid: Grid, spec: RunSpec) -> dict:
    """claims.claim's keywords for how a cell's run reads in the UI: its run name (what
    tells it apart first), its configuration across frameworks and seeds (tag
    tlbench.config, to group by) and the command that made it (MLflow's Source)."""
    tags = {"config": grid.config(spec), "mlflow.source.name": tracking.source_name(grid)}
    if grid.cards.get(spec.dataset, {}).get("split", {}).get("test") == "val":
        tags["test_split"] = "val: no held-out test split, test_acc is the validation part's"
    return {"run_name": grid.run_name(spec), "tags": tags}


def execute(task: CellTask, slot: Slot, ctx: Context) -> Outcome:
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
        return _run_child(run_id, task, slot, ctx, extra)
    except Exception as e:  # noqa: BLE001 - the runner's own failure ends the cell only
        return _fail(run_id, task, ctx, f"{type(e).__name__} in the runner: {e}", started,
                     traceback.format_exc())
    finally:
        ctx.heartbeat.discard(run_id)


def _fail(run_id: str, task: CellTask, ctx: Context, error: str, started: float,
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


def ensure_pretrained(task: CellTask, slot: Slot, ctx: Context) -> Pretrained:
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


def _pretrain(task: CellTask, slot: Slot, ctx: Context, pspec: RunSpec,
              ckpt: checkpoints.Checkpoint, run_id: str) -> Pretrained:
    """Run the pretraining `run_id` claimed, and commit its checkpoint to this host's cache."""
    ctx.heartbeat.add(run_id)
    partial = ckpt.partial_path
    head = f"[pretrain] {pspec.name}"
    # the pretraining's epochs show under its own name; the cell's start again after it
    ctx.events({"event": "start", "index": task.index, "head": head})
    try:
        outcome = _run_child(run_id, task, slot, ctx, {"save_backbone_to": str(partial)},
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


def job_for(grid: Grid, spec: RunSpec, slot: Slot, extra: dict) -> dict:
    """The job the cell process reads (bench/cell/process.py): its spec and dataset card, the device
    to use, whether to use deterministic algorithms, and its slot (GPU, CPUs)."""
    return {"spec": spec.to_params(), "card": grid.cards[spec.dataset],
            "device": cell_device(grid, slot), "deterministic": deterministic(grid, spec),
            **slot.job(), **extra}


def cell_device(grid: Grid, slot: Slot | None = None) -> str:
    """The device the cell is told to use: `auto` made definite where it resolved to a GPU,
    so a framework that cannot see that GPU fails the cell instead of measuring the CPU
    under the GPU's kind; `cuda` when its slot gives the process one GPU (cuda:0 to it)."""
    gpu_grid = (grid.device_kind or "").startswith("cuda:")
    if slot is not None and slot.gpu is not None and gpu_grid:
        return "cuda"
    if grid.device == "auto" and gpu_grid:
        return "cuda"
    return grid.device


def deterministic(grid: Grid, spec: RunSpec) -> bool:
    """[run] deterministic. "auto": on for the CPU (a cell run again gives the same numbers,
    at little cost), off on a GPU, where deterministic kernels cost the speed it measures."""
    if isinstance(grid.deterministic, bool):
        return grid.deterministic
    return spec.device_kind == "cpu"


def _run_child(run_id: str, task: CellTask, slot: Slot, ctx: Context, job_extra: dict,
               spec: RunSpec | None = None, head: str | None = None) -> Outcome:
    """Run one spec (the cell's, or its pretraining's) in a child process and record its
    outcome on `run_id`. The cell's own run ends with a `done` event, a pretraining's with a
    note."""
    spec = spec or task.spec
    is_cell = head is None
    head = head or task.head
    grid = task.grid
    started = time.perf_counter()
    outcome = Outcome(spec, tracking.FAILED, run_id)
    limit_s = grid.timeout_minutes * 60 if grid.timeout_minutes else None
    with tempfile.TemporaryDirectory(prefix="tlbench-") as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps(job_for(grid, spec, slot, job_extra)))
        log_path = Path(tmp) / "cell.log"
        with tracking.system_metrics(run_id):
            rc, error = _supervise(ctx, spec.framework, job, log_path, run_id, outcome,
                                   task.index, started, limit_s)
        outcome.seconds = time.perf_counter() - started
        if ctx.stop.stopped:
            outcome.status, outcome.error = tracking.KILLED, "interrupted (Ctrl-C / SIGTERM)"
            error = None
        elif rc == 0 and error is None:
            outcome.status = tracking.FINISHED
        else:
            if error is None:
                error = {"type": "ChildDied", "message":
                         f"cell process exited with status {rc} "
                         f"({_signal_name(rc)}) without reporting an error",
                         "traceback": _tail(log_path)}
            outcome.error = f"{error['type']}: {error['message']}"
        _record_outcome(run_id, outcome, error, log_path)
    acc = outcome.metrics.get("test_acc")
    result = (f"test_acc {acc:.3f}" if acc is not None else "") if outcome.status == \
        tracking.FINISHED else outcome.error.splitlines()[0][:200]
    text = f"{outcome.status}  {fmt_s(outcome.seconds)}  {result}"
    if is_cell:
        ctx.events({"event": "done", "index": task.index, "head": head,
                    "status": outcome.status, "seconds": outcome.seconds, "text": text})
    else:
        ctx.events({"event": "note", "text": f"{head}  {text}"})
    return outcome


def _supervise(ctx: Context, framework: str, job: Path, log_path: Path, run_id: str,
               outcome: Outcome, index: int, started: float, limit_s: float | None = None):
    """Run the child, stream its events into MLflow, tee the rest into the cell log.

    Returns (exit status, error event or None). A line this runner cannot record (not JSON,
    or MLflow refused it) ends the cell with that error, since its record would be
    incomplete; a cell still running after `limit_s` seconds is killed with everything it
    started (its process group) and fails as timed out.

    `startup_seconds` is measured here, from asking for the cell process to the child's
    `startup` event (its backend imported): forked from a warm server that is the fork
    (plus the server's own import for a framework's first cell), spawned it is a whole
    interpreter start and import."""
    launcher = ctx.launcher
    proc, how = launcher.start(framework, job)
    ctx.stop.add(proc)
    # the limit starts with the cell's process: a fork server's one import is not the cell's
    watchdog = Watchdog(proc, limit_s)
    error = None
    try:
        with log_path.open("w") as log:
            try:
                tags = {"launch": how}
                if how == "spawn" and framework in launcher.refused:
                    tags["launch_note"] = launcher.refused[framework][:5000]
                tracking.set_tags(run_id, tags)
                for line in proc.stdout:
                    if not line.startswith(MARK):
                        log.write(line)
                        continue
                    error = _record_event(line, run_id, outcome, log, ctx, index,
                                          started) or error
            except Exception as e:  # noqa: BLE001 - a runner-side failure ends this cell only
                error = _runner_error(e)
                log.write(f"[tlbench runner] {error['message']}\n{error['traceback']}")
                _stop(proc)
        rc = proc.wait()
        proc.stdout.close()
    except BaseException:
        _stop(proc)
        raise
    finally:
        watchdog.cancel()
        ctx.stop.discard(proc)
    if watchdog.fired:
        error = {"type": "CellTimeout",
                 "message": f"timed out after {limit_s / 60:g} minutes ([run] timeout_minutes); "
                            f"the cell's processes were killed",
                 "traceback": _tail(log_path)}
    return rc, error


def _record_event(line: str, run_id: str, outcome: Outcome, log, ctx: Context, index: int,
                  started: float) -> dict | None:
    """One marked line of the child into MLflow (or the console); returns the child's
    `error` event, if this is one."""
    try:
        ev = json.loads(line[len(MARK):])
        kind = ev.pop("event")
    except (ValueError, AttributeError, KeyError) as e:
        raise BadEvent(f"malformed event line from the cell process: "
                       f"{line.strip()[:300]!r} ({type(e).__name__}: {e})") from e
    if kind == "metrics":
        tracking.log_metrics(run_id, ev["metrics"], ev["step"])
        if ev["step"] is None:
            outcome.metrics.update(ev["metrics"])
    elif kind == "tags":
        tracking.set_tags(run_id, ev["tags"])
    elif kind == "artifact":
        tracking.log_text(run_id, ev["text"], ev["name"])
    elif kind == "inputs":
        tracking.log_inputs(run_id, ev["inputs"])
    elif kind == "startup":
        tracking.log_metrics(run_id, {"startup_seconds": time.perf_counter() - started})
    elif kind == "error":
        log.write(ev.get("traceback", ""))
        return ev
    elif kind == "progress":
        ctx.events({"event": "epoch", "index": index, **ev})
    return None


def _record_outcome(run_id: str, outcome: Outcome, error: dict | None, log_path: Path) -> None:
    """The outcome into MLflow, each piece tried on its own: a store that fails on one still
    gets the others, and the run is ended in any case (FAILED if its record is incomplete)."""
    steps = [lambda: tracking.log_metrics(run_id, {"cell_seconds": outcome.seconds}),
             lambda: _log_log(run_id, log_path)]
    if error is not None:
        steps[:0] = [lambda: tracking.set_tags(run_id, {"error": outcome.error[:5000]}),
                     lambda: tracking.log_text(run_id, error.get("traceback", ""), "error.txt")]
    for step in steps:
        try:
            step()
        except Exception as e:  # noqa: BLE001 - recorded as the cell's error below
            if outcome.status == tracking.FINISHED:
                outcome.status = tracking.FAILED
                outcome.error = (f"{type(e).__name__} in the runner: the cell finished but "
                                 f"its record could not be completed: {e}")
    try:
        if outcome.status != tracking.FINISHED and error is None:
            tracking.set_tags(run_id, {"error": outcome.error[:5000]})
        tracking.end_run(run_id, outcome.status)
    except Exception as e:  # noqa: BLE001 - the store is down; the console still says why
        outcome.error = outcome.error or f"{type(e).__name__} in the runner: {e}"


def _signal_name(rc: int) -> str:
    if rc < 0:
        try:
            return signal.Signals(-rc).name
        except ValueError:
            return f"signal {-rc}"
    return "error" if rc else "ok"


def _log_log(run_id: str, log_path: Path) -> None:
    if log_path.exists():
        tracking.log_file(run_id, str(log_path))


class BadEvent(ValueError):
    """A marked line from the cell process that is not a well-formed event."""


def _runner_error(e: Exception) -> dict:
    """The error of a cell whose output this runner could not record, as an error event."""
    what = str(e) if isinstance(e, BadEvent) else \
        f"the runner could not record the cell's output in MLflow: {type(e).__name__}: {e}"
    return {"type": type(e).__name__, "message": what, "traceback": traceback.format_exc()}


def _tail(log_path: Path) -> str:
    return log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""


class Watchdog:
    """Ends a cell that runs past its time limit: SIGTERM to its process group, SIGKILL
    after GRACE_S. Only signals (the runner's thread reads and waits for the cell)."""

    GRACE_S = 5.0

    def __init__(self, proc, limit_s: float | None):
        self.proc = proc
        self.fired = False
        self._done = threading.Event()
        self._timer = None
        if limit_s:
            self._timer = threading.Timer(limit_s, self._fire)
            self._timer.daemon = True
            self._timer.start()

    def _fire(self) -> None:
        self.fired = True
        _signal_group(self.proc, signal.SIGTERM)
        if not self._done.wait(self.GRACE_S):
            _signal_group(self.proc, signal.SIGKILL)

    def cancel(self) -> None:
        self._done.set()
        if self._timer is not None:
            self._timer.cancel()
        if self.fired:  # whatever the cell started and is still alive goes too
            _signal_group(self.proc, signal.SIGKILL)


def _stop(proc, grace_s: float = 10.0) -> None:
    """End a cell and what it started (its process group): SIGTERM, SIGKILL after grace."""
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass  # unkillable (a process stuck in the kernel); nothing more to do from here
    _signal_group(proc, signal.SIGKILL)  # stragglers of the group (loader workers)


def _signal_group(proc, sig: int) -> None:
    """`sig` to the cell's process group: a cell leads its own (bench/run/forkserver.py), so
    DataLoader workers and the like go with it. A cell that leads none gets it alone."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        proc.send_signal(sig)


