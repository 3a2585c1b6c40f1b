"""The tables of each cell group, built from the flat frame (bench/report/frame.py) only:
accuracy, throughput, cost; every table (with the comparisons of bench/report/compare.py:
framework delta, best strategy, relative) and the lines of the cells that did not finish.
What a Table holds and how it renders: bench/report/table.py."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from bench import tracking
from bench.report.compare import best_strategy_table, framework_delta_table, relative_table
from bench.report.frame import (
    CONTENDED,
    DIVERGED_ERROR,
    PART_RATE,
    SUSPECT_RATE,
    cells_only,
    contended_cells,
    distinct_values,
    diverged_cells,
    finished_rows,
    finished_values,
    frameworks,
    group_keys,
    not_finished,
    part_rate_cells,
    suspect_rate_cells,
    tag_true,
)
from bench.report.groups import accuracy_cell, group_status, row_groups
from bench.report.stats import summarize
from bench.report.table import (
    EPOCH,
    PERCENT,
    RATE,
    SECONDS,
    SI,
    SUMMARY,
    TIMES,
    Table,
    cell_frames,
    contended_footnote,
    diverged_footnote,
    header,
    marks,
    part_rate_footnote,
    suspect_rate_footnote,
    unrecorded_footnote,
)
from bench.report.tuned import tuned_table


def _max_share(rows: pd.DataFrame) -> float:
    share = finished_values(rows[tag_true(rows, "contended")], "contention_share").dropna()
    return float(share.max()) if len(share) else math.nan


def accuracy_table(df: pd.DataFrame, metric: str = "test_acc") -> Table:
    """Test accuracy per backbone x strategy[depth] x weights (rows) and framework
    (columns): mean ± std [95% t-interval] n over seeds."""
    keys = group_keys(df)
    fws = frameworks(df)
    numeric, shown = [], {}
    for kv, fw, rows in row_groups(df, keys):
        s = summarize(finished_values(rows, metric))
        numeric.append({**dict(zip(keys, kv, strict=True)), "framework": fw, **s,
                        "cells": len(rows), "diverged": diverged_cells(rows),
                        "not_finished": not_finished(rows)})
        shown.setdefault(kv, {})[fw] = accuracy_cell(s, rows)
    cells, marks, notes = cell_frames([{**{header(k): v for k, v in zip(keys, kv, strict=True)},
                                        **{f"{metric} ({fw})": cols.get(fw, "not in grid")
                                           for fw in fws}}
                                       for kv, cols in shown.items()])
    return Table("accuracy", "Test accuracy", pd.DataFrame(numeric), cells,
                 {f"{metric} ({fw})": SUMMARY for fw in fws},
                 "mean ± std [95% t-interval] n over seeds; n=1 is a single run. "
                 "Cells that did not finish are counted by status.", [diverged_footnote(df)],
                 marks, notes)


RATES = ("end_to_end_images_per_sec", "train_images_per_sec",
         "model_only_train_images_per_sec", "inference_images_per_sec")
SPEEDUPS = {"end_to_end_images_per_sec": "end_to_end_speedup_vs_full",
            "train_images_per_sec": "speedup_vs_full",
            "model_only_train_images_per_sec": "model_only_speedup_vs_full"}


def _throughput_numeric(df: pd.DataFrame, keys: list[str]) -> tuple[pd.DataFrame, list]:
    """One row per cell group and framework: the rates and seconds (means over finished
    seeds), what they time, the counts of marked cells; and each group's rows."""
    rows_out, group_rows = [], []
    for kv, fw, rows in row_groups(df, keys):
        group_rows.append(rows)
        done = finished_rows(rows)
        r = {**dict(zip(keys, kv, strict=True)), "framework": fw, "n": len(done),
             "cells": len(rows), "strategy": rows["p_strategy"].iloc[0]}
        for col in (*RATES, "end_to_end_seconds", "train_seconds", "feature_cache_seconds"):
            r[col] = finished_values(rows, col).mean()
        for col, tag in (("input_bound", "input_bound"), ("feature_cache", "feature_cache_used"),
                         ("rate_of", "train_rate_of")):
            vals = done.get(f"t_{tag}", pd.Series(dtype=object)).dropna()
            r[col] = ",".join(sorted(set(vals))) if len(vals) else None
        r["part_rate"] = part_rate_cells(rows)
        r["rate_suspect"] = suspect_rate_cells(rows)
        r["contended"] = contended_cells(rows)
        r["contention_share"] = _max_share(done)
        r["not_finished"] = not_finished(rows)
        rows_out.append(r)
    return pd.DataFrame(rows_out), group_rows


def _speedups(numeric: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Each rate over full fine-tuning's of the same backbone and framework (same dataset,
    weights and other keys but the strategy, lr and weight decay: the rate does not depend
    on the optimizer's settings), and whether that reference was contended."""
    base_keys = [k for k in keys if k not in ("p_strategy_label", "p_lr", "p_weight_decay")]
    base_keys += ["framework"]
    full = numeric[numeric["strategy"] == "full"].copy()
    full["_plain"] = full["p_strategy_label"] != "full"  # prefer plain `full` as reference
    ref = full.sort_values("_plain").drop_duplicates(base_keys).set_index(base_keys)
    idx = pd.MultiIndex.from_frame(numeric[base_keys]) if len(base_keys) > 1 \
        else pd.Index(numeric[base_keys[0]])
    for col, out in SPEEDUPS.items():
        refv = ref[col].reindex(idx).to_numpy() if col in ref else np.nan
        numeric[out] = numeric[col].to_numpy() / refv
    # a speed-up is as contended as either of its two rates
    numeric["full_contended"] = ref["contended"].reindex(idx).fillna(0).astype(int).to_numpy()
    return numeric.drop(columns="strategy")


def throughput_table(df: pd.DataFrame) -> Table:
    """Per cell group and framework: end-to-end train images/s (epochs, feature caching and
    precise BatchNorm counted: frame.end_to_end) and its speed-up over full fine-tuning of
    the same backbone; the data-fed and model-only step rates, marked § where they time only
    the part above a feature cache; inference images/s. What the cells timed, and the
    seconds the end-to-end rate divides: timing_table."""
    keys = group_keys(df)
    numeric, group_rows = _throughput_numeric(df, keys)
    if numeric.empty:
        return Table("throughput", "Throughput", numeric)
    numeric = _speedups(numeric, keys)
    shown = []
    for (_, r), rows in zip(numeric.iterrows(), group_rows, strict=True):
        d = {header(k): r[k] for k in keys}
        d["framework"] = r["framework"]
        if r["n"] == 0:
            d.update({c: "" for c in THROUGHPUT_COLUMNS})
            d[next(iter(THROUGHPUT_COLUMNS))] = group_status(rows)
        else:
            d.update(_throughput_cells(r))
        shown.append(d)
    cells, marks_, notes = cell_frames(shown)
    return Table("throughput", "Throughput", numeric, cells, THROUGHPUT_COLUMNS,
                 "Images/s, means over seeds. End-to-end: the images a cell's epochs trained "
                 "over the seconds they took, with the forward pass that built its feature "
                 "cache (feature extraction: the features of train, val and test) and "
                 "precise BatchNorm's recalibration where on: what to compare strategies by. "
                 "Speed-up: end-to-end images/s over full fine-tuning of the same backbone "
                 f"and framework{_device_note(df)}. Step: each cell's median data-fed "
                 "training step rate (warm-up excluded); model-only: the same step on a "
                 "synthetic batch already on the device; inference: the whole model. "
                 "— : not measured (no epoch history; a cell with fewer training steps than "
                 "the warm-up has no step rate) or no full fine-tuning to compare with.",
                 [part_rate_footnote(df), suspect_rate_footnote(df),
                  contended_footnote(df, "A speed-up is marked when either of its rates is."),
                  unrecorded_footnote(df)], marks_, notes)


THROUGHPUT_COLUMNS = {"end-to-end img/s": RATE, "speed-up vs full": TIMES,
                      "step img/s": RATE, "model-only img/s": RATE, "inference img/s": RATE}


def _throughput_cells(r: pd.Series) -> dict:
    """The rates of a row with finished cells: † where contended, § where a step rate times
    only the part above a feature cache, ¶ where the data-fed rate sat above model-only."""
    own = r["contended"] > 0
    either = own or r["full_contended"] > 0
    part = r["part_rate"] > 0
    odd = r["rate_suspect"] > 0
    return {"end-to-end img/s": (r["end_to_end_images_per_sec"], marks((own, CONTENDED)),
                                 r["not_finished"]),
            "speed-up vs full": (r["end_to_end_speedup_vs_full"], marks((either, CONTENDED))),
            "step img/s": (r["train_images_per_sec"],
                           marks((part, PART_RATE), (odd, SUSPECT_RATE), (own, CONTENDED))),
            "model-only img/s": (r["model_only_train_images_per_sec"],
                                 marks((part, PART_RATE), (odd, SUSPECT_RATE),
                                       (own, CONTENDED))),
            "inference img/s": (r["inference_images_per_sec"], marks((own, CONTENDED)))}


def timing_table(df: pd.DataFrame) -> Table:
    """What the throughput table's rates rest on, per cell group and framework: the seconds
    of training, of building the feature cache and end to end (means over seeds), what the
    step rates time (tlbench.train_rate_of), and the input-bound and feature cache tags
    where the cells record them. Apart from the rates so that each table fits a page."""
    keys = group_keys(df)
    numeric, group_rows = _throughput_numeric(df, keys)
    if numeric.empty:
        return Table("timing", "What the rates time", numeric)
    show = {col: numeric[col].notna().any() for col in TIMING_TAGS.values()}
    shown = []
    for (_, r), rows in zip(numeric.iterrows(), group_rows, strict=True):
        d = {**{header(k): r[k] for k in keys}, "framework": r["framework"]}
        if r["n"] == 0:
            d.update({c: "" for c in TIMING_COLUMNS})
            d[next(iter(TIMING_COLUMNS))] = group_status(rows)
        else:
            shared = marks((r["contended"] > 0, CONTENDED))
            d.update({"train s": (r["train_seconds"], shared, r["not_finished"]),
                      "cache s": (r["feature_cache_seconds"], shared),
                      "end-to-end s": (r["end_to_end_seconds"], shared)})
        d.update({name: r[col] for name, col in TIMING_TAGS.items() if show[col]})
        shown.append(d)
    cells, marks_, notes = cell_frames(shown)
    numeric = numeric[[*keys, "framework", "n", "cells", "train_seconds",
                       "feature_cache_seconds", "end_to_end_seconds", "rate_of",
                       "input_bound", "feature_cache", "contended", "not_finished"]]
    return Table("timing", "What the rates time", numeric, cells, TIMING_COLUMNS,
                 "Seconds, means over seeds. Train: the training epochs (evaluation "
                 "excluded); cache: the forward pass that built the feature cache; "
                 "end-to-end: both, with precise BatchNorm's recalibration where on (what "
                 "end-to-end img/s divides by). Step rate of: what the step and model-only "
                 "rates time (tag tlbench.train_rate_of); input-bound and feature cache: "
                 "the cells' tags.",
                 [contended_footnote(df, "The seconds of those cells are marked."),
                  unrecorded_footnote(df)], marks_, notes)


TIMING_COLUMNS = {"train s": SECONDS, "cache s": SECONDS, "end-to-end s": SECONDS}
TIMING_TAGS = {"step rate of": "rate_of", "input-bound": "input_bound",
               "feature cache": "feature_cache"}


def _device_note(df: pd.DataFrame) -> str:
    """', on the same device kind' when kinds vary (a row key), else ', on <kind>'."""
    kinds = distinct_values(cells_only(df).get("p_device_kind"))
    if len(kinds) > 1:
        return ", on the same device kind"
    return f", on {kinds[0]}" if kinds else ""


def cost_table(df: pd.DataFrame) -> Table:
    """Trainable parameters (count and fraction of the model), wall time, and time to the
    best val accuracy (epoch seconds summed up to best_val_epoch); means over seeds."""
    keys = group_keys(df)
    rows_out, shown = [], []
    for kv, fw, rows in row_groups(df, keys):
        r = {**dict(zip(keys, kv, strict=True)), "framework": fw,
             "n": len(finished_rows(rows)), "cells": len(rows)}
        for col in ("trainable_params", "total_params", "trainable_fraction", "wall_seconds",
                    "time_to_best_s", "best_val_epoch"):
            r[col] = finished_values(rows, col).mean()
        r["contended"] = contended_cells(rows)
        r["not_finished"] = not_finished(rows)
        rows_out.append(r)
        d = {**{header(k): v for k, v in zip(keys, kv, strict=True)}, "framework": fw}
        if r["n"] == 0:
            d.update({"trainable params": group_status(rows), "trainable %": "",
                      "wall s": "", "time to best val s": "", "best epoch": ""})
        else:
            d.update(_cost_cells(r))
        shown.append(d)
    cells, marks, notes = cell_frames(shown)
    return Table("cost", "Cost", pd.DataFrame(rows_out), cells,
                 {"trainable params": SI, "trainable %": PERCENT, "wall s": SECONDS,
                  "time to best val s": SECONDS, "best epoch": EPOCH},
                 "Means over seeds. Trainable %: trainable over total parameters at the end "
                 "of training. Time to best val: the training epochs' seconds summed up to "
                 "the epoch of the best val accuracy (evaluation excluded).",
                 [contended_footnote(df, "The seconds of those cells are marked."),
                  unrecorded_footnote(df)], marks, notes)


def _cost_cells(r: dict) -> dict:
    """A row with finished cells; the seconds marked † where they were contended."""
    shared = CONTENDED if r["contended"] > 0 else ""
    return {"trainable params": (r["trainable_params"], "", r["not_finished"]),
            "trainable %": r["trainable_fraction"],
            "wall s": (r["wall_seconds"], shared),
            "time to best val s": (r["time_to_best_s"], shared),
            "best epoch": r["best_val_epoch"]}


def all_tables(df: pd.DataFrame) -> list[Table]:
    """Every table; the relative one when some group has `full` and another strategy."""
    relative = relative_table(df)
    tuned = tuned_table(df)
    return ([tuned] if tuned is not None else []) + \
        [accuracy_table(df), throughput_table(df), timing_table(df), cost_table(df),
         framework_delta_table(df), best_strategy_table(df)] + \
        ([relative] if not relative.cells.empty else [])


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
