"""A tuned grid in the report (bench/run/tune.py made it): the trial cells are the search,
never results; the final cells are each strategy at its chosen setting.

    (frame.tuned_view makes the finals comparable cells: each strategy under one label
    whatever setting it chose, so the accuracy, best-strategy, relative and framework-delta
    tables compare strategies at their best, never settings by test accuracy)
    tuned_table    per strategy: the chosen setting, its validation score, its test accuracy
                   over the final seeds (mean ± 95% interval), the search's cost
    sensitivity    the figure: validation accuracy against lr per strategy, frameworks on
                   shared axes (why tuning matters)

Nothing here reads a trial's test metric.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from bench.report.frame import TRIAL
from bench.report.stats import summarize
from bench.report.table import SUMMARY, Table, cell_frames, header

STUDY_KEYS = ("p_dataset", "p_backbone", "p_weights", "p_strategy_label", "p_framework")


def trials_only(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["role"] == TRIAL] if "role" in df else df.iloc[0:0]


def tuned_table(df: pd.DataFrame) -> Table | None:
    """Per study (dataset x backbone x weights x strategy x framework): the chosen setting,
    the validation score that chose it, test accuracy over the final seeds, the search's
    trials (finished / pruned / failed) and cost. None for a grid without [tune]."""
    finals = df[(df.get("role") == "final") & df.get("t_tune_study").notna()] \
        if "t_tune_study" in df else df.iloc[0:0]
    if finals.empty:
        return None
    trials = trials_only(df)
    numeric, shown = [], []
    for key, rows in finals.groupby(list(STUDY_KEYS), sort=False, dropna=False):
        study = rows["t_tune_study"].iloc[0]
        mine = trials[trials.get("t_tune_study") == study] if "t_tune_study" in trials \
            else trials.iloc[0:0]
        test = summarize(rows.loc[rows["status"] == "FINISHED", "test_acc"].tolist())
        states = mine["t_trial_state"].fillna("finished") if "t_trial_state" in mine \
            else pd.Series("finished", index=mine.index)
        states = states.where(mine["status"] == "FINISHED", mine["status"].str.lower())
        r = {**dict(zip(STUDY_KEYS, key, strict=True)), "chosen": rows["chosen"].iloc[0],
             "val": float(rows["t_tune_value"].iloc[0]), "metric": rows["t_tune_metric"].iloc[0],
             "test_mean": test["mean"], "test_ci": test.get("ci", math.nan), "seeds": test["n"],
             "trials": len(mine), "pruned": int((states == "pruned").sum()),
             "failed": int(states.isin(["failed", "killed"]).sum()),
             "trial_epochs": float(mine.get("epochs_trained", pd.Series(dtype=float)).sum()),
             "trial_seconds": float(mine.get("cell_seconds", pd.Series(dtype=float)).sum())}
        numeric.append(r)
        shown.append({**{header(k): v for k, v in zip(STUDY_KEYS, key, strict=True)},
                      "chosen": r["chosen"], f"{r['metric']} (chose)": f"{r['val']:.3f}",
                      "test_acc": test, "trials": _trials_phrase(r),
                      "trial epochs": f"{r['trial_epochs']:.0f}",
                      "trial time": f"{r['trial_seconds'] / 60:.1f} min"})
    cells, marks, notes = cell_frames(shown)
    return Table("tuned", "Tuned: each strategy at its chosen setting", pd.DataFrame(numeric),
                 cells, {"test_acc": SUMMARY},
                 "Each strategy got the same search (the grid's [tune] table); the setting "
                 "with the best validation score was re-run over the final seeds and tested. "
                 "test_acc: mean ± std [95% t-interval] n over the final seeds. No trial's "
                 "test accuracy chose anything.", [_budget_footnote(numeric)], marks, notes)


def _trials_phrase(r: dict) -> str:
    extra = [f"{r[k]} {k}" for k in ("pruned", "failed") if r[k]]
    return f"{r['trials']}" + (f" ({', '.join(extra)})" if extra else "")


def _budget_footnote(rows: list[dict]) -> str:
    """Equal budgets, said; any strategy whose search differs, named."""
    trials = {r["trials"] for r in rows}
    if len(trials) == 1:
        return f"Every strategy: {trials.pop()} trials."
    most = max(trials)
    short = [f"{r['p_strategy_label']} ({r['p_framework']}): {r['trials']}" for r in rows
             if r["trials"] != most]
    return f"Unequal budgets: {most} trials, except " + "; ".join(short) + "."


def sensitivity(df: pd.DataFrame, folder: Path) -> list[str]:
    """Validation accuracy against lr, a line per strategy, one panel per dataset x
    backbone x weights with both frameworks on its axes (PyTorch solid, Keras dashed)."""
    from bench.report import plot

    trials = trials_only(df)
    if trials.empty or "val_acc" not in trials or "p_lr" not in trials:
        return []
    trials = trials[trials["status"] == "FINISHED"].copy()
    trials["lr"] = trials["p_lr"].astype(float)
    trials["strategy"] = trials["p_strategy"].astype(str)
    panels = list(trials.groupby(["p_dataset", "p_backbone", "p_weights"], sort=False))
    fig, axes = plot.new_figure(len(panels))
    colors = plot.config_colors(sorted(trials["strategy"].unique()))
    for ax, (key, rows) in zip(axes, panels, strict=False):
        for (strategy, fw), line in rows.groupby(["strategy", "p_framework"], sort=False):
            line = line.groupby("lr")["val_acc"].max().sort_index()
            ax.plot(line.index, line.values, plot.FW_LINE.get(fw, "-"),
                    marker=plot.MARKERS.get(fw, "o"), color=colors[strategy],
                    label=f"{fw} {strategy}", alpha=0.85)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (trials)")
        ax.set_ylabel("validation accuracy")
        ax.set_title(" · ".join(str(k) for k in key), fontsize=9)
        ax.yaxis.get_major_formatter().set_useOffset(False)
        ax.legend(fontsize=7)
    return [plot.save(fig, folder, "sensitivity")]
