"""The comparison tables, built from the flat frame (bench/report/frame.py) only: framework
delta (PyTorch minus Keras per cell group), best strategy (and whether its lead holds over
seeds), and each strategy relative to full fine-tuning, paired over seeds."""

from __future__ import annotations

import math

import pandas as pd

from bench.report.frame import (
    CONTENDED,
    DIVERGED,
    PART_RATE,
    contended_cells,
    diverged_cells,
    finished_rows,
    finished_values,
    frameworks,
    group_keys,
    not_finished,
    part_rate_cells,
)
from bench.report.groups import (
    accuracy_cell,
    by_seed,
    group_status,
    row_groups,
    strategies_per_group,
)
from bench.report.stats import paired_test, summarize
from bench.report.table import (
    PAIRED,
    RANKED,
    RELATIVE,
    SIGNED,
    SUMMARY,
    TIMES,
    Table,
    cell_frames,
    contended_footnote,
    diverged_footnote,
    header,
    marks,
    part_rate_footnote,
)


def framework_delta_table(df: pd.DataFrame, a: str = "torch", b: str = "keras",
                          metric: str = "test_acc") -> Table:
    """PyTorch minus Keras for every cell group both frameworks have in the grid: the
    difference of mean accuracy, the same paired over seeds, and the train speed ratio."""
    keys = group_keys(df)
    by = {}
    for kv, fw, rows in row_groups(df, keys):
        by.setdefault(kv, {})[fw] = rows
    numeric, shown = [], []
    for kv, fws in by.items():
        if a not in fws or b not in fws:
            continue
        ra, rb = fws[a], fws[b]
        sa, sb = summarize(finished_values(ra, metric)), summarize(finished_values(rb, metric))
        test = paired_test(by_seed(ra, metric), by_seed(rb, metric))
        speed = (finished_values(ra, "train_images_per_sec").mean()
                 / finished_values(rb, "train_images_per_sec").mean())
        shown_speed = speed_ratio(ra, rb)
        gone = diverged_side({a: ra, b: rb})
        r = {**dict(zip(keys, kv, strict=True)), f"{a}_mean": sa["mean"], f"{a}_n": sa["n"],
             f"{b}_mean": sb["mean"], f"{b}_n": sb["n"], "delta": sa["mean"] - sb["mean"],
             "paired_pairs": test["pairs"], "paired_mean_diff": test["mean_diff"],
             "p_value": test["p_value"], "train_speed_ratio": speed,
             "end_to_end_speed_ratio": shown_speed[0] if not shown_speed[2] else math.nan,
             "speed_contended": contended_cells(ra) + contended_cells(rb),
             f"{a}_diverged": diverged_cells(ra), f"{b}_diverged": diverged_cells(rb),
             f"{a}_not_finished": not_finished(ra), f"{b}_not_finished": not_finished(rb),
             "compared": bool(sa["n"] and sb["n"]) and not gone}
        numeric.append(r)
        d = {header(k): v for k, v in zip(keys, kv, strict=True)}
        d[f"{metric} {a}"] = accuracy_cell(sa, ra)
        d[f"{metric} {b}"] = accuracy_cell(sb, rb)
        if sa["n"] and sb["n"] and gone:  # a diverged cell is no framework difference
            d[f"{a} − {b}"] = (f"{gone} diverged: not compared", DIVERGED)
            d["paired over seeds"] = ""
            d[f"train speed {a}/{b}"] = shown_speed[:2]
        elif sa["n"] and sb["n"]:
            d[f"{a} − {b}"] = r["delta"]
            d["paired over seeds"] = test
            d[f"train speed {a}/{b}"] = shown_speed[:2]
        else:
            d[f"{a} − {b}"] = "no pair"
            d["paired over seeds"] = ""
            d[f"train speed {a}/{b}"] = ""
        shown.append(d)
    note = (f"{a} minus {b} for each cell group the grid runs in both frameworks; paired: "
            f"mean difference over matching seeds and its paired t-test p-value. A group "
            f"with a diverged cell ({DIVERGED}) is not compared. Train speed: the ratio of "
            f"end-to-end images/s (the step rates' where a side has no epoch history).")
    if not numeric:
        note = f"No cell group runs in both {a} and {b}."
    shared = contended_footnote(df, f"A marked speed ratio is no {a}/{b} difference: one "
                                    f"side or both were timed on a shared machine.")
    cells, marks_, notes = cell_frames(shown)
    part = marks_.map(lambda m: PART_RATE in m).to_numpy().any() if len(marks_) else False
    return Table("framework_delta", f"Framework delta ({a} − {b})", pd.DataFrame(numeric),
                 cells, {f"{metric} {a}": SUMMARY, f"{metric} {b}": SUMMARY,
                         f"{a} − {b}": SIGNED, "paired over seeds": PAIRED,
                         f"train speed {a}/{b}": TIMES},
                 note, [shared, diverged_footnote(df), part_rate_footnote(df) if part else ""],
                 marks_, notes)


def speed_ratio(ra: pd.DataFrame, rb: pd.DataFrame) -> tuple[float, str, bool]:
    """(end-to-end images/s of `ra` over `rb`'s, its marks, False); where a side has no
    end-to-end figure the step rates' ratio, True, marked § when a step times only the part
    above a feature cache; † when a side was timed on a shared machine."""
    rates = [finished_values(r, "end_to_end_images_per_sec").mean() for r in (ra, rb)]
    step = any(pd.isna(v) for v in rates)
    if step:
        rates = [finished_values(r, "train_images_per_sec").mean() for r in (ra, rb)]
    part = step and part_rate_cells(ra) + part_rate_cells(rb) > 0
    shared = contended_cells(ra) + contended_cells(rb) > 0
    return rates[0] / rates[1], marks((part, PART_RATE), (shared, CONTENDED)), step


def best_strategy_table(df: pd.DataFrame, metric: str = "test_acc") -> Table:
    """Per dataset x backbone x weights x framework: the strategy with the best mean test
    accuracy, its margin over the runner-up, and whether the lead holds over seeds (paired
    t-test on the seeds both ran, 5% level)."""
    outer, per, chosen = strategies_per_group(df)
    numeric, shown = [], []
    for (key, fw), by_label in per.items():
        # a strategy run at several settings: the one chosen on validation, named
        strategies = [(f"{label} ({chosen[(key, fw, label)]})" if (key, fw, label) in chosen
                       else label, rows) for label, rows in by_label.items()]
        # a strategy with a diverged cell is never a best or a runner-up: listed aside
        ranked = sorted(((summarize(finished_values(rows, metric)), label, rows)
                         for label, rows in strategies
                         if len(finished_rows(rows)) and not diverged_cells(rows)),
                        key=lambda t: -t[0]["mean"])
        skipped = [f"{label} ({group_status(rows)})" for label, rows in strategies
                   if not len(finished_rows(rows))] + \
            [f"{label} (diverged {DIVERGED})" for label, rows in strategies
             if len(finished_rows(rows)) and diverged_cells(rows)]
        r = {**dict(zip(outer, key, strict=True)), "framework": fw,
             "best": None, "best_mean": math.nan, "runner_up": None,
             "runner_up_mean": math.nan, "margin": math.nan, "pairs": 0,
             "p_value": math.nan, "verdict": "", "not_compared": "; ".join(skipped),
             "best_diverged": 0}
        if ranked:
            s1, l1, rows1 = ranked[0]
            r.update(best=l1, best_mean=s1["mean"], best_diverged=diverged_cells(rows1))
            if len(ranked) > 1:
                s2, l2, rows2 = ranked[1]
                test = paired_test(by_seed(rows1, metric), by_seed(rows2, metric))
                r.update(runner_up=l2, runner_up_mean=s2["mean"],
                         margin=s1["mean"] - s2["mean"], pairs=test["pairs"],
                         p_value=test["p_value"], verdict=test["verdict"])
            else:
                r["verdict"] = "no runner-up"
        numeric.append(r)
        shown.append({**{header(k): v for k, v in zip(outer, key, strict=True)},
                      "framework": fw,
                      "best": _ranked_cell(r["best"], r["best_mean"], ranked[0][2])
                      if r["best"] else "none finished",
                      "runner-up": _ranked_cell(r["runner_up"], r["runner_up_mean"],
                                                ranked[1][2]) if r["runner_up"] else "—",
                      "margin": r["margin"], "holds over seeds": r["verdict"],
                      "not compared": r["not_compared"]})
    cells, marks, notes = cell_frames(shown)
    return Table("best_strategy", "Best strategy", pd.DataFrame(numeric), cells,
                 {"best": RANKED, "runner-up": RANKED, "margin": SIGNED},
                 "By mean test accuracy over seeds, each strategy at one setting: where the "
                 "grid ran a strategy at several learning rates or weight decays, the one "
                 "with the best mean validation accuracy (named beside it), never chosen on "
                 "test. Holds over seeds: a paired t-test of best minus runner-up on the "
                 "seeds both ran (5% level); with fewer than two matching seeds no test is "
                 "possible.", [diverged_footnote(df)], marks, notes)


def _ranked_cell(label: str, mean: float, rows: pd.DataFrame) -> tuple:
    """({label, mean}, ‡ when a cell of the strategy diverged)."""
    return {"label": label, "mean": mean}, DIVERGED if diverged_cells(rows) > 0 else ""


def diverged_side(sides: dict[str, pd.DataFrame]) -> str:
    """'' when no side of a comparison has a diverged cell, else which ('torch', 'full',
    'both')."""
    gone = [name for name, rows in sides.items() if diverged_cells(rows)]
    return "" if not gone else gone[0] if len(gone) == 1 else "both"


NO_ADAPTATION = "no adaptation (the source model)"


def relative_table(df: pd.DataFrame, baseline: str = "full",
                   metric: str = "test_acc") -> Table:
    """Each strategy minus `baseline` (a strategy label) in the same group (dataset,
    backbone, weights, ...) and framework, paired over the seeds both ran: the mean
    difference ± its standard error and the paired t-test's p. Lee et al. 2023 plot their
    Figure 2 this way (surgical minus full fine-tuning, standard errors over three runs).
    Empty when no group has the baseline and another strategy. A strategy run at several
    settings enters at the one chosen on validation."""
    outer, per, _ = strategies_per_group(df)
    numeric, shown = [], {}
    for (key, fw), strategies in per.items():
        # the baseline strategy with its options (`full[bn=frozen]`), when one label has it
        labels = [lb for lb in strategies if lb == baseline or lb.startswith(baseline + "[")]
        base = strategies[labels[0]] if len(labels) == 1 else None
        if base is None or len(strategies) < 2:
            continue
        b = by_seed(base, metric)
        arms = [(label, rows, metric) for label, rows in strategies.items()
                if label != labels[0]]
        source = f"source_{metric}"  # the source model before any step (head_init = source)
        if source in base and finished_values(base, source).notna().any():
            arms.insert(0, (NO_ADAPTATION, base, source))
        for label, rows, column in arms:
            test = paired_test(by_seed(rows, column), b)
            # a diverged cell on either side: no difference of strategies (as best strategy)
            gone = diverged_side({label: rows, baseline: base} if rows is not base
                                 else {baseline: base})
            numeric.append({**dict(zip(outer, key, strict=True)), "framework": fw,
                            "strategy": label, "baseline": baseline, **test,
                            "diverged": diverged_cells(base) + (diverged_cells(rows)
                                                                if rows is not base else 0),
                            "compared": not gone})
            shown.setdefault((key, label), {})[fw] = \
                (f"{gone} diverged: not compared", DIVERGED) if gone else (test, "")
    fws = [fw for fw in frameworks(df) if any(fw in c for c in shown.values())]
    cells, marks, notes = cell_frames([
        {**{header(k): v for k, v in zip(outer, key, strict=True)}, "strategy": label,
         **{f"{metric} − {baseline} ({fw})": cols.get(fw, "—") for fw in fws}}
        for (key, label), cols in shown.items()])
    return Table("relative", f"Relative to {baseline}", pd.DataFrame(numeric), cells,
                 {f"{metric} − {baseline} ({fw})": RELATIVE for fw in fws},
                 f"Each strategy minus `{baseline}` on the seeds both ran (same dataset, "
                 f"backbone, weights and framework): mean difference ± standard error, the "
                 f"paired t-test's p and the pairs (as Lee et al. 2023 plot Figure 2). A "
                 f"strategy or baseline with a diverged cell ({DIVERGED}) is not compared."
                 + (" No adaptation: the source model, head included, scored on the same "
                    "test split before any step (cells with head_init = source)."
                    if any(r["strategy"] == NO_ADAPTATION for r in numeric) else ""),
                 [diverged_footnote(df)], marks, notes)
