"""The PyTorch backend: runs one cell (a RunSpec) with torchvision backbones.

run_cell runs bench.driver's per-cell loop (the same for every framework) on a TorchSession:
the device, the model, the loaders, a phase's freezing and optimizer, an epoch, an
evaluation and the model-only rates, the PyTorch way.
"""

from __future__ import annotations

import json
import random
import resource
import sys

import numpy as np
import torch

from bench import driver
from bench.spec import RunSpec
from bench.timing import measure
from strategies.torch_backend.backbones import build
from strategies.torch_backend.data import Batches, Preprocess
from strategies.torch_backend.train import (
    Trainer,
    apply_phase,
    autocast,
    make_optimizer,
    set_train_mode,
    sync_fn,
)


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


class TorchSession:
    """The PyTorch side of bench.driver's loop (see bench.driver.Session)."""

    def start(self, device: str) -> dict[str, str]:
        self.device = resolve_device(device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.cuda.reset_peak_memory_stats(self.device)
        self.sync = sync_fn(self.device)
        return {"device": device_name(self.device), "device_type": self.device.type,
                "versions": json.dumps(versions())}

    def seed(self, seed: int) -> None:
        seed_everything(seed)

    def build(self, spec: RunSpec, num_classes: int, parts: dict) -> None:
        self.spec = spec
        dev = self.device
        self.tb = build(spec.backbone, spec.weights, num_classes, spec.head)
        self.tb.model.to(dev)
        self.trainer = Trainer(self.tb, dev, spec.precision,
                               Preprocess(self.tb.mean, self.tb.std, dev, spec.augmentation))
        self.loaders = {k: Batches(*parts[k], spec.image_size, spec.batch_size, dev,
                                   shuffle=(k == "train"), seed=spec.seed)
                        for k in parts}
        self.data_path = "resident" if self.loaders["train"].resident else "dataloader"

    def begin_phase(self, phase, lr: float, optimizer: str, weight_decay: float) -> int:
        self.phase = phase
        params = apply_phase(self.tb, phase)
        self.opt = make_optimizer(optimizer, params, lr, weight_decay)
        return sum(p.numel() for p in params)

    def train_epoch(self, meter, on_step) -> dict[str, float]:
        return self.trainer.train_epoch(self.phase, self.opt, self.loaders["train"], meter,
                                        on_step)

    def evaluate(self, part: str, topk: int = 1) -> dict[str, float]:
        return self.trainer.evaluate(self.loaders[part], topk=topk)

    def param_counts(self) -> tuple[int, int]:
        params = list(self.tb.model.parameters())
        return (sum(p.numel() for p in params if p.requires_grad),
                sum(p.numel() for p in params))

    def model_only_rates(self, steps: int, warmup: int) -> dict[str, float]:
        trainer, spec, dev = self.trainer, self.spec, self.device
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randint(0, 256, (spec.batch_size, 3, spec.image_size, spec.image_size),
                          generator=gen, dtype=torch.uint8).to(dev)
        x = trainer.preprocess(x, train=False)
        y = torch.zeros(spec.batch_size, dtype=torch.long, device=dev)
        set_train_mode(self.tb, self.phase)
        train_rate = measure(lambda: trainer.step(self.opt, x, y), spec.batch_size, steps,
                             warmup, self.sync)
        self.tb.model.eval()

        def infer():
            with torch.no_grad(), autocast(dev, spec.precision):
                self.tb.model(x)

        infer_rate = measure(infer, spec.batch_size, steps, warmup, self.sync)
        return {"model_only_train_images_per_sec": train_rate,
                "inference_images_per_sec": infer_rate}

    def peak_memory_mb(self) -> float:
        return peak_memory_mb(self.device)


def run_cell(spec: RunSpec, card: dict, ctx) -> None:
    """One cell: bench.driver's loop on a TorchSession."""
    driver.run_cell(TorchSession(), spec, card, ctx)
