"""Strategies that train a set, not the top k: `blocks[names=...]` (surgical fine-tuning),
`bitfit` (biases only) and `norm` (norm layers' gamma/beta only), in both frameworks.

For each, by parameter: the trainable set is exactly what the strategy says (decided here from
names and layer types, not by the backends' own selection code), a few training steps change
the head and the trained backbone parameters and leave every frozen one bit-identical, and
BatchNorm statistics move only where the strategy lets them. PyTorch runs here; Keras in a
subprocess started at the module's first test (tensorflow and torch in one process crash, see
tests/test_keras_backend.py), left running on the other core. Tiny models: 32 px, weights
'none', 3 classes, CPU.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap

import pytest

from bench.cell.loop import cache_plan
from bench.config.grid import GridError, from_dict
from bench.config.selector import parse_selector
from bench.paths import ROOT
from strategies import registry

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from strategies.torch_backend.backbones import build  # noqa: E402
from strategies.torch_backend.train import (  # noqa: E402
    Trainer,
    apply_phase,
    set_train_mode,
)

NUM_CLASSES = 3
# strategy selector -> (strategy, params); names are two non-adjacent blocks, so frozen blocks
# sit below, between and above the trained ones
CASES = {
    "blocks": ("blocks", {"names": "stem+stage2", "bn": "train"}),
    "bitfit": ("bitfit", {}),
    "norm": ("norm", {}),
}
TORCH_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


# ---- the selector and the grid ----------------------------------------------------------------
def _grid(strategy: str, backbone: str = "resnet18", framework: str = "torch"):
    return from_dict({"axes": {"framework": [framework], "backbone": [backbone],
                               "dataset": ["digits"], "strategy": [strategy]}}, "x.toml")


def test_a_set_is_plus_joined_and_a_comma_sweeps_sets():
    assert parse_selector("blocks[names=stem+stage1]") == ("blocks", {"names": ["stem+stage1"]})
    (one,) = _grid("blocks[names=stage1+stem]").specs  # stored in backbone order: one cell
    assert one.params == {"names": "stem+stage1", "bn": "train", "head": "train"}
    two = _grid("blocks[names=stem,stage4+stage1]").specs
    assert [s.params["names"] for s in two] == ["stem", "stage1+stage4"]
    phase, = (p for p, _ in registry.get("blocks").phases(one.params, 1))
    assert phase.blocks == ("stem", "stage1") and phase.only == "all"
    assert registry.phase_blocks(phase, ["stem", "stage1", "stage2"], "x") == ["stem", "stage1"]


@pytest.mark.parametrize("names, problem", [
    ("stem+stage9", "unknown block(s) 'stage9'"),
    ("stem+stem", "a block named twice"),
])
def test_unknown_block_names_are_refused_naming_the_backbones_blocks(names, problem):
    with pytest.raises(GridError) as e:
        _grid(f"blocks[names={names}]", "mobilenet_v3_small")
    msg = str(e.value)
    assert problem in msg
    assert "stem, stage1, stage2, stage3, stage4, top_conv" in msg and "names=stem+stage1" in msg
    with pytest.raises(GridError, match="needs names"):
        _grid("blocks")


def test_norm_is_refused_on_a_backbone_without_norm_layers():
    for fw in ("torch", "keras"):
        with pytest.raises(GridError, match="vgg16 has no normalisation layers"):
            _grid("norm", "vgg16", fw)
    assert [s.strategy for s in _grid("bitfit", "vgg16").specs] == ["bitfit"]
    assert _grid("norm").specs[0].params == {"bn": "frozen"}


def test_the_feature_cache_skips_the_frozen_blocks_below_the_set():
    def plan(selector):
        (spec,) = _grid(selector).specs
        (phase, _), = registry.get(spec.strategy).phases(spec.params, spec.epochs)
        return cache_plan(spec, phase, 5)

    assert plan("blocks[names=stage2+stage4]") == ("prefix", 2)
    assert plan("blocks[names=stem+stage4]") == "the bottom block (stem) trains"
    assert plan("bitfit") == plan("norm") == "every block trains"


# ---- PyTorch ----------------------------------------------------------------------------------
def torch_expected(tb, strategy: str, params: dict) -> set[str]:
    """The parameter names the strategy trains, from names and module types alone."""
    owners = tb.param_owner()
    names = set(registry.split_blocks(params["names"])) if strategy == "blocks" else None
    out = set()
    for n, _ in tb.model.named_parameters():
        owner, module = owners[n], tb.model.get_submodule(n.rsplit(".", 1)[0])
        if owner == "head" or (names is not None and owner in names):
            out.add(n)
        elif strategy == "bitfit" and n.endswith(".bias"):
            out.add(n)
        elif strategy == "norm" and isinstance(module, TORCH_NORMS):
            out.add(n)
    return out


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_small"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_torch_trains_exactly_the_set(case, backbone):
    torch.manual_seed(0)
    strategy, params = CASES[case]
    (phase, _), = registry.get(strategy).phases(params, 1)
    tb = build(backbone, "none", NUM_CLASSES)
    trainable = apply_phase(tb, phase)
    by_id = {id(p): n for n, p in tb.model.named_parameters()}
    expected = torch_expected(tb, strategy, params)
    assert {by_id[id(p)] for p in trainable} == expected
    assert {n for n, p in tb.model.named_parameters() if p.requires_grad} == expected
    backbone_set = {n for n in expected if tb.param_owner()[n] != "head"}
    assert backbone_set and len(backbone_set) < len(tb.param_owner())

    before = {k: v.clone() for k, v in tb.model.state_dict().items()}
    trainer = Trainer(tb, torch.device("cpu"))
    opt = torch.optim.Adam(trainable, lr=1e-2)
    set_train_mode(tb, phase)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.rand(4, 3, 32, 32, generator=gen)
        trainer.step(opt, x, torch.arange(4) % NUM_CLASSES)
    after = tb.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    params_changed = changed & set(by_id.values())
    assert params_changed <= expected  # every frozen parameter bit-identical
    assert {n for n in params_changed if n.startswith(tb.block_map.classifier)}
    assert params_changed & backbone_set
    # BatchNorm statistics: frozen for bitfit/norm (bn=frozen), moving only inside the named
    # blocks for blocks[bn=train]
    stats = {k for k in changed if k.endswith(("running_mean", "running_var",
                                               "num_batches_tracked"))}
    if strategy == "blocks":
        names = registry.split_blocks(params["names"])
        prefixes = [p + "." for b in names for p in tb.block_map.blocks[b]]
        assert stats and all(k.startswith(tuple(prefixes)) for k in stats)
    else:
        assert not stats


# ---- Keras, in a subprocess -------------------------------------------------------------------
KERAS_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import keras
    from strategies import registry
    from strategies.keras_backend.backbones import build
    from strategies.keras_backend.train import Trainer, _sublayers

    NORMS = (keras.layers.BatchNormalization, keras.layers.LayerNormalization)
    STATS = ("moving_mean", "moving_variance")
    cases, backbone = json.loads(sys.argv[1]), sys.argv[2]
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    y = np.arange(8) % 3
    out = {}
    for case, (strategy, params) in sorted(cases.items()):
        keras.utils.set_random_seed(0)
        (phase, _), = registry.get(strategy).phases(params, 1)
        kb = build(backbone, "none", 3, image_size=32)
        names = (set(registry.split_blocks(params["names"])) if strategy == "blocks"
                 else None)
        expected, stats, where = set(), set(), {}
        for layer in kb.model.layers:
            owner = kb.owner[layer.name]
            for leaf in _sublayers(layer):
                if hasattr(leaf, "layers"):
                    continue
                for v in leaf.weights:
                    where[v.path] = owner
                    if v.name in STATS:
                        stats.add(v.path)
                    elif (owner == "head" or (names is not None and owner in names)
                          or (strategy == "bitfit" and v.name in ("bias", "beta"))
                          or (strategy == "norm" and isinstance(leaf, NORMS))):
                        expected.add(v.path)
        trainer = Trainer(kb)
        got = {v.path for v in trainer.compile_phase(phase, "adam", 1e-2)}
        before = {v.path: np.array(v.numpy(), copy=True) for v in kb.model.weights}
        kb.model.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
        changed = {v.path for v in kb.model.weights
                   if not np.array_equal(before[v.path], v.numpy())}
        out[case] = {"got": sorted(got), "expected": sorted(expected),
                     "changed": sorted(changed), "stats": sorted(stats), "where": where}
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def keras_results():
    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("tensorflow is not installed")
    proc = subprocess.Popen(
        [sys.executable, "-c", KERAS_SCRIPT, json.dumps(CASES), "mobilenet_v3_small"],
        cwd=ROOT, env={**__import__("os").environ, "PYTHONPATH": str(ROOT),
                       "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield proc
    if proc.poll() is None:
        proc.kill()


def _keras(proc) -> dict:
    if not hasattr(proc, "result"):
        stdout, stderr = proc.communicate(timeout=600)
        lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
        assert proc.returncode == 0 and lines, stderr[-3000:]
        proc.result = json.loads(lines[-1][len("RESULT "):])
    return proc.result


@pytest.mark.parametrize("case", sorted(CASES))
def test_keras_trains_exactly_the_set(case, keras_results):
    r = _keras(keras_results)[case]
    got, expected, changed, stats = (set(r[k]) for k in ("got", "expected", "changed",
                                                          "stats"))
    where = r["where"]
    assert got == expected
    backbone_set = {p for p in expected if where[p] != "head"}
    assert backbone_set and len(backbone_set) < len(set(where) - stats)
    assert changed - stats <= expected  # every frozen variable bit-identical
    assert {p for p in changed if where[p] == "head"} and changed & backbone_set
    moved = changed & stats
    strategy, params = CASES[case]
    if strategy == "blocks":
        assert moved and {where[p] for p in moved} <= set(registry.split_blocks(params["names"]))
    else:
        assert not moved
