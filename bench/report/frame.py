"""The selection: MLflow runs -> one flat row per cell (pandas), the frame every table reads.

`load()` builds the frame (benchopt style): one row per cell of the selection with its
params (`p_*`), final metrics, tlbench tags (`t_*`) and status, plus a MISSING row for every
cell the grid expects and no run holds, and the pretraining runs the cells start from (role
'pretrain'). Reads only MLflow, through bench/tracking.py. Also here: the row queries the
tables and the report text share (finished rows, a metric of them, statuses, the recorded
conditions: tags "true: ..." / "false: ..." and the marks † and ‡ that show them).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from bench import tracking

MISSING = "MISSING"
PRETRAIN = "pretrain"
CURVE_KEYS = ("train_acc", "val_acc", "epoch_seconds")
INT_PARAMS = ("seed", "epochs", "image_size", "batch_size", "subset")
FLOAT_PARAMS = ("lr", "weight_decay")
# a cell group (seeds aggregated) is these keys plus any other param that varies
BASE_KEYS = ("p_dataset", "p_backbone", "p_weights", "p_strategy_label")
NOT_KEYS = {"p_framework", "p_seed", "p_strategy", "p_strategy_label"}
FRAMEWORK_ORDER = ("torch", "keras")
# params added to RunSpec later: a run older than the param ran with this value
PARAM_DEFAULTS = {"p_select": "last", "p_device_kind": "cpu"}
TRIAL = "trial"  # a tuned grid's trial cell: the search, never a result (bench/report/tuned.py)
TUNED = "tuned"  # what a searched field reads in a final row: its value is the study's choice
CONTENDED = "†"  # a speed figure taken while other processes used the machine
DIVERGED = "‡"  # final train loss above the first epoch's or 10x chance (tag tlbench.diverged)
DIVERGED_ERROR = "diverged at epoch"  # how a cell whose loss went NaN/inf fails
PART_RATE = "§"  # a step rate of the part above a feature cache (tag tlbench.train_rate_of)
SUSPECT_RATE = "¶"  # a data-fed rate above the model-only one (tag tlbench.rate_check suspect)
WHOLE_MODEL = "whole model"  # tlbench.train_rate_of of a cell whose rates time everything


@dataclass
class ReportData:
    frame: pd.DataFrame  # one row per cell, plus pretraining runs (role == "pretrain")
    history: pd.DataFrame  # run_id, key, step, value: per-epoch metrics
    experiment: str
    experiment_id: str
    parent: dict | None = None  # the grid invocation's run, flattened (tracking.run_row)
    expected: int | None = None  # cells the grid expects (None: unknown)
    command: str = ""

    @property
    def cells(self) -> pd.DataFrame:
        return cells_only(self.frame)


def load(exp_id: str, parent_id: str | None = None, expected: list[dict] | None = None,
         history: bool = True) -> ReportData:
    """The selection read from MLflow. With a parent, its cells (and the earlier FINISHED
    runs of cells it skipped as done); without, every cell of the experiment."""
    parent = tracking.get_run(parent_id) if parent_id else None
    if parent_id and expected is None:
        expected = tracking.expected_cells(parent_id)
    frame = runs_frame(exp_id, parent_id, expected)
    hist = histories(frame) if history else empty_history()
    frame = add_derived(frame, hist)
    return ReportData(frame, hist, tracking.experiment_name(exp_id), exp_id,
                      tracking.run_row(parent) if parent else None,
                      len(expected) if expected is not None else None)


def runs_frame(exp_id: str, parent_id: str | None = None,
               expected: list[dict] | None = None) -> pd.DataFrame:
    """One row per cell run: params (p_*), final metrics, tags (t_*), status.

    With a parent id: that invocation's runs, and for each expected cell it did not run the
    experiment's newest FINISHED run of its spec hash (the runner skipped it as done).
    Without: every cell of the experiment, the newest FINISHED run of each spec hash (or
    its newest run of any status). `expected` ({hash, name, params}, as the runner logs
    on the parent) restricts the cells to those and adds a MISSING row for each one no run
    holds. Pretraining runs (tag tlbench.role=pretrain) come as rows with role 'pretrain'.
    """
    rows = [tracking.run_row(r) for r in tracking.experiment_runs(exp_id)]
    cells = [r for r in rows if r["role"] != PRETRAIN]
    pretrain = [r for r in rows if r["role"] == PRETRAIN]
    if parent_id:
        chosen = _newest_per_hash([r for r in cells if r["parent_run_id"] == parent_id])
        pretrain = [r for r in pretrain if r["parent_run_id"] == parent_id]
    else:
        chosen = _newest_per_hash(cells)
    if expected is not None:
        done = _newest_per_hash([r for r in cells if r["status"] == tracking.FINISHED])
        latest = _newest_per_hash(cells)
        want = {e["hash"]: e for e in expected}
        chosen = {h: chosen.get(h) or done.get(h) or _missing_row(e, latest.get(h))
                  for h, e in want.items()}
    # pretraining runs the chosen cells start from, wherever they live
    have = {r["run_id"] for r in pretrain}
    for ref in {r.get("t_pretrain_run_id") for r in chosen.values()} - have - {None, ""}:
        run = tracking.get_run(ref)
        if run is not None:
            pretrain.append({**tracking.run_row(run), "role": PRETRAIN})
    df = pd.DataFrame(list(chosen.values()) + pretrain)
    for col in ("run_id", "status", "name", "spec_hash", "role", "error", *BASE_KEYS,
                "p_framework", "p_seed", "p_strategy"):
        if col not in df:
            df[col] = pd.Series(dtype=object)
    for p in (*INT_PARAMS, *FLOAT_PARAMS):  # MLflow params are strings
        col = f"p_{p}"
        if col in df:
            num = pd.to_numeric(df[col], errors="coerce")
            if num.notna().sum() == df[col].notna().sum():
                df[col] = num.astype("Int64") if p in INT_PARAMS else num.astype(float)
    df = fill_param_defaults(df)
    obj = [c for c in df.columns if df[c].dtype == object]
    df[obj] = df[obj].astype(object).where(df[obj].notna(), None)
    df["error"] = df["error"].fillna("")
    df = df.sort_values(["role", "name"], na_position="last").reset_index(drop=True)
    return tuned_view(df)


def _newest_per_hash(rows: list[dict]) -> dict[str, dict]:
    """Per spec hash: the newest FINISHED run, else the newest run of any status."""
    best: dict[str, dict] = {}
    for r in sorted(rows, key=lambda r: (r["status"] == tracking.FINISHED,
                                         r["start_time"] or 0)):
        best[r["spec_hash"] or r["run_id"]] = r
    return best


def fill_param_defaults(df: pd.DataFrame) -> pd.DataFrame:
    """Params a run predates (PARAM_DEFAULTS) take the value it ran with, so an old run and
    a new one of the same cell are one cell, not two rows."""
    df = df.copy()
    for col, value in PARAM_DEFAULTS.items():
        df[col] = df[col].where(df[col].notna(), value) if col in df else value
    return df


def _missing_row(e: dict, earlier: dict | None = None) -> dict:
    """A cell the grid expects and the selection has no run of; `earlier`: the newest run
    of the cell outside the selection (another invocation), named in the error column."""
    note = (f"not run in this invocation; latest earlier run {earlier['run_id']} "
            f"{earlier['status']}" if earlier else "")
    return {"run_id": None, "status": MISSING, "name": e["name"],
            "label": e.get("label", e["name"]), "spec_hash": e["hash"], "role": "cell",
            "error": note, **{f"p_{k}": v for k, v in e["params"].items()}}


def empty_history() -> pd.DataFrame:
    return pd.DataFrame({"run_id": pd.Series(dtype=object), "key": pd.Series(dtype=object),
                         "step": pd.Series(dtype=int), "value": pd.Series(dtype=float)})


def histories(frame: pd.DataFrame, keys: tuple[str, ...] = CURVE_KEYS) -> pd.DataFrame:
    """Per-epoch metrics (step = epoch) of every cell run that has a run id."""
    rows = []
    for rid in cells_only(frame)["run_id"].dropna():
        rows += [(rid, k, s, v) for k, s, v in tracking.metric_history(rid, keys)]
    return pd.DataFrame(rows, columns=["run_id", "key", "step", "value"]) if rows \
        else empty_history()


def add_derived(frame: pd.DataFrame, hist: pd.DataFrame) -> pd.DataFrame:
    """trainable_fraction; time_to_best_s: the epoch seconds summed up to best_val_epoch;
    train_seconds: every epoch's seconds summed; the end-to-end cost (end_to_end)."""
    df = frame.copy()
    if "trainable_params" in df and "total_params" in df:
        df["trainable_fraction"] = df["trainable_params"] / df["total_params"]
    secs = hist[hist["key"] == "epoch_seconds"]
    if "best_val_epoch" in df and not secs.empty:
        best = df.set_index("run_id")["best_val_epoch"].dropna()
        merged = secs.join(best, on="run_id", how="inner")
        upto = merged[merged["step"] <= merged["best_val_epoch"]]
        df["time_to_best_s"] = df["run_id"].map(upto.groupby("run_id")["value"].sum())
    if not secs.empty:
        df["train_seconds"] = df["run_id"].map(secs.groupby("run_id")["value"].sum())
    return end_to_end(df)


CACHED = ("features", "prefix:")  # tlbench.feature_cache_used of a phase that cached


def _column(df: pd.DataFrame, col: str) -> pd.Series:
    return pd.to_numeric(df[col], errors="coerce") if col in df \
        else pd.Series(float("nan"), index=df.index)


def end_to_end(df: pd.DataFrame) -> pd.DataFrame:
    """A cell's training as one waits for it, whatever its step rate times:
    end_to_end_seconds = its epochs' training seconds + the feature cache's forward pass
    (feature_cache_seconds: features of train, val and test, or a frozen prefix's output)
    + precise BatchNorm's recalibrations; end_to_end_images_per_sec = the images its epochs
    trained (train images x epochs) over those seconds. NaN where a part is not recorded
    (no epoch history; a cell that cached but predates feature_cache_seconds)."""
    if "train_seconds" not in df:
        return df
    df = df.copy()
    cache_tag = df.get("t_feature_cache_used", pd.Series(None, index=df.index, dtype=object))
    cached = cache_tag.map(lambda t: isinstance(t, str) and any(c in t for c in CACHED))
    cache = _column(df, "feature_cache_seconds")
    cache = cache.where(cache.notna() | cached, 0.0)  # nothing cached: no seconds to add
    bn = _column(df, "precise_bn_seconds").fillna(0.0)
    n_train = (_column(df, "epoch_train_images_per_sec") * _column(df, "epoch_seconds")).round()
    df["end_to_end_seconds"] = _column(df, "train_seconds") + cache + bn
    df["end_to_end_images_per_sec"] = (n_train * _column(df, "epochs_trained")
                                       / df["end_to_end_seconds"])
    return df


def cells_only(df: pd.DataFrame) -> pd.DataFrame:
    """The rows that are results: no pretraining runs, no tuned grid's trials."""
    return df[~df["role"].isin((PRETRAIN, TRIAL))] if "role" in df else df


def tuned_view(df: pd.DataFrame) -> pd.DataFrame:
    """Final rows with their study's strategy label and "tuned" in each searched field (the
    value chosen kept in `chosen`); every other row as it is."""
    if "t_tuned_fields" not in df:
        return df
    df = df.copy()
    final = df["t_tuned_fields"].notna() & (df["role"] != TRIAL)
    df["chosen"] = None
    for i in df.index[final]:
        fields = [f for f in str(df.at[i, "t_tuned_fields"]).split(",") if f]
        df.at[i, "chosen"] = ", ".join(f"{f}={df.at[i, 'p_' + f]}" for f in fields
                                       if "p_" + f in df)
        for f in fields:
            if "p_" + f in df and not f.startswith("strategy."):
                df["p_" + f] = df["p_" + f].astype(object)
                df.at[i, "p_" + f] = TUNED
        df.at[i, "p_strategy_label"] = df.at[i, "t_study_strategy"]
    return df


def group_keys(df: pd.DataFrame) -> list[str]:
    """The base keys plus every other param that takes more than one value: cells that
    differ in anything but framework and seed are never averaged together."""
    cells = cells_only(df)
    extra = sorted(c for c in cells.columns if c.startswith("p_") and c not in BASE_KEYS
                   and c not in NOT_KEYS and not c.startswith("p_strategy.")
                   and cells[c].astype(str).nunique() > 1)
    # the cards' digests follow the dataset; a key only when one dataset has several (its
    # card was edited between runs: other data, never averaged with the old)
    if "p_card_digests" in extra and "p_dataset" in cells and cells.groupby(
            cells["p_dataset"].astype(str))["p_card_digests"].nunique().max() <= 1:
        extra.remove("p_card_digests")
    return [*BASE_KEYS, *extra]


def status_labels(rows: pd.DataFrame) -> pd.Series:
    """Each row's status, 'FAILED (diverged)' for a cell whose loss went NaN/inf."""
    error = rows.get("error", pd.Series("", index=rows.index)).fillna("").astype(str)
    diverged = (rows["status"] == tracking.FAILED) & error.str.contains(DIVERGED_ERROR)
    return rows["status"].where(~diverged, f"{tracking.FAILED} (diverged)")


def not_finished(rows: pd.DataFrame) -> str:
    """'1 FAILED, 2 MISSING' for the rows of a group that did not finish."""
    labels = status_labels(rows)
    bad = labels[rows["status"] != tracking.FINISHED].value_counts()
    return ", ".join(f"{n} {s}" for s, n in sorted(bad.items()))


def tag_true(rows: pd.DataFrame, tag: str) -> pd.Series:
    """True where the tag t_<tag> starts with 'true'; False where it says false or is not
    recorded."""
    col = rows.get(f"t_{tag}")
    if col is None:
        return pd.Series(False, index=rows.index)
    return col.map(lambda v: isinstance(v, str) and v.strip().lower().startswith("true")
                   ).astype(bool)


def tag_recorded(rows: pd.DataFrame, tag: str) -> pd.Series:
    col = rows.get(f"t_{tag}")
    if col is None:
        return pd.Series(False, index=rows.index)
    return col.map(lambda v: isinstance(v, str) and v.strip() != "").astype(bool)


def contended_cells(rows: pd.DataFrame) -> int:
    """Finished cells of the rows timed while other processes used the machine."""
    return int(tag_true(finished_rows(rows), "contended").sum())


def diverged_cells(rows: pd.DataFrame) -> int:
    """Finished cells of the rows tagged diverged (tlbench.diverged, bench/cell/loop.py)."""
    return int(tag_true(finished_rows(rows), "diverged").sum())


def suspect_rate_cells(rows: pd.DataFrame) -> int:
    """Finished cells of the rows whose data-fed step rate sits above their model-only rate
    (tlbench.rate_check 'suspect: ...', bench/cell/timing.py): the two did not time the
    same work, so neither is a measurement of the strategy."""
    col = finished_rows(rows).get("t_rate_check")
    if col is None:
        return 0
    return int(col.map(lambda v: isinstance(v, str) and v.startswith("suspect"))
               .astype(bool).sum())  # astype: an empty object Series sums to ''


def part_rate_cells(rows: pd.DataFrame) -> int:
    """Finished cells of the rows whose step rates time only the part above a feature cache
    (tlbench.train_rate_of other than 'whole model': the head on cached features, the blocks
    above a cached prefix)."""
    col = finished_rows(rows).get("t_train_rate_of")
    if col is None:
        return 0
    # astype: an empty object Series sums to '' (no finished row)
    return int(col.map(lambda v: isinstance(v, str) and v.strip() not in ("", WHOLE_MODEL)
                       ).astype(bool).sum())


def finished_rows(rows: pd.DataFrame) -> pd.DataFrame:
    return rows[rows["status"] == tracking.FINISHED]


def finished_values(rows: pd.DataFrame, col: str) -> pd.Series:
    done = finished_rows(rows)
    return done[col] if col in done else pd.Series(dtype=float)


def frameworks(df: pd.DataFrame) -> list[str]:
    have = set(cells_only(df)["p_framework"].dropna())
    return [f for f in FRAMEWORK_ORDER if f in have] + sorted(have - set(FRAMEWORK_ORDER))


def distinct_values(series: pd.Series | None) -> list:
    if series is None:
        return []
    return sorted({v for v in series.dropna() if v != ""},
                  key=lambda v: (isinstance(v, str), v if not isinstance(v, str) else 0, str(v)))
