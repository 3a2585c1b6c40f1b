"""Keras: the harness's training epoch against plain `model.fit` on the same architecture.

Target (issue 6): >= 0.95 of plain fit's images/s. TensorFlow is imported inside the test,
after the PyTorch benchmarks' torch (tensorflow imported before torch._dynamo crashes the
process; see tests/test_keras_backend.py).
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np
import pytest


@pytest.fixture(scope="module")
def tf_keras():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import tensorflow as tf

    try:  # one thread, as the PyTorch benchmarks (set before TensorFlow starts)
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass
    import keras

    return tf, keras


def _plain_model(keras, backbone: str, size: int):
    """The architecture as a user would write it: keras.applications' MobileNetV2, or
    keras_hub's ViTBackbone with the class token into the head."""
    inp = keras.Input((size, size, 3), dtype="uint8")
    if backbone == "mobilenet_v2":
        x = keras.applications.mobilenet_v2.preprocess_input(keras.ops.cast(inp, "float32"))
        base = keras.applications.MobileNetV2(include_top=False, weights=None, input_tensor=x,
                                              pooling="avg")
        return keras.Model(inp, keras.layers.Dense(10)(base.output))
    from keras_hub.src.models.vit.vit_backbone import ViTBackbone
    from keras_hub.src.utils.transformers import convert_vit

    from strategies import transformers as tr

    config = tr.info(backbone).config(size)
    vit = ViTBackbone(**convert_vit.convert_backbone_config(config),
                      layer_norm_epsilon=config["layer_norm_eps"])
    x = (keras.ops.cast(inp, "float32") / 255.0 - 0.5) / 0.5
    return keras.Model(inp, keras.layers.Dense(10)(vit(x)[:, 0]))


@pytest.mark.parametrize("backbone", ["mobilenet_v2", "vit_tiny"])
def test_fit_vs_plain_model_fit(benchmark, device, report, tf_keras, backbone):
    """MobileNetV2 or vit_tiny from scratch, full fine-tuning, 32 px, batch 32, Adam, 8 steps
    an epoch, one untimed epoch each first (tracing). The harness: strategies.keras_backend
    (its model with pinnable BatchNorm and the uint8 preprocessing layer, compile_phase, the
    tf.data Batches pipeline, Trainer.train_epoch with the step meter's callback). Plain:
    keras.applications.MobileNetV2 or keras_hub's ViTBackbone + Dense, compiled with Adam,
    `model.fit` on from_tensor_slices(x, y).batch(32) of the same uint8 images."""
    tf, keras = tf_keras
    from bench.cell.timing import StepMeter
    from strategies.keras_backend import configure_device
    from strategies.keras_backend.backbones import build
    from strategies.keras_backend.data import Batches
    from strategies.keras_backend.train import Trainer
    from strategies.registry import ALL, Phase

    device_type = configure_device(device)
    batch, size, n = 32, 32, 256
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.int32)
    keras.utils.set_random_seed(0)

    kb = build(backbone, "none", 10, "linear", size)
    trainer = Trainer(kb, device_type, jit_compile=False)
    trainer.compile_phase(Phase(ALL), "adam", 1e-3)
    batches = Batches(images, labels, size, batch, shuffle=True, seed=0)

    plain = _plain_model(keras, backbone, size)
    plain.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"], jit_compile=False)
    plain_ds = (tf.data.Dataset.from_tensor_slices((images, labels)).shuffle(n, seed=0)
                .batch(batch))

    def plain_epoch():
        plain.fit(plain_ds, epochs=1, verbose=0, shuffle=False)  # shuffled by plain_ds
        trainer.sync()

    def harness_epoch():
        trainer.train_epoch(batches, StepMeter(trainer.sync), lambda i: None)
        trainer.sync()

    plain_times = []

    def timed_plain_epoch():
        t0 = time.perf_counter()
        plain_epoch()
        plain_times.append(time.perf_counter() - t0)

    plain_epoch()
    harness_epoch()
    benchmark.pedantic(harness_epoch, setup=timed_plain_epoch, rounds=6, iterations=1)
    harness = n / benchmark.stats.stats.median
    plain_rate = n / statistics.median(plain_times)
    report(f"keras {backbone} train epoch vs plain model.fit", harness_img_s=harness,
           plain_img_s=plain_rate, ratio=harness / plain_rate, target=">= 0.95")
