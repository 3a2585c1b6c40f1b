"""The cell groups the tables are built from: the rows of a table in table order (dataset,
backbone, weights, strategy in registry order and depth, then the other keys), a group's
values by seed (what the paired tests pair), the strategies each best-of or relative-to
compares, and what a group shows when nothing of it finished."""

from __future__ import annotations

import math

import pandas as pd

from bench.report.frame import (
    DIVERGED,
    FRAMEWORK_ORDER,
    cells_only,
    diverged_cells,
    finished_rows,
    group_keys,
    not_finished,
    status_labels,
)
from strategies import backbones as bb
from strategies import registry


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


def row_groups(df: pd.DataFrame, keys: list[str], by_framework: bool = True):
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


def by_seed(rows: pd.DataFrame, column: str) -> pd.Series:
    """A group's finished values of `column` indexed by seed (what paired_test pairs)."""
    return finished_rows(rows).set_index("p_seed")[column] if column in rows else pd.Series()


# hyperparameters a comparison of strategies chooses per strategy on validation, never sweeps
# across: a grid that sweeps them without [tune] still compares each strategy at its best
SETTINGS = ("p_lr", "p_weight_decay")


def strategies_per_group(df: pd.DataFrame) -> tuple[list[str], dict, dict]:
    """The group keys but the strategy and the swept settings (lr, weight decay), and
    {(their values, framework): {strategy label: rows}} in table order: the strategies a
    best-of or a relative-to compares. Where a strategy ran at several settings, its rows
    are those of the setting with the best mean validation accuracy (choose_on_val); the
    third value says which: {(key, framework, label): "lr=0.001"}."""
    keys = group_keys(df)
    swept = [k for k in keys if k in SETTINGS]
    outer = [k for k in keys if k != "p_strategy_label" and k not in swept]
    candidates: dict[tuple, dict[str, list]] = {}
    for kv, fw, rows in row_groups(df, keys):
        values = dict(zip(keys, kv, strict=True))
        key = tuple(values[k] for k in outer)
        setting = ", ".join(f"{k[2:]}={values[k]}" for k in swept)
        candidates.setdefault((key, fw), {}).setdefault(
            values["p_strategy_label"], []).append((setting, rows))
    per: dict[tuple, dict] = {}
    chosen: dict[tuple, str] = {}
    for (key, fw), by_label in candidates.items():
        for label, options in by_label.items():
            setting, rows = choose_on_val(options)
            per.setdefault((key, fw), {})[label] = rows
            if swept:
                chosen[(key, fw, label)] = setting
    return outer, per, chosen


def choose_on_val(options: list[tuple[str, pd.DataFrame]]) -> tuple[str, pd.DataFrame]:
    """The (setting, rows) whose finished cells have the best mean validation accuracy of
    the weights they tested (best_val_acc with select = best_val, else the last epoch's
    val_acc); the first where none has one. Never a test metric."""
    def val(rows: pd.DataFrame) -> float:
        done = finished_rows(rows)
        if done.empty:
            return -math.inf
        best = done.get("p_select", pd.Series("last", index=done.index)) == "best_val"
        last = done.get("val_acc", pd.Series(math.nan, index=done.index))
        tested = done.get("best_val_acc", last).where(best, last)
        return float(tested.mean()) if tested.notna().any() else -math.inf
    return max(options, key=lambda o: val(o[1]))


def group_status(rows: pd.DataFrame) -> str:
    """What a group with nothing finished shows: its status ('FAILED', '2 MISSING')."""
    return status_labels(rows).iloc[0] if len(rows) == 1 else not_finished(rows)


def accuracy_cell(s: dict, rows: pd.DataFrame) -> tuple:
    """(summary, ‡ when a cell of the group diverged, what did not finish), or the status
    alone when nothing finished."""
    if s["n"] == 0:
        return group_status(rows)
    return s, DIVERGED if diverged_cells(rows) > 0 else "", not_finished(rows)
