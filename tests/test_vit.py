"""Vision transformers from one Hugging Face checkpoint in both frameworks, and the
parameter-efficient methods on them (strategies/transformers.py, torch_backend/vit.py,
keras_backend/vit.py).

The checkpoint is written here in the Hub's own layout (`ViTModel.save_pretrained`: config.json
and model.safetensors, random weights), read by transformers in PyTorch and by keras_hub's
converter in Keras (a subprocess: torch and tensorflow never share one). Both must give the
same class-token features, at the checkpoint's size and at another (position embeddings
resized); every strategy must train the same parameters, block by block, in both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from bench.config.grid import GridError, from_dict
from bench.paths import ROOT
from strategies import registry
from strategies import transformers as tr
from tests.helpers import keras_script_results

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from strategies.torch_backend import backbones, cache  # noqa: E402
from strategies.torch_backend import lora as torch_lora  # noqa: E402
from strategies.torch_backend.train import apply_phase  # noqa: E402

FEATURE_TOL = 1e-4  # float32, measured ~2e-6 (different matmul orders, erf-GELU in both)
SIZES = (32, 48)  # vit_tiny's checkpoint size, and one its position embeddings resize to
# strategy selector -> params, every strategy that makes sense on a transformer
CASES = {
    "feature_extraction": ("feature_extraction", {}),
    "partial": ("partial", {"depth": 2}),
    "full": ("full", {}),
    "llrd": ("llrd", {}),
    "bitfit": ("bitfit", {}),
    "norm": ("norm", {}),
    "lora": ("lora", {"depth": "all", "rank": 4}),
    "vpt_deep": ("vpt", {"length": 3}),
    "vpt_shallow": ("vpt", {"length": 3, "deep": False}),
    "adapter": ("adapter", {"width": 8}),
}


def _write_checkpoint(name: str, folder) -> None:
    """A checkpoint in the Hub's layout: transformers' random init saved by save_pretrained."""
    from strategies.torch_backend.vit import vit_model

    torch.manual_seed(1)
    vit_model(name, "none", tr.info(name).image_size).save_pretrained(folder)
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vit_tiny_hub")
    _write_checkpoint("vit_tiny", folder)
    return folder


@pytest.fixture(scope="module")
def dinov2(tmp_path_factory):
    """DINOv2 ViT-S/14's architecture at its published 518 px, random weights; run at 56 px
    (4x4 patches: the position embeddings resized from 37x37)."""
    folder = tmp_path_factory.mktemp("dinov2_hub")
    _write_checkpoint("dinov2_s14", folder)
    return folder


def _images(size: int) -> np.ndarray:
    return np.random.default_rng(size).integers(0, 256, (3, size, size, 3), dtype=np.uint8)


def _torch_features(folder, size: int, additions=None, name: str = "vit_tiny") -> np.ndarray:
    tb = backbones.build(name, str(folder), 5, image_size=size, additions=additions)
    tb.model.eval()
    x = torch.from_numpy(_images(size)).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(tb.mean)[:, None, None]) / torch.tensor(tb.std)[:, None, None]
    with torch.no_grad():
        return cache.head_inputs(tb, x).numpy()


KERAS = textwrap.dedent("""
    import json, sys
    import numpy as np
    import keras
    from strategies import registry
    from strategies.keras_backend.backbones import build
    from strategies.keras_backend.train import apply_phase
    from strategies.keras_backend import lora
    folder, sizes, cases = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    backbone = BACKBONE
    out = {"features": {}, "sets": {}}
    for size in sizes:
        x = np.random.default_rng(size).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
        kb = build(backbone, folder, 5, image_size=size)
        feats = keras.Model(kb.model.inputs, kb.model.get_layer("vit_norm").output)
        out["features"][str(size)] = feats(x).numpy().tolist()
    size = sizes[0]
    x = np.random.default_rng(0).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    for case, (name, params) in cases.items():
        strat = registry.get(name)
        kb = build(backbone, folder, 5, image_size=size, additions=strat.additions(params))
        (phase, _), = strat.phases(params, 1, len(kb.blocks))
        trained = {v.path for v in apply_phase(kb, phase, seed=0)}
        owner = kb.weight_owner()
        counts = {}
        for path, var in ((v.path, v) for v in kb.model.weights):
            if path in trained:
                counts[owner[path]] = counts.get(owner[path], 0) + int(np.prod(var.shape))
        entry = {"counts": counts}
        if name == "lora":
            before = kb.model(x).numpy()
            for v in kb.model.trainable_weights:  # move B off zero: a delta to merge
                if v.name == "lora_kernel_b":
                    v.assign(np.full(v.shape, 0.01, "float32"))
            unmerged = kb.model(x).numpy()
            entry["merged"] = lora.merge(kb.model)
            entry["merge_diff"] = float(np.abs(kb.model(x).numpy() - unmerged).max())
            entry["moved"] = float(np.abs(unmerged - before).max())
        out["sets"][case] = entry
    print("RESULT " + json.dumps(out))
""")


def _keras(backbone: str, folder, sizes, cases) -> dict:
    return keras_script_results(
        KERAS.replace("sys.argv[1]", repr(str(folder)))
        .replace("sys.argv[2]", repr(json.dumps(sizes)))
        .replace("sys.argv[3]", repr(json.dumps(cases))).replace("BACKBONE", repr(backbone)))


@pytest.fixture(scope="module")
def keras_side(checkpoint):
    return _keras("vit_tiny", checkpoint, SIZES, CASES)


DINO_CASES = {k: CASES[k] for k in ("full", "bitfit", "norm", "lora", "vpt_deep", "adapter")}


@pytest.fixture(scope="module")
def keras_dinov2(dinov2):
    return _keras("dinov2_s14", dinov2, [56], DINO_CASES)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("size", SIZES)
def test_one_checkpoint_gives_the_same_features_in_both_frameworks(checkpoint, keras_side,
                                                                   size):
    assert keras_side["rc"] == 0, keras_side["stderr"]
    ours = _torch_features(checkpoint, size)
    theirs = np.array(keras_side["features"][str(size)], dtype=np.float32)
    assert ours.shape == theirs.shape == (3, 128)
    assert np.abs(ours - theirs).max() < FEATURE_TOL


@pytest.mark.timeout(120)
def test_torch_side_is_transformers_vitmodel_and_its_interpolation(checkpoint):
    from transformers import ViTModel

    hf = ViTModel.from_pretrained(str(checkpoint), add_pooling_layer=False).eval()
    for size in SIZES:
        x = torch.from_numpy(_images(size)).permute(0, 3, 1, 2).float() / 255
        with torch.no_grad():
            ref = hf(pixel_values=(x - 0.5) / 0.5,
                     interpolate_pos_encoding=size != 32).last_hidden_state[:, 0].numpy()
        # at 32: the same modules, bit for bit; at 48: resized once instead of per forward
        assert np.abs(_torch_features(checkpoint, size) - ref).max() < (
            1e-5 if size != 32 else 1e-7)


@pytest.mark.timeout(400)
def test_dinov2_same_features_and_trainable_sets_in_both_frameworks(dinov2, keras_dinov2):
    assert keras_dinov2["rc"] == 0, keras_dinov2["stderr"]
    ours = _torch_features(dinov2, 56, name="dinov2_s14")
    theirs = np.array(keras_dinov2["features"]["56"], dtype=np.float32)
    assert ours.shape == theirs.shape == (3, 384)
    assert np.abs(ours - theirs).max() < FEATURE_TOL
    for case, (name, params) in DINO_CASES.items():
        counts = _torch_counts(dinov2, name, params, "dinov2_s14", 56)
        assert counts == keras_dinov2["sets"][case]["counts"], case
        assert counts["head"] == 384 * 5 + 5
    assert keras_dinov2["sets"]["lora"]["merged"] == 24  # query and value in 12 blocks


def test_position_resize_is_torchs_bicubic():
    pos = np.random.default_rng(0).normal(size=(1, 1 + 7 * 7, 6)).astype(np.float32)
    for grid in (4, 7, 12):
        ours = tr.resize_position_embeddings(pos, grid)
        patches = torch.from_numpy(pos[:, 1:]).reshape(1, 7, 7, 6).permute(0, 3, 1, 2)
        ref = torch.nn.functional.interpolate(patches, size=(grid, grid), mode="bicubic",
                                              align_corners=False)
        ref = ref.permute(0, 2, 3, 1).reshape(1, grid * grid, 6).numpy()
        assert np.allclose(ours[:, 1:], ref, atol=1e-5) and np.array_equal(ours[:, :1],
                                                                          pos[:, :1])


def _torch_counts(folder, name: str, params: dict, backbone: str = "vit_tiny",
                  size: int = 32) -> dict:
    strat = registry.get(name)
    tb = backbones.build(backbone, str(folder), 5, image_size=size,
                         additions=strat.additions(params))
    (phase, _), = strat.phases(params, 1, len(tb.block_map.blocks))
    trained = {id(p) for p in apply_phase(tb, phase, seed=0)}
    owner, counts = tb.param_owner(), {}
    for n, p in tb.model.named_parameters():
        if id(p) in trained:
            counts[owner[n]] = counts.get(owner[n], 0) + p.numel()
    return counts


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_strategy_trains_the_same_parameters_in_both_frameworks(checkpoint, keras_side,
                                                                      case):
    assert keras_side["rc"] == 0, keras_side["stderr"]
    name, params = CASES[case]
    ours = _torch_counts(checkpoint, name, params)
    assert ours == keras_side["sets"][case]["counts"]
    assert ours["head"] == 128 * 5 + 5
    blocks = [b for b in ours if b != "head"]
    expected_blocks = {"feature_extraction": [], "partial": ["block5", "block6"],
                       "vpt_shallow": ["block1"]}.get(case)
    if expected_blocks is not None:
        assert blocks == expected_blocks
    elif case not in ("lora", "vpt_deep", "adapter", "norm"):  # those: blocks 1-6 only
        assert "embed" in blocks and len(blocks) == 7
    else:
        assert blocks == [f"block{i}" for i in range(1, 7)]


@pytest.mark.timeout(300)
def test_lora_on_attention_merges_to_the_same_outputs(checkpoint, keras_side):
    # Keras: 12 projections (query, value in 6 blocks) merged; logits unchanged by merging
    k = keras_side["sets"]["lora"]
    assert k["merged"] == 12 and k["moved"] > 1e-3 and k["merge_diff"] < 1e-5
    strat = registry.get("lora")
    tb = backbones.build("vit_tiny", str(checkpoint), 5, image_size=32)
    (phase, _), = strat.phases({"depth": "all", "rank": 4}, 1, 7)
    apply_phase(tb, phase, seed=0)
    names = [n for n, m in tb.model.named_modules() if isinstance(m, torch_lora._LoRA)]
    assert len(names) == 12 and all(n.endswith(("q_proj", "v_proj")) for n in names)
    tb.model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for m in torch_lora.adapters(tb.model):
            m.lora_B.fill_(0.01)
        unmerged = tb.model(x)
        assert torch_lora.merge(tb.model) == 12
        assert (tb.model(x) - unmerged).abs().max().item() < 1e-5


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", ["vpt_deep", "adapter", "lora"])
def test_a_step_moves_the_new_parameters_and_leaves_the_backbone_bit_identical(checkpoint,
                                                                               case):
    name, params = CASES[case]
    strat = registry.get(name)
    tb = backbones.build("vit_tiny", str(checkpoint), 5, image_size=32,
                         additions=strat.additions(params))
    (phase, _), = strat.phases(params, 1, 7)
    trained = apply_phase(tb, phase, seed=0)
    before = {n: p.detach().clone() for n, p in tb.model.named_parameters()}
    opt = torch.optim.Adam(trained, lr=1e-2)
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(tb.model(torch.randn(4, 3, 32, 32)),
                                                 torch.arange(4) % 5)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ids = {id(p) for p in trained}
    for n, p in tb.model.named_parameters():
        if id(p) in ids:
            assert not torch.equal(before[n], p), n  # every trained tensor moved
        else:
            assert torch.equal(before[n], p), n  # every frozen one bit for bit


@pytest.mark.timeout(120)
def test_the_prefix_cache_cuts_a_transformer_after_every_block(checkpoint):
    strat = registry.get("vpt")
    tb = backbones.build("vit_tiny", str(checkpoint), 5, image_size=32,
                         additions=strat.additions({"length": 2}))
    tb.model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        whole = tb.model(x)
        for n_frozen in range(1, 8):
            prefix, suffix = cache.split_after(tb, n_frozen)
            assert torch.equal(suffix(prefix(x)), whole), n_frozen


@pytest.mark.timeout(120)
def test_vit_b16_counts_match_the_published_ones():
    """ViT-B/16's trainable parameters (backbone, head excluded) for LoRA r=8 on q and v,
    BitFit and VPT: V-PETL Bench (Xin et al., NeurIPS 2024 D&B) Table 2 lists LoRA 0.29M
    and BitFit 0.10M; VPT's count is length x width per prompted block (Jia et al. 2022)."""
    want = {("lora", (("rank", 8), ("depth", "all"))): 294_912,  # 12 x 2 x (8x768 + 768x8)
            ("bitfit", ()): 102_912,  # every bias and LayerNorm beta
            ("vpt", (("length", 10),)): 92_160,  # 12 x 10 x 768 (deep)
            ("vpt", (("length", 10), ("deep", False))): 7_680}
    tb0 = backbones.build("vit_b16", "none", 2, image_size=224)
    head = sum(p.numel() for p in tb0.head.parameters())
    for (name, params), n in want.items():
        strat = registry.get(name)
        params = dict(params)
        tb = tb0 if name not in ("vpt",) else backbones.build(
            "vit_b16", "none", 2, image_size=224, additions=strat.additions(params))
        (phase, _), = strat.phases(params, 1, 13)
        trained = apply_phase(tb, phase, seed=0)
        assert sum(p.numel() for p in trained) - head == n, (name, params)
        if name == "lora":
            tb0 = backbones.build("vit_b16", "none", 2, image_size=224)  # without adapters


def _grid(axes: dict, defaults: dict | None = None):
    return from_dict({"axes": {"framework": ["torch"], "dataset": ["digits"], **axes},
                      "defaults": defaults or {"image_size": 32, "weights": "none"}},
                     "x.toml")


def test_transformer_methods_and_sizes_are_checked_before_any_work():
    with pytest.raises(GridError) as e:
        _grid({"backbone": ["resnet18"], "strategy": ["vpt"]})
    assert "vpt inserts into transformer blocks" in str(e.value)
    assert "vit_tiny" in str(e.value) and "strategy" in str(e.value)
    with pytest.raises(GridError) as e:
        _grid({"backbone": ["vit_tiny"], "strategy": ["adapter"]}, {"image_size": 30})
    assert "image_size = 30" in str(e.value) and "4x4 patches" in str(e.value)
    with pytest.raises(GridError) as e:
        _grid({"backbone": ["vit_tiny"], "strategy": ["vpt[length=0]"]})
    assert "length" in str(e.value)
    (ok,) = _grid({"backbone": ["vit_tiny"], "strategy": ["vpt[length=4,deep=false]"]}).specs
    assert ok.additions() == {"prompts": (4, False)}


@pytest.mark.timeout(120)
def test_published_weights_offline_with_an_empty_cache_name_the_file_and_folder(tmp_path):
    script = ("from strategies.torch_backend.backbones import build\n"
              "build('vit_b16', 'imagenet', 2, image_size=224)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=100, cwd=ROOT)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "CheckpointUnavailable" in last and "config.json" in last
    assert str(tmp_path / "hf" / "hub" / "models--google--vit-base-patch16-224-in21k") in last


@pytest.mark.timeout(60)
def test_a_backbone_checkpoint_loads_into_a_model_with_prompts_and_adapters(tmp_path):
    plain = backbones.build("vit_tiny", "none", 5, image_size=32)
    backbones.save_backbone(plain, tmp_path / "b.ckpt")
    extra = backbones.build("vit_tiny", "pretrained:x", 5, image_size=32,
                            additions={"prompts": (2, True), "adapters": 4})
    fresh = {n: p.detach().clone() for n, p in extra.model.named_parameters()
             if tr.is_addition(n)}
    assert len(fresh) == 6 + 6 * 4  # a prompt per block, 4 tensors per adapter
    backbones.load_backbone(extra, tmp_path / "b.ckpt")
    state = extra.model.state_dict()
    for n, p in plain.model.state_dict().items():
        if not n.startswith("head"):
            assert torch.equal(state[n], p), n  # the backbone loaded
    for n, p in fresh.items():
        assert torch.equal(state[n], p), n  # the methods' own kept their init
    del plain.model.layers[5]  # a checkpoint missing a real block is still refused
    backbones.save_backbone(plain, tmp_path / "short.ckpt")
    with pytest.raises(ValueError, match="missing.*layers.5"):
        backbones.load_backbone(extra, tmp_path / "short.ckpt")


def test_a_checkpoint_folder_is_a_transformers_weights_path(tmp_path, monkeypatch):
    """`weights = "<path>"` for a transformer is a checkpoint folder (what its backends read);
    a file, another architecture's folder, or a folder given to a CNN is refused at load."""
    folder = tmp_path / "ckpt"
    _write_checkpoint("vit_tiny", folder)
    defaults = {"image_size": 32, "weights": str(folder)}
    (spec,) = _grid({"backbone": ["vit_tiny"], "strategy": ["full"]}, defaults).specs
    assert spec.weights == str(folder)
    with pytest.raises(GridError) as e:  # a weights file, as a CNN takes
        _grid({"backbone": ["vit_tiny"], "strategy": ["full"]},
              {**defaults, "weights": str(folder / "model.safetensors")})
    assert "weights = " in str(e.value) and "config.json and model.safetensors" in str(e.value)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))
    with pytest.raises(GridError) as e:  # another width
        _grid({"backbone": ["vit_tiny"], "strategy": ["full"]}, defaults)
    assert "hidden_size = 64 (expected 128)" in str(e.value)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(GridError) as e:
        _grid({"backbone": ["resnet18"], "strategy": ["full"]}, defaults)
    assert "resnet18 loads a weights file" in str(e.value)
    monkeypatch.setenv("HOME", str(tmp_path))  # '~' is the user's folder on both sides
    (spec,) = _grid({"backbone": ["vit_tiny"], "strategy": ["full"]},
                    {**defaults, "weights": "~/ckpt"}).specs
    tb = backbones.build("vit_tiny", spec.weights, 5, image_size=32)
    assert torch.equal(tb.model.embeddings.cls_token,
                       backbones.build("vit_tiny", str(folder), 5, image_size=32)
                       .model.embeddings.cls_token)


def test_imagenet_weights_on_a_transformer_with_none_published_are_refused_at_load():
    with pytest.raises(GridError) as e:
        _grid({"backbone": ["vit_tiny"], "strategy": ["full"]},
              {"image_size": 32, "weights": "imagenet"})
    assert "weights = 'imagenet': vit_tiny has no published weights" in str(e.value)
    assert "'pretrained:<dataset>'" in str(e.value)
    (spec,) = _grid({"backbone": ["vit_b16"], "strategy": ["full"]},
                    {"image_size": 224, "weights": "imagenet"}).specs  # published: fetched
    assert spec.weights == "imagenet"                                # when the cell runs
