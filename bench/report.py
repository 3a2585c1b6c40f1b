"""MLflow runs -> one flat row per cell (pandas) -> comparison tables.

Reads only MLflow. Table v1: per dataset, rows backbone x strategy[depth], columns per
framework: test accuracy, train images/s, trainable parameters. Seeds are averaged (n shown
when above one); failed or missing cells are shown as such, never dropped.
"""

from __future__ import annotations

import pandas as pd

from bench import tracking

METRICS = ("test_acc", "train_images_per_sec", "trainable_params")


def runs_frame(exp_id: str, parent_id: str | None = None) -> pd.DataFrame:
    """One row per cell run: params (p_*), final metrics, tags, status. With a parent id,
    only that invocation's cells; otherwise every cell of the experiment, keeping the newest
    FINISHED run of each spec hash (or its newest run of any status)."""
    runs = tracking.cell_runs(exp_id)
    rows = []
    for r in runs:
        tags = r.data.tags
        if parent_id and tags.get(tracking.PARENT_TAG) != parent_id:
            continue
        row = {"run_id": r.info.run_id, "status": r.info.status,
               "start_time": r.info.start_time, "name": tags.get(tracking.TAG + "name"),
               "spec_hash": tags.get(tracking.TAG + "spec_hash"),
               "device": tags.get(tracking.TAG + "device", ""),
               "error": tags.get(tracking.TAG + "error", "")}
        row.update({f"p_{k}": v for k, v in r.data.params.items()})
        row.update(r.data.metrics)
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df["_finished"] = df["status"] == tracking.FINISHED
    df = (df.sort_values(["_finished", "start_time"], ascending=False)
            .drop_duplicates("spec_hash").drop(columns="_finished"))
    return df.sort_values("name").reset_index(drop=True)


def _cell_text(rows: pd.DataFrame, metric: str) -> str:
    done = rows[rows["status"] == tracking.FINISHED]
    if done.empty:
        return rows["status"].iloc[0]
    v = done[metric].dropna() if metric in done else pd.Series(dtype=float)
    if v.empty:
        return "-"
    if metric == "test_acc":
        text = f"{v.mean():.3f}" + (f" ± {v.std():.3f} (n={len(v)})" if len(v) > 1 else "")
    elif metric == "trainable_params":
        text = _si(v.mean())
    else:
        text = f"{v.mean():,.0f}"
    missing = len(rows) - len(done)
    return text + (f" [{missing} not finished]" if missing else "")


def _si(n: float) -> str:
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def comparison_tables(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """{dataset: table}, rows backbone x strategy, columns (metric, framework)."""
    tables = {}
    if df.empty:
        return tables
    for dataset, ddf in df.groupby("p_dataset"):
        frameworks = sorted(ddf["p_framework"].unique())
        index, body = [], []
        for (backbone, strategy, weights), g in ddf.groupby(
                ["p_backbone", "p_strategy_label", "p_weights"], sort=True):
            index.append((backbone, strategy, weights))
            body.append([_cell_text(g[g["p_framework"] == fw], m)
                         if (g["p_framework"] == fw).any() else "not in grid"
                         for m in METRICS for fw in frameworks])
        cols = pd.MultiIndex.from_tuples([(m, fw) for m in METRICS for fw in frameworks])
        idx = pd.MultiIndex.from_tuples(index, names=["backbone", "strategy", "weights"])
        tables[dataset] = pd.DataFrame(body, index=idx, columns=cols)
    return tables


def markdown(tables: dict[str, pd.DataFrame]) -> str:
    out = []
    for dataset, t in tables.items():
        flat = t.copy()
        flat.columns = [f"{m} ({fw})" for m, fw in t.columns]
        flat = flat.reset_index()
        out.append(f"### {dataset}\n\n{flat.to_markdown(index=False)}\n")
    return "\n".join(out) if out else "(no runs)\n"


def failures(df: pd.DataFrame) -> list[str]:
    if df.empty:
        return []
    bad = df[df["status"] != tracking.FINISHED]
    return [f"{r['status']}: {r['name']}  {r['error'][:300]}" for _, r in bad.iterrows()]
