"""What a grid invocation's parent run says about its cells, read back from MLflow when the
parent ends (tracking.end_run): summaries that are true of what they name, and the comparison
table the UI shows on the parent.

A mean over every cell of a grid averages unlike things (the default grid's chance-level
from-scratch cells with its fine-tuned ones: 0.68, a number nobody should read). So the
parent holds, per framework and strategy (and weights, where the invocation varies them):

- metric `test_acc/<framework>/<strategy>`: the mean test accuracy over seeds of the
  strategy's configuration with the best mean *validation* accuracy (test metrics never
  select anything, DESIGN.md);
- metrics `cells/...`, `finished/...`, `failed/...`, `diverged/...`: the counts;
- artifact `comparison.json`, an MLflow table (one row per configuration and framework: mean
  test and validation accuracy over its seeds, train images/s, trainable parameters, counts),
  which the run page's Artifacts tab shows as a table: the comparison of the grid one click
  from the parent run.

Framework-free and MLflow-free: rows in (tracking.run_row's), numbers and rows out.
"""

from __future__ import annotations

import statistics
from collections import defaultdict

COMPARISON = "comparison.json"  # the parent run's table artifact
# the numbers first: the UI's table shows about five columns before it scrolls
# (`cell`: the run name without the framework and seed, which tells configurations apart)
TABLE_COLUMNS = ("framework", "cell", "test_acc", "best_val_acc", "seeds",
                 "train_images_per_sec", "trainable_params", "finished", "failed", "diverged",
                 "strategy", "weights", "config")
DIGITS = 4  # accuracies and rates rounded for reading


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _short(row: dict) -> str:
    """The run name less its framework and seed words (`full scratch pbn320`)."""
    words = str(row.get("run_name") or "").split()
    return " ".join(w for w in words if w not in ("pt", "tf", "torch", "keras")
                    and not (w[:1] == "s" and w[1:].isdigit())) or str(row.get("label"))


def _round(v):
    return round(v, DIGITS) if isinstance(v, float) else v


def is_summarised(row: dict) -> bool:
    """A grid cell (a tuned grid's final, not its trials; no pretraining run)."""
    return row.get("role", "cell") in ("cell", "final")


def group_key(row: dict, vary_weights: bool) -> str:
    """`partial`, or `full:none` where the invocation varies the weights."""
    key = row.get("p_strategy") or (row.get("t_strategy") or "?").split("[")[0]
    return f"{key}:{row.get('p_weights')}" if vary_weights else key


def configurations(rows: list[dict]) -> list[dict]:
    """One row per configuration and framework (its seeds together), for the table."""
    by: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if is_summarised(r):
            by[(r.get("t_framework"), r.get("t_config") or r.get("label"))].append(r)
    out = []
    for (fw, config), cells in sorted(by.items(), key=lambda kv: (str(kv[0][0]),
                                                                  str(kv[0][1]))):
        done = [c for c in cells if c["status"] == "FINISHED"]
        out.append({
            "framework": fw, "cell": _short(cells[0]),
            "strategy": cells[0].get("t_strategy"), "config": config,
            "weights": cells[0].get("p_weights"), "seeds": len(done),
            "test_acc": _mean([c.get("test_acc") for c in done]),
            "best_val_acc": _mean([c.get("best_val_acc") for c in done]),
            "train_images_per_sec": _mean([c.get("train_images_per_sec") for c in done]),
            "trainable_params": _mean([c.get("trainable_params") for c in done]),
            "finished": len(done), "failed": len(cells) - len(done),
            "diverged": sum(str(c.get("t_diverged", "")).startswith("true") for c in cells),
            "_group": None})
    return out


def parent_metrics(rows: list[dict]) -> tuple[dict[str, float], list[dict]]:
    """(the parent's summary metrics, the comparison table's rows) from its cells' rows."""
    cells = [r for r in rows if is_summarised(r)]
    vary_weights = len({r.get("p_weights") for r in cells}) > 1
    table = configurations(cells)
    by_row = {(r["framework"], r["config"]): r for r in table}
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in cells:
        key = (r.get("t_framework"), group_key(r, vary_weights))
        row = by_row[(r.get("t_framework"), r.get("t_config") or r.get("label"))]
        row["_group"] = key[1]
        groups[key].append(r)
    metrics: dict[str, float] = {}
    for (fw, group), members in sorted(groups.items()):
        suffix = f"{fw}/{group}"
        metrics[f"cells/{suffix}"] = len(members)
        metrics[f"finished/{suffix}"] = sum(m["status"] == "FINISHED" for m in members)
        metrics[f"failed/{suffix}"] = sum(m["status"] != "FINISHED" for m in members)
        metrics[f"diverged/{suffix}"] = sum(str(m.get("t_diverged", "")).startswith("true")
                                            for m in members)
        configs = [r for r in table if r["framework"] == fw and r["_group"] == group
                   and r["best_val_acc"] is not None and r["test_acc"] is not None]
        if configs:  # chosen on validation, reported on test
            best = max(configs, key=lambda r: r["best_val_acc"])
            metrics[f"test_acc/{suffix}"] = best["test_acc"]
    return metrics, [{k: _round(r[k]) for k in TABLE_COLUMNS} for r in table]
