"""The comparison tables, built from the flat frame (bench/report/frame.py) only: accuracy,
throughput, cost, framework delta, best strategy. A Table holds numbers: a numeric frame
(CSV: numbers, with counts such as `contended` and `diverged` beside them) and the cells as
shown (numbers, summaries, labels, statuses of what did not finish), with the marks
† (timed on a shared machine) and ‡ (diverged) and the notes of what did not finish as
frames beside them, and a Column per shown column saying how its numbers are written.
Rendering formats them (Table.display); each mark is explained in a footnote."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from bench import tracking
from bench.report.frame import (
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
from bench.report.latex import to_latex
from bench.report.stats import paired_test, summarize
from strategies import backbones as bb
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


def _text(value) -> str:
    """A label as it is; a missing one as nothing."""
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else str(value)


@dataclass(frozen=True)
class Column:
    """How a shown column is written: `fmt` turns its number (or summary) into text; a str
    in the column is a status or label ('3 MISSING', 'no pair') and is shown as it is.
    `kind` 'number' right-aligns the column in LaTeX; `note` is how a cell's note (what did
    not finish) follows its text."""

    fmt: Callable[..., str] = _text
    kind: str = "text"  # "number" or "text"
    note: str = " ({})"  # how a note follows the text
    mark_inside: bool = False  # fmt(value, mark) places the mark itself

    def text(self, value, mark: str = "", note: str = "") -> str:
        if isinstance(value, str):
            text = _marked(value, bool(mark), mark)
        elif self.mark_inside:
            text = self.fmt(value, mark)
        else:
            text = _marked(self.fmt(value), bool(mark), mark)
        return text + self.note.format(note) if note else text


TEXT = Column()


@dataclass
class Table:
    """`numeric` is written as CSV: one row per cell group and framework, numbers and
    counts. `cells` is the table as shown: a row per table row, a column per shown column,
    holding numbers (a summary dict for an accuracy), plain labels and statuses; `marks`
    (same shape: '', † or ‡) and `notes` (same shape: what did not finish, '1 FAILED')
    are data beside it, and `columns` says how each column is written (TEXT when not
    named). Markdown and LaTeX both render `display`, the cells written out."""

    name: str
    title: str
    numeric: pd.DataFrame  # written as CSV
    cells: pd.DataFrame = field(default_factory=pd.DataFrame)  # what is shown, unformatted
    columns: dict[str, Column] = field(default_factory=dict)
    note: str = ""
    footnotes: list[str] = field(default_factory=list)  # under the table: what marks mean
    marks: pd.DataFrame | None = None  # per cell: "", CONTENDED or DIVERGED
    notes: pd.DataFrame | None = None  # per cell: "" or what did not finish

    def column(self, name: str) -> Column:
        return self.columns.get(name, TEXT)

    @property
    def display(self) -> pd.DataFrame:
        """The cells as text: each column's formatter, then its mark and note."""
        marks = self.marks if self.marks is not None else _blank(self.cells)
        notes = self.notes if self.notes is not None else _blank(self.cells)
        out = pd.DataFrame(index=self.cells.index)
        for c in self.cells.columns:
            col = self.column(c)
            out[c] = [col.text(v, m, n) for v, m, n in
                      zip(self.cells[c], marks[c], notes[c], strict=True)]
        return out

    def markdown(self) -> str:
        # the text as rendered ("+0.040" keeps its sign and digits: no re-parsing as a
        # number), numbers right-aligned as in LaTeX
        align = ["right" if self.column(c).kind == "number" else "left"
                 for c in self.cells.columns]
        body = self.display.to_markdown(index=False, disable_numparse=True, colalign=align) \
            if not self.cells.empty else "(nothing to compare)"
        notes = "".join(f"\n{f}\n" for f in self.footnotes if f)
        return f"### {self.title}\n\n{self.note + chr(10) + chr(10) if self.note else ''}" \
               f"{body}\n{notes}"

    def latex(self) -> str:
        kinds = [self.column(c).kind for c in self.cells.columns]
        return to_latex(self.display, self.title, self.footnotes, kinds)


def _blank(cells: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame("", index=cells.index, columns=cells.columns)


def _frames(rows: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Rows of {column: value or (value, mark) or (value, mark, note)} -> cells, marks,
    notes (one frame each, the same shape)."""
    cells, marks, notes = [], [], []
    for r in rows:
        parts = {c: (*v, "", "")[:3] if isinstance(v, tuple) else (v, "", "")
                 for c, v in r.items()}
        cells.append({c: p[0] for c, p in parts.items()})
        marks.append({c: p[1] for c, p in parts.items()})
        notes.append({c: p[2] for c, p in parts.items()})
    return (pd.DataFrame(cells), pd.DataFrame(marks).fillna(""),
            pd.DataFrame(notes).fillna(""))


def _strategy_order(df: pd.DataFrame) -> pd.Series:
    """Registry order, then depth; named block sets from the input side to the output side
    (by their first block in the backbone, then how many)."""
    names = list(registry.STRATEGIES)
    rank = df["p_strategy"].map(lambda s: names.index(s) if s in names else len(names))
    depth = df.get("p_strategy.depth", pd.Series(index=df.index, dtype=object))
    depth = depth.map(lambda d: 999 if d == "all" else pd.to_numeric(d, errors="coerce"))
    if "p_strategy.names" in df:
        sets = [_block_set_order(b, n) for b, n in zip(df["p_backbone"], df["p_strategy.names"],
                                                       strict=True)]
        depth = depth.fillna(pd.Series(sets, index=df.index, dtype=float))
    return rank * 10000 + depth.fillna(0)


def _block_set_order(backbone, names) -> float:
    """`stem+stage1` on MobileNetV2 -> 2 (first block 0, two blocks); nan when unknown."""
    try:
        blocks = list(bb.get(str(backbone)).blocks)
        at = [blocks.index(n) for n in registry.split_blocks(names)]
    except (KeyError, ValueError):
        return math.nan
    return min(at) * 100 + len(at)


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


def _by_seed(rows: pd.DataFrame, column: str) -> pd.Series:
    """A group's finished values of `column` indexed by seed (what paired_test pairs)."""
    return finished_rows(rows).set_index("p_seed")[column] if column in rows else pd.Series()


def _strategies_per_group(df: pd.DataFrame) -> tuple[list[str], dict]:
    """The group keys but the strategy, and {(their values, framework): {strategy label:
    rows}} in table order: the strategies a best-of or a relative-to compares."""
    keys = group_keys(df)
    outer = [k for k in keys if k != "p_strategy_label"]
    per: dict[tuple, dict] = {}
    for kv, fw, rows in _groups(df, keys):
        key = tuple(v for k, v in zip(keys, kv, strict=True) if k != "p_strategy_label")
        per.setdefault((key, fw), {})[kv[keys.index("p_strategy_label")]] = rows
    return outer, per


def accuracy_table(df: pd.DataFrame, metric: str = "test_acc") -> Table:
    """Test accuracy per backbone x strategy[depth] x weights (rows) and framework
    (columns): mean ± std [95% t-interval] n over seeds."""
    keys = group_keys(df)
    fws = frameworks(df)
    numeric, shown = [], {}
    for kv, fw, rows in _groups(df, keys):
        s = summarize(finished_values(rows, metric))
        numeric.append({**dict(zip(keys, kv, strict=True)), "framework": fw, **s,
                        "cells": len(rows), "diverged": diverged_cells(rows),
                        "not_finished": not_finished(rows)})
        shown.setdefault(kv, {})[fw] = _accuracy_cell(s, rows)
    cells, marks, notes = _frames([{**{_header(k): v for k, v in zip(keys, kv, strict=True)},
                                    **{f"{metric} ({fw})": cols.get(fw, "not in grid")
                                       for fw in fws}}
                                   for kv, cols in shown.items()])
    return Table("accuracy", "Test accuracy", pd.DataFrame(numeric), cells,
                 {f"{metric} ({fw})": SUMMARY for fw in fws},
                 "mean ± std [95% t-interval] n over seeds; n=1 is a single run. "
                 "Cells that did not finish are counted by status.", [diverged_footnote(df)],
                 marks, notes)


def _status(rows: pd.DataFrame) -> str:
    """What a group with nothing finished shows: its status ('FAILED', '2 MISSING')."""
    return status_labels(rows).iloc[0] if len(rows) == 1 else not_finished(rows)


def _accuracy_cell(s: dict, rows: pd.DataFrame) -> tuple:
    """(summary, ‡ when a cell of the group diverged, what did not finish), or the status
    alone when nothing finished."""
    if s["n"] == 0:
        return _status(rows)
    return s, DIVERGED if diverged_cells(rows) > 0 else "", not_finished(rows)


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
        return Table("throughput", "Throughput", numeric)
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
    shown = []
    for (_, r), rows in zip(numeric.iterrows(), group_rows, strict=True):
        d = {_header(k): r[k] for k in keys}
        d["framework"] = r["framework"]
        if r["n"] == 0:
            d.update({"train img/s": _status(rows), "model-only img/s": "",
                      "inference img/s": "", "speed-up vs full": "",
                      "model-only speed-up": ""})
        else:
            d.update(_throughput_cells(r))
        if show_bound:
            d["input-bound"] = r["input_bound"]
        if show_cache:
            d["feature cache"] = r["feature_cache"]
        shown.append(d)
    cells, marks, notes = _frames(shown)
    return Table("throughput", "Throughput", numeric, cells,
                 {"train img/s": RATE, "model-only img/s": RATE, "inference img/s": RATE,
                  "speed-up vs full": TIMES, "model-only speed-up": TIMES},
                 "Images/s, mean over seeds of each cell's median step rate (warm-up "
                 "excluded). Data-fed: the training loop with its input pipeline; "
                 "model-only: a synthetic batch already on the device. Speed-up: train "
                 "images/s over full fine-tuning of the same backbone and framework"
                 f"{_device_note(df)}. "
                 "— : not measured (a cell with fewer training steps than the warm-up "
                 "has no data-fed rate) or no full fine-tuning to compare with.",
                 [contended_footnote(df, "A speed-up is marked when either of its rates is."),
                  unrecorded_footnote(df)], marks, notes)


def _throughput_cells(r: pd.Series) -> dict:
    """The rates of a row with finished cells, marked † where they were contended."""
    own = CONTENDED if r["contended"] > 0 else ""
    either = CONTENDED if r["contended"] > 0 or r["full_contended"] > 0 else ""
    return {"train img/s": (r["train_images_per_sec"], own, r["not_finished"]),
            "model-only img/s": (r["model_only_train_images_per_sec"], own),
            "inference img/s": (r["inference_images_per_sec"], own),
            "speed-up vs full": (r["speedup_vs_full"], either),
            "model-only speed-up": (r["model_only_speedup_vs_full"], either)}


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


def _epoch(v: float) -> str:
    return "—" if pd.isna(v) else f"{v:.1f}".removesuffix(".0")


def _signed(v: float) -> str:
    return "—" if pd.isna(v) else f"{v:+.3f}"


def _paired(test: dict) -> str:
    """'+0.012, p=0.034', or the verdict when no p-value exists ('n too small (1 pair)')."""
    return (f"{test['mean_diff']:+.3f}, p={test['p_value']:.3g}"
            if pd.notna(test["p_value"]) else test["verdict"])


def _ranked(r: dict, mark: str) -> str:
    """'full (0.914)', the mark (‡: a cell of the strategy diverged) by the mean."""
    mean = f"{r['mean']:.3f}"
    return f"{r['label']} ({_marked(mean, bool(mark), mark)})"


# how the tables write their numbers (a str in a column is shown as it is)
SUMMARY = Column(fmt_summary, "number", note="; {}")
RATE = Column(_rate, "number")
TIMES = Column(_times, "number")
SI = Column(_si, "number")
PERCENT = Column(lambda v: fmt_number(100 * v, 1), "number")
SECONDS = Column(lambda v: fmt_number(v, 1), "number")
EPOCH = Column(_epoch, "number")
SIGNED = Column(_signed, "number")
PAIRED = Column(_paired)
RANKED = Column(_ranked, mark_inside=True)


def cost_table(df: pd.DataFrame) -> Table:
    """Trainable parameters (count and fraction of the model), wall time, and time to the
    best val accuracy (epoch seconds summed up to best_val_epoch); means over seeds."""
    keys = group_keys(df)
    rows_out, shown = [], []
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
            d.update({"trainable params": _status(rows), "trainable %": "",
                      "wall s": "", "time to best val s": "", "best epoch": ""})
        else:
            d.update(_cost_cells(r))
        shown.append(d)
    cells, marks, notes = _frames(shown)
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


def framework_delta_table(df: pd.DataFrame, a: str = "torch", b: str = "keras",
                          metric: str = "test_acc") -> Table:
    """PyTorch minus Keras for every cell group both frameworks have in the grid: the
    difference of mean accuracy, the same paired over seeds, and the train speed ratio."""
    keys = group_keys(df)
    by = {}
    for kv, fw, rows in _groups(df, keys):
        by.setdefault(kv, {})[fw] = rows
    numeric, shown = [], []
    for kv, fws in by.items():
        if a not in fws or b not in fws:
            continue
        ra, rb = fws[a], fws[b]
        sa, sb = summarize(finished_values(ra, metric)), summarize(finished_values(rb, metric))
        test = paired_test(_by_seed(ra, metric), _by_seed(rb, metric))
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
        d[f"{metric} {a}"] = _accuracy_cell(sa, ra)
        d[f"{metric} {b}"] = _accuracy_cell(sb, rb)
        if sa["n"] and sb["n"]:
            d[f"{a} − {b}"] = r["delta"]
            d["paired over seeds"] = test
            d[f"train speed {a}/{b}"] = (speed, CONTENDED if r["speed_contended"] > 0 else "")
        else:
            d[f"{a} − {b}"] = "no pair"
            d["paired over seeds"] = ""
            d[f"train speed {a}/{b}"] = ""
        shown.append(d)
    note = (f"{a} minus {b} for each cell group the grid runs in both frameworks; paired: "
            f"mean difference over matching seeds and its paired t-test p-value.")
    if not numeric:
        note = f"No cell group runs in both {a} and {b}."
    shared = contended_footnote(df, f"A marked speed ratio is no {a}/{b} difference: one "
                                    f"side or both were timed on a shared machine.")
    cells, marks, notes = _frames(shown)
    return Table("framework_delta", f"Framework delta ({a} − {b})", pd.DataFrame(numeric),
                 cells, {f"{metric} {a}": SUMMARY, f"{metric} {b}": SUMMARY,
                         f"{a} − {b}": SIGNED, "paired over seeds": PAIRED,
                         f"train speed {a}/{b}": TIMES},
                 note, [shared, diverged_footnote(df)], marks, notes)


def best_strategy_table(df: pd.DataFrame, metric: str = "test_acc") -> Table:
    """Per dataset x backbone x weights x framework: the strategy with the best mean test
    accuracy, its margin over the runner-up, and whether the lead holds over seeds (paired
    t-test on the seeds both ran, 5% level)."""
    outer, per = _strategies_per_group(df)
    numeric, shown = [], []
    for (key, fw), by_label in per.items():
        strategies = list(by_label.items())
        ranked = sorted(((summarize(finished_values(rows, metric)), label, rows)
                         for label, rows in strategies if len(finished_rows(rows))),
                        key=lambda t: -t[0]["mean"])
        skipped = [f"{label} ({_status(rows)})" for label, rows in strategies
                   if not len(finished_rows(rows))]
        r = {**dict(zip(outer, key, strict=True)), "framework": fw,
             "best": None, "best_mean": math.nan, "runner_up": None,
             "runner_up_mean": math.nan, "margin": math.nan, "pairs": 0,
             "p_value": math.nan, "verdict": "", "not_compared": "; ".join(skipped),
             "best_diverged": 0}
        if ranked:
            s1, l1, rows1 = ranked[0]
            r.update(best=l1, best_mean=s1["mean"], best_diverged=diverged_cells(rows1))
            if len(ranked) > 1:
                s2, l2, rows2 = ranked[1]
                test = paired_test(_by_seed(rows1, metric), _by_seed(rows2, metric))
                r.update(runner_up=l2, runner_up_mean=s2["mean"],
                         margin=s1["mean"] - s2["mean"], pairs=test["pairs"],
                         p_value=test["p_value"], verdict=test["verdict"])
            else:
                r["verdict"] = "no runner-up"
        numeric.append(r)
        shown.append({**{_header(k): v for k, v in zip(outer, key, strict=True)},
                      "framework": fw,
                      "best": _ranked_cell(r["best"], r["best_mean"], ranked[0][2])
                      if r["best"] else "none finished",
                      "runner-up": _ranked_cell(r["runner_up"], r["runner_up_mean"],
                                                ranked[1][2]) if r["runner_up"] else "—",
                      "margin": r["margin"], "holds over seeds": r["verdict"],
                      "not compared": r["not_compared"]})
    cells, marks, notes = _frames(shown)
    return Table("best_strategy", "Best strategy", pd.DataFrame(numeric), cells,
                 {"best": RANKED, "runner-up": RANKED, "margin": SIGNED},
                 "By mean test accuracy over seeds. Holds over seeds: a paired t-test of "
                 "best minus runner-up on the seeds both ran (5% level); with fewer than two "
                 "matching seeds no test is possible.", [diverged_footnote(df)], marks, notes)


def _ranked_cell(label: str, mean: float, rows: pd.DataFrame) -> tuple:
    """({label, mean}, ‡ when a cell of the strategy diverged)."""
    return {"label": label, "mean": mean}, DIVERGED if diverged_cells(rows) > 0 else ""


def _relative(test: dict) -> str:
    """'+0.034 ± 0.012 (p=0.04, 3)': the paired mean difference ± its standard error."""
    if not test["pairs"]:
        return "no pair"
    se = "" if pd.isna(test["se"]) else f" ± {test['se']:.3f}"
    p = "" if pd.isna(test["p_value"]) else f"p={test['p_value']:.2g}, "
    return f"{test['mean_diff']:+.3f}{se} ({p}n={test['pairs']})"


RELATIVE = Column(_relative, "number")
NO_ADAPTATION = "no adaptation (the source model)"


def relative_table(df: pd.DataFrame, baseline: str = "full",
                   metric: str = "test_acc") -> Table:
    """Each strategy minus `baseline` (a strategy label) in the same group (dataset,
    backbone, weights, ...) and framework, paired over the seeds both ran: the mean
    difference ± its standard error and the paired t-test's p. Lee et al. 2023 plot their
    Figure 2 this way (surgical minus full fine-tuning, standard errors over three runs).
    Empty when no group has the baseline and another strategy."""
    outer, per = _strategies_per_group(df)
    numeric, shown = [], {}
    for (key, fw), strategies in per.items():
        base = strategies.get(baseline)
        if base is None or len(strategies) < 2:
            continue
        b = _by_seed(base, metric)
        arms = [(label, rows, metric) for label, rows in strategies.items()
                if label != baseline]
        source = f"source_{metric}"  # the source model before any step (head_init = source)
        if source in base and finished_values(base, source).notna().any():
            arms.insert(0, (NO_ADAPTATION, base, source))
        for label, rows, column in arms:
            test = paired_test(_by_seed(rows, column), b)
            diverged = diverged_cells(base) + (diverged_cells(rows) if rows is not base else 0)
            numeric.append({**dict(zip(outer, key, strict=True)), "framework": fw,
                            "strategy": label, "baseline": baseline, **test,
                            "diverged": diverged})
            mark = DIVERGED if diverged else ""
            shown.setdefault((key, label), {})[fw] = (test, mark)
    fws = [fw for fw in frameworks(df) if any(fw in c for c in shown.values())]
    cells, marks, notes = _frames([
        {**{_header(k): v for k, v in zip(outer, key, strict=True)}, "strategy": label,
         **{f"{metric} − {baseline} ({fw})": cols.get(fw, "—") for fw in fws}}
        for (key, label), cols in shown.items()])
    return Table("relative", f"Relative to {baseline}", pd.DataFrame(numeric), cells,
                 {f"{metric} − {baseline} ({fw})": RELATIVE for fw in fws},
                 f"Each strategy minus `{baseline}` on the seeds both ran (same dataset, "
                 f"backbone, weights and framework): mean difference ± standard error, the "
                 f"paired t-test's p and the pairs (as Lee et al. 2023 plot Figure 2)."
                 + (" No adaptation: the source model, head included, scored on the same "
                    "test split before any step (cells with head_init = source)."
                    if any(r["strategy"] == NO_ADAPTATION for r in numeric) else ""),
                 [diverged_footnote(df)], marks, notes)


def all_tables(df: pd.DataFrame) -> list[Table]:
    """Every table; the relative one when some group has `full` and another strategy."""
    relative = relative_table(df)
    return [accuracy_table(df), throughput_table(df), cost_table(df),
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


def fmt_number(v, digits: int = 3) -> str:
    return "—" if v is None or pd.isna(v) else f"{v:.{digits}f}"
