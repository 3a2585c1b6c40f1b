"""A grid's cells as Ray Core tasks on a Ray cluster (`--ray auto|ADDRESS`, or RAY_ADDRESS).

One task per cell, asking for the cell's resources (one GPU on a GPU grid; `cpus_per_cell`
cores), so Ray places it on a node with a free GPU and sets the task's
CUDA_VISIBLE_DEVICES. Inside the task the cell goes through bench/run/execute.py exactly as on
one machine: claimed in the tracking store, run as a fresh process of its own (forked from
a fork server that lives as long as the Ray worker), recorded from the worker, so its
artifacts reach the store from the node that made them. Ray Core, not Ray Tune: the harness
keeps its own resume (spec hashes, claims) and its parent and child runs.

Faults: a task whose worker or node dies is retried once by Ray (max_retries=1); the retry
takes over the first attempt's run (same Ray task id, bench/run/claims.py). A task that fails
twice is recorded FAILED by the runner. Ctrl-C cancels every task (their processes end) and
marks their runs KILLED.

Ray is an optional extra (pip install 'tlbench[ray]'); only this module imports it, and only
the runner's --ray path imports this module.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

from bench import devices, tracking
from bench.config.grid import Grid
from bench.run import claims
from bench.run.execute import execute, run_names
from bench.run.preflight import HTTP_DEFAULTS, server_down
from bench.run.task import CellTask, Outcome, RunnerContext, Slot, Stop

# the runner's environment that tasks get: where the store and the harness's files are
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "TLBENCH_CACHE", "TLBENCH_DATASETS",
                 "TLBENCH_FORKSERVER", "TLBENCH_CLAIM_STALE_S", "TLBENCH_FEATURE_CACHE_MB",
                 # bounded by the driver (bench/run/preflight.py): a worker's cell gives up
                 # on a dead server in seconds, as a local one does
                 *HTTP_DEFAULTS)
LOCAL_STORES = ("sqlite:", "file:", "/", ".")  # reachable from one machine only


class ClusterError(ValueError):
    """The cluster cannot run this grid (nothing has run)."""


def _ray():
    try:
        import ray
    except ImportError:
        raise ClusterError("--ray needs Ray: pip install 'tlbench[ray]' (on every node)") \
            from None
    return ray


class RayExecutor:
    """Runs CellTasks as Ray tasks; the same interface as bench.run.pool.LocalPool."""

    def __init__(self, grid: Grid, gpus_per_cell: float | None = None,
                 cpus_per_cell: float = 1):
        """`grid` stamped with its device kind; `gpus_per_cell` default: 1 on a GPU kind."""
        self.ray = _ray()
        self.grid = grid
        gpu = (grid.device_kind or "").startswith("cuda:")
        self.gpus_per_cell = (1 if gpu else 0) if gpus_per_cell is None else gpus_per_cell
        self.cpus_per_cell = cpus_per_cell
        self.store_down: str | None = None  # why the tracking server stopped answering
        res = self.ray.cluster_resources()
        self.nodes = len([n for n in self.ray.nodes() if n.get("Alive")])
        self.width = int(min(res.get("GPU", 0) // self.gpus_per_cell if self.gpus_per_cell
                             else float("inf"), res.get("CPU", 1) // max(cpus_per_cell, 1e-9))
                         or 1)
        uri = tracking.tracking_uri()
        if self.nodes > 1 and uri.startswith(LOCAL_STORES):
            raise ClusterError(f"the Ray cluster has {self.nodes} nodes but the tracking store "
                               f"{uri} is on this machine only: start a shared `mlflow "
                               f"server` and set MLFLOW_TRACKING_URI=http://<host>:5000 on "
                               f"every node (docs: howto/ray.md)")

    @classmethod
    def connect(cls, address: str, grid: Grid, **kw) -> RayExecutor:
        """Connect to the cluster at `address` (`auto`: the one this machine belongs to)
        and stamp the grid with the device kind its workers have."""
        ray = _ray()
        if not ray.is_initialized():
            try:
                ray.init(address=address, include_dashboard=False, log_to_driver=True)
            except (ConnectionError, RuntimeError) as e:
                raise ClusterError(f"--ray {address}: no Ray cluster to connect to ({e}); "
                                   f"start one with `ray start --head` or give its "
                                   f"address") from None
        return cls(cluster_kind(grid), **kw)

    def describe(self) -> dict[str, str]:
        return {"executor": f"ray ({self.nodes} node(s), {self.width} cell(s) at once)",
                "parallel": str(self.width),
                "ray_resources_per_cell": f"GPU {self.gpus_per_cell}, CPU "
                                          f"{self.cpus_per_cell}"}

    def close(self) -> None:
        """The cluster stays up (it is not this runner's); the connection ends with it."""

    def run(self, tasks: list[CellTask], events_to: Callable[[dict], None], heartbeat,
            on_outcome: Callable[[Outcome], None]) -> None:
        """Every task as a Ray task (each keeps its own heartbeat on its worker); their
        console events come back through a Ray queue."""
        ray = self.ray
        from ray.util.queue import Queue

        events = Queue()
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        env["MLFLOW_TRACKING_URI"] = tracking.tracking_uri()  # resolved: the same store
        remote = ray.remote(_task).options(num_gpus=self.gpus_per_cell,
                                           num_cpus=self.cpus_per_cell, max_retries=1,
                                           retry_exceptions=False)
        # a CPU cell computes on the cores Ray gave it: its threads = those cores
        on_cpu = not (self.grid.device_kind or "").startswith("cuda:")
        threads = max(int(self.cpus_per_cell), 1) if on_cpu else None
        pending = {remote.remote(t, env, events, threads): t for t in tasks}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1, timeout=0.2)
                _drain(events, events_to)
                for ref in done:
                    task = pending.pop(ref)
                    outcome = self._outcome(ref, task, events_to)
                    on_outcome(outcome)
                    why = server_down(tracking.tracking_uri()) \
                        if outcome.status == tracking.FAILED else None
                    if why:  # a dead tracking server, not this cell: stop asking for more
                        self.store_down = why
                        for other in pending:
                            ray.cancel(other, force=True)
                        pending.clear()
            _drain(events, events_to)
        except KeyboardInterrupt:
            for ref in pending:
                ray.cancel(ref, force=True)
            _kill_running(tasks[0].exp_id, tasks[0].parent) if tasks else None
            raise
        finally:
            events.shutdown()

    def _outcome(self, ref, task: CellTask, events_to: Callable[[dict], None]) -> Outcome:
        """The task's outcome; a task Ray could not finish (its worker died twice, it was
        cancelled) is recorded FAILED on its run (made here if the task made none); one the
        tracking store cannot hear of any more (the server died) is FAILED here only."""
        try:
            return self.ray.get(ref)
        except Exception as e:  # noqa: BLE001 - ray.exceptions.*: recorded on the cell's run
            error = f"{type(e).__name__} (Ray): {str(e).strip().splitlines()[-1][:500]}"
        try:
            run_id = self._record_failed(ref, task, error)
        except Exception as e:  # noqa: BLE001 - the store is down: the next run takes it over
            run_id, error = None, f"{error}; not recorded: {type(e).__name__}: {e}"[:800]
        events_to({"event": "done", "index": task.index, "head": task.head,
                   "status": tracking.FAILED, "text": f"FAILED  {error[:200]}"})
        return Outcome(task.spec, tracking.FAILED, run_id, error)

    def _record_failed(self, ref, task: CellTask, error: str) -> str | None:
        task_id = ref.task_id().hex()
        runs = [r for r in tracking.runs_for_hash(task.exp_id, task.spec.hash)
                if r.data.tags.get(tracking.TAG + "ray_task_id") == task_id
                and r.info.status == tracking.RUNNING]
        if runs:
            run_id = runs[0].info.run_id
        else:
            got = claims.claim(task.exp_id, task.parent, task.spec,
                               task.grid.label(task.spec), task.grid.device,
                               **run_names(task.grid, task.spec))
            run_id = got.run_id
        if run_id:
            tracking.set_tags(run_id, {"error": error})
            tracking.end_run(run_id, tracking.FAILED)
        return run_id


def _drain(queue, events: Callable[[dict], None]) -> None:
    while not queue.empty():
        try:
            events(queue.get_nowait())
        except Exception:  # noqa: BLE001 - raced with another reader: nothing left
            return


def _kill_running(exp_id: str, parent: str) -> None:
    """Ctrl-C: the runs of this invocation still RUNNING are KILLED (their tasks are
    cancelled; a task's cell process ends with its worker)."""
    for r in tracking.child_runs(exp_id, parent):
        if r.info.status == tracking.RUNNING:
            tracking.set_tags(r.info.run_id, {"error": "interrupted (Ctrl-C / SIGTERM)"})
            tracking.end_run(r.info.run_id, tracking.KILLED)


def cluster_kind(grid: Grid) -> Grid:
    """The grid stamped with the kind of device its cells get on the cluster: the CPU, or
    the model of a GPU as a worker's nvidia-smi names it (asked on a worker holding one)."""
    ray = _ray()
    device = grid.device
    if device == "mps":
        raise ClusterError("device 'mps' is one Mac's GPU; a Ray cluster runs cpu or cuda")
    gpus = ray.cluster_resources().get("GPU", 0)
    if device == "cpu" or (device == "auto" and not gpus):
        return grid.with_device_kind("cpu", "cpu")
    if not gpus:
        raise ClusterError(f"device {device!r}: the Ray cluster has no GPU")
    probe = ray.remote(_gpu_kind).options(num_gpus=1, num_cpus=0)
    return grid.with_device_kind(ray.get(probe.remote(), timeout=300), "cuda")


def _gpu_kind() -> str:
    return devices.resolve_kind("cuda")


# ---- on the worker ------------------------------------------------------------------------
_WORKER: dict = {}  # this worker process's launcher and heartbeat, kept between its tasks


def _task(task: CellTask, env: dict, events, threads: int | None) -> Outcome:
    """One cell inside a Ray task: the runner's store and cache, the GPU Ray gave the task."""
    import ray

    from bench.run.forkserver import Launcher

    os.environ.update(env)
    if not _WORKER:
        _WORKER.update(launcher=Launcher(), heartbeat=claims.Heartbeat())
    task.task_id = ray.get_runtime_context().get_task_id() or ""
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES") if ray.get_gpu_ids() else None
    slot = Slot(f"ray {socket.gethostname()}" + (f" gpu {gpu}" if gpu else ""), gpu,
                threads=threads)

    def send(ev: dict) -> None:
        # fire and forget: a task blocked in ray.get (as Queue.put_nowait is) lends its CPUs
        # to another task, which would run a second cell on this cell's cores
        try:
            events.actor.put_nowait.remote({**ev, "sent": time.time()})
        except Exception:  # noqa: BLE001, S110 - the console misses a line, the store has it
            pass

    ctx = RunnerContext(send, _WORKER["launcher"], _WORKER["heartbeat"], Stop())
    return execute(task, slot, ctx)
