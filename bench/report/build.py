"""MLflow runs -> one flat row per cell (pandas) -> comparison tables and a report.

    python -m bench report [GRID-or-EXPERIMENT] [--parent RUN_ID] [--out reports/]

The top of the report: `load()` reads the selection, `write()` puts everything under
reports/<experiment>/ with report.md on top. The work lives in modules named for their job;
each is imported from where it is defined:

    frame     the selection from MLflow into the flat frame (one row per cell, MISSING rows
              for cells no run holds), and the row queries every table shares
    stats     mean, std, 95% t-interval over seeds; the paired t-test (scipy)
    table     what a table is: numbers (CSV; the cells as shown, with the marks
              † (timed on a shared machine) and ‡ (diverged) beside them), a formatter per
              column, and the footnotes
    groups    the cell groups a table's rows are built from, in table order
    tables    the tables of each cell group (accuracy, throughput, cost), and all of them
    compare   the comparison tables: framework delta, best strategy, relative to full
    latex     a table's text as a LaTeX booktabs table (pandas Styler)
    text      report.md: the methods paragraph and its sentences, pretraining runs
    html      report.html: report.md with the figures inline

bench/report/figures.py draws the figures from the tables (it imports them; no table module
imports a figure): accuracy vs depth and Pareto there, the learning curves in curves.py, the helpers
they share in plot.py. Every table keeps failed, killed, running and missing cells as rows
that say so; what the cells record about their own conditions is said, never hidden.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from bench import tracking
from bench.report import html
from bench.report.frame import (
    ReportData,
)
from bench.report.tables import (
    all_tables,
)
from bench.report.text import (
    report_markdown,
)


@dataclass
class Written:
    folder: Path
    files: list[Path] = field(default_factory=list)
    logged_to: str | None = None


def write(data: ReportData, out: Path, figures: dict[str, list[str]],
          log: bool = True) -> Written:
    """Everything into `out`: runs.csv/.parquet, tables/*.{md,tex,csv}, report.md with the
    `figures` (bench.report.figures.all_figures(data, out / "figures"): figures/*.{png,svg});
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
    md = report_markdown(data, tables, figures)
    (out / "report.md").write_text(md)
    run_id = data.parent["run_id"] if log and data.parent else None
    (out / "report.html").write_text(html.render(md, out, f"Report: {data.experiment}",
                                                 run_id))
    w.files += [out / "report.md", out / "report.html"]
    if log and data.parent:
        tracking.log_report(data.parent["run_id"], str(out))
        w.logged_to = data.parent["run_id"]
    return w
