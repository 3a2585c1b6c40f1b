"""LoRA for the Keras backbones (strategies/lora.py has the method and its choices).

Keras 3's own LoRA, in place on the built layers (no model rebuild: names, owners and the
functional graph stay as they were): `Conv2D.enable_lora` / `Dense.enable_lora` add
`lora_kernel_a` (kh, kw, in, rank) or (in, rank) and `lora_kernel_b` (rank, out), freeze the
kernel, and compute with kernel + (alpha/rank) * A @ B: the PyTorch side's
W + (alpha/rank) * B @ A in Keras' kernel layout, the delta materialised each step (exact
math, as the factorised form PyTorch runs). A is assigned from strategies/lora.py's seeded
draw (Keras' he_uniform default replaced by the paper's init), B starts at zero. `merge`
folds the delta into the kernel and turns LoRA off in the layer: it then computes as a
plain Conv2D / Dense.

A vision transformer (keras_hub): only its attention's query and value projections are
adapted (EinsumDense, kernel (in, heads, head_dim)), by FlatLoRAEinsumDense: one A
(in, rank) as PyTorch's adapter on the same projection, not Keras' own EinsumDense LoRA.
"""

from __future__ import annotations

import keras
import numpy as np

from strategies import lora as common

ADAPTER_NAMES = ("lora_kernel_a", "lora_kernel_b")
# a vision transformer: keras' MultiHeadAttention's query and value projections (EinsumDense)
TRANSFORMER_TARGETS = ("query", "value")


def _leaves(layer):
    subs = list(layer._flatten_layers(include_self=False, recursive=False))
    if not subs:
        yield layer
        return
    for sub in subs:  # nested models (ConvNeXt's stem), composite layers (keras_hub blocks)
        yield from _leaves(sub)


class FlatLoRAEinsumDense(keras.layers.EinsumDense):
    """An attention projection (EinsumDense, kernel (in, heads, head_dim)) with the paper's
    LoRA: one A (in, rank) and B (rank, heads*head_dim), the delta A @ B reshaped to the
    kernel, as PyTorch's adapter on the same projection as one (out, in) matrix. Keras' own
    EinsumDense LoRA keeps the heads axis in A ((in, heads, rank): heads times the
    parameters), another method. Installed by switching a built layer's class (`enable`)."""

    @classmethod
    def enable(cls, la, rank: int, alpha: float) -> None:
        shape = tuple(la._kernel.shape)
        la._tracker.unlock()
        la.lora_kernel_a = la.add_weight(name="lora_kernel_a", shape=(shape[0], rank),
                                         initializer="zeros")
        la.lora_kernel_b = la.add_weight(name="lora_kernel_b",
                                         shape=(rank, int(np.prod(shape[1:]))),
                                         initializer="zeros")
        la._tracker.lock()
        la._kernel.trainable = False
        la.__class__ = cls
        la.lora_rank, la.lora_alpha, la.lora_merged = rank, alpha, False

    @property
    def kernel(self):
        if self.lora_merged:
            return self._kernel
        delta = keras.ops.matmul(self.lora_kernel_a, self.lora_kernel_b)
        scale = self.lora_alpha / self.lora_rank
        return self._kernel + scale * keras.ops.reshape(delta, self._kernel.shape)


def _adapted(la) -> bool:
    if isinstance(la, FlatLoRAEinsumDense):
        return not la.lora_merged
    return getattr(la, "lora_enabled", False)


def adapted_layers(model: keras.Model) -> list[keras.layers.Layer]:
    return [la for top in model.layers for la in _leaves(top) if _adapted(la)]


def install(kb, blocks: list[str], rank: int, alpha: float, seed: int) -> str | None:
    """Enable LoRA on every Conv2D with groups == 1 and every Dense of `blocks` (model order;
    a vision transformer: its attention's query and value projections only), A drawn from
    the cell's seed; add the adapters to kb.parameters; return the `lora` tag,
    or None when the model is adapted already (a later phase)."""
    if adapted_layers(kb.model):
        return None
    gen = common.rng(seed)
    transformer = kb.block_map.family == "vit"
    adapted, skipped, n_params, paths = {"conv": 0, "linear": 0}, 0, 0, set()
    for block in blocks:
        for top in kb.block_layers(block):
            for la in _leaves(top):
                if transformer and not (isinstance(la, keras.layers.EinsumDense)
                                        and la.name in TRANSFORMER_TARGETS):
                    continue
                if isinstance(la, keras.layers.Conv2D) and la.groups == 1:
                    kind = "conv"
                elif isinstance(la, keras.layers.Dense | keras.layers.EinsumDense):
                    kind = "linear"
                else:
                    skipped += isinstance(la, keras.layers.Conv2D | keras.layers.DepthwiseConv2D)
                    continue
                if isinstance(la, keras.layers.EinsumDense):
                    FlatLoRAEinsumDense.enable(la, rank, alpha)
                else:
                    la.enable_lora(rank, lora_alpha=alpha, a_initializer="zeros")
                shape = tuple(la._kernel.shape)  # (kh, kw, in, out), (in, out), (in, h, d)
                fan_in = shape[0] if transformer else int(np.prod(shape[:-1]))
                a = common.init_a(gen, rank, fan_in)
                if kind == "conv":  # PyTorch's (rank, in, kh, kw) order -> (kh, kw, in, rank)
                    a = a.reshape(rank, shape[2], shape[0], shape[1]).transpose(2, 3, 1, 0)
                else:  # Dense (in, out), EinsumDense (in, heads, head_dim): A is (in, rank)
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
        delta = delta.reshape(la._kernel.shape)  # an attention projection's (in, h, d)
        la._kernel.assign((la._kernel.numpy() + delta).astype(la._kernel.dtype))
        if isinstance(la, FlatLoRAEinsumDense):
            la.lora_merged = True
        else:
            la.lora_enabled = False
    if found:
        model.predict_function = None
    return len(found)
