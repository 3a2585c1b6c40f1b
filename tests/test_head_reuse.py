"""head_init = "source" (the cell's head starts as its pretraining's trained head) and
blocks[head=frozen] (the head kept as loaded): the label-shift half of the surgical
fine-tuning grid (Lee et al. 2023; bench/grids/surgical.toml), in both frameworks.

Each framework runs one script (Keras in its own interpreter, tests/helpers.py): a source
checkpoint written by save_backbone from a model whose every tensor was moved off any fresh
init, then cells through bench.cell.loop.run_cell on a session that records the model's state
when the first phase begins (what training starts from) and at param_counts (after the test
evaluation, before the model-only rates move the weights)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench.config.grid import GridError, from_dict
from bench.data import sources
from bench.paths import ROOT
from helpers import keras_script_results
from strategies import registry

CELL_CHECKS = r'''
import json, os, sys, tempfile
sys.path.insert(0, "tests")
os.environ["TLBENCH_CACHE"] = tempfile.mkdtemp()
import numpy as np
from pathlib import Path
from helpers import RecordingContext
from bench.cell import loop
from bench import checkpoints
from bench.config import pretrained
from bench.data import check_card, shipped_cards
from bench.config.spec import RunSpec
from strategies import registry

FW = "%(framework)s"
CARD = check_card(shipped_cards()["digits"], "digits")
WEIGHTS = "pretrained:digits[epochs=1]"
if FW == "torch":
    import torch
    torch.set_num_threads(1)
    from strategies.torch_backend import TorchSession as Session
    from strategies.torch_backend.backbones import _under, build, save_backbone

    def state(s):  # name -> (block or 'head', array): parameters and BatchNorm statistics
        tb = s.tb
        owner = lambda k: next((b for b, ps in tb.block_map.blocks.items() if _under(k, ps)),
                               "head" if _under(k, [tb.block_map.classifier]) else "?")
        return {k: (owner(k), v.detach().cpu().numpy().copy())
                for k, v in tb.model.state_dict().items()}

    def source_checkpoint(path):
        torch.manual_seed(1)
        tb = build("mobilenet_v2", "none", 10, "linear")
        with torch.no_grad():
            for t in tb.model.state_dict().values():
                t.add_(1) if t.is_floating_point() else None
        save_backbone(tb, path)
        return {k: v.numpy().copy() for k, v in tb.head.state_dict().items()}
else:
    import keras
    from strategies.keras_backend import KerasSession as Session
    from strategies.keras_backend.backbones import build, save_backbone

    def state(s):
        owner = s.kb.weight_owner()
        return {v.path: (owner[v.path], v.numpy().copy()) for v in s.kb.model.weights}

    def source_checkpoint(path):
        kb = build("mobilenet_v2", "none", 10, "linear", 32)
        for v in kb.model.weights:
            v.assign(v.numpy() + 1.0)
        save_backbone(kb, path)
        return {v.path: v.numpy().copy() for la in kb.head_layers for v in la.weights}


class Stop(Exception):
    pass


class Recording(Session):
    stop_early = False

    def begin_phase(self, *a, **k):
        self.start_state = state(self)
        if self.stop_early:
            raise Stop()
        return super().begin_phase(*a, **k)

    def param_counts(self):
        self.end_state = state(self)
        return super().param_counts()


def cell(strategy, head_init, stop_early=False):
    sname, params = strategy
    params = registry.get(sname).with_defaults(params)
    spec = RunSpec(framework=FW, backbone="mobilenet_v2", dataset="digits", strategy=sname,
                   strategy_params=tuple(params.items()), weights=WEIGHTS, head_init=head_init,
                   subset=40, image_size=32, batch_size=16, epochs=1)
    ctx = RecordingContext()
    ctx.weights_file, ctx.weights_sha256 = CKPT, checkpoints.sha256_file(Path(CKPT))
    s = Recording()
    s.stop_early = stop_early
    try:
        loop.run_cell(s, spec, CARD, ctx)
    except Stop:
        pass
    ctx.final = {k: v for f in ctx.finals for k, v in f.items()}
    return s, ctx


def heads(st):
    return {k: v for k, (b, v) in st.items() if b == "head"}


def pairs(head):  # kernel and bias against the source's (named differently in PyTorch)
    mine = sorted(head.values(), key=np.shape)
    theirs = sorted(source_head.values(), key=np.shape)
    assert [a.shape for a in mine] == [b.shape for b in theirs], (mine, theirs)
    return list(zip(mine, theirs))


def same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


CKPT = os.path.join(tempfile.mkdtemp(), "source.ckpt")
source_head = source_checkpoint(CKPT)
out = {}
s, _ = cell(("feature_extraction", {}), "new", stop_early=True)
out["new_head_differs"] = not any(np.array_equal(a, b)
                                 for a, b in pairs(heads(s.start_state)))
for names in ("stem", "top_conv"):
    s, ctx = cell(("blocks", {"names": names, "head": "frozen"}), "source")
    start, end = s.start_state, s.end_state
    r = {"loaded_head_is_source": all(np.array_equal(a, b) for a, b in pairs(heads(start))),
         "head_unchanged": same(heads(start), heads(end)),
         "others_unchanged": [k for k, (b, v) in start.items()
                              if b not in (names, "head") and not np.array_equal(v, end[k][1])],
         "tuned_changed": any(not np.array_equal(v, end[k][1]) for k, (b, v) in start.items()
                              if b == names),
         "trainable_params": ctx.final["trainable_params"],
         "cache": ctx.tags["feature_cache_used"],
         "source_test": [ctx.final.get("source_test_acc"), ctx.final.get("source_test_loss")]}
    if FW == "torch":
        r["expected_trainable"] = sum(p.numel() for n, p in s.tb.model.named_parameters()
                                      if s.tb.param_owner()[n] == names)
    else:
        owner = s.kb.weight_owner()
        r["expected_trainable"] = sum(int(np.prod(v.shape)) for v in s.kb.model.weights
                                      if v.path in s.kb.parameters and owner[v.path] == names)
    out[names] = r
print("RESULT " + json.dumps(out))
'''


def _results(framework: str) -> dict:
    script = CELL_CHECKS % {"framework": framework}
    if framework == "keras":
        return keras_script_results(script)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    return {"rc": proc.returncode, "stderr": proc.stderr[-4000:],
            **(json.loads(lines[-1][7:]) if lines else {})}


@pytest.fixture(scope="module", params=["torch", "keras"])
def results(request) -> dict:
    return _results(request.param)


@pytest.mark.timeout(300)
def test_source_head_is_loaded_and_a_new_head_is_not(results):
    assert results.get("new_head_differs") is True, results["stderr"]
    for names in ("stem", "top_conv"):
        assert results[names]["loaded_head_is_source"], results[names]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("names, cache", [("stem", "off: the bottom block (stem) trains"),
                                          ("top_conv", "prefix:8 blocks")])
def test_a_frozen_head_keeps_the_source_head_bit_for_bit(results, names, cache):
    r = results.get(names)
    assert r, results["stderr"]
    assert r["head_unchanged"] and r["tuned_changed"], r
    assert r["others_unchanged"] == [], r
    assert r["trainable_params"] == r["expected_trainable"] > 0
    assert r["cache"] == cache


@pytest.mark.timeout(300)
def test_the_source_model_is_scored_on_the_target_before_any_step(results):
    """source_test_acc: the source model, head included, on the cell's test split before
    training (no adaptation). The stem arm scores it on images, the top_conv arm on its
    cached prefix features: the same model on the same images, so the same score."""
    stem, top = results["stem"]["source_test"], results["top_conv"]["source_test"]
    assert 0 <= stem[0] <= 1 and stem[1] > 0, stem
    assert top[0] == stem[0] and top[1] == pytest.approx(stem[1], rel=1e-4)


# ---- refusals, before any work -------------------------------------------------------------
GRID = {"axes": {"framework": ["torch"], "backbone": ["mobilenet_v2"], "dataset": ["digits"],
                 "weights": ["pretrained:digits[epochs=1]"],
                 "strategy": ["blocks[names=stem,head=frozen]"]},
        "defaults": {"head_init": "source", "image_size": 32}}


def _grid(**changes) -> dict:
    doc = json.loads(json.dumps(GRID))
    for k, v in changes.items():
        (doc["axes"] if k in doc["axes"] else doc["defaults"])[k] = v
    return doc


@pytest.mark.timeout(60)
def test_a_valid_head_reuse_grid_loads_and_the_defaults_keep_their_hashes():
    (s,) = from_dict(_grid()).specs
    assert (s.head_init, s.params["head"]) == ("source", "frozen")
    assert s.strategy_label == "blocks[names=stem,head=frozen]"
    # the defaults leave every existing cell's identity as it was
    (plain,) = from_dict(_grid(head_init="new", strategy=["blocks[names=stem]"])).specs
    assert "head_init" not in plain.canonical()
    assert "strategy_params" in plain.canonical() and "head" not in plain.canonical()[
        "strategy_params"]
    # the pretraining is the one a head_init="new" cell names (one checkpoint for both)
    from bench.config import pretrained
    assert pretrained.pretrain_spec(s).hash == pretrained.pretrain_spec(plain).hash


@pytest.mark.timeout(60)
@pytest.mark.parametrize("changes, expected", [
    ({"head_init": "new"}, "with head_init = 'new': a frozen new head is a fixed random "
                           "projection"),
    ({"weights": ["none"]}, "head_init = 'source' with weights = 'none': only weights the "
                            "harness pretrained have a source head"),
    ({"weights": ["imagenet"], "strategy": ["full"]}, "head_init = 'source' with weights = "
                                                      "'imagenet'"),
    ({"head": "mlp"}, "head_init = 'source' with head = 'mlp': the pretraining trains a "
                      "linear head"),
    ({"dataset": ["cifar100"]}, "the source 'digits' has 10 classes, dataset 'cifar100' has "
                                "100"),
    ({"head_init": "bogus"}, "head_init = 'bogus': allowed: new, source"),
    ({"strategy": ["blocks[names=stem,head=off]"]}, "head = 'off': allowed: train, frozen"),
])
def test_refusals_name_the_field(changes, expected):
    with pytest.raises(GridError) as e:
        from_dict(_grid(**changes))
    assert expected in str(e.value)


@pytest.mark.timeout(60)
def test_a_class_count_that_cannot_be_known_is_said(tmp_path):
    doc = _grid(dataset=["pets"])
    doc["datasets"] = {"pets": {"source": "image_folder", "root": str(tmp_path / "absent")}}
    with pytest.raises(GridError) as e:
        from_dict(doc, check_data=False)
    assert "the class count of dataset 'pets' cannot be known here" in str(e.value)
    # a class subset on the target: 2 classes against the source's 10
    doc = _grid(dataset=["two"])
    doc["datasets"] = {"two": {"source": "sklearn_digits", "classes": [3, 7]}}
    with pytest.raises(GridError, match="'digits' has 10 classes, dataset 'two' has 2"):
        from_dict(doc)


def test_every_source_kind_declares_its_class_count():
    assert set(sources.CLASS_COUNTS) == set(sources.SOURCES) - {"image_folder"}


def test_a_phase_that_would_train_nothing_is_refused():
    with pytest.raises(ValueError, match="trains nothing"):
        registry.Phase(0, train_head=False)
    (phase, _), = registry.get("blocks").phases({"names": "stem", "head": "frozen"}, 1)
    assert (phase.blocks, phase.train_head) == (("stem",), False)
