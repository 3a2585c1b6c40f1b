"""The PyTorch backend: runs one cell (a RunSpec) with torchvision backbones.

run_cell builds the data, the backbone and the strategy's phases, trains, evaluates on the
test split, measures throughput the timm way, and reports through the cell context.
"""

from __future__ import annotations

import json
import random
import resource
import sys
import time

import numpy as np
import torch

from bench import data as bdata
from bench.spec import RunSpec
from bench.timing import StepMeter, measure
from strategies import registry
from strategies.torch_backend.backbones import (
    build,
    load_backbone,
    reinit_top_blocks,
    save_backbone,
)
from strategies.torch_backend.data import Batches, Preprocess
from strategies.torch_backend.train import (
    Trainer,
    apply_phase,
    autocast,
    make_optimizer,
    set_train_mode,
)

WARMUP_STEPS = 3
MODEL_ONLY_STEPS = 10


def versions() -> dict[str, str]:
    import torchvision

    return {"torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": sys.version.split()[0]}


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(requested)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {requested!r} requested but torch sees no CUDA device "
                           f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")
    return dev


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    if dev.type == "cpu":
        import platform

        cpu = platform.processor() or platform.machine()
        return f"cpu ({cpu}, {torch.get_num_threads()} threads)"
    return dev.type


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_mb(dev: torch.device) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    # the process's peak resident set (Linux reports KiB): host memory on a CPU run
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_cell(spec: RunSpec, card: dict, ctx) -> None:
    dev = resolve_device(ctx.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.reset_peak_memory_stats(dev)
    ctx.set_tags({"device": device_name(dev), "device_type": dev.type,
                  "versions": json.dumps(versions())})
    seed_everything(spec.seed)

    prepared = bdata.prepare(card, spec.seed, spec.subset)
    num_classes = prepared.source.num_classes
    parts = {k: prepared.part(k) for k in ("train", "val", "test")}
    ctx.log_final({"n_train": len(parts["train"][1]), "n_val": len(parts["val"][1]),
                   "n_test": len(parts["test"][1]), "num_classes": num_classes})

    tb = build(spec.backbone, spec.weights, num_classes, spec.head)
    _start_weights(tb, spec, ctx)
    tb.model.to(dev)
    pre = Preprocess(tb.mean, tb.std, dev, spec.augmentation)
    trainer = Trainer(tb, dev, spec.precision, pre)
    loaders = {k: Batches(*parts[k], spec.image_size, spec.batch_size, dev,
                          shuffle=(k == "train"), seed=spec.seed)
               for k in parts}
    ctx.set_tags({"data_path": "resident" if loaders["train"].resident else "dataloader"})

    strategy = registry.get(spec.strategy)
    phases = strategy.phases(spec.params, spec.epochs)
    total_epochs = sum(e for _, e in phases)
    history, best, epoch = [], (-1.0, 0), 0
    meter = None
    for phase, n_epochs in phases:
        params = apply_phase(tb, phase)
        opt = make_optimizer(spec.optimizer, params, spec.lr * phase.lr_scale,
                             spec.weight_decay)
        meter = StepMeter(trainer.sync, warmup=WARMUP_STEPS)  # steady state of this phase
        for _ in range(n_epochs):
            epoch += 1
            t0 = time.perf_counter()
            on_step = ctx.step_progress(phase.name, epoch, total_epochs,
                                        len(loaders["train"]))
            row = trainer.train_epoch(phase, opt, loaders["train"], meter, on_step)
            trainer.sync()
            seconds = time.perf_counter() - t0
            val = trainer.evaluate(loaders["val"])
            row.update(val_loss=val["loss"], val_acc=val["acc"], epoch_seconds=seconds,
                       epoch_train_images_per_sec=len(parts["train"][1]) / seconds,
                       lr=spec.lr * phase.lr_scale,
                       trainable_params=sum(p.numel() for p in params))
            ctx.log_epoch(epoch, row)
            history.append({"epoch": epoch, "phase": phase.name, **row})
            if val["acc"] > best[0]:
                best = (val["acc"], epoch)
            ctx.progress(phase=phase.name, epoch=epoch, epochs=total_epochs,
                         fraction=epoch / total_epochs, val_acc=val["acc"])

    topk = 5 if num_classes > 5 else 1
    test = trainer.evaluate(loaders["test"], topk=topk)
    final = {"test_acc": test["acc"], "test_loss": test["loss"], "best_val_acc": best[0],
             "best_val_epoch": best[1],
             "train_images_per_sec": meter.median if meter else None,
             "trainable_params": sum(p.numel() for p in tb.model.parameters()
                                     if p.requires_grad),
             "total_params": sum(p.numel() for p in tb.model.parameters())}
    if topk > 1:
        final["test_top5"] = test[f"top{topk}"]
    final.update(_model_only_rates(trainer, phases[-1][0], spec, dev, opt))
    final["wall_seconds"] = ctx.elapsed()
    final["peak_memory_mb"] = peak_memory_mb(dev)
    ctx.log_final(final)
    ctx.artifact("history.json", json.dumps(history, indent=1))
    if ctx.save_backbone_to:  # a pretraining run: its backbone is the product
        save_backbone(tb, ctx.save_backbone_to)


def _start_weights(tb, spec: RunSpec, ctx) -> None:
    """Harness-pretrained weights (`pretrained:`) and the strategy's re-initialised top
    blocks, on the freshly built model."""
    checkpoint = ctx.pretrained_checkpoint(spec)
    if checkpoint:
        load_backbone(tb, checkpoint)
    depth = registry.get(spec.strategy).reinit_depth(spec.params)
    if depth:
        ctx.set_tags({"reinit_blocks": ",".join(reinit_top_blocks(tb, depth))})


def _model_only_rates(trainer: Trainer, phase, spec: RunSpec, dev: torch.device,
                      opt) -> dict[str, float]:
    """Train and inference images/s on a synthetic batch already on the device: the model's
    speed without the input pipeline. Runs after the test evaluation, on the last phase's
    trainable set, so it cannot touch a reported accuracy."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randint(0, 256, (spec.batch_size, 3, spec.image_size, spec.image_size),
                      generator=gen, dtype=torch.uint8).to(dev)
    x = trainer.preprocess(x, train=False)
    y = torch.zeros(spec.batch_size, dtype=torch.long, device=dev)
    set_train_mode(trainer.tb, phase)
    train_rate = measure(lambda: trainer.step(opt, x, y), spec.batch_size, MODEL_ONLY_STEPS,
                         WARMUP_STEPS, trainer.sync)
    trainer.tb.model.eval()

    def infer():
        with torch.no_grad(), autocast(dev, spec.precision):
            trainer.tb.model(x)

    infer_rate = measure(infer, spec.batch_size, MODEL_ONLY_STEPS, WARMUP_STEPS, trainer.sync)
    return {"model_only_train_images_per_sec": train_rate,
            "inference_images_per_sec": infer_rate}
