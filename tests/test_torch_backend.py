"""The PyTorch backend (strategies/torch_backend/): block maps, frozen-means-frozen, weights,
the data adapter and one cell end to end. Real tiny models and tensors, CPU only, offline."""

from __future__ import annotations

import json
import math
import pickle
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from bench.cell import loop
from bench.cell.session import OrderCheck
from bench.config.grid import from_dict
from bench.config.spec import RunSpec
from bench.data import check_card, shipped_cards
from helpers import RecordingContext, strategy_test_params
from strategies import backbones as catalog
from strategies import registry
from strategies.torch_backend import run_cell
from strategies.torch_backend.backbones import (
    BLOCK_MAPS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    WeightsUnavailable,
    build,
    imagenet_state_dict,
    load_weights_file,
)
from strategies.torch_backend.data import Batches, Preprocess, random_translate, to_chw_uint8
from strategies.torch_backend.train import (
    Trainer,
    apply_phase,
    selected_parameters,
    set_train_mode,
    trainable_blocks,
)

CPU = torch.device("cpu")
NUM_CLASSES = 3
SIZE = 32
_BN = torch.nn.modules.batchnorm._BatchNorm


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these models are tiny, and on a shared 2-core machine two OpenMP
    threads spin against any other busy process (measured: a resnet18 step 0.23 s with one
    thread, 4.2 s with two, next to a running grid)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ---- helpers ---------------------------------------------------------------------------------
def owner_of(tb, name: str) -> str:
    """The block (or 'head') a parameter/buffer name belongs to, by the block map's prefixes."""
    prefixes = [(p, b) for b, ps in tb.block_map.blocks.items() for p in ps]
    prefixes.append((tb.block_map.classifier, "head"))
    hits = [b for p, b in prefixes if name == p or name.startswith(p + ".")]
    assert len(hits) == 1, f"{name}: owners {hits}"
    return hits[0]


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(before: dict, model: torch.nn.Module) -> set[str]:
    after = model.state_dict()
    assert before.keys() == after.keys()
    return {k for k in before if not torch.equal(before[k], after[k])}


def fake_batches(n_batches: int, batch: int = 8, size: int = SIZE, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, size, size, generator=g),
             torch.randint(0, NUM_CLASSES, (batch,), generator=g)) for _ in range(n_batches)]




# ---- 1. block names match the catalog ---------------------------------------------------------
def test_block_maps_match_catalog():
    torch_backbones = {n for n, b in catalog.BACKBONES.items()  # ViTs: tests/test_vit.py
                       if "torch" in b.frameworks and b.family != "vit"}
    assert set(BLOCK_MAPS) == torch_backbones
    for name, bmap in BLOCK_MAPS.items():
        assert tuple(bmap.blocks) == catalog.BACKBONES[name].blocks, name
        assert all(bmap.blocks.values()), f"{name}: a block with no modules"


def test_build_unknown_backbone():
    with pytest.raises(KeyError, match="unknown backbone 'resnet1000'; known: .*resnet18"):
        build("resnet1000", "none", NUM_CLASSES)


# ---- 2. every parameter has exactly one owner -------------------------------------------------
@pytest.mark.parametrize("name", sorted(BLOCK_MAPS))
def test_block_map_covers_every_parameter(name):
    torch.manual_seed(0)
    tb = build(name, "none", NUM_CLASSES)
    owners = tb.param_owner()
    blocks = list(tb.block_map.blocks)
    assert set(owners) == {n for n, _ in tb.model.named_parameters()}
    bad = {n: o for n, o in owners.items() if o not in blocks and o != "head"}
    assert not bad, f"parameters without exactly one owner: {bad}"
    for b in blocks:
        assert any(o == b for o in owners.values()), f"block {b} owns no parameter"
    # buffers (BN running stats) are covered by the same prefixes
    for n, _ in tb.model.named_buffers():
        owner_of(tb, n)

    # the head is exactly the new one
    head = tb.head
    assert isinstance(head, torch.nn.Linear)
    assert head.out_features == NUM_CLASSES and head.in_features == tb.block_map.features
    head_params = {f"{tb.block_map.classifier}.{n}" for n, _ in head.named_parameters()}
    assert {n for n, o in owners.items() if o == "head"} == head_params

    tb.model.eval()
    with torch.no_grad():
        out = tb.model(torch.randn(2, 3, SIZE, SIZE))
    assert out.shape == (2, NUM_CLASSES)


def test_mlp_head_is_owned_by_head():
    tb = build("resnet18", "none", NUM_CLASSES, head="mlp")
    owners = tb.param_owner()
    head_names = {n for n, o in owners.items() if o == "head"}
    assert len(head_names) == 6  # three Linear layers, weight + bias each
    assert all(n.startswith("fc.") for n in head_names)
    assert set(owners.values()) == set(tb.block_map.blocks) | {"head"}
    tb.model.eval()
    with torch.no_grad():
        assert tb.model(torch.randn(2, 3, SIZE, SIZE)).shape == (2, NUM_CLASSES)


# ---- 3. every registered strategy trains ------------------------------------------------------
@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_small"])
@pytest.mark.parametrize("strategy_name", sorted(registry.STRATEGIES))
def test_every_strategy_trains_one_step(strategy_name, backbone):
    torch.manual_seed(0)
    strategy = registry.get(strategy_name)
    phases = strategy.phases(strategy_test_params(strategy), epochs=2)
    assert phases
    tb = build(backbone, "none", NUM_CLASSES)
    trainer = Trainer(tb, CPU)
    (x, y), = fake_batches(1, batch=4)
    for phase, n_epochs in phases:
        assert n_epochs >= 1
        params = apply_phase(tb, phase)
        # after apply_phase: a LoRA phase has added its adapters (owned by their blocks)
        owners = tb.param_owner()
        by_name = dict(tb.model.named_parameters())
        expected = set(trainable_blocks(tb, phase)) | {"head"}
        # by parameter: a phase with `only` (bitfit, norm, lora) trains part of its blocks
        chosen = {id(p) for b in trainable_blocks(tb, phase) for m in tb.block_modules(b)
                  for p in selected_parameters(m, phase.only)}
        assert {id(p) for p in params} == {id(by_name[n]) for n, o in owners.items()
                                           if o == "head" or (o in expected
                                                              and id(by_name[n]) in chosen)}
        set_train_mode(tb, phase)
        before = tb.head.weight.detach().clone()
        opt = torch.optim.Adam(params, lr=1e-3 * phase.lr_scale)
        loss, logits = trainer.step(opt, x, y)
        assert math.isfinite(loss.item())
        assert logits.shape == (4, NUM_CLASSES)
        assert not torch.equal(before, tb.head.weight)


def test_a_grid_cell_trains_with_the_strategys_defaults():
    """`two_stage[depth=2]` in a grid: the cell carries the documented defaults (stage-2 lr
    x0.01, half the epochs each, BatchNorm frozen) and its phases unfreeze what they say."""
    (spec,) = from_dict({"axes": {"framework": ["torch"], "backbone": ["resnet18"],
                                  "dataset": ["digits"], "strategy": ["two_stage[depth=2]"]},
                         "defaults": {"epochs": 4}}, "x.toml").specs
    assert spec.params == {"depth": 2, "lr_scale": 0.01, "head_share": 0.5, "bn": "frozen"}
    phases = registry.get(spec.strategy).phases(spec.params, spec.epochs)
    assert [(p.name, p.trainable_blocks, p.lr_scale, n) for p, n in phases] == [
        ("head", 0, 1.0, 2), ("finetune", 2, 0.01, 2)]
    assert phases[1][0].bn == "frozen"
    tb = build(spec.backbone, "none", NUM_CLASSES)
    assert [trainable_blocks(tb, p) for p, _ in phases] == [[], ["stage3", "stage4"]]


# ---- 4. frozen means frozen, bit for bit ------------------------------------------------------
CASES = {
    "partial": ("partial", {"depth": 2, "bn": "train"}),
    "feature_extraction": ("feature_extraction", {}),
    "partial_bn_frozen": ("partial", {"depth": 2, "bn": "frozen"}),
}


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v2"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_frozen_means_frozen(backbone, case):
    torch.manual_seed(0)
    strategy_name, params = CASES[case]
    (phase, _), = registry.get(strategy_name).phases(params, epochs=1)
    tb = build(backbone, "none", NUM_CLASSES)
    trainer = Trainer(tb, CPU)
    trainable = set(trainable_blocks(tb, phase))
    if backbone == "resnet18" and case != "feature_extraction":
        assert trainable == {"stage3", "stage4"}
    opt = torch.optim.Adam(apply_phase(tb, phase), lr=1e-2)
    before = snapshot(tb.model)
    batches = fake_batches(3)
    # the real loop: an epoch, an evaluation (eval mode), another epoch (train mode again)
    trainer.train_epoch(phase, opt, batches[:2])
    trainer.evaluate(batches[:1])
    trainer.train_epoch(phase, opt, batches[2:])
    diff = changed(before, tb.model)

    by_owner: dict[str, list[str]] = {}
    for k in before:
        by_owner.setdefault(owner_of(tb, k), []).append(k)
    params = {n for n, _ in tb.model.named_parameters()}
    bn_prefixes = {n for n, m in tb.model.named_modules() if isinstance(m, _BN)}
    for block, keys in by_owner.items():
        moved = [k for k in keys if k in diff]
        if block not in trainable and block != "head":
            assert not moved, f"frozen block {block} changed: {moved[:5]}"
            continue
        assert any(k in params for k in moved), f"trainable {block} did not change"
        if block == "head":
            continue
        stats = [k for k in keys if k.rpartition(".")[0] in bn_prefixes
                 and k.rpartition(".")[2] in ("running_mean", "running_var",
                                              "num_batches_tracked")]
        assert stats, f"{block} has no BatchNorm"
        conv_weights = [k for k in keys if k in params and before[k].dim() == 4]
        assert any(k in diff for k in conv_weights), f"{block}: no conv weight changed"
        if phase.bn == "frozen":
            assert not [k for k in stats if k in diff], f"{block}: BN stats moved (bn=frozen)"
        else:
            assert any(k in diff for k in stats if k.endswith("running_mean"))
            assert any(k in diff for k in stats if k.endswith("running_var"))
            for k in stats:
                if k.endswith("num_batches_tracked"):
                    assert tb.model.state_dict()[k].item() == before[k].item() + 3
    assert "head" in by_owner


@pytest.mark.parametrize("bn", ["train", "frozen"])
def test_set_train_mode_puts_frozen_bn_in_eval(bn):
    tb = build("resnet18", "none", NUM_CLASSES)
    phase = registry.Phase(2, bn=bn)
    apply_phase(tb, phase)
    tb.model.eval()  # as evaluate() leaves it
    set_train_mode(tb, phase)
    trainable = set(trainable_blocks(tb, phase))
    assert trainable == {"stage3", "stage4"}
    seen = set()
    for block in tb.block_map.blocks:
        for m in tb.block_modules(block):
            for sub in m.modules():
                if isinstance(sub, _BN):
                    seen.add(block)
                    want = block in trainable and bn == "train"
                    assert sub.training is want, (block, bn)
    assert seen == set(tb.block_map.blocks)
    assert tb.head.training


# ---- 5. two_stage -----------------------------------------------------------------------------
def test_two_stage_phases_and_training():
    torch.manual_seed(0)
    strategy = registry.get("two_stage")
    phases = strategy.phases(strategy_test_params(strategy) | {"depth": 2}, epochs=2)
    assert [(ph.name, n) for ph, n in phases] == [("head", 1), ("finetune", 1)]
    (head, _), (fine, _) = phases
    assert head.trainable_blocks == 0 and head.lr_scale == 1.0
    assert fine.lr_scale == 0.01 and fine.bn == "frozen"

    tb = build("resnet18", "none", NUM_CLASSES)
    assert trainable_blocks(tb, head) == []
    assert trainable_blocks(tb, fine) == ["stage3", "stage4"]
    trainer = Trainer(tb, CPU)
    batches = fake_batches(2)
    original = snapshot(tb.model)
    lr = 1e-2

    def blocks_changed(diff):
        return {owner_of(tb, k) for k in diff}

    opt = torch.optim.Adam(apply_phase(tb, head), lr=lr * head.lr_scale)
    trainer.train_epoch(head, opt, batches[:1])
    after_head = snapshot(tb.model)
    assert blocks_changed(changed(original, tb.model)) == {"head"}
    trainer.evaluate(batches[:1])

    opt = torch.optim.Adam(apply_phase(tb, fine), lr=lr * fine.lr_scale)
    trainer.train_epoch(fine, opt, batches[1:])
    diff = changed(after_head, tb.model)
    assert blocks_changed(diff) == {"stage3", "stage4", "head"}
    assert not any(k.endswith(("running_mean", "running_var", "num_batches_tracked"))
                   for k in diff), "bn='frozen' must keep the unfrozen blocks' statistics"
    assert not {owner_of(tb, k) for k in changed(original, tb.model)} & {
        "stem", "stage1", "stage2"}


# ---- 6. weights -------------------------------------------------------------------------------
_PWNED: list[str] = []


def _record(what: str) -> str:
    _PWNED.append(what)
    return what


class _Evil:
    def __reduce__(self):
        return (_record, ("unpickled code ran",))


def _assert_backbone_equal(tb, sd: dict):
    got = tb.model.state_dict()
    for k, v in sd.items():
        if k.startswith("fc."):
            continue
        assert torch.equal(got[k], v), k
    assert tb.head.weight.shape == (NUM_CLASSES, 512)


def test_weights_from_file(tmp_path):
    torch.manual_seed(1)
    sd = torchvision.models.resnet18().state_dict()
    path = tmp_path / "w.pt"
    torch.save(sd, path)
    _assert_backbone_equal(build("resnet18", str(path), NUM_CLASSES), sd)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": sd}, wrapped)
    _assert_backbone_equal(build("resnet18", str(wrapped), NUM_CLASSES), sd)
    # a fresh random init differs, so the equality above is not vacuous
    fresh = build("resnet18", "none", NUM_CLASSES).model.state_dict()
    assert not torch.equal(fresh["conv1.weight"], sd["conv1.weight"])


def test_weights_file_not_a_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(ValueError, match="expected a state dict, got list"):
        load_weights_file(str(path))
    with pytest.raises(ValueError):
        build("resnet18", str(path), NUM_CLASSES)


def test_weights_file_is_loaded_weights_only(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"w": _Evil()}, path)
    _PWNED.clear()
    with pytest.raises((pickle.UnpicklingError, RuntimeError, ValueError)) as info:
        load_weights_file(str(path))
    assert "weights_only" in str(info.value) or "Weights only" in str(info.value)
    assert _PWNED == []
    # control: the same file unpickled unsafely does run the code
    torch.load(path, weights_only=False)
    assert _PWNED == ["unpickled code ran"]
    _PWNED.clear()


@pytest.fixture
def offline(monkeypatch):
    """Any download fails fast: every proxy points at a closed local port (urllib honours
    them; checked: connection refused in ~0.1 s), no_proxy cannot bypass it, and a socket
    timeout bounds any connect that slips through."""
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(5)
    yield
    socket.setdefaulttimeout(old)


RESNET18_FILE = Path(torchvision.models.ResNet18_Weights.DEFAULT.url).name


def test_imagenet_weights_from_torch_cache(tmp_path, monkeypatch, offline):
    assert RESNET18_FILE == "resnet18-f37072fd.pth"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    assert Path(torch.hub.get_dir()) == tmp_path / "th" / "hub"  # read at call time
    folder = tmp_path / "th" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.manual_seed(2)
    sd = torchvision.models.resnet18().state_dict()
    torch.save(sd, folder / RESNET18_FILE)
    got = imagenet_state_dict("resnet18")
    assert got.keys() == sd.keys()
    _assert_backbone_equal(build("resnet18", "imagenet", NUM_CLASSES), sd)


def test_imagenet_weights_missing_offline(tmp_path, monkeypatch, offline):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    folder = tmp_path / "empty" / "hub" / "checkpoints"
    t0 = time.perf_counter()
    with pytest.raises(WeightsUnavailable) as info:
        imagenet_state_dict("resnet18")
    assert time.perf_counter() - t0 < 30
    msg = str(info.value)
    assert RESNET18_FILE in msg and str(folder) in msg
    assert not (folder / RESNET18_FILE).exists()
    with pytest.raises(WeightsUnavailable):
        build("resnet18", "imagenet", NUM_CLASSES)


def test_imagenet_cache_is_loaded_weights_only(tmp_path, monkeypatch, offline):
    """torchvision's cached file is read with weights_only=True: a plain state dict there
    loads, a pickle with code in it is refused (the refusal names the global the file
    calls, so the file was read) and its code never runs."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    cached = tmp_path / "th" / "hub" / "checkpoints" / RESNET18_FILE
    cached.parent.mkdir(parents=True)
    torch.save({"w": torch.arange(3.0)}, cached)
    assert torch.equal(imagenet_state_dict("resnet18")["w"], torch.arange(3.0))
    torch.save({"w": _Evil()}, cached)
    _PWNED.clear()
    with pytest.raises(WeightsUnavailable, match="Unsupported global.*_record") as info:
        imagenet_state_dict("resnet18")
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)
    assert _PWNED == []
    # control: the same file unpickled unsafely does run the code
    torch.load(cached, weights_only=False)
    assert _PWNED == ["unpickled code ran"]
    _PWNED.clear()


# ---- 7. data adapter --------------------------------------------------------------------------
def test_to_chw_uint8_grayscale():
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
    x = to_chw_uint8(imgs, 32)
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.uint8
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])
    same = to_chw_uint8(imgs, 8)  # no resize: the pixels themselves
    assert torch.equal(same[:, 0], torch.from_numpy(imgs[..., 0]))


def _constant_images(n: int, size: int = 6) -> np.ndarray:
    return np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None],
                           (n, size, size, 3)).copy()


def _epoch(b: Batches):
    xs, ys = zip(*b, strict=True)
    return torch.cat(xs), torch.cat(ys)


def test_batches_resident_shuffled_epochs():
    n = 22
    imgs, labels = _constant_images(n), np.arange(n)
    b = Batches(imgs, labels, 8, 4, CPU, shuffle=True, seed=3)
    assert b.resident and b.loader is None and len(b) == 6
    x1, y1 = _epoch(b)
    assert x1.shape == (n, 3, 8, 8) and x1.dtype == torch.uint8
    assert sorted(y1.tolist()) == list(range(n))
    assert torch.equal(x1[:, 0, 0, 0].long(), y1)  # images stay with their labels
    assert y1.tolist() != list(range(n))  # shuffled
    x2, y2 = _epoch(b)
    assert sorted(y2.tolist()) == list(range(n)) and y2.tolist() != y1.tolist()
    again = Batches(imgs, labels, 8, 4, CPU, shuffle=True, seed=3)
    assert _epoch(again)[1].tolist() == y1.tolist() and _epoch(again)[1].tolist() == y2.tolist()
    other = Batches(imgs, labels, 8, 4, CPU, shuffle=True, seed=4)
    assert _epoch(other)[1].tolist() != y1.tolist()
    plain = Batches(imgs, labels, 8, 4, CPU, shuffle=False, seed=3)
    assert _epoch(plain)[1].tolist() == list(range(n))


def test_a_lone_last_training_batch_is_left_out():
    # 21 = 5 x 4 + 1: a batch of one image cannot train BatchNorm ("Expected more than 1
    # value per channel"); the shuffled part drops it, a different image each epoch
    imgs, labels = _constant_images(21), np.arange(21)
    b = Batches(imgs, labels, 8, 4, CPU, shuffle=True, seed=0)
    assert len(b) == 5
    left_out = set()
    for _ in range(6):
        _, y = _epoch(b)
        assert len(y) == 20 and len(set(y.tolist())) == 20
        left_out |= set(range(21)) - set(y.tolist())
    assert len(left_out) > 1
    assert len(_epoch(Batches(imgs, labels, 8, 4, CPU, shuffle=False, seed=0))[1]) == 21


def test_batches_from_png_files(tmp_path):
    files, labels = [], []
    for i in range(5):
        p = tmp_path / f"img{i}.png"
        Image.fromarray(np.full((10, 7, 3), (i * 40, 10, 200), dtype=np.uint8)).save(p)
        files.append(str(p))
        labels.append(i % 2)
    b = Batches(files, np.array(labels), 12, 2, CPU, shuffle=False, seed=0, workers=0)
    assert not b.resident and len(b) == 3
    got = list(b)
    assert [x.shape[0] for x, _ in got] == [2, 2, 1]
    x = torch.cat([x for x, _ in got])
    y = torch.cat([y for _, y in got])
    assert x.shape == (5, 3, 12, 12) and x.dtype == torch.uint8
    assert y.tolist() == labels
    for i in range(5):
        assert torch.equal(x[i, :, 0, 0], torch.tensor([i * 40, 10, 200], dtype=torch.uint8))


def test_preprocess_normalises():
    pre = Preprocess(IMAGENET_MEAN, IMAGENET_STD, CPU)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = (mean * 255).round().to(torch.uint8).expand(2, 3, 4, 4).contiguous()
    out = pre(x, train=False)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 4, 4)
    assert out.abs().max() < 0.01
    white = torch.full((1, 3, 4, 4), 255, dtype=torch.uint8)
    assert torch.allclose(pre(white, train=True), ((1 - mean) / std).expand(1, 3, 4, 4),
                          atol=1e-5)  # augmentation 'none' does nothing in training


def test_preprocess_flip():
    torch.manual_seed(0)
    pre = Preprocess((0, 0, 0), (1 / 255,) * 3, CPU, augmentation="flip")
    x = torch.randint(0, 256, (16, 3, 5, 5), dtype=torch.uint8)
    out = pre(x, train=True)
    flipped = [torch.equal(out[i], x[i].flip(-1).float()) for i in range(16)]
    kept = [torch.equal(out[i], x[i].float()) for i in range(16)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert any(flipped) and any(kept)
    assert torch.equal(pre(x, train=False), x.float())


def test_random_translate_is_a_crop_of_the_reflect_padded_image():
    torch.manual_seed(0)
    pad, n, h, w = 2, 6, 7, 9
    x = torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8)
    out = random_translate(x, pad)
    assert out.shape == x.shape and out.dtype == x.dtype
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="reflect")
    offsets = []
    for i in range(n):
        hits = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                if np.array_equal(out[i].numpy(), padded[i, :, dy:dy + h, dx:dx + w])]
        assert len(hits) == 1, f"image {i}: {hits}"
        offsets.append(hits[0])
    assert len(set(offsets)) > 1  # a random offset per image


# ---- 8. one cell end to end -------------------------------------------------------------------
def test_run_cell_digits(tmp_path, monkeypatch):
    monkeypatch.setenv("TLBENCH_CACHE", str(tmp_path / "cache"))
    card = check_card(shipped_cards()["digits"], "digits")
    # the grid fills every parameter's default into strategy_params (bench/config/grid.py)
    params = strategy_test_params(registry.get("two_stage")) | {"depth": 2}
    spec = RunSpec(framework="torch", backbone="resnet18", dataset="digits",
                   strategy="two_stage", strategy_params=tuple(params.items()), weights="none",
                   subset=60, image_size=16, batch_size=16, epochs=2)
    ctx = RecordingContext()
    run_cell(spec, card, ctx)

    assert [s for s, _ in ctx.epochs] == [1, 2]
    for _, row in ctx.epochs:
        assert {"train_loss", "train_acc", "val_loss", "val_acc", "epoch_seconds"} <= set(row)
        assert math.isfinite(row["train_loss"]) and 0 <= row["val_acc"] <= 1
    assert ctx.epochs[0][1]["lr"] == pytest.approx(1e-3)
    assert ctx.epochs[1][1]["lr"] == pytest.approx(1e-5)

    final = {}
    for f in ctx.finals:
        final.update(f)
    assert final["num_classes"] == 10
    assert final["n_train"] + final["n_val"] == 60  # subset = train+val; test kept whole
    assert final["n_test"] > 0
    assert 0 <= final["test_acc"] <= 1 and 0 <= final["test_top5"] <= 1
    assert final["test_top5"] >= final["test_acc"]
    assert final["best_val_acc"] == max(r["val_acc"] for _, r in ctx.epochs)
    assert final["best_val_epoch"] in (1, 2)
    tb = build("resnet18", "none", 10)
    owners = tb.param_owner()
    sizes = dict(tb.model.named_parameters())
    assert final["total_params"] == sum(p.numel() for p in tb.model.parameters())
    assert final["trainable_params"] == sum(sizes[n].numel() for n, o in owners.items()
                                            if o in ("stage3", "stage4", "head"))
    assert final["model_only_train_images_per_sec"] > 0
    assert final["inference_images_per_sec"] > 0
    assert final["wall_seconds"] > 0 and ctx.elapsed_calls >= 1
    assert final["peak_memory_mb"] > 0
    assert "device" in ctx.tags and ctx.tags["data_path"] == "resident"
    assert ctx.progresses and ctx.progresses[-1]["fraction"] == pytest.approx(1.0)

    history = json.loads(ctx.artifacts["history.json"])
    assert len(history) == 2
    assert [r["phase"] for r in history] == ["head", "finetune"]
    assert [r["epoch"] for r in history] == [1, 2]


# ---- 9. feature caching -----------------------------------------------------------------------
def _cell(tmp_path, monkeypatch, strategy: str, params: dict, feature_cache: bool,
          backbone: str = "resnet18", image_size: int = 16, epochs: int = 2,
          ctx: RecordingContext | None = None, **options) -> RecordingContext:
    monkeypatch.setenv("TLBENCH_CACHE", str(tmp_path / "cache"))
    card = check_card(shipped_cards()["digits"], "digits")
    params = registry.get(strategy).with_defaults(params)
    spec = RunSpec(framework="torch", backbone=backbone, dataset="digits", strategy=strategy,
                   strategy_params=tuple(params.items()), weights="none", subset=60,
                   image_size=image_size, batch_size=16, epochs=epochs,
                   feature_cache=feature_cache, **options)
    ctx = ctx or RecordingContext()
    torch.manual_seed(0)
    run_cell(spec, card, ctx)
    ctx.final = {k: v for f in ctx.finals for k, v in f.items()}
    return ctx


@pytest.mark.parametrize("strategy,params,label,backbone", [
    ("feature_extraction", {}, "features", "resnet18"),
    ("partial", {"depth": 2}, "prefix:3 blocks", "resnet18"),
    ("two_stage", {"depth": 2}, "head=features; finetune=prefix:3 blocks", "resnet18"),
    ("blocks", {"names": "stage2+stage4"}, "prefix:2 blocks", "resnet18"),  # frozen stage3
    # its "SAME" padding convolutions stay opaque to torch.fx (cache.py)
    ("partial", {"depth": 2}, "prefix:7 blocks", "efficientnet_lite0"),
])
def test_feature_cache_trains_exactly_as_uncached(tmp_path, monkeypatch, strategy, params,
                                                  label, backbone):
    """Cached features (eval mode through the frozen part, the same items in the same seeded
    order) give the uncached path's losses and accuracies, epoch by epoch."""
    off = _cell(tmp_path, monkeypatch, strategy, params, feature_cache=False,
                backbone=backbone)
    on = _cell(tmp_path, monkeypatch, strategy, params, feature_cache=True, backbone=backbone)
    assert off.tags["feature_cache_used"] == "off: feature_cache = false"
    assert on.tags["feature_cache_used"] == label
    assert on.tags["train_rate_of"] != off.tags["train_rate_of"] == "whole model"
    for (_, a), (_, b) in zip(off.epochs, on.epochs, strict=True):
        for k in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), k
    for k in ("test_acc", "test_top5", "best_val_acc", "trainable_params", "total_params"):
        assert on.final[k] == pytest.approx(off.final[k], rel=1e-4), k
    assert on.final["feature_cache_seconds"] > 0 == off.final["feature_cache_seconds"]
    assert set(on.final) == set(off.final) and set(on.tags) == set(off.tags)
    # two_stage: 1 epoch of 3 steps per phase, all warm-up
    assert on.tags["input_bound"].split()[0] in ("true", "false") or (
        strategy == "two_stage" and on.tags["input_bound"].startswith("unknown"))


def test_feature_cache_that_does_not_fit_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("TLBENCH_FEATURE_CACHE_MB", "0.01")
    ctx = _cell(tmp_path, monkeypatch, "partial", {"depth": 2}, feature_cache=True)
    tag = ctx.tags["feature_cache_used"]
    assert tag.startswith("off: the bottom 3 blocks' output not cached: needs"), tag
    assert "0 MB allowed" in tag and ctx.tags["train_rate_of"] == "whole model"


def test_no_cache_with_augmentation_or_nothing_frozen():
    from bench.cell.loop import cache_plan

    spec = RunSpec(framework="torch", backbone="resnet18", dataset="digits")
    assert cache_plan(spec, registry.Phase(0), 5) == ("features", 5)
    assert cache_plan(spec, registry.Phase(2), 5) == ("prefix", 3)
    assert cache_plan(spec, registry.Phase(registry.ALL), 5) == "every block trains"
    flip = RunSpec(framework="torch", backbone="resnet18", dataset="digits",
                   augmentation="flip")
    assert "augmentation" in cache_plan(flip, registry.Phase(0), 5)


def test_a_real_cell_calls_the_session_in_protocol_order(tmp_path, monkeypatch):
    """bench.cell.loop wraps the TorchSession in OrderCheck, which raises on a call out of
    order; a two_stage cell with both caches, precise BatchNorm and best_val selection
    runs through it, in this order."""
    checks = []

    class Kept(OrderCheck):
        def __init__(self, session):
            super().__init__(session)
            checks.append(self)

    monkeypatch.setattr(loop, "OrderCheck", Kept)  # where run_cell looks it up
    ctx = _cell(tmp_path, monkeypatch, "two_stage", {"depth": 2}, feature_cache=True,
                select="best_val", precise_bn=16)
    (check,) = checks
    phase = ["begin_phase", "use_cache", "train_epoch", "recalibrate_bn", "evaluate"]
    assert check.calls[:4] == ["start", "determinism", "seed", "build"]
    assert check.calls[4:9] == phase and check.calls[9] == "snapshot"  # epoch 1 is the best
    assert check.calls[10:15] == phase
    tail = (["snapshot", "evaluate"] if ctx.final["best_val_epoch"] == 2
            else ["restore", "evaluate"])
    assert check.calls[15:] == tail + ["param_counts", "model_only_rates", "peak_memory_mb"]
    assert ctx.tags["feature_cache_used"] == "head=features; finetune=prefix:3 blocks"


# ---- 9b. fair comparisons: the budget trained, the weights tested, divergence, device ------
def test_a_cell_records_the_epochs_and_steps_it_trained(tmp_path, monkeypatch):
    """two_stage at 3 epochs trains 1 + 2 (it trained 2 + 2 when phases were rounded)."""
    ctx = _cell(tmp_path, monkeypatch, "two_stage", {"depth": 2}, feature_cache=True,
                epochs=3)
    history = json.loads(ctx.artifacts["history.json"])
    assert [r["phase"] for r in history] == ["head", "finetune", "finetune"]
    n = ctx.final["n_train"]
    steps = -(-(n - (n % 16 == 1)) // 16)  # a lone last image is left out
    assert ctx.final["epochs_trained"] == 3
    assert ctx.final["optimizer_steps"] == 3 * steps
    assert ctx.final["test_epoch"] == 3  # select = last
    assert ctx.tags["deterministic"] == "true"  # auto on a CPU
    assert ctx.tags["diverged"] in ("false",) or ctx.tags["diverged"].startswith("true: ")
    assert 0 <= ctx.final["contention_share"] <= 1
    assert ctx.tags["contended"].split(":")[0] in ("true", "false")


def test_select_best_val_tests_the_weights_of_the_best_epoch(tmp_path, monkeypatch):
    """At lr 0.01 from scratch the validation accuracy peaks at epoch 1 (measured: 0.167,
    0.083, 0.083); the best_val cell's test
    numbers are exactly those of the same cell stopped at that epoch (same seed, one phase:
    its first epochs are the same computation)."""
    best = _cell(tmp_path, monkeypatch, "full", {}, feature_cache=True, epochs=3,
                 select="best_val", lr=0.01)
    e = best.final["best_val_epoch"]
    assert best.final["test_epoch"] == e
    assert e < 3, "this cell no longer peaks early: choose another lr to test the restore"
    last = _cell(tmp_path, monkeypatch, "full", {}, feature_cache=True, epochs=e, lr=0.01)
    assert last.final["test_epoch"] == e
    for k in ("test_loss", "test_acc", "test_top5"):
        assert best.final[k] == last.final[k], k
    final3 = _cell(tmp_path, monkeypatch, "full", {}, feature_cache=True, epochs=3, lr=0.01)
    assert final3.final["test_loss"] != best.final["test_loss"]  # the restore did something


def test_a_non_finite_loss_ends_the_cell_at_once(tmp_path, monkeypatch):
    from bench.cell.loop import Diverged

    ctx = RecordingContext()
    with pytest.raises(Diverged, match=r"^diverged at epoch 1, step \d+ \(train loss (nan|inf)"):
        _cell(tmp_path, monkeypatch, "full", {}, feature_cache=False, epochs=3,
              optimizer="sgd", lr=1e30, ctx=ctx)
    assert ctx.epochs == []  # stopped inside the first epoch, nothing evaluated
    assert ctx.tags["diverged"].startswith("true: diverged at epoch 1, step ")


def test_a_cell_identified_with_another_device_refuses_to_run(tmp_path, monkeypatch):
    from bench.cell.loop import DeviceMismatch

    ctx = RecordingContext()
    with pytest.raises(DeviceMismatch, match="device_kind = 'cuda:NVIDIA H200'.*'cpu'"):
        _cell(tmp_path, monkeypatch, "full", {}, feature_cache=False,
              device_kind="cuda:NVIDIA H200", ctx=ctx)
    assert ctx.epochs == [] and ctx.finals == []


TORCH_BACKBONES = sorted(BLOCK_MAPS)
EVERY_CUT = [(b, k) for b in TORCH_BACKBONES
             for k in range(1, catalog.BACKBONES[b].n_blocks)]


@pytest.fixture(scope="module")
def built_once():
    """Each backbone built once (weights none) with its eval-mode logits on one batch."""
    models = {}

    def get(name):
        if name not in models:
            torch.manual_seed(0)
            tb = build(name, "none", NUM_CLASSES)
            x = torch.randn(2, 3, SIZE, SIZE)
            tb.model.eval()
            with torch.no_grad():
                models[name] = tb, x, tb.model(x)
        return models[name]

    return get


@pytest.mark.parametrize("backbone,n_frozen", EVERY_CUT)
def test_split_after_frozen_blocks(built_once, backbone, n_frozen):
    """Every shipped backbone gets a prefix cut at every depth: the prefix holds exactly the
    frozen blocks' parameters (the model's own), and suffix(prefix(x)) is model(x) bit for
    bit in eval mode (EfficientNet-Lite0's input-dependent "SAME" padding included)."""
    from strategies.torch_backend.cache import shares_parameters, split_after

    tb, x, logits = built_once(backbone)
    phase = registry.Phase(len(tb.block_map.blocks) - n_frozen)
    apply_phase(tb, phase)
    set_train_mode(tb, phase)
    prefix, suffix = split_after(tb, n_frozen)
    assert shares_parameters(prefix, tb.model) and shares_parameters(suffix, tb.model)
    frozen = set(list(tb.block_map.blocks)[:n_frozen])
    prefix_params = {id(p) for p in prefix.parameters()}
    owners = tb.param_owner()
    by_name = dict(tb.model.named_parameters())
    assert prefix_params == {id(by_name[n]) for n, o in owners.items() if o in frozen}
    tb.model.eval()
    with torch.no_grad():
        assert torch.equal(suffix(prefix(x)), logits)


class _DataDependent(torch.nn.Module):
    """A container whose forward branches on a tensor's value: fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(4, 4, 1)

    def forward(self, x):
        x = self.a(x)
        return self.b(x) if x.sum() > 0 else x


def test_split_after_refuses_an_untraceable_model_with_the_reason():
    from strategies.torch_backend.backbones import BlockMap, TorchBackbone
    from strategies.torch_backend.cache import split_after

    model = torch.nn.Sequential(_DataDependent(), torch.nn.Conv2d(4, 4, 1),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, NUM_CLASSES))
    tb = TorchBackbone("branchy", model, BlockMap({"b1": ("0",), "b2": ("1",)}, "4", 4))
    with pytest.raises(loop.CacheUnavailable, match=r"torch.fx cannot trace branchy "
                                                       r"\(TraceError: .*"):
        split_after(tb, 1)


# ---- 10. the GPU path's options, executed on the CPU ------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("options,rel", [
    # half precision is emulated on this CPU (~15x slower than fp32): the digits' own 8 px
    ({"precision": "bf16", "channels_last": True, "image_size": 8}, 2e-2),  # ~3 digits
    ({"precision": "fp16", "image_size": 8}, 1e-2),  # with a GradScaler
    ({"compile": True}, 1e-4),  # torch.compile (inductor, C++ on the CPU)
])
def test_gpu_path_options_run_and_match_fp32(tmp_path, monkeypatch, options, rel):
    """Mixed precision, channels_last and torch.compile run a cell end to end (here on the
    CPU: the code paths a GPU takes, minus the kernels) and compute what fp32 computes: the
    first step's loss (same weights, same batch, before any update) within `rel` of the
    fp32 cell's; and the steps learn. A spy on the train step proves each option was in
    force: the input's memory format, the logits' dtype, the loss scaler, the compile."""
    from bench.cell.loop import MODEL_ONLY_STEPS, WARMUP_STEPS
    from strategies.torch_backend import train

    seen = []
    real_step = train.Trainer.step

    def step(self, opt, x, y, forward=None):
        loss, logits = real_step(self, opt, x, y, forward)
        seen.append({"loss": loss.item(), "dtype": logits.dtype,
                     "nhwc": x.is_contiguous(memory_format=torch.channels_last)
                     and not x.is_contiguous(),
                     "scale": self.scaler.get_scale() if self.scaler.is_enabled() else None,
                     "compiled": type(self.forward_of() if forward is None else forward).__name__})
        return loss, logits

    compiled = []
    real_compile = torch.compile

    def compile_spy(module, *a, **k):
        compiled.append(type(module).__name__)
        return real_compile(module, *a, **k)

    monkeypatch.setattr(train.Trainer, "step", step)
    monkeypatch.setattr(train.torch, "compile", compile_spy)
    backbone = options.get("backbone", "resnet18")
    _cell(tmp_path, monkeypatch, "full", {}, feature_cache=False, backbone=backbone,
          image_size=options.get("image_size", 16))
    base_loss = seen[0]["loss"]
    assert {s["dtype"] for s in seen} == {torch.float32} and not compiled
    seen.clear()
    ctx = _cell(tmp_path, monkeypatch, "full", {}, feature_cache=False, **options)
    precision = options.get("precision", "fp32")
    want = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert {s["dtype"] for s in seen} == {want}
    assert {s["nhwc"] for s in seen} == {options.get("channels_last", False)}
    model = type(build(backbone, "none", 10).model).__name__
    assert {s["compiled"] for s in seen} == {"OptimizedModule" if options.get("compile")
                                             else model}
    assert bool(compiled) == bool(options.get("compile"))
    assert seen[0]["loss"] == pytest.approx(base_loss, rel=rel)
    if precision == "fp16":  # the scaler started at 2**16 and halved on overflowing steps
        assert {s["scale"] is not None for s in seen} == {True}
        assert seen[-1]["scale"] < 2.0**16
    assert all(math.isfinite(r["train_loss"]) for _, r in ctx.epochs)
    # the steps learn: the model-only steps repeat one synthetic batch, which the network
    # memorises
    model_only = [s["loss"] for s in seen[-(MODEL_ONLY_STEPS + WARMUP_STEPS):]]
    assert model_only[-1] < 0.5 * model_only[0]
    assert ctx.final["model_only_train_images_per_sec"] > 0
    assert ctx.final["inference_images_per_sec"] > 0


# ---- 11. precise BatchNorm --------------------------------------------------------------------
def test_precise_bn_recomputes_only_the_trained_norms():
    """partial[depth=1] on ResNet-18: stage4's BatchNorm statistics become the plain
    average over the batches (mean of batch means, of unbiased batch variances: measured
    here with hooks on an independent pass); every frozen norm's buffers and every
    parameter stay bit for bit; momentum is restored."""
    from strategies.torch_backend.train import recalibrate_bn

    torch.manual_seed(0)
    tb = build("resnet18", "none", NUM_CLASSES)
    phase = registry.Phase(1)
    apply_phase(tb, phase)
    pre = Preprocess(tb.mean, tb.std, CPU)
    rng = np.random.default_rng(0)
    batches = Batches(rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8), np.arange(20) % 3,
                      SIZE, 8, CPU, shuffle=False, seed=0)  # batches of 8, 8 and 4
    before = {k: v.clone() for k, v in tb.model.state_dict().items()}
    trained = {n: m for n, m in tb.model.named_modules()
               if isinstance(m, _BN) and owner_of(tb, n + ".weight") == "stage4"}
    first = next(iter(trained))  # its input comes from frozen blocks only

    assert recalibrate_bn(tb, phase, batches, pre, CPU, "fp32") == len(trained) == 5
    after = tb.model.state_dict()
    for k, v in before.items():
        if k.rsplit(".", 1)[0] in trained:  # this norm's buffers moved, its weights did not
            assert torch.equal(v, after[k]) != k.endswith(("running_mean", "running_var",
                                                           "num_batches_tracked")), k
        else:
            assert torch.equal(v, after[k]), k
    assert all(m.momentum == 0.1 and not m.training for m in trained.values())

    seen = []
    hook = trained[first].register_forward_hook(lambda m, i, o: seen.append(i[0]))
    tb.model.eval()  # frozen blocks below it: the same inputs as in the recalibration
    with torch.no_grad():
        for x, _ in batches:
            tb.model(pre(x, train=False))
    hook.remove()
    means = torch.stack([h.mean((0, 2, 3)) for h in seen])
    varis = torch.stack([h.transpose(0, 1).flatten(1).var(1, unbiased=True) for h in seen])
    assert torch.allclose(trained[first].running_mean, means.mean(0), atol=1e-5)
    assert torch.allclose(trained[first].running_var, varis.mean(0), rtol=1e-4)


@pytest.mark.parametrize("strategy,layers", [("full", "20 BatchNorm layers"),
                                             ("feature_extraction", "no BatchNorm layer")])
def test_precise_bn_cell_trains_the_same_and_says_so(tmp_path, monkeypatch, strategy, layers):
    """A cell with precise_bn trains exactly as one without (the weights' path is
    untouched: a training step normalises by batch statistics); only what is evaluated
    changes. The run says how many layers were recomputed from how many images."""
    off = _cell(tmp_path, monkeypatch, strategy, {}, feature_cache=False)
    on = _cell(tmp_path, monkeypatch, strategy, {}, feature_cache=False, precise_bn=33)
    assert on.tags["precise_bn"].startswith(layers)
    if strategy == "full":  # 33 of the 48 train images, less a lone last one (batch 16)
        assert on.tags["precise_bn"].endswith("from 32 train images")
    for (_, a), (_, b) in zip(off.epochs, on.epochs, strict=True):
        assert a["train_loss"] == b["train_loss"] and a["train_acc"] == b["train_acc"]
    assert on.final["precise_bn_seconds"] > 0 and "precise_bn_seconds" not in off.final
    assert "precise_bn" not in off.tags
    if strategy == "feature_extraction":
        assert on.final["test_loss"] == off.final["test_loss"]
