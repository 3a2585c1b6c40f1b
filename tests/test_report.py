"""The reporter: statistics on hand-made values, and tables, files and MLflow artifacts from
a tiny real grid (ResNet-18, 40 digits at 16 px, 2 epochs, 2 seeds; two cells fail on a
broken weights file) run once for the module in its own MLflow store."""

from __future__ import annotations

import math
import sys

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bench import cli, figures, report, runner, tracking
from bench import grid as gridmod

T_975_DOF2 = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom (tables)


# ---- statistics on hand-made values ----------------------------------------------------
def test_summarize_mean_std_and_t_interval():
    s = report.summarize([0.8, 0.9, 1.0])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.9) and s["std"] == pytest.approx(0.1)
    half = T_975_DOF2 * 0.1 / math.sqrt(3)
    assert s["ci_low"] == pytest.approx(0.9 - half) and s["ci_high"] == pytest.approx(0.9 + half)
    assert report.fmt_summary(s) == "0.900 ± 0.100 [0.652, 1.148] n=3"


def test_summarize_single_and_empty():
    one = report.summarize([0.7, None, float("nan")])
    assert one["n"] == 1 and one["mean"] == 0.7
    assert math.isnan(one["std"]) and math.isnan(one["ci_low"])
    assert report.fmt_summary(one) == "0.700 (n=1)"  # no interval, never NaN noise
    assert report.summarize([])["n"] == 0 and report.fmt_summary(report.summarize([])) == ""


def test_paired_test_matches_scipy_on_matched_seeds():
    a = pd.Series([0.90, 0.80, 0.85, 0.70], index=[0, 1, 2, 3])
    b = pd.Series([0.80, 0.75, 0.80], index=[0, 1, 2])  # seed 3 has no pair
    t = report.paired_test(a, b)
    want = stats.ttest_rel([0.90, 0.80, 0.85], [0.80, 0.75, 0.80])
    assert t["pairs"] == 3 and t["p_value"] == pytest.approx(want.pvalue)
    assert t["mean_diff"] == pytest.approx(0.2 / 3)
    assert t["verdict"].startswith("no (p=0.0572")  # t = 4.0 on 2 dof: not at 5%
    strong = report.paired_test(pd.Series([0.9, 0.8, 0.85, 0.95]),
                                pd.Series([0.8, 0.72, 0.74, 0.86]))
    assert strong["p_value"] < 0.05 and strong["verdict"].startswith("yes")


def test_paired_test_says_when_no_test_is_possible():
    one = report.paired_test(pd.Series([0.9, 0.8], index=[0, 1]),
                             pd.Series([0.7, 0.6], index=[1, 2]))
    assert one["pairs"] == 1 and one["verdict"] == "n too small (1 pair)"
    assert math.isnan(one["p_value"])
    same = report.paired_test(pd.Series([0.1, 0.1]), pd.Series([0.1 + 3e-9, 0.1 + 3e-9]))
    assert same["p_value"] == 1.0 and same["verdict"].startswith("no (no difference")
    const = report.paired_test(pd.Series([0.9, 0.8]), pd.Series([0.8, 0.7]))
    assert math.isnan(const["p_value"]) and "no variance" in const["verdict"]


def _row(fw, strategy, seed, acc=None, status="FINISHED", depth=None, ips=None,
         backbone="mobilenet_v2"):
    label = f"{strategy}[depth={depth}]" if depth else strategy
    r = {"run_id": None if status == "MISSING" else f"{fw}-{label}-{seed}", "status": status,
         "name": f"{fw}/{backbone}/{label}/digits/seed{seed}", "spec_hash": f"h-{fw}{label}{seed}",
         "role": "cell", "error": "boom" if status == "FAILED" else "",
         "p_framework": fw, "p_backbone": backbone, "p_dataset": "digits", "p_weights": "none",
         "p_strategy": strategy, "p_strategy_label": label, "p_strategy.depth": depth,
         "p_seed": seed}
    if status == "FINISHED":
        r.update(test_acc=acc, train_images_per_sec=ips, trainable_params=10.0,
                 total_params=100.0)
    return r


@pytest.fixture
def handmade() -> pd.DataFrame:
    rows = [_row("torch", "full", s, a, ips=100.0) for s, a in enumerate([0.90, 0.80, 0.85])]
    rows += [_row("torch", "feature_extraction", s, a, ips=400.0)
             for s, a in enumerate([0.80, 0.75, 0.80])]
    rows += [_row("keras", "full", 0, 0.86, ips=50.0), _row("keras", "full", 1, 0.79, ips=70.0),
             _row("keras", "full", 2, status="FAILED")]
    rows += [_row("keras", "feature_extraction", s, status="MISSING") for s in range(3)]
    rows += [_row("torch", "partial", 0, status="RUNNING", depth=2)]
    for r in rows[:3]:
        r["t_input_bound"] = "true"  # the backend says so only for some cells
    pre = {**_row("torch", "full", 0, 0.99, ips=1.0), "role": "pretrain",
           "run_id": "pre1", "p_dataset": "mnist5k"}
    rows.append(pre)  # a pretraining run: listed apart, never in a comparison
    return pd.DataFrame(rows)


def test_accuracy_table_on_handmade_frame(handmade):
    t = report.accuracy_table(handmade)
    num = t.numeric.set_index(["p_strategy_label", "framework"])
    full = num.loc[("full", "torch")]
    assert full["n"] == 3 and full["mean"] == pytest.approx(0.85)
    assert full["ci_high"] == pytest.approx(0.85 + T_975_DOF2 * 0.05 / math.sqrt(3))
    assert num.loc[("full", "keras"), "not_finished"] == "1 FAILED"
    disp = t.display.set_index("strategy")
    assert list(disp.index) == ["feature_extraction", "partial[depth=2]", "full"]  # registry
    keras_full = disp.loc["full", "test_acc (keras)"]
    assert keras_full.startswith("0.825 ± 0.049 [") and keras_full.endswith("] n=2; 1 FAILED")
    assert disp.loc["feature_extraction", "test_acc (keras)"] == "3 MISSING"
    assert disp.loc["partial[depth=2]", "test_acc (torch)"] == "RUNNING"
    assert disp.loc["partial[depth=2]", "test_acc (keras)"] == "not in grid"
    assert set(t.numeric["p_dataset"]) == {"digits"}  # the pretraining run stays out
    assert len(report.failures(handmade)) == 5


def test_throughput_cost_delta_and_best_on_handmade_frame(handmade):
    thr = report.throughput_table(handmade).numeric.set_index(["p_strategy_label", "framework"])
    assert thr.loc[("feature_extraction", "torch"), "speedup_vs_full"] == pytest.approx(4.0)
    assert thr.loc[("full", "keras"), "train_images_per_sec"] == pytest.approx(60.0)
    assert math.isnan(thr.loc[("partial[depth=2]", "torch"), "speedup_vs_full"])
    shown = report.throughput_table(handmade).display.set_index(["strategy", "framework"])
    assert shown.loc[("full", "torch"), "input-bound"] == "true"
    assert shown.loc[("full", "keras"), "input-bound"] == ""
    cost = report.cost_table(handmade)
    assert cost.numeric["trainable_fraction"].dropna().eq(0.1).all()
    assert "RUNNING" in set(cost.display["trainable params"])

    delta = report.framework_delta_table(handmade).numeric.set_index("p_strategy_label")
    assert delta.loc["full", "delta"] == pytest.approx(0.85 - 0.825)
    assert delta.loc["full", "paired_pairs"] == 2  # keras seed 2 failed: no pair
    assert delta.loc["full", "p_value"] == pytest.approx(
        stats.ttest_rel([0.90, 0.80], [0.86, 0.79]).pvalue)

    best = report.best_strategy_table(handmade)
    b = best.numeric.set_index("framework")
    assert b.loc["torch", "best"] == "full" and b.loc["torch", "runner_up"] == "feature_extraction"
    assert b.loc["torch", "margin"] == pytest.approx(0.85 - 0.7833333)
    assert b.loc["torch", "p_value"] == pytest.approx(
        stats.ttest_rel([0.90, 0.80, 0.85], [0.80, 0.75, 0.80]).pvalue)
    assert "partial[depth=2] (RUNNING)" in b.loc["torch", "not_compared"]
    assert b.loc["keras", "verdict"] == "no runner-up"
    assert "feature_extraction (3 MISSING)" in b.loc["keras", "not_compared"]


def test_latex_is_booktabs_and_escaped(handmade):
    tex = report.accuracy_table(handmade).latex()
    for cmd in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}"):
        assert cmd in tex
    assert r"feature\_extraction" in tex and r"$\pm$" in tex and "_extraction" not in \
        tex.replace(r"\_extraction", "")


def test_pareto_front():
    pts = pd.DataFrame({"speed": [10, 20, 30, 15, 30], "acc": [0.9, 0.8, 0.5, 0.7, 0.4]})
    assert list(figures.pareto_front(pts, "speed", "acc")) == [True, True, True, False, False]


def test_unfreeze_depth():
    assert figures.unfreeze_depth("feature_extraction", None, "resnet18") == 0
    assert figures.unfreeze_depth("full", None, "resnet18") == 5
    assert figures.unfreeze_depth("partial", "2", "resnet18") == 2
    assert figures.unfreeze_depth("two_stage", "all", "mobilenet_v2") == 9


# ---- a tiny real grid ------------------------------------------------------------------
GRID = """
name = "rep"
[axes]
framework = ["torch"]
backbone = ["resnet18"]
"strategy, weights" = [["feature_extraction", "none"], ["full", "none"], ["full", "{bad}"]]
dataset = ["digits"]
seed = [0, 1]
[defaults]
subset = 40
image_size = 16
batch_size = 16
epochs = 2
[run]
device = "cpu"
"""


@pytest.fixture(scope="module")
def grid_store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
        mp.setenv("TLBENCH_CACHE", str(tmp / "cache"))
        bad = tmp / "broken.pt"
        bad.write_bytes(b"not a checkpoint")
        path = tmp / "rep.toml"
        path.write_text(GRID.format(bad=bad))
        g = gridmod.load(path)
        result = runner.run_grid(g, path.read_text(), stream=sys.stdout)
        yield {"tmp": tmp, "path": path, "grid": g, "result": result, "bad": str(bad)}


@pytest.mark.slow
def test_frame_and_tables_equal_what_mlflow_holds(grid_store):
    result = grid_store["result"]
    data = report.load(result.experiment_id, result.parent_run_id)
    c = tracking.client()
    runs = c.search_runs([result.experiment_id], "tags.`tlbench.kind` = 'cell'")
    assert len(runs) == len(data.cells) == 6 and data.expected == 6
    frame = data.frame.set_index("run_id")
    for r in runs:
        row = frame.loc[r.info.run_id]
        assert row["status"] == r.info.status
        for k, v in r.data.metrics.items():
            assert row[k] == v, k
        for k, v in r.data.params.items():
            assert str(row[f"p_{k}"]) == v, k
        if r.info.status == "FINISHED":
            secs = c.get_metric_history(r.info.run_id, "epoch_seconds")
            best = r.data.metrics["best_val_epoch"]
            assert row["time_to_best_s"] == pytest.approx(
                sum(m.value for m in secs if m.step <= best))
    done = [r for r in runs if r.info.status == "FINISHED"]
    acc = report.accuracy_table(data.frame).numeric.set_index(["p_strategy_label", "p_weights"])
    thr = report.throughput_table(data.frame).numeric.set_index(
        ["p_strategy_label", "p_weights"])
    for label in ("feature_extraction", "full"):
        vals = [r.data.metrics["test_acc"] for r in done if r.data.params["strategy_label"]
                == label]
        assert acc.loc[(label, "none"), "n"] == 2
        assert acc.loc[(label, "none"), "mean"] == pytest.approx(np.mean(vals))
        assert acc.loc[(label, "none"), "std"] == pytest.approx(np.std(vals, ddof=1))
        ips = [r.data.metrics["train_images_per_sec"] for r in done
               if r.data.params["strategy_label"] == label]
        assert thr.loc[(label, "none"), "train_images_per_sec"] == pytest.approx(np.mean(ips))
    assert thr.loc[("full", "none"), "speedup_vs_full"] == pytest.approx(1.0)


@pytest.mark.slow
def test_failed_cells_show_in_every_table(grid_store):
    result = grid_store["result"]
    data = report.load(result.experiment_id, result.parent_run_id, history=False)
    bad = grid_store["bad"]
    acc = report.accuracy_table(data.frame).display.set_index("weights")
    assert acc.loc[bad, "test_acc (torch)"] == "2 FAILED"
    for t in report.all_tables(data.frame)[1:3]:
        assert "2 FAILED" in t.display.set_index("weights").loc[bad].to_string(), t.name
    best = report.best_strategy_table(data.frame).display.set_index("weights")
    assert best.loc[bad, "best"] == "none finished"
    assert best.loc[bad, "not compared"] == "full (2 FAILED)"
    fails = report.failures(data.frame)
    assert len(fails) == 2 and all("could not be loaded" in f for f in fails)


@pytest.mark.slow
def test_cli_writes_every_file_and_logs_report_to_parent(grid_store, capsys):
    result, tmp = grid_store["result"], grid_store["tmp"]
    out = tmp / "reports"
    assert cli.main(["report", str(grid_store["path"]), "--parent", result.parent_run_id,
                     "--out", str(out)]) == 0
    folder = out / "rep"
    assert f"report: {folder / 'report.md'}" in capsys.readouterr().err
    for name in ("accuracy", "throughput", "cost", "framework_delta", "best_strategy"):
        for ext in ("md", "tex", "csv"):
            assert (folder / "tables" / f"{name}.{ext}").stat().st_size > 0, (name, ext)
    for stem in ("accuracy_vs_depth_digits", "pareto_digits", "curves_resnet18_digits"):
        for ext in ("png", "svg"):
            assert (folder / "figures" / f"{stem}.{ext}").stat().st_size > 1000, stem
    runs = pd.read_parquet(folder / "runs.parquet")
    assert len(runs) == 6 and set(runs["status"]) == {"FINISHED", "FAILED"}
    assert len(pd.read_csv(folder / "runs.csv")) == 6
    md = (folder / "report.md").read_text()
    assert "## Methods" in md and "6 cells of the 6 the grid expects" in md
    assert "4 of 6 cells finished; 2 FAILED" in md and "seeds 0, 1" in md
    assert "![pareto_digits](figures/pareto_digits.png)" in md
    c = tracking.client()
    arts = {a.path for a in c.list_artifacts(result.parent_run_id)}
    assert {"report.md", "tables", "figures", "grid.toml", "cells.json"} <= arts
    logged = c.download_artifacts(result.parent_run_id, "report.md", str(tmp))
    assert open(logged).read() == md


@pytest.mark.slow
def test_partial_grid_reports_running_and_missing_cells(grid_store, capsys):
    """A second invocation of a larger grid, caught mid-way: one cell RUNNING, one not
    started. The latest invocation is the default selection; finished cells it skipped come
    from the first invocation."""
    path, tmp = grid_store["path"], grid_store["tmp"]
    bigger = path.read_text().replace('["full", "none"],',
                                      '["full", "none"], ["partial[depth=1]", "none"], '
                                      '["two_stage[depth=1]", "none"],')
    path2 = tmp / "rep2.toml"
    path2.write_text(bigger)
    g2 = gridmod.load(path2)
    assert len(g2.specs) == 10
    exp_id = tracking.experiment_id("rep", create=False)
    parent = tracking.start_parent(exp_id, g2, 6, bigger)
    running = next(s for s in g2.specs if s.strategy == "partial" and s.seed == 0)
    tracking.start_cell(exp_id, parent, running, g2.label(running), "cpu")

    c = tracking.client()  # a pretraining run under this invocation (tlbench.role)
    pre = c.create_run(exp_id, run_name="pretrain resnet18 on mnist5k",
                       tags={"mlflow.parentRunId": parent, "tlbench.role": "pretrain",
                             "tlbench.kind": "pretrain"})
    c.log_param(pre.info.run_id, "backbone", "resnet18")
    c.log_param(pre.info.run_id, "dataset", "mnist5k")
    c.log_metric(pre.info.run_id, "best_val_acc", 0.5)
    c.set_terminated(pre.info.run_id, "FINISHED")

    assert cli.main(["report", "rep", "--out", str(tmp / "partial"), "--no-log"]) == 0
    printed = capsys.readouterr().out
    assert "RUNNING" in printed and "MISSING" in printed
    data = report.load(exp_id, parent, history=False)
    status = data.cells.set_index("name")["status"]
    assert len(status) == 10
    assert status[running.name] == "RUNNING"
    assert (status == "MISSING").sum() == 5  # partial seed 1, two_stage x2, broken x2
    assert (status == "FINISHED").sum() == 4  # from the first invocation
    acc = report.accuracy_table(data.frame).display.set_index(["weights", "strategy"])
    assert acc.loc[("none", "partial[depth=1]"), "test_acc (torch)"] == "1 MISSING, 1 RUNNING"
    assert acc.loc[("none", "two_stage[depth=1]"), "test_acc (torch)"] == "2 MISSING"
    md = (tmp / "partial" / "rep" / "report.md").read_text()
    assert "4 of 10 cells finished; 5 MISSING, 1 RUNNING" in md
    assert f"RUNNING: {running.name}" in md
    assert "seeds 0, 1" in md and "subset 40," in md
    broken = [f for f in report.failures(data.frame) if f.startswith("MISSING")
              and "broken.pt" in f]  # failed in the first invocation, not yet rerun
    assert len(broken) == 2
    assert all("latest earlier run" in f and f.endswith("FAILED") for f in broken)
    assert "## Pretraining runs" in md and "pretrain resnet18 on mnist5k" in md
    assert "mnist5k" not in (tmp / "partial" / "rep" / "tables" / "accuracy.md").read_text()
    tracking.end_run(parent, "KILLED")
