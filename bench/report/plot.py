"""What the figures share (matplotlib's object API, no pyplot): a figure of panels, plain
axes, saving as PNG and SVG, a colour per configuration, labels that name the params that
vary (key=value), framework markers and dashes, and a sensible y range for accuracies."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd
from matplotlib import ticker

from bench.report.frame import FRAMEWORK_ORDER

MARKERS = {"torch": "o", "keras": "s"}
COLORS = {"torch": "C0", "keras": "C1"}
FW_LINE = {"torch": "-", "keras": "--"}  # and keras hollow: framework is fill and dash
FW_ORDER = {fw: i for i, fw in enumerate(FRAMEWORK_ORDER)}


def new_figure(n_panels: int, width: float = 4.2, height: float = 3.4, cols: int = 3,
               sharey: bool = False):
    from matplotlib.figure import Figure

    cols = min(n_panels, cols)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, sharey=sharey).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes


def plain_axes(ax) -> None:
    """Integer x ticks (blocks, epochs) and y values as they are (no 1e-9+0.1 offset)."""
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True, min_n_ticks=1))
    ax.yaxis.get_major_formatter().set_useOffset(False)


def save(fig, folder: Path, stem: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem)
    for ext in ("png", "svg"):
        fig.savefig(folder / f"{stem}.{ext}", dpi=150)
    return f"{folder.name}/{stem}.png"


def _name(key: str) -> str:
    return key[2:] if key.startswith("p_") else key


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def varying(rows: pd.DataFrame, keys: list[str]) -> list[str]:
    """The keys that take more than one value among the rows: what a label must name."""
    return [k for k in keys if k in rows and rows[k].astype(str).nunique() > 1]


def kv(row, keys: list[str], sep: str = " ") -> str:
    return sep.join(f"{_name(k)}={_fmt(row[k])}" for k in keys)


def config_label(row, keys: list[str]) -> str:
    """'full[bn=frozen] weights=imagenet lr=0.0001': the strategy as labelled, then the
    params that vary, key=value."""
    return " ".join(x for x in (str(row["p_strategy_label"]), kv(row, keys)) if x)


def config_colors(configs: list) -> dict:
    """One colour per configuration, the same in every panel of a figure."""
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(configs) <= 10 else "tab20"]
    return {c: cmap(i % cmap.N) for i, c in enumerate(configs)}


def y_limits(values, min_width: float = 0.2) -> tuple[float, float]:
    """A y range for accuracies: every value (error bars and reference lines included),
    padded, at least `min_width` wide, within [0, 1]. Never a zoom onto float noise."""
    v = [float(x) for x in values if x is not None and pd.notna(x)]
    lo, hi = (min(v), max(v)) if v else (0.0, 1.0)
    pad = max(0.02, 0.08 * (hi - lo))
    lo, hi = max(0.0, lo - pad), min(1.0, hi + pad)  # an interval past 0 or 1: n is small
    if hi - lo < min_width:
        lo = min(max(0.0, (lo + hi - min_width) / 2), 1.0 - min_width)
        hi = lo + min_width
    return lo, hi
