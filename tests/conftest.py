"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest


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
