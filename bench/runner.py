"""Runs a grid's cells: skip finished ones, one child process per cell, failures recorded.

One child process per cell because TensorFlow takes all GPU memory unless told otherwise, a
crash or an out-of-memory in one cell must not end the grid, and the device's memory must be
returned in full between cells. The process is forked from a per-framework server that
imported the framework once (bench/forkserver.py), or started fresh where that cannot be. The
child reports through marked lines (bench/cell.py); this process owns every MLflow call, so
a cell that dies hard is still recorded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from bench import pretrain, tracking
from bench.cell import MARK
from bench.forkserver import Launcher
from bench.grid import Grid
from bench.spec import RunSpec


@dataclass
class Outcome:
    spec: RunSpec
    status: str  # FINISHED | FAILED | KILLED | SKIPPED
    run_id: str | None = None
    error: str = ""
    seconds: float = 0.0
    metrics: dict = field(default_factory=dict)


@dataclass
class GridResult:
    experiment_id: str
    parent_run_id: str | None
    outcomes: list[Outcome]

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status in (tracking.FAILED, tracking.KILLED)]


class Progress:
    """One line per event when not on a terminal (CI logs); a live line on a terminal."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total = total
        self.stream = stream
        self.tty = stream.isatty()
        self.done_seconds: list[float] = []

    def eta(self, remaining_cells: int, cell_left: float | None) -> str:
        if not self.done_seconds:
            return "?" if cell_left is None else _fmt_s(cell_left)
        avg = sum(self.done_seconds) / len(self.done_seconds)
        left = avg if cell_left is None else cell_left
        return _fmt_s(left + avg * max(remaining_cells - 1, 0))

    def line(self, text: str, live: bool = False, quiet: bool = False) -> None:
        """`live`: overwrite the line on a terminal; `quiet`: skip it in a log."""
        if quiet and not self.tty:
            return
        if self.tty and live:
            self.stream.write("\r\033[K" + text[: _columns(self.stream) - 1])
        else:
            self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
        self.stream.flush()


def _columns(stream) -> int:
    """The width of the terminal `stream` is on. Not stdout's: `bench run > table.md` leaves
    the progress on a terminal and stdout in a file."""
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        columns = 0
    return columns if columns > 0 else shutil.get_terminal_size().columns


def _fmt_s(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def run_grid(grid: Grid, grid_text: str, rerun: bool = False,
             stream=sys.stderr, launcher: Launcher | None = None) -> GridResult:
    """Run the grid's cells that have no FINISHED run yet (all of them with `rerun`).

    A grid not yet stamped with its device kind (Grid.on_device: the CLI does it) is stamped
    here, before finished cells are looked up. `launcher` starts the cell processes (default:
    fork servers, else fresh interpreters)."""
    if grid.device_kind is None:
        grid = grid.on_device()
    exp_id, restored = tracking.open_experiment(grid.name)
    closed = tracking.close_stale_runs(exp_id)
    if closed:
        print(f"marked {len(closed)} run(s) left RUNNING by a dead runner as KILLED",
              file=stream)
    todo, skipped = plan(grid, exp_id, rerun)
    if restored:
        _say_restored(grid, exp_id, rerun, stream)
    outcomes = [Outcome(s, "SKIPPED") for s in skipped]
    print(f"grid {grid.name!r}: {len(grid.specs)} cells on {grid.device_kind}, "
          f"{len(outcomes)} already finished, {len(todo)} to run  "
          f"(MLflow: {tracking.tracking_uri()}, experiment {exp_id})", file=stream)
    if not todo:
        return GridResult(exp_id, None, outcomes)

    parent = tracking.start_parent(exp_id, grid, len(todo), grid_text)
    progress = Progress(len(todo), stream)
    status = tracking.FINISHED
    launcher = launcher or Launcher()
    try:
        for i, spec in enumerate(todo):
            try:
                o = run_cell(exp_id, parent, grid, spec, i, progress, launcher)
            except Exception as e:  # noqa: BLE001 - the runner's own failure ends the cell only
                o = Outcome(spec, tracking.FAILED, error=f"{type(e).__name__} in the runner: "
                                                        f"{e}")
                progress.line(f"[{i + 1}/{progress.total}] {grid.label(spec)}  FAILED  "
                              f"{o.error.splitlines()[0][:200]}")
            outcomes.append(o)
            progress.done_seconds.append(o.seconds)
    except KeyboardInterrupt:
        status = tracking.KILLED
        raise
    finally:
        launcher.close()
        failed = [o for o in outcomes if o.status != tracking.FINISHED and o.status != "SKIPPED"]
        tracking.set_tags(parent, {"failed": str(len(failed)),
                                   "finished": str(sum(o.status == tracking.FINISHED
                                                       for o in outcomes))})
        tracking.end_run(parent, status if status == tracking.KILLED
                         else (tracking.FAILED if failed else tracking.FINISHED))
    return GridResult(exp_id, parent, outcomes)


def plan(grid: Grid, exp_id: str, rerun: bool = False) -> tuple[list[RunSpec], list[RunSpec]]:
    """(cells to run, cells skipped): a cell is skipped when the experiment holds a FINISHED
    run of its hash, which names its device kind once the grid is stamped (on_device)."""
    done = set() if rerun else tracking.finished_hashes(exp_id)
    return ([s for s in grid.specs if s.hash not in done],
            [s for s in grid.specs if s.hash in done])


def _say_restored(grid: Grid, exp_id: str, rerun: bool, stream) -> None:
    """A deleted experiment keeps its name (and runs) until purged, so it was restored: say
    so, since its finished cells count as done again."""
    held = len({s.hash for s in grid.specs} & tracking.finished_hashes(exp_id))
    fate = "they run again (--rerun)" if rerun else "they will be skipped"
    uri = tracking.tracking_uri()
    store = ("--tracking-uri" if uri.startswith(("http://", "https://"))
             else "--backend-store-uri")
    print(f"experiment {grid.name!r} (id {exp_id}) had been deleted; restored it. It holds "
          f"{held} finished cell(s) of this grid: {fate}. To start fresh: --rerun (every "
          f"cell runs again, the old runs stay), or purge it first: mlflow experiments "
          f"delete --experiment-id {exp_id} && mlflow gc {store} {uri} --experiment-ids "
          f"{exp_id}", file=stream)


def run_cell(exp_id: str, parent: str, grid: Grid, spec: RunSpec, index: int,
             progress: Progress, launcher: Launcher) -> Outcome:
    label = grid.label(spec)
    head = f"[{index + 1}/{progress.total}] {label}"
    job: dict = {}
    if pretrain.is_pretrained(spec.weights):
        made = ensure_pretrained(exp_id, parent, grid, spec, progress, launcher)
        if made.status != tracking.FINISHED:
            return _refuse(exp_id, parent, grid, spec, label, head, progress,
                           f"PretrainingFailed: {made.error}", made.run_id)
        job = {"weights_file": str(made.checkpoint.path),
               "weights_sha256": made.checkpoint_meta["sha256"]}
    run_id = tracking.start_cell(exp_id, parent, spec, label, grid.device)
    if job:
        tracking.set_tags(run_id, {"pretrain_run_id": made.checkpoint_meta.get("run_id", ""),
                                   "pretrain_checkpoint": job["weights_file"]})
    return _run_child(run_id, grid, spec, head, progress, launcher, job)


@dataclass
class Pretrained:
    """What ensure_pretrained found or made: the checkpoint and its record, or why not."""

    status: str
    checkpoint: pretrain.Checkpoint
    checkpoint_meta: dict = field(default_factory=dict)
    run_id: str | None = None
    error: str = ""


# (parent run, checkpoint key) -> a pretraining that failed in that invocation: its other
# cells fail with the same cause instead of trying again
_FAILED_PRETRAININGS: dict[tuple[str, str], Pretrained] = {}


def ensure_pretrained(exp_id: str, parent: str, grid: Grid, cell: RunSpec,
                      progress: Progress, launcher: Launcher) -> Pretrained:
    """The checkpoint `cell`'s weights name: reused when it is in the cache and matches its
    checksum, else made by a pretraining run (kind `pretrain`) under this grid's parent run.
    Held under a file lock, so concurrent runners make it once."""
    pspec = pretrain.pretrain_spec(cell)
    ckpt = pretrain.Checkpoint.of(pspec)
    if (parent, ckpt.key) in _FAILED_PRETRAININGS:  # tried in this invocation: not again
        return _FAILED_PRETRAININGS[parent, ckpt.key]
    with ckpt.lock():
        problem = ckpt.problem()
        if problem is None:
            meta = ckpt.meta()
            return Pretrained(tracking.FINISHED, ckpt, meta, meta.get("run_id"))
        if problem != "missing":
            progress.line(f"pretrained checkpoint for {cell.weights} is unusable: {problem}; "
                          f"discarding it and pretraining again")
            ckpt.discard()
        # -- issue 12: another node's published checkpoint (tracking store), sha256-checked;
        # only when the cache lacks it (a corrupted local copy is made again, as before) --
        fetched = pretrain.fetch(ckpt, pspec, progress.line) if problem == "missing" else None
        if fetched is not None:
            return Pretrained(tracking.FINISHED, ckpt, fetched, fetched["run_id"])
        # -- end issue 12 --
        label = f"pretrain {pspec.name} (for {cell.weights})"
        run_id = tracking.start_cell(exp_id, parent, pspec, label, grid.device, kind="pretrain")
        partial = ckpt.partial_path
        try:
            outcome = _run_child(run_id, grid, pspec, f"[pretrain] {pspec.name}", progress,
                                 launcher, {"save_backbone_to": str(partial)})
            failed = None
            if outcome.status != tracking.FINISHED:
                failed = Pretrained(outcome.status, ckpt, run_id=run_id,
                                    error=f"pretraining run {run_id} ({pspec.name}): "
                                          f"{outcome.error}")
            elif not partial.exists():
                failed = Pretrained(tracking.FAILED, ckpt, run_id=run_id,
                                    error=f"pretraining run {run_id} wrote no checkpoint")
            if failed:
                _FAILED_PRETRAININGS[parent, ckpt.key] = failed
                return failed
            meta = ckpt.commit(partial, run_id, pspec)
        finally:
            partial.unlink(missing_ok=True)
        tracking.set_tags(run_id, {"checkpoint": str(ckpt.path),
                                   "checkpoint_sha256": meta["sha256"]})
        # -- issue 12: publish it for the other nodes (tracking store artifacts) --
        unpublished = pretrain.publish(ckpt, run_id)
        if unpublished:
            progress.line(f"pretrained checkpoint {ckpt.key} not published to the tracking "
                          f"store ({unpublished}): other nodes will pretrain it again")
        # -- end issue 12 --
        return Pretrained(tracking.FINISHED, ckpt, meta, run_id)


def _refuse(exp_id: str, parent: str, grid: Grid, spec: RunSpec, label: str, head: str,
            progress: Progress, error: str, cause_run: str | None) -> Outcome:
    """Record a cell that cannot start (its pretraining failed) as FAILED, with the cause."""
    run_id = tracking.start_cell(exp_id, parent, spec, label, grid.device)
    tracking.set_tags(run_id, {"error": error[:5000], "pretrain_run_id": cause_run or ""})
    tracking.end_run(run_id, tracking.FAILED)
    progress.line(f"{head}  FAILED  {error.splitlines()[0][:200]}")
    return Outcome(spec, tracking.FAILED, run_id, error)


def job_for(grid: Grid, spec: RunSpec, extra: dict) -> dict:
    """The job the cell process reads (bench/cell.py): its spec and dataset card, the device
    to use, and whether to use deterministic algorithms."""
    return {"spec": spec.to_params(), "card": grid.cards[spec.dataset],
            "device": cell_device(grid), "deterministic": deterministic(grid, spec), **extra}


def cell_device(grid: Grid) -> str:
    """The device the cell is told to use: `auto` made definite where it resolved to a GPU,
    so a framework that cannot see that GPU fails the cell instead of measuring the CPU
    under the GPU's kind."""
    if grid.device == "auto" and (grid.device_kind or "").startswith("cuda:"):
        return "cuda"
    return grid.device


def deterministic(grid: Grid, spec: RunSpec) -> bool:
    """[run] deterministic. "auto": on for the CPU (a cell run again gives the same numbers,
    at little cost), off on a GPU, where deterministic kernels cost the speed it measures."""
    if isinstance(grid.deterministic, bool):
        return grid.deterministic
    return spec.device_kind == "cpu"


def _run_child(run_id: str, grid: Grid, spec: RunSpec, head: str, progress: Progress,
               launcher: Launcher, job_extra: dict) -> Outcome:
    """Run one spec in a child process and record its outcome on `run_id`."""
    started = time.perf_counter()
    outcome = Outcome(spec, tracking.FAILED, run_id)
    limit_s = grid.timeout_minutes * 60 if grid.timeout_minutes else None
    with tempfile.TemporaryDirectory(prefix="tlbench-") as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps(job_for(grid, spec, job_extra)))
        log_path = Path(tmp) / "cell.log"
        progress.line(f"{head}  starting", live=True, quiet=True)
        try:
            with tracking.system_metrics(run_id):
                rc, error = _supervise(launcher, spec.framework, job, log_path, run_id,
                                       outcome, head, progress, len(progress.done_seconds),
                                       started, limit_s)
        except KeyboardInterrupt:
            outcome.status, outcome.error = tracking.KILLED, "interrupted (Ctrl-C / SIGTERM)"
            tracking.set_tags(run_id, {"error": outcome.error})
            tracking.end_run(run_id, tracking.KILLED)
            _log_log(run_id, log_path)
            raise
        outcome.seconds = time.perf_counter() - started
        if rc == 0 and error is None:
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
    progress.line(f"{head}  {outcome.status}  {_fmt_s(outcome.seconds)}  {result}")
    return outcome


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


def _supervise(launcher: Launcher, framework: str, job: Path, log_path: Path, run_id: str,
               outcome: Outcome, head: str, progress: Progress, cells_done: int,
               started: float, limit_s: float | None = None):
    """Run the child, stream its events into MLflow, tee the rest into the cell log.

    Returns (exit status, error event or None). A line this runner cannot record (not JSON,
    or MLflow refused it) ends the cell with that error, since its record would be
    incomplete; a cell still running after `limit_s` seconds is killed with everything it
    started (its process group) and fails as timed out.

    `startup_seconds` is measured here, from asking for the cell process to the child's
    `startup` event (its backend imported): forked from a warm server that is the fork
    (plus the server's own import for a framework's first cell), spawned it is a whole
    interpreter start and import."""
    proc, how = launcher.start(framework, job)
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
                    error = _record_event(line, run_id, outcome, log, head, progress,
                                          cells_done, started) or error
            except Exception as e:  # noqa: BLE001 - a runner-side failure ends this cell only
                error = _runner_error(e)
                log.write(f"[tlbench runner] {error['message']}\n{error['traceback']}")
                _stop(proc)
        rc = proc.wait()
    except BaseException:
        _stop(proc)
        raise
    finally:
        watchdog.cancel()
    if watchdog.fired:
        error = {"type": "CellTimeout",
                 "message": f"timed out after {limit_s / 60:g} minutes ([run] timeout_minutes); "
                            f"the cell's processes were killed",
                 "traceback": _tail(log_path)}
    return rc, error


def _record_event(line: str, run_id: str, outcome: Outcome, log, head: str,
                  progress: Progress, cells_done: int, started: float) -> dict | None:
    """One marked line of the child into MLflow (or the progress line); returns the
    child's `error` event, if this is one."""
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
    elif kind == "startup":
        tracking.log_metrics(run_id, {"startup_seconds": time.perf_counter() - started})
    elif kind == "error":
        log.write(ev.get("traceback", ""))
        return ev
    elif kind == "progress":
        progress.line(_progress_text(head, ev, progress, cells_done, started),
                      live=True, quiet="val_acc" not in ev)
    return None


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
    """`sig` to the cell's process group: a cell leads its own (bench/forkserver.py), so
    DataLoader workers and the like go with it. A cell that leads none gets it alone."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        proc.send_signal(sig)


def _progress_text(head: str, ev: dict, progress: Progress, cells_done: int,
                   started: float) -> str:
    elapsed = time.perf_counter() - started
    frac = ev.get("fraction") or 0.0
    cell_left = elapsed / frac - elapsed if frac > 0.02 else None
    remaining = progress.total - cells_done
    parts = [head, f"{ev.get('phase', '')} epoch {ev.get('epoch')}/{ev.get('epochs')}"]
    if ev.get("val_acc") is not None:
        parts.append(f"val_acc {ev['val_acc']:.3f}")
    parts.append(f"ETA {progress.eta(remaining, cell_left)}")
    return "  ".join(parts)


def install_sigterm_handler() -> None:
    """SIGTERM (a scheduler stopping the job) ends the grid like Ctrl-C: cell and parent
    runs are marked KILLED, finished cells stay FINISHED."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handler)
