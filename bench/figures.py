"""Figures from the report's flat frame (matplotlib, Agg canvas), each as PNG and SVG.

    accuracy_vs_depth_<dataset>   test accuracy vs unfrozen blocks, a panel per backbone, a
                                  line per framework, error bars = 95% t-interval
    pareto_<dataset>              test accuracy vs train images/s, the Pareto front marked;
                                  hollow: timed on a shared machine, not on the front
    curves_<backbone>_<dataset>   train and val accuracy per epoch of one backbone's cells

Uses matplotlib's object API (no pyplot): no global state, no display needed.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd
from matplotlib import ticker

from bench import report
from strategies import backbones

MARKERS = {"torch": "o", "keras": "s"}
COLORS = {"torch": "C0", "keras": "C1"}
DEPTH_FAMILY = ("feature_extraction", "partial", "full")  # one line through these
# x of the Pareto plot: data-fed when measured (a cell with fewer steps than the warm-up
# has none), else model-only
SPEEDS = {"train_images_per_sec": "train images/s (data-fed)",
          "model_only_train_images_per_sec": "train images/s (model-only)"}


def _figure(n_panels: int, width: float = 4.2, height: float = 3.4):
    from matplotlib.figure import Figure

    cols = min(n_panels, 3)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes


def _plain_axes(ax) -> None:
    """Integer x ticks (blocks, epochs) and y values as they are (no 1e-9+0.1 offset)."""
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.yaxis.get_major_formatter().set_useOffset(False)


def _save(fig, folder: Path, stem: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem)
    for ext in ("png", "svg"):
        fig.savefig(folder / f"{stem}.{ext}", dpi=150)
    return f"{folder.name}/{stem}.png"


def unfreeze_depth(strategy: str, depth, backbone: str) -> float:
    """Blocks trainable in the cell's last phase: 0 for feature extraction, every block for
    full fine-tuning, the depth parameter otherwise (NaN when unknown)."""
    info = backbones.BACKBONES.get(backbone)
    n = info.n_blocks if info else math.nan
    if strategy == "feature_extraction":
        return 0.0
    if strategy == "full" or depth == "all":
        return float(n)
    num = pd.to_numeric(depth, errors="coerce")
    return float(num) if pd.notna(num) else math.nan


def _variant(label: str) -> str:
    """The strategy parameters of a label except depth: 'partial[depth=2,bn=frozen]' ->
    'bn=frozen'."""
    if "[" not in label:
        return ""
    inner = label[label.index("[") + 1:-1]
    return ",".join(p for p in inner.split(",") if not p.startswith("depth="))


def _summary_frame(df: pd.DataFrame) -> pd.DataFrame:
    """One row per cell group and framework: accuracy summary, train images/s, depth."""
    acc = report.accuracy_table(df).numeric
    if acc.empty:
        return acc
    keys = report.group_keys(df)
    cells = report.cells_only(df).copy()
    cells[keys] = cells[keys].astype(str)
    done = cells[cells["status"] == "FINISHED"]
    first = cells.drop_duplicates([*keys, "p_framework"]).set_index([*keys, "p_framework"])
    idx = pd.MultiIndex.from_frame(acc[[*keys, "framework"]])
    for col in SPEEDS:
        speed = (done.groupby([*keys, "p_framework"])[col].mean() if col in done
                 else pd.Series(dtype=float))
        acc[col] = speed.reindex(idx).to_numpy() if len(speed) else math.nan
    shared = done.assign(_shared=report.tag_true(done, "contended"))
    acc["contended"] = (shared.groupby([*keys, "p_framework"])["_shared"].any()
                        .reindex(idx, fill_value=False).astype(bool).to_numpy()
                        if len(shared) else False)
    acc["strategy"] = first["p_strategy"].reindex(idx).to_numpy()
    depth = first["p_strategy.depth"].reindex(idx).to_numpy() \
        if "p_strategy.depth" in first else [None] * len(acc)
    acc["depth"] = [unfreeze_depth(s, d, b) for s, d, b in
                    zip(acc["strategy"], depth, acc["p_backbone"], strict=True)]
    acc["err"] = (acc["ci_high"] - acc["mean"]).fillna(0.0)
    return acc


def _panel_keys(keys: list[str]) -> list[str]:
    return [k for k in keys if k not in ("p_dataset", "p_strategy_label")]


def accuracy_vs_depth(df: pd.DataFrame, folder: Path) -> list[str]:
    s = _summary_frame(df)
    if s.empty:
        return []
    keys = report.group_keys(df)
    panel_keys = _panel_keys(keys)
    out = []
    for dataset, d in s.groupby("p_dataset", sort=True):
        panels = list(d.groupby(panel_keys, sort=True))
        fig, axes = _figure(len(panels))
        for ax, (pk, p) in zip(axes, panels, strict=False):
            pk = pk if isinstance(pk, tuple) else (pk,)
            for (fw, variant, other), g in p.groupby(
                    [p["framework"], p["p_strategy_label"].map(_variant),
                     p["strategy"].where(~p["strategy"].isin(DEPTH_FAMILY), "")], sort=True):
                g = g[g["n"] > 0].sort_values("depth")
                if g.empty:
                    continue
                name = " ".join(x for x in (fw, other, variant) if x)
                ax.errorbar(g["depth"], g["mean"], yerr=g["err"], marker=MARKERS.get(fw, "^"),
                            color=COLORS.get(fw, "C2"), linestyle=":" if other else
                            ("--" if variant else "-"), mfc="none" if other else None,
                            capsize=3, label=name)
            gaps = p[p["not_finished"] != ""]
            if len(gaps):
                ax.text(0.01, 0.01, "not finished: " + "; ".join(
                    f"{r.framework} {r.p_strategy_label} ({r.not_finished})"
                    for r in gaps.itertuples()), transform=ax.transAxes, fontsize=6,
                        va="bottom", wrap=True)
            ax.set_title(" / ".join(str(v) for v in pk), fontsize=9)
            _plain_axes(ax)
            lo, hi = ax.get_ylim()  # an interval past 0 or 1 says n is small, not more
            ax.set_ylim(max(lo, -0.02), min(hi, 1.02))
            info = backbones.BACKBONES.get(str(p["p_backbone"].iloc[0]))
            if info:
                ax.set_xlim(-0.3, info.n_blocks + 0.3)
            ax.set_xlabel("unfrozen blocks (0 = head only)")
            ax.set_ylabel("test accuracy")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        fig.suptitle(f"{dataset}: accuracy vs unfreeze depth (mean, 95% t-interval)",
                     fontsize=10)
        out.append(_save(fig, folder, f"accuracy_vs_depth_{dataset}"))
    return out


def pareto_front(points: pd.DataFrame, x: str, y: str) -> pd.Series:
    """True for the points no other point beats on both x and y (higher is better)."""
    order = points.sort_values([x, y], ascending=False)
    best, front = -math.inf, pd.Series(False, index=points.index)
    for i, r in order.iterrows():
        if r[y] > best:
            front[i] = True
            best = r[y]
    return front


def pareto_points(df: pd.DataFrame) -> tuple[pd.DataFrame, str | None]:
    """One point per cell group and framework with finished cells and a speed: columns
    speed, mean, contended, front. A point timed while the machine was shared is no
    measurement: it is never on the front and puts no other point off it."""
    s = _summary_frame(df)
    x = next((c for c in SPEEDS if c in s and s[c].notna().any()), None)
    if x is None:
        return s.iloc[:0], None
    s = s[(s["n"] > 0) & s[x].notna()].rename(columns={x: "speed"})
    s["front"] = False
    for _, d in s.groupby("p_dataset"):
        measured = d[~d["contended"]]
        s.loc[measured.index, "front"] = pareto_front(measured, "speed", "mean")
    return s, x


def pareto(df: pd.DataFrame, folder: Path) -> list[str]:
    s, x = pareto_points(df)
    return [_save(pareto_figure(d, dataset, SPEEDS[x]), folder, f"pareto_{dataset}")
            for dataset, d in s.groupby("p_dataset", sort=True)] if x else []


def pareto_figure(d: pd.DataFrame, dataset: str, xlabel: str):
    """Accuracy vs train speed of one dataset's points (pareto_points); hollow markers:
    timed while other processes used the machine, left off the front."""
    fig, axes = _figure(1, 6.5, 4.6)
    ax = axes[0]
    colors = {b: f"C{i}" for i, b in enumerate(sorted(d["p_backbone"].unique()))}
    for fw, g in d.groupby("framework"):
        for shared, h in g.groupby("contended"):
            c = [colors[b] for b in h["p_backbone"]]
            ax.scatter(h["speed"], h["mean"], marker=MARKERS.get(fw, "^"), s=36, zorder=3,
                       facecolors="none" if shared else c, edgecolors=c,
                       linewidths=1.2 if shared else None)
        ax.scatter([], [], marker=MARKERS.get(fw, "^"), c="0.45", label=fw)
    if d["contended"].any():
        ax.scatter([], [], marker="o", facecolors="none", edgecolors="0.45",
                   label="machine shared while timed (not on the front)")
    f = d[d["front"]].sort_values("speed")
    ax.step(f["speed"], f["mean"], where="pre", color="k", lw=1,
            alpha=0.6, label="Pareto front", zorder=2)
    ax.scatter(f["speed"], f["mean"], facecolors="none", edgecolors="k",
               s=110, zorder=4)
    for r in f.itertuples():  # only the front is named: the rest overlap too much
        ax.annotate(f"{r.framework} {r.p_backbone} {r.p_strategy_label}", (r.speed,
                    r.mean), fontsize=6, xytext=(4, 4), textcoords="offset points")
    for b, c in colors.items():
        ax.scatter([], [], marker="D", c=c, label=b)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.yaxis.get_major_formatter().set_useOffset(False)
    ax.set_xlabel(f"{xlabel}, log scale")
    ax.set_ylabel("test accuracy (mean over seeds)")
    ax.set_title(f"{dataset}: accuracy vs train throughput", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def pick_backbone(df: pd.DataFrame) -> str | None:
    """The backbone with the most finished cells (ties: alphabetical)."""
    cells = report.cells_only(df)
    done = cells[cells["status"] == "FINISHED"]
    if done.empty:
        return None
    counts = done["p_backbone"].value_counts()
    return sorted(counts[counts == counts.max()].index)[0]


def learning_curves(data: report.ReportData, folder: Path,
                    backbone: str | None = None) -> list[str]:
    df, hist = data.cells, data.history
    backbone = backbone or pick_backbone(df)
    if backbone is None or hist.empty:
        return []
    keys = report.group_keys(df)
    line_keys = [k for k in keys if k not in ("p_dataset", "p_backbone")] + ["p_framework"]
    cells = df[(df["p_backbone"] == backbone) & (df["status"] == "FINISHED")]
    h = hist.merge(cells[["run_id", "p_dataset", *line_keys]], on="run_id")
    out = []
    for dataset, d in h.groupby("p_dataset", sort=True):
        fig, axes = _figure(2)
        for ax, key in zip(axes, ("train_acc", "val_acc"), strict=True):
            k = d[d["key"] == key]
            for i, (lk, g) in enumerate(k.groupby(line_keys, sort=True)):
                lk = lk if isinstance(lk, tuple) else (lk,)
                mean = g.groupby("step")["value"].mean()
                fw = lk[-1]
                ax.plot(mean.index, mean.values, marker=MARKERS.get(fw, "^"), ms=3,
                        linestyle="-" if fw == "torch" else "--", color=f"C{i % 10}",
                        label=" ".join(str(v) for v in lk))
            _plain_axes(ax)
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel("epoch")
            ax.set_ylabel(key.replace("_", " "))
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=6)
        fig.suptitle(f"{backbone} on {dataset}: learning curves (mean over seeds)",
                     fontsize=10)
        out.append(_save(fig, folder, f"curves_{backbone}_{dataset}"))
    return out


def all_figures(data: report.ReportData, folder: Path,
                curves_backbone: str | None = None) -> dict[str, list[str]]:
    """{'accuracy_vs_depth': [...], 'pareto': [...], 'learning_curves': [...]}: PNG paths
    relative to the report folder (an SVG lies beside each)."""
    return {"accuracy_vs_depth": accuracy_vs_depth(data.frame, folder),
            "pareto": pareto(data.frame, folder),
            "learning_curves": learning_curves(data, folder, curves_backbone)}
