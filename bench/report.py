"""MLflow runs -> one flat row per cell (pandas) -> comparison tables and a report.

    python -m bench report [GRID-or-EXPERIMENT] [--parent RUN_ID] [--out reports/]

Reads only MLflow, through bench/tracking.py. `load()` builds the flat frame (benchopt
style): one row per cell of the selection with its params (`p_*`), final metrics, tlbench
tags (`t_*`) and status, plus a MISSING row for every cell the grid expects and no run
holds. Every table works on that frame only and keeps failed, killed, running and missing
cells as rows that say so. A table is a numeric frame (CSV) and a display frame (Markdown,
LaTeX booktabs). Accuracy is aggregated over seeds as mean, std and a 95% t-interval; n=1
shows the mean alone. bench/figures.py draws the figures from these tables (it imports this
module, never the reverse); `write()` puts everything under reports/<experiment>/ and
report.md on top.

What the cells record about their own conditions is said, never hidden: the methods
paragraph states the epochs and optimizer steps really trained, the weights tested, how many
cells ran deterministically, were timed on a shared machine or diverged, and the device
kinds ("not recorded" for runs older than a record). In the displayed tables † marks a
speed figure taken while other processes used the machine and ‡ an accuracy of a cell whose
loss diverged, each explained in a footnote; the numeric tables (CSV) stay numbers, with
counts (`contended`, `diverged`) beside them.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from bench import tracking
from strategies import registry

MISSING = "MISSING"
PRETRAIN = "pretrain"
CURVE_KEYS = ("train_acc", "val_acc", "epoch_seconds")
INT_PARAMS = ("seed", "epochs", "image_size", "batch_size", "subset")
FLOAT_PARAMS = ("lr", "weight_decay")
# a cell group (seeds aggregated) is these keys plus any other param that varies
BASE_KEYS = ("p_dataset", "p_backbone", "p_weights", "p_strategy_label")
NOT_KEYS = {"p_framework", "p_seed", "p_strategy", "p_strategy_label"}
FRAMEWORK_ORDER = ("torch", "keras")
ALPHA = 0.05
# params added to RunSpec later: a run older than the param ran with this value
PARAM_DEFAULTS = {"p_select": "last", "p_device_kind": "cpu"}
HEADERS = {"p_strategy_label": "strategy", "p_device_kind": "device kind"}
CONTENDED = "†"  # a speed figure taken while other processes used the machine
DIVERGED = "‡"  # final train loss above the first epoch's (tag tlbench.diverged)
DIVERGED_ERROR = "diverged at epoch"  # how a cell whose loss went NaN/inf fails


# ---- the flat frame ------------------------------------------------------------------------
@dataclass
class ReportData:
    frame: pd.DataFrame  # one row per cell, plus pretraining runs (role == "pretrain")
    history: pd.DataFrame  # run_id, key, step, value: per-epoch metrics
    experiment: str
    experiment_id: str
    parent: dict | None = None  # the grid invocation's run, flattened (tracking.run_row)
    expected: int | None = None  # cells the grid expects (None: unknown)
    command: str = ""

    @property
    def cells(self) -> pd.DataFrame:
        return cells_only(self.frame)


def load(exp_id: str, parent_id: str | None = None, expected: list[dict] | None = None,
         history: bool = True) -> ReportData:
    """The selection read from MLflow. With a parent, its cells (and the earlier FINISHED
    runs of cells it skipped as done); without, every cell of the experiment."""
    parent = tracking.get_run(parent_id) if parent_id else None
    if parent_id and expected is None:
        expected = tracking.expected_cells(parent_id)
    frame = runs_frame(exp_id, parent_id, expected)
    hist = histories(frame) if history else empty_history()
    frame = add_derived(frame, hist)
    return ReportData(frame, hist, tracking.experiment_name(exp_id), exp_id,
                      tracking.run_row(parent) if parent else None,
                      len(expected) if expected is not None else None)


def runs_frame(exp_id: str, parent_id: str | None = None,
               expected: list[dict] | None = None) -> pd.DataFrame:
    """One row per cell run: params (p_*), final metrics, tags (t_*), status.

    With a parent id: that invocation's runs, and for each expected cell it did not run the
    experiment's newest FINISHED run of its spec hash (the runner skipped it as done).
    Without: every cell of the experiment, the newest FINISHED run of each spec hash (or
    its newest run of any status). `expected` ({hash, name, params}, as the runner logs
    on the parent) restricts the cells to those and adds a MISSING row for each one no run
    holds. Pretraining runs (tag tlbench.role=pretrain) come as rows with role 'pretrain'.
    """
    rows = [tracking.run_row(r) for r in tracking.experiment_runs(exp_id)]
    cells = [r for r in rows if r["role"] != PRETRAIN]
    pretrain = [r for r in rows if r["role"] == PRETRAIN]
    if parent_id:
        chosen = _newest_per_hash([r for r in cells if r["parent_run_id"] == parent_id])
        pretrain = [r for r in pretrain if r["parent_run_id"] == parent_id]
    else:
        chosen = _newest_per_hash(cells)
    if expected is not None:
        done = _newest_per_hash([r for r in cells if r["status"] == tracking.FINISHED])
        latest = _newest_per_hash(cells)
        want = {e["hash"]: e for e in expected}
        chosen = {h: chosen.get(h) or done.get(h) or _missing_row(e, latest.get(h))
                  for h, e in want.items()}
    # pretraining runs the chosen cells start from, wherever they live
    have = {r["run_id"] for r in pretrain}
    for ref in {r.get("t_pretrain_run_id") for r in chosen.values()} - have - {None, ""}:
        run = tracking.get_run(ref)
        if run is not None:
            pretrain.append({**tracking.run_row(run), "role": PRETRAIN})
    df = pd.DataFrame(list(chosen.values()) + pretrain)
    for col in ("run_id", "status", "name", "spec_hash", "role", "error", *BASE_KEYS,
                "p_framework", "p_seed", "p_strategy"):
        if col not in df:
            df[col] = pd.Series(dtype=object)
    for p in (*INT_PARAMS, *FLOAT_PARAMS):  # MLflow params are strings
        col = f"p_{p}"
        if col in df:
            num = pd.to_numeric(df[col], errors="coerce")
            if num.notna().sum() == df[col].notna().sum():
                df[col] = num.astype("Int64") if p in INT_PARAMS else num.astype(float)
    df = fill_param_defaults(df)
    obj = [c for c in df.columns if df[c].dtype == object]
    df[obj] = df[obj].astype(object).where(df[obj].notna(), None)
    df["error"] = df["error"].fillna("")
    return df.sort_values(["role", "name"], na_position="last").reset_index(drop=True)


def _newest_per_hash(rows: list[dict]) -> dict[str, dict]:
    """Per spec hash: the newest FINISHED run, else the newest run of any status."""
    best: dict[str, dict] = {}
    for r in sorted(rows, key=lambda r: (r["status"] == tracking.FINISHED,
                                         r["start_time"] or 0)):
        best[r["spec_hash"] or r["run_id"]] = r
    return best


def fill_param_defaults(df: pd.DataFrame) -> pd.DataFrame:
    """Params a run predates (PARAM_DEFAULTS) take the value it ran with, so an old run and
    a new one of the same cell are one cell, not two rows."""
    df = df.copy()
    for col, value in PARAM_DEFAULTS.items():
        df[col] = df[col].where(df[col].notna(), value) if col in df else value
    return df


def _missing_row(e: dict, earlier: dict | None = None) -> dict:
    """A cell the grid expects and the selection has no run of; `earlier`: the newest run
    of the cell outside the selection (another invocation), named in the error column."""
    note = (f"not run in this invocation; latest earlier run {earlier['run_id']} "
            f"{earlier['status']}" if earlier else "")
    return {"run_id": None, "status": MISSING, "name": e["name"],
            "label": e.get("label", e["name"]), "spec_hash": e["hash"], "role": "cell",
            "error": note, **{f"p_{k}": v for k, v in e["params"].items()}}


def empty_history() -> pd.DataFrame:
    return pd.DataFrame({"run_id": pd.Series(dtype=object), "key": pd.Series(dtype=object),
                         "step": pd.Series(dtype=int), "value": pd.Series(dtype=float)})


def histories(frame: pd.DataFrame, keys: tuple[str, ...] = CURVE_KEYS) -> pd.DataFrame:
    """Per-epoch metrics (step = epoch) of every cell run that has a run id."""
    rows = []
    for rid in cells_only(frame)["run_id"].dropna():
        rows += [(rid, k, s, v) for k, s, v in tracking.metric_history(rid, keys)]
    return pd.DataFrame(rows, columns=["run_id", "key", "step", "value"]) if rows \
        else empty_history()


def add_derived(frame: pd.DataFrame, hist: pd.DataFrame) -> pd.DataFrame:
    """trainable_fraction; time_to_best_s: the epoch seconds summed up to best_val_epoch."""
    df = frame.copy()
    if "trainable_params" in df and "total_params" in df:
        df["trainable_fraction"] = df["trainable_params"] / df["total_params"]
    secs = hist[hist["key"] == "epoch_seconds"]
    if "best_val_epoch" in df and not secs.empty:
        best = df.set_index("run_id")["best_val_epoch"].dropna()
        merged = secs.join(best, on="run_id", how="inner")
        upto = merged[merged["step"] <= merged["best_val_epoch"]]
        df["time_to_best_s"] = df["run_id"].map(upto.groupby("run_id")["value"].sum())
    return df


def cells_only(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["role"] != PRETRAIN] if "role" in df else df


def group_keys(df: pd.DataFrame) -> list[str]:
    """The base keys plus every other param that takes more than one value: cells that
    differ in anything but framework and seed are never averaged together."""
    cells = cells_only(df)
    extra = sorted(c for c in cells.columns if c.startswith("p_") and c not in BASE_KEYS
                   and c not in NOT_KEYS and not c.startswith("p_strategy.")
                   and cells[c].astype(str).nunique() > 1)
    return [*BASE_KEYS, *extra]


def _header(col: str) -> str:
    return HEADERS.get(col) or (col[2:] if col.startswith("p_") else col)


# ---- statistics ----------------------------------------------------------------------------
def t_quantile(dof: int, level: float = 0.95) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.5 + level / 2, dof))


def summarize(values) -> dict:
    """n, mean, std (ddof=1) and the 95% t-interval of the mean; n=1 has no spread."""
    v = np.asarray([x for x in values if x is not None and not pd.isna(x)], dtype=float)
    n = len(v)
    out = {"n": n, "mean": float(v.mean()) if n else math.nan, "std": math.nan,
           "ci_low": math.nan, "ci_high": math.nan}
    if n >= 2:
        std = float(v.std(ddof=1))
        half = t_quantile(n - 1) * std / math.sqrt(n)
        out.update(std=std, ci_low=out["mean"] - half, ci_high=out["mean"] + half)
    return out


def paired_test(a: pd.Series, b: pd.Series) -> dict:
    """Paired t-test of a - b over the seeds both hold (index = seed). The verdict says
    whether a's lead holds at the 5% level, or why no test is possible: fewer than two
    pairs, or the same difference on every seed (no variance: t is undefined)."""
    both = pd.concat([a.rename("a"), b.rename("b")], axis=1).dropna()
    # float32 noise (0.1 logged by two frameworks) must not pass for a real difference;
    # accuracies are counts over fewer than a million test images
    d = (both["a"] - both["b"]).to_numpy(dtype=float)
    d = np.where(np.abs(d) < 1e-7, 0.0, d)
    n = len(d)
    out = {"pairs": n, "mean_diff": float(d.mean()) if n else math.nan, "p_value": math.nan}
    if n < 2:
        out["verdict"] = f"n too small ({n} pair{'s' if n != 1 else ''})"
        return out
    if np.allclose(d, d[0], rtol=0, atol=1e-7):
        out["verdict"] = (f"no (no difference on {n} seeds)" if d[0] == 0 else
                          f"same difference on all {n} seeds (no variance, no test)")
        if d[0] == 0:
            out["p_value"] = 1.0
        return out
    from scipy import stats

    sd = d.std(ddof=1)
    p = float(2 * stats.t.sf(abs(d.mean() / (sd / math.sqrt(n))), n - 1))
    out["p_value"] = p
    holds = p < ALPHA and d.mean() > 0
    out["verdict"] = f"{'yes' if holds else 'no'} (p={p:.3g}, {n} pairs)"
    return out


def fmt_summary(s: dict, digits: int = 3) -> str:
    if s["n"] == 0:
        return ""
    if s["n"] == 1:
        return f"{s['mean']:.{digits}f} (n=1)"
    return (f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f} "
            f"[{s['ci_low']:.{digits}f}, {s['ci_high']:.{digits}f}] n={s['n']}")


def status_labels(rows: pd.DataFrame) -> pd.Series:
    """Each row's status, 'FAILED (diverged)' for a cell whose loss went NaN/inf."""
    error = rows.get("error", pd.Series("", index=rows.index)).fillna("").astype(str)
    diverged = (rows["status"] == tracking.FAILED) & error.str.contains(DIVERGED_ERROR)
    return rows["status"].where(~diverged, f"{tracking.FAILED} (diverged)")


def not_finished(rows: pd.DataFrame) -> str:
    """'1 FAILED, 2 MISSING' for the rows of a group that did not finish."""
    labels = status_labels(rows)
    bad = labels[rows["status"] != tracking.FINISHED].value_counts()
    return ", ".join(f"{n} {s}" for s, n in sorted(bad.items()))


def _with_gaps(text: str, rows: pd.DataFrame) -> str:
    gaps = not_finished(rows)
    if not text:  # nothing finished: the statuses alone ("FAILED", "2 MISSING")
        return status_labels(rows).iloc[0] if len(rows) == 1 else gaps
    return f"{text}; {gaps}" if gaps else text


# ---- recorded conditions: contention, divergence (tags "true: ..." / "false: ...") ------
def tag_true(rows: pd.DataFrame, tag: str) -> pd.Series:
    """True where the tag t_<tag> starts with 'true'; False where it says false or is not
    recorded."""
    col = rows.get(f"t_{tag}")
    if col is None:
        return pd.Series(False, index=rows.index)
    return col.map(lambda v: isinstance(v, str) and v.strip().lower().startswith("true")
                   ).astype(bool)


def tag_recorded(rows: pd.DataFrame, tag: str) -> pd.Series:
    col = rows.get(f"t_{tag}")
    if col is None:
        return pd.Series(False, index=rows.index)
    return col.map(lambda v: isinstance(v, str) and v.strip() != "").astype(bool)


def contended_cells(rows: pd.DataFrame) -> int:
    """Finished cells of the rows timed while other processes used the machine."""
    return int(tag_true(_finished(rows), "contended").sum())


def diverged_cells(rows: pd.DataFrame) -> int:
    """Finished cells of the rows whose final train loss is above the first epoch's."""
    return int(tag_true(_finished(rows), "diverged").sum())


def _max_share(rows: pd.DataFrame) -> float:
    share = _metric(rows[tag_true(rows, "contended")], "contention_share").dropna()
    return float(share.max()) if len(share) else math.nan


def _cells(n: int) -> str:
    return f"{n} cell{'s' if n != 1 else ''}"


def _marked(text: str, flag: bool, mark: str) -> str:
    return f"{text} {mark}" if flag and text not in ("", "—") else text


def _pct_span(values: pd.Series) -> str:
    lo, hi = 100 * values.min(), 100 * values.max()
    return f"{hi:.0f}%" if round(lo) == round(hi) else f"{lo:.0f}–{hi:.0f}%"


def contended_footnote(df: pd.DataFrame, what: str = "") -> str:
    """The † footnote of a table with speed figures ('' when no cell was contended)."""
    done = _finished(cells_only(df))
    hit = done[tag_true(done, "contended")]
    if hit.empty:
        return ""
    share = _metric(hit, "contention_share").dropna()
    used = (f"other processes used {_pct_span(share)} of the CPU" if len(share)
            else "other processes used the machine (share not recorded)")
    return (f"{CONTENDED} measured while {used} ({_cells(len(hit))}): a speed figure "
            f"taken while the machine was shared is not a measurement."
            f"{' ' + what if what else ''}")


def unrecorded_footnote(df: pd.DataFrame) -> str:
    """Says for how many finished cells machine sharing while timed is not recorded."""
    done = _finished(cells_only(df))
    missing = int((~tag_recorded(done, "contended")).sum())
    if not missing:
        return ""
    return (f"Whether the machine was shared while timed: not recorded for {missing} of "
            f"{len(done)} finished cells.")


def diverged_footnote(df: pd.DataFrame) -> str:
    n = diverged_cells(cells_only(df))
    if not n:
        return ""
    return f"{DIVERGED} diverged: final train loss above the first epoch's ({_cells(n)})."


# ---- tables --------------------------------------------------------------------------------
@dataclass
class Table:
    name: str
    title: str
    numeric: pd.DataFrame  # written as CSV
    display: pd.DataFrame  # written as Markdown and LaTeX
    note: str = ""
    footnotes: list[str] = field(default_factory=list)  # under the table: what marks mean

    def markdown(self) -> str:
        body = self.display.to_markdown(index=False) if not self.display.empty \
            else "(nothing to compare)"
        notes = "".join(f"\n{f}\n" for f in self.footnotes if f)
        return f"### {self.title}\n\n{self.note + chr(10) + chr(10) if self.note else ''}" \
               f"{body}\n{notes}"

    def latex(self) -> str:
        return to_latex(self.display, self.title, self.footnotes)


def _strategy_order(df: pd.DataFrame) -> pd.Series:
    names = list(registry.STRATEGIES)
    rank = df["p_strategy"].map(lambda s: names.index(s) if s in names else len(names))
    depth = df.get("p_strategy.depth", pd.Series(index=df.index, dtype=object))
    depth = depth.map(lambda d: 999 if d == "all" else pd.to_numeric(d, errors="coerce"))
    return rank * 10000 + depth.fillna(0)


def _groups(df: pd.DataFrame, keys: list[str], by_framework: bool = True):
    """(key values, framework or None, rows) in table order: dataset, backbone, weights,
    strategy in registry order and depth, then the other keys."""
    cells = cells_only(df).copy()
    if cells.empty:
        return []
    cells[keys] = cells[keys].astype(str)
    cells["_order"] = _strategy_order(cells)
    cols = keys + (["p_framework"] if by_framework else [])
    firsts = (cells.groupby(cols, dropna=False, sort=False)["_order"].min().reset_index())
    fw_rank = {f: i for i, f in enumerate(FRAMEWORK_ORDER)}
    sort_cols = [*keys[:3], "_order", *keys[3:]]
    if by_framework:
        firsts["_fw"] = firsts["p_framework"].map(lambda f: fw_rank.get(f, 99))
        sort_cols.append("_fw")
    firsts = firsts.sort_values(sort_cols)
    grouped = cells.groupby(cols, dropna=False, sort=False)
    out = []
    for _, g in firsts.iterrows():
        k = tuple(g[c] for c in cols)
        rows = grouped.get_group(k)
        out.append((k[:len(keys)], k[-1] if by_framework else None, rows))
    return out


def _finished(rows: pd.DataFrame) -> pd.DataFrame:
    return rows[rows["status"] == tracking.FINISHED]


def _metric(rows: pd.DataFrame, col: str) -> pd.Series:
    done = _finished(rows)
    return done[col] if col in done else pd.Series(dtype=float)


def frameworks(df: pd.DataFrame) -> list[str]:
    have = set(cells_only(df)["p_framework"].dropna())
    return [f for f in FRAMEWORK_ORDER if f in have] + sorted(have - set(FRAMEWORK_ORDER))


def accuracy_table(df: pd.DataFrame, metric: str = "test_acc") -> Table:
    """Test accuracy per backbone x strategy[depth] x weights (rows) and framework
    (columns): mean ± std [95% t-interval] n over seeds."""
    keys = group_keys(df)
    fws = frameworks(df)
    numeric, disp = [], {}
    for kv, fw, rows in _groups(df, keys):
        s = summarize(_metric(rows, metric))
        numeric.append({**dict(zip(keys, kv, strict=True)), "framework": fw, **s,
                        "cells": len(rows), "diverged": diverged_cells(rows),
                        "not_finished": not_finished(rows)})
        disp.setdefault(kv, {})[fw] = _with_gaps(_accuracy_text(s, rows), rows)
    display = pd.DataFrame([{**{_header(k): v for k, v in zip(keys, kv, strict=True)},
                             **{f"{metric} ({fw})": cols.get(fw, "not in grid")
                                for fw in fws}}
                            for kv, cols in disp.items()])
    return Table("accuracy", "Test accuracy", pd.DataFrame(numeric), display,
                 "mean ± std [95% t-interval] n over seeds; n=1 is a single run. "
                 "Cells that did not finish are counted by status.", [diverged_footnote(df)])


def _accuracy_text(s: dict, rows: pd.DataFrame, digits: int = 3) -> str:
    """The summary, marked ‡ when a cell of the group diverged."""
    return _marked(fmt_summary(s, digits), diverged_cells(rows) > 0, DIVERGED)


def throughput_table(df: pd.DataFrame) -> Table:
    """Train images/s data-fed and model-only, inference images/s, and the speed-up of
    each strategy over full fine-tuning of the same backbone (same framework, dataset,
    weights and other keys but lr and weight decay). Input-bound shown when the cells report
    it."""
    keys = group_keys(df)
    rows_out, group_rows = [], []
    for kv, fw, rows in _groups(df, keys):
        group_rows.append(rows)
        r = {**dict(zip(keys, kv, strict=True)), "framework": fw,
             "n": len(_finished(rows)), "cells": len(rows),
             "strategy": rows["p_strategy"].iloc[0]}
        for col in ("train_images_per_sec", "model_only_train_images_per_sec",
                    "inference_images_per_sec"):
            r[col] = _metric(rows, col).mean()
        for tag in ("input_bound", "feature_cache"):
            vals = _finished(rows).get(f"t_{tag}", pd.Series(dtype=object)).dropna()
            r[tag] = ",".join(sorted(set(vals))) if len(vals) else None
        r["contended"] = contended_cells(rows)
        r["contention_share"] = _max_share(_finished(rows))
        r["not_finished"] = not_finished(rows)
        rows_out.append(r)
    numeric = pd.DataFrame(rows_out)
    if numeric.empty:
        return Table("throughput", "Throughput", numeric, numeric)
    # the step rate does not depend on the optimizer's settings: a strategy run at another
    # lr than full fine-tuning still has full fine-tuning to compare its speed with
    base_keys = [k for k in keys if k not in ("p_strategy_label", "p_lr", "p_weight_decay")]
    base_keys += ["framework"]
    full = numeric[numeric["strategy"] == "full"].copy()
    full["_plain"] = full["p_strategy_label"] != "full"  # prefer plain `full` as reference
    full = full.sort_values("_plain").drop_duplicates(base_keys)
    ref = full.set_index(base_keys)
    idx = pd.MultiIndex.from_frame(numeric[base_keys]) if len(base_keys) > 1 \
        else pd.Index(numeric[base_keys[0]])
    for col, out in (("train_images_per_sec", "speedup_vs_full"),
                     ("model_only_train_images_per_sec", "model_only_speedup_vs_full")):
        refv = ref[col].reindex(idx).to_numpy() if col in ref else np.nan
        numeric[out] = numeric[col].to_numpy() / refv
    # a speed-up is as contended as either of its two rates
    numeric["full_contended"] = ref["contended"].reindex(idx).fillna(0).astype(int).to_numpy()
    numeric = numeric.drop(columns="strategy")
    show_bound = numeric["input_bound"].notna().any()
    show_cache = numeric["feature_cache"].notna().any()
    disp = []
    for (_, r), rows in zip(numeric.iterrows(), group_rows, strict=True):
        d = {_header(k): r[k] for k in keys}
        d["framework"] = r["framework"]
        if r["n"] == 0:
            d.update({"train img/s": _with_gaps("", rows), "model-only img/s": "",
                      "inference img/s": "", "speed-up vs full": "",
                      "model-only speed-up": ""})
        else:
            d.update(_throughput_cells(r))
        if show_bound:
            d["input-bound"] = "" if pd.isna(r["input_bound"]) else r["input_bound"]
        if show_cache:
            d["feature cache"] = "" if pd.isna(r["feature_cache"]) else r["feature_cache"]
        disp.append(d)
    return Table("throughput", "Throughput", numeric, pd.DataFrame(disp),
                 "Images/s, mean over seeds of each cell's median step rate (warm-up "
                 "excluded). Data-fed: the training loop with its input pipeline; "
                 "model-only: a synthetic batch already on the device. Speed-up: train "
                 "images/s over full fine-tuning of the same backbone and framework"
                 f"{_device_note(df)}. "
                 "— : not measured (a cell with fewer training steps than the warm-up "
                 "has no data-fed rate) or no full fine-tuning to compare with.",
                 [contended_footnote(df, "A speed-up is marked when either of its rates is."),
                  unrecorded_footnote(df)])


def _throughput_cells(r: pd.Series) -> dict:
    """The rates of a row with finished cells, marked † where they were contended."""
    own, either = r["contended"] > 0, r["contended"] > 0 or r["full_contended"] > 0
    suffix = f" ({r['not_finished']})" if r["not_finished"] else ""
    return {"train img/s": _marked(_rate(r["train_images_per_sec"]), own, CONTENDED) + suffix,
            "model-only img/s": _marked(_rate(r["model_only_train_images_per_sec"]), own,
                                        CONTENDED),
            "inference img/s": _marked(_rate(r["inference_images_per_sec"]), own, CONTENDED),
            "speed-up vs full": _marked(_times(r["speedup_vs_full"]), either, CONTENDED),
            "model-only speed-up": _marked(_times(r["model_only_speedup_vs_full"]), either,
                                           CONTENDED)}


def _device_note(df: pd.DataFrame) -> str:
    """', on the same device kind' when kinds vary (a row key), else ', on <kind>'."""
    kinds = _uniq(cells_only(df).get("p_device_kind"))
    if len(kinds) > 1:
        return ", on the same device kind"
    return f", on {kinds[0]}" if kinds else ""


def _rate(v: float) -> str:
    return "—" if pd.isna(v) else f"{v:,.0f}"


def _times(v: float) -> str:
    return "—" if pd.isna(v) else f"{v:.2f}×"


def _si(n: float) -> str:
    if pd.isna(n):
        return "—"
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def cost_table(df: pd.DataFrame) -> Table:
    """Trainable parameters (count and fraction of the model), wall time, and time to the
    best val accuracy (epoch seconds summed up to best_val_epoch); means over seeds."""
    keys = group_keys(df)
    rows_out, disp = [], []
    for kv, fw, rows in _groups(df, keys):
        r = {**dict(zip(keys, kv, strict=True)), "framework": fw,
             "n": len(_finished(rows)), "cells": len(rows)}
        for col in ("trainable_params", "total_params", "trainable_fraction", "wall_seconds",
                    "time_to_best_s", "best_val_epoch"):
            r[col] = _metric(rows, col).mean()
        r["contended"] = contended_cells(rows)
        r["not_finished"] = not_finished(rows)
        rows_out.append(r)
        d = {**{_header(k): v for k, v in zip(keys, kv, strict=True)}, "framework": fw}
        if r["n"] == 0:
            d.update({"trainable params": _with_gaps("", rows), "trainable %": "",
                      "wall s": "", "time to best val s": "", "best epoch": ""})
        else:
            d.update(_cost_cells(r))
        disp.append(d)
    return Table("cost", "Cost", pd.DataFrame(rows_out), pd.DataFrame(disp),
                 "Means over seeds. Trainable %: trainable over total parameters at the end "
                 "of training. Time to best val: the training epochs' seconds summed up to "
                 "the epoch of the best val accuracy (evaluation excluded).",
                 [contended_footnote(df, "The seconds of those cells are marked."),
                  unrecorded_footnote(df)])


def _cost_cells(r: dict) -> dict:
    """A row with finished cells; the seconds marked † where they were contended."""
    shared = r["contended"] > 0
    suffix = f" ({r['not_finished']})" if r["not_finished"] else ""
    return {"trainable params": _si(r["trainable_params"]) + suffix,
            "trainable %": _num(100 * r["trainable_fraction"], 1),
            "wall s": _marked(_num(r["wall_seconds"], 1), shared, CONTENDED),
            "time to best val s": _marked(_num(r["time_to_best_s"], 1), shared, CONTENDED),
            "best epoch": "—" if pd.isna(r["best_val_epoch"])
            else f"{r['best_val_epoch']:.1f}".removesuffix(".0")}


def framework_delta_table(df: pd.DataFrame, a: str = "torch", b: str = "keras",
                          metric: str = "test_acc") -> Table:
    """PyTorch minus Keras for every cell group both frameworks have in the grid: the
    difference of mean accuracy, the same paired over seeds, and the train speed ratio."""
    keys = group_keys(df)
    by = {}
    for kv, fw, rows in _groups(df, keys):
        by.setdefault(kv, {})[fw] = rows
    numeric, disp = [], []
    for kv, fws in by.items():
        if a not in fws or b not in fws:
            continue
        ra, rb = fws[a], fws[b]
        sa, sb = summarize(_metric(ra, metric)), summarize(_metric(rb, metric))
        pa = _finished(ra).set_index("p_seed")[metric] if metric in ra else pd.Series()
        pb = _finished(rb).set_index("p_seed")[metric] if metric in rb else pd.Series()
        test = paired_test(pa, pb)
        speed = (_metric(ra, "train_images_per_sec").mean()
                 / _metric(rb, "train_images_per_sec").mean())
        r = {**dict(zip(keys, kv, strict=True)), f"{a}_mean": sa["mean"], f"{a}_n": sa["n"],
             f"{b}_mean": sb["mean"], f"{b}_n": sb["n"], "delta": sa["mean"] - sb["mean"],
             "paired_pairs": test["pairs"], "paired_mean_diff": test["mean_diff"],
             "p_value": test["p_value"], "train_speed_ratio": speed,
             "speed_contended": contended_cells(ra) + contended_cells(rb),
             f"{a}_diverged": diverged_cells(ra), f"{b}_diverged": diverged_cells(rb),
             f"{a}_not_finished": not_finished(ra), f"{b}_not_finished": not_finished(rb)}
        numeric.append(r)
        d = {_header(k): v for k, v in zip(keys, kv, strict=True)}
        d[f"{metric} {a}"] = _with_gaps(_accuracy_text(sa, ra), ra)
        d[f"{metric} {b}"] = _with_gaps(_accuracy_text(sb, rb), rb)
        if sa["n"] and sb["n"]:
            d[f"{a} − {b}"] = f"{r['delta']:+.3f}"
            d["paired over seeds"] = (f"{test['mean_diff']:+.3f}, p={test['p_value']:.3g}"
                                      if pd.notna(test["p_value"]) else test["verdict"])
            d[f"train speed {a}/{b}"] = _marked(_times(speed), r["speed_contended"] > 0,
                                                CONTENDED)
        else:
            d[f"{a} − {b}"] = "no pair"
            d["paired over seeds"] = ""
            d[f"train speed {a}/{b}"] = ""
        disp.append(d)
    note = (f"{a} minus {b} for each cell group the grid runs in both frameworks; paired: "
            f"mean difference over matching seeds and its paired t-test p-value.")
    if not numeric:
        note = f"No cell group runs in both {a} and {b}."
    shared = contended_footnote(df, f"A marked speed ratio is no {a}/{b} difference: one "
                                    f"side or both were timed on a shared machine.")
    return Table("framework_delta", f"Framework delta ({a} − {b})", pd.DataFrame(numeric),
                 pd.DataFrame(disp), note, [shared, diverged_footnote(df)])


def best_strategy_table(df: pd.DataFrame, metric: str = "test_acc") -> Table:
    """Per dataset x backbone x weights x framework: the strategy with the best mean test
    accuracy, its margin over the runner-up, and whether the lead holds over seeds (paired
    t-test on the seeds both ran, 5% level)."""
    keys = group_keys(df)
    outer = [k for k in keys if k != "p_strategy_label"]
    per: dict[tuple, list] = {}
    for kv, fw, rows in _groups(df, keys):
        key = tuple(v for k, v in zip(keys, kv, strict=True) if k != "p_strategy_label") + (fw,)
        per.setdefault(key, []).append((kv[keys.index("p_strategy_label")], rows))
    numeric, disp = [], []
    for key, strategies in per.items():
        ranked = sorted(((summarize(_metric(rows, metric)), label, rows)
                         for label, rows in strategies if len(_finished(rows))),
                        key=lambda t: -t[0]["mean"])
        skipped = [f"{label} ({_with_gaps('', rows)})" for label, rows in strategies
                   if not len(_finished(rows))]
        r = {**dict(zip(outer, key[:-1], strict=True)), "framework": key[-1],
             "best": None, "best_mean": math.nan, "runner_up": None,
             "runner_up_mean": math.nan, "margin": math.nan, "pairs": 0,
             "p_value": math.nan, "verdict": "", "not_compared": "; ".join(skipped),
             "best_diverged": 0}
        if ranked:
            s1, l1, rows1 = ranked[0]
            r.update(best=l1, best_mean=s1["mean"], best_diverged=diverged_cells(rows1))
            if len(ranked) > 1:
                s2, l2, rows2 = ranked[1]
                test = paired_test(_finished(rows1).set_index("p_seed")[metric],
                                   _finished(rows2).set_index("p_seed")[metric])
                r.update(runner_up=l2, runner_up_mean=s2["mean"],
                         margin=s1["mean"] - s2["mean"], pairs=test["pairs"],
                         p_value=test["p_value"], verdict=test["verdict"])
            else:
                r["verdict"] = "no runner-up"
        numeric.append(r)
        d = {**{_header(k): v for k, v in zip(outer, key[:-1], strict=True)},
             "framework": key[-1],
             "best": _ranked_text(r["best"], r["best_mean"], ranked[0][2])
             if r["best"] else "none finished",
             "runner-up": _ranked_text(r["runner_up"], r["runner_up_mean"], ranked[1][2])
             if r["runner_up"] else "—",
             "margin": "—" if pd.isna(r["margin"]) else f"{r['margin']:+.3f}",
             "holds over seeds": r["verdict"], "not compared": r["not_compared"]}
        disp.append(d)
    return Table("best_strategy", "Best strategy", pd.DataFrame(numeric), pd.DataFrame(disp),
                 "By mean test accuracy over seeds. Holds over seeds: a paired t-test of "
                 "best minus runner-up on the seeds both ran (5% level); with fewer than two "
                 "matching seeds no test is possible.", [diverged_footnote(df)])


def _ranked_text(label: str, mean: float, rows: pd.DataFrame) -> str:
    """'full (0.914)', marked ‡ when a cell of the strategy diverged."""
    return f"{label} ({_marked(f'{mean:.3f}', diverged_cells(rows) > 0, DIVERGED)})"


def all_tables(df: pd.DataFrame) -> list[Table]:
    return [accuracy_table(df), throughput_table(df), cost_table(df),
            framework_delta_table(df), best_strategy_table(df)]


def compact(df: pd.DataFrame) -> str:
    """The accuracy table as Markdown: what `bench run` prints at the end of a grid."""
    if cells_only(df).empty:
        return "(no runs)\n"
    return accuracy_table(df).markdown()


def failures(df: pd.DataFrame) -> list[str]:
    """One line per cell that did not finish: status, name, the line of its error to read."""
    cells = cells_only(df)
    bad = cells[cells["status"] != tracking.FINISHED]
    return [f"{r['status']}: {r.get('label') or r['name']}"
            + (f"  {error_line(r['error'])}" if r["error"] else "")
            for _, r in bad.iterrows()]


def error_line(error: str, width: int = 300) -> str:
    """A divergence's own message ('diverged at epoch e, step s ...') wherever the error
    holds it (a child's error may open with its type or a log tail), else the first line."""
    for line in error.splitlines():
        if DIVERGED_ERROR in line:
            return line[line.index(DIVERGED_ERROR):][:width]
    return error.splitlines()[0][:width] if error.strip() else ""


# ---- LaTeX ---------------------------------------------------------------------------------
_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
        "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
        "^": r"\textasciicircum{}", "±": r"$\pm$", "×": r"$\times$", "−": "$-$", "—": "--",
        "–": "--", CONTENDED: r"$^{\dagger}$", DIVERGED: r"$^{\ddagger}$"}
MARKS = (CONTENDED, DIVERGED)


def tex_escape(text: object) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(text))


def _unmarked(text: str) -> str:
    for mark in MARKS:
        text = text.replace(mark, "")
    return text.replace(",", "").strip()


def to_latex(t: pd.DataFrame, caption: str, footnotes: list[str] | None = None) -> str:
    """A booktabs table (\\toprule, \\midrule, \\bottomrule); needs \\usepackage{booktabs}.
    Footnotes (what † and ‡ mean) go under the tabular, in small type."""
    if t.empty:
        return f"% {tex_escape(caption)}: nothing to compare\n"
    numeric = [pd.to_numeric(t[c].astype(str).map(_unmarked), errors="coerce")
               .notna().all() for c in t.columns]
    spec = "".join("r" if n else "l" for n in numeric)
    lines = [r"\begin{table}[htbp]", r"\centering", rf"\caption{{{tex_escape(caption)}}}",
             rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(tex_escape(c) for c in t.columns) + r" \\", r"\midrule"]
    lines += [" & ".join(tex_escape("" if pd.isna(v) else v) for v in row) + r" \\"
              for row in t.itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}"]
    lines += [rf"\par\footnotesize {tex_escape(f)}" for f in footnotes or [] if f]
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


# ---- report.md -----------------------------------------------------------------------------
def _uniq(series: pd.Series | None) -> list:
    if series is None:
        return []
    return sorted({v for v in series.dropna() if v != ""},
                  key=lambda v: (isinstance(v, str), v if not isinstance(v, str) else 0, str(v)))


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
    done = _finished(cells)

    def vals(col):
        return ", ".join(str(v) for v in _uniq(cells.get(col))) or "—"

    grid = (f"Grid `{p.get('t_grid', data.experiment)}` ({p.get('t_grid_path', '?')}), "
            f"invocation `{p.get('run_name', '')}` (parent run `{p.get('run_id')}`, "
            f"{p.get('status', '?')})" if p else f"All cell runs of experiment "
            f"`{data.experiment}` (newest finished run per cell)")
    expected = f" of the {data.expected} the grid expects" if data.expected else ""
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
        "Accuracy is top-1 on each cell's held-out test split; groups of seeds show mean, "
        "std and a 95% t-interval (n=1: the single value). Throughput is the median step "
        "rate after warm-up with the device synchronised before each clock read.",
    ]
    gaps = {s: int(c) for s, c in status.items() if s != tracking.FINISHED}
    if gaps:
        parts.append(f"{fin} of {n} cells finished; "
                     + ", ".join(f"{c} {s}" for s, c in sorted(gaps.items()))
                     + " (listed below and marked in every table).")
    else:
        parts.append(f"All {n} cells finished.")
    return " ".join(x for x in parts if x)


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
    return f" Not the budget asked: {_cells(len(off))} ({_few(names)})."


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
        what = ", ".join(f"{SELECT_TEXT.get(k, k)} in {_cells(c)}" for k, c in counts.items())
        what += " (select varies: rows are kept apart by it)"
    best = _finished(cells[select == "best_val"])
    tested = _col(best, "test_epoch").dropna()
    span = _span(tested)
    epochs = f"; tested epoch{'s' if '–' in span else ''} {span}" if len(tested) else ""
    return f"The test evaluates {what}{epochs}."


def device_sentence(cells: pd.DataFrame) -> str:
    counts = _col(cells, "p_device_kind").fillna("cpu").value_counts()
    if len(counts) == 1:
        return f"device kind {counts.index[0]}."
    kinds = ", ".join(f"{k} ({_cells(c)})" for k, c in sorted(counts.items()))
    return f"device kinds {kinds}: cells on different kinds are never averaged together."


def _reasons(tags: pd.Series, most: int = 3) -> str:
    """'why (n cells)' for each distinct reason of 'false: why' tags."""
    why = tags.map(lambda t: str(t).split(":", 1)[1].strip() if ":" in str(t) else "")
    counts = why.replace("", "no reason given").value_counts()
    items = [f"{w[:160]} ({_cells(c)})" for w, c in counts.items()]
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
    """Finished cells whose loss ended above the first epoch's; cells failed on NaN/inf."""
    done = _finished(cells)
    rec = int(tag_recorded(done, "diverged").sum())
    blew_up = int((status_labels(cells) == f"{tracking.FAILED} (diverged)").sum())
    failed = f"; {_cells(blew_up)} failed on a NaN/inf loss (listed below)" if blew_up else ""
    if done.empty:
        return f"{failed[2:]}." if blew_up else ""
    if not rec:
        return f"Divergence of the finished cells: not recorded{failed}."
    n = diverged_cells(done)
    unrec = _unrecorded(rec, len(done))
    head = (f"{n} of {rec} finished cells diverged" + _paren(
        "final train loss above the first epoch's", f"{DIVERGED} in the accuracy tables", unrec)
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
                     "best val acc": _num(r.get("best_val_acc")),
                     "wall s": _num(r.get("wall_seconds"), 1), "cells using it": int(users)})
    return ("## Pretraining runs\n\nBackbones pretrained on a source dataset by the harness; "
            "not part of the comparison tables.\n\n"
            + pd.DataFrame(rows).to_markdown(index=False) + "\n")


def _num(v, digits: int = 3) -> str:
    return "—" if v is None or pd.isna(v) else f"{v:.{digits}f}"


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
    fig_after = {"accuracy": "accuracy_vs_depth", "throughput": "pareto"}
    for t in tables:
        out.append(t.markdown())
        out.append(f"Files: [md](tables/{t.name}.md), [tex](tables/{t.name}.tex), "
                   f"[csv](tables/{t.name}.csv)\n")
        for png in figures.get(fig_after.get(t.name, ""), []):
            out.append(f"![{Path(png).stem}]({png})\n")
    if figures.get("learning_curves"):
        out.append("### Learning curves\n")
        out += [f"![{Path(p).stem}]({p})\n" for p in figures["learning_curves"]]
    pre = pretrain_section(data)
    if pre:
        out.append(pre)
    out.append("Every cell as one row: [runs.csv](runs.csv), [runs.parquet](runs.parquet).\n")
    return "\n".join(out)


@dataclass
class Written:
    folder: Path
    files: list[Path] = field(default_factory=list)
    logged_to: str | None = None


def write(data: ReportData, out: Path, figures: dict[str, list[str]],
          log: bool = True) -> Written:
    """Everything into `out`: runs.csv/.parquet, tables/*.{md,tex,csv}, report.md with the
    `figures` (bench.figures.all_figures(data, out / "figures"): figures/*.{png,svg});
    report.md and its files are logged to the grid's parent run."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "tables").mkdir(exist_ok=True)
    w = Written(out)
    frame = data.frame.copy()
    frame.to_csv(out / "runs.csv", index=False)
    obj = [c for c in frame.columns if frame[c].dtype == object]
    frame[obj] = frame[obj].map(lambda v: None if v is None else str(v))
    frame.to_parquet(out / "runs.parquet", index=False)
    w.files += [out / "runs.csv", out / "runs.parquet"]
    tables = all_tables(data.frame)
    for t in tables:
        for ext, text in (("md", t.markdown()), ("tex", t.latex())):
            (out / "tables" / f"{t.name}.{ext}").write_text(text)
            w.files.append(out / "tables" / f"{t.name}.{ext}")
        t.numeric.to_csv(out / "tables" / f"{t.name}.csv", index=False)
        w.files.append(out / "tables" / f"{t.name}.csv")
    for paths in figures.values():
        for p in paths:
            w.files += [out / p, (out / p).with_suffix(".svg")]
    (out / "report.md").write_text(report_markdown(data, tables, figures))
    w.files.append(out / "report.md")
    if log and data.parent:
        tracking.log_report(data.parent["run_id"], str(out))
        w.logged_to = data.parent["run_id"]
    return w
