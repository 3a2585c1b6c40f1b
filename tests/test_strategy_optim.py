"""llrd, l2sp and gradual: what each optimizer hook and schedule does, by parameter, in both
frameworks (PyTorch here; Keras in one subprocess, tests/test_keras_backend.py's reason:
tensorflow and torch in one process can crash it). Tiny models, weights='none', 32 px."""

from __future__ import annotations

import textwrap

import pytest
import torch

from bench.config.spec import RunSpec
from bench.data import check_card, shipped_cards
from helpers import RecordingContext, keras_script_results
from strategies import registry
from strategies.torch_backend import run_cell
from strategies.torch_backend.backbones import build
from strategies.torch_backend.train import (
    Trainer,
    apply_phase,
    phase_optimizer,
    set_train_mode,
)

SIZE, NUM_CLASSES = 32, 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _phase(name: str, params: dict | None = None, epochs: int = 1) -> registry.Phase:
    (phase, _), = registry.get(name).phases(params or {}, epochs)
    return phase


def _batch(seed: int = 0, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, SIZE, SIZE, generator=g),
            torch.randint(0, NUM_CLASSES, (n,), generator=g))


def _by_block(tb) -> dict[str, list[torch.nn.Parameter]]:
    out: dict[str, list] = {}
    params = dict(tb.model.named_parameters())
    for name, block in tb.param_owner().items():
        out.setdefault(block, []).append(params[name])
    return out


# ---- registry -------------------------------------------------------------------------------
def test_block_lr_scales_and_tag():
    phase = _phase("llrd", {"decay": 0.5})
    assert registry.block_lr_scales(["stem", "stage1", "stage2"], phase) == {
        "stem": 0.125, "stage1": 0.25, "stage2": 0.5, "head": 1.0}
    assert registry.block_lrs_tag(["stem", "stage1"], phase, 1e-3) == (
        "stem=0.00025, stage1=0.0005, head=0.001")


def test_gradual_schedule():
    g = registry.get("gradual")
    assert g.min_epochs({}) == 2 and g.min_epochs({"every": 3}) == 4
    with pytest.raises(registry.BudgetError, match="epochs >= 2"):
        g.phases({}, 1)
    sched = [(p.name, p.trainable_blocks, n) for p, n in g.phases({"every": 2}, 9, n_blocks=3)]
    assert sched == [("head", 0, 2), ("top1", 1, 2), ("top2", 2, 2), ("all", registry.ALL, 3)]
    # the budget ends before every block trains
    assert [(p.name, n) for p, n in g.phases({}, 3, n_blocks=5)] == [
        ("head", 1), ("top1", 1), ("top2", 1)]


# ---- PyTorch: llrd --------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_small"])
def test_torch_llrd_one_param_group_per_block(backbone):
    torch.manual_seed(0)
    tb = build(backbone, "none", NUM_CLASSES)
    phase = _phase("llrd", {"decay": 0.7})
    params = apply_phase(tb, phase)
    lr = 0.1
    opt = phase_optimizer(tb, phase, params, "adam", lr, 0.0)
    scales = registry.block_lr_scales(list(tb.block_map.blocks), phase)
    blocks = _by_block(tb)
    assert len(opt.param_groups) == len(scales) == len(blocks)
    for group, (block, s) in zip(opt.param_groups, scales.items(), strict=True):
        assert group["lr"] == lr * s
        assert {id(p) for p in group["params"]} == {id(p) for p in blocks[block]}
    # one Adam step on a gradient of ones: every update is lr * scale (a gradient scale
    # would change nothing under Adam, so this checks the update's scale)
    before = {id(p): p.detach().clone() for p in params}
    for p in params:
        p.grad = torch.full_like(p, 0.5)
    opt.step()
    for block, s in scales.items():
        for p in blocks[block]:
            torch.testing.assert_close(before[id(p)] - p.detach(),
                                       torch.full_like(p, lr * s), rtol=1e-4, atol=1e-7)


def test_torch_llrd_adamw_decays_at_the_blocks_lr():
    torch.manual_seed(0)
    tb = build("resnet18", "none", NUM_CLASSES)
    phase = _phase("llrd", {"decay": 0.5})
    params = apply_phase(tb, phase)
    opt = phase_optimizer(tb, phase, params, "adamw", 0.1, 0.2)
    stem = _by_block(tb)["stem"][0]
    w = stem.detach().clone()
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    torch.testing.assert_close(stem.detach(), w * (1 - 0.1 * 0.5 ** 5 * 0.2))


# ---- PyTorch: l2sp --------------------------------------------------------------------------
def test_torch_l2sp_pulls_toward_the_start_weights():
    torch.manual_seed(0)
    tb = build("resnet18", "none", NUM_CLASSES)
    phase = _phase("l2sp", {"alpha": 0.5, "beta": 0.25})
    params = apply_phase(tb, phase)
    opt = phase_optimizer(tb, phase, params, "sgd", 0.1, 0.0)  # w0 taken here
    w0 = {id(p): p.detach().clone() for p in params}
    head = {id(p) for p in tb.head.parameters()}
    with torch.no_grad():  # move away from w0; a zero data gradient
        for p in params:
            p.add_(torch.randn_like(p) * 0.1)
            p.grad = torch.zeros_like(p)
    moved = {id(p): p.detach().clone() for p in params}
    opt.step()  # SGD's first step is plain SGD (momentum buffer = gradient)
    for p in params:
        w = moved[id(p)]
        grad = 0.25 * w if id(p) in head else 0.5 * (w - w0[id(p)])
        torch.testing.assert_close(p.detach(), w - 0.1 * grad)


def _one_step(name: str, params: dict) -> list[torch.Tensor]:
    torch.manual_seed(0)
    tb = build("mobilenet_v3_small", "none", NUM_CLASSES)
    phase = _phase(name, params)
    opt = phase_optimizer(tb, phase, apply_phase(tb, phase), "adam", 1e-3, 1e-4)
    set_train_mode(tb, phase)
    trainer = Trainer(tb, torch.device("cpu"))
    for seed in range(2):
        trainer.step(opt, *_batch(seed))
    return [p.detach().clone() for p in tb.model.state_dict().values()]


def test_torch_l2sp_at_zero_is_full_bit_for_bit():
    a = _one_step("l2sp", {"alpha": 0.0, "beta": 0.0})
    b = _one_step("full", {})
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    c = _one_step("l2sp", {"alpha": 0.01, "beta": 0.01})
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


# ---- PyTorch: gradual -----------------------------------------------------------------------
def test_torch_gradual_unfreezes_one_block_per_epoch():
    torch.manual_seed(0)
    tb = build("resnet18", "none", NUM_CLASSES)
    blocks = list(tb.block_map.blocks)
    trainer = Trainer(tb, torch.device("cpu"))
    phases = registry.get("gradual").phases({}, 7, n_blocks=len(blocks))
    assert [(p.name, n) for p, n in phases] == [
        ("head", 1), ("top1", 1), ("top2", 1), ("top3", 1), ("top4", 1), ("all", 2)]
    owners = tb.param_owner()
    for k, (phase, _) in enumerate(phases):
        params = apply_phase(tb, phase)
        opt = phase_optimizer(tb, phase, params, "adam", 1e-2, 0.0)
        trainable = set(blocks[len(blocks) - k:]) if phase.trainable_blocks >= 0 else set(
            blocks)
        assert {owners[n] for n, p in tb.model.named_parameters() if p.requires_grad} == (
            trainable | {"head"})
        frozen = [b for b in blocks if b not in trainable]
        state = {b: {n: t.clone() for m in tb.block_modules(b)
                     for n, t in m.state_dict().items()} for b in frozen}  # BN stats too
        set_train_mode(tb, phase)
        trainer.step(opt, *_batch(k))
        for b in frozen:
            now = {n: t for m in tb.block_modules(b) for n, t in m.state_dict().items()}
            assert all(torch.equal(state[b][n], now[n]) for n in now), b


# ---- the driver records the schedule and the block lrs ---------------------------------------
def _cell(tmp_path, monkeypatch, strategy: str, params: dict, epochs: int) -> RecordingContext:
    monkeypatch.setenv("TLBENCH_CACHE", str(tmp_path / "cache"))
    card = check_card(shipped_cards()["digits"], "digits")
    params = registry.get(strategy).with_defaults(params)
    spec = RunSpec(framework="torch", backbone="resnet18", dataset="digits",
                   strategy=strategy, strategy_params=tuple(params.items()), weights="none",
                   subset=40, image_size=16, batch_size=16, epochs=epochs)
    ctx = RecordingContext()
    run_cell(spec, card, ctx)
    return ctx


def test_cells_log_the_schedule_and_block_lrs(tmp_path, monkeypatch):
    ctx = _cell(tmp_path, monkeypatch, "gradual", {}, 3)
    assert [row["trainable_blocks"] for _, row in ctx.epochs] == [0, 1, 2]
    assert ctx.tags["phases"] == "head=1, top1=1, top2=1"
    assert "block_lrs" not in ctx.tags
    ctx = _cell(tmp_path, monkeypatch, "llrd", {"decay": 0.5}, 1)
    assert ctx.tags["block_lrs"] == ("stem=3.125e-05, stage1=6.25e-05, stage2=0.000125, "
                                     "stage3=0.00025, stage4=0.0005, head=0.001")
    assert [row["trainable_blocks"] for _, row in ctx.epochs] == [5]


# ---- Keras, in a subprocess ------------------------------------------------------------------
KERAS_CHECKS = textwrap.dedent('''
    import json, sys
    import numpy as np
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import keras
    from strategies import registry
    from strategies.keras_backend.backbones import build
    from strategies.keras_backend.train import (
        Trainer, apply_phase, make_optimizer, phase_hooks)

    def phase(name, params, epochs=1):
        (ph, _), = registry.get(name).phases(params, epochs)
        return ph

    def close(a, b, rtol=1e-4, atol=1e-7):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)

    out = {}
    # llrd: each variable's Adam update is lr * its block's scale; AdamW decays at it too
    keras.utils.set_random_seed(0)
    for backbone in ("mobilenet_v2", "mobilenet_v3_small"):
        kb = build(backbone, "none", 3, image_size=32)
        owner = kb.weight_owner()
        ph = phase("llrd", {"decay": 0.7})
        params = apply_phase(kb, ph)
        scales = registry.block_lr_scales(kb.blocks, ph)
        opt = make_optimizer("adam", 0.1, 0.0, phase_hooks(kb, ph, params))
        before = [v.numpy().copy() for v in params]
        opt.build(params)  # then one traced step, as fit() runs it
        tf.function(lambda g: opt.apply(g, params))([tf.fill(v.shape, 0.5) for v in params])
        for v, b in zip(params, before):
            close(b - v.numpy(), np.full(v.shape, 0.1 * scales[owner[v.path]]))
        assert {owner[v.path] for v in params} == set(scales)
    ph = phase("llrd", {"decay": 0.5})
    params = apply_phase(kb, ph)
    opt = make_optimizer("adamw", 0.1, 0.2, phase_hooks(kb, ph, params))
    before = [v.numpy().copy() for v in params]
    opt.apply([tf.zeros(v.shape) for v in params], params)
    stem = [i for i, v in enumerate(params) if owner[v.path] == "stem"][0]
    close(params[stem].numpy(), before[stem] * (1 - 0.1 * 0.5 ** 6 * 0.2), rtol=1e-6)
    out["llrd"] = "ok"

    # l2sp: a zero data gradient moves w toward w0 by lr * alpha * (w - w0), the head by
    # lr * beta * w
    kb = build("mobilenet_v3_small", "none", 3, image_size=32)
    owner = kb.weight_owner()
    ph = phase("l2sp", {"alpha": 0.5, "beta": 0.25})
    params = apply_phase(kb, ph)
    opt = make_optimizer("sgd", 0.1, 0.0, phase_hooks(kb, ph, params))  # w0 taken here
    w0 = [v.numpy().copy() for v in params]
    rng = np.random.default_rng(0)
    for v in params:
        v.assign(v.numpy() + 0.1 * rng.standard_normal(v.shape).astype("float32"))
    moved = [v.numpy().copy() for v in params]
    opt.apply([tf.zeros(v.shape) for v in params], params)
    for v, w, a in zip(params, moved, w0):
        grad = 0.25 * w if owner[v.path] == "head" else 0.5 * (w - a)
        close(v.numpy(), w - 0.1 * grad, rtol=1e-5, atol=1e-6)

    x = np.random.default_rng(1).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    y = np.arange(8) % 3

    def trained(name, params):
        keras.utils.set_random_seed(0)
        kb = build("mobilenet_v3_small", "none", 3, image_size=32)
        Trainer(kb, jit_compile=False).compile_phase(phase(name, params), "adam", 1e-3, 1e-4)
        kb.model.run_eagerly = True  # no trace: seconds, not a minute, on a CPU
        kb.model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
        return [v.numpy() for v in kb.model.weights]

    a, b = trained("l2sp", {"alpha": 0.0, "beta": 0.0}), trained("full", {})
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    c = trained("l2sp", {"alpha": 0.01, "beta": 0.01})
    assert not all(np.array_equal(p, q) for p, q in zip(a, c, strict=True))
    out["l2sp"] = "ok"

    # gradual: the trainable set per phase, frozen weights and BatchNorm statistics unchanged
    keras.utils.set_random_seed(0)
    kb = build("mobilenet_v3_small", "none", 3, image_size=32)
    owner = kb.weight_owner()
    trainer = Trainer(kb, jit_compile=False)
    phases = registry.get("gradual").phases({}, 3, n_blocks=len(kb.blocks))
    assert [(p.name, n) for p, n in phases] == [("head", 1), ("top1", 1), ("top2", 1)]
    for k, (ph, _) in enumerate(phases):
        params = trainer.compile_phase(ph, "adam", 1e-2)
        trainable = set(kb.blocks[len(kb.blocks) - k:])
        assert {owner[v.path] for v in params} == trainable | {"head"}, ph
        kb.model.run_eagerly = True
        before = {v.path: v.numpy().copy() for v in kb.model.weights}
        kb.model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
        for v in kb.model.weights:
            if owner[v.path] not in trainable | {"head"}:
                assert np.array_equal(before[v.path], v.numpy()), v.path
        head = [v for v in kb.model.weights if owner[v.path] == "head"][0]
        assert not np.array_equal(before[head.path], head.numpy())
    out["gradual"] = "ok"
    print("RESULT " + json.dumps(out))
''')


@pytest.fixture(scope="module")
def keras_results() -> dict:
    return keras_script_results(KERAS_CHECKS)


@pytest.mark.parametrize("check", ["llrd", "l2sp", "gradual"])
def test_keras(keras_results, check):
    assert keras_results.get(check) == "ok", keras_results["stderr"]
