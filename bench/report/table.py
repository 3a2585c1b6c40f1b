"""A Table holds numbers: a numeric frame (CSV: numbers, with counts such as `contended` and
`diverged` beside them) and the cells as shown (numbers, summaries, labels, statuses of what
did not finish), with the marks † (timed on a shared machine) and ‡ (diverged) and the notes
of what did not finish as frames beside them, and a Column per shown column saying how its
numbers are written. Rendering formats them (Table.display); each mark is explained in a
footnote (here too). The tables themselves: bench/report/tables.py and compare.py."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd

from bench.report.frame import (
    CONTENDED,
    DIVERGED,
    PART_RATE,
    SUSPECT_RATE,
    WHOLE_MODEL,
    cells_only,
    diverged_cells,
    finished_rows,
    finished_values,
    part_rate_cells,
    suspect_rate_cells,
    tag_recorded,
    tag_true,
)
from bench.report.latex import to_latex

HEADERS = {"p_strategy_label": "strategy", "p_device_kind": "device kind"}


def header(col: str) -> str:
    return HEADERS.get(col) or (col[2:] if col.startswith("p_") else col)


def fmt_summary(s: dict, digits: int = 3) -> str:
    if s["n"] == 0:
        return ""
    if s["n"] == 1:
        return f"{s['mean']:.{digits}f} (n=1)"
    return (f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f} "
            f"[{s['ci_low']:.{digits}f}, {s['ci_high']:.{digits}f}] n={s['n']}")


def fmt_number(v, digits: int = 3) -> str:
    return "—" if v is None or pd.isna(v) else f"{v:.{digits}f}"


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
    return (f"{DIVERGED} diverged: final train loss above the first epoch's or over 10x the "
            f"chance level ({cells_phrase(n)}).")


def part_rate_footnote(df: pd.DataFrame) -> str:
    """The § footnote of a table with step rates ('' when every rate times the whole
    model)."""
    done = finished_rows(cells_only(df))
    n = part_rate_cells(done)
    if not n:
        return ""
    what = sorted({str(v) for v in done.get("t_train_rate_of", pd.Series(dtype=object))
                   .dropna() if str(v).strip() not in ("", WHOLE_MODEL)})
    return (f"{PART_RATE} step and model-only rates of the part that trains above a feature "
            f"cache, not of the whole model ({cells_phrase(n)}; tag tlbench.train_rate_of: "
            f"{'; '.join(what)}): no speed of the strategy. Compare cells by end-to-end "
            f"img/s, which counts building the cache.")


def suspect_rate_footnote(df: pd.DataFrame) -> str:
    """The ¶ footnote of a table with step rates ('' when no cell's data-fed rate sat above
    its model-only rate)."""
    n = suspect_rate_cells(finished_rows(cells_only(df)))
    if not n:
        return ""
    return (f"{SUSPECT_RATE} data-fed step rate above the model-only rate ({cells_phrase(n)}; "
            f"tag tlbench.rate_check): a loop that also reads its input cannot be faster than "
            f"the model alone, so the two windows did not time the same work; read neither "
            f"rate as the strategy's speed.")


def marks(*pairs: tuple[bool, str]) -> str:
    """The marks whose flag is set, in order, one space apart ('§ †')."""
    return " ".join(m for flag, m in pairs if flag)


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


def cell_frames(rows: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
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


def _relative(test: dict) -> str:
    """'+0.034 ± 0.012 (p=0.04, 3)': the paired mean difference ± its standard error."""
    if not test["pairs"]:
        return "no pair"
    se = "" if pd.isna(test["se"]) else f" ± {test['se']:.3f}"
    p = "" if pd.isna(test["p_value"]) else f"p={test['p_value']:.2g}, "
    return f"{test['mean_diff']:+.3f}{se} ({p}n={test['pairs']})"


RELATIVE = Column(_relative, "number")
