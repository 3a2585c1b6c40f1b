"""LoRA for torchvision backbones (strategies/lora.py has the method and its choices).

An adapted nn.Conv2d / nn.Linear is replaced, in place in its parent, by a LoRAConv2d /
LoRALinear: a subclass that keeps the original `weight` and `bias` Parameter objects (same
names, so the block map's owner prefixes and the frozen weights stay what they were) and adds
`lora_A` (rank, in*kh*kw) and `lora_B` (out, rank). The forward is the standard factorised
conv-LoRA: conv(x, W) + (alpha/rank) * conv1x1(conv(x, A as (rank, in, kh, kw)), B), A taking
W's stride, padding and dilation: exactly conv(x, W + (alpha/rank) * (B @ A) reshaped), at
rank channels' cost instead of materialising the delta every step. `merge()` folds the delta
into W; the merged layer computes as the plain one.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from strategies import lora as common
from strategies.transformers import TRANSFORMERS

TRANSFORMER_TARGETS = ("q_proj", "v_proj")  # transformers' ViTAttention, in memory


class _LoRA:
    rank: int
    scale: float
    merged: bool

    def _init_lora(self, gen, rank: int, alpha: float, out: int, fan_in: int) -> None:
        dev, dtype = self.weight.device, self.weight.dtype
        self.rank, self.scale, self.merged = rank, alpha / rank, False
        a = torch.from_numpy(common.init_a(gen, rank, fan_in)).to(dev, dtype)
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros(out, rank, device=dev, dtype=dtype))

    def delta(self) -> torch.Tensor:
        """(alpha/rank) * B @ A in W's shape."""
        return (self.scale * (self.lora_B @ self.lora_A)).reshape(self.weight.shape)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.weight.add_(self.delta().to(self.weight.dtype))
            self.merged = True


class LoRAConv2d(_LoRA, nn.Conv2d):
    """Also for a subclass of nn.Conv2d with its own padding rule (EfficientNet-Lite0's
    SameConv2d): it declares `conv_with(x, weight, bias)`, and the wrapper becomes a
    subclass of it, both paths running through that rule."""

    @classmethod
    def wrap(cls, conv: nn.Conv2d, gen, rank: int, alpha: float) -> LoRAConv2d:
        if type(conv) is not nn.Conv2d:
            cls = _subclass_for(type(conv))
        new = cls.__new__(cls)
        new.__dict__.update(conv.__dict__)  # the same Parameters, buffers, hyperparameters
        new._parameters = dict(conv._parameters)
        new._init_lora(gen, rank, alpha, conv.out_channels,
                       conv.weight[0].numel())
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = getattr(self, "conv_with", None) or self._conv_forward
        out = conv(x, self.weight, self.bias)
        if self.merged:
            return out
        a = self.lora_A.reshape(self.rank, *self.weight.shape[1:])
        low = conv(x, a, None)  # W's stride, padding, dilation
        return out + self.scale * F.conv2d(low, self.lora_B[:, :, None, None])


_SUBCLASSES: dict[type, type] = {}


def _subclass_for(base: type) -> type:
    """LoRAConv2d over a Conv2d subclass that says how it convolves (conv_with)."""
    if not callable(getattr(base, "conv_with", None)):
        raise TypeError(f"{base.__name__} subclasses nn.Conv2d without conv_with(x, weight, "
                        f"bias): a LoRA adapter cannot follow its forward")
    if base not in _SUBCLASSES:
        _SUBCLASSES[base] = type(f"LoRA{base.__name__}", (LoRAConv2d, base), {})
    return _SUBCLASSES[base]


def _adaptable_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and not isinstance(m, _LoRA) and (
        type(m) is nn.Conv2d or callable(getattr(type(m), "conv_with", None)))


class LoRALinear(_LoRA, nn.Linear):
    @classmethod
    def wrap(cls, linear: nn.Linear, gen, rank: int, alpha: float) -> LoRALinear:
        new = cls.__new__(cls)
        new.__dict__.update(linear.__dict__)
        new._parameters = dict(linear._parameters)
        new._init_lora(gen, rank, alpha, linear.out_features, linear.in_features)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.merged:
            return out
        return out + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)


def adapters(model: nn.Module) -> list[_LoRA]:
    return [m for m in model.modules() if isinstance(m, _LoRA)]


def install(tb, blocks: list[str], rank: int, alpha: float, seed: int) -> str | None:
    """Replace every non-grouped nn.Conv2d and every nn.Linear under `blocks` (input to
    output order; a vision transformer: its attention's query and value projections only,
    the paper's choice) by its LoRA wrapper, A drawn from the cell's seed; return the `lora` tag,
    or None when the blocks are adapted already (a later phase)."""
    if adapters(tb.model):
        return None
    gen = common.rng(seed)
    targets = TRANSFORMER_TARGETS if tb.name in TRANSFORMERS else None
    adapted, skipped, n_params = {"conv": 0, "linear": 0}, 0, 0
    for block in blocks:
        for prefix in tb.block_map.blocks[block]:
            root = tb.model.get_submodule(prefix)
            for name, m in list(root.named_modules()):
                if targets is not None and name.rsplit(".", 1)[-1] not in targets:
                    continue
                if _adaptable_conv(m) and m.groups == 1:
                    new, kind = LoRAConv2d.wrap(m, gen, rank, alpha), "conv"
                elif type(m) is nn.Linear:
                    new, kind = LoRALinear.wrap(m, gen, rank, alpha), "linear"
                elif isinstance(m, nn.Conv2d) and not _adaptable_conv(m):
                    raise TypeError(f"{tb.name}: {type(m).__name__} at {prefix}.{name} "
                                    f"cannot take a LoRA adapter (no conv_with)")
                else:
                    skipped += isinstance(m, nn.Conv2d)
                    continue
                full = f"{prefix}.{name}" if name else prefix
                parent, _, attr = full.rpartition(".")
                setattr(tb.model.get_submodule(parent), attr, new)
                adapted[kind] += 1
                n_params += new.lora_A.numel() + new.lora_B.numel()
    return common.summary(rank, alpha, adapted, skipped, blocks, n_params)


def merge(model: nn.Module) -> int:
    """Fold every adapter into its weight; return how many."""
    found = adapters(model)
    for m in found:
        m.merge()
    return len(found)
