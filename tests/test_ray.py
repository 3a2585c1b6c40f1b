"""A grid's cells as Ray Core tasks (bench/run/cluster.py) on a real local Ray instance with
declared GPU slots (this machine has none): one instance for the module, as a cluster's
head would be, and real tiny cells (ResNet-18, 40 digits at 16 px) on the CPU.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import sys
import threading
import time

import psutil
import pytest
import ray
from test_faults import _kill_server, _start_server, write_grid

from bench import tracking
from bench.config import grid as gridmod
from bench.paths import ROOT
from bench.run import claims, cluster, pool, runner
from bench.run.forkserver import Launcher
from bench.run.plan import on_device
from bench.run.preflight import HTTP_DEFAULTS, StoreDown
from bench.run.task import Slot

pytestmark = pytest.mark.slow


@pytest.mark.timeout(10)
def test_every_harness_variable_the_code_reads_reaches_a_ray_task():
    """A TLBENCH_* variable set on the driver (a cache folder, the feature cache's budget)
    must mean the same in a cell on another node."""
    import re

    read = {m for p in [*(ROOT / "bench").rglob("*.py"), *(ROOT / "strategies").rglob("*.py")]
            for m in re.findall(r'"(TLBENCH_[A-Z_]+)"', p.read_text())}
    assert read and read <= set(cluster.FORWARDED_ENV), sorted(read - set(cluster.FORWARDED_ENV))


@pytest.fixture(scope="module")
def ray_local():
    """`ray.init(num_cpus=2, num_gpus=2)`: two cells at once, each given one GPU slot."""
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT),
                                                            os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def executor(g: gridmod.Grid) -> cluster.RayExecutor:
    return cluster.RayExecutor(g, gpus_per_cell=1)


def run_killing(g: gridmod.Grid, text: str, kill, times: int) -> tuple:
    """Run the grid on Ray while a thread calls kill(run, cell_pid) on each RUNNING cell run
    whose process has started, until `times` runs have been handed to it. Returns (the
    grid's result, the ids of the runs handed to kill, in order)."""
    killed: list[str] = []

    def watch():
        deadline = time.time() + 600
        while time.time() < deadline and len(killed) < times:
            exp_id = tracking.experiment_id(g.name, create=False)
            for r in tracking.cell_runs(exp_id, "RUNNING") if exp_id else []:
                pid = r.data.tags.get("tlbench.cell_pid")
                if pid and r.info.run_id not in killed and kill(r, int(pid)):
                    killed.append(r.info.run_id)
            time.sleep(0.3)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    result = runner.run_grid(g, text, stream=sys.stdout, executor=executor(g))
    watcher.join(timeout=10)
    return result, killed


@pytest.mark.timeout(900)
def test_ray_cells_get_a_gpu_each_run_at_once_and_give_the_serial_numbers(any_store,
                                                                          ray_local):
    """On a sqlite store, and on a real `mlflow server` with proxied artifacts (a cluster's
    set-up: the workers record to the server)."""
    store, name = any_store
    path = write_grid(store, name, '["feature_extraction", "full"]', epochs=2)
    g = on_device(gridmod.load(path), "cpu")
    first = runner.run_grid(g, path.read_text(), stream=sys.stdout, executor=executor(g))
    assert [o.status for o in first.outcomes] == ["FINISHED"] * 2, first.outcomes
    c = tracking.client()
    runs = {o.spec.hash: c.get_run(o.run_id) for o in first.outcomes}
    tags = [r.data.tags for r in runs.values()]
    assert sorted(t["tlbench.cuda_visible_devices"] for t in tags) == ["0", "1"]
    assert all(t["tlbench.slot"].startswith("ray ") and t["tlbench.threads"] == "1"
               for t in tags)
    assert all(t["tlbench.ray_task_id"] for t in tags)
    infos = [r.info for r in runs.values()]
    assert max(i.start_time for i in infos) < min(i.end_time for i in infos)  # at once
    # the artifacts made on the worker reached the store
    for r in runs.values():
        assert {"cell.log", "spec.json"} <= {a.path for a in c.list_artifacts(r.info.run_id)}
    parent = c.get_run(first.parent_run_id).data.tags
    assert parent["tlbench.executor"].startswith("ray (1 node(s), 2 cell(s) at once)")

    # a second invocation runs nothing
    again = runner.run_grid(g, path.read_text(), stream=sys.stdout, executor=executor(g))
    assert again.parent_run_id is None and {o.status for o in again.outcomes} == {"SKIPPED"}

    # the same cells run one at a time here, with one thread as each Ray cell had: the same
    # numbers, bit for bit
    serial = dataclasses.replace(g, name=f"{name}-serial")
    here = runner.run_grid(serial, path.read_text(), stream=sys.stdout,
                           executor=pool.LocalPool([Slot("one", None, threads=1)],
                                                   Launcher()))
    for o in here.outcomes:
        a, b = c.get_run(o.run_id).data.metrics, runs[o.spec.hash].data.metrics
        for key in ("test_acc", "test_loss", "val_acc", "train_loss"):
            assert a[key] == b[key], key


@pytest.mark.timeout(900)
def test_a_ray_cell_killed_with_sigkill_is_recorded_while_the_others_finish(store, ray_local):
    path = write_grid(store, "raykill", '["feature_extraction", "partial[depth=1]", "full"]',
                      epochs=40)
    g = on_device(gridmod.load(path), "cpu")

    def kill_full_cell(run, pid: int) -> bool:
        if run.data.params.get("strategy") != "full":
            return False
        os.kill(pid, signal.SIGKILL)
        return True

    result, killed = run_killing(g, path.read_text(), kill_full_cell, times=1)
    status = {o.spec.strategy: o for o in result.outcomes}
    assert killed and status["full"].run_id == killed[0]
    assert status["full"].status == "FAILED" and "SIGKILL" in status["full"].error
    assert status["feature_extraction"].status == status["partial"].status == "FINISHED"
    run = tracking.client().get_run(killed[0])
    assert run.info.status == "FAILED" and "SIGKILL" in run.data.tags["tlbench.error"]


@pytest.mark.timeout(900)
def test_a_lost_worker_is_retried_once_then_the_cell_is_recorded(store, ray_local):
    """The Ray worker running a cell dies (SIGKILL, as when its node goes): Ray runs the task
    again once, and the retry takes over the first attempt's run; when the retry's worker
    dies too, the driver records the cell FAILED and the grid ends."""
    path = write_grid(store, "raylost", '["full"]', epochs=200)
    g = on_device(gridmod.load(path), "cpu")

    def kill_worker(run, pid: int) -> bool:
        # the cell's parent is the worker's fork server; its parent, the Ray worker
        worker = psutil.Process(pid).parent().parent()
        assert "ray" in " ".join(worker.cmdline()).lower()
        worker.kill()
        return True

    result, killed = run_killing(g, path.read_text(), kill_worker, times=2)
    assert len(killed) == 2, killed
    (o,) = result.outcomes
    assert o.status == "FAILED" and "Ray" in o.error and o.run_id == killed[1]
    c = tracking.client()
    first, second = c.get_run(killed[0]), c.get_run(killed[1])
    assert first.info.status == "KILLED"
    assert "an earlier attempt of Ray task" in first.data.tags["tlbench.error"]
    assert second.info.status == "FAILED"
    assert first.data.tags["tlbench.ray_task_id"] == second.data.tags["tlbench.ray_task_id"]
    assert tracking.get_run(result.parent_run_id).info.status == "FAILED"


@pytest.mark.timeout(600)
def test_a_cpu_cell_holds_the_cores_ray_gave_it_for_its_whole_run(store, ray_local):
    """cpus_per_cell=2 on a 2-CPU instance: one cell at a time, each with two threads. (A
    task blocked in ray.get lends its CPUs to the next task: the cell's console events must
    not block, or two cells would share the cores.)"""
    path = write_grid(store, "raycpu", '["feature_extraction", "full"]', epochs=3)
    g = on_device(gridmod.load(path), "cpu")
    result = runner.run_grid(g, path.read_text(), stream=sys.stdout,
                             executor=cluster.RayExecutor(g, gpus_per_cell=0, cpus_per_cell=2))
    assert [o.status for o in result.outcomes] == ["FINISHED"] * 2
    c = tracking.client()
    runs = [c.get_run(o.run_id) for o in result.outcomes]
    assert {r.data.tags["tlbench.threads"] for r in runs} == {"2"}
    assert {r.data.tags["tlbench.cuda_visible_devices"] for r in runs} == {"(unset)"}
    first, second = sorted((r.info for r in runs), key=lambda i: i.start_time)
    assert first.end_time <= second.start_time  # one after the other


@pytest.mark.timeout(600)
def test_a_server_that_dies_mid_grid_stops_the_ray_grid_and_the_next_run_resumes(
        tmp_path, monkeypatch, ray_local):
    """Issue 27 on Ray: the tracking server is killed once the first cell finished; the
    driver stops handing out cells and raises StoreDown within 90 s; with the server back on
    the same store, the next invocation takes over the cells the dead server left RUNNING
    (their workers live on: their silent heartbeat says so) and every cell ends FINISHED
    exactly once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("TLBENCH_CACHE", str(tmp_path / "cache"))
    for key, value in HTTP_DEFAULTS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(claims, "STALE_S", 5.0)
    (tmp_path / "server").mkdir()
    path = write_grid(tmp_path, "raydies", '["feature_extraction", "full", "partial[depth=1]"]',
                      epochs=6)
    g = on_device(gridmod.load(path), "cpu")
    server = _start_server(tmp_path / "server", port)
    killed_at: list[float] = []

    def kill_after_first_finished():
        deadline = time.time() + 300
        while time.time() < deadline:
            exp_id = tracking.experiment_id("raydies", create=False)
            if exp_id and tracking.cell_runs(exp_id, "FINISHED"):
                _kill_server(server)
                killed_at.append(time.monotonic())
                return
            time.sleep(0.3)

    try:
        watcher = threading.Thread(target=kill_after_first_finished, daemon=True)
        watcher.start()
        with pytest.raises(StoreDown) as stopped:
            runner.run_grid(g, path.read_text(), stream=sys.stdout, executor=executor(g))
        assert killed_at and time.monotonic() - killed_at[0] < 90
        assert uri in str(stopped.value)

        server = _start_server(tmp_path / "server", port)
        time.sleep(claims.STALE_S + 1)  # the cells the dead server left RUNNING fall silent
        again = runner.run_grid(g, path.read_text(), stream=sys.stdout, executor=executor(g))
        assert {o.status for o in again.outcomes} <= {"FINISHED", "SKIPPED"}, again.outcomes
        finished = tracking.cell_runs(tracking.experiment_id("raydies", create=False),
                                      "FINISHED")
        hashes = [r.data.tags["tlbench.spec_hash"] for r in finished]
        assert len(hashes) == 3 and len(set(hashes)) == 3, hashes
    finally:
        _kill_server(server)
