"""Several cells at once on one machine (bench/run/pool.py) and the claims that keep every cell
run once (bench/run/claims.py), on real processes and a real sqlite MLflow store.

GPUs are an `nvidia-smi` of our own on PATH (fault_helpers): the harness's side (slots,
CUDA_VISIBLE_DEVICES per cell, refusals) is what is tested; cells that train are ResNet-18
on 40 digits at 16 px on the CPU.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from fault_helpers import ScriptLauncher, alive, install_nvidia_smi
from test_faults import write_grid

from bench import tracking
from bench.config import grid as gridmod
from bench.paths import ROOT
from bench.run import claims, plan, pool, runner
from bench.run.forkserver import Launcher
from bench.run.plan import on_device
from bench.run.progress import Progress
from bench.run.task import Slot

# a cell that says where it runs (its slot, as bench/cell/process.py's take_slot applies it), stays
# a moment so that cells overlap, and kills itself with SIGKILL when its strategy is `full`
WHERE_CELL = """
import json, os, signal, sys, time
from bench.cell.process import emit, take_slot
job = json.load(open(sys.argv[1]))
emit("startup", seconds=0.0, pid=os.getpid())
emit("tags", tags={**take_slot(job), "job_device": job["device"]})
time.sleep(1.5)
if job["spec"]["strategy"] == "full":
    os.kill(os.getpid(), signal.SIGKILL)
emit("metrics", step=None, metrics={"test_acc": 0.5})
"""


def fake_gpus(store, monkeypatch, models, visible=None):
    install_nvidia_smi(store / "bin", models)
    monkeypatch.setenv("PATH", f"{store / 'bin'}{os.pathsep}{os.environ['PATH']}")
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)


def cell_tags(result) -> dict[str, dict]:
    c = tracking.client()
    return {o.spec.strategy: c.get_run(o.run_id).data.tags for o in result.outcomes}


def overlap(run_ids: list[str]) -> bool:
    runs = [tracking.client().get_run(r).info for r in run_ids]
    return max(r.start_time for r in runs) < min(r.end_time for r in runs)


@pytest.mark.timeout(120)
def test_one_cell_per_gpu_each_sees_only_its_own(store, monkeypatch):
    fake_gpus(store, monkeypatch, ["NVIDIA H200"] * 8, "4,6,7")
    path = write_grid(store, "gpus", '["feature_extraction", "partial[depth=1]", "full"]')
    g = dataclasses.replace(gridmod.load(path), device="cuda")
    g = plan.choose_gpus(on_device(g), [0, 2])  # --gpus 0,2: the visible GPUs 4 and 7
    slots = plan.slots_for(g, "auto", [0, 2])
    assert [(s.name, s.gpu) for s in slots] == [("gpu 4", "4"), ("gpu 7", "7")]
    result = runner.run_grid(g, path.read_text(), stream=sys.stdout,
                             executor=pool.LocalPool(slots, ScriptLauncher(WHERE_CELL)))
    status = {o.spec.strategy: o.status for o in result.outcomes}
    assert status == {"feature_extraction": "FINISHED", "partial": "FINISHED",
                      "full": "FAILED"}
    tags = cell_tags(result)
    seen = [tags[s]["tlbench.cuda_visible_devices"] for s in ("feature_extraction", "partial")]
    assert sorted(seen) == ["4", "7"]  # one GPU each, the ones --gpus picked
    assert {t["tlbench.job_device"] for t in tags.values()} == {"cuda"}  # cuda:0 to itself
    assert all(t["tlbench.slot"].startswith("gpu ") for t in tags.values())
    first_two = [o.run_id for o in result.outcomes if o.spec.strategy != "full"]
    assert overlap(first_two)  # the first two cells ran at once
    # the cell killed by SIGKILL is recorded with its signal; the grid went on
    full = next(o for o in result.outcomes if o.spec.strategy == "full")
    assert "SIGKILL" in full.error
    parent = tracking.get_run(result.parent_run_id).data.tags
    assert parent["tlbench.parallel"] == "2" and parent["tlbench.slots"] == "gpu 4; gpu 7"


def test_slots_that_cannot_be_had_are_refused_before_anything_runs(store, monkeypatch):
    fake_gpus(store, monkeypatch, ["NVIDIA H200", "NVIDIA A100-SXM4-80GB"])
    path = write_grid(store, "refuse", '["feature_extraction"]')
    cpu_grid = on_device(gridmod.load(path), "cpu")
    gpu_grid = dataclasses.replace(gridmod.load(path), device="cuda")
    cases = [
        (lambda: plan.slots_for(on_device(gpu_grid), 3), "allowed: 1..2"),
        (lambda: plan.choose_gpus(gpu_grid, [0, 1]), "mixes GPU models"),
        (lambda: plan.choose_gpus(gpu_grid, [5]), "allowed: 0..1"),
        (lambda: plan.choose_gpus(cpu_grid, [0]), "--gpus needs a GPU device"),
        (lambda: plan.slots_for(cpu_grid, len(plan.cpu_list()) + 1), r"CPU core\(s\)"),
        (lambda: plan.parse_parallel("two"), 'allowed: "auto"'),
        (lambda: plan.parse_gpus("0,0"), "distinct GPU indices"),
    ]
    for call, says in cases:
        with pytest.raises(plan.PlanError, match=says):
            call()
    # the command line says so and runs nothing
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    for args, says in [(["--parallel", "9", "--device", "cpu"], "allowed: 1.."),
                       (["--ray", "auto", "--gpus", "0"], "leave them out"),
                       (["--ray", "auto"], "no Ray cluster to connect to"),
                       (["--cpus-per-cell", "4"], "is for --ray")]:
        done = subprocess.run([sys.executable, "-m", "bench", "run", str(path), *args],
                              cwd=store, capture_output=True, text=True,
                              env={**env, "PYTHONPATH": str(ROOT)}, timeout=120)
        assert done.returncode == 2 and says in done.stderr, (args, done.stderr)
        assert "nothing was run" in done.stderr
    bad = path.read_text().replace("[run]\n", "[run]\nparallel = 0\n")
    path.write_text(bad)
    with pytest.raises(gridmod.GridError, match=r"run.parallel = 0: allowed: \"auto\""):
        gridmod.load(path)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cells_on_their_own_cores_at_once_give_the_serial_numbers(store):
    """--parallel 2 on this 2-core machine: each cell pinned to one core with one thread,
    the two at once; every number equal to the same cells run one at a time on one core."""
    path = write_grid(store, "serial", '["feature_extraction", "full"]', epochs=2)
    g = on_device(gridmod.load(path), "cpu")
    cpus = plan.cpu_list()
    serial = runner.run_grid(g, path.read_text(), stream=sys.stdout, executor=pool.LocalPool(
        [Slot("cpus 0", None, (cpus[0],))], Launcher()))
    par = dataclasses.replace(g, name="par", parallel=2)
    at_once = runner.run_grid(par, path.read_text(), stream=sys.stdout)
    assert [o.status for o in serial.outcomes + at_once.outcomes] == ["FINISHED"] * 4
    tags = cell_tags(at_once)
    assert sorted(t["tlbench.cpus"] for t in tags.values()) == [str(c) for c in cpus[:2]]
    assert {t["tlbench.threads"] for t in tags.values()} == {"1"}
    assert overlap([o.run_id for o in at_once.outcomes])
    c = tracking.client()
    for a, b in zip(serial.outcomes, at_once.outcomes, strict=True):
        assert a.spec.hash == b.spec.hash
        ra, rb = c.get_run(a.run_id).data.metrics, c.get_run(b.run_id).data.metrics
        for key in ("test_acc", "test_loss", "val_acc", "train_loss"):
            assert ra[key] == rb[key], key  # bit for bit
        ha = [m.value for m in c.get_metric_history(a.run_id, "train_loss")]
        hb = [m.value for m in c.get_metric_history(b.run_id, "train_loss")]
        assert ha == hb and len(ha) == 2


# ---- claims: through a local sqlite store and a real `mlflow server` (conftest any_store) ---
@pytest.mark.timeout(300)
def test_a_claim_whose_owner_died_is_taken_over_and_a_live_one_is_not(any_store):
    store, name = any_store
    path = write_grid(store, name, '["feature_extraction"]')
    g = on_device(gridmod.load(path), "cpu")
    (spec,) = g.specs
    exp_id = tracking.experiment_id(g.name)
    parent = tracking.start_parent(exp_id, g, 1, path.read_text())

    def other_claim(**tags):
        return tracking.start_cell(exp_id, parent, spec, "x", "cpu", tags=tags)

    # another host, heartbeat fresh: held
    live = other_claim(host="node-7", pid="12", heartbeat=f"{time.time():.0f}")
    got = claims.claim(exp_id, parent, spec, "mine", "cpu")
    assert got.run_id is None and "node-7" in got.holder and live in got.holder
    # its heartbeat stops: taken over after STALE_S, the old claim closed as KILLED
    tracking.set_tags(live, {"heartbeat": f"{time.time() - claims.STALE_S - 5:.0f}"})
    got = claims.claim(exp_id, parent, spec, "mine", "cpu")
    assert got.run_id is not None
    old = tracking.get_run(live)
    assert old.info.status == "KILLED" and "no heartbeat from node-7" in \
        old.data.tags["tlbench.error"]
    tracking.end_run(got.run_id, "FINISHED")
    # this host, its process gone: taken over at once; a finished cell holds it for good
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    assert not alive(int(dead))
    stale = other_claim(pid=dead)
    assert claims.claim(exp_id, parent, spec, "again", "cpu").run_id is None  # FINISHED
    assert tracking.get_run(stale).info.status == "KILLED"
    # with --rerun, a finished run from before the invocation does not hold the cell
    rerun = claims.claim(exp_id, parent, spec, "rerun", "cpu",
                         since_ms=int(time.time() * 1000) + 1000)
    assert rerun.run_id is not None
    # withdrawn claims are deleted: the store shows each attempt that ran, never a loser
    active = tracking.runs_for_hash(exp_id, spec.hash)
    assert sorted(r.info.status for r in active) == ["FINISHED", "KILLED", "KILLED", "RUNNING"]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_runners_on_one_grid_and_one_store_run_each_cell_once(any_store):
    store, name = any_store
    path = write_grid(store, name, '["feature_extraction", "partial[depth=1]", '
                                   '"partial[depth=2]", "full"]')
    tracking.client().search_experiments()  # the sqlite store's tables, made once
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "bench", "run", str(path)]
    procs = [subprocess.Popen(cmd, cwd=store, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=800)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outs)
    exp_id = tracking.experiment_id(name, create=False)
    runs = tracking.cell_runs(exp_id)
    hashes = [r.data.tags["tlbench.spec_hash"] for r in runs]
    assert sorted(set(hashes)) == sorted(s.hash for s in gridmod.load(path).specs)
    assert len(hashes) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    parents = {r.data.tags["mlflow.parentRunId"] for r in runs}
    assert len(parents) <= 2  # one parent per invocation that ran something
    ran = [json.dumps(o) for o in outs]
    assert sum(o.count("FINISHED  ") for o in outs) == 4, ran


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ctrl_c_stops_every_running_cell_and_marks_each_killed(store):
    path = write_grid(store, "stop", '["feature_extraction", "full"]', epochs=200,
                      run="parallel = 2")
    tracking.client().search_experiments()
    proc = subprocess.Popen([sys.executable, "-m", "bench", "run", str(path)], cwd=store,
                            env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, pids = time.time() + 300, []
        while time.time() < deadline and len(pids) < 2:
            exp_id = tracking.experiment_id("stop", create=False)
            runs = tracking.cell_runs(exp_id, "RUNNING") if exp_id else []
            pids = [r.data.tags["tlbench.cell_pid"] for r in runs
                    if "tlbench.cell_pid" in r.data.tags]
            time.sleep(0.5)
        assert len(pids) == 2, "two cells never ran at once"
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out[-3000:]
    runs = tracking.cell_runs(exp_id)
    assert sorted(r.info.status for r in runs) == ["KILLED", "KILLED"]
    assert all("interrupted" in r.data.tags["tlbench.error"] for r in runs)
    (parent,) = tracking.parent_runs(exp_id)
    assert parent.info.status == "KILLED"
    deadline = time.time() + 30
    while any(alive(int(p)) for p in pids) and time.time() < deadline:
        time.sleep(0.2)
    assert not any(alive(int(p)) for p in pids)


def test_the_status_line_shows_every_running_cell_and_one_grid_eta():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

        def fileno(self):
            raise OSError("not a real terminal")

    out = Terminal()
    p = Progress(total=4, slots=2, stream=out)
    p({"event": "start", "index": 0, "head": "[1/4] torch/a"})
    p({"event": "start", "index": 1, "head": "[2/4] torch/b"})
    p({"event": "epoch", "index": 0, "phase": "head", "epoch": 1, "epochs": 2,
       "fraction": 0.5})
    live = out.getvalue().rsplit("\r\x1b[K", 1)[1]
    assert live.startswith("2 running: [1/4] head epoch 1/2  |  [2/4] starting  |  grid ETA ")
    p({"event": "done", "index": 0, "status": "FINISHED", "seconds": 10.0,
       "text": "FINISHED  0m10s  test_acc 0.900"})
    lines = out.getvalue().replace("\r\x1b[K", "\n").splitlines()
    assert "[1/4] torch/a  FINISHED  0m10s  test_acc 0.900" in lines
    # one finished cell of 10 s; one running with no progress yet and two not started are
    # 10 s each; shared by two slots: 15 s
    assert lines[-1] == "1 running: [2/4] starting  |  grid ETA 0m15s"
    p({"event": "done", "index": 2, "head": "[3/4] torch/c", "status": "HELD",
       "text": "HELD by another runner: running as run x"})
    assert p.done_seconds == [10.0]  # a held cell is not a cell time
