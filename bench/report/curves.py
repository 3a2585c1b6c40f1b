"""The learning-curve figures (matplotlib, Agg canvas), each as PNG and SVG:

    curves_<backbone>_<dataset>   train and val accuracy per epoch (mean over seeds) of one
                                  backbone's cells, side by side on one y range, a line per
                                  configuration and framework (colour = configuration,
                                  torch solid, keras dashed), legend below; a line
                                  lying on an earlier one (precise_bn changes no train
                                  accuracy) drawn with larger hollow markers, its legend
                                  entry saying "same as"

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


def _same(a: pd.Series, b: pd.Series, tol: float) -> bool:
    """True when every point of `a` lies on `b` (same epochs, values within `tol`)."""
    common = a.index.intersection(b.index)
    return len(common) == len(a) > 0 and float((a[common] - b[common]).abs().max()) <= tol


def _coincident(means: dict, tol: float) -> dict:
    """{series: the earlier series it would hide} among one panel's {(config, fw): mean}."""
    out, seen = {}, []
    for key, mean in means.items():
        under = next((k for k in seen if _same(mean, means[k], tol)), None)
        if under is not None:
            out[key] = under
        seen.append(key)
    return out


def _same_as(hidden: dict[str, dict], fws: list[str]) -> dict[str, str]:
    """{config: ' (train: same as X)'}: what each configuration's legend entry says about the
    panels where one of its lines lies on another's (drawn hollow and larger there)."""
    notes: dict[str, list[str]] = {}
    for panel, pairs in hidden.items():
        same_fw: dict[tuple, list[str]] = {}
        for (cfg, fw), (u_cfg, u_fw) in pairs.items():
            if fw == u_fw:
                same_fw.setdefault((cfg, u_cfg), []).append(fw)
            else:
                other = f"{u_cfg} {u_fw}" if u_cfg != cfg else u_fw
                notes.setdefault(cfg, []).append(f"{panel} {fw}: same as {other}")
        for (cfg, u_cfg), on in same_fw.items():
            who = "" if set(on) == set(fws) else " " + ", ".join(on)
            notes.setdefault(cfg, []).append(f"{panel}{who}: same as {u_cfg}")
    return {cfg: f" ({'; '.join(parts)})" for cfg, parts in notes.items()}


def curve_figures(data: frame.ReportData, backbone: str | None = None) -> dict:
    """{dataset: Figure}: train and val accuracy per epoch (mean over seeds) of one
    backbone's finished cells, side by side on one y range; colour = configuration,
    solid = torch, dashed = keras, legend below. A line that lies on an earlier one (same
    values at every epoch, within a fraction of the axis) is drawn with larger hollow
    markers so that both show, and its legend entry says 'same as'."""
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
        out[dataset] = _curve_figure(d, f"backbone={backbone}, dataset={dataset}")
    return out


PANELS = {"train_acc": "train", "val_acc": "val"}


def _curve_figure(d: pd.DataFrame, title: str):
    """One dataset's figure: a panel per PANELS key, a line per configuration and framework."""
    configs = sorted(d["config"].unique())
    colors = config_colors(configs)
    series = sorted(d.groupby(["config", "p_framework"]).groups,
                    key=lambda cf: (cf[0], FW_ORDER.get(cf[1], 9)))
    fws = sorted(d["p_framework"].unique(), key=lambda f: FW_ORDER.get(f, 9))
    ncol = 1 if len(configs) + len(fws) <= 5 else 2
    fig, axes = new_figure(2, 5.2, 3.4 + 0.15 * math.ceil((len(configs) + len(fws)) / ncol),
                           sharey=True)
    means = {key: {(cfg, fw): d[(d["key"] == key) & (d["config"] == cfg)
                                & (d["p_framework"] == fw)].groupby("step")["value"].mean()
                   for cfg, fw in series} for key in PANELS}
    lo, hi = y_limits([v for m in means.values() for s in m.values() for v in s.values])
    hidden = {PANELS[key]: _coincident(m, 0.005 * (hi - lo)) for key, m in means.items()}
    for ax, key in zip(axes, PANELS, strict=True):
        for cfg, fw in series:
            mean, over = means[key][(cfg, fw)], (cfg, fw) in hidden[PANELS[key]]
            ax.plot(mean.index, mean.values, marker=MARKERS.get(fw, "^"),
                    ms=7 if over else 3, mfc="none" if over else colors[cfg],
                    mew=1.3 if over else 1, zorder=3 if over else 2,
                    lw=0.8 if over else 1.8,  # the line beneath shows at both edges
                    linestyle=FW_LINE.get(fw, ":"), color=colors[cfg], label=f"{fw} {cfg}")
        plain_axes(ax)
        ax.set_xlim(0.5, d["step"].max() + 0.5)
        ax.set_xlabel("epoch")
        ax.set_title(f"{PANELS[key]} accuracy", fontsize=9)
        ax.grid(alpha=0.3)
        ax.set_ylim(lo, hi)
    axes[0].set_ylabel("accuracy (mean over seeds)")
    from matplotlib.lines import Line2D

    # colour names the configuration, line and marker the framework: n + 2 entries, not
    # n x 2; a configuration whose line lies on another's says so
    notes = _same_as(hidden, fws)
    handles = [Line2D([], [], color=colors[c], lw=2) for c in configs]
    handles += [Line2D([], [], color="0.3", marker=MARKERS.get(f, "^"), ms=3,
                       linestyle=FW_LINE.get(f, ":")) for f in fws]
    fig.legend(handles, [c + notes.get(c, "") for c in configs] + fws,
               loc="outside lower center", fontsize=7, ncol=ncol, frameon=False)
    fig.suptitle(f"{title}: learning curves", fontsize=10)
    return fig


def learning_curves(data: frame.ReportData, folder: Path,
                    backbone: str | None = None) -> list[str]:
    backbone = backbone or pick_backbone(data.cells)
    return [save(fig, folder, f"curves_{backbone}_{dataset}")
            for dataset, fig in curve_figures(data, backbone).items()]
