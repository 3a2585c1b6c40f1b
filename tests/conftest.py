"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

SERVER_START_LIMIT_S = 60  # a loaded 2-core machine starts it in ~5-10 s
SERVER_STOP_GRACE_S = 10


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A test's own MLflow store (sqlite in tmp) and harness cache, run from tmp."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("TLBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A harness cache (split manifests, converted weights) for one test module and the
    subprocesses it starts."""
    path = tmp_path_factory.mktemp("tlbench-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TLBENCH_CACHE", str(path))
        yield path


# ---- a real MLflow tracking server -------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (mlflow server starts uvicorn and a job runner
    under it), SIGKILL after a grace period."""
    for sig, wait_s in ((signal.SIGTERM, SERVER_STOP_GRACE_S), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One `mlflow server` for the session, as a team runs it: a database backend store
    (sqlite here, PostgreSQL for a team), artifacts proxied by the server into
    --artifacts-destination, so clients see `mlflow-artifacts:/` URIs and never the folder.
    Yields its http URI."""
    root = tmp_path_factory.mktemp("mlflow-server")
    uri = f"http://127.0.0.1:{_free_port()}"
    port = uri.rsplit(":", 1)[1]
    log_path = root / "server.log"
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", port,
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "artifacts"), "--workers", "1"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_LIMIT_S
        while not _healthy(uri):
            if proc.poll() is not None or time.monotonic() > deadline:
                why = (f"exited with status {proc.returncode}" if proc.poll() is not None
                       else f"did not answer GET {uri}/health in {SERVER_START_LIMIT_S} s")
                pytest.fail(f"the MLflow tracking server {why}: {' '.join(cmd)}\n"
                            f"its log ({log_path}) ends:\n{log_path.read_text()[-3000:]}",
                            pytrace=False)
            time.sleep(0.25)
        yield uri
    finally:
        _stop_group(proc)


@dataclass(frozen=True)
class ServerStore:
    path: Path  # the test's tmp folder, its working directory
    uri: str  # the tracking server's URI
    name: str  # an experiment / grid name no other test uses


@pytest.fixture
def server_store(mlflow_server, tmp_path, monkeypatch, request):
    """The session's tracking server as this test's store, with its own harness cache and a
    grid name of its own (the server is shared: tests must not see each other's runs)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("TLBENCH_CACHE", str(tmp_path / "cache"))
    name = f"{request.node.name}-{uuid.uuid4().hex[:8]}".replace("[", "-").replace("]", "")
    return ServerStore(tmp_path, mlflow_server, name)


@pytest.fixture(params=["sqlite", "server"])
def any_store(request):
    """(the test's folder, a grid name of its own) on a local sqlite store (`store`) or on
    the session's tracking server (`server_store`): a test run against both."""
    if request.param == "sqlite":
        return request.getfixturevalue("store"), "on-sqlite"
    s = request.getfixturevalue("server_store")
    return s.path, s.name
