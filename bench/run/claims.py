"""A cell is claimed before it runs, so that two runners on one grid and one store (two
terminals, two Ray drivers, a runner and its restarted self) never run it twice.

The claim is the cell's own MLflow run. MLflow has no compare-and-set, so the claim is a
write-then-read: create the run (RUNNING), then read every run of the same spec hash. If any
other run is alive (RUNNING with a live owner) or has FINISHED the cell, withdraw (delete the
run just made) and leave the cell to it. Two claimants can never both win: the one that reads
second sees the other's run, because each wrote before it read (the store is one database).
Both may lose at once, rarely; each then looks again after a random pause and tries once
more, so a cell is not dropped for that.

A claim is alive while its owner is: on the claim's own host, while the owner's process
(tag tlbench.pid) exists; from any other host, while the owner writes its heartbeat (tag
tlbench.heartbeat, unix seconds, every HEARTBEAT_S) within STALE_S. A claim whose owner died
is taken over: marked KILLED with the reason, and the cell is claimed afresh. A Ray task
retried after its worker died takes over its own first attempt at once (same task id).
STALE_S must exceed the clock skew between hosts (NTP keeps it far below a second).
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from dataclasses import dataclass

from bench import tracking
from bench.tracking import FINISHED, KILLED, RUNNING, TAG

HEARTBEAT_S = 30.0
STALE_S = float(os.environ.get("TLBENCH_CLAIM_STALE_S", "180"))
TRIES = 4  # claims lost to a claimant that withdrew too, before giving the cell up


@dataclass
class Claim:
    """A claim's result: the run this claimant now owns, or the run that holds the cell."""

    run_id: str | None
    holder: str = ""  # who holds it instead (for the console), when run_id is None


def claim(exp_id: str, parent: str, spec, label: str, device: str, kind: str = "cell",
          since_ms: int | None = None, task_id: str = "", run_name: str | None = None,
          tags: dict[str, str] | None = None) -> Claim:
    """Create `spec`'s run under `parent` if no live or finished run holds its hash.

    `since_ms`: with --rerun, only FINISHED runs started at or after it (in this invocation,
    by any runner) hold the cell; older ones are what --rerun runs again."""
    for attempt in range(TRIES):
        take_over(exp_id, spec.hash, kind, task_id)
        # the owner's host, pid and first heartbeat come with every run (tracking)
        extra = {**(tags or {}), **({"ray_task_id": task_id} if task_id else {})}
        run_id = tracking.start_cell(exp_id, parent, spec, label, device, kind=kind,
                                     tags=extra or None, run_name=run_name)
        holder = _holder(exp_id, spec.hash, kind, run_id, since_ms)
        if holder is None:
            return Claim(run_id)
        tracking.delete_run(run_id)  # withdrawn: the store never shows the cell twice
        if holder.info.status == FINISHED:
            return Claim(None, _describe(holder))
        time.sleep(random.uniform(0.2, 1.0) * (attempt + 1))
        if _holder(exp_id, spec.hash, kind, None, since_ms) is not None:
            return Claim(None, _describe(holder))
    return Claim(None, f"{TRIES} claims in a row withdrawn against other runners")


def _holder(exp_id: str, spec_hash: str, kind: str, mine: str | None, since_ms: int | None):
    """Another run that holds the cell: finished (in the window that counts), or alive."""
    for r in tracking.runs_for_hash(exp_id, spec_hash, kind):
        if r.info.run_id == mine:
            continue
        if r.info.status == FINISHED and (since_ms is None or r.info.start_time >= since_ms):
            return r
        if r.info.status == RUNNING and dead_owner(r) is None:
            return r
    return None


def _describe(run) -> str:
    tags = run.data.tags
    state = "finished" if run.info.status == FINISHED else "running"
    return (f"{state} as run {run.info.run_id} (host {tags.get(TAG + 'host', '?')}, "
            f"pid {tags.get(TAG + 'pid', '?')})")


def dead_owner(run, task_id: str = "") -> str | None:
    """Why `run`'s owner is gone (None while it may be alive)."""
    tags = run.data.tags
    host, pid = tags.get(TAG + "host"), tags.get(TAG + "pid", "")
    if task_id and tags.get(TAG + "ray_task_id") == task_id:
        return f"an earlier attempt of Ray task {task_id} (its worker died)"
    # a Ray worker outlives its tasks (its pid says nothing of the cell): its heartbeat does
    if host == socket.gethostname() and not tags.get(TAG + "ray_task_id"):
        return None if _alive(pid) else f"its runner (pid {pid} on {host}) is gone"
    beat = tags.get(TAG + "heartbeat")
    last = float(beat) if beat else run.info.start_time / 1000
    silent = time.time() - last
    if silent > STALE_S:
        return f"no heartbeat from {host} for {silent:.0f} s (limit {STALE_S:.0f} s)"
    return None


def take_over(exp_id: str, spec_hash: str | None = None, kind: str | None = None,
              task_id: str = "") -> list[str]:
    """Mark KILLED every RUNNING run whose owner is gone (of one hash, or the whole
    experiment: cells, pretrainings and grid invocations); returns their ids."""
    closed = []
    runs = (tracking.runs_for_hash(exp_id, spec_hash, kind) if spec_hash
            else tracking.running_runs(exp_id))
    for r in runs:
        if r.info.status != RUNNING:
            continue
        why = dead_owner(r, task_id)
        if why is None:
            continue
        tracking.set_tags(r.info.run_id, {"error": f"claim taken over: {why}; marked KILLED "
                                                   f"by {socket.gethostname()} pid "
                                                   f"{os.getpid()}"})
        tracking.end_run(r.info.run_id, KILLED)
        closed.append(r.info.run_id)
    return closed


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


class Heartbeat:
    """Writes tlbench.heartbeat on the runs this process owns, every HEARTBEAT_S, from a
    daemon thread; a failed write is tried again at the next beat."""

    def __init__(self, interval_s: float = HEARTBEAT_S):
        self.interval_s = interval_s
        self.runs: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tlbench-heartbeat",
                                        daemon=True)
        self._thread.start()

    def add(self, run_id: str) -> None:
        with self._lock:
            self.runs.add(run_id)

    def discard(self, run_id: str) -> None:
        with self._lock:
            self.runs.discard(run_id)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                runs = list(self.runs)
            for run_id in runs:
                try:
                    tracking.set_tags(run_id, {"heartbeat": f"{time.time():.0f}"})
                except Exception:  # noqa: BLE001, S112 - the next beat tries again
                    continue

    def close(self) -> None:
        self._stop.set()
