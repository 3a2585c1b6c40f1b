"""Weights the harness pretrains itself (`pretrained:<dataset>[...]`): the syntax and its
validation, class-subset datasets, the checksummed cache with its lock, loading and
re-initialising blocks in both frameworks, and the runner pretraining once per key."""

from __future__ import annotations

import dataclasses
import fcntl
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import checkpoints, tracking
from bench.config import grid as gridmod
from bench.config import pretrained
from bench.config.spec import RunSpec
from bench.data import DatasetError, check_card, prepare
from bench.data.cards import CardError
from bench.run import runner

CARDS = """
[datasets.digits_a]
source = "sklearn_digits"
classes = [0, 1, 2, 3, 4]
[datasets.digits_b]
source = "sklearn_digits"
classes = [5, 6, 7, 8, 9]
"""


def cell(**kw) -> RunSpec:
    base = dict(framework="torch", backbone="resnet18", dataset="digits_b",
                weights="pretrained:digits_a[epochs=1]", image_size=16, batch_size=16,
                epochs=1, subset=60, lr=1e-3)
    return RunSpec(**{**base, **kw})


# ---- the weights value ---------------------------------------------------------------------
def test_weights_spelling_is_canonical_so_equal_pretrainings_hash_equal():
    a = RunSpec("torch", "resnet18", "digits", weights="pretrained:digits_a[subset=0,epochs=5]")
    b = RunSpec("torch", "resnet18", "digits", weights="pretrained:digits_a[ epochs=5 ]")
    assert a.weights == b.weights == "pretrained:digits_a[epochs=5]"
    assert a.hash == b.hash
    assert RunSpec("torch", "resnet18", "digits",
                   weights="pretrained:digits_a[epochs=10]").weights == "pretrained:digits_a"
    assert RunSpec.from_params(a.to_params()) == a


def test_pretrain_spec_takes_the_cells_recipe_on_the_source_dataset():
    c = cell(strategy="partial", strategy_params=(("depth", 2),), head="mlp", seed=3,
             weights="pretrained:digits_a[epochs=4,lr=0.01,subset=200]")
    p = pretrained.pretrain_spec(c)
    assert (p.dataset, p.epochs, p.lr, p.subset, p.seed) == ("digits_a", 4, 0.01, 200, 3)
    assert (p.strategy, p.weights, p.head) == ("full", "none", "linear")
    assert (p.backbone, p.image_size, p.batch_size) == (c.backbone, 16, 16)
    # every cell that names the same pretraining shares one checkpoint key
    other = dataclasses.replace(c, strategy="feature_extraction", strategy_params=())
    assert checkpoints.Checkpoint.of(pretrained.pretrain_spec(other)).key == \
        checkpoints.Checkpoint.of(p).key
    # a different recipe is a different checkpoint
    assert pretrained.pretrain_spec(dataclasses.replace(c, image_size=32)).hash != p.hash
    assert pretrained.pretrain_spec(dataclasses.replace(c, seed=1)).hash != p.hash
    fixed = dataclasses.replace(c, weights="pretrained:digits_a[seed=0]")
    assert pretrained.pretrain_spec(fixed).seed == 0
    assert pretrained.pretrain_spec(RunSpec("torch", "resnet18", "digits")) is None


@pytest.mark.parametrize("weights, needle", [
    ("pretrained:nowhere", "unknown source dataset 'nowhere'"),
    ("pretrained:digits_a[epoch=3]", "unknown parameter 'epoch'; allowed: epochs, seed"),
    ("pretrained:digits_a[epochs=0]", "epochs = 0: must be an integer >= 1"),
    ("pretrained:digits_a[lr=-1]", "lr = -1: must be a number > 0"),
    ("pretrained:digits_a[epochs=2,3]", "epochs has 2 values"),
    ("pretrained:digits_a[epochs=2", "malformed selector"),
    ("pretrained:", "no source dataset"),
    ("imagenett", "allowed: 'imagenet', 'none', 'pretrained:<dataset>"),
])
def test_bad_pretrained_weights_are_refused_naming_the_field(tmp_path, weights, needle):
    g = tmp_path / "g.toml"
    g.write_text(f'name = "x"\n[axes]\nframework = ["torch"]\nbackbone = ["resnet18"]\n'
                 f'dataset = ["digits_b"]\nweights = ["{weights}"]\n' + CARDS)
    with pytest.raises(gridmod.GridError) as e:
        gridmod.load(g)
    assert "weights" in str(e.value) and needle in str(e.value), str(e.value)


def test_grid_carries_the_source_card_for_the_runner(tmp_path):
    g = tmp_path / "g.toml"
    g.write_text('name = "x"\n[axes]\nframework = ["torch"]\nbackbone = ["resnet18"]\n'
                 'dataset = ["digits_b"]\nweights = ["pretrained:digits_a", "none"]\n' + CARDS)
    grid = gridmod.load(g)
    assert set(grid.cards) == {"digits_a", "digits_b"}
    assert len(grid.specs) == 2


def test_smoke_shrinks_the_pretraining_too(tmp_path):
    g = tmp_path / "g.toml"
    g.write_text('name = "x"\n[axes]\nframework = ["torch"]\nbackbone = ["resnet18"]\n'
                 'dataset = ["digits_b"]\nweights = ["pretrained:digits_a", '
                 '"pretrained:digits_a[epochs=20,subset=50,lr=0.1]"]\n' + CARDS)
    smoke = gridmod.load(g, smoke=True)
    assert sorted(s.weights for s in smoke.specs) == [
        "pretrained:digits_a[epochs=1,lr=0.1,subset=50]",
        "pretrained:digits_a[epochs=1,subset=120]"]
    assert {s.weights for s in gridmod.load(g).specs} == {
        "pretrained:digits_a", "pretrained:digits_a[epochs=20,lr=0.1,subset=50]"}


# ---- class-subset datasets (Yosinski's A and B) --------------------------------------------
def test_class_subsets_are_disjoint_and_relabelled():
    a = prepare(check_card({"name": "da", "source": "sklearn_digits",
                            "classes": [0, 1, 2, 3, 4]}, "a"), 0, 0)
    b = prepare(check_card({"name": "db", "source": "sklearn_digits",
                            "classes": [5, 6, 7, 8, 9]}, "b"), 0, 0)
    assert a.source.class_names == ["0", "1", "2", "3", "4"]
    assert b.source.class_names == ["5", "6", "7", "8", "9"]
    for p in (a, b):
        assert set(np.unique(p.source.labels)) == set(range(5))
    # the images of B are the source's images of digits 5..9 (none of A's)
    assert len(a.source) + len(b.source) == 1797
    assert not set(map(bytes, a.source.images[:50])) & set(map(bytes, b.source.images))


def test_bad_class_lists_are_refused():
    with pytest.raises(CardError, match="classes"):
        check_card({"source": "sklearn_digits", "classes": [1, 1]}, "datasets.x")
    with pytest.raises(CardError, match="classes"):
        check_card({"source": "sklearn_digits", "classes": []}, "datasets.x")
    with pytest.raises(DatasetError, match=r"classes \['11'\] are not in its source"):
        prepare(check_card({"name": "x", "source": "sklearn_digits", "classes": [1, 11]},
                           "x"), 0, 0)


# ---- the checkpoint cache ------------------------------------------------------------------
def test_corrupted_checkpoint_is_detected_and_verify_refuses_it(store):
    p = pretrained.pretrain_spec(cell())
    ckpt = checkpoints.Checkpoint.of(p)
    assert ckpt.problem() == "missing"
    ckpt.folder.mkdir(parents=True)
    written = ckpt.partial_path
    written.write_bytes(os.urandom(4096))
    meta = ckpt.commit(written, "run123", p)
    assert not written.exists() and ckpt.path.exists()
    assert ckpt.problem() is None and ckpt.meta()["run_id"] == "run123"
    checkpoints.verify(ckpt.path, meta["sha256"])
    with ckpt.path.open("r+b") as fh:  # truncated, as by a full disk or a killed copy
        fh.truncate(1000)
    assert "truncated or corrupted" in ckpt.problem()
    with pytest.raises(pretrained.WeightsError, match="changed since it was checked"):
        checkpoints.verify(ckpt.path, meta["sha256"])
    ckpt.meta_path.unlink()
    assert "no readable checksum" in ckpt.problem()


def test_checkpoint_lock_is_exclusive(store):
    ckpt = checkpoints.Checkpoint("k" * 20)
    with ckpt.lock():
        with open(ckpt.folder / f"{ckpt.key}.lock", "w") as other:
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(ckpt.folder / f"{ckpt.key}.lock", "w") as other:  # released: free again
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)


# ---- loading and re-initialising blocks ----------------------------------------------------
def test_torch_checkpoint_roundtrip_and_reinit_top_blocks(tmp_path):
    from strategies.torch_backend.backbones import (
        build,
        load_backbone,
        reinit_top_blocks,
        save_backbone,
    )

    torch.manual_seed(0)
    src = build("resnet18", "none", 5)
    with torch.no_grad():  # make every tensor distinguishable from any fresh init
        for t in src.model.state_dict().values():
            t.add_(1) if t.is_floating_point() else None
    path = tmp_path / "b.ckpt"
    save_backbone(src, path)
    dst = build("resnet18", "none", 7, "mlp")
    load_backbone(dst, path)
    s, d = src.model.state_dict(), dst.model.state_dict()
    body = [k for k in s if not k.startswith("fc.")]
    assert all(torch.equal(s[k], d[k]) for k in body)
    assert dst.head[-1].out_features == 7  # the new head keeps its own size and init

    top = reinit_top_blocks(dst, 2)
    assert top == ["stage3", "stage4"]
    d = dst.model.state_dict()
    for k in (k for k in body if s[k].is_floating_point()):
        same = torch.equal(s[k], d[k])
        in_top = k.startswith(("layer3.", "layer4."))
        assert same != in_top, k  # bottom blocks copied bit for bit, top ones re-drawn
    bn = dst.model.layer4[0].bn1
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))  # stats reset too

    other = build("resnet50", "none", 5)
    with pytest.raises(ValueError, match="does not fit resnet50"):
        load_backbone(other, path)


def test_keras_checkpoint_roundtrip_and_reinit_top_blocks(tmp_path):
    pytest.importorskip("tensorflow")
    from strategies.keras_backend.backbones import (
        build,
        load_backbone,
        reinit_top_blocks,
        save_backbone,
    )

    src = build("mobilenet_v2", "none", 5, "linear", 32)
    for v in src.model.weights:
        v.assign(v.numpy() + 1.0)
    path = tmp_path / "b.ckpt"
    save_backbone(src, path)
    dst = build("mobilenet_v2", "none", 7, "mlp", 32)
    load_backbone(dst, path)
    s = {v.path: v.numpy() for v in src.model.weights}
    owner = dst.weight_owner()
    body = [p for p, b in owner.items() if b != "head"]
    assert body and all(np.array_equal(s[p], v.numpy()) for v in dst.model.weights
                        if (p := v.path) in body)
    top = reinit_top_blocks(dst, 2)
    assert top == ["stage7", "top_conv"]
    for v in dst.model.weights:
        if owner[v.path] == "head":
            continue
        assert np.array_equal(s[v.path], v.numpy()) != (owner[v.path] in top), v.path

    with pytest.raises(ValueError, match="does not fit"):
        load_backbone(build("vgg16", "none", 5, "linear", 32), path)


# ---- the runner: pretrain once per key, link, re-make a corrupted checkpoint ---------------
GRID = """
name = "{name}"
[axes]
framework = ["torch"]
backbone = ["resnet18"]
weights = ["pretrained:digits_a[epochs=1,subset=80]"]
strategy = {strategies}
dataset = ["digits_b"]
[defaults]
subset = 40
image_size = 16
batch_size = 16
epochs = 1
[run]
device = "cpu"
""" + CARDS


def run(tmp_path: Path, strategies: str, name: str = "pt", rerun: bool = False):
    """A grid of cells on `pretrained:digits_a[epochs=1,subset=80]` weights, run."""
    g = tmp_path / "g.toml"
    g.write_text(GRID.format(strategies=strategies, name=name))
    # the stream looked up now: the test's captured stderr, not the one at import time
    return runner.run_grid(gridmod.load(g), g.read_text(), rerun=rerun, stream=sys.stderr)


def pretrain_runs(exp_id: str) -> list:
    return tracking._search(exp_id, f"tags.`{tracking.TAG}kind` = 'pretrain'")


@pytest.mark.slow
def test_runner_pretrains_once_links_cells_and_remakes_a_corrupted_checkpoint(store, capsys):
    first = run(store, '["feature_extraction", "reinit_top[depth=2]"]')
    assert [o.status for o in first.outcomes] == ["FINISHED", "FINISHED"]
    # progress: the pretraining's epochs under its own name, then the cell's under the cell's
    epochs = [ln for ln in capsys.readouterr().err.splitlines() if " epoch " in ln]
    assert [ln.split()[0] for ln in epochs if "/digits_a" in ln] == ["[pretrain]"]
    assert [ln.split()[0] for ln in epochs if "/digits_b" in ln] == ["[1/2]", "[2/2]"]
    pre = pretrain_runs(first.experiment_id)
    assert len(pre) == 1 and pre[0].info.status == "FINISHED"
    pre_id = pre[0].info.run_id
    assert pre[0].data.tags[tracking.TAG + "role"] == "pretrain"
    assert pre[0].data.params["dataset"] == "digits_a"
    cells = tracking.cell_runs(first.experiment_id)  # pretraining is not a grid cell
    assert len(cells) == 2
    assert {c.data.tags[tracking.TAG + "pretrain_run_id"] for c in cells} == {pre_id}
    reinit = [c for c in cells if "reinit" in c.data.tags[tracking.TAG + "strategy"]][0]
    assert reinit.data.tags[tracking.TAG + "reinit_blocks"] == "stage3,stage4"

    ckpt = checkpoints.Checkpoint.of(pretrained.pretrain_spec(first.outcomes[0].spec))
    assert ckpt.problem() is None and ckpt.meta()["run_id"] == pre_id

    # a later invocation reuses the checkpoint: no second pretraining
    second = run(store, '["feature_extraction", "full"]')
    assert [o.status for o in second.outcomes] == ["SKIPPED", "FINISHED"]
    assert len(pretrain_runs(first.experiment_id)) == 1
    new = [o for o in second.outcomes if o.status == "FINISHED"][0]
    assert tracking.client().get_run(new.run_id).data.tags[
        tracking.TAG + "pretrain_run_id"] == pre_id

    # a truncated checkpoint is detected and made again, never loaded
    with ckpt.path.open("r+b") as fh:
        fh.truncate(100)
    capsys.readouterr()
    third = run(store, '["partial[depth=1]"]')
    assert [o.status for o in third.outcomes] == ["FINISHED"]
    assert "truncated or corrupted" in capsys.readouterr().err
    runs = pretrain_runs(first.experiment_id)
    assert len(runs) == 2
    assert ckpt.problem() is None and ckpt.meta()["run_id"] != pre_id


@pytest.mark.slow
def test_failed_pretraining_fails_its_cells_once_with_the_cause(store, monkeypatch):
    g = store / "g.toml"
    # the source names a class the dataset lacks: the pretraining run fails
    g.write_text(GRID.format(strategies='["feature_extraction", "full"]', name="pt")
                 .replace("classes = [0, 1, 2, 3, 4]", "classes = [0, 1, 12]"))
    result = runner.run_grid(gridmod.load(g), g.read_text())
    assert [o.status for o in result.outcomes] == ["FAILED", "FAILED"]
    assert all("PretrainingFailed" in o.error and "not in its source" in o.error
               for o in result.outcomes)
    assert len(pretrain_runs(result.experiment_id)) == 1  # tried once for both cells
