"""LoRA on CNN backbones (Hu et al., ICLR 2022), the part both backends share.

A convolution with weight W (out, in, kh, kw) or a linear layer with W (out, in) in an
adapted block gets two new parameters, A (rank, in*kh*kw) and B (out, rank), and computes
with W + (alpha/rank) * (B @ A) reshaped to W's shape; W (and its bias) stays frozen. B starts
at zero, so the adapted model starts equal to the original; A starts as the paper's
reference implementation (loralib) does, kaiming-uniform with a = sqrt(5), i.e. uniform in
+-1/sqrt(fan_in), drawn here from numpy with the cell's seed, one generator through the
adapted layers in model order, so a rerun is bit-identical in either framework.

Grouped and depthwise convolutions (groups > 1; Keras' DepthwiseConv2D) are not adapted,
in both frameworks: their weight is not one (out, in*kh*kw) matrix, and a per-group delta
would be another method than the paper's. Their weights stay frozen like the rest of the
backbone. BatchNorm in the adapted blocks runs in inference mode (the strategy's bn is
'frozen'): the backbone's state is untouched, only A, B and the head change.

For the inference-speed measurement (the last thing a cell does) the adapters are merged:
W <- W + (alpha/rank) * B @ A, after which the layers compute as plain layers.
"""

from __future__ import annotations

import math

import numpy as np

ADAPTER_NAMES = ("lora_A", "lora_B")  # PyTorch parameter names (Keras: lora_kernel_a/_b)


def rng(seed: int) -> np.random.Generator:
    """The generator the adapters' A matrices are drawn from, layer after layer."""
    return np.random.default_rng([seed, 0x10BA])


def init_a(gen: np.random.Generator, rank: int, fan_in: int) -> np.ndarray:
    """A (rank, fan_in), float32: kaiming_uniform_(a=sqrt(5)) as loralib's reset_parameters,
    bound = gain * sqrt(3 / fan_in) with gain = sqrt(2 / (1 + 5)): 1 / sqrt(fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)
    return gen.uniform(-bound, bound, size=(rank, fan_in)).astype(np.float32)


def summary(rank: int, alpha: float, adapted: dict[str, int], skipped: int,
            blocks: list[str], n_params: int) -> str:
    """The `lora` tag: what was adapted where."""
    kinds = ", ".join(f"{n} {k}" for k, n in adapted.items() if n)
    return (f"rank={rank}, alpha={alpha:g} (scale {alpha / rank:g}): "
            f"{sum(adapted.values())} layers adapted ({kinds or 'none'}) in "
            f"{'+'.join(blocks)}, {n_params} adapter parameters; {skipped} grouped/depthwise "
            f"convolutions left frozen; BatchNorm frozen (inference mode)")
