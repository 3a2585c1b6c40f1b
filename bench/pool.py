"""Several cells at once on one machine: one slot per GPU (or per share of the CPU cores),
one thread per slot that runs the slot's cells one after another (bench/execute.py).

Why a pool of our own and not Ray started locally: a slot is a thread that waits on a
child process, so the pool needs no scheduler, and the default path (`nox -s bench` on a
laptop) keeps no Ray dependency, no Ray start-up (~2.5 s and ~300 MB of processes here) and
the per-framework fork servers that make a cell's start cheap (bench/forkserver.py). Past
one machine the cells are Ray tasks (bench/cluster.py); the cell code is the same.

    --parallel auto   one cell per visible GPU (--gpus picks some); one at a time on a CPU
    --parallel N      N cells at once: N GPUs, or the CPU cores split into N equal sets
                      (each cell pinned to its cores, its framework's threads = its cores)
"""

from __future__ import annotations

import collections
import os
import queue
import threading
import time
from collections.abc import Callable

from bench import devices
from bench.execute import Context, Outcome, Slot, Stop, execute
from bench.grid import Grid, parallel_problem
from bench.tracking import FAILED


class SlotError(ValueError):
    """--parallel / --gpus that this machine cannot honour (nothing has run)."""


def cpu_list() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def parse_parallel(value: object) -> str | int:
    """`auto` or a count >= 1 (from the command line or [run] parallel)."""
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    problem = parallel_problem(value)
    if problem:
        raise SlotError(f"parallel = {value!r}: {problem}")
    return value


def parse_gpus(text: str) -> list[int]:
    """`0,2,5` -> [0, 2, 5]: indices among the visible GPUs, as cuda:<i> counts them."""
    try:
        out = [int(x) for x in text.split(",") if x.strip() != ""]
    except ValueError:
        out = []
    if not out or len(set(out)) != len(out) or min(out) < 0:
        raise SlotError(f"--gpus {text!r}: allowed: distinct GPU indices separated by commas, "
                        f"as cuda:<i> counts the visible GPUs (e.g. 0,2,5)")
    return out


def choose_gpus(grid: Grid, gpus: list[int] | None) -> Grid:
    """The grid stamped for the GPUs `--gpus` picks (their model must be one), else as it
    is. Raises SlotError when they are not here or mix models."""
    if gpus is None:
        return grid
    if grid.device not in ("auto", "cuda") and not grid.device.startswith("cuda:"):
        raise SlotError(f"--gpus needs a GPU device; this grid runs on {grid.device!r} "
                        f"(run.device or --device: auto, cuda)")
    visible = devices.visible_gpus()
    bad = [i for i in gpus if i >= len(visible)]
    if bad:
        raise SlotError(f"--gpus {','.join(map(str, gpus))}: {len(visible)} NVIDIA GPU(s) are "
                        f"visible here ({', '.join(visible) or 'none'}); allowed: 0.."
                        f"{len(visible) - 1}" if visible else
                        f"--gpus {','.join(map(str, gpus))}: no NVIDIA GPU is visible here")
    models = sorted({visible[i] for i in gpus})
    if len(models) > 1:
        raise SlotError(f"--gpus {','.join(map(str, gpus))} mixes GPU models "
                        f"({', '.join(models)}): "
                        f"a grid's cells are measured on one kind of device; pick GPUs of one "
                        f"model, or run the grid once per model")
    return grid.with_device_kind(f"cuda:{models[0]}", "cuda")


def slots_for(grid: Grid, parallel: object = "auto", gpus: list[int] | None = None) -> list[Slot]:
    """The slots a grid stamped with its device kind runs in on this machine."""
    parallel = parse_parallel(parallel)
    kind = grid.device_kind or "cpu"
    cpus = cpu_list()
    if kind.startswith("cuda:"):
        entries = devices.visible_entries()
        chosen = gpus is not None
        if not chosen:
            if grid.device.startswith("cuda:"):  # one named GPU
                gpus = [int(grid.device.split(":")[1])]
            else:
                gpus = list(range(len(entries))) if parallel == "auto" else \
                    list(range(min(parallel, len(entries))))
        n = len(gpus) if parallel == "auto" else parallel
        if n > len(gpus):
            raise SlotError(f"--parallel {n}: {len(gpus)} GPU(s) to run on (one cell per GPU); "
                            f"allowed: 1..{len(gpus)}, or auto")
        if n == 1 and not chosen:
            return [Slot("local")]  # one cell at a time on run.device's GPU: as always
        share = _split(cpus, n) if n > 1 else [()] * n
        return [Slot(f"gpu {entries[g]}", entries[g], share[i]) for i, g in enumerate(gpus[:n])]
    if gpus is not None:
        raise SlotError(f"--gpus needs a GPU device; this grid runs on {kind}")
    n = 1 if parallel == "auto" else parallel
    if kind != "cpu" and n > 1:
        raise SlotError(f"--parallel {n}: the {kind} device runs one cell at a time")
    if n > len(cpus):
        raise SlotError(f"--parallel {n}: this machine has {len(cpus)} CPU core(s) for the "
                        f"cells; allowed: 1..{len(cpus)}")
    if n == 1:
        return [Slot("local")]
    return [Slot(f"cpus {_span(c)}", None, c) for c in _split(cpus, n)]


def _split(cpus: list[int], n: int) -> list[tuple[int, ...]]:
    k = len(cpus) // n
    return [tuple(cpus[i * k:(i + 1) * k]) for i in range(n)] if k else [()] * n


def _span(cpus: tuple[int, ...]) -> str:
    return f"{cpus[0]}-{cpus[-1]}" if len(cpus) > 1 else str(cpus[0])


class LocalPool:
    """Runs cells in `slots`, one thread per slot, in the order given."""

    def __init__(self, slots: list[Slot], launcher):
        self.slots = slots
        self.launcher = launcher

    @property
    def width(self) -> int:
        return len(self.slots)

    def describe(self) -> dict[str, str]:
        return {"executor": "local", "parallel": str(len(self.slots)),
                "slots": "; ".join(s.name for s in self.slots)}

    def close(self) -> None:
        self.launcher.close()

    def run(self, tasks: list, events: Callable[[dict], None], heartbeat,
            on_outcome: Callable[[Outcome], None]) -> None:
        """Every task through execute(); each outcome to `on_outcome` as it comes. Ctrl-C
        (KeyboardInterrupt in this, the main thread) stops every running cell, waits for
        their KILLED records, then propagates."""
        ctx = Context(events, self.launcher, heartbeat, Stop())
        todo = collections.deque(tasks)
        lock = threading.Lock()
        results: queue.Queue = queue.Queue()
        idle = []  # slots out of work
        all_done = threading.Event()
        # fork servers are started here, in the main thread: a process started by a thread
        # is ended with that thread (PR_SET_PDEATHSIG), and slot threads come and go
        prepare = getattr(self.launcher, "prepare", None)
        if prepare and len(self.slots) > 1:
            prepare(sorted({t.spec.framework for t in tasks}))

        def work(slot: Slot) -> None:
            while True:
                with lock:
                    task = todo.popleft() if todo and not ctx.stop.stopped else None
                    if task is None:
                        idle.append(slot)
                        break
                try:
                    results.put(execute(task, slot, ctx))
                except BaseException as e:  # noqa: BLE001 - the runner's failure ends one cell
                    msg = f"{type(e).__name__} in the runner: {e}"
                    ctx.events({"event": "done", "index": task.index, "head": task.head,
                                "status": FAILED, "text": f"FAILED  {msg[:200]}"})
                    results.put(Outcome(task.spec, FAILED, error=msg))
            # stays until every slot is done: what a cell started from this thread (a fresh
            # fork server) lives as long as the thread
            all_done.wait()

        threads = [threading.Thread(target=work, args=(s,), name=f"tlbench-slot-{s.name}",
                                    daemon=True) for s in self.slots]
        for t in threads:
            t.start()

        def drain(until_idle_s: float | None) -> None:
            deadline = None if until_idle_s is None else time.monotonic() + until_idle_s
            while True:
                try:
                    on_outcome(results.get(timeout=0.2))
                except queue.Empty:
                    with lock:
                        if len(idle) == len(threads) and results.empty():
                            return
                    if deadline is not None and time.monotonic() > deadline:
                        return

        try:
            drain(None)
        except KeyboardInterrupt:
            ctx.stop()
            drain(120)
            raise
        finally:
            all_done.set()
