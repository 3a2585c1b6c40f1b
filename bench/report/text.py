"""The text of report.md: the generated methods paragraph and its sentences (budget, tested
weights, device kinds, determinism, machine sharing, divergence), the pretraining runs, and
the page that puts them above the tables and figures.

What the cells record about their own conditions is said, never hidden: "not recorded" for
runs older than a record."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd

from bench import tracking
from bench.report.frame import (
    CONTENDED,
    DIVERGED,
    PRETRAIN,
    ReportData,
    distinct_values,
    diverged_cells,
    finished_rows,
    status_labels,
    tag_recorded,
    tag_true,
)
from bench.report.table import Table, cells_phrase, fmt_number
from bench.report.tables import failures


def _versions(cells: pd.DataFrame) -> str:
    out = {}
    for text in cells.get("t_versions", pd.Series(dtype=object)).dropna().unique():
        try:
            out.update(json.loads(text))
        except (TypeError, ValueError):
            continue
    return ", ".join(f"{k} {v}" for k, v in sorted(out.items())) or "not recorded"


def methods(data: ReportData) -> str:
    """A short generated methods paragraph: grid, budget, tested weights, hardware and
    device kinds, versions, determinism, machine sharing, divergence, seeds, failures."""
    cells = data.cells
    p = data.parent or {}
    n = len(cells)
    if n == 0:
        return (f"No cell runs in the selection (experiment `{data.experiment}`"
                + (f", parent run `{p.get('run_id')}`" if p else "") + ").")
    status = cells["status"].value_counts()
    fin = int(status.get(tracking.FINISHED, 0))
    done = finished_rows(cells)

    def vals(col):
        return ", ".join(str(v) for v in distinct_values(cells.get(col))) or "—"

    grid = (f"Grid `{p.get('t_grid', data.experiment)}` ({p.get('t_grid_path', '?')}), "
            f"invocation `{p.get('run_name', '')}` (parent run `{p.get('run_id')}`, "
            f"{p.get('status', '?')})" if p else f"All cell runs of experiment "
            f"`{data.experiment}` (newest finished run per cell)")
    trials = int((data.frame["role"] == "trial").sum()) if "role" in data.frame else 0
    expected = (f" (final cells; {trials} trial cells were the search)" if trials else
                f" of the {data.expected} the grid expects" if data.expected else "")
    parts = [
        f"{grid}, git {p.get('t_git_commit') or vals('t_git_commit')}. "
        f"{n} cells{expected}: frameworks {vals('p_framework')}; backbones "
        f"{vals('p_backbone')}; weights {vals('p_weights')}; strategies "
        f"{vals('p_strategy_label')}; datasets {vals('p_dataset')} (subset "
        f"{vals('p_subset')}, 0 = all); seeds {vals('p_seed')}. Each cell runs at "
        f"{vals('p_image_size')} px, batch {vals('p_batch_size')}, {vals('p_optimizer')} lr "
        f"{vals('p_lr')}, precision {vals('p_precision')}, augmentation "
        f"{vals('p_augmentation')}.",
        budget_sentence(done), tested_weights_sentence(cells),
        f"Hardware: {vals('device')} (host {vals('t_host')}); {device_sentence(cells)} "
        f"Versions: {_versions(cells)}.",
        determinism_sentence(done), contention_sentence(done), divergence_sentence(cells),
        _tune_sentence(p),
        _test_split_sentence(cells),
        "Accuracy is top-1 on each cell's held-out test split; groups of seeds show mean, "
        "std and a 95% t-interval (n=1: the single value). Throughput compares cells end "
        "to end (the images their epochs trained over the seconds of training, feature "
        "caching and precise BatchNorm); a step rate is the median after warm-up with the "
        "device synchronised before each clock read, and times only the part above a "
        "feature cache where a cell cached one (§).",
    ]
    gaps = {s: int(c) for s, c in status.items() if s != tracking.FINISHED}
    if gaps:
        parts.append(f"{fin} of {n} cells finished; "
                     + ", ".join(f"{c} {s}" for s, c in sorted(gaps.items()))
                     + " (listed below and marked in every table).")
    else:
        parts.append(f"All {n} cells finished.")
    return " ".join(x for x in parts if x)


def _tune_sentence(parent: dict) -> str:
    """A tuned grid's protocol, as its parent run recorded it."""
    protocol = parent.get("t_tune_protocol")
    if not protocol:
        return ""
    return (f"Tuned comparison: {protocol}. The tables compare the final cells, each "
            f"strategy at its chosen setting; trial cells are the search and appear only in "
            f"the tuned table and the sensitivity figure. No test metric selected anything.")


def _test_split_sentence(cells: pd.DataFrame) -> str:
    """Cells whose card holds out no test split (split.test = "val", the seeds' protocol)."""
    tags = cells.get("t_test_split")
    if tags is None:
        return ""
    n = int(tags.fillna("").astype(str).str.startswith("val").sum())
    if not n:
        return ""
    return (f"{n} of {len(cells)} cells hold out no test split (their dataset card's "
            f"split.test = \"val\", as the seed recipes read their data): their test "
            f"accuracy is the validation part's, with no selection on it (select = \"last\").")


def _span(values) -> str:
    """'6' or '4–6' (whole numbers); '—' when nothing is recorded."""
    v = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").dropna()
    if v.empty:
        return "—"
    lo, hi = f"{v.min():.0f}", f"{v.max():.0f}"
    return lo if lo == hi else f"{lo}–{hi}"


def _unrecorded(part: int, whole: int) -> str:
    return f"not recorded for {whole - part} of {whole} finished cells" if part < whole else ""


def _paren(*items: str) -> str:
    """' (a; b)' of the items that say something, '' when none does."""
    said = [i for i in items if i]
    return f" ({'; '.join(said)})" if said else ""


def _whole(values) -> str:
    """'16, 32': the distinct values as whole numbers."""
    v = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").dropna()
    return ", ".join(f"{x:.0f}" for x in sorted(set(v))) or "—"


def _col(rows: pd.DataFrame, col: str) -> pd.Series:
    return rows[col] if col in rows else pd.Series(None, index=rows.index, dtype=object)


def budget_sentence(done: pd.DataFrame) -> str:
    """The epochs asked, the epochs and optimizer steps the finished cells really trained,
    and every cell that trained other than its budget."""
    if done.empty:
        return ""
    asked = _span(_col(done, "p_epochs"))
    rec = done[_col(done, "epochs_trained").notna()]
    if rec.empty:
        return (f"Budget: {asked} epochs asked per cell; the epochs and optimizer steps "
                f"the cells really trained: not recorded.")
    steps = _col(rec, "optimizer_steps")
    steps_text = (f"{_span(steps)} optimizer steps at batch {_whole(_col(rec, 'p_batch_size'))}"
                  if steps.notna().any() else "optimizer steps not recorded")
    return (f"Budget: {asked} epochs asked per cell; the cells trained "
            f"{_span(rec['epochs_trained'])} epochs ({steps_text}) each"
            f"{_paren(_unrecorded(len(rec), len(done)))}.{_off_budget(rec)}"
            f"{_uneven_steps(rec)}")


def _cell_name(r: pd.Series) -> str:
    return str(r.get("label") or r.get("name") or r.get("run_id"))


def _few(items: list[str], most: int = 5) -> str:
    more = f"; and {len(items) - most} more" if len(items) > most else ""
    return "; ".join(items[:most]) + more


def _off_budget(rec: pd.DataFrame) -> str:
    asked = pd.to_numeric(_col(rec, "p_epochs"), errors="coerce")
    off = rec[asked.notna() & (rec["epochs_trained"] != asked)]
    if off.empty:
        return ""
    names = [f"{_cell_name(r)}: {r['epochs_trained']:.0f} of {want:.0f} epochs"
             for (_, r), want in zip(off.iterrows(), asked[off.index], strict=True)]
    return f" Not the budget asked: {cells_phrase(len(off))} ({_few(names)})."


def _uneven_steps(rec: pd.DataFrame) -> str:
    """Cells of the same data, batch and epochs trained must take the same optimizer
    steps; say where they do not."""
    steps = rec.dropna(subset=["optimizer_steps"]) if "optimizer_steps" in rec else rec[:0]
    if steps.empty:
        return ""
    where = steps.apply(lambda r: f"{r.get('p_dataset')} (subset {r.get('p_subset')}), batch "
                                  f"{r.get('p_batch_size')}, {r['epochs_trained']:.0f} epochs",
                        axis=1)
    spread = steps.groupby(where)["optimizer_steps"].agg(["min", "max"])
    uneven = spread[spread["min"] != spread["max"]]
    if uneven.empty:
        return ""
    items = [f"{w}: {lo:.0f}–{hi:.0f} steps" for w, (lo, hi) in uneven.iterrows()]
    return (f" Optimizer steps differ between cells of the same data, batch and epochs "
            f"({_few(items)}).")


SELECT_TEXT = {"last": "the last epoch's weights",
               "best_val": "the weights of the best validation epoch (restored)"}


def tested_weights_sentence(cells: pd.DataFrame) -> str:
    """Which weights the test evaluated (param select; a run without it tested the last
    epoch's), and the epochs tested when the best validation epoch was."""
    select = _col(cells, "p_select").fillna("last")
    counts = select.value_counts()
    if len(counts) == 1:
        what = SELECT_TEXT.get(counts.index[0], counts.index[0])
    else:
        what = ", ".join(f"{SELECT_TEXT.get(k, k)} in {cells_phrase(c)}" for k, c in counts.items())
        what += " (select varies: rows are kept apart by it)"
    best = finished_rows(cells[select == "best_val"])
    tested = _col(best, "test_epoch").dropna()
    span = _span(tested)
    epochs = f"; tested epoch{'s' if '–' in span else ''} {span}" if len(tested) else ""
    return f"The test evaluates {what}{epochs}."


def device_sentence(cells: pd.DataFrame) -> str:
    counts = _col(cells, "p_device_kind").fillna("cpu").value_counts()
    if len(counts) == 1:
        return f"device kind {counts.index[0]}."
    kinds = ", ".join(f"{k} ({cells_phrase(c)})" for k, c in sorted(counts.items()))
    return f"device kinds {kinds}: cells on different kinds are never averaged together."


def _reasons(tags: pd.Series, most: int = 3) -> str:
    """'why (n cells)' for each distinct reason of 'false: why' tags."""
    why = tags.map(lambda t: str(t).split(":", 1)[1].strip() if ":" in str(t) else "")
    counts = why.replace("", "no reason given").value_counts()
    items = [f"{w[:160]} ({cells_phrase(c)})" for w, c in counts.items()]
    return _few(items, most)


def determinism_sentence(done: pd.DataFrame) -> str:
    if done.empty:
        return ""
    rec = done[tag_recorded(done, "deterministic")]
    if rec.empty:
        return "Whether the cells ran deterministically: not recorded."
    yes = tag_true(rec, "deterministic")
    unrec = _unrecorded(len(rec), len(done))
    if yes.all():
        return (f"All {len(rec)} finished cells ran deterministically{_paren(unrec)}: "
                f"running one again gives identical numbers.")
    head = (f"None of the {len(rec)} finished cells ran deterministically" if not yes.any()
            else f"{int(yes.sum())} of {len(rec)} finished cells ran deterministically")
    why = f"not deterministic: {_reasons(rec.loc[~yes, 't_deterministic'])}"
    return (f"{head}{_paren(why, unrec)}; a repeated run gives identical numbers only for a "
            f"deterministic cell.")


def contention_sentence(done: pd.DataFrame) -> str:
    """How many cells were timed while other processes used the machine, and how much."""
    if done.empty:
        return ""
    rec = done[tag_recorded(done, "contended")]
    if rec.empty:
        return ("Whether other processes shared the machine while the speeds were timed: "
                "not recorded.")
    hit = rec[tag_true(rec, "contended")]
    share = _col(rec, "contention_share").dropna()
    most = f"{100 * share.max():.0f}%" if len(share) else "a share not recorded"
    unrec = _unrecorded(len(rec), len(done))
    if hit.empty:
        return (f"No cell was timed on a shared machine"
                f"{_paren(f'other processes used at most {most} of the CPU', unrec)}.")
    said = _paren(f"up to {most} of the CPU", f"{CONTENDED} in the speed tables", unrec)
    return (f"{len(hit)} of {len(rec)} finished cells were timed while other processes used "
            f"the machine{said}: a speed figure taken while the machine was shared is not a "
            f"measurement.")


def divergence_sentence(cells: pd.DataFrame) -> str:
    """Finished cells whose loss ended above the first epoch's or far above chance; cells
    failed on NaN/inf."""
    done = finished_rows(cells)
    rec = int(tag_recorded(done, "diverged").sum())
    blew_up = int((status_labels(cells) == f"{tracking.FAILED} (diverged)").sum())
    failed = f"; {cells_phrase(blew_up)} failed on a NaN/inf loss (listed below)" if blew_up else ""
    if done.empty:
        return f"{failed[2:]}." if blew_up else ""
    if not rec:
        return f"Divergence of the finished cells: not recorded{failed}."
    n = diverged_cells(done)
    unrec = _unrecorded(rec, len(done))
    head = (f"{n} of {rec} finished cells diverged" + _paren(
        "final train loss above the first epoch's or over 10x the chance level",
        f"{DIVERGED} in the accuracy tables", unrec)
        if n else "No finished cell diverged" + _paren(unrec))
    return f"{head}{failed}."


def pretrain_section(data: ReportData) -> str:
    pre = data.frame[data.frame["role"] == PRETRAIN] if "role" in data.frame else None
    if pre is None or pre.empty:
        return ""
    cells = data.cells
    rows = []
    for _, r in pre.iterrows():
        users = (cells.get("t_pretrain_run_id", pd.Series(dtype=object)) == r["run_id"]).sum()
        rows.append({"run": r.get("run_name") or r["run_id"], "status": r["status"],
                     "backbone": r.get("p_backbone"), "source dataset": r.get("p_dataset"),
                     "best val acc": fmt_number(r.get("best_val_acc")),
                     "wall s": fmt_number(r.get("wall_seconds"), 1), "cells using it": int(users)})
    return ("## Pretraining runs\n\nBackbones pretrained on a source dataset by the harness; "
            "not part of the comparison tables.\n\n"
            + pd.DataFrame(rows).to_markdown(index=False) + "\n")


def report_markdown(data: ReportData, tables: list[Table], figures: dict[str, list[str]]
                    ) -> str:
    title = data.parent["run_name"] if data.parent else data.experiment
    out = [f"# Report: {data.experiment}\n",
           f"Selection: {title}. Generated {time.strftime('%Y-%m-%d %H:%M:%S')} by "
           f"`{data.command or 'python -m bench report'}` from MLflow "
           f"({tracking.tracking_uri()}, experiment `{data.experiment}`).\n",
           "## Methods\n", methods(data) + "\n"]
    fails = failures(data.frame)
    if fails:
        out += ["## Cells that did not finish\n", "\n".join(f"- {f}" for f in fails) + "\n"]
    fig_after = {"accuracy": "accuracy_vs_depth", "throughput": "pareto",
                 "tuned": "sensitivity"}
    for t in tables:
        out.append(t.markdown())
        out.append(f"Files (in tables/ beside this report): [{t.name}.md](tables/{t.name}.md), "
                   f"[{t.name}.tex](tables/{t.name}.tex), [{t.name}.csv](tables/{t.name}.csv)\n")
        for png in figures.get(fig_after.get(t.name, ""), []):
            out.append(f"![{Path(png).stem}]({png})\n")
    if not any(t.name == "relative" for t in tables):  # never missing without a word
        out.append("### Relative to full\n\nNot written: no group (dataset, backbone, "
                   "weights and the other fields a grid varies) holds the strategy `full` "
                   "and another strategy to compare with it, in one framework.\n")
    if figures.get("learning_curves"):
        out.append("### Learning curves\n")
        out += [f"![{Path(p).stem}]({p})\n" for p in figures["learning_curves"]]
    pre = pretrain_section(data)
    if pre:
        out.append(pre)
    out.append("Every cell as one row: [runs.csv](runs.csv), [runs.parquet](runs.parquet).\n")
    return "\n".join(out)
