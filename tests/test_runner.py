"""The runner end to end on tiny real cells: MLflow records, failures, resume, a killed grid.

Each test gets its own MLflow store (sqlite in tmp) and dataset cache; cells are ResNet-18 on
40 digits at 16 px for one epoch, a few seconds each on a CPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from fault_helpers import processes_in

from bench import cli, tracking
from bench.config import grid as gridmod
from bench.paths import ROOT
from bench.report import frame, tables
from bench.run import runner

pytestmark = pytest.mark.slow

GRID = """
name = "{name}"
[axes]
framework = ["torch"]
backbone = ["resnet18"]
weights = {weights}
strategy = {strategies}
dataset = ["digits"]
seed = [0]
[defaults]
subset = 40
image_size = 16
batch_size = 16
epochs = 1
device = "cpu"
"""


def write_grid(path: Path, name: str, weights='["none"]',
               strategies='["feature_extraction", "full"]') -> Path:
    text = GRID.format(name=name, weights=weights, strategies=strategies)
    text = text.replace('device = "cpu"\n', "") + '[run]\ndevice = "cpu"\n'
    path.write_text(text)
    return path


def runs_by_status(exp_name: str) -> dict[str, list]:
    exp_id = tracking.experiment_id(exp_name, create=False)
    out: dict[str, list] = {}
    for r in tracking.cell_runs(exp_id):
        out.setdefault(r.info.status, []).append(r)
    return out


def test_failing_cell_is_recorded_and_the_grid_goes_on(store):
    bad = store / "broken.pt"
    bad.write_bytes(b"this is not a checkpoint")
    path = write_grid(store / "g.toml", "g1", weights=f'["none", "{bad}"]',
                      strategies='["feature_extraction"]')
    g = gridmod.load(path)
    result = runner.run_grid(g, path.read_text(), stream=sys.stdout)
    statuses = sorted(o.status for o in result.outcomes)
    assert statuses == ["FAILED", "FINISHED"]
    failed = result.failed[0]
    assert failed.spec.weights == str(bad)
    runs = runs_by_status("g1")
    assert len(runs["FINISHED"]) == 1 and len(runs["FAILED"]) == 1
    run = runs["FAILED"][0]
    assert run.data.tags["tlbench.error"]  # the error as a tag, readable in the UI list
    c = tracking.client()
    arts = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"error.txt", "cell.log", "spec.json"} <= arts
    tb = Path(c.download_artifacts(run.info.run_id, "error.txt", str(store))).read_text()
    assert "Traceback" in tb and "could not be loaded" in tb and str(bad) in tb
    ok = runs["FINISHED"][0]
    m = ok.data.metrics
    for key in ("test_acc", "best_val_acc", "train_loss", "val_acc", "trainable_params",
                "total_params", "model_only_train_images_per_sec", "inference_images_per_sec",
                "wall_seconds", "startup_seconds", "peak_memory_mb",
                "system/cpu_utilization_percentage"):  # MLflow's system metrics, per cell
        assert key in m, key
    assert 0 <= m["test_acc"] <= 1
    assert ok.data.params["backbone"] == "resnet18"
    assert ok.data.tags["tlbench.device"].startswith("cpu")
    assert ok.data.tags["mlflow.parentRunId"] == result.parent_run_id
    parent = c.get_run(result.parent_run_id)
    assert parent.info.status == "FAILED" and parent.data.tags["tlbench.failed"] == "1"
    # the failed cell stays visible in the table, never dropped
    df = frame.runs_frame(result.experiment_id)
    table = tables.accuracy_table(df).display.set_index(["backbone", "strategy", "weights"])
    assert table.loc[("resnet18", "feature_extraction", str(bad)), "test_acc (torch)"] \
        == "FAILED"
    assert any("could not be loaded" in f for f in tables.failures(df))


def test_resume_skips_finished_cells(store, capsys):
    path = write_grid(store / "g.toml", "g2")
    g = gridmod.load(path)
    first = runner.run_grid(g, path.read_text(), stream=sys.stdout)
    assert [o.status for o in first.outcomes] == ["FINISHED", "FINISHED"]
    second = runner.run_grid(g, path.read_text(), stream=sys.stdout)
    assert [o.status for o in second.outcomes] == ["SKIPPED", "SKIPPED"]
    assert second.parent_run_id is None  # nothing to do: no empty parent run either
    runs = runs_by_status("g2")
    assert len(runs["FINISHED"]) == 2 and set(runs) == {"FINISHED"}

    # how the runs read in the MLflow UI: what tells a cell apart first in its run name, the
    # full label and the configuration in tags, the description, the source and the commit
    c = tracking.client()
    exp = c.get_experiment(first.experiment_id)
    assert exp.tags[tracking.EXPERIMENT_KIND] == "custom_model_development"
    for r in runs["FINISHED"]:
        tags, strategy = r.data.tags, r.data.params["strategy_label"]
        # short forms; one backbone, dataset, seed: left out (bench/tracking_names.py)
        assert r.info.run_name == {"feature_extraction": "feat pt", "full": "full pt"}[strategy]
        assert tags["tlbench.label"] == f"torch/resnet18/{strategy}/digits[n=40]/seed0"
        assert tags["tlbench.config"].startswith(f"resnet18/{strategy}/digits[n=40] #")
        assert tags["mlflow.note.content"].startswith(tags["tlbench.label"])
        assert tags["mlflow.source.name"] == "python -m bench run g.toml"
        assert len(tags["mlflow.source.git.commit"]) == 40
    # the data each cell read, as MLflow dataset inputs: one per split part, the same
    # digests for the two cells (same dataset, subset and seed: the same images)
    seen = []
    for r in runs["FINISHED"]:
        inputs = c.get_run(r.info.run_id).inputs.dataset_inputs
        by_part = {i.tags[0].value: i.dataset for i in inputs}
        assert set(by_part) == {"train", "val", "test"}
        assert all(d.name == "digits" and d.source_type == "sklearn_digits"
                   for d in by_part.values())
        assert json.loads(by_part["train"].profile)["num_rows"] == r.data.metrics["n_train"]
        # the Datasets panel's schema: columns, not "No schema available"
        cols = json.loads(by_part["train"].schema)["mlflow_colspec"]
        assert [c["name"] for c in cols] == ["image: uint8 RGB 16x16x3",
                                             "label: class index 0..9"]
        seen.append({k: d.digest for k, d in by_part.items()})
    assert seen[0] == seen[1] and len(set(seen[0].values())) == 3
    parent = c.get_run(first.parent_run_id)
    assert parent.data.tags["mlflow.source.name"] == "python -m bench run g.toml"
    # the parent's row sums the invocation up
    pm = parent.data.metrics
    assert (pm["cells_finished"], pm["cells_failed"], pm["cells_skipped"]) == (2, 0, 0)
    # no accuracy averaged over unlike cells (issue 25); per strategy, selected on val
    assert not {"test_acc_best", "test_acc_mean"} & set(pm)
    assert {k for k in pm if k.startswith("test_acc/")} == {
        f"test_acc/torch/{s}" for s in {r.data.params["strategy"] for r in runs["FINISHED"]}}
    assert cli.main(["ui", "--print-only"]) == 0
    assert (f"g2: http://127.0.0.1:5000/#/experiments/{first.experiment_id}/runs"
            f"?workflowType=machine_learning") in capsys.readouterr().out

    # the report reads these runs back: one row per cell, the numbers MLflow holds
    df = frame.runs_frame(first.experiment_id)
    assert len(df) == 2 and set(df["status"]) == {"FINISHED"}
    table = tables.accuracy_table(df).display.set_index(["backbone", "strategy", "weights"])
    for r in runs["FINISHED"]:
        key = ("resnet18", r.data.params["strategy_label"], "none")
        assert table.loc[key, "test_acc (torch)"] == f"{r.data.metrics['test_acc']:.3f} (n=1)"
    md = tables.compact(df)
    assert "### Test accuracy" in md and "feature_extraction" in md and "full" in md


def test_killed_grid_resumes_without_duplicates(store):
    path = write_grid(store / "g.toml", "g3",
                      strategies='["feature_extraction", "partial[depth=1]", "full"]')
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "bench", "run", str(path)]
    # create the sqlite store's tables here first: two processes creating them at once can
    # make the runner fail at start-up
    tracking.client().search_experiments()
    log = (store / "runner.log").open("w")
    proc = subprocess.Popen(cmd, env=env, cwd=store, stdout=log, stderr=subprocess.STDOUT)
    try:
        # generous: a loaded 2-core machine can take minutes for the first tiny cell
        deadline = time.time() + 600
        while time.time() < deadline:  # kill the runner once a cell is done, mid-grid
            exp_id = tracking.experiment_id("g3", create=False)
            if exp_id and tracking.cell_runs(exp_id, "FINISHED"):
                break
            if proc.poll() is not None:
                pytest.fail(f"the runner ended (status {proc.returncode}) before it could be "
                            f"killed mid-grid: {(store / 'runner.log').read_text()[-3000:]}")
            time.sleep(0.5)
        else:
            pytest.fail("no cell finished in 10 minutes")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        # the runner's children (fork server, cell) end with it: nothing left in the store
        deadline = time.time() + 60
        while processes_in(store) and time.time() < deadline:
            time.sleep(0.5)
        assert not processes_in(store), "processes outlived the killed runner"
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    before = runs_by_status("g3")
    n_finished_before = len(before.get("FINISHED", []))
    assert 1 <= n_finished_before < 3
    done = subprocess.run(cmd, env=env, cwd=store, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    after = runs_by_status("g3")
    hashes = [r.data.tags["tlbench.spec_hash"] for r in after["FINISHED"]]
    assert len(hashes) == 3 and len(set(hashes)) == 3  # each cell finished exactly once
    assert "RUNNING" not in after  # the interrupted cell's run was closed as KILLED
    assert len(after.get("KILLED", [])) == len(before.get("RUNNING", []))
    assert f"{n_finished_before} already finished" in done.stderr


def test_bad_grid_writes_nothing(store):
    path = store / "bad.toml"
    path.write_text(textwrap.dedent("""
        [axes]
        framework = ["torch"]
        backbone = ["resnet19"]
        dataset = ["digits"]
    """))
    done = subprocess.run([sys.executable, "-m", "bench", "run", str(path)], cwd=store,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert "resnet19" in done.stderr and "resnet18" in done.stderr
    assert not (store / "mlflow.db").exists() and not (store / "mlruns").exists()


def test_dry_run_lists_cells_without_running(store):
    path = write_grid(store / "g.toml", "g4")
    done = subprocess.run([sys.executable, "-m", "bench", "run", str(path), "--dry-run"],
                          cwd=store, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "torch/resnet18/feature_extraction/digits[n=40]/seed0" in done.stdout
    assert "torch/resnet18/full/digits[n=40]/seed0" in done.stdout
    assert not (store / "mlflow.db").exists()


@pytest.mark.timeout(120)
def test_two_cells_logging_the_same_dataset_at_once_both_record_it(store):
    """MLflow keeps one datasets row per (experiment, name, digest), made on first use: two
    cells of one split logging their inputs at once race to make it (seen: a --parallel 2
    cell FAILED with a UNIQUE-constraint error). Both runs must end up with the inputs."""
    import threading

    exp = tracking.experiment_id("race")
    c = tracking.client()
    for round_ in range(8):
        inputs = [{"name": "digits", "digest": f"d{round_}", "source_type": "sklearn_digits",
                   "source": "{}", "context": "train", "profile": "{}"}]
        runs = [c.create_run(exp).info.run_id for _ in range(2)]
        barrier = threading.Barrier(2)

        def log(run_id, inputs=inputs, barrier=barrier):
            barrier.wait()
            tracking.log_inputs(run_id, inputs)

        threads = [threading.Thread(target=log, args=(r,)) for r in runs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for r in runs:
            run = c.get_run(r)
            assert [i.dataset.digest for i in run.inputs.dataset_inputs] == [f"d{round_}"]
            assert "tlbench.inputs" not in run.data.tags
