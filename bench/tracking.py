"""Every MLflow call lives here.

One experiment per grid; one parent run per invocation of the grid, with one nested child
run per cell (tag mlflow.parentRunId). The store is MLflow's default local one unless
MLFLOW_TRACKING_URI points somewhere else (a shared server, another folder).

Tags written on every cell run (prefix `tlbench.`): spec_hash, framework, backbone,
strategy, dataset, device, git_commit, versions; its owner's host, pid and heartbeat (a
cell's run is its claim, bench/run/claims.py); slot, cuda_visible_devices, cpus; on failure
`error`. The parent run holds the grid file (grid.toml), the cells it expects (cells.json),
the tag device_kind, its summary and comparison.json once it ends (bench/summary.py), and,
once `bench report` has run, report.md with its tables/ and figures/. A pretraining run (kind
`pretrain`) holds its checkpoint and sidecar under checkpoint/ and the tags checkpoint_key
and checkpoint_sha256, which other nodes find it by (bench/config/pretrained.py: publish, fetch).

The reporter's read helpers (bottom of this file) return plain rows (bench/report/ never
touches MLflow objects).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path

from bench.config.spec import RunSpec
from bench.paths import file_lock
from bench.provenance import host_tags

TAG = "tlbench."
PARENT_TAG = "mlflow.parentRunId"
FINISHED, FAILED, KILLED, RUNNING = "FINISHED", "FAILED", "KILLED", "RUNNING"
CELLS_ARTIFACT = "cells.json"  # on a parent run: the grid's cells (hash, name, params)
SYSTEM_METRICS_INTERVAL_S = 1.0  # a sample a second, each logged: a 10 s cell gets ~10

_READY: set[str] = set()  # tracking URIs whose store this process has opened once


def client():
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    if uri in _READY:
        return MlflowClient()
    # MlflowClient() creates a fresh sqlite store and migrates its schema; two runners doing
    # that at once fail in alembic ("CommandError: ... 0 found"). Opening the store under a
    # file lock lets the first create it and the next find it made.
    with _store_lock(uri):
        c = MlflowClient()
    _READY.add(uri)
    return c


def _store_lock(uri: str):
    path = _sqlite_path(uri)
    if path is None:  # a server or another database does its own locking
        return contextlib.nullcontext()
    return file_lock(path.with_name(path.name + ".lock"))


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///path` URI (None for anything else, or in memory)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def tracking_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


INPUT_TRIES = 4  # log_inputs attempts (tracking.log_inputs: a race on the datasets table)
EXPERIMENT_KIND = "mlflow.experimentKind"  # the MLflow 3 UI's view of an experiment


def experiment_id(name: str, create: bool = True) -> str | None:
    return open_experiment(name, create)[0]


def open_experiment(name: str, create: bool = True) -> tuple[str | None, bool]:
    """(the experiment's id, whether it had been deleted and was restored just now).

    A deleted experiment keeps its name until `mlflow gc` purges it, so it is restored, not
    shadowed; the caller says so, since its finished cells count as done again. Created when
    missing (and `create`); a runner that loses the race to create it uses the winner's."""
    from mlflow.exceptions import MlflowException

    c = client()
    exp = c.get_experiment_by_name(name)
    if exp is None and create:
        try:
            # the UI opens a model-training experiment on its runs (MLflow 3 guesses a GenAI
            # experiment otherwise, and shows traces and evaluation runs first)
            return c.create_experiment(name, tags={EXPERIMENT_KIND: "custom_model_development"}
                                       ), False
        except MlflowException:
            exp = c.get_experiment_by_name(name)  # another runner created it meanwhile
            if exp is None:
                raise
    if exp is None:
        return None, False
    if EXPERIMENT_KIND not in exp.tags and create:  # made by an older harness
        c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND, "custom_model_development")
    if exp.lifecycle_stage == "deleted":
        c.restore_experiment(exp.experiment_id)
        return exp.experiment_id, True
    return exp.experiment_id, False


def source_name(grid) -> str:
    """The command that made a grid's runs, as the UI's "Source" column shows it."""
    try:
        path = os.path.relpath(grid.path)
    except ValueError:
        path = grid.path
    return f"python -m bench run {path}"


def _tag_key(k: str) -> str:
    """tlbench.<k> for the harness's own tags; MLflow's (mlflow.*) as they are."""
    return k if k.startswith("mlflow.") else TAG + k


# ---- runs --------------------------------------------------------------------------------
def start_parent(exp_id: str, grid, n_todo: int, grid_text: str,
                 tags: dict[str, str] | None = None) -> str:
    """The run of one grid invocation; `tags` (tlbench. prefix added): how it runs (the
    executor, its slots)."""
    c = client()
    run = c.create_run(exp_id, run_name=f"{grid.name} {time.strftime('%Y-%m-%d %H:%M:%S')}",
                       tags={TAG + "kind": "grid", TAG + "grid": grid.name,
                             TAG + "grid_path": grid.path, TAG + "smoke": str(grid.smoke),
                             TAG + "device_kind": grid.device_kind or "cpu",
                             TAG + "cells": str(len(grid.specs)), TAG + "todo": str(n_todo),
                             "mlflow.note.content": grid.description, **host_tags(TAG),
                             "mlflow.source.name": source_name(grid),
                             **{TAG + k: str(v) for k, v in (tags or {}).items()}})
    c.log_text(run.info.run_id, grid_text, "grid.toml")
    # the cells this invocation expects, so a report can name the ones that never ran
    c.log_text(run.info.run_id, json.dumps(cell_list(grid), indent=1), CELLS_ARTIFACT)
    _PARENTS.add(run.info.run_id)
    return run.info.run_id


def cell_list(grid, specs: list[RunSpec] | None = None) -> list[dict]:
    """The grid's cells (or `specs`: a tuned grid's trials and finals) as the parent run
    records them: hash, name, label, params."""
    return [{"hash": s.hash, "name": s.name, "label": grid.label(s), "params": s.to_params()}
            for s in (grid.specs if specs is None else specs)]


def start_cell(exp_id: str, parent_id: str, spec: RunSpec, label: str, device: str,
               kind: str = "cell", tags: dict[str, str] | None = None,
               run_name: str | None = None) -> str:
    """A nested run for one spec: kind 'cell' (a grid cell) or 'pretrain' (a pretraining
    that cells link to with tlbench.pretrain_run_id; never counted as a finished cell).
    `label`: the full label (tag tlbench.label and the run's description); `run_name`: what
    the UI's run list shows (the label when not given). `tags` (tlbench. prefix added,
    except to mlflow.* keys) override the owner tags (bench/run/claims.py)."""
    c, extra = client(), tags
    tags = {PARENT_TAG: parent_id, TAG + "kind": kind, TAG + "spec_hash": spec.hash,
            TAG + "name": spec.name, TAG + "label": label, TAG + "framework": spec.framework,
            TAG + "backbone": spec.backbone, TAG + "strategy": spec.strategy_label,
            TAG + "dataset": spec.dataset, TAG + "device_requested": device,
            "mlflow.note.content": f"{label}\n\ncell {spec.hash} of `{spec.name}`",
            **host_tags(TAG)}
    if kind == "pretrain" or spec.role:  # a tuned grid's trial or final cell
        tags[TAG + "role"] = "pretrain" if kind == "pretrain" else spec.role
    run = c.create_run(exp_id, run_name=run_name or label,
                       tags={**tags, **{_tag_key(k): str(v) for k, v in (extra or {}).items()}})
    rid = run.info.run_id
    from mlflow.entities import Param

    c.log_batch(rid, params=[Param(k, v) for k, v in spec.to_params().items()])
    c.log_text(rid, spec.to_json(), "spec.json")
    return rid


def log_metrics(run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    client().log_batch(run_id, metrics=[Metric(k, float(v), ts, step or 0)
                                        for k, v in metrics.items()])


def set_tags(run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag

    client().log_batch(run_id, tags=[RunTag(TAG + k if "." not in k else k, str(v)[:5000])
                                     for k, v in tags.items()])


def log_inputs(run_id: str, inputs: list[dict]) -> None:
    """Datasets a run read, for the UI's Datasets column and panel: each a dict of name,
    digest, source_type, source, profile (strings) and context (train, val, test: the
    input's `mlflow.data.context` tag)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.exceptions import MlflowException

    datasets = [DatasetInput(Dataset(d["name"], d["digest"], d["source_type"], d["source"],
                                     schema=d.get("schema"), profile=d.get("profile")),
                             tags=[InputTag("mlflow.data.context", d["context"])])
                for d in inputs]
    # A store keeps one row per (experiment, name, digest) and makes it on first use: two
    # cells of one split logging at once (--parallel, Ray) race to create it, and the loser
    # gets a UNIQUE-constraint error. Its retry finds the row and links it. Inputs describe
    # the cell's data; a store that still refuses them costs a tag, never the cell's record.
    for attempt in range(INPUT_TRIES):
        try:
            client().log_inputs(run_id, datasets=datasets)
            return
        except MlflowException as e:
            if attempt == INPUT_TRIES - 1:
                set_tags(run_id, {"inputs": f"not logged: {type(e).__name__}: {e}"[:500]})
                return
            time.sleep(0.2 * (attempt + 1))


def log_text(run_id: str, text: str, name: str) -> None:
    client().log_text(run_id, text, name)


def log_file(run_id: str, path: str) -> None:
    client().log_artifact(run_id, path)


_PARENTS: set[str] = set()  # grid invocations this process started (start_parent)


def end_run(run_id: str, status: str) -> None:
    """End a run; a grid invocation's parent first gets its summary of its cells, read back
    from the store (bench/summary.py: per framework and strategy, and the comparison table)."""
    if run_id in _PARENTS:
        _summarise_parent(run_id)
    client().set_terminated(run_id, status=status)


def _summarise_parent(run_id: str) -> None:
    import pandas as pd

    from bench import summary

    exp_id = client().get_run(run_id).info.experiment_id
    metrics, table = summary.parent_metrics([run_row(r) for r in child_runs(exp_id, run_id)])
    if metrics:
        log_metrics(run_id, metrics)
    if table:  # the Artifacts tab shows it as a table
        client().log_table(run_id, data=pd.DataFrame(table), artifact_file=summary.COMPARISON)


def delete_run(run_id: str) -> None:
    """A withdrawn claim (bench/run/claims.py): deleted, so no cell shows twice."""
    client().delete_run(run_id)


@contextmanager
def system_metrics(run_id: str):
    """MLflow's own system metrics (system/cpu_utilization_percentage, memory, disk,
    network; GPU through NVML when pynvml is installed) on `run_id` while the block runs.

    Sampled in this process, the runner's, since the cell process has no MLflow client; the
    figures are the machine's, so they include the cell. Every sample is logged (a cell is
    short); stopped, and what is pending flushed, when the block ends, however it ends."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    # its start/stop notes are INFO lines on the console, once per cell: keep them out
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)
    try:
        monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S,
                                       samples_before_logging=1, tracking_uri=tracking_uri())
    except Exception as e:  # noqa: BLE001 - a cell is not failed for its side readings
        set_tags(run_id, {"system_metrics": f"off: {type(e).__name__}: {e}"})
        yield None
        return
    monitor.start()
    try:
        yield monitor
    finally:
        monitor.finish()
        _log_last_sample(monitor)


def _log_last_sample(monitor) -> None:
    """MLflow's monitor drops the samples of its last, unfinished interval: log them, so a
    cell shorter than one interval still gets its reading."""
    pending = monitor.aggregate_metrics()
    if pending:
        monitor.publish_metrics(pending)
        monitor.mlflow_logger.flush()


# ---- resume ------------------------------------------------------------------------------
def cell_runs(exp_id: str, status: str | None = None) -> list:
    flt = f"tags.`{TAG}kind` = 'cell'"
    if status:
        flt += f" and attributes.status = '{status}'"
    return _search(exp_id, flt)


def _search(exp_id: str, flt: str) -> list:
    c = client()
    runs, token = [], None
    while True:
        page = c.search_runs([exp_id], filter_string=flt, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def finished_hashes(exp_id: str) -> set[str]:
    return {r.data.tags.get(TAG + "spec_hash") for r in cell_runs(exp_id, FINISHED)}


def runs_for_hash(exp_id: str, spec_hash: str, kind: str | None = "cell") -> list:
    """Every active run of one spec hash (of one kind: cell or pretrain)."""
    flt = f"tags.`{TAG}spec_hash` = '{spec_hash}'"
    if kind:
        flt += f" and tags.`{TAG}kind` = '{kind}'"
    return _search(exp_id, flt)


def running_runs(exp_id: str) -> list:
    return _search(exp_id, "attributes.status = 'RUNNING'")


def latest_parent(exp_id: str):
    runs = client().search_runs([exp_id], filter_string=f"tags.`{TAG}kind` = 'grid'",
                                order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


# ---- pretrained checkpoints shared through the store ----------------------------------------
CHECKPOINT_FOLDER = "checkpoint"  # on a pretraining run: <key>.ckpt and its <key>.json sidecar


def log_checkpoint(run_id: str, files: list[Path], key: str, sha256: str) -> None:
    """A pretraining run's checkpoint files into its artifacts (checkpoint/), then the tags
    other nodes find it by: set last, so a run carrying them has its files complete."""
    c = client()
    for f in files:
        c.log_artifact(run_id, str(f), CHECKPOINT_FOLDER)
    set_tags(run_id, {"checkpoint_key": key, "checkpoint_sha256": sha256})


def active_experiments() -> list:
    """Every active experiment of the store."""
    from mlflow.entities import ViewType

    c = client()
    out, token = [], None
    while True:
        page = c.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=1000,
                                    page_token=token)
        out += list(page)
        token = page.token
        if not token:
            return out


def ui_links(base_url: str) -> list[tuple[str, str]]:
    """(experiment name, the link that opens its runs in the UI's model-training view) for
    every experiment a grid ran in, newest first; after each, where its latest invocation
    logged one, the link to that parent's comparison table (bench/summary.py)."""
    exps = [e for e in active_experiments()
            if e.tags.get(EXPERIMENT_KIND) == "custom_model_development" or e.name != "Default"]
    exps.sort(key=lambda e: e.last_update_time or 0, reverse=True)
    # workflowType: the UI's GenAI / Model training switch (kept in the browser otherwise, and
    # GenAI in a fresh one)
    base, ml, out = f"{base_url.rstrip('/')}/#/experiments", "?workflowType=machine_learning", []
    for e in exps:
        out.append((e.name, f"{base}/{e.experiment_id}/runs{ml}"))
        parent = latest_parent(e.experiment_id)
        if parent is not None and "comparison.json" in parent.data.tags.get(
                "mlflow.loggedArtifacts", ""):
            out.append((f"{e.name} comparison", f"{base}/{e.experiment_id}/runs/"
                        f"{parent.info.run_id}/artifactPath/comparison.json{ml}"))
    return out


def find_checkpoint_runs(key: str, limit: int = 5) -> list:
    """FINISHED runs that published the checkpoint `key`, in any active experiment of the
    store, newest first."""

    c = client()
    exp_ids = [e.experiment_id for e in active_experiments()]
    if not exp_ids:
        return []
    return list(c.search_runs(exp_ids, filter_string=f"tags.`{TAG}checkpoint_key` = '{key}' "
                                                     f"and attributes.status = '{FINISHED}'",
                              order_by=["attributes.start_time DESC"], max_results=limit))


def download_artifact(run_id: str, path: str, dst: Path) -> Path:
    """One artifact of a run into the folder `dst` (through the server when it proxies
    artifacts); the local path of the copy."""
    return Path(client().download_artifacts(run_id, path, str(dst)))


# ---- reading (the reporter) --------------------------------------------------------------
def get_run(run_id: str):
    """The run, or None when the store has no run with that id."""
    from mlflow.exceptions import MlflowException

    try:
        return client().get_run(run_id)
    except MlflowException:
        return None


def experiment_name(exp_id: str) -> str:
    return client().get_experiment(exp_id).name


def parent_runs(exp_id: str) -> list:
    """The grid invocations of an experiment, newest first."""
    runs = _search(exp_id, f"tags.`{TAG}kind` = 'grid'")
    return sorted(runs, key=lambda r: r.info.start_time, reverse=True)


def child_runs(exp_id: str, parent_id: str) -> list:
    return _search(exp_id, f"tags.`{PARENT_TAG}` = '{parent_id}'")


def experiment_runs(exp_id: str) -> list:
    """Every run of the experiment except the grid invocations (cells, pretraining)."""
    return [r for r in _search(exp_id, "") if r.data.tags.get(TAG + "kind") != "grid"]


def expected_cells(parent_id: str) -> list[dict] | None:
    """The cells a grid invocation expected ({hash, name, label, params}), or None for a
    parent written before the runner logged them."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    try:
        text = mlflow.artifacts.load_text(f"runs:/{parent_id}/{CELLS_ARTIFACT}")
    except (MlflowException, OSError):
        return None
    return json.loads(text)


def grid_text(parent_id: str) -> str | None:
    """The grid file a grid invocation ran (grid.toml on its parent run)."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.artifacts.load_text(f"runs:/{parent_id}/grid.toml")
    except (MlflowException, OSError):
        return None


def metric_history(run_id: str, keys: tuple[str, ...]) -> list[tuple[str, int, float]]:
    """(key, step, value) for every logged value of these metrics, in step order."""
    c = client()
    out = []
    for key in keys:
        out += sorted((key, m.step, m.value) for m in c.get_metric_history(run_id, key))
    return out


def run_row(run) -> dict:
    """One run flattened into one row (benchopt style): params as p_*, the final value of
    every metric by its name, tlbench.* tags as t_*, and the run's identity and status."""
    info, tags = run.info, run.data.tags
    row = {"run_id": info.run_id, "experiment_id": info.experiment_id,
           "parent_run_id": tags.get(PARENT_TAG),
           "run_name": info.run_name, "status": info.status, "start_time": info.start_time,
           "end_time": info.end_time, "name": tags.get(TAG + "name"),
           # the grid's label: the name plus fields it varies (older runs: their run name)
           "label": tags.get(TAG + "label") or info.run_name,
           "spec_hash": tags.get(TAG + "spec_hash"),
           "role": tags.get(TAG + "role") or tags.get(TAG + "kind") or "cell",
           "device": tags.get(TAG + "device", ""), "error": tags.get(TAG + "error", "")}
    row.update({f"p_{k}": v for k, v in run.data.params.items()})
    row.update(run.data.metrics)
    row.update({f"t_{k[len(TAG):]}": v for k, v in tags.items() if k.startswith(TAG)})
    return row


def log_report(run_id: str, folder: str) -> None:
    """A report folder (report.md at its top) into the run's artifacts, top level, so the
    relative links of report.md resolve in the MLflow UI."""
    client().log_artifacts(run_id, folder)
