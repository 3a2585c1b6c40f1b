"""A display frame as a LaTeX booktabs table; † and ‡ as superscript daggers."""

from __future__ import annotations

import pandas as pd

from bench.report_frame import CONTENDED, DIVERGED

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
