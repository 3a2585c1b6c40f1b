"""PyTorch: the harness's train step against the seed's hand-written loop, and a
feature-extraction cell with cached features against the seeds' recompute-every-epoch.

Targets (issue 6): train step >= 0.95 of the hand-written loop's images/s; cached cell at
equal accuracy >= epochs/2 times faster end to end. GPU only (--device cuda): ResNet-50 full
fine-tuning at 224 px, bf16, channels_last, batch 256, data-fed and model-only images/s.
"""

from __future__ import annotations

import copy
import statistics
import time

import numpy as np
import pytest
import torch

from bench.cell.process import CellContext
from bench.cell.timing import StepMeter
from bench.config.spec import RunSpec
from bench.data import check_card, shipped_cards
from strategies import registry
from strategies.torch_backend import TorchSession, resolve_device, run_cell
from strategies.torch_backend.backbones import build
from strategies.torch_backend.data import Batches, Preprocess
from strategies.torch_backend.train import Trainer, apply_phase, make_optimizer, sync_fn


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: two threads on a shared 2-core machine spin against the other
    agents' work and the numbers swing far more than the ratio we look for."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


class QuietContext(CellContext):
    """A cell context that records instead of printing marked lines."""

    def __init__(self, device: str):
        super().__init__(device, time.perf_counter())
        self.final, self.tags = {}, {}

    def log_epoch(self, step, metrics):
        pass

    def log_final(self, metrics):
        self.final.update(metrics)

    def set_tags(self, tags):
        self.tags.update(tags)

    def progress(self, **state):
        pass

    def artifact(self, name, text):
        pass

    def log_inputs(self, inputs):
        pass


def _images(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
            rng.integers(0, 10, n).astype(np.int64))


@pytest.mark.parametrize("backbone", ["resnet18", "vit_tiny"])
def test_train_step_vs_hand_written_loop(benchmark, device, report, backbone):
    """ResNet-18 or vit_tiny (transformers' ViT modules), full fine-tuning, 32 px, batch 32,
    Adam, 8 steps an epoch; one untimed epoch each first. The harness: Trainer.train_epoch
    (per-batch uint8 -> normalised on the device, the step meter's device sync, loss/accuracy
    sums, progress callback). The seed: `for x, y in loader: zero_grad;
    loss(model(x), y).backward(); step` on batches already normalised floats on the device."""
    dev = resolve_device(device)
    batch, size, n = 32, 32, 256
    torch.manual_seed(0)
    tb = build(backbone, "none", 10, image_size=size)
    tb.model.to(dev)
    ref_model = copy.deepcopy(tb.model)
    images, labels = _images(n, size)
    batches = Batches(images, labels, size, batch, dev, shuffle=True, seed=0)
    trainer = Trainer(tb, dev, "fp32", Preprocess(tb.mean, tb.std, dev))
    phase = registry.Phase(registry.ALL)
    opt = make_optimizer("adam", apply_phase(tb, phase), 1e-3, 0.0)
    ctx = QuietContext(device)
    sync = sync_fn(dev)

    # the seed's loop: normalised float batches, already on the device
    pre = Preprocess(tb.mean, tb.std, dev)
    ref_batches = [(pre(x, train=False), y) for x, y in batches]
    ref_opt = torch.optim.Adam(ref_model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()

    def seed_epoch():
        ref_model.train()
        for x, y in ref_batches:
            ref_opt.zero_grad()
            loss = loss_fn(ref_model(x), y)
            loss.backward()
            ref_opt.step()
        sync()

    def harness_epoch():
        meter = StepMeter(sync)
        trainer.train_epoch(phase, opt, batches, meter, ctx.step_progress("b", 1, 1, 8))
        sync()

    seed_times = []

    def timed_seed_epoch():  # pytest-benchmark's setup: runs, untimed by it, before each round
        t0 = time.perf_counter()
        seed_epoch()
        seed_times.append(time.perf_counter() - t0)

    seed_epoch()
    harness_epoch()
    seed_times.clear()
    benchmark.pedantic(harness_epoch, setup=timed_seed_epoch, rounds=6, iterations=1)
    harness = n / benchmark.stats.stats.median
    seed = n / statistics.median(seed_times)
    report(f"torch {backbone} train step vs hand-written loop", harness_img_s=harness,
           seed_img_s=seed,
           ratio=harness / seed, target=">= 0.95")


@pytest.mark.parametrize("epochs", [6])
def test_feature_extraction_cached_vs_recompute(benchmark, device, report, tmp_path_factory,
                                                monkeypatch, epochs):
    """One feature_extraction cell end to end (run_cell: data, model, epochs, evaluations,
    model-only rates), ResNet-18 from scratch, digits (600 train+val samples + the test
    split), 32 px, batch 32: feature_cache on (features once) against off (every epoch
    recomputes them through the frozen backbone, as the seeds do); accuracy must match."""
    monkeypatch.setenv("TLBENCH_CACHE", str(tmp_path_factory.mktemp("cache")))
    card = check_card(shipped_cards()["digits"], "digits")

    def cell(feature_cache: bool) -> QuietContext:
        spec = RunSpec(framework="torch", backbone="resnet18", dataset="digits",
                       strategy="feature_extraction", weights="none", subset=600,
                       image_size=32, batch_size=32, epochs=epochs,
                       feature_cache=feature_cache)
        ctx = QuietContext(device)
        run_cell(spec, card, ctx)
        return ctx

    results = {True: [], False: []}
    recompute_times = []

    def timed_recompute():
        t0 = time.perf_counter()
        results[False].append(cell(False))
        recompute_times.append(time.perf_counter() - t0)

    benchmark.pedantic(lambda: results[True].append(cell(True)), setup=timed_recompute,
                       rounds=2, iterations=1)
    cached, recompute = results[True][-1], results[False][-1]
    assert cached.tags["feature_cache_used"] == "features"
    acc_cached, acc_recompute = cached.final["test_acc"], recompute.final["test_acc"]
    assert acc_cached == pytest.approx(acc_recompute, abs=1e-6)
    speedup = statistics.median(recompute_times) / benchmark.stats.stats.median
    report(f"torch feature_extraction cell, {epochs} epochs, cached vs recompute",
           cached_s=benchmark.stats.stats.median,
           recompute_s=statistics.median(recompute_times), speedup=speedup,
           target=f">= {epochs / 2:g}", test_acc_cached=acc_cached,
           test_acc_recompute=acc_recompute,
           feature_cache_s=cached.final["feature_cache_seconds"])


def test_gpu_resnet50_full_finetune(benchmark, device, report):
    """ResNet-50 full fine-tuning, 224 px, bf16 autocast, channels_last, batch 256, Adam:
    data-fed images/s (uint8 batches resident on the device, normalised per batch, 3 warm-up
    steps excluded, synchronised before each clock read, median) and model-only images/s (a
    synthetic batch already on the device). GPU only: --device cuda."""
    if not device.startswith("cuda"):
        pytest.skip("GPU benchmark: run with --device cuda")
    torch.backends.cudnn.benchmark = True
    batch, size, steps = 256, 224, 16
    images, labels = _images(batch * steps, size)
    spec = RunSpec(framework="torch", backbone="resnet50", dataset="synthetic",
                   strategy="full", weights="none", image_size=size, batch_size=batch,
                   precision="bf16", channels_last=True, feature_cache=False)
    session = TorchSession()
    tags = session.start(device)
    session.build(spec, 10, {"train": (images, labels), "val": (images[:batch], labels[:batch]),
                             "test": (images[:batch], labels[:batch])})
    phase = registry.Phase(registry.ALL)
    session.begin_phase(phase, 1e-3, "adam", 0.0)
    meter = StepMeter(session.sync, warmup=3)

    def epoch():
        session.train_epoch(meter, lambda i: None)

    benchmark.pedantic(epoch, rounds=2, iterations=1)
    rates = session.model_only_rates(steps=10, warmup=3)
    report("GPU resnet50 224px bf16 channels_last batch 256",
           device=tags["device"],
           data_fed_img_s=meter.median, model_only_img_s=rates[
               "model_only_train_images_per_sec"],
           inference_img_s=rates["inference_images_per_sec"],
           ratio=meter.median / rates["model_only_train_images_per_sec"])

