"""Figures from the report's flat frame (matplotlib, Agg canvas), each as PNG and SVG.

    accuracy_vs_depth_<dataset>   test accuracy (mean over seeds; bars: 95% t-interval when
                                  n > 1) vs blocks trainable in the last phase (0 = feature
                                  extraction ... n = full; reinit_top: the top blocks it
                                  re-initialises), a panel per (backbone, pretrained
                                  weights), titled key=value. Each panel holds every
                                  strategy of those weights: feature_extraction, partial
                                  and full as one line per framework and variant
                                  (bn=frozen ...), two_stage, reinit_top and the rest as
                                  their own marked series; cells that differ in a param the
                                  grid varies (lr, precise_bn ...) are separate series whose
                                  labels name it ("torch full[bn=frozen] lr=0.0001"). The
                                  backbone's from-scratch cells (weights none) are labelled
                                  horizontal reference lines (one line, its label naming
                                  them all, where several show the same value), a panel
                                  of their own only where no pretrained cell of the
                                  backbone finished. Colour = configuration; torch solid
                                  and filled, keras dashed and hollow; each series shifted
                                  on x by a fraction of a block so that none hides
                                  another; one y range for all panels, at least 0.2 wide,
                                  within [0, 1]; legends below the axes.
    pareto_<dataset>              test accuracy vs end-to-end train images/s (log: epochs,
                                  feature caching and precise BN counted), one point per
                                  configuration and framework: colour = configuration
                                  (legend: strategy and the params that vary, key=value),
                                  marker = framework, the Pareto front stepped and circled;
                                  hollow: timed on a shared machine, not on the front; the
                                  title names the backbone and weights all points share
    curves_<backbone>_<dataset>   the learning curves: bench/report/curves.py

depth_panels / depth_figures and pareto_figure return what is drawn (the panels' series,
matplotlib Figures) for tests; accuracy_vs_depth and pareto save them; all_figures draws
them all, learning curves included. Uses matplotlib's object API (no pyplot): no global
state, no display needed. The helpers they share: bench/report/plot.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from matplotlib import ticker

from bench.report import frame, tables, tuned
from bench.report.curves import learning_curves
from bench.report.plot import (
    FW_LINE,
    FW_ORDER,
    MARKERS,
    config_colors,
    config_label,
    kv,
    new_figure,
    plain_axes,
    save,
    varying,
    y_limits,
)
from strategies import backbones

DEPTH_FAMILY = ("feature_extraction", "partial", "full")  # one line through these
# x of the Pareto plot: end-to-end (feature caching counted) when recorded; for runs
# without it a step rate, data-fed (a cell with fewer steps than the warm-up has none) else
# model-only, and then only of the cells whose step times the whole model
SPEEDS = {"end_to_end_images_per_sec": "end-to-end train images/s (epochs + feature caching)",
          "train_images_per_sec": "train images/s (data-fed step, whole-model cells only)",
          "model_only_train_images_per_sec":
              "train images/s (model-only step, whole-model cells only)"}


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
    acc = tables.accuracy_table(df).numeric
    if acc.empty:
        return acc
    keys = frame.group_keys(df)
    cells = frame.cells_only(df).copy()
    cells[keys] = cells[keys].astype(str)
    done = cells[cells["status"] == "FINISHED"]
    first = cells.drop_duplicates([*keys, "p_framework"]).set_index([*keys, "p_framework"])
    idx = pd.MultiIndex.from_frame(acc[[*keys, "framework"]])
    for col in SPEEDS:
        speed = (done.groupby([*keys, "p_framework"])[col].mean() if col in done
                 else pd.Series(dtype=float))
        acc[col] = speed.reindex(idx).to_numpy() if len(speed) else math.nan
    rate_of = done.get("t_train_rate_of", pd.Series(None, index=done.index, dtype=object))
    flags = done.assign(_shared=frame.tag_true(done, "contended"),
                        _part=rate_of.map(lambda v: isinstance(v, str) and v.strip()
                                          not in ("", frame.WHOLE_MODEL)).astype(bool))
    for col, flag in (("contended", "_shared"), ("part_rate", "_part")):
        acc[col] = (flags.groupby([*keys, "p_framework"])[flag].any()
                    .reindex(idx, fill_value=False).astype(bool).to_numpy()
                    if len(flags) else False)
    acc["strategy"] = first["p_strategy"].reindex(idx).to_numpy()
    depth = first["p_strategy.depth"].reindex(idx).to_numpy() \
        if "p_strategy.depth" in first else [None] * len(acc)
    acc["depth"] = [unfreeze_depth(s, d, b) for s, d, b in
                    zip(acc["strategy"], depth, acc["p_backbone"], strict=True)]
    acc["err"] = (acc["ci_high"] - acc["mean"]).fillna(0.0)
    return acc


FW_SIDE = {"torch": -1, "keras": 1}
KIND_MARKERS = {"depth": "o", "two_stage": "D", "reinit_top": "^"}
REF_GREYS = ("0.15", "0.5", "0.35", "0.65")
REF_LINE = {"torch": "--", "keras": ":"}  # a line naming several frameworks: dash-dot


@dataclass
class Series:
    label: str
    framework: str
    kind: str  # "depth" (feature_extraction/partial/full), a strategy name, or "reference"
    x: list[float]
    y: list[float]
    err: list[float]  # half-width of the 95% t-interval (0 for n = 1)
    config: tuple = ()  # the colour key: the same configuration in both frameworks


@dataclass
class Panel:
    backbone: str
    weights: str
    series: list[Series] = field(default_factory=list)
    references: list[Series] = field(default_factory=list)  # from scratch, x unused
    notes: list[str] = field(default_factory=list)

    @property
    def title(self) -> str:
        return f"backbone={self.backbone}, weights={self.weights}"

    def wrapped_title(self, width: int = 60) -> str:
        return self.title if len(self.title) <= width else self.title.replace(", ", ",\n")


def _depth_series(p: pd.DataFrame, extras: list[str]) -> list[Series]:
    """A panel's points as series: the depth family (feature_extraction/partial/full) one
    line per framework, variant and value of the varied params; feature extraction, which
    trains no block, starts each variant's line; every other strategy its own series."""
    p = p[p["n"] > 0].copy()
    if p.empty:
        return []
    shown = varying(p, extras)
    p["kind"] = p["strategy"].where(~p["strategy"].isin(DEPTH_FAMILY), "depth")
    p["variant"] = p["p_strategy_label"].map(_variant)
    p["params"] = p[extras].astype(str).agg("|".join, axis=1) if extras else ""
    depth = p[p["kind"] == "depth"]
    rows = []
    for _, r in p.iterrows():
        lines = depth[(depth["strategy"] != "feature_extraction")
                      & (depth["framework"] == r["framework"])
                      & (depth["params"] == r["params"])]["variant"].unique()
        if r["strategy"] == "feature_extraction" and r["variant"] == "" and len(lines):
            rows += [{**r, "variant": v} for v in lines]
        else:
            rows.append(dict(r))
    p = pd.DataFrame(rows)
    p["fw_order"] = p["framework"].map(lambda f: FW_ORDER.get(f, len(FW_ORDER)))
    out = []
    for (kind, variant, params, _, fw), g in p.groupby(
            ["kind", "variant", "params", "fw_order", "framework"], sort=True):
        g = g.sort_values("depth")
        name = "/".join(dict.fromkeys(g["strategy"])) if kind == "depth" else kind
        name += f"[{variant}]" if variant else ""
        label = " ".join(x for x in (fw, name, kv(g.iloc[0], shown)) if x)
        out.append(Series(label, fw, kind, list(g["depth"]), list(g["mean"]),
                          list(g["err"]), (kind, variant, params)))
    return out


REF_CLOSE = 0.005  # reference lines nearer than this (accuracy) would show as one


def _references(ref: pd.DataFrame, extras: list[str]) -> list[Series]:
    """From-scratch cells as labelled horizontal lines: 'from scratch: full, precise_bn=320
    (torch) 0.747'. Cells within REF_CLOSE of each other are one line whose label names them
    all ('... (torch, keras) 0.098', or '(torch 0.097, keras 0.100)'): two drawn on top of
    each other would show as one."""
    ref = ref[ref["n"] > 0]
    shown = varying(ref, extras)
    groups: list[list] = []
    ref = ref.assign(fw_order=ref["framework"].map(lambda f: FW_ORDER.get(f, 9)))
    for _, r in ref.sort_values(["p_strategy_label", *extras, "fw_order"]).iterrows():
        params = kv(r, shown, ", ")
        what = f"{r['p_strategy_label']}{', ' + params if params else ''}"
        near = next((g for g in groups if abs(g[0][1]["mean"] - r["mean"]) < REF_CLOSE), None)
        if near is None:
            groups.append(near := [])
        near.append((what, r))
    return [_reference_line(rows, shown) for rows in groups]


def _reference_line(rows: list[tuple], shown: list[str]) -> Series:
    """One line for from-scratch cells at (nearly) one level, at their mean."""
    one = len({f"{r['mean']:.3f}" for _, r in rows}) == 1

    def who(w: str) -> str:
        return ", ".join(r["framework"] + ("" if one else f" {r['mean']:.3f}")
                         for x, r in rows if x == w)
    whats = list(dict.fromkeys(w for w, _ in rows))
    level = sum(r["mean"] for _, r in rows) / len(rows)
    label = "from scratch: " + "; ".join(f"{w} ({who(w)})" for w in whats) \
        + (f" {rows[0][1]['mean']:.3f}" if one else "")
    first = rows[0][1]
    return Series(label, ", ".join(dict.fromkeys(r["framework"] for _, r in rows)),
                  "reference", [], [level], [max(r["err"] for _, r in rows)],
                  (first["p_strategy_label"], kv(first, shown, ", ")))


def depth_panels(df: pd.DataFrame) -> dict[str, list[Panel]]:
    """{dataset: panels}: a panel per (backbone, pretrained weights), from-scratch cells of
    the backbone as its reference lines; from-scratch cells get a panel of their own only
    where the backbone has no pretrained cell that finished."""
    s = _summary_frame(df)
    if s.empty:
        return {}
    keys = frame.group_keys(df)
    extras = [k for k in keys if k not in frame.BASE_KEYS]
    scratch = s["p_weights"].astype(str) == "none"
    out = {}
    for dataset, d in s.groupby("p_dataset", sort=True):
        panels = []
        for backbone, b in d.groupby("p_backbone", sort=True):
            ref, pre = b[scratch[b.index]], b[~scratch[b.index]]
            refs = _references(ref, extras)
            groups = list(pre.groupby("p_weights", sort=True))
            if not (pre["n"] > 0).any() and len(ref):
                groups.append(("none", ref))
            for weights, p in groups:
                panel = Panel(str(backbone), str(weights), _depth_series(p, extras),
                              refs if weights != "none" else [])
                panel.notes = [f"{r.framework} {r.p_strategy_label} ({r.not_finished})"
                               for r in p.itertuples() if r.not_finished]
                panels.append(panel)
        out[str(dataset)] = panels
    return out


def _x_shifts(panel: Panel) -> dict:
    """A small x offset per series, constant along it, so that points at one x (two
    frameworks, two_stage beside partial, two lrs at full) all show: configurations side
    by side, each framework's on its own side."""
    configs = sorted({s.config for s in panel.series}, key=str)
    step = min(0.14, 0.7 / max(len(configs), 1))
    centre = {c: (i - (len(configs) - 1) / 2) * step for i, c in enumerate(configs)}
    return {s.label: centre[s.config] + FW_SIDE.get(s.framework, 0) * step / 4
            for s in panel.series}


def _draw_depth_panel(ax, panel: Panel, colors: dict, greys: dict) -> None:
    shifts = _x_shifts(panel)
    for s in panel.series:
        c = colors[s.config]
        shift = shifts[s.label]
        ax.errorbar([x + shift for x in s.x], s.y,
                    yerr=[e if e > 0 else 0 for e in s.err], color=c,
                    marker=KIND_MARKERS.get(s.kind, "v"), ms=6, capsize=3,
                    linestyle=FW_LINE.get(s.framework, ":"),
                    mfc="white" if s.framework != "torch" else c, label=s.label)
    for r in panel.references:
        g = greys[r.config]
        ax.axhline(r.y[0], color=g, lw=1.3, linestyle=REF_LINE.get(r.framework, "-."),
                   label=r.label)
    if panel.notes:
        ax.text(0.01, 0.01, "not finished: " + "; ".join(panel.notes), transform=ax.transAxes,
                fontsize=6, va="bottom", wrap=True)
    info = backbones.BACKBONES.get(panel.backbone)
    n = info.n_blocks if info else None
    if n:
        ax.set_xlim(-0.5, n + 0.5)
    for i, r in enumerate(panel.references):  # intervals as bars at the right edge
        if r.err[0] > 0:
            ax.errorbar([ax.get_xlim()[1] - 0.1 - 0.08 * i], r.y, yerr=r.err, color=greys[r.config],
                        capsize=3, lw=1, linestyle="none")
    ax.set_xlabel(f"blocks trainable in the last phase (0 = feature extraction"
                  f"{f', {n} = full' if n else ''})"
                  + ("\nreinit_top: x = its re-initialised top blocks (copied=finetune "
                     "trains the rest too)"
                     if any(s.kind == "reinit_top" for s in panel.series) else ""),
                  fontsize=8)
    ax.set_title(panel.wrapped_title(), fontsize=9)
    plain_axes(ax)
    ax.grid(alpha=0.3)
    handles = dict(zip(*reversed(ax.get_legend_handles_labels()), strict=True))
    labels = [s.label for s in [*panel.series, *panel.references]]  # drawing order
    if labels:
        # below the tick labels and x label, a fixed distance (in the legend's font size)
        # from the axes, whatever their height, so that the layout settles
        below = (28 + 10 * (ax.get_xlabel().count("\n") + 1)) / 7
        ax.legend([handles[x] for x in labels], labels, fontsize=7, loc="upper center",
                  frameon=False, bbox_to_anchor=(0.5, 0), borderaxespad=below,
                  ncol=1 if len(labels) <= 8 else 2)


def depth_figures(df: pd.DataFrame) -> dict:
    """{dataset: matplotlib Figure} of accuracy vs blocks trainable (see depth_panels); one
    y range for all panels of a figure (y_limits)."""
    out = {}
    for dataset, panels in depth_panels(df).items():
        configs = sorted({s.config for p in panels for s in p.series}, key=str)
        refs = sorted({r.config for p in panels for r in p.references}, key=str)
        colors = config_colors(configs)
        greys = {c: REF_GREYS[i % len(REF_GREYS)] for i, c in enumerate(refs)}
        entries = max(len(p.series) + len(p.references) for p in panels)
        rows_of_legend = entries if entries <= 8 else math.ceil(entries / 2)
        two_lines = any(s.kind == "reinit_top" for p in panels for s in p.series)  # xlabel
        fig, axes = new_figure(len(panels), 5.6 if entries <= 8 else 8.0,
                               3.6 + 0.17 * rows_of_legend + 0.3 * two_lines, cols=2,
                               sharey=True)
        values = []
        for p in panels:
            for s in [*p.series, *p.references]:
                values += [y + e for y, e in zip(s.y, s.err, strict=True)]
                values += [y - e for y, e in zip(s.y, s.err, strict=True)]
        for ax, panel in zip(axes, panels, strict=False):
            _draw_depth_panel(ax, panel, colors, greys)
            ax.set_ylim(*y_limits(values))
        for ax in axes[::2]:
            ax.set_ylabel("test accuracy")
        fig.suptitle(f"dataset={dataset}: test accuracy vs blocks trainable"
                     + ("\n" if len(panels) == 1 else " ")
                     + "(mean over seeds; bars: 95% t-interval when n > 1)", fontsize=10)
        out[dataset] = fig
    return out


def accuracy_vs_depth(df: pd.DataFrame, folder: Path) -> list[str]:
    return [save(fig, folder, f"accuracy_vs_depth_{dataset}")
            for dataset, fig in depth_figures(df).items()]


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
    """One point per cell group and framework with finished cells and a speed (SPEEDS: the
    end-to-end rate; a step rate only for runs without one, and only where it times the
    whole model): columns speed, mean, contended, front. A point timed while the machine
    was shared is no measurement: it is never on the front and puts no other point off
    it."""
    s = _summary_frame(df)
    x = next((c for c in SPEEDS if c in s and s[c].notna().any()), None)
    if x is None:
        return s.iloc[:0], None
    s = s[(s["n"] > 0) & s[x].notna()]
    if x != next(iter(SPEEDS)):  # a step rate: only where it times the whole model
        s = s[~s["part_rate"]]
    s = s.rename(columns={x: "speed"})
    s["front"] = False
    for _, d in s.groupby("p_dataset"):
        measured = d[~d["contended"]]
        s.loc[measured.index, "front"] = pareto_front(measured, "speed", "mean")
    return s, x


def pareto(df: pd.DataFrame, folder: Path) -> list[str]:
    s, x = pareto_points(df)
    return [save(pareto_figure(d, dataset, SPEEDS[x]), folder, f"pareto_{dataset}")
            for dataset, d in s.groupby("p_dataset", sort=True)] if x else []


def _config_keys(rows: pd.DataFrame) -> list[str]:
    """The params that tell the rows' configurations apart, strategy label first."""
    keys = [c for c in rows.columns if c.startswith("p_") and c not in
            ("p_dataset", "p_strategy_label", "p_framework", "p_seed", "p_strategy")
            and not c.startswith("p_strategy.")]
    return varying(rows, sorted(keys, key=lambda k: (k not in frame.BASE_KEYS, k)))


def pareto_figure(d: pd.DataFrame, dataset: str, xlabel: str):
    """Accuracy vs train speed of one dataset's points (pareto_points): colour =
    configuration (strategy and the params that vary), marker = framework; hollow: timed
    while other processes used the machine, left off the front."""
    keys = _config_keys(d)
    d = d.assign(config=[config_label(r, keys) for _, r in d.iterrows()])
    configs = sorted(d["config"].unique())
    colors = config_colors(configs)
    entries = len(configs) + d["framework"].nunique() + 1 + bool(d["contended"].any())
    ncol = 1 if len(configs) <= 6 else 2
    fig, axes = new_figure(1, 7.0 if ncol == 1 else 10.0,
                           4.4 + 0.15 * math.ceil(entries / ncol))
    ax = axes[0]
    for fw, g in d.groupby("framework"):
        for shared, h in g.groupby("contended"):
            c = [colors[x] for x in h["config"]]
            ax.scatter(h["speed"], h["mean"], marker=MARKERS.get(fw, "^"), s=36, zorder=3,
                       facecolors="none" if shared else c, edgecolors=c,
                       linewidths=1.2 if shared else None)
    for fw in sorted(d["framework"].unique(), key=lambda f: FW_ORDER.get(f, 9)):
        ax.scatter([], [], marker=MARKERS.get(fw, "^"), c="0.45", label=fw)
    if d["contended"].any():
        ax.scatter([], [], marker="o", facecolors="none", edgecolors="0.45",
                   label="machine shared while timed (not on the front)")
    f = d[d["front"]].sort_values("speed")
    ax.step(f["speed"], f["mean"], where="pre", color="k", lw=1,
            alpha=0.6, label="Pareto front", zorder=2)
    ax.scatter(f["speed"], f["mean"], facecolors="none", edgecolors="k",
               s=110, zorder=4)
    ax.set_xscale("log")
    plain = ticker.FuncFormatter(lambda v, _: f"{v:,.0f}")
    ax.xaxis.set_major_formatter(plain)
    # within about a decade the minor ticks carry the labels: plain too (2, 3, 5; never
    # 2x10^0); across several decades they would crowd
    wide = d["speed"].max() > 30 * d["speed"].min()
    some = ticker.FuncFormatter(lambda v, _: f"{v:,.0f}" if f"{v:.0e}"[0] in "235" else "")
    ax.xaxis.set_minor_formatter(ticker.NullFormatter() if wide else some)
    ax.yaxis.get_major_formatter().set_useOffset(False)
    ax.set_ylim(*y_limits(d["mean"]))
    ax.set_xlabel(f"{xlabel}, log scale")
    ax.set_ylabel("test accuracy (mean over seeds)")
    same = [k for k in ("p_backbone", "p_weights") if k in d and k not in keys and len(d)]
    ax.set_title(f"dataset={dataset}: test accuracy vs end-to-end train throughput"
                 + (f"\n{kv(d.iloc[0], same, ', ')}" if same else ""), fontsize=10)
    ax.grid(alpha=0.3)
    from matplotlib.patches import Patch

    handles, labels = ax.get_legend_handles_labels()
    handles += [Patch(color=colors[c]) for c in configs]  # colour, not a framework's marker
    ax.legend(handles, labels + configs, fontsize=7, loc="upper center",
              bbox_to_anchor=(0.5, -0.14), frameon=False, ncol=ncol)
    return fig


def all_figures(data: frame.ReportData, folder: Path,
                curves_backbone: str | None = None) -> dict[str, list[str]]:
    """{'accuracy_vs_depth': [...], 'pareto': [...], 'learning_curves': [...]}: PNG paths
    relative to the report folder (an SVG lies beside each)."""
    return {"accuracy_vs_depth": accuracy_vs_depth(data.frame, folder),
            "pareto": pareto(data.frame, folder),
            "learning_curves": learning_curves(data, folder, curves_backbone),
            "sensitivity": tuned.sensitivity(data.frame, folder)}
