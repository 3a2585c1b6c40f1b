"""The runner against a real `mlflow server` (tests/conftest.py: mlflow_server), as a team
runs it: a database backend store, artifacts proxied by the server. Every record a cell
leaves (params, metrics, tags, artifacts) must read back through the server's API, and a
grid run again must find its finished cells there."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from test_faults import write_grid

from bench import tracking
from bench.config import grid as gridmod
from bench.report import frame
from bench.run import runner

pytestmark = pytest.mark.slow

@pytest.mark.timeout(600)
def test_grid_records_and_resumes_through_a_tracking_server(server_store):
    assert tracking.tracking_uri() == server_store.uri
    path = write_grid(server_store.path, server_store.name, '["feature_extraction", "full"]')
    g = gridmod.load(path)
    first = runner.run_grid(g, path.read_text(), stream=sys.stderr)
    assert [o.status for o in first.outcomes] == ["FINISHED", "FINISHED"], \
        [o.error for o in first.outcomes]

    c = tracking.client()
    exp = c.get_experiment(first.experiment_id)
    assert exp.name == server_store.name
    # artifacts go through the server (proxied), never to a path the client writes itself
    assert exp.artifact_location.startswith("mlflow-artifacts:/"), exp.artifact_location
    cells = tracking.cell_runs(first.experiment_id)
    assert len(cells) == 2
    for run in cells:
        assert run.info.status == "FINISHED"
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/"), run.info.artifact_uri
        assert run.data.params["backbone"] == "resnet18"
        assert run.data.params["dataset"] == "digits"
        assert run.data.params["strategy_label"] in ("feature_extraction", "full")
        assert 0 <= run.data.metrics["test_acc"] <= 1
        tags = run.data.tags
        assert tags["tlbench.kind"] == "cell"
        assert tags["tlbench.framework"] == "torch"
        assert tags["tlbench.device"].startswith("cpu")
        assert tags["mlflow.parentRunId"] == first.parent_run_id
        assert tags["tlbench.spec_hash"] in {s.hash for s in g.specs}

        arts = {a.path: a.file_size for a in c.list_artifacts(run.info.run_id)}
        assert {"cell.log", "history.json", "spec.json"} <= set(arts), arts
        dst = server_store.path / "downloads" / run.info.run_id
        dst.mkdir(parents=True)
        for name in ("cell.log", "history.json", "spec.json"):  # whole, as listed
            got = Path(c.download_artifacts(run.info.run_id, name, str(dst)))
            # the server lists an empty file (a quiet cell's cell.log) with no size
            assert got.stat().st_size == (arts[name] or 0), (name, got.stat(), arts[name])
        spec = json.loads(Path(c.download_artifacts(run.info.run_id, "spec.json",
                                                    str(dst))).read_text())
        assert spec["backbone"] == "resnet18" and spec["strategy"] == \
            run.data.params["strategy"]
        history = json.loads(Path(c.download_artifacts(run.info.run_id, "history.json",
                                                       str(dst))).read_text())
        assert len(history) >= 1 and "train_loss" in history[-1]

    parent = c.get_run(first.parent_run_id)
    assert parent.info.status == "FINISHED"
    # the comparison table (bench/summary.py) goes through the server like any artifact
    assert {"grid.toml", "cells.json", "comparison.json"} <= {a.path for a in c.list_artifacts(
        first.parent_run_id)}
    assert parent.data.metrics["cells/torch/full"] == 1
    assert tracking.grid_text(first.parent_run_id) == path.read_text()
    assert {e["hash"] for e in tracking.expected_cells(first.parent_run_id)} == \
        {s.hash for s in g.specs}

    # the same grid again finds its finished cells on the server: nothing runs
    second = runner.run_grid(g, path.read_text(), stream=sys.stderr)
    assert [o.status for o in second.outcomes] == ["SKIPPED", "SKIPPED"]
    assert second.parent_run_id is None
    assert len(tracking.cell_runs(first.experiment_id)) == 2

    # the report reads the server like any store
    df = frame.runs_frame(first.experiment_id)
    assert len(df) == 2 and set(df["status"]) == {"FINISHED"}
    assert sorted(df["test_acc"]) == sorted(r.data.metrics["test_acc"] for r in cells)
    loaded = frame.load(first.experiment_id, first.parent_run_id)
    assert len(loaded.cells) == 2 and loaded.expected == 2
    assert loaded.experiment == server_store.name
    assert set(loaded.history["run_id"]) == {r.info.run_id for r in cells}  # per-epoch
