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
