"""The Keras training loop: apply a strategy's phases to a backbone, compile, fit, evaluate.

Frozen means frozen, as on the PyTorch side: a frozen block's layers get `trainable = False`
(no gradients, and Keras runs a non-trainable BatchNorm in inference mode) and its BatchNorm and
Dropout layers are pinned to inference mode (PinnableBatchNormalization / PinnableDropout), so
neither its weights nor its BatchNorm moving statistics move, and EfficientNet's stochastic
depth is off in it, as PyTorch's eval(). `bn="frozen"` pins the BatchNorm layers of the
trainable blocks too while their gamma/beta stay trainable: exactly PyTorch's `bn.eval()` with
`requires_grad=True` (Keras' usual recipe, `bn.trainable = False`, would freeze gamma/beta too).
A phase with `only` (bitfit, norm) sets `Variable.trainable` per variable inside its trainable
layers (Keras 3's `trainable_weights` honours it); the layers stay trainable, so their
BatchNorm follows `bn` as in PyTorch. A LoRA phase (only='lora') first enables Keras' LoRA on
the trainable blocks' Conv2D and Dense layers (lora.py) and trains the adapters alone, with
the head.

Pinning cannot be done with `model(x, training=False)` on a sub-model: in Keras 3 a functional
model passes its own `training` value to every layer it calls, overriding a `training=False`
written into the graph (checked in tests/test_keras_backend.py), which is why the layers carry
the switch themselves. The model is recompiled after every phase change: compile() drops the
traced train step, so the next fit() traces one with the new trainable set and pinned layers.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from bench.cell.loop import Diverged
from bench.cell.timing import StepMeter
from strategies.keras_backend import lora
from strategies.keras_backend.backbones import (
    KerasBackbone,
    PinnableBatchNormalization,
    PinnableDropout,
)
from strategies.registry import ONLY, Phase, block_lr_scales, phase_blocks

TORCH_ADAM_EPSILON = 1e-8  # torch.optim.Adam/AdamW's default (Keras': 1e-7)
_AFFINE_NORMS = (keras.layers.BatchNormalization, keras.layers.LayerNormalization,
                 keras.layers.GroupNormalization)


def trainable_blocks(kb: KerasBackbone, phase: Phase) -> list[str]:
    return phase_blocks(phase, kb.blocks, kb.name)


def selected(layer: keras.layers.Layer, variable, only: str) -> bool:
    """Whether a phase with `only` (registry.ONLY) trains `variable` of leaf `layer`, as
    PyTorch's selected_parameters: biases = every `bias` (convolutions, dense layers) and the
    norm layers' `beta` (PyTorch's norm `bias`); norm = the norm layers' gamma and beta."""
    if only == "all":
        return True
    norm = isinstance(layer, _AFFINE_NORMS)
    if only == "bias":
        return variable.name == ("beta" if norm else "bias")
    if only == "norm":
        return norm and variable.name in ("gamma", "beta")
    if only == "lora":
        return variable.name in lora.ADAPTER_NAMES
    if only == "prompt":  # VPT's tokens (keras_backend/vit.py Prompt)
        return variable.name == "prompt"
    if only == "adapter":  # the bottleneck adapters (vit.py Adapter)
        return variable.name.startswith("adapter_")
    raise ValueError(f"unknown only={only!r}; allowed: {', '.join(ONLY)}")


def _sublayers(layer: keras.layers.Layer):
    """The layer and every layer inside it: nested models (ConvNeXt's stem, downsampling) and
    composite layers (keras_hub's transformer blocks: attention, MLP, LayerNorms)."""
    yield layer
    for sub in layer._flatten_layers(include_self=False, recursive=False):
        yield from _sublayers(sub)


def apply_phase(kb: KerasBackbone, phase: Phase, seed: int = 0) -> list:
    """Set `trainable` and the pinned layers for the phase; return the trainable variables
    (the head's unless the phase freezes it). Recompile the model afterwards. A LoRA phase
    adds its adapters first (once; A drawn from `seed`, the cell's), their summary in
    kb.notes['lora']."""
    if phase.lora is not None:
        tag = lora.install(kb, trainable_blocks(kb, phase), *phase.lora, seed=seed)
        if tag:
            kb.notes["lora"] = tag
    unfrozen = set(trainable_blocks(kb, phase)) | ({"head"} if phase.train_head else set())
    for layer in kb.model.layers:
        trainable = kb.owner[layer.name] in unfrozen
        # False first: Keras 3 resets its variables' flags only when `trainable` is assigned
        # a new value, and an earlier phase with `only` (lora, bitfit) left some False
        layer.trainable = False
        layer.trainable = trainable
        only = "all" if kb.owner[layer.name] == "head" else phase.only
        for sub in _sublayers(layer):
            if trainable:  # per-variable trainability of the layer's own variables (a
                # composite's too: keras_hub's class token sits on its embedding layer)
                for v in sub._trainable_variables:  # trainable = True made them all True
                    v.trainable = selected(sub, v, only)
            if isinstance(sub, PinnableBatchNormalization):
                sub.pinned = not trainable or phase.bn == "frozen"
            elif isinstance(sub, PinnableDropout):
                sub.pinned = not trainable
    return list(kb.model.trainable_weights)


def recalibrate_bn(kb: KerasBackbone, batches, probes: dict | None = None) -> int:
    """Precise BatchNorm (bench/cell/loop.py): the BatchNorm layers the phase trains (not
    pinned) get their moving statistics replaced by the plain average, over `batches`, of
    the batch mean and variance of their inputs; the model runs in inference mode (dropout
    off, pinned layers untouched) with those layers normalising by batch statistics, as in
    training. `probes` keeps the traced probe per set of layers between calls. Returns the
    number of layers recomputed."""
    norms = [sub for layer in kb.model.layers for sub in _sublayers(layer)
             if isinstance(sub, PinnableBatchNormalization) and not sub.pinned]
    if not norms:
        return 0
    probes = {} if probes is None else probes
    key = tuple(n.name for n in norms)
    if key not in probes:
        probe = keras.Model(kb.model.inputs, [n.input for n in norms])

        @tf.function
        def moments(x):
            out, hs = [], probe(x, training=False)
            for n, h in zip(norms, hs if isinstance(hs, list | tuple) else [hs], strict=True):
                h = tf.cast(h, tf.float32)
                axis = n.axis % len(h.shape)
                out.append(tf.nn.moments(h, [a for a in range(len(h.shape)) if a != axis]))
            return out

        probes[key] = moments
    for n in norms:  # read when the probe is traced (its first call)
        n.batch_stats = True
    try:
        sums, count = None, 0
        for x, _ in batches.dataset:
            stats = probes[key](x)
            sums = stats if sums is None else [(a + m, b + v) for (a, b), (m, v)
                                               in zip(sums, stats, strict=True)]
            count += 1
    finally:
        for n in norms:
            n.batch_stats = False
    for (mean, var), n in zip(sums, norms, strict=True):
        n.moving_mean.assign(tf.cast(mean / count, n.moving_mean.dtype))
        n.moving_variance.assign(tf.cast(var / count, n.moving_variance.dtype))
    return len(norms)


class _CoupledL2:
    """PyTorch's `weight_decay` for Adam and SGD: wd * w added to the gradient (an L2 penalty),
    where Keras' `weight_decay` is decoupled (AdamW-style). Only used when wd > 0."""

    def __init__(self, l2: float, **kwargs):
        super().__init__(**kwargs)
        self.l2 = l2

    def apply(self, grads, trainable_variables=None):
        variables = (trainable_variables if trainable_variables is not None
                     else self._trainable_variables)
        cast = keras.ops.cast
        grads = [g if g is None else g + cast(self.l2, g.dtype) * cast(v, g.dtype)
                 for g, v in zip(grads, variables, strict=True)]
        return super().apply(grads, trainable_variables)


class L2Adam(_CoupledL2, keras.optimizers.Adam):
    pass


class L2SGD(_CoupledL2, keras.optimizers.SGD):
    pass


class _PerVariable:
    """A phase's optimizer hooks, the PyTorch side's meaning (torch_backend/train.py
    phase_optimizer). `lr_scales` [(variable, scale)]: layer-wise lr decay, each variable's
    update computed at learning_rate * scale (the update, not the gradient: Adam is
    invariant to a gradient's scale), AdamW's decoupled decay too, as a PyTorch param
    group's lr. `l2sp` [(variable, coefficient, w0 or None)]: L2-SP's gradient,
    c * (w - w0) (backbone) or c * w (head), added to the gradient before the step."""

    def __init__(self, lr_scales=(), l2sp=(), **kwargs):
        super().__init__(**kwargs)
        self._lr_scales = {self._var_key(v): s for v, s in lr_scales}
        self._l2sp = {self._var_key(v): (c, w0) for v, c, w0 in l2sp}

    def apply(self, grads, trainable_variables=None):
        if self._l2sp:
            variables = (trainable_variables if trainable_variables is not None
                         else self._trainable_variables)
            out = []
            for g, v in zip(grads, variables, strict=True):
                c, w0 = self._l2sp.get(self._var_key(v), (0.0, None))
                if g is not None and c:
                    d = v.value if w0 is None else v.value - w0
                    g = g + keras.ops.cast(c, g.dtype) * keras.ops.cast(d, g.dtype)
                out.append(g)
            grads = out
        return super().apply(grads, trainable_variables)

    def _scale(self, variable) -> float:
        return self._lr_scales.get(self._var_key(variable), 1.0)

    def update_step(self, gradient, variable, learning_rate):
        scale = self._scale(variable)
        if scale != 1.0:
            learning_rate = learning_rate * keras.ops.cast(scale, learning_rate.dtype)
        return super().update_step(gradient, variable, learning_rate)

    def _apply_weight_decay(self, variables):
        if self.weight_decay is None or not self._lr_scales:
            return super()._apply_weight_decay(variables)
        for v in variables:
            if self._use_weight_decay(v):
                lr = keras.ops.cast(self.learning_rate, v.dtype) * self._scale(v)
                v.assign(v - v * keras.ops.cast(self.weight_decay, v.dtype) * lr)


def phase_hooks(kb: KerasBackbone, phase: Phase, variables: list) -> dict:
    """make_optimizer's keyword arguments for a phase over its trainable `variables`:
    lr_scales (lr_decay != 1) and l2sp (w0 copied now, the phase's start)."""
    owner = kb.weight_owner()
    hooks = {}
    if phase.lr_decay != 1.0:
        scales = block_lr_scales(kb.blocks, phase)
        hooks["lr_scales"] = [(v, scales[owner[v.path]]) for v in variables
                              if scales[owner[v.path]] != 1.0]
    if phase.l2sp is not None:
        alpha, beta = phase.l2sp
        terms = [(v, beta, None) if owner[v.path] == "head"
                 else (v, alpha, tf.constant(v.numpy())) for v in variables]
        hooks["l2sp"] = [t for t in terms if t[1]]
    return hooks


def make_optimizer(name: str, lr: float, weight_decay: float,
                   hooks: dict | None = None) -> keras.optimizers.Optimizer:
    """The PyTorch side's optimizers with PyTorch's definitions (momentum 0.9 for sgd; Adam's
    epsilon 1e-8; adam/sgd weight decay as L2 on the gradient, adamw decoupled); `hooks`
    (phase_hooks) adds a phase's per-variable lr scales and L2-SP gradient."""
    if name == "adam":
        base, kw = keras.optimizers.Adam, {"epsilon": TORCH_ADAM_EPSILON}
        if weight_decay:
            base, kw = L2Adam, {**kw, "l2": weight_decay}
    elif name == "adamw":
        base, kw = keras.optimizers.AdamW, {"weight_decay": weight_decay,
                                            "epsilon": TORCH_ADAM_EPSILON}
    elif name == "sgd":
        base, kw = keras.optimizers.SGD, {"momentum": 0.9}
        if weight_decay:
            base, kw = L2SGD, {**kw, "l2": weight_decay}
    else:
        raise ValueError(f"unknown optimizer {name!r}; allowed: adam, adamw, sgd")
    if hooks:
        base = type(f"PerVariable{base.__name__}", (_PerVariable, base), {})
        kw = {**kw, **hooks}
    return base(learning_rate=lr, **kw)


def sync_fn(device_type: str):
    """Wait for the device: every clock read in bench.cell.timing happens after it."""
    if device_type == "gpu":
        return tf.test.experimental.sync_devices
    return lambda: None  # CPU ops have finished when the call returns


class StepTimer(keras.callbacks.Callback):
    """Feeds fit()'s steps to a StepMeter (warm-up excluded there; the device synchronised
    before each clock read) and a progress hook. `items(i)`: the images in step i. A
    non-finite loss stops fit() at that step and is kept in `diverged` (step, loss): fit's
    running mean of the loss turns NaN/inf at the first bad step."""

    def __init__(self, meter: StepMeter | None, items, on_step=None):
        super().__init__()
        self.meter, self.items, self.on_step = meter, items, on_step
        self.diverged: tuple[int, float] | None = None

    def on_epoch_begin(self, epoch, logs=None):
        if self.meter is not None:
            self.meter.start()

    def on_train_batch_end(self, batch, logs=None):
        if self.meter is not None:
            self.meter.step(self.items(batch))
        if self.on_step is not None:
            self.on_step(batch)
        loss = float((logs or {}).get("loss", 0.0))
        if not math.isfinite(loss):
            self.diverged = (batch + 1, loss)
            self.model.stop_training = True


class Trainer:
    """One model and its loss; `compile_phase`, `train_epoch` and `evaluate`. `train_model` is
    what fit() trains: the whole model, or (`train_on`) the part above a feature cache, which
    shares its layers (weights, trainable flags, pinned BatchNorm) with the whole model."""

    def __init__(self, kb: KerasBackbone, device_type: str = "cpu", topk: int = 1,
                 jit_compile: bool | str = "auto", seed: int = 0):
        self.kb = kb
        self.seed = seed  # the cell's: LoRA's adapter init
        self.topk = topk
        self.jit_compile = jit_compile
        self.sync = sync_fn(device_type)
        self.train_model = kb.model
        self._optimizer = ("adam", 1e-3, 0.0)

    def compile_phase(self, phase: Phase, optimizer: str, lr: float,
                      weight_decay: float = 0.0) -> list:
        params = apply_phase(self.kb, phase, self.seed)
        self._optimizer = (optimizer, lr, weight_decay, phase_hooks(self.kb, phase, params))
        self._compile(self.kb.model)
        self.train_model = self.kb.model
        return params

    def train_on(self, model: keras.Model) -> None:
        """Train `model` (the layers above a feature cache) for the rest of the phase, with
        a fresh optimizer of the phase's settings (the whole model's was never stepped)."""
        self._compile(model)
        self.train_model = model

    def _compile(self, model: keras.Model) -> None:
        metrics = [keras.metrics.SparseCategoricalAccuracy(name="acc")]
        if self.topk > 1:
            metrics.append(keras.metrics.SparseTopKCategoricalAccuracy(
                k=self.topk, name=f"top{self.topk}"))
        model.compile(optimizer=make_optimizer(*self._optimizer),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=metrics, jit_compile=self.jit_compile)

    def train_epoch(self, batches, meter: StepMeter | None = None,
                    on_step=None) -> dict[str, float]:
        timer = StepTimer(meter, batches.batch_items, on_step)
        hist = self.train_model.fit(batches.dataset, epochs=1, verbose=0, shuffle=False,
                                    callbacks=[timer])
        if timer.diverged:
            raise Diverged(*timer.diverged)
        return {"train_loss": float(hist.history["loss"][-1]),
                "train_acc": float(hist.history["acc"][-1])}

    def evaluate(self, batches, topk: int = 1, model: keras.Model | None = None
                 ) -> dict[str, float]:
        model = model or self.kb.model
        r = model.evaluate(batches.dataset, verbose=0, return_dict=True)
        # Keras' accuracies are float32 means (0.949999988 for 19 of 20): the exact share of
        # the part's n images, as PyTorch's side computes it, so MLflow shows 0.95
        n = batches.base.n if hasattr(batches, "base") else batches.n
        out = {"loss": float(r["loss"]), "acc": round(float(r["acc"]) * n) / n}
        if topk > 1:
            out[f"top{topk}"] = round(float(r[f"top{topk}"]) * n) / n
        return out
