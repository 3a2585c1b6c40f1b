"""The reporter: statistics on hand-made values, and tables, files and MLflow artifacts from
a tiny real grid (ResNet-18, 40 digits at 16 px, 2 epochs, 2 seeds; two cells fail on a
broken weights file) run once for the module in its own MLflow store."""

from __future__ import annotations

import math
import re
import sys
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from bench import cli, tracking
from bench.config import grid as gridmod
from bench.report import build, compare, curves, figures, html, plot, stats, table, tables
from bench.report import frame as report_frame
from bench.report import text as report_text
from bench.run import runner

T_975_DOF2 = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom (tables)


# ---- statistics on hand-made values ----------------------------------------------------
def test_summarize_mean_std_and_t_interval():
    s = stats.summarize([0.8, 0.9, 1.0])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.9) and s["std"] == pytest.approx(0.1)
    half = T_975_DOF2 * 0.1 / math.sqrt(3)
    assert s["ci_low"] == pytest.approx(0.9 - half) and s["ci_high"] == pytest.approx(0.9 + half)
    assert table.fmt_summary(s) == "0.900 ± 0.100 [0.652, 1.148] n=3"


def test_summarize_single_and_empty():
    one = stats.summarize([0.7, None, float("nan")])
    assert one["n"] == 1 and one["mean"] == 0.7
    assert math.isnan(one["std"]) and math.isnan(one["ci_low"])
    assert table.fmt_summary(one) == "0.700 (n=1)"  # no interval, never NaN noise
    assert stats.summarize([])["n"] == 0 and table.fmt_summary(stats.summarize([])) == ""


def test_paired_test_matches_scipy_on_matched_seeds():
    a = pd.Series([0.90, 0.80, 0.85, 0.70], index=[0, 1, 2, 3])
    b = pd.Series([0.80, 0.75, 0.80], index=[0, 1, 2])  # seed 3 has no pair
    t = stats.paired_test(a, b)
    want = scipy_stats.ttest_rel([0.90, 0.80, 0.85], [0.80, 0.75, 0.80])
    assert t["pairs"] == 3 and t["p_value"] == pytest.approx(want.pvalue)
    assert t["mean_diff"] == pytest.approx(0.2 / 3)
    assert t["verdict"].startswith("no (p=0.0572")  # t = 4.0 on 2 dof: not at 5%
    strong = stats.paired_test(pd.Series([0.9, 0.8, 0.85, 0.95]),
                                pd.Series([0.8, 0.72, 0.74, 0.86]))
    assert strong["p_value"] < 0.05 and strong["verdict"].startswith("yes")


def test_paired_test_says_when_no_test_is_possible():
    one = stats.paired_test(pd.Series([0.9, 0.8], index=[0, 1]),
                             pd.Series([0.7, 0.6], index=[1, 2]))
    assert one["pairs"] == 1 and one["verdict"] == "n too small (1 pair)"
    assert math.isnan(one["p_value"])
    same = stats.paired_test(pd.Series([0.1, 0.1]), pd.Series([0.1 + 3e-9, 0.1 + 3e-9]))
    assert same["p_value"] == 1.0 and same["verdict"].startswith("no (no difference")
    const = stats.paired_test(pd.Series([0.9, 0.8]), pd.Series([0.8, 0.7]))
    assert math.isnan(const["p_value"]) and "no variance" in const["verdict"]


def _row(fw, strategy, seed, acc=None, status="FINISHED", depth=None, ips=None,
         backbone="mobilenet_v2", **extra):
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
    return {**r, **extra}


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
    t = tables.accuracy_table(handmade)
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
    assert len(tables.failures(handmade)) == 5


def test_throughput_cost_delta_and_best_on_handmade_frame(handmade):
    thr = tables.throughput_table(handmade).numeric.set_index(["p_strategy_label", "framework"])
    assert thr.loc[("feature_extraction", "torch"), "speedup_vs_full"] == pytest.approx(4.0)
    assert thr.loc[("full", "keras"), "train_images_per_sec"] == pytest.approx(60.0)
    assert math.isnan(thr.loc[("partial[depth=2]", "torch"), "speedup_vs_full"])
    shown = tables.timing_table(handmade).display.set_index(["strategy", "framework"])
    assert shown.loc[("full", "torch"), "input-bound"] == "true"
    assert shown.loc[("full", "keras"), "input-bound"] == ""
    cost = tables.cost_table(handmade)
    assert cost.numeric["trainable_fraction"].dropna().eq(0.1).all()
    assert "RUNNING" in set(cost.display["trainable params"])

    delta = compare.framework_delta_table(handmade).numeric.set_index("p_strategy_label")
    assert delta.loc["full", "delta"] == pytest.approx(0.85 - 0.825)
    assert delta.loc["full", "paired_pairs"] == 2  # keras seed 2 failed: no pair
    assert delta.loc["full", "p_value"] == pytest.approx(
        scipy_stats.ttest_rel([0.90, 0.80], [0.86, 0.79]).pvalue)

    best = compare.best_strategy_table(handmade)
    b = best.numeric.set_index("framework")
    assert b.loc["torch", "best"] == "full" and b.loc["torch", "runner_up"] == "feature_extraction"
    assert b.loc["torch", "margin"] == pytest.approx(0.85 - 0.7833333)
    assert b.loc["torch", "p_value"] == pytest.approx(
        scipy_stats.ttest_rel([0.90, 0.80, 0.85], [0.80, 0.75, 0.80]).pvalue)
    assert "partial[depth=2] (RUNNING)" in b.loc["torch", "not_compared"]
    assert b.loc["keras", "verdict"] == "no runner-up"
    assert "feature_extraction (3 MISSING)" in b.loc["keras", "not_compared"]

    # Markdown shows the text as written: the delta's sign and digits (not re-parsed into
    # 0.025), numbers right-aligned like the LaTeX
    md = compare.framework_delta_table(handmade).markdown()
    assert " +0.025 |" in md and "-:|" in md  # a right-aligned column in the rule row
    assert compare.best_strategy_table(handmade).markdown().count("+0.067") == 1


def test_latex_is_booktabs_and_escaped(handmade):
    tex = tables.accuracy_table(handmade).latex()
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


# ---- recorded conditions: budget, tested weights, determinism, sharing, divergence -----
def _data(rows) -> report_frame.ReportData:
    return report_frame.ReportData(pd.DataFrame(rows), report_frame.empty_history(), "x", "0")


def _recorded(fw, strategy, seed, acc, ips, **extra):
    """A cell run with every value the cells record now (idle machine, deterministic)."""
    rec = {"p_epochs": 6, "p_batch_size": 32, "p_select": "last", "p_device_kind": "cpu",
           "epochs_trained": 6.0, "optimizer_steps": 60.0, "test_epoch": 6.0,
           "t_deterministic": "true", "contention_share": 0.02,
           "t_contended": "false: other processes used 2% of the CPU", "t_diverged": "false",
           "wall_seconds": 30.0}
    return _row(fw, strategy, seed, acc, ips=ips, **{**rec, **extra})


def test_methods_states_the_budget_trained_and_flags_a_cell_off_budget():
    rows = [_recorded("torch", "full", s, 0.9, 100.0) for s in range(2)]
    rows.append(_recorded("keras", "full", 0, 0.8, 50.0, epochs_trained=4.0,
                          optimizer_steps=40.0))
    text = report_text.methods(_data(rows))
    assert "Each cell trains" not in text  # the budget asked is not what the cells did
    assert "6 epochs asked per cell; the cells trained 4–6 epochs (40–60 optimizer steps " \
           "at batch 32) each." in text
    assert "Not the budget asked: 1 cell (keras/mobilenet_v2/full/digits/seed0: 4 of 6 " \
           "epochs)." in text
    same = report_text.methods(_data(rows[:2]))
    assert "the cells trained 6 epochs (60 optimizer steps at batch 32) each." in same
    assert "Not the budget" not in same and "Optimizer steps differ" not in same
    rows[1]["optimizer_steps"] = 70.0  # same data, batch and epochs: steps must match
    assert "Optimizer steps differ between cells of the same data, batch and epochs " \
           "(digits (subset None), batch 32, 6 epochs: 60–70 steps)" in \
           report_text.methods(_data(rows[:2]))


def test_methods_states_tested_weights_determinism_sharing_and_device_kind():
    rows = [_recorded("torch", "full", 0, 0.9, 100.0, p_select="best_val", test_epoch=4.0),
            _recorded("torch", "full", 1, 0.8, 90.0, p_select="best_val", test_epoch=6.0,
                      t_deterministic="false: cuDNN benchmark mode"),
            _recorded("keras", "full", 0, 0.8, 50.0, p_select="best_val", test_epoch=5.0,
                      contention_share=0.45,
                      t_contended="true: other processes used 45% of the CPU")]
    text = report_text.methods(_data(rows))
    assert "The test evaluates the weights of the best validation epoch (restored); tested " \
           "epochs 4–6." in text
    assert "2 of 3 finished cells ran deterministically (not deterministic: cuDNN benchmark " \
           "mode (1 cell)); a repeated run gives identical numbers only for a deterministic " \
           "cell." in text
    assert "1 of 3 finished cells were timed while other processes used the machine (up to " \
           "45% of the CPU; † in the speed tables): a speed figure taken while the machine " \
           "was shared is not a measurement." in text
    assert "device kind cpu." in text
    rows[1]["p_device_kind"] = "cuda:NVIDIA H200"
    assert "device kinds cpu (2 cells), cuda:NVIDIA H200 (1 cell)" in \
        report_text.methods(_data(rows))


def test_methods_says_not_recorded_for_runs_older_than_the_records():
    rows = [_row("torch", "full", 0, 0.9, ips=100.0, p_epochs=6, p_batch_size=32)]
    text = report_text.methods(_data(rows))
    assert "6 epochs asked per cell; the epochs and optimizer steps the cells really " \
           "trained: not recorded." in text
    assert "The test evaluates the last epoch's weights." in text  # no select: last
    assert "Whether the cells ran deterministically: not recorded." in text
    assert "Whether other processes shared the machine while the speeds were timed: not " \
           "recorded." in text
    assert "Divergence of the finished cells: not recorded." in text
    assert "device kind cpu." in text


def _contended_frame() -> pd.DataFrame:
    shared = "true: other processes used 45% of the CPU"
    rows = [_recorded("torch", "full", 0, 0.90, 100.0, contention_share=0.45, t_contended=shared),
            _recorded("torch", "feature_extraction", 0, 0.80, 400.0),
            _recorded("keras", "full", 0, 0.86, 50.0),
            _recorded("keras", "feature_extraction", 0, 0.81, 300.0)]
    for r in rows:  # what frame.end_to_end derives from the epoch history: half the step
        r["end_to_end_images_per_sec"] = r["train_images_per_sec"] / 2
    return pd.DataFrame(rows)


def test_throughput_and_cost_mark_contended_rates_and_keep_numbers_numeric():
    df = _contended_frame()
    t = tables.throughput_table(df)
    shown = t.display.set_index(["strategy", "framework"])
    assert shown.loc[("full", "torch"), "step img/s"] == "100 †"
    assert shown.loc[("full", "torch"), "end-to-end img/s"] == "50 †"
    assert shown.loc[("full", "torch"), "speed-up vs full"] == "1.00× †"
    # its own rate was timed alone, its speed-up is over a contended full fine-tuning
    assert shown.loc[("feature_extraction", "torch"), "step img/s"] == "400"
    assert shown.loc[("feature_extraction", "torch"), "speed-up vs full"] == "4.00× †"
    assert shown.loc[("full", "keras"), "step img/s"] == "50"
    assert shown.loc[("feature_extraction", "keras"), "speed-up vs full"] == "6.00×"
    num = t.numeric.set_index(["p_strategy_label", "framework"])
    assert num.loc[("full", "torch"), "train_images_per_sec"] == 100.0  # a number, no mark
    assert num.loc[("full", "torch"), "contended"] == 1
    assert num.loc[("full", "torch"), "contention_share"] == pytest.approx(0.45)
    assert num.loc[("full", "keras"), "contended"] == 0
    md = t.markdown()
    assert "† measured while other processes used 45% of the CPU (1 cell): a speed figure " \
           "taken while the machine was shared is not a measurement." in md
    tex = t.latex()
    assert "†" not in tex and r"100 $^{\dagger}$" in tex and r"45\% of the CPU" in tex
    cost = tables.cost_table(df).display.set_index(["strategy", "framework"])
    assert cost.loc[("full", "torch"), "wall s"] == "30.0 †"
    assert cost.loc[("full", "keras"), "wall s"] == "30.0"
    assert "† measured while" in tables.cost_table(df).markdown()



def test_tables_hold_numbers_with_marks_as_data_and_format_when_rendered():
    t = tables.throughput_table(_contended_frame())
    at = (t.cells["strategy"] == "full") & (t.cells["framework"] == "torch")
    assert t.cells.loc[at, "step img/s"].item() == 100.0  # a number, its mark beside it
    assert t.marks.loc[at, "step img/s"].item() == report_frame.CONTENDED
    assert t.cells.loc[at, "speed-up vs full"].item() == pytest.approx(1.0)
    assert t.display.loc[at, "step img/s"].item() == "100 †"  # written only when shown
    acc = tables.accuracy_table(_diverged_frame())
    full = acc.cells.set_index("strategy").loc["full", "test_acc (torch)"]
    assert full["mean"] == pytest.approx(0.1) and full["n"] == 1  # the summary, not text
    assert acc.marks.set_index(acc.cells["strategy"]).loc["full", "test_acc (torch)"] == \
        report_frame.DIVERGED
    # LaTeX: alignment from each column's declared kind, never guessed from the text
    tex = t.latex()
    assert r"\begin{tabular}{lllllrrrrr}" in tex and r"\end{table}" in tex.rstrip()[-12:]
    assert tex.index(r"\bottomrule") < tex.index(r"\par\footnotesize") < \
        tex.index(r"\end{table}")


def test_latex_escapes_labels_headers_and_marks():
    cells = pd.DataFrame({"run_%#": ["a&b_c", "x~y"], "rate": [1234.0, float("nan")]})
    t = table.Table("t", "A_b & 50%", cells, cells,
                    {"rate": table.RATE},
                    marks=pd.DataFrame({"run_%#": ["", ""], "rate": [report_frame.CONTENDED, ""]}),
                    notes=pd.DataFrame({"run_%#": ["", ""], "rate": ["", ""]}),
                    footnotes=["† shared #1"])
    tex = t.latex()
    assert r"\begin{tabular}{lr}" in tex and r"\caption{A\_b \& 50\%}" in tex
    assert r"run\_\%\# & rate \\" in tex
    assert r"a\&b\_c & 1,234 $^{\dagger}$ \\" in tex
    assert r"x\textasciitilde{}y & -- \\" in tex
    assert r"\par\footnotesize $^{\dagger}$ shared \#1" in tex and "†" not in tex
    assert t.markdown().count("1,234 †") == 1

def test_throughput_says_when_sharing_is_not_recorded(handmade):
    md = tables.throughput_table(handmade).markdown()
    assert "†" not in md
    assert "Whether the machine was shared while timed: not recorded for 8 of 8 finished " \
           "cells." in md


def test_device_kind_separates_rows_and_shows_in_throughput_only_when_it_varies():
    df = _contended_frame()
    assert "device kind" not in tables.throughput_table(df).display
    assert "p_device_kind" not in report_frame.group_keys(df)
    gpu = df.assign(p_device_kind="cuda:NVIDIA H200", train_images_per_sec=5000.0,
                    spec_hash=df["spec_hash"] + "-gpu")
    both = pd.concat([df, gpu], ignore_index=True)
    assert "p_device_kind" in report_frame.group_keys(both)
    shown = tables.throughput_table(both).display
    assert list(shown["device kind"]).count("cuda:NVIDIA H200") == 4
    acc = tables.accuracy_table(both).numeric
    assert len(acc) == 8 and (acc["n"] == 1).all()  # never averaged across device kinds


def test_old_runs_without_select_or_device_kind_are_the_same_cell(tmp_path, monkeypatch):
    """A real MLflow store: a run logged before select and device_kind existed, and runs
    that log them. The old one counts as select=last on cpu; only a cuda run separates."""
    from bench.config.spec import RunSpec

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = tracking.experiment_id("old-new")
    parent = tracking.client().create_run(exp, tags={"tlbench.kind": "grid"}).info.run_id

    def cell(seed, old=False, **kw):
        spec = RunSpec("torch", "resnet18", "digits", strategy="full", seed=seed, **kw)
        rid = tracking.start_cell(exp, parent, spec, spec.name, "cpu")
        if old:  # MLflow cannot drop params: log the old run by hand, without them
            tracking.client().delete_run(rid)
            c = tracking.client()
            rid = c.create_run(exp, tags={"mlflow.parentRunId": parent,
                                          "tlbench.kind": "cell", "tlbench.name": spec.name,
                                          "tlbench.spec_hash": spec.hash}).info.run_id
            for k, v in spec.to_params().items():
                if k not in ("select", "device_kind"):
                    c.log_param(rid, k, v)
        tracking.log_metrics(rid, {"test_acc": 0.5 + seed / 10, "train_images_per_sec": 10})
        tracking.end_run(rid, tracking.FINISHED)

    cell(0, old=True)
    cell(1)
    data = report_frame.load(exp, history=False)
    assert list(data.cells["p_select"]) == ["last", "last"]
    assert list(data.cells["p_device_kind"]) == ["cpu", "cpu"]
    assert "p_device_kind" not in report_frame.group_keys(data.frame)
    acc = tables.accuracy_table(data.frame).numeric
    assert len(acc) == 1 and acc["n"].iloc[0] == 2
    cell(2, device_kind="cuda:NVIDIA H200")
    data = report_frame.load(exp, history=False)
    assert "p_device_kind" in report_frame.group_keys(data.frame)
    acc = tables.accuracy_table(data.frame).numeric.set_index("p_device_kind")
    assert acc.loc["cpu", "n"] == 2 and acc.loc["cuda:NVIDIA H200", "n"] == 1
    assert "device kind" in tables.throughput_table(data.frame).display


def test_pareto_leaves_contended_points_off_the_front():
    df = _contended_frame()
    df.loc[0, "test_acc"] = 0.99  # the contended cell would dominate every other one
    pts, x = figures.pareto_points(df)
    assert x == "end_to_end_images_per_sec"
    pts = pts.set_index(["p_strategy_label", "framework"])
    assert bool(pts.loc[("full", "torch"), "contended"])
    assert not pts.loc[("full", "torch"), "front"]
    assert pts.loc[("feature_extraction", "torch"), "front"]
    assert pts.loc[("full", "keras"), "front"]  # not pushed off by a contended point
    fig = figures.pareto_figure(pts.reset_index(), "digits", "train images/s")
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "machine shared while timed (not on the front)" in labels
    hollow = [c for c in ax.collections if len(c.get_offsets())
              and tuple(c.get_offsets()[0]) == (50.0, 0.99)]
    assert hollow and len(hollow[0].get_facecolor()) == 0  # no fill: drawn hollow
    plain = figures.pareto_points(df.assign(t_contended="false"))[0]
    assert plain.set_index(["p_strategy_label", "framework"]).loc[("full", "torch"), "front"]


def _default_like_frame() -> pd.DataFrame:
    """The default grid's shape, 2 seeds: each strategy at its own lr, two from-scratch
    controls apart in precise_bn, at chance and not."""
    rows = []
    im = {"p_weights": "imagenet", "p_precise_bn": 0}
    for fw in ("torch", "keras"):
        for seed in (0, 1):
            cells = [("feature_extraction", None, "feature_extraction", 1e-3, 0.69 + seed / 50,
                      im, 4000.0),
                     ("partial", "3", "partial[depth=3,bn=frozen]", 1e-3, 0.86, im, 300.0),
                     ("full", None, "full[bn=frozen]", 1e-4, 0.91, im, 200.0),
                     ("two_stage", "3", "two_stage[depth=3,lr_scale=0.1]", 1e-3, 0.85, im, 900.0),
                     ("full", None, "full", 1e-3, 0.0975, {"p_precise_bn": 0}, 190.0),
                     ("full", None, "full", 1e-3, 0.74, {"p_precise_bn": 320}, 190.0)]
            for strategy, depth, label, lr, acc, extra, ips in cells:
                rid = f"{fw}-{label}-{lr}-{extra}-{seed}"
                rows.append(_row(fw, strategy, seed, acc, depth=depth, ips=ips,
                                 **{"p_strategy_label": label, "p_lr": lr, "run_id": rid,
                                    "spec_hash": rid, **extra}))
    return pd.DataFrame(rows)


def _visible(fig):
    return [ax for ax in fig.axes if ax.get_visible()]


def test_accuracy_vs_depth_one_panel_per_backbone_and_weights():
    df = _default_like_frame()
    (panel,) = figures.depth_panels(df)["digits"]  # not one per lr or precise_bn
    assert panel.title == "backbone=mobilenet_v2, weights=imagenet"
    series = {s.label: s for s in panel.series}
    assert set(series) == {f"{fw} {name}" for fw in ("torch", "keras") for name in (
        "feature_extraction/partial[bn=frozen] lr=0.001", "full[bn=frozen] lr=0.0001",
        "two_stage[lr_scale=0.1] lr=0.001")}
    line = series["torch feature_extraction/partial[bn=frozen] lr=0.001"]
    assert line.x == [0, 3] and line.y[1] == pytest.approx(0.86)
    assert line.err[0] == pytest.approx(scipy_stats.t.ppf(0.975, 1) * 0.01)  # 0.69, 0.71
    assert series["keras full[bn=frozen] lr=0.0001"].x == [9]
    assert series["torch two_stage[lr_scale=0.1] lr=0.001"].kind == "two_stage"
    assert [r.label for r in panel.references] == [
        "from scratch: full, precise_bn=0 (torch, keras) 0.098",
        "from scratch: full, precise_bn=320 (torch, keras) 0.740"]

    fig = figures.depth_figures(df)["digits"]
    (ax,) = _visible(fig)
    assert ax.get_title() == panel.title
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert set(legend) == set(series) | {r.label for r in panel.references}
    refs = [ln for ln in ax.get_lines() if ln.get_label().startswith("from scratch")]
    assert len(refs) == 2 and all(len(set(ln.get_ydata())) == 1 for ln in refs)  # level
    lo, hi = ax.get_ylim()  # the reference at chance and the interval of 0.69/0.71 inside
    assert 0 <= lo < 0.0975 - 0.01 and 0.92 < hi <= 1


def test_accuracy_vs_depth_shares_a_sensible_y_range_and_scratch_only_gets_a_panel():
    df = _default_like_frame()
    scratch = df[df["p_weights"] == "none"]
    scratch = scratch[scratch["p_precise_bn"] == 0]  # every cell at 0.0975: no zoom
    (panel,) = figures.depth_panels(scratch)["digits"]
    assert panel.title == "backbone=mobilenet_v2, weights=none" and not panel.references
    assert [s.label for s in panel.series] == ["torch full", "keras full"]
    (ax,) = _visible(figures.depth_figures(scratch)["digits"])
    lo, hi = ax.get_ylim()
    assert hi - lo >= 0.1 and lo <= 0.0975 <= hi and lo >= 0
    other = df[df["p_weights"] == "imagenet"].assign(p_weights="pretrained:mnist_a",
                                                     test_acc=0.3)
    other["run_id"] = other["run_id"] + "-a"
    two = pd.concat([df, other], ignore_index=True)
    panels = figures.depth_panels(two)["digits"]
    assert [p.weights for p in panels] == ["imagenet", "pretrained:mnist_a"]
    assert all(len(p.references) == 2 for p in panels)  # scratch in each, no panel of its own
    axes = _visible(figures.depth_figures(two)["digits"])
    assert len(axes) == 2 and axes[0].get_ylim() == axes[1].get_ylim()
    lo, hi = axes[0].get_ylim()
    assert lo < 0.0975 and hi > 0.92


def test_y_limits_pad_clip_and_never_zoom():
    assert plot.y_limits([0.0975, 0.0975 + 3e-9]) == (0.0, 0.2)  # no float-noise zoom
    assert plot.y_limits([0.99, 1.0]) == (0.8, 1.0)
    lo, hi = plot.y_limits([-0.2, 0.47])  # an interval past 0 is clipped, not shifted
    assert lo == 0 and hi == pytest.approx(0.47 + 0.08 * 0.67)
    assert plot.y_limits([]) == (0.0, 1.0)


def test_pareto_and_curves_label_series_by_the_params_that_vary():
    df = _default_like_frame()
    pts, x = figures.pareto_points(df)
    fig = figures.pareto_figure(pts, "digits", figures.SPEEDS[x])
    ax = fig.axes[0]
    assert ax.get_title().startswith("dataset=digits:")
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"torch", "keras", "Pareto front", "full weights=none lr=0.001 precise_bn=320",
            "full[bn=frozen] weights=imagenet lr=0.0001 precise_bn=0"} <= set(labels)
    assert ax.get_ylim()[1] - ax.get_ylim()[0] >= 0.1
    hist = pd.DataFrame([{"run_id": r, "key": k, "step": e, "value": 0.3 + 0.02 * i}
                         for i, r in enumerate(df["run_id"]) for k in ("train_acc", "val_acc")
                         for e in (1, 2)])  # no line on another: labels as they are
    data = report_frame.ReportData(df, hist, "x", "0")
    fig = curves.curve_figures(data)["digits"]
    assert fig.get_suptitle().startswith("backbone=mobilenet_v2, dataset=digits")
    left, right = _visible(fig)
    assert left.get_ylim() == right.get_ylim()
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert len(legend) == len(set(legend)) == 8  # colour: 6 configurations; line: 2 frameworks
    assert {"full weights=none lr=0.001 precise_bn=320", "torch", "keras"} <= set(legend)
    assert len(left.get_lines()) == 12  # a line per configuration and framework


def _lines_on_lines(ax) -> list[tuple]:
    """(beneath, on top) for every pair of an axes' lines with the same points."""
    lines = [ln for ln in ax.get_lines() if len(ln.get_xdata())]
    return [(a, b) for i, a in enumerate(lines) for b in lines[i + 1:]
            if list(a.get_xdata()) == list(b.get_xdata())
            and np.allclose(a.get_ydata(), b.get_ydata(), atol=1e-3)]


@pytest.mark.timeout(60)
def test_a_learning_curve_on_another_stays_visible_and_says_same_as():
    df = _default_like_frame()
    # precise_bn recalibrates for evaluation only: from scratch, its train curve is the
    # precise_bn=0 one to the last digit, its val curve is not
    train = {0: [0.2, 0.4, 0.6], 320: [0.2, 0.4, 0.6]}
    rows = []
    for _, r in df.iterrows():
        for e in (1, 2, 3):
            bn = r["p_precise_bn"] if r["p_weights"] == "none" else None
            acc = train[bn][e - 1] if bn is not None else r["test_acc"] - 0.05 * (3 - e)
            acc += 0.03 * (r["p_framework"] == "keras")
            val = acc - 0.1 if bn == 0 else acc
            rows += [{"run_id": r["run_id"], "key": "train_acc", "step": e, "value": acc},
                     {"run_id": r["run_id"], "key": "val_acc", "step": e, "value": val}]
    data = report_frame.ReportData(df, pd.DataFrame(rows), "x", "0")
    left, right = _visible(curves.curve_figures(data)["digits"])
    pairs = _lines_on_lines(left)
    assert len(pairs) == 2  # from scratch, precise_bn 0 and 320: torch, keras
    for beneath, top in pairs:  # the one on top is a ring around the one beneath
        assert top.get_markerfacecolor() == "none"
        assert top.get_markersize() > beneath.get_markersize()
        assert top.get_zorder() > beneath.get_zorder()
        assert top.get_linewidth() < beneath.get_linewidth()  # beneath: both edges show
    assert not _lines_on_lines(right)
    legend = [t.get_text() for t in left.figure.legends[0].get_texts()]
    scratch = "full weights=none lr=0.001 precise_bn="
    assert f"{scratch}320 (train: same as {scratch}0)" in legend
    assert f"{scratch}0" in legend  # the line beneath: its own label


@pytest.mark.timeout(60)
def test_from_scratch_references_at_one_value_are_one_line_naming_both():
    df = _default_like_frame()
    df.loc[(df["p_framework"] == "keras") & (df["p_precise_bn"] == 320)
           & (df["p_weights"] == "none"), "test_acc"] = 0.73
    (panel,) = figures.depth_panels(df)["digits"]
    assert [r.label for r in panel.references] == [
        "from scratch: full, precise_bn=0 (torch, keras) 0.098",
        "from scratch: full, precise_bn=320 (torch) 0.740",
        "from scratch: full, precise_bn=320 (keras) 0.730"]
    (ax,) = _visible(figures.depth_figures(df)["digits"])
    refs = [ln for ln in ax.get_lines() if ln.get_label().startswith("from scratch")]
    levels = [ln.get_ydata()[0] for ln in refs]
    assert len(levels) == len(set(levels)) == 3  # no line drawn on another
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "from scratch: full, precise_bn=0 (torch, keras) 0.098" in legend
    # 0.097 and 0.100: 3 px apart on a panel, one line naming each value
    df.loc[(df["p_framework"] == "keras") & (df["p_precise_bn"] == 0)
           & (df["p_weights"] == "none"), "test_acc"] = 0.1
    (panel,) = figures.depth_panels(df)["digits"]
    assert panel.references[0].label == \
        "from scratch: full, precise_bn=0 (torch 0.098, keras 0.100)"
    assert panel.references[0].y[0] == pytest.approx((0.0975 + 0.1) / 2)


def _diverged_frame() -> pd.DataFrame:
    rows = [_recorded("torch", "full", 0, 0.10, 100.0,
                      t_diverged="true: final train loss 2.4 above the first epoch's 2.3"),
            _recorded("torch", "feature_extraction", 0, 0.80, 400.0),
            _recorded("keras", "full", 0, 0.86, 50.0),
            _recorded("keras", "feature_extraction", 0, status="FAILED", acc=None, ips=None,
                      error="ChildDied: the cell's process ended\nlog tail: epoch 3\n"
                            "FloatingPointError: diverged at epoch 3, step 17: train loss nan")]
    return pd.DataFrame(rows)


def test_accuracy_tables_mark_a_diverged_cell_and_failures_stay_readable():
    df = _diverged_frame()
    acc = tables.accuracy_table(df)
    shown = acc.display.set_index("strategy")
    assert shown.loc["full", "test_acc (torch)"] == "0.100 (n=1) ‡"
    assert shown.loc["full", "test_acc (keras)"] == "0.860 (n=1)"
    assert shown.loc["feature_extraction", "test_acc (keras)"] == "FAILED (diverged)"
    num = acc.numeric.set_index(["p_strategy_label", "framework"])
    assert num.loc[("full", "torch"), "mean"] == pytest.approx(0.1)  # numeric, no mark
    assert num.loc[("full", "torch"), "diverged"] == 1
    note = ("‡ diverged: final train loss above the first epoch's or over 10x the chance "
            "level (1 cell).")
    assert note in acc.markdown() and note in tables.compact(df)
    assert r"0.100 (n=1) $^{\ddagger}$" in acc.latex() and "‡" not in acc.latex()
    best = compare.best_strategy_table(df).display.set_index("framework")
    # a diverged strategy is never a best or a runner-up: it is listed aside (issue 27)
    assert best.loc["torch", "best"] == "feature_extraction (0.800)"
    assert best.loc["torch", "runner-up"] == "—"
    assert best.loc["torch", "not compared"] == "full (diverged ‡)"
    delta = compare.framework_delta_table(df).display.set_index("strategy")
    assert delta.loc["full", "test_acc torch"] == "0.100 (n=1) ‡"
    assert tables.failures(df) == [
        "FAILED: keras/mobilenet_v2/feature_extraction/digits/seed0  diverged at epoch 3, "
        "step 17: train loss nan"]
    text = report_text.methods(_data(df))
    assert "1 of 3 finished cells diverged (final train loss above the first epoch's or over " \
           "10x the chance level; ‡ in the accuracy tables); 1 cell failed on a NaN/inf loss " \
           "(listed below)." in text


@pytest.mark.timeout(30)
def test_relative_and_framework_delta_compare_no_diverged_cell():
    df = _diverged_frame()  # torch full diverged (0.10); keras feature extraction failed
    df = pd.concat([df, pd.DataFrame([
        _recorded("torch", "partial", 0, 0.84, 200.0, depth=2),
        _recorded("keras", "partial", 0, 0.70, 90.0, depth=2,
                  t_diverged="true: final train loss 40 over 10x the chance level"),
        _recorded("keras", "feature_extraction", 1, 0.78, 300.0)])], ignore_index=True)
    delta = compare.framework_delta_table(df)
    shown = delta.display.set_index("strategy")
    assert shown.loc["full", "torch − keras"] == "torch diverged: not compared ‡"
    assert shown.loc["partial[depth=2]", "torch − keras"] == "keras diverged: not compared ‡"
    assert shown.loc["full", "paired over seeds"] == ""
    assert shown.loc["feature_extraction", "torch − keras"] == "+0.020"  # neither diverged
    num = delta.numeric.set_index("p_strategy_label")
    assert not num.loc["full", "compared"] and num.loc["feature_extraction", "compared"]
    assert "A group with a diverged cell (‡) is not compared." in delta.markdown()
    rel = compare.relative_table(df)
    shown = rel.display.set_index("strategy")
    # torch: the baseline diverged, so no strategy is compared with it
    assert shown.loc["feature_extraction", "test_acc − full (torch)"] == \
        "full diverged: not compared ‡"
    assert shown.loc["partial[depth=2]", "test_acc − full (torch)"] == \
        "full diverged: not compared ‡"
    # keras: full finished; partial diverged, feature extraction did not
    assert shown.loc["partial[depth=2]", "test_acc − full (keras)"] == \
        "partial[depth=2] diverged: not compared ‡"
    assert shown.loc["feature_extraction", "test_acc − full (keras)"] == "no pair"
    num = rel.numeric.set_index(["strategy", "framework"])
    assert not num.loc[("partial[depth=2]", "keras"), "compared"]
    assert num.loc[("feature_extraction", "keras"), "compared"]


def test_framework_delta_marks_a_contended_speed_ratio():
    t = compare.framework_delta_table(_contended_frame())
    shown = t.display.set_index("strategy")
    assert shown.loc["full", "train speed torch/keras"] == "2.00× †"
    assert shown.loc["feature_extraction", "train speed torch/keras"] == "1.33×"
    num = t.numeric.set_index("p_strategy_label")
    assert num.loc["full", "train_speed_ratio"] == pytest.approx(2.0)
    assert num.loc["full", "speed_contended"] == 1
    assert "A marked speed ratio is no torch/keras difference: one side or both were " \
           "timed on a shared machine." in t.markdown()


HEAD_ONLY = "head only (cached features)"


def _cached_frame() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Feature extraction timed on cached features (its step: the head alone) beside full
    fine-tuning, 320 train images, 2 epochs each; and the epochs' history."""
    rows, hist = [], []
    for fw, scale in (("torch", 1.0), ("keras", 2.0)):
        for strategy, ips, epoch_s, cache_s, rate_of, cache in (
                ("feature_extraction", 40000.0, 0.05, 5.0, HEAD_ONLY, "features"),
                ("full", 150.0, 2.0, 0.0, "whole model", "off: every block trains")):
            r = _recorded(fw, strategy, 0, 0.8, ips * scale, epochs_trained=2.0,
                          epoch_seconds=epoch_s / scale, feature_cache_seconds=cache_s,
                          epoch_train_images_per_sec=320 * scale / epoch_s,
                          model_only_train_images_per_sec=ips * 1.5,
                          inference_images_per_sec=900.0, t_train_rate_of=rate_of,
                          t_feature_cache_used=cache)
            rows.append(r)
            hist += [{"run_id": r["run_id"], "key": "epoch_seconds", "step": e,
                      "value": epoch_s / scale} for e in (1, 2)]
    return pd.DataFrame(rows), pd.DataFrame(hist)


@pytest.mark.timeout(30)
def test_throughput_compares_end_to_end_and_marks_a_head_only_step_rate():
    df, hist = _cached_frame()
    df = report_frame.add_derived(df, hist)
    e2e = df.set_index(["p_strategy", "p_framework"])["end_to_end_images_per_sec"]
    # feature extraction: 2 epochs x 320 images over 2 x 0.05 s of head + 5 s of caching
    assert e2e[("feature_extraction", "torch")] == pytest.approx(640 / 5.1)
    assert e2e[("full", "torch")] == pytest.approx(640 / 4.0)
    t = tables.throughput_table(df)
    shown = t.display.set_index(["strategy", "framework"])
    assert shown.loc[("feature_extraction", "torch"), "end-to-end img/s"] == "125"
    assert shown.loc[("feature_extraction", "torch"), "speed-up vs full"] == "0.78×"
    assert shown.loc[("feature_extraction", "torch"), "step img/s"] == "40,000 §"
    assert shown.loc[("feature_extraction", "torch"), "model-only img/s"] == "60,000 §"
    assert shown.loc[("full", "torch"), "step img/s"] == "150"  # the whole model: no mark
    num = t.numeric.set_index(["p_strategy_label", "framework"])
    assert num.loc[("feature_extraction", "torch"), "speedup_vs_full"] == pytest.approx(40000 / 150)
    assert num.loc[("feature_extraction", "torch"), "part_rate"] == 1
    assert ("§ step and model-only rates of the part that trains above a feature cache, not "
            "of the whole model (2 cells; tag tlbench.train_rate_of: head only (cached "
            "features))") in t.markdown()
    assert r"40,000 $^{\S}$" in t.latex()
    # the Pareto figure's x: end-to-end, never the head's rate
    pts, x = figures.pareto_points(df)
    assert x == "end_to_end_images_per_sec"
    speed = pts.set_index(["p_strategy_label", "framework"])["speed"]
    assert speed[("feature_extraction", "torch")] == pytest.approx(640 / 5.1)
    fig = figures.pareto_figure(pts, "digits", figures.SPEEDS[x])
    assert fig.axes[0].get_xlabel().startswith("end-to-end train images/s")
    fig.canvas.draw()  # tick labels as a reader sees them: plain numbers, no 2x10^2
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels(minor=True)
             + fig.axes[0].get_xticklabels()]
    assert any(ticks) and all(re.fullmatch(r"[\d,]*", t) for t in ticks), ticks
    assert max(c.get_offsets()[:, 0].max() for c in fig.axes[0].collections
               if len(c.get_offsets())) < 1000
    # runs without an epoch history: a step rate, and only where it times the whole model
    pts, x = figures.pareto_points(_cached_frame()[0])
    assert x == "train_images_per_sec" and set(pts["p_strategy_label"]) == {"full"}
    # torch/keras speed: end to end (keras caches as slowly, its head runs twice as fast)
    delta = compare.framework_delta_table(df).display.set_index("strategy")
    assert delta.loc["feature_extraction", "train speed torch/keras"] == \
        f"{(640 / 5.1) / (640 / 5.05):.2f}×"
    old = compare.framework_delta_table(_cached_frame()[0])
    assert old.display.set_index("strategy").loc[
        "feature_extraction", "train speed torch/keras"] == "0.50× §"
    assert "§ step and model-only rates of the part" in old.markdown()
    # a group with no finished cell, its tags in pandas' string dtype: a count, never ''
    failed = pd.DataFrame({"status": ["FAILED"], "t_train_rate_of": [HEAD_ONLY]}, dtype="string")
    assert report_frame.part_rate_cells(failed) == 0


class _Tables(HTMLParser):
    """The tables of an HTML page: their rows of cell texts, and whether each sits in a
    box that scrolls (a div of class table-scroll); the links and the page's CSS."""

    def __init__(self):
        super().__init__()
        self.tables, self.links, self.style, self._divs = [], [], "", []
        self._cell = self._in_style = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "div":
            self._divs.append(a.get("class", ""))
        elif tag == "table":
            self.tables.append({"scroll": "table-scroll" in self._divs, "rows": []})
        elif tag == "tr":
            self.tables[-1]["rows"].append([])
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "a":
            self.links.append([a.get("href"), ""])
        self._in_style = tag == "style"

    def handle_endtag(self, tag):
        if tag == "div":
            self._divs.pop()
        elif tag in ("td", "th"):
            self.tables[-1]["rows"][-1].append(self._cell)
            self._cell = None
        self._in_style = False

    def handle_data(self, data):
        if self._in_style:
            self.style += data
        if self._cell is not None:
            self._cell += data
        if self.links and self.links[-1][1] == "":
            self.links[-1][1] = data


def _min_width_px(rows: list[list[str]], px_per_char: int = 8, pad_px: int = 20) -> int:
    """A table's narrowest width in a browser: each column as wide as its longest word."""
    widths = [max(len(w) for w in (cell.split() or [""])) for cell in rows[0]]
    for row in rows[1:]:
        widths = [max(w, *(len(x) for x in (c.split() or [""])))
                  for w, c in zip(widths, row, strict=True)]
    return sum(w * px_per_char + pad_px for w in widths)


def _default_like_report(tmp_path) -> _Tables:
    """report.html of the default grid's shape with the tags the cells write."""
    df = _default_like_frame().assign(p_backbone="efficientnet_lite0")
    fe = df["p_strategy"] == "feature_extraction"
    df["t_train_rate_of"] = np.where(fe, HEAD_ONLY, "whole model")
    df["t_input_bound"] = "false (arrays resident)"
    df["t_feature_cache_used"] = np.where(
        fe, "features", "head=features; finetune=off: the bottom 6 blocks' output not cached: "
        "torch.fx cannot trace efficientnet_lite0 (TraceError: symbolically traced "
        "variables cannot be used as inputs to control flow)")
    for col in ("model_only_train_images_per_sec", "inference_images_per_sec",
                "end_to_end_images_per_sec"):
        df[col] = df["train_images_per_sec"] * 1.07
    data = report_frame.ReportData(df, report_frame.empty_history(), "default", "0")
    build.write(data, tmp_path, {}, log=False)  # runs.csv, tables/, report.md, report.html
    page = _Tables()
    page.feed((tmp_path / "report.html").read_text())
    return page


@pytest.mark.timeout(60)
def test_report_html_tables_fit_a_1600_px_page_or_scroll(tmp_path):
    page = _default_like_report(tmp_path)
    body = int(re.search(r"body\{[^}]*max-width:(\d+)px", page.style).group(1))
    assert body <= 1600 - 2 * 32  # the page, its margins and a scroll bar
    assert re.search(r"\.table-scroll\{[^}]*overflow-x:auto", page.style)
    assert page.tables and all(t["scroll"] for t in page.tables)  # never cut off
    # each fits without scrolling: the rates apart from the long tags (timing)
    assert any(t["rows"][0][-1] == "inference img/s" for t in page.tables)
    assert all(_min_width_px(t["rows"]) <= body - 32 for t in page.tables)


@pytest.mark.timeout(60)
def test_report_html_links_its_files_relatively_and_says_where_they_work(tmp_path):
    page = _default_like_report(tmp_path)
    links = dict(page.links)
    for name in ("accuracy", "throughput", "timing"):
        for ext in ("md", "tex", "csv"):
            assert links[f"tables/{name}.{ext}"] == f"{name}.{ext}"
    for href in links:  # relative: they resolve beside the page, on disk or downloaded
        assert not re.match(r"[a-z]+:|/", href) and (tmp_path / href).is_file(), href
    assert links["runs.csv"] == "runs.csv"
    text = re.sub(r"<[^>]+>", "", (tmp_path / "report.html").read_text())
    assert "Files (in tables/ beside this report): throughput.md, throughput.tex, " \
        "throughput.csv" in text
    assert "in this run's artifacts" not in text
    note = ("Links to files (tables/, runs.csv) open the files beside this page: in its "
            "folder on disk{}. In the MLflow UI's artifact view they open nothing (the page "
            "is shown there without a folder around it): pick the same path in the run's "
            "artifact list.")
    assert note.format("") in text
    logged = re.sub(r"<[^>]+>", "", html.render("# R\n\n[a](runs.csv)\n", tmp_path, "R",
                                                 run_id="abc123"))
    assert note.format(" or in a copy of the MLflow run's artifacts (mlflow artifacts "
                       "download -r abc123)") in logged


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
    data = report_frame.load(result.experiment_id, result.parent_run_id)
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
    acc = tables.accuracy_table(data.frame).numeric.set_index(["p_strategy_label", "p_weights"])
    thr = tables.throughput_table(data.frame).numeric.set_index(
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
    data = report_frame.load(result.experiment_id, result.parent_run_id, history=False)
    bad = grid_store["bad"]
    acc = tables.accuracy_table(data.frame).display.set_index("weights")
    assert acc.loc[bad, "test_acc (torch)"] == "2 FAILED"
    for t in tables.all_tables(data.frame)[1:3]:
        assert "2 FAILED" in t.display.set_index("weights").loc[bad].to_string(), t.name
    best = compare.best_strategy_table(data.frame).display.set_index("weights")
    assert best.loc[bad, "best"] == "none finished"
    assert best.loc[bad, "not compared"] == "full (2 FAILED)"
    fails = tables.failures(data.frame)
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
    # every relative link and figure of report.md names an artifact the parent run holds
    targets = re.findall(r"\]\(([^)#:]+)\)", md)
    assert "tables/accuracy.csv" in targets and "runs.csv" in targets
    for target in targets:
        folder_part, _, name = target.rpartition("/")
        assert name in {a.path.rpartition("/")[2]
                        for a in c.list_artifacts(result.parent_run_id, folder_part or None)
                        }, target
    # report.html: the same report with its figures inline, for the UI's artifact view
    page = (folder / "report.html").read_text()
    assert "report.html" in arts and page.count('src="data:image/png;base64,') == \
        md.count("![")
    assert "<table>" in page and "6 cells of the 6 the grid expects" in page
    assert '<a href="tables/accuracy.csv">accuracy.csv</a>' in page  # beside it
    assert f"mlflow artifacts download -r {result.parent_run_id}" in page


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
    data = report_frame.load(exp_id, parent, history=False)
    status = data.cells.set_index("name")["status"]
    assert len(status) == 10
    assert status[running.name] == "RUNNING"
    assert (status == "MISSING").sum() == 5  # partial seed 1, two_stage x2, broken x2
    assert (status == "FINISHED").sum() == 4  # from the first invocation
    acc = tables.accuracy_table(data.frame).display.set_index(["weights", "strategy"])
    assert acc.loc[("none", "partial[depth=1]"), "test_acc (torch)"] == "1 MISSING, 1 RUNNING"
    assert acc.loc[("none", "two_stage[depth=1]"), "test_acc (torch)"] == "2 MISSING"
    md = (tmp / "partial" / "rep" / "report.md").read_text()
    assert "4 of 10 cells finished; 5 MISSING, 1 RUNNING" in md
    assert f"RUNNING: {running.name}" in md
    assert "seeds 0, 1" in md and "subset 40," in md
    broken = [f for f in tables.failures(data.frame) if f.startswith("MISSING")
              and "broken.pt" in f]  # failed in the first invocation, not yet rerun
    assert len(broken) == 2
    assert all("latest earlier run" in f and f.endswith("FAILED") for f in broken)
    assert "## Pretraining runs" in md and "pretrain resnet18 on mnist5k" in md
    assert "mnist5k" not in (tmp / "partial" / "rep" / "tables" / "accuracy.md").read_text()
    tracking.end_run(parent, "KILLED")


def test_relative_to_full_is_paired_over_seeds_with_standard_errors(handmade):
    t = compare.relative_table(handmade)
    rel = t.numeric.set_index(["strategy", "framework"])
    d = np.array([0.80, 0.75, 0.80]) - np.array([0.90, 0.80, 0.85])
    fe = rel.loc[("feature_extraction", "torch")]
    assert fe["mean_diff"] == pytest.approx(d.mean()) and fe["pairs"] == 3
    assert fe["se"] == pytest.approx(d.std(ddof=1) / np.sqrt(3))
    assert fe["p_value"] == pytest.approx(scipy_stats.ttest_rel([0.80, 0.75, 0.80],
                                                          [0.90, 0.80, 0.85]).pvalue)
    assert rel.loc[("feature_extraction", "keras"), "pairs"] == 0  # none finished
    assert rel.loc[("partial[depth=2]", "torch"), "pairs"] == 0  # still running
    md = t.markdown()
    assert f"{d.mean():+.3f} ± {d.std(ddof=1) / np.sqrt(3):.3f} (p=" in md and "n=3)" in md
    assert "no pair" in md and "full" not in set(t.cells["strategy"])
    assert [x.name for x in tables.all_tables(handmade)][-1] == "relative"
    # the source model before any step (head_init = source), paired with full's seeds
    src = handmade.copy()
    full_torch = (src["p_strategy_label"] == "full") & (src["p_framework"] == "torch") & \
        (src["role"] == "cell")
    src.loc[full_torch, "source_test_acc"] = [0.30, 0.20, 0.40]
    rel = compare.relative_table(src)
    none = rel.numeric.set_index(["strategy", "framework"]).loc[
        (compare.NO_ADAPTATION, "torch")]
    assert none["mean_diff"] == pytest.approx(np.mean([0.30 - 0.90, 0.20 - 0.80, 0.40 - 0.85]))
    assert list(rel.cells["strategy"])[0] == compare.NO_ADAPTATION
    assert "No adaptation:" in rel.note and "No adaptation:" not in t.note  # only when shown
    assert (compare.NO_ADAPTATION, "keras") not in rel.numeric.set_index(
        ["strategy", "framework"]).index  # no source score recorded there
    # without the baseline in the grid there is nothing to be relative to: no table
    no_full = handmade[handmade["p_strategy_label"] != "full"]
    assert compare.relative_table(no_full).cells.empty
    assert "relative" not in [x.name for x in tables.all_tables(no_full)]


def test_card_digests_group_only_when_one_dataset_has_several():
    rows = [_row("torch", "full", s, 0.9, p_dataset=ds, p_card_digests=f"{ds}={ds[:1] * 12}")
            for ds in ("clean", "noisy") for s in range(2)]
    assert "p_card_digests" not in report_frame.group_keys(pd.DataFrame(rows))  # follows dataset
    rows.append(_row("torch", "full", 2, 0.5, p_dataset="noisy",
                     p_card_digests="noisy=edited00000"))  # the card edited later
    df = pd.DataFrame(rows)
    assert "p_card_digests" in report_frame.group_keys(df)
    noisy = tables.accuracy_table(df).numeric.query("p_dataset == 'noisy'")
    assert sorted(noisy["n"]) == [1, 2]  # never averaged with the old card's cells


def test_named_block_sets_read_from_the_input_side_to_the_output_side():
    sets = ["top_conv", "stem+stage1", "stage7+top_conv", "stem"]
    rows = [_row("torch", "blocks", 0, 0.5, **{"p_strategy.names": n,
                                               "p_strategy_label": f"blocks[names={n}]"})
            for n in sets]
    shown = list(tables.accuracy_table(pd.DataFrame(rows)).cells["strategy"])
    assert shown == [f"blocks[names={n}]" for n in
                     ("stem", "stem+stage1", "stage7+top_conv", "top_conv")]


def test_a_swept_lr_is_chosen_per_strategy_on_validation_never_on_test():
    """A grid that runs each strategy at two learning rates without [tune]: the best-strategy
    table compares strategies, each at the rate with the better validation accuracy (named),
    and reports that rate's test accuracy; test accuracy never picks the rate."""
    rows = []
    for seed in (0, 1):
        # partial: lr 1e-3 validates better; lr 1e-2 tests better (a trap for test-choosing)
        rows += [_row("torch", "partial", seed, 0.80, p_lr=1e-3, val_acc=0.9),
                 _row("torch", "partial", seed, 0.95, p_lr=1e-2, val_acc=0.5),
                 _row("torch", "full", seed, 0.85, p_lr=1e-4, val_acc=0.8)]
    for r in rows:  # distinct cells per rate
        r["spec_hash"] += str(r["p_lr"])
        r["run_id"] += str(r["p_lr"])
    t = compare.best_strategy_table(pd.DataFrame(rows))
    (row,) = t.numeric.to_dict("records")  # one comparison, not one row per rate
    assert row["best"] == "full (lr=0.0001)" and row["best_mean"] == pytest.approx(0.85)
    assert row["runner_up"] == "partial (lr=0.001)"
    assert row["runner_up_mean"] == pytest.approx(0.80)
    assert "best mean validation accuracy" in t.markdown()


@pytest.mark.timeout(30)
def test_throughput_marks_a_data_fed_rate_above_model_only():
    """Issue 25: a cell tagged tlbench.rate_check 'suspect: ...' (its data-fed rate above
    its model-only one) has both step rates marked ¶ with a footnote; a cell checked ok
    has no mark."""
    df, hist = _cached_frame()
    df["t_rate_check"] = "ok"
    odd = (df["p_strategy"] == "full") & (df["p_framework"] == "keras")
    df.loc[odd, "t_rate_check"] = "suspect: the data-fed rate 300 images/s is 1.33x the " \
                                  "model-only rate 225"
    t = tables.throughput_table(report_frame.add_derived(df, hist))
    shown = t.display.set_index(["strategy", "framework"])
    assert shown.loc[("full", "keras"), "step img/s"].endswith(" ¶")
    assert shown.loc[("full", "keras"), "model-only img/s"].endswith(" ¶")
    assert "¶" not in shown.loc[("full", "keras"), "end-to-end img/s"]  # not a step rate
    assert "¶" not in shown.loc[("full", "torch"), "step img/s"]
    assert t.numeric.set_index(["p_strategy_label", "framework"]).loc[
        ("full", "keras"), "rate_suspect"] == 1
    assert "¶ data-fed step rate above the model-only rate (1 cell; tag " \
           "tlbench.rate_check)" in t.markdown()
    assert r"$^{\P}$" in t.latex()
