"""Faults the runner must survive, on real processes and a real sqlite MLflow store: output
it cannot record, a cell past its time limit, two runners creating one store, a deleted
experiment, a terminal on stderr with stdout in a file; plus what every cell carries (system
metrics, the deterministic choice in its job).

Most cells here are small scripts that speak the cell protocol (fault_helpers.ScriptLauncher),
so the runner's side is tested in seconds; the `slow` ones train real tiny cells (ResNet-18,
40 digits at 16 px, one epoch).
"""

from __future__ import annotations

import io
import json
import os
import pty
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
import urllib.request
from fcntl import ioctl
from pathlib import Path

import pytest
from fault_helpers import GOOD_CELL, ScriptLauncher, alive, install_nvidia_smi, processes_in

from bench import tracking
from bench.config import grid as gridmod
from bench.paths import ROOT
from bench.run import runner
from bench.run.plan import on_device

GRID = """
name = "{name}"
[axes]
framework = ["torch"]
backbone = ["resnet18"]
weights = ["none"]
strategy = {strategies}
dataset = ["digits"]
seed = [0]
[defaults]
subset = 40
image_size = 16
batch_size = 16
epochs = {epochs}
[run]
device = "cpu"
{run}
"""


def write_grid(dir: Path, name: str, strategies: str, epochs: int = 1, run: str = "") -> Path:
    path = dir / f"{name}.toml"
    path.write_text(GRID.format(name=name, strategies=strategies, epochs=epochs, run=run))
    return path


def run(path: Path, launcher=None, stream=sys.stdout) -> runner.GridResult:
    return runner.run_grid(gridmod.load(path), path.read_text(), stream=stream,
                           launcher=launcher)


def artifact(run_id: str, name: str, dest: Path) -> str:
    return Path(tracking.client().download_artifacts(run_id, name, str(dest))).read_text()


# ---- output the runner cannot record ---------------------------------------------------------
BAD_OUTPUT = """
import json, sys, time
from bench.cell.process import MARK, emit
job = json.load(open(sys.argv[1]))
emit("startup", seconds=0.0, pid=0)
strategy = job["spec"]["strategy"]
if strategy == "feature_extraction":  # a malformed event line; the cell would go on
    print(MARK + "{not json", flush=True)
    time.sleep(60)
elif strategy == "full":  # an event MLflow refuses: a metric name that escapes its folder
    emit("metrics", step=None, metrics={"../escape": 1.0})
    time.sleep(60)
emit("metrics", step=None, metrics={"test_acc": 0.5})
"""


def test_output_the_runner_cannot_record_fails_that_cell_and_the_grid_goes_on(store):
    path = write_grid(store, "bad", '["feature_extraction", "full", "partial[depth=1]"]')
    launcher = ScriptLauncher(BAD_OUTPUT)
    started = time.monotonic()
    result = run(path, launcher)
    assert time.monotonic() - started < 50  # the broken cells were ended, not waited for
    assert [o.status for o in result.outcomes] == ["FAILED", "FAILED", "FINISHED"]
    malformed, refused, good = result.outcomes
    assert "malformed event line from the cell process" in malformed.error
    assert "{not json" in malformed.error
    assert "MlflowException" in refused.error and "../escape" in refused.error
    assert good.metrics == {"test_acc": 0.5}
    assert all(p.poll() is not None for p in launcher.started)

    c = tracking.client()
    for o in (malformed, refused):
        r = c.get_run(o.run_id)
        assert r.info.status == "FAILED"
        assert r.data.tags["tlbench.error"] == o.error
        assert "Traceback" in artifact(o.run_id, "error.txt", store / o.run_id)
        assert "[tlbench runner]" in artifact(o.run_id, "cell.log", store / o.run_id)
    assert c.get_run(good.run_id).data.metrics["test_acc"] == 0.5
    assert c.get_run(result.parent_run_id).data.tags["tlbench.failed"] == "2"


# ---- the per-cell time limit -----------------------------------------------------------------
HANGS = """
import json, subprocess, sys, time
from bench.cell.process import emit
job = json.load(open(sys.argv[1]))
emit("startup", seconds=0.0, pid=0)
if job["spec"]["strategy"] == "full":  # hangs, with a process of its own started
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    emit("tags", tags={"helper_pid": helper.pid})
    time.sleep(60)
emit("metrics", step=None, metrics={"test_acc": 0.5})
"""


def test_a_cell_past_its_time_limit_is_killed_with_its_processes(store):
    path = write_grid(store, "hang", '["full", "feature_extraction"]',
                      run="timeout_minutes = 0.05")
    started = time.monotonic()
    result = run(path, ScriptLauncher(HANGS))
    assert time.monotonic() - started < 50
    assert [o.status for o in result.outcomes] == ["FAILED", "FINISHED"]
    hung = result.outcomes[0]
    assert hung.error.startswith("CellTimeout: timed out after 0.05 minutes")
    assert 3 <= hung.seconds < 40
    r = tracking.client().get_run(hung.run_id)
    assert r.info.status == "FAILED" and "timed out after 0.05 minutes" in \
        r.data.tags["tlbench.error"]
    helper = int(r.data.tags["tlbench.helper_pid"])
    deadline = time.monotonic() + 20
    while alive(helper) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(helper), "the hung cell's own process outlived it"


@pytest.mark.slow
def test_a_real_cell_past_its_time_limit_is_killed(store):
    # forked from the torch fork server: the limit ends the forked cell's process group
    path = write_grid(store, "hang-real", '["full", "partial[depth=2]"]', epochs=200,
                      run="timeout_minutes = 0.05")
    result = run(path)
    assert [o.status for o in result.outcomes] == ["FAILED", "FAILED"]  # the grid went on
    for o in result.outcomes:
        assert o.error.startswith("CellTimeout: timed out after 0.05 minutes"), o.error
        assert 3 <= o.seconds < 60
        r = tracking.client().get_run(o.run_id)
        assert r.info.status == "FAILED" and r.data.tags["tlbench.launch"] == "fork"
    deadline = time.monotonic() + 30
    while processes_in(store) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not processes_in(store)


# ---- what every cell carries -----------------------------------------------------------------
def test_every_cell_run_gets_system_metrics(store):
    path = write_grid(store, "sysm", '["feature_extraction", "full"]')
    slow_then_good = "import time; time.sleep(2.5)\n" + GOOD_CELL
    result = run(path, ScriptLauncher(slow_then_good))
    c = tracking.client()
    for o in result.outcomes:
        history = c.get_metric_history(o.run_id, "system/cpu_utilization_percentage")
        assert len(history) >= 2, o  # a sample a second
        assert all(0 <= m.value <= 100 for m in history)
        assert "system/system_memory_usage_megabytes" in c.get_run(o.run_id).data.metrics


JOB_ECHO = """
import json, sys
from bench.cell.process import emit
job = json.load(open(sys.argv[1]))
emit("tags", tags={"job_deterministic": json.dumps(job["deterministic"]),
                   "job_device": job["device"]})
emit("metrics", step=None, metrics={"test_acc": 0.5})
"""


@pytest.mark.parametrize("setting, device, expected, cell_device", [
    ("", "cpu", "true", "cpu"),  # auto on the CPU: deterministic
    ("deterministic = false", "cpu", "false", "cpu"),
    ("deterministic = \"auto\"", "cuda:0", "false", "cuda:0"),  # on a GPU: the fast kernels
    ("deterministic = true", "cuda", "true", "cuda"),
    ("", "auto", "false", "cuda"),  # auto that found a GPU is told to use it
])
def test_the_job_says_whether_to_be_deterministic(store, monkeypatch, setting, device,
                                                   expected, cell_device):
    install_nvidia_smi(store / "bin", ["NVIDIA H200"])
    monkeypatch.setenv("PATH", f"{store / 'bin'}{os.pathsep}{os.environ['PATH']}")
    path = write_grid(store, "det", '["feature_extraction"]', run=setting)
    g = on_device(gridmod.load(path), device)
    result = runner.run_grid(g, path.read_text(), stream=sys.stdout,
                             launcher=ScriptLauncher(JOB_ECHO))
    (o,) = result.outcomes
    tags = tracking.client().get_run(o.run_id).data.tags
    assert tags["tlbench.job_deterministic"] == expected
    assert tags["tlbench.job_device"] == cell_device


# ---- the store and the experiment ------------------------------------------------------------
CREATE = """
import sys, time
from pathlib import Path
import mlflow.tracking  # imported first: creating the store is what must not race
from bench import tracking
ready, go = Path(sys.argv[1]), Path(sys.argv[2])
ready.touch()
while not go.exists():
    time.sleep(0.001)
print(tracking.experiment_id("race"))
"""


def test_two_runners_create_one_fresh_store_at_once(tmp_path):
    for attempt in range(3):
        folder = tmp_path / f"try{attempt}"
        folder.mkdir()
        env = {**os.environ, "PYTHONPATH": str(ROOT),
               "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
        go = folder / "go"
        procs = [subprocess.Popen([sys.executable, "-c", CREATE, str(folder / f"ready{i}"),
                                   str(go)], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for i in range(2)]
        try:
            deadline = time.monotonic() + 120
            while not all((folder / f"ready{i}").exists() for i in range(2)):
                assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
                time.sleep(0.01)
            go.touch()  # both start creating the store at the same instant
            outs = [p.communicate(timeout=120) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        for p, (_, err) in zip(procs, outs, strict=True):
            assert p.returncode == 0, f"try {attempt}: {err[-3000:]}"
        assert len({out.strip() for out, _ in outs}) == 1  # one experiment, found by both


def test_a_deleted_experiment_is_restored_and_said_so(store):
    path = write_grid(store, "gone", '["feature_extraction", "full"]')
    first = run(path, ScriptLauncher())
    assert [o.status for o in first.outcomes] == ["FINISHED", "FINISHED"]
    c = tracking.client()
    c.set_terminated(first.outcomes[1].run_id, "FAILED")  # one cell left to do
    c.delete_experiment(first.experiment_id)
    out = io.StringIO()
    second = run(path, ScriptLauncher(), stream=out)
    text = out.getvalue()
    assert second.experiment_id == first.experiment_id
    assert c.get_experiment(first.experiment_id).lifecycle_stage == "active"
    assert [o.status for o in second.outcomes] == ["SKIPPED", "FINISHED"]
    assert f"experiment 'gone' (id {first.experiment_id}) had been deleted; restored it" in text
    assert "It holds 1 finished cell(s) of this grid: they will be skipped" in text
    assert "--rerun" in text and "mlflow gc" in text and f"--experiment-ids " \
        f"{first.experiment_id}" in text


# ---- a terminal on stderr, stdout in a file --------------------------------------------------
@pytest.mark.slow
def test_progress_on_a_terminal_with_the_table_redirected_to_a_file(store):
    """`python -m bench run grid.toml > table.md` in a terminal: the live progress line is
    sized to stderr's terminal (stdout is a file), and a real cell runs to the end."""
    path = write_grid(store, "tty", '["feature_extraction"]')
    master, terminal = pty.openpty()
    ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    seen = bytearray()

    def read_terminal():
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: every process closed the terminal
                return
            if not chunk:
                return
            seen.extend(chunk)

    reader = threading.Thread(target=read_terminal, daemon=True)
    reader.start()
    try:
        with (store / "table.md").open("w") as table:
            proc = subprocess.Popen([sys.executable, "-m", "bench", "run", str(path)],
                                    cwd=store, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                    stdin=subprocess.DEVNULL, stdout=table, stderr=terminal)
        os.close(terminal)
        try:
            rc = proc.wait(timeout=600)
        finally:
            if proc.poll() is None:
                proc.kill()
        reader.join(timeout=30)
    finally:
        os.close(master)
    shown = seen.decode(errors="replace")
    assert rc == 0, shown[-3000:]
    assert "Inappropriate ioctl" not in shown
    assert "\r\x1b[K" in shown and "FINISHED" in shown  # the live line, then the result
    assert all(len(line) <= 100 for line in shown.replace("\r\x1b[K", "\n").splitlines()
               if "ETA" in line)
    table = (store / "table.md").read_text()
    assert "### Test accuracy" in table and "feature_extraction" in table
    # and the real cell's run has MLflow's system metrics, taken while it ran
    (cell,) = tracking.cell_runs(tracking.experiment_id("tty", create=False), "FINISHED")
    assert "system/cpu_utilization_percentage" in cell.data.metrics
    assert json.loads(cell.data.tags["tlbench.versions"])  # a real cell reported its versions


# ---- a tracking server that dies mid-grid ------------------------------------------------
def _start_server(root: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on `port` with a sqlite store and artifacts under `root`; returns
    once it answers /health."""
    uri = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    with (root / "server.log").open("a") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
             str(port), "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "artifacts"), "--workers", "1"],
            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                return proc
        except OSError:
            assert proc.poll() is None, (root / "server.log").read_text()[-2000:]
            time.sleep(0.25)
    raise AssertionError(f"mlflow server on {uri} did not start")


def _kill_server(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(30)


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_a_server_that_dies_mid_grid_stops_the_grid_and_the_next_run_resumes(tmp_path,
                                                                            monkeypatch):
    """Issue 27: the server is killed once the first cell finished; the runner ends within
    90 s, non-zero, with one line naming the URI; with the server back on the same store,
    the next invocation runs the rest and every cell ends exactly once FINISHED."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    (tmp_path / "server").mkdir()
    path = write_grid(tmp_path, "dies", '["feature_extraction", "full", "partial[depth=1]"]',
                      epochs=3)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST")}
    env.update(PYTHONPATH=str(ROOT), MLFLOW_TRACKING_URI=uri,
               TLBENCH_CACHE=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "bench", "run", str(path)]
    server = _start_server(tmp_path / "server", port)
    try:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        err: list[str] = []
        killed_at = None
        for line in proc.stderr:  # the runner's progress: kill the server at the first result
            err.append(line)
            if killed_at is None and "FINISHED" in line:
                _kill_server(server)
                killed_at = time.monotonic()
        rc = proc.wait(60)
        ended_at = time.monotonic()
        shown = "".join(err)
        assert killed_at is not None, shown[-3000:]
        assert rc not in (0, None) and ended_at - killed_at < 90, (rc, shown[-3000:])
        said = [line for line in err if "stopped answering mid-grid" in line]
        assert len(said) == 1 and uri in said[0] and "resume" in said[0], shown[-3000:]
        assert "Traceback" not in shown, shown[-3000:]

        server = _start_server(tmp_path / "server", port)
        again = subprocess.run(cmd, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                               capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        finished = tracking.cell_runs(tracking.experiment_id("dies", create=False), "FINISHED")
        hashes = [r.data.tags["tlbench.spec_hash"] for r in finished]
        assert len(hashes) == 3 and len(set(hashes)) == 3, hashes
    finally:
        _kill_server(server)
