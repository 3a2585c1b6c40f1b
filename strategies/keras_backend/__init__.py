"""The Keras 3 (TensorFlow) backend: runs one cell (a RunSpec) with keras.applications
backbones, at parity with strategies/torch_backend: the same block names and depths, the same
split manifest, the same strategies (phases, LR scales, BatchNorm policy), the same metrics
with the same names and definitions.

run_cell runs bench.cell.loop's per-cell loop (the same for every framework) on a KerasSession,
which configures TensorFlow first (GPU memory growth, visible devices, CPU threads, the mixed
precision policy), builds the backbone and the tf.data loaders, recompiles per phase, trains
with model.fit and measures the model-only rates. tensorflow is imported only here, inside
the child process that runs a cell.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before tensorflow is imported
if "keras" not in sys.modules:
    os.environ["KERAS_BACKEND"] = "tensorflow"

import json  # noqa: E402
import platform  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench.cell import loop
from bench.cell.session import BackboneHandling  # noqa: E402
from bench.cell.timing import StepMeter, measure  # noqa: E402
from bench.config.spec import RunSpec  # noqa: E402
from bench.data import batching  # noqa: E402
from strategies.keras_backend import backbones, lora  # noqa: E402
from strategies.keras_backend.backbones import build  # noqa: E402
from strategies.keras_backend.data import Batches, CachedBatches  # noqa: E402
from strategies.keras_backend.train import (  # noqa: E402
    StepTimer,
    Trainer,
    recalibrate_bn,
    sync_fn,
)

POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}


def versions() -> dict[str, str]:
    info = tf.sysconfig.get_build_info()
    out = {"tensorflow": tf.__version__, "keras": keras.__version__,
           "python": sys.version.split()[0]}
    if info.get("cuda_version"):
        out["cuda_build"] = str(info["cuda_version"])
    return out


def preload() -> None:
    """Import what a cell imports later (bench.run.forkserver calls this before forking):
    nothing more here, keras.applications came with this module."""


def set_threads(n: int) -> None:
    """Intra-op threads for a cell given `n` cores (bench/cell/process.py take_slot), set before
    TensorFlow's runtime starts; configure_device keeps a value set here."""
    try:
        tf.config.threading.set_intra_op_parallelism_threads(n)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # TensorFlow already started in this process (tests)
        pass


def fork_problem() -> str | None:
    """Why a process forked from this one could not run a cell, or None: TensorFlow's
    runtime (devices, thread pools) must not have started before the fork."""
    from tensorflow.python.eager import context

    ctx = context.context_safe()
    if ctx is not None and getattr(ctx, "_initialized", True):
        return ("TensorFlow's runtime started in the fork server; a forked child could "
                "not use it")
    return None


def cpu_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def configure_device(requested: str) -> str:
    """Set TensorFlow up for `requested` (auto | cpu | cuda | cuda:<i>) before anything touches
    a GPU; return the device type used ('gpu' or 'cpu'). GPUs grow their memory instead of
    taking the whole card; on a CPU, intra-op threads = the cores this process may use and
    one inter-op thread, so TensorFlow does not oversubscribe them. Settings that TensorFlow
    refuses once it has started (a second cell in one process, as in tests) stay as they
    were."""
    kind, _, index = requested.partition(":")
    if kind not in ("auto", "cpu", "cuda"):
        raise RuntimeError(f"device {requested!r}: the Keras backend runs on auto, cpu, cuda "
                           f"or cuda:<i> (TensorFlow has no {kind!r} device)")
    gpus = tf.config.list_physical_devices("GPU")
    try:
        for gpu in gpus:
            tf.config.experimental.set_memory_growth(gpu, True)
        if kind == "cuda":
            if not gpus:
                raise RuntimeError(
                    f"device {requested!r} requested but TensorFlow sees no GPU (tensorflow "
                    f"{tf.__version__}, built with CUDA: {tf.test.is_built_with_cuda()})")
            i = int(index or 0)
            if i >= len(gpus):
                raise RuntimeError(f"device {requested!r}: TensorFlow sees {len(gpus)} GPU(s)")
            tf.config.set_visible_devices([gpus[i]], "GPU")
        elif kind == "cpu" and gpus:
            tf.config.set_visible_devices([], "GPU")
    except RuntimeError as e:
        if "cannot be modified" not in str(e) and "initialized" not in str(e):
            raise
    if tf.config.get_visible_devices("GPU"):
        return "gpu"
    if not tf.config.threading.get_intra_op_parallelism_threads():  # not set explicitly
        try:
            tf.config.threading.set_intra_op_parallelism_threads(cpu_threads())
            tf.config.threading.set_inter_op_parallelism_threads(1)
        except RuntimeError:  # TensorFlow already started in this process
            pass
    return "cpu"


def device_name(device_type: str) -> str:
    if device_type == "gpu":
        gpu = tf.config.get_visible_devices("GPU")[0]
        return tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name)
    threads = tf.config.threading.get_intra_op_parallelism_threads() or cpu_threads()
    return f"cpu ({platform.processor() or platform.machine()}, {threads} threads)"


def peak_memory_mb(device_type: str) -> float:
    if device_type == "gpu":
        return tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
    return batching.host_peak_memory_mb()


def split_after(kb, n_frozen: int) -> tuple[keras.Model, keras.Model]:
    """(below, above), two functional models on the model's own layers with
    above(below(x)) == model(x): below runs the bottom `n_frozen` blocks. The cut is the first
    point at or after the frozen blocks' last layer where a single tensor is live, found in
    the functional graph's operations (input to output, Keras' order): a block's last named
    layer need not be it, e.g. ConvNeXt's residual add (an op, not a layer) follows each
    block's `_identity` layer. CacheUnavailable when a layer of a trainable block comes first.
    """
    model = kb.model
    frozen = set(kb.blocks[:n_frozen])
    ops = model.operations
    node_of: dict[int, list] = {}
    for nodes in model._nodes_by_depth.values():
        for nd in nodes:
            node_of.setdefault(id(nd.operation), []).append(nd)
    if any(len(node_of.get(id(op), ())) != 1 for op in ops):
        raise loop.CacheUnavailable(f"Keras' {kb.name}: an operation is not called exactly "
                                      f"once in the graph")
    layer_owner = {id(la): kb.owner[la.name] for la in model.layers}
    owners = [layer_owner.get(id(op)) for op in ops]  # None: an op (`+`), not a layer
    made_at, last_use = {}, {}
    for i, op in enumerate(ops):
        nd = node_of[id(op)][0]
        for t in nd.input_tensors:
            last_use[id(t)] = i
        for t in nd.outputs:
            made_at[id(t)] = i, t
    for t in model.outputs:
        last_use[id(t)] = len(ops)
    last = max((i for i, o in enumerate(owners) if o in frozen), default=-1)
    for p in range(last, len(ops) - 1):
        if owners[p] is not None and owners[p] not in frozen:
            break  # a trainable layer before any single-tensor cut
        live = [t for i, t in made_at.values() if i <= p and last_use.get(id(t), -1) > p]
        if len(live) == 1 and not isinstance(ops[made_at[id(live[0])][0]],
                                             keras.layers.InputLayer):
            return _split_at(kb, live[0])
    raise loop.CacheUnavailable(f"Keras' {kb.name}: no single tensor leaves the bottom "
                                  f"{n_frozen} blocks")


def _split_at(kb, cut) -> tuple[keras.Model, keras.Model]:
    try:
        return keras.Model(kb.model.inputs, cut), keras.Model(cut, kb.model.output)
    except ValueError as e:  # the part above reads more than the one cut tensor
        raise loop.CacheUnavailable(
            f"no single-tensor cut in Keras' {kb.name} ({str(e)[:100]})") from e


class KerasSession(BackboneHandling):
    """The Keras side of bench.cell.loop's loop (see bench.cell.session.Session)."""

    backbone_module = backbones

    def start(self, device: str) -> dict[str, str]:
        if keras.backend.backend() != "tensorflow":
            raise RuntimeError(f"the Keras backend needs KERAS_BACKEND=tensorflow; Keras runs "
                               f"on {keras.backend.backend()!r} in this process")
        self.device_type = configure_device(device)
        if self.device_type == "gpu":
            tf.config.experimental.reset_memory_stats("GPU:0")
        self.sync = sync_fn(self.device_type)
        return {"device": device_name(self.device_type), "device_type": self.device_type,
                "versions": json.dumps(versions())}

    def determinism(self, on: bool, spec: RunSpec) -> str:
        """TensorFlow's op determinism (every op deterministic or an error; tf.data keeps
        its order); the augmentation is seeded per batch either way (data.py). Keras turns
        XLA off under op determinism, so a cell that asks for XLA (`compile = true`, part of
        its identity) keeps XLA and runs without it, and says so."""
        from tensorflow.python.framework import config as tf_config

        if on and not spec.compile:
            tf.config.experimental.enable_op_determinism()
            return "true"
        tf_config.disable_op_determinism()
        if on:
            return ("false: compile = true (XLA), which Keras turns off under TensorFlow's op "
                    "determinism; the cell keeps XLA, a repeated run may differ")
        return (f"false: deterministic = false on {self.device_type} (deterministic "
                f"kernels cost speed there); a repeated run may differ")

    def seed(self, seed: int) -> None:
        keras.utils.set_random_seed(seed)

    def build(self, spec: RunSpec, num_classes: int, parts: dict) -> None:
        self.spec = spec
        keras.mixed_precision.set_global_policy(POLICIES[spec.precision])
        self.kb = self.backbone = build(spec.backbone, spec.weights, num_classes, spec.head,
                                        spec.image_size, spec.additions(), spec.seed)
        # spec.channels_last: nothing to do, Keras on TensorFlow is NHWC already
        self.trainer = Trainer(self.kb, self.device_type, topk=loop.test_topk(num_classes),
                               jit_compile=spec.compile, seed=spec.seed)
        parallel = tf.data.AUTOTUNE if spec.workers < 0 else max(1, spec.workers)
        self.loaders = {k: Batches(*parts[k], spec.image_size, spec.batch_size,
                                   shuffle=(k == "train"), seed=spec.seed,
                                   augmentation=spec.augmentation if k == "train" else "none",
                                   parallel=parallel)
                        for k in parts}
        self.cached: dict = {}
        self.data_path = self.loaders["train"].data_path
        self.parts, self.parallel, self.bn_batches, self.bn_probes = parts, parallel, None, {}

    def begin_phase(self, phase, lr: float, optimizer: str, weight_decay: float) -> int:
        self.cached = {}
        params = self.trainer.compile_phase(phase, optimizer, lr, weight_decay)
        return sum(int(np.prod(v.shape)) for v in params)

    def use_cache(self, kind: str, n_frozen: int, limit_bytes: int) -> None:
        """Split the functional model at the head's input ('features') or after the bottom
        `n_frozen` blocks ('prefix'); the part below runs once through predict() (inference
        mode: frozen BatchNorm, no dropout), the part above trains on its outputs."""
        kb = self.kb
        if kind == "features":
            below, above = _split_at(kb, kb.head_layers[0].input)
            parts = dict(self.loaders)
        else:
            below, above = split_after(kb, n_frozen)
            parts = {"train": self.loaders["train"]}
        cut = above.inputs[0]
        itemsize = 2 if cut.dtype in ("bfloat16", "float16") else np.dtype(cut.dtype).itemsize
        per_item = int(np.prod(cut.shape[1:])) * itemsize
        need = per_item * sum(b.n for b in parts.values())
        if need > limit_bytes:
            raise loop.CacheUnavailable(f"needs {need / 2**20:.0f} MB, more than the "
                                          f"{limit_bytes / 2**20:.0f} MB allowed")
        for part, batches in parts.items():
            inputs = below.predict(batches.ordered(), verbose=0)
            self.cached[part] = CachedBatches(batches, inputs, above)
        self.trainer.train_on(above)

    def _batches(self, part: str):
        return self.cached[part] if part in self.cached else self.loaders[part]

    def train_epoch(self, meter, on_step) -> dict[str, float]:
        return self.trainer.train_epoch(self._batches("train"), meter, on_step)

    def evaluate(self, part: str, topk: int = 1) -> dict[str, float]:
        batches = self._batches(part)
        return self.trainer.evaluate(batches, topk=topk, model=getattr(batches, "model", None))

    def recalibrate_bn(self, indices) -> int:
        if self.bn_batches is None:  # the same images every time: made once
            self.bn_batches = Batches(*loop.take(self.parts["train"], indices),
                                      self.spec.image_size, self.spec.batch_size,
                                      shuffle=False, seed=self.spec.seed, parallel=self.parallel)
        return recalibrate_bn(self.kb, self.bn_batches, self.bn_probes)

    def snapshot(self) -> list:
        return self.kb.model.get_weights()  # BatchNorm moving statistics included

    def restore(self, state: list) -> None:
        self.kb.model.set_weights(state)  # the model above a feature cache shares them

    def param_counts(self) -> tuple[int, int]:
        model = self.kb.model
        return (sum(int(np.prod(v.shape)) for v in model.trainable_weights),
                sum(int(np.prod(v.shape)) for v in model.weights
                    if v.path in self.kb.parameters))

    def model_only_rates(self, steps: int, warmup: int) -> dict[str, float]:
        """The last phase's train step through fit() on one batch repeated (cached inputs
        when the phase trained on a cache), timed per step like the real epochs: it reuses
        the train step traced for the real data (train_on_batch would trace another one,
        costing as much as the first epoch's tracing). tf.data copies the batch to the
        device each step, a few MB at most: small next to a training step. Inference: images
        -> logits through the whole model (LoRA: on the weights with the adapters merged,
        checked against the unmerged logits; the difference is in the notes)."""
        spec, model = self.spec, self.kb.model
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (spec.batch_size, spec.image_size, spec.image_size, 3),
                         dtype=np.uint8)
        y = np.zeros((spec.batch_size,), dtype=np.int32)
        x_train = x
        train_batches = self._batches("train")
        if isinstance(train_batches, CachedBatches):
            inputs = train_batches.inputs
            x_train = inputs[batching.tile_indices(len(inputs), spec.batch_size)]
        meter = StepMeter(self.sync, warmup=warmup)
        synthetic = tf.data.Dataset.from_tensors((x_train, y)).repeat(warmup + steps)
        self.trainer.train_model.fit(synthetic, epochs=1, verbose=0, shuffle=False,
                                     callbacks=[StepTimer(meter, lambda i: spec.batch_size)])
        x_device = tf.constant(x)
        if lora.adapted_layers(model):  # LoRA: inference on the merged weights
            unmerged = np.asarray(model(x_device, training=False), np.float32)
            n = lora.merge(model)
            diff = np.abs(np.asarray(model(x_device, training=False), np.float32)
                          - unmerged).max()
            self.kb.notes["lora_merge"] = (f"{n} adapters merged into their weights for "
                                           f"inference_images_per_sec; max |merged - "
                                           f"unmerged| logit = {diff:.3g}")
        infer_rate = measure(lambda: model.predict_on_batch(x_device), spec.batch_size,
                             steps, warmup, self.sync)
        return {"model_only_train_images_per_sec": meter.median,
                "inference_images_per_sec": infer_rate}

    def peak_memory_mb(self) -> float:
        return peak_memory_mb(self.device_type)


def run_cell(spec: RunSpec, card: dict, ctx) -> None:
    """One cell: bench.cell.loop's loop on a KerasSession."""
    loop.run_cell(KerasSession(), spec, card, ctx)
