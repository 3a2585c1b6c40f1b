"""The Keras 3 (TensorFlow) backend: runs one cell (a RunSpec) with keras.applications
backbones, at parity with strategies/torch_backend: the same block names and depths, the same
split manifest, the same strategies (phases, LR scales, BatchNorm policy), the same metrics
with the same names and definitions.

run_cell configures TensorFlow first (GPU memory growth, visible devices, CPU threads, the
mixed precision policy), then builds the data, the backbone and the strategy's phases, trains
with model.fit (recompiled per phase), evaluates on the test split, measures throughput the
timm way (bench.timing: warm-up excluded, device synchronised) and reports through the cell
context. tensorflow is imported only here, inside the child process that runs a cell.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before tensorflow is imported
if "keras" not in sys.modules:
    os.environ["KERAS_BACKEND"] = "tensorflow"

import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench import data as bdata  # noqa: E402
from bench.spec import RunSpec  # noqa: E402
from bench.timing import StepMeter, measure  # noqa: E402
from strategies import registry  # noqa: E402
from strategies.keras_backend.backbones import (
    build,
    load_backbone,
    reinit_top_blocks,
    save_backbone,
)  # noqa: E402
from strategies.keras_backend.data import Batches  # noqa: E402
from strategies.keras_backend.train import StepTimer, Trainer  # noqa: E402

WARMUP_STEPS = 3
MODEL_ONLY_STEPS = 10
POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16", "fp16": "mixed_float16"}


def versions() -> dict[str, str]:
    info = tf.sysconfig.get_build_info()
    out = {"tensorflow": tf.__version__, "keras": keras.__version__,
           "python": sys.version.split()[0]}
    if info.get("cuda_version"):
        out["cuda_build"] = str(info["cuda_version"])
    return out


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
    # the process's peak resident set (Linux reports KiB): host memory on a CPU run
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_cell(spec: RunSpec, card: dict, ctx) -> None:
    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(f"the Keras backend needs KERAS_BACKEND=tensorflow; Keras runs on "
                           f"{keras.backend.backend()!r} in this process")
    device_type = configure_device(ctx.device)
    if device_type == "gpu":
        tf.config.experimental.reset_memory_stats("GPU:0")
    keras.mixed_precision.set_global_policy(POLICIES[spec.precision])
    ctx.set_tags({"device": device_name(device_type), "device_type": device_type,
                  "versions": json.dumps(versions())})
    keras.utils.set_random_seed(spec.seed)

    prepared = bdata.prepare(card, spec.seed, spec.subset)
    num_classes = prepared.source.num_classes
    parts = {k: prepared.part(k) for k in ("train", "val", "test")}
    ctx.log_final({"n_train": len(parts["train"][1]), "n_val": len(parts["val"][1]),
                   "n_test": len(parts["test"][1]), "num_classes": num_classes})

    kb = build(spec.backbone, spec.weights, num_classes, spec.head, spec.image_size)
    _start_weights(kb, spec, ctx)
    topk = 5 if num_classes > 5 else 1
    trainer = Trainer(kb, device_type, topk=topk)
    loaders = {k: Batches(*parts[k], spec.image_size, spec.batch_size, shuffle=(k == "train"),
                          seed=spec.seed,
                          augmentation=spec.augmentation if k == "train" else "none")
               for k in parts}
    ctx.set_tags({"data_path": loaders["train"].data_path})

    strategy = registry.get(spec.strategy)
    phases = strategy.phases(spec.params, spec.epochs)
    total_epochs = sum(e for _, e in phases)
    history, best, epoch = [], (-1.0, 0), 0
    meter = None
    for phase, n_epochs in phases:
        params = trainer.compile_phase(phase, spec.optimizer, spec.lr * phase.lr_scale,
                                       spec.weight_decay)
        meter = StepMeter(trainer.sync, warmup=WARMUP_STEPS)  # steady state of this phase
        for _ in range(n_epochs):
            epoch += 1
            t0 = time.perf_counter()
            on_step = ctx.step_progress(phase.name, epoch, total_epochs,
                                        len(loaders["train"]))
            row = trainer.train_epoch(loaders["train"], meter, on_step)
            trainer.sync()
            seconds = time.perf_counter() - t0
            val = trainer.evaluate(loaders["val"])
            row.update(val_loss=val["loss"], val_acc=val["acc"], epoch_seconds=seconds,
                       epoch_train_images_per_sec=len(parts["train"][1]) / seconds,
                       lr=spec.lr * phase.lr_scale,
                       trainable_params=sum(int(np.prod(v.shape)) for v in params))
            ctx.log_epoch(epoch, row)
            history.append({"epoch": epoch, "phase": phase.name, **row})
            if val["acc"] > best[0]:
                best = (val["acc"], epoch)
            ctx.progress(phase=phase.name, epoch=epoch, epochs=total_epochs,
                         fraction=epoch / total_epochs, val_acc=val["acc"])

    test = trainer.evaluate(loaders["test"], topk=topk)
    final = {"test_acc": test["acc"], "test_loss": test["loss"], "best_val_acc": best[0],
             "best_val_epoch": best[1],
             "train_images_per_sec": meter.median if meter else None,
             "trainable_params": sum(int(np.prod(v.shape))
                                     for v in kb.model.trainable_weights),
             "total_params": sum(int(np.prod(v.shape)) for v in kb.model.weights
                                 if v.path in kb.parameters)}
    if topk > 1:
        final["test_top5"] = test[f"top{topk}"]
    final.update(_model_only_rates(trainer, spec))
    final["wall_seconds"] = ctx.elapsed()
    final["peak_memory_mb"] = peak_memory_mb(device_type)
    ctx.log_final(final)
    ctx.artifact("history.json", json.dumps(history, indent=1))
    if ctx.save_backbone_to:  # a pretraining run: its backbone is the product
        save_backbone(kb, ctx.save_backbone_to)


def _start_weights(kb, spec: RunSpec, ctx) -> None:
    """Harness-pretrained weights (`pretrained:`) and the strategy's re-initialised top
    blocks, on the freshly built model."""
    checkpoint = ctx.pretrained_checkpoint(spec)
    if checkpoint:
        load_backbone(kb, checkpoint)
    depth = registry.get(spec.strategy).reinit_depth(spec.params)
    if depth:
        ctx.set_tags({"reinit_blocks": ",".join(reinit_top_blocks(kb, depth))})


def _model_only_rates(trainer: Trainer, spec: RunSpec) -> dict[str, float]:
    """Train and inference images/s on one synthetic batch held in memory: the model's speed
    without the input pipeline. Runs after the test evaluation, on the last phase's trainable
    set (the model stays compiled for it), so it cannot touch a reported accuracy.

    Training goes through fit() on that batch repeated, timed per step like the real epochs:
    it reuses the train step traced for the real data (train_on_batch would trace another one,
    costing as much as the first epoch's tracing). tf.data copies the uint8 batch to the
    device each step, a few MB at most: small next to a training step."""
    model = trainer.kb.model
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (spec.batch_size, spec.image_size, spec.image_size, 3),
                     dtype=np.uint8)
    y = np.zeros((spec.batch_size,), dtype=np.int32)
    meter = StepMeter(trainer.sync, warmup=WARMUP_STEPS)
    synthetic = tf.data.Dataset.from_tensors((x, y)).repeat(WARMUP_STEPS + MODEL_ONLY_STEPS)
    model.fit(synthetic, epochs=1, verbose=0, shuffle=False,
              callbacks=[StepTimer(meter, lambda i: spec.batch_size)])
    x_device = tf.constant(x)
    infer_rate = measure(lambda: model.predict_on_batch(x_device), spec.batch_size,
                         MODEL_ONLY_STEPS, WARMUP_STEPS, trainer.sync)
    return {"model_only_train_images_per_sec": meter.median,
            "inference_images_per_sec": infer_rate}
