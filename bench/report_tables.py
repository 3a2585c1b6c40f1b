"""The comparison tables, built from the flat frame (bench/report_frame.py) only: accuracy,
throughput, cost, framework delta, best strategy. A Table is a numeric frame (CSV: numbers,
with counts such as `contended` and `diverged` beside them) and a display frame (Markdown,
LaTeX) whose cells say what did not finish and carry the marks † (timed on a shared machine)
and ‡ (diverged), each explained in a footnote under the table."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from bench import tracking
from bench.report_frame import (
    CONTENDED,
    DIVERGED,
    DIVERGED_ERROR,
    FRAMEWORK_ORDER,
    cells_only,
    contended_cells,
    distinct_values,
    diverged_cells,
    finished_rows,
    finished_values,
    frameworks,
    group_keys,
    not_finished,
    status_labels,
    tag_recorded,
    tag_true,
)
from bench.report_latex import to_latex
from bench.report_stats import paired_test, summarize
from strategies import registry

HEADERS = {"p_strategy_label": "strategy", "p_device_kind": "device kind"}


def _header(col: str) -> str:
    return HEADERS.get(col) or (col[2:] if col.startswith("p_") else col)


def fmt_summary(s: dict, digits: int = 3) -> str:
    if s["n"] == 0:
        return ""
    if s["n"] == 1:
        return f"{s['mean']:.{digits}f} (n=1)"
    return (f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f} "
            f"[{s['ci_low']:.{digits}f}, {s['ci_high']:.{digits}f}] n={s['n']}")


def _with_gaps(text: str, rows: pd.DataFrame) -> str:
    gaps = not_finished(rows)
    if not text:  # nothing finished: the statuses alone ("FAILED", "2 MISSING")
        return status_labels(rows).iloc[0] if len(rows) == 1 else gaps
    return f"{text}; {gaps}" if gaps else text


def _max_share(rows: pd.DataFrame) -> float:
    share = finished_values(rows[tag_true(rows, "contended")], "contention_share").dropna()
    return float(share.max()) if len(share) else math.nan


def cells_phrase(n: int) -> str:
    return f"{n} cell{'s' if n != 1 else ''}"


def _marked(text: str, flag: bool, mark: str) -> str:
    return f"{text} {mark}" if flag and text not in ("", "—") else text


def _pct_span(values: pd.Series) -> str:
    lo, hi = 100 * values.min(), 100 * values.max()
    return f"{hi:.0f}%" if round(lo) == round(hi) else f"{lo:.0f}–{hi:.0f}%"


def contended_footnote(df: pd.DataFrame, what: str = "") -> str:
    """The † footnote of a table with speed figures ('' when no cell was contended)."""
    done = finished_rows(cells_only(df))
    hit = done[tag_true(done, "contended")]
    if hit.empty:
        return ""
    share = finished_values(hit, "contention_share").dropna()
    used = (f"other processes used {_pct_span(share)} of the CPU" if len(share)
            else "other processes used the machine (share not recorded)")
    return (f"{CONTENDED} measured while {used} ({cells_phrase(len(hit))}): a speed figure "
            f"taken while the machine was shared is not a measurement."
            f"{' ' + what if what else ''}")


def unrecorded_footnote(df: pd.DataFrame) -> str:
    """Says for how many finished cells machine sharing while timed is not recorded."""
    done = finished_rows(cells_only(df))
    missing = int((~tag_recorded(done, "contended")).sum())
    if not missing:
        return ""
    return (f"Whether the machine was shared while timed: not recorded for {missing} of "
            f"{len(done)} finished cells.")


def diverged_footnote(df: pd.DataFrame) -> str:
    n = diverged_cells(cells_only(df))
    if not n:
        return ""
    return f"{DIVERGED} diverged: final train loss above the first epoch's ({cells_phrase(n)})."


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


def accuracy_table(df: pd.DataFrame, metric: str = "test_acc") -> Table:
    """Test accuracy per backbone x strategy[depth] x weights (rows) and framework
    (columns): mean ± std [95% t-interval] n over seeds."""
    keys = group_keys(df)
    fws = frameworks(df)
    numeric, disp = [], {}
    for kv, fw, rows in _groups(df, keys):
        s = summarize(finished_values(rows, metric))
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
             "n": len(finished_rows(rows)), "cells": len(rows),
             "strategy": rows["p_strategy"].iloc[0]}
        for col in ("train_images_per_sec", "model_only_train_images_per_sec",
                    "inference_images_per_sec"):
            r[col] = finished_values(rows, col).mean()
        for col, tag in (("input_bound", "input_bound"), ("feature_cache", "feature_cache_used")):
            vals = finished_rows(rows).get(f"t_{tag}", pd.Series(dtype=object)).dropna()
            r[col] = ",".join(sorted(set(vals))) if len(vals) else None
        r["contended"] = contended_cells(rows)
        r["contention_share"] = _max_share(finished_rows(rows))
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
    kinds = distinct_values(cells_only(df).get("p_device_kind"))
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
             "n": len(finished_rows(rows)), "cells": len(rows)}
        for col in ("trainable_params", "total_params", "trainable_fraction", "wall_seconds",
                    "time_to_best_s", "best_val_epoch"):
            r[col] = finished_values(rows, col).mean()
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
            "trainable %": fmt_number(100 * r["trainable_fraction"], 1),
            "wall s": _marked(fmt_number(r["wall_seconds"], 1), shared, CONTENDED),
            "time to best val s": _marked(fmt_number(r["time_to_best_s"], 1), shared, CONTENDED),
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
        sa, sb = summarize(finished_values(ra, metric)), summarize(finished_values(rb, metric))
        pa = finished_rows(ra).set_index("p_seed")[metric] if metric in ra else pd.Series()
        pb = finished_rows(rb).set_index("p_seed")[metric] if metric in rb else pd.Series()
        test = paired_test(pa, pb)
        speed = (finished_values(ra, "train_images_per_sec").mean()
                 / finished_values(rb, "train_images_per_sec").mean())
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
        ranked = sorted(((summarize(finished_values(rows, metric)), label, rows)
                         for label, rows in strategies if len(finished_rows(rows))),
                        key=lambda t: -t[0]["mean"])
        skipped = [f"{label} ({_with_gaps('', rows)})" for label, rows in strategies
                   if not len(finished_rows(rows))]
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
                test = paired_test(finished_rows(rows1).set_index("p_seed")[metric],
                                   finished_rows(rows2).set_index("p_seed")[metric])
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


def fmt_number(v, digits: int = 3) -> str:
    return "—" if v is None or pd.isna(v) else f"{v:.{digits}f}"
