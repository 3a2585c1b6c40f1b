"""The learning-curve figures (matplotlib, Agg canvas), each as PNG and SVG:

    curves_<backbone>_<dataset>   train and val accuracy per epoch (mean over seeds) of one
                                  backbone's cells, side by side on one y range, a line per
                                  configuration and framework (colour = configuration,
                                  torch solid, keras dashed), legend below

curve_figures returns the matplotlib Figures for tests; learning_curves saves them.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from bench.report import frame
from bench.report.plot import (
    FW_LINE,
    FW_ORDER,
    MARKERS,
    config_colors,
    config_label,
    new_figure,
    plain_axes,
    save,
    varying,
    y_limits,
)


def pick_backbone(df: pd.DataFrame) -> str | None:
    """The backbone with the most finished cells (ties: alphabetical)."""
    cells = frame.cells_only(df)
    done = cells[cells["status"] == "FINISHED"]
    if done.empty:
        return None
    counts = done["p_backbone"].value_counts()
    return sorted(counts[counts == counts.max()].index)[0]


def curve_figures(data: frame.ReportData, backbone: str | None = None) -> dict:
    """{dataset: Figure}: train and val accuracy per epoch (mean over seeds) of one
    backbone's finished cells, side by side on one y range; colour = configuration,
    solid = torch, dashed = keras, legend below."""
    df, hist = data.cells, data.history
    backbone = backbone or pick_backbone(df)
    if backbone is None or hist.empty:
        return {}
    keys = [k for k in frame.group_keys(df) if k not in ("p_dataset", "p_backbone")]
    cells = df[(df["p_backbone"] == backbone) & (df["status"] == "FINISHED")]
    h = hist.merge(cells[["run_id", "p_dataset", "p_framework", *keys]], on="run_id")
    out = {}
    for dataset, d in h.groupby("p_dataset", sort=True):
        shown = varying(d, [k for k in keys if k != "p_strategy_label"])
        d = d.assign(config=[config_label(r, shown) for _, r in
                             d[["p_strategy_label", *shown]].iterrows()])
        configs = sorted(d["config"].unique())
        colors = config_colors(configs)
        series = sorted(d.groupby(["config", "p_framework"]).groups,
                        key=lambda cf: (cf[0], FW_ORDER.get(cf[1], 9)))
        fws = sorted(d["p_framework"].unique(), key=lambda f: FW_ORDER.get(f, 9))
        ncol = 1 if len(configs) + len(fws) <= 5 else 2
        fig, axes = new_figure(2, 5.2,
                               3.4 + 0.15 * math.ceil((len(configs) + len(fws)) / ncol),
                               sharey=True)
        values = []
        for ax, key in zip(axes, ("train_acc", "val_acc"), strict=True):
            k = d[d["key"] == key]
            for cfg, fw in series:
                g = k[(k["config"] == cfg) & (k["p_framework"] == fw)]
                mean = g.groupby("step")["value"].mean()
                values += list(mean.values)
                ax.plot(mean.index, mean.values, marker=MARKERS.get(fw, "^"), ms=3,
                        linestyle=FW_LINE.get(fw, ":"), color=colors[cfg],
                        label=f"{fw} {cfg}")
            plain_axes(ax)
            ax.set_xlim(0.5, d["step"].max() + 0.5)
            ax.set_xlabel("epoch")
            ax.set_title(key.replace("_acc", " accuracy"), fontsize=9)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("accuracy (mean over seeds)")
        for ax in axes:
            ax.set_ylim(*y_limits(values))
        from matplotlib.lines import Line2D

        # colour names the configuration, line and marker the framework: n + 2 entries, not
        # n x 2
        handles = [Line2D([], [], color=colors[c], lw=2) for c in configs]
        handles += [Line2D([], [], color="0.3", marker=MARKERS.get(f, "^"), ms=3,
                           linestyle=FW_LINE.get(f, ":")) for f in fws]
        fig.legend(handles, configs + fws, loc="outside lower center", fontsize=7,
                   ncol=ncol, frameon=False)
        fig.suptitle(f"backbone={backbone}, dataset={dataset}: learning curves",
                     fontsize=10)
        out[dataset] = fig
    return out


def learning_curves(data: frame.ReportData, folder: Path,
                    backbone: str | None = None) -> list[str]:
    backbone = backbone or pick_backbone(data.cells)
    return [save(fig, folder, f"curves_{backbone}_{dataset}")
            for dataset, fig in curve_figures(data, backbone).items()]
