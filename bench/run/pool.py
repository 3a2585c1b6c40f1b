"""Several cells at once on one machine: one slot per GPU (or per share of the CPU cores;
bench/run/plan.py chooses them), one thread per slot that runs the slot's cells one after
another (bench/run/execute.py).

Why a pool of our own and not Ray started locally: a slot is a thread that waits on a
child process, so the pool needs no scheduler, and the default path (`nox -s bench` on a
laptop) keeps no Ray dependency, no Ray start-up (~2.5 s and ~300 MB of processes here) and
the per-framework fork servers that make a cell's start cheap (bench/run/forkserver.py). Past
one machine the cells are Ray tasks (bench/run/cluster.py); the cell code is the same.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable

from bench import tracking
from bench.run.execute import execute
from bench.run.preflight import server_down
from bench.run.task import Outcome, RunnerContext, Slot, Stop
from bench.tracking import FAILED


class LocalPool:
    """Runs cells in `slots`, one thread per slot, in the order given."""

    def __init__(self, slots: list[Slot], launcher):
        self.slots = slots
        self.launcher = launcher
        self.store_down: str | None = None  # why the tracking server stopped answering

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
        ctx = RunnerContext(events, self.launcher, heartbeat, Stop())
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
                    task = todo.popleft() if todo and not ctx.stop.stopped \
                        and self.store_down is None else None
                    if task is None:
                        idle.append(slot)
                        break
                try:
                    outcome = execute(task, slot, ctx)
                except BaseException as e:  # noqa: BLE001 - the runner's failure ends one cell
                    msg = f"{type(e).__name__} in the runner: {e}"
                    ctx.events({"event": "done", "index": task.index, "head": task.head,
                                "status": FAILED, "text": f"FAILED  {msg[:200]}"})
                    outcome = Outcome(task.spec, FAILED, error=msg)
                results.put(outcome)
                why = server_down(tracking.tracking_uri()) if outcome.status == FAILED \
                    else None  # a dead tracking server, or only this cell?
                if why:
                    with lock:
                        self.store_down = self.store_down or why
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
