"""What the runner hands around for each cell: the task (a cell with its grid, its place in
the invocation, its claim window), the slot it runs in, the runner-side context (events,
launcher, heartbeat, stop), and its outcome. bench/run/execute.py runs a task;
bench/run/pool.py and bench/run/cluster.py make and collect them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from bench.config.grid import Grid
from bench.config.spec import RunSpec
from bench.run import claims

HELD = "HELD"  # another runner holds the cell (running or finished it): not run here
SKIPPED = "SKIPPED"  # finished before this invocation started

Events = Callable[[dict], None]  # progress events to the runner (bench/run/progress.py)


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
    """One cell as the runner hands it to a slot or a Ray task (picklable)."""

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
            signal_group(proc, signal.SIGTERM)

    def discard(self, proc) -> None:
        with self._lock:
            self._procs.discard(proc)

    def __call__(self, grace_s: float = 10.0) -> None:
        """SIGTERM to every cell's process group; SIGKILL to those alive after grace."""
        self.event.set()
        with self._lock:
            procs = list(self._procs)
        for p in procs:
            signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in procs:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                signal_group(p, signal.SIGKILL)
            except Exception:  # noqa: BLE001, S110 - its own thread also waits on it
                pass

    @property
    def stopped(self) -> bool:
        return self.event.is_set()


@dataclass
class RunnerContext:
    """What the cells of one runner process share: the console, the process launcher, the
    heartbeat of owned runs and the stop switch."""

    events: Events
    launcher: object  # bench.run.forkserver.Launcher or anything with start/refused/close
    heartbeat: claims.Heartbeat
    stop: Stop


def signal_group(proc, sig: int) -> None:
    """`sig` to the cell's process group: a cell leads its own (bench/run/forkserver.py), so
    DataLoader workers and the like go with it. A cell that leads none gets it alone."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        proc.send_signal(sig)
