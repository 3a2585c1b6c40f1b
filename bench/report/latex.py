"""A table's text as a LaTeX booktabs table through pandas' Styler; † and ‡ as superscript
daggers, § and ¶ as superscript section and paragraph signs."""

from __future__ import annotations

import pandas as pd
from pandas.api.types import is_numeric_dtype

from bench.report.frame import CONTENDED, DIVERGED, PART_RATE, SUSPECT_RATE

_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
        "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
        "^": r"\textasciicircum{}", "±": r"$\pm$", "×": r"$\times$", "−": "$-$", "—": "--",
        "–": "--", CONTENDED: r"$^{\dagger}$", DIVERGED: r"$^{\ddagger}$",
        PART_RATE: r"$^{\S}$", SUSPECT_RATE: r"$^{\P}$"}
MARKS = (CONTENDED, DIVERGED, PART_RATE, SUSPECT_RATE)


def tex_escape(text: object) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(text))


def to_latex(t: pd.DataFrame, caption: str, footnotes: list[str] | None = None,
             kinds: list[str] | None = None) -> str:
    """A booktabs table (\\toprule, \\midrule, \\bottomrule); needs \\usepackage{booktabs}.
    `kinds` ('number' or 'text' per column; by dtype when not given): numbers right-aligned.
    Footnotes (what † and ‡ mean) go under the tabular, in small type."""
    if t.empty:
        return f"% {tex_escape(caption)}: nothing to compare\n"
    kinds = kinds or ["number" if is_numeric_dtype(t[c]) else "text" for c in t.columns]
    spec = "".join("r" if k == "number" else "l" for k in kinds)
    tex = (t.style.hide(axis="index")
           .format(lambda v: "" if v is None or v != v else tex_escape(v))  # NaN: blank
           .format_index(tex_escape, axis="columns")
           .to_latex(column_format=spec, hrules=True, caption=tex_escape(caption),
                     environment="table", position="htbp", position_float="centering"))
    notes = "".join(rf"\par\footnotesize {tex_escape(f)}" + "\n" for f in footnotes or [] if f)
    head, end = tex.rsplit(r"\end{table}", 1)
    return head + notes + r"\end{table}" + end
