"""The per-cell loop, written once for every framework: data -> model -> the strategy's phases
-> epochs -> history and best validation accuracy -> test metrics -> model-only rates.

A backend supplies a small `Session` (strategies/<framework>_backend) and calls
`run_cell(session, spec, card, ctx)`; every metric name and definition lives here, so the two
frameworks cannot drift apart. Framework-free: nothing here imports torch or tensorflow.
"""

from __future__ import annotations

import json
import time
from typing import Protocol

from bench import data as bdata
from bench.spec import RunSpec
from bench.timing import StepMeter
from strategies import registry

WARMUP_STEPS = 3  # steps excluded from every throughput median
MODEL_ONLY_STEPS = 10


class Session(Protocol):
    """What a framework backend does for the driver. One session runs one cell."""

    data_path: str  # how the training images reach the model ("resident", "dataloader", ...)

    def start(self, device: str) -> dict[str, str]:
        """Set the device up; return the tags device, device_type and versions."""

    def seed(self, seed: int) -> None: ...

    def build(self, spec: RunSpec, num_classes: int, parts: dict) -> None:
        """The model (backbone, weights, new head) and the loaders of the split parts."""

    def begin_phase(self, phase: registry.Phase, lr: float, optimizer: str,
                    weight_decay: float) -> int:
        """Freeze/unfreeze for the phase and make its optimizer; return the trainable
        parameter count."""

    def train_epoch(self, meter: StepMeter, on_step) -> dict[str, float]:
        """One epoch of the current phase: {'train_loss', 'train_acc'}."""

    def evaluate(self, part: str, topk: int = 1) -> dict[str, float]:
        """{'loss', 'acc'} (and f'top{topk}' when topk > 1) on a split part."""

    def param_counts(self) -> tuple[int, int]:
        """(trainable, total) parameters of the model as it is now."""

    def model_only_rates(self, steps: int, warmup: int) -> dict[str, float]:
        """Train and inference images/s on a synthetic batch already on the device, through
        the last phase's train step: {'model_only_train_images_per_sec',
        'inference_images_per_sec'}."""

    def peak_memory_mb(self) -> float: ...

    def sync(self) -> None:
        """Wait for the device (every clock read follows one)."""


def run_cell(session: Session, spec: RunSpec, card: dict, ctx) -> None:
    ctx.set_tags(session.start(ctx.device))
    session.seed(spec.seed)

    prepared = bdata.prepare(card, spec.seed, spec.subset)
    num_classes = prepared.source.num_classes
    parts = {k: prepared.part(k) for k in ("train", "val", "test")}
    n_train = len(parts["train"][1])
    ctx.log_final({"n_train": n_train, "n_val": len(parts["val"][1]),
                   "n_test": len(parts["test"][1]), "num_classes": num_classes})

    session.build(spec, num_classes, parts)
    ctx.set_tags({"data_path": session.data_path})

    strategy = registry.get(spec.strategy)
    phases = strategy.phases(spec.params, spec.epochs)
    total_epochs = sum(e for _, e in phases)
    steps_per_epoch = -(-n_train // spec.batch_size)
    history, best, epoch = [], (-1.0, 0), 0
    meter = None
    for phase, n_epochs in phases:
        lr = spec.lr * phase.lr_scale
        trainable = session.begin_phase(phase, lr, spec.optimizer, spec.weight_decay)
        meter = StepMeter(session.sync, warmup=WARMUP_STEPS)  # steady state of this phase
        for _ in range(n_epochs):
            epoch += 1
            t0 = time.perf_counter()
            on_step = ctx.step_progress(phase.name, epoch, total_epochs, steps_per_epoch)
            row = session.train_epoch(meter, on_step)
            session.sync()
            seconds = time.perf_counter() - t0
            val = session.evaluate("val")
            row.update(val_loss=val["loss"], val_acc=val["acc"], epoch_seconds=seconds,
                       epoch_train_images_per_sec=n_train / seconds, lr=lr,
                       trainable_params=trainable)
            ctx.log_epoch(epoch, row)
            history.append({"epoch": epoch, "phase": phase.name, **row})
            if val["acc"] > best[0]:
                best = (val["acc"], epoch)
            ctx.progress(phase=phase.name, epoch=epoch, epochs=total_epochs,
                         fraction=epoch / total_epochs, val_acc=val["acc"])

    topk = 5 if num_classes > 5 else 1
    test = session.evaluate("test", topk=topk)
    trainable, total = session.param_counts()
    final = {"test_acc": test["acc"], "test_loss": test["loss"], "best_val_acc": best[0],
             "best_val_epoch": best[1],
             "train_images_per_sec": meter.median if meter else None,
             "trainable_params": trainable, "total_params": total}
    if topk > 1:
        final["test_top5"] = test[f"top{topk}"]
    # after the test evaluation, on the last phase's trainable set: it cannot touch a
    # reported accuracy
    final.update(session.model_only_rates(MODEL_ONLY_STEPS, WARMUP_STEPS))
    final["wall_seconds"] = ctx.elapsed()
    final["peak_memory_mb"] = session.peak_memory_mb()
    ctx.log_final(final)
    ctx.artifact("history.json", json.dumps(history, indent=1))
