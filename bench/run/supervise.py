"""A cell's process, watched: started by the launcher, its marked lines (bench/cell/process.py)
streamed into MLflow and the console, the rest teed into its log, a time limit enforced on
its whole process group, and its end (an error event, a signal, a runner-side failure) made
into the record of its run. bench/run/execute.py calls it for each cell and pretraining.
"""

from __future__ import annotations

import json
import signal
import subprocess
import tempfile
import threading
import time
import traceback
from pathlib import Path

from bench import tracking
from bench.cell.process import MARK
from bench.config.grid import Grid
from bench.config.spec import RunSpec
from bench.run.progress import fmt_s
from bench.run.task import CellTask, Outcome, RunnerContext, Slot, signal_group


def _supervise(ctx: RunnerContext, framework: str, job: Path, log_path: Path, run_id: str,
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


def _record_event(line: str, run_id: str, outcome: Outcome, log, ctx: RunnerContext, index: int,
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
        signal_group(self.proc, signal.SIGTERM)
        if not self._done.wait(self.GRACE_S):
            signal_group(self.proc, signal.SIGKILL)

    def cancel(self) -> None:
        self._done.set()
        if self._timer is not None:
            self._timer.cancel()
        if self.fired:  # whatever the cell started and is still alive goes too
            signal_group(self.proc, signal.SIGKILL)


def _stop(proc, grace_s: float = 10.0) -> None:
    """End a cell and what it started (its process group): SIGTERM, SIGKILL after grace."""
    signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        signal_group(proc, signal.SIGKILL)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass  # unkillable (a process stuck in the kernel); nothing more to do from here
    signal_group(proc, signal.SIGKILL)  # stragglers of the group (loader workers)


def run_child(run_id: str, task: CellTask, slot: Slot, ctx: RunnerContext, job_extra: dict,
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
