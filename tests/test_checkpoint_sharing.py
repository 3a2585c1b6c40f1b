"""A pretrained checkpoint made on one node is used by the others without being made twice:
the pretraining run publishes it as artifacts of the tracking store (checkpoint/), and a
node whose cache lacks it fetches it, checked by sha256 against the run's tag and the
published sidecar. A second node is simulated by a fresh, empty TLBENCH_CACHE on the same
store; both a local sqlite store and a real `mlflow server` (artifacts proxied) are used."""

from __future__ import annotations

import os

import pytest
from test_pretrain import pretrain_runs
from test_pretrain import run as run_grid

from bench import checkpoints, tracking
from bench.config import pretrained

pytestmark = pytest.mark.slow

def run(folder, name, rerun=False):
    return run_grid(folder, '["feature_extraction"]', name=name, rerun=rerun)


def new_node(folder, monkeypatch, n: int) -> None:
    """Another machine on the same tracking store: its own empty harness cache."""
    cache = folder / f"cache-node{n}"
    assert not cache.exists()
    monkeypatch.setenv("TLBENCH_CACHE", str(cache))


@pytest.mark.timeout(600)
def test_checkpoint_made_once_travels_through_the_store(any_store, monkeypatch, capsys):
    folder, name = any_store
    first = run(folder, name)
    assert [o.status for o in first.outcomes] == ["FINISHED"], first.outcomes[0].error
    exp_id = first.experiment_id
    (pre,) = pretrain_runs(exp_id)
    pre_id = pre.info.run_id
    ckpt = checkpoints.Checkpoint.of(pretrained.pretrain_spec(first.outcomes[0].spec))
    made_sha = ckpt.meta()["sha256"]
    assert pre.data.tags[tracking.TAG + "checkpoint_key"] == ckpt.key
    assert pre.data.tags[tracking.TAG + "checkpoint_sha256"] == made_sha
    c = tracking.client()
    published = {a.path: a.file_size for a in c.list_artifacts(pre_id, "checkpoint")}
    assert published == {f"checkpoint/{ckpt.key}.ckpt": ckpt.path.stat().st_size,
                         f"checkpoint/{ckpt.key}.json": ckpt.meta_path.stat().st_size}
    if tracking.tracking_uri().startswith("http"):
        assert pre.info.artifact_uri.startswith("mlflow-artifacts:/")  # through the server

    # node 2: an empty cache, the same store: the checkpoint is fetched, not made again
    new_node(folder, monkeypatch, 2)
    assert ckpt.problem() == "missing"
    capsys.readouterr()
    second = run(folder, name, rerun=True)
    err = capsys.readouterr().err
    assert [o.status for o in second.outcomes] == ["FINISHED"], second.outcomes[0].error
    assert len(pretrain_runs(exp_id)) == 1, "the checkpoint was pretrained a second time"
    assert f"fetched from the tracking store (run {pre_id})" in err, err
    assert ckpt.problem() is None
    assert checkpoints.sha256_file(ckpt.path) == made_sha
    meta = ckpt.meta()
    assert meta["run_id"] == pre_id and meta["fetched_from"] == tracking.tracking_uri()
    cell = tracking.get_run(second.outcomes[0].run_id)
    assert cell.info.status == "FINISHED"
    assert cell.data.tags[tracking.TAG + "pretrain_run_id"] == pre_id
    assert cell.data.tags[tracking.TAG + "pretrain_checkpoint"] == str(ckpt.path)

    # the published copy is corrupted (a truncated upload): node 3 refuses it, pretrains
    broken = folder / "broken" / f"{ckpt.key}.ckpt"
    broken.parent.mkdir()
    with open(folder / "cache-node2" / "pretrained" / f"{ckpt.key}.ckpt", "rb") as fh:
        broken.write_bytes(fh.read(1000))
    c.log_artifact(pre_id, str(broken), "checkpoint")
    assert {a.path: a.file_size for a in c.list_artifacts(pre_id, "checkpoint")}[
        f"checkpoint/{ckpt.key}.ckpt"] == 1000
    new_node(folder, monkeypatch, 3)
    capsys.readouterr()
    third = run(folder, name, rerun=True)
    err = capsys.readouterr().err
    assert [o.status for o in third.outcomes] == ["FINISHED"], third.outcomes[0].error
    assert f"published checkpoint {ckpt.key} of run {pre_id} refused" in err, err
    assert "sha256 mismatch" in err and "(1000 bytes)" in err, err
    runs = pretrain_runs(exp_id)
    assert len(runs) == 2
    (remade,) = [r for r in runs if r.info.run_id != pre_id]
    meta = ckpt.meta()
    assert ckpt.problem() is None and meta["run_id"] == remade.info.run_id
    assert "fetched_from" not in meta
    assert remade.data.tags[tracking.TAG + "checkpoint_sha256"] == meta["sha256"]
    assert not [p for p in os.listdir(ckpt.folder) if p.endswith((".partial", ".fetch"))]
