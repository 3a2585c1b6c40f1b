"""lora[rank,alpha,depth]: low-rank adapters (Hu et al., ICLR 2022) on the top blocks'
convolutions and linear layers, in both frameworks (PyTorch here; Keras in one subprocess,
tests/test_keras_backend.py's reason: tensorflow and torch in one process can crash it).
By parameter: the trainable set is exactly the adapters of the top k blocks and the head;
the adapted model starts equal to the original; after training the original weights and
every BatchNorm statistic are bit-identical while adapters and head moved; the merged model
computes what the unmerged one did; the trainable fraction counts the adapters; the adapters'
init follows the cell's seed. Tiny models, weights='none', 32 px."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

from bench.config.spec import RunSpec
from bench.data import check_card, shipped_cards
from helpers import RecordingContext, keras_script_results
from strategies import registry
from strategies.lora import ADAPTER_NAMES
from strategies.torch_backend import lora, run_cell
from strategies.torch_backend.backbones import build
from strategies.torch_backend.train import Trainer, apply_phase, set_train_mode

SIZE, NUM_CLASSES, DEPTH = 32, 3, 2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _phase(params: dict | None = None) -> registry.Phase:
    (phase, _), = registry.get("lora").phases({"depth": DEPTH, **(params or {})}, 1)
    return phase


def test_registry_declares_lora():
    phase = _phase()
    assert (phase.trainable_blocks, phase.only, phase.lora, phase.bn) == (
        DEPTH, "lora", (4, 8.0), "frozen")
    assert _phase({"rank": 8, "alpha": 16}).lora == (8, 16.0)
    with pytest.raises(ValueError, match="go together"):
        registry.Phase(1, only="lora")


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_small"])
def test_torch_lora_trains_only_adapters_and_head(backbone):
    torch.manual_seed(0)
    tb = build(backbone, "none", NUM_CLASSES)
    top = list(tb.block_map.blocks)[-DEPTH:]
    # the layers LoRA adapts: plain convolutions (groups 1) and linear layers of the top blocks
    targets = {f"{p}.{n}" if n else p for b in top for p in tb.block_map.blocks[b]
               for n, m in tb.model.get_submodule(p).named_modules()
               if (type(m) is nn.Conv2d and m.groups == 1) or type(m) is nn.Linear}
    grouped = [m for b in top for m in tb.block_modules(b) for m in m.modules()
               if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert targets and (grouped or backbone == "resnet18")
    total0 = sum(p.numel() for p in tb.model.parameters())
    x = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0])
    with torch.no_grad():  # BatchNorm statistics of these images: a random-init model's
        tb.model.train()  # eval-mode output does not depend on its input otherwise
        for _ in range(20):
            tb.model(x)
    tb.model.eval()
    with torch.no_grad():
        original = tb.model(x)
    state0 = {k: v.clone() for k, v in tb.model.state_dict().items()}

    phase = _phase()
    params = apply_phase(tb, phase, seed=3)
    owners = tb.param_owner()
    names = {id(p): n for n, p in tb.model.named_parameters()}
    adapters = {f"{t}.{a}" for t in targets for a in ADAPTER_NAMES}
    assert {names[id(p)] for p in params} == adapters | {n for n, o in owners.items()
                                                          if o == "head"}
    assert {owners[n] for n in adapters} == set(top)
    assert "grouped/depthwise" in tb.notes["lora"]
    # B = 0: the adapted model starts as the original, bit for bit
    tb.model.eval()
    with torch.no_grad():
        assert torch.equal(tb.model(x), original)
    # the trainable fraction counts the adapters, in the trainable and the total counts
    n_adapters = sum(p.numel() for n, p in tb.model.named_parameters() if n in adapters)
    head = sum(p.numel() for p in tb.head.parameters())
    assert sum(p.numel() for p in params) == n_adapters + head
    assert sum(p.numel() for p in tb.model.parameters()) == total0 + n_adapters

    trainer = Trainer(tb, torch.device("cpu"))
    opt = torch.optim.Adam(params, lr=1e-2)
    before = {n: p.detach().clone() for n, p in tb.model.named_parameters()}
    for _ in range(3):
        set_train_mode(tb, phase)
        trainer.step(opt, x, y)
    now = tb.model.state_dict()
    # the backbone's weights and every BatchNorm statistic (adapted blocks too): unchanged
    for k, v in state0.items():
        if owners.get(k) != "head":
            assert torch.equal(v, now[k]), k
    for n in adapters | {n for n, o in owners.items() if o == "head"}:
        if not n.endswith("lora_A"):  # A may sit where its gradient is 0 (B = 0 at step 1)
            assert not torch.equal(before[n], now[n]), n
    assert any(not torch.equal(before[n], now[n]) for n in adapters if n.endswith("lora_A"))
    # merged == unmerged, and the adapters do change the function
    tb.model.eval()
    with torch.no_grad():
        unmerged = tb.model(x)
        tb.head.load_state_dict({k[len(tb.block_map.classifier) + 1:]: v for k, v in
                                 state0.items() if owners.get(k) == "head"})
        no_head_change = tb.model(x)
        assert lora.merge(tb.model) == len(targets)
        merged = tb.model(x)
        torch.testing.assert_close(merged, no_head_change, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(no_head_change, original, rtol=1e-4, atol=1e-5)
    assert unmerged.shape == merged.shape
    for n in targets:  # merging moved the weights it folded into
        assert not torch.equal(state0[f"{n}.weight"], tb.model.state_dict()[f"{n}.weight"])


def test_torch_lora_init_follows_the_seed():
    def a_matrices(seed):
        torch.manual_seed(seed + 100)  # torch's global RNG plays no part
        tb = build("mobilenet_v3_small", "none", NUM_CLASSES)
        apply_phase(tb, _phase(), seed=seed)
        return [m.lora_A.detach().clone() for m in lora.adapters(tb.model)]

    a, b, c = a_matrices(1), a_matrices(1), a_matrices(2)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert not any(torch.equal(p, q) for p, q in zip(a, c, strict=True))
    fan_in = a[0].shape[1]  # kaiming-uniform, a = sqrt(5): uniform in +-1/sqrt(fan_in)
    assert a[0].abs().max() <= fan_in ** -0.5


def test_torch_cell_logs_adapters_and_merge(tmp_path, monkeypatch):
    monkeypatch.setenv("TLBENCH_CACHE", str(tmp_path / "cache"))
    card = check_card(shipped_cards()["digits"], "digits")
    params = registry.get("lora").with_defaults({"depth": DEPTH})
    spec = RunSpec(framework="torch", backbone="resnet18", dataset="digits", strategy="lora",
                   strategy_params=tuple(params.items()), weights="none", subset=40,
                   image_size=16, batch_size=16, epochs=1)
    ctx = RecordingContext()
    run_cell(spec, card, ctx)
    final = ctx.finals[-1]
    tags = ctx.tags
    assert tags["lora"].startswith("rank=4, alpha=8 (scale 2): 10 layers adapted (10 conv) "
                                   "in stage3+stage4, 113664 adapter parameters")
    assert tags["lora_merge"].startswith("10 adapters merged")
    assert float(tags["lora_merge"].rsplit("= ", 1)[1]) < 1e-4
    assert final["trainable_params"] == 113664 + 512 * 10 + 10
    assert final["total_params"] == 11176512 + 113664 + 512 * 10 + 10
    assert tags["feature_cache_used"] == "prefix:3 blocks"  # the frozen bottom, cached


# ---- Keras, in a subprocess ------------------------------------------------------------------
KERAS_CHECKS = textwrap.dedent('''
    import json
    import numpy as np
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import keras
    from strategies import registry
    from strategies.keras_backend import lora
    from strategies.keras_backend.backbones import build
    from strategies.keras_backend.train import Trainer

    DEPTH = 2
    (phase, _), = registry.get("lora").phases({"depth": DEPTH}, 1)
    x = np.random.default_rng(1).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    y = np.arange(8) % 3
    out = {}
    for backbone in ("mobilenet_v2", "mobilenet_v3_small"):
        keras.utils.set_random_seed(0)
        kb = build(backbone, "none", 3, image_size=32)
        top = kb.blocks[-DEPTH:]
        targets = {la.name for b in top for la in kb.block_layers(b)
                   if (isinstance(la, keras.layers.Conv2D) and la.groups == 1)
                   or isinstance(la, keras.layers.Dense)}
        depthwise = [la for b in top for la in kb.block_layers(b)
                     if isinstance(la, keras.layers.DepthwiseConv2D)]
        assert targets and depthwise, backbone
        total0 = sum(int(np.prod(v.shape)) for v in kb.model.weights if v.path in kb.parameters)
        for _ in range(20):  # BatchNorm statistics of these images (see the PyTorch test)
            kb.model(x, training=True)
        original = kb.model(x, training=False).numpy()
        state0 = {v.path: v.numpy().copy() for v in kb.model.weights}
        trainer = Trainer(kb, jit_compile=False, seed=3)
        params = trainer.compile_phase(phase, "adam", 1e-2)
        owner = kb.weight_owner()
        adapters = {f"{t}/{a}" for t in targets for a in lora.ADAPTER_NAMES}
        head = {p for p, o in owner.items() if o == "head"}
        assert {v.path for v in params} == adapters | head, backbone
        assert {owner[p] for p in adapters} == set(top)
        assert np.array_equal(kb.model(x, training=False).numpy(), original)
        n_adapters = sum(int(np.prod(v.shape)) for v in kb.model.weights if v.path in adapters)
        n_head = sum(int(np.prod(v.shape)) for v in kb.model.weights if v.path in head)
        assert sum(int(np.prod(v.shape)) for v in params) == n_adapters + n_head
        assert sum(int(np.prod(v.shape)) for v in kb.model.weights
                   if v.path in kb.parameters) == total0 + n_adapters
        before = {v.path: v.numpy().copy() for v in kb.model.weights}
        kb.model.run_eagerly = True  # no trace: seconds, not a minute, on a CPU
        kb.model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
        now = {v.path: v.numpy() for v in kb.model.weights}
        for p, v in state0.items():  # kernels, biases, BatchNorm statistics: unchanged
            if p not in head:
                assert np.array_equal(v, now[p]), p
        for p in adapters | head:
            if not p.endswith("lora_kernel_a"):
                assert not np.array_equal(before[p], now[p]), p
        assert any(not np.array_equal(before[p], now[p]) for p in adapters
                   if p.endswith("lora_kernel_a"))
        for p in head:  # the head back to its start: what remains is the adapters' doing
            kb.model.get_layer("head").weights[["kernel", "bias"].index(p.split("/")[-1])
                                                ].assign(state0[p])
        unmerged = kb.model(x, training=False).numpy()
        assert not np.allclose(unmerged, original, rtol=1e-4, atol=1e-5)
        assert lora.merge(kb.model) == len(targets)
        assert not lora.adapted_layers(kb.model)
        merged = kb.model(x, training=False).numpy()
        np.testing.assert_allclose(merged, unmerged, rtol=1e-4, atol=1e-5)
        out[backbone] = "ok"

    def a_matrices(seed):
        keras.utils.set_random_seed(seed + 100)  # Keras' global seed plays no part
        kb = build("mobilenet_v3_small", "none", 3, image_size=32)
        Trainer(kb, jit_compile=False, seed=seed).compile_phase(phase, "adam", 1e-3)
        return [la.lora_kernel_a.numpy() for la in lora.adapted_layers(kb.model)]

    a, b, c = a_matrices(1), a_matrices(1), a_matrices(2)
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert not any(np.array_equal(p, q) for p, q in zip(a, c, strict=True))
    out["seed"] = "ok"

    # a cell: the driver's tags, the adapters merged for the inference rate
    import os, tempfile
    os.environ["TLBENCH_CACHE"] = tempfile.mkdtemp()
    import sys
    sys.path.insert(0, "tests")
    from helpers import RecordingContext
    from bench.data import check_card, shipped_cards
    from bench.config.spec import RunSpec
    from strategies.keras_backend import run_cell
    params = registry.get("lora").with_defaults({"depth": DEPTH})
    spec = RunSpec(framework="keras", backbone="mobilenet_v3_small", dataset="digits",
                   strategy="lora", strategy_params=tuple(params.items()), weights="none",
                   subset=40, image_size=32, batch_size=16, epochs=1)
    ctx = RecordingContext()
    run_cell(spec, check_card(shipped_cards()["digits"], "digits"), ctx)
    out["cell"] = {**{k: ctx.tags[k] for k in ("lora", "lora_merge", "feature_cache_used")},
                   **{k: ctx.finals[-1][k] for k in ("trainable_params", "total_params")}}
    print("RESULT " + json.dumps(out))
''')


@pytest.fixture(scope="module")
def keras_results() -> dict:
    return keras_script_results(KERAS_CHECKS)


@pytest.mark.parametrize("check", ["mobilenet_v2", "mobilenet_v3_small", "seed"])
def test_keras(keras_results, check):
    assert keras_results.get(check) == "ok", keras_results["stderr"]


def test_keras_cell_logs_the_same_adapters_as_pytorch(keras_results):
    """mobilenet_v3_small's top two blocks: the same layers adapted in both frameworks, the
    same adapter parameter count; Keras' merge is exact (it computes with the merged kernel's
    very sum every step)."""
    cell = keras_results.get("cell")
    assert cell, keras_results["stderr"]
    tb = build("mobilenet_v3_small", "none", 10)
    apply_phase(tb, _phase(), seed=0)
    assert cell["lora"] == tb.notes["lora"]
    assert cell["lora"].startswith("rank=4, alpha=8 (scale 2): 13 layers adapted (13 conv) in "
                                   "stage4+top_conv, 30720 adapter parameters; 3 grouped")
    assert cell["lora_merge"].startswith("13 adapters merged")
    assert float(cell["lora_merge"].rsplit("= ", 1)[1]) < 1e-4
    assert cell["trainable_params"] == 30720 + 576 * 10 + 10
    assert cell["feature_cache_used"] == "prefix:4 blocks"


def test_lite0_same_padding_convolutions_take_adapters_as_in_keras():
    """EfficientNet-Lite0's convolutions are SameConv2d (TF "SAME" padding), a subclass of
    nn.Conv2d: adapted through its own padding rule, the same 11 layers (56,512 adapter
    parameters) as Keras adapts in the top 3 blocks; merged == unmerged."""
    import torch

    from strategies.torch_backend import lora as tlora
    from strategies.torch_backend.backbones import build

    tb = build("efficientnet_lite0", "imagenet", 10)  # shipped in a wheel: offline
    tb.model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = tb.model(x)
    tag = tlora.install(tb, ["stage6", "stage7", "top_conv"], 4, 8, 0)
    assert "11 layers adapted (11 conv)" in tag and "56512 adapter parameters" in tag
    with torch.no_grad():
        assert torch.equal(tb.model(x), before)
        for m in tlora.adapters(tb.model):
            m.lora_B.normal_(std=0.1)
        adapted = tb.model(x)
    assert not torch.allclose(adapted, before)
    assert tlora.merge(tb.model) == 11
    with torch.no_grad():
        torch.testing.assert_close(tb.model(x), adapted, rtol=1e-5, atol=1e-5)
