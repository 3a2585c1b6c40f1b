"""LoRA for keras.applications backbones (strategies/lora.py has the method and its choices).

Keras 3's own LoRA, in place on the built layers (no model rebuild: names, owners and the
functional graph stay as they were): `Conv2D.enable_lora` / `Dense.enable_lora` add
`lora_kernel_a` (kh, kw, in, rank) or (in, rank) and `lora_kernel_b` (rank, out), freeze the
kernel, and compute with kernel + (alpha/rank) * A @ B: the PyTorch side's
W + (alpha/rank) * B @ A in Keras' kernel layout, the delta materialised each step (exact
math, as the factorised form PyTorch runs). A is assigned from strategies/lora.py's seeded
draw (Keras' he_uniform default replaced by the paper's init), B starts at zero. `merge`
folds the delta into the kernel and turns LoRA off in the layer: it then computes as a
plain Conv2D / Dense.
"""

from __future__ import annotations

import keras
import numpy as np

from strategies import lora as common

ADAPTER_NAMES = ("lora_kernel_a", "lora_kernel_b")


def _leaves(layer):
    subs = getattr(layer, "layers", None)
    if not subs:
        yield layer
        return
    for sub in subs:  # nested models (ConvNeXt's stem, downsampling)
        yield from _leaves(sub)


def adapted_layers(model: keras.Model) -> list[keras.layers.Layer]:
    return [la for top in model.layers for la in _leaves(top)
            if getattr(la, "lora_enabled", False)]


def install(kb, blocks: list[str], rank: int, alpha: float, seed: int) -> str | None:
    """Enable LoRA on every Conv2D with groups == 1 and every Dense of `blocks` (model order),
    A drawn from the cell's seed; add the adapters to kb.parameters; return the `lora` tag,
    or None when the model is adapted already (a later phase)."""
    if adapted_layers(kb.model):
        return None
    gen = common.rng(seed)
    adapted, skipped, n_params, paths = {"conv": 0, "linear": 0}, 0, 0, set()
    for block in blocks:
        for top in kb.block_layers(block):
            for la in _leaves(top):
                if isinstance(la, keras.layers.Conv2D) and la.groups == 1:
                    kind = "conv"
                elif isinstance(la, keras.layers.Dense):
                    kind = "linear"
                else:
                    skipped += isinstance(la, keras.layers.Conv2D | keras.layers.DepthwiseConv2D)
                    continue
                la.enable_lora(rank, lora_alpha=alpha, a_initializer="zeros")
                shape = tuple(la._kernel.shape)  # (kh, kw, in, out) or (in, out)
                a = common.init_a(gen, rank, int(np.prod(shape[:-1])))
                if kind == "conv":  # PyTorch's (rank, in, kh, kw) order -> (kh, kw, in, rank)
                    a = a.reshape(rank, shape[2], shape[0], shape[1]).transpose(2, 3, 1, 0)
                else:
                    a = a.T
                la.lora_kernel_a.assign(a)
                adapted[kind] += 1
                n_params += int(la.lora_kernel_a.numpy().size + la.lora_kernel_b.numpy().size)
                paths |= {la.lora_kernel_a.path, la.lora_kernel_b.path}
    kb.parameters = kb.parameters | paths
    return common.summary(rank, alpha, adapted, skipped, blocks, n_params)


def merge(model: keras.Model) -> int:
    """Fold every adapter into its kernel (float32) and switch LoRA off in the layer;
    return how many. The model's predict function is traced again on its next call."""
    found = adapted_layers(model)
    for la in found:
        a, b = la.lora_kernel_a.numpy(), la.lora_kernel_b.numpy()
        delta = (la.lora_alpha / la.lora_rank) * np.tensordot(a, b, axes=1)
        la._kernel.assign((la._kernel.numpy() + delta).astype(la._kernel.dtype))
        la.lora_enabled = False
    if found:
        model.predict_function = None
    return len(found)
