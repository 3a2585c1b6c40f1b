"""The PyTorch backend: runs one cell (a RunSpec) with torchvision backbones.

run_cell runs bench.cell.loop's per-cell loop (the same for every framework) on a TorchSession:
the device, the model, the loaders, a phase's freezing and optimizer, an epoch, an
evaluation and the model-only rates, the PyTorch way.
"""

from __future__ import annotations

import json
import os
import random
import sys

import numpy as np
import torch

from bench.cell import loop
from bench.cell.session import BackboneHandling
from bench.cell.timing import measure
from bench.config.spec import RunSpec
from bench.data import batching
from strategies.torch_backend import backbones, cache, lora
from strategies.torch_backend.backbones import build
from strategies.torch_backend.data import Batches, CachedBatches, Preprocess
from strategies.torch_backend.train import (
    Trainer,
    apply_phase,
    autocast,
    phase_optimizer,
    recalibrate_bn,
    set_train_mode,
    sync_fn,
)


def versions() -> dict[str, str]:
    import torchvision

    return {"torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": sys.version.split()[0]}


def preload() -> None:
    """Import what a cell imports later (bench.run.forkserver calls this before forking):
    torchvision, which the backbones module imports where it is used."""
    import torchvision  # noqa: F401


def set_threads(n: int) -> None:
    """Intra-op threads for a cell given `n` cores (bench/cell/process.py take_slot): PyTorch read
    OMP_NUM_THREADS when it was imported, in the fork server, so it is told again here."""
    torch.set_num_threads(n)


def fork_problem() -> str | None:
    """Why a process forked from this one could not run a cell, or None."""
    if torch.cuda.is_initialized():
        return "CUDA was initialised in the fork server; a forked child could not use it"
    return None


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
    return batching.host_peak_memory_mb()


class TorchSession(BackboneHandling):
    """The PyTorch side of bench.cell.loop's loop (see bench.cell.session.Session)."""

    backbone_module = backbones

    def start(self, device: str) -> dict[str, str]:
        self.device = resolve_device(device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.cuda.reset_peak_memory_stats(self.device)
        self.sync = sync_fn(self.device)
        return {"device": device_name(self.device), "device_type": self.device.type,
                "versions": json.dumps(versions())}

    def determinism(self, on: bool, spec: RunSpec) -> str:
        """PyTorch's deterministic algorithms (warn_only: an op without one warns in the
        cell log rather than failing the cell); on CUDA also cuDNN's deterministic kernels
        without autotuning, and the cuBLAS workspace its determinism needs (set before
        cuBLAS starts: nothing has run on the device yet)."""
        if self.device.type == "cuda":
            if on:
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.backends.cudnn.deterministic = on
            torch.backends.cudnn.benchmark = not on
        torch.use_deterministic_algorithms(on, warn_only=True)
        if on:
            # CUDA has ops without a deterministic kernel (adaptive pooling's backward): they
            # warn and run anyway, so a GPU run says where to look
            return "true" if self.device.type == "cpu" else (
                "true: deterministic algorithms on; an op without one warns in cell.log")
        return (f"false: deterministic = false on {self.device.type} (deterministic "
                f"algorithms cost speed there); a repeated run may differ")

    def seed(self, seed: int) -> None:
        seed_everything(seed)

    def build(self, spec: RunSpec, num_classes: int, parts: dict) -> None:
        self.spec = spec
        dev = self.device
        self.tb = self.backbone = build(spec.backbone, spec.weights, num_classes, spec.head,
                                        spec.image_size, spec.additions(), spec.seed)
        self.tb.model.to(dev)
        if spec.channels_last:  # NHWC: tensor-core convolutions without transposes
            self.tb.model.to(memory_format=torch.channels_last)
        pre = Preprocess(self.tb.mean, self.tb.std, dev, spec.augmentation,
                         channels_last=spec.channels_last, seed=spec.seed)
        self.trainer = Trainer(self.tb, dev, spec.precision, pre, compile=spec.compile)
        workers = None if spec.workers < 0 else spec.workers
        self.loaders = {k: Batches(*parts[k], spec.image_size, spec.batch_size, dev,
                                   shuffle=(k == "train"), seed=spec.seed, workers=workers)
                        for k in parts}
        self.cached: dict = {}
        self.data_path = self.loaders["train"].data_path
        self.parts, self.workers, self.bn_batches = parts, workers, None

    def begin_phase(self, phase, lr: float, optimizer: str, weight_decay: float) -> int:
        self.phase = phase
        self.cached = {}
        params = apply_phase(self.tb, phase, seed=self.spec.seed)
        self.opt = phase_optimizer(self.tb, phase, params, optimizer, lr, weight_decay)
        return sum(p.numel() for p in params)

    def use_cache(self, kind: str, n_frozen: int, limit_bytes: int) -> None:
        tb, trainer = self.tb, self.trainer

        def autocast_ctx():
            return autocast(self.device, self.spec.precision)

        if kind == "features":
            fn, forward, parts = (lambda x: cache.head_inputs(tb, x)), tb.head, self.loaders
        else:
            set_train_mode(tb, self.phase)  # the mode the suffix is traced in
            fn, forward = cache.split_after(tb, n_frozen)
            parts = {"train": self.loaders["train"]}
        tb.model.eval()  # frozen means eval mode: BatchNorm statistics, no dropout
        budget = limit_bytes
        for part, batches in parts.items():
            inputs = cache.compute(batches, fn, trainer.preprocess, autocast_ctx, budget)
            budget -= inputs.numel() * inputs.element_size()
            self.cached[part] = CachedBatches(batches, inputs, forward)

    def _batches(self, part: str):
        return self.cached[part] if part in self.cached else self.loaders[part]

    def train_epoch(self, meter, on_step) -> dict[str, float]:
        return self.trainer.train_epoch(self.phase, self.opt, self._batches("train"), meter,
                                        on_step)

    def evaluate(self, part: str, topk: int = 1) -> dict[str, float]:
        return self.trainer.evaluate(self._batches(part), topk=topk)

    def recalibrate_bn(self, indices) -> int:
        if self.bn_batches is None:  # the same images every time: made once
            self.bn_batches = Batches(*loop.take(self.parts["train"], indices),
                                      self.spec.image_size, self.spec.batch_size, self.device,
                                      shuffle=False, seed=self.spec.seed, workers=self.workers)
        return recalibrate_bn(self.tb, self.phase, self.bn_batches, self.trainer.preprocess,
                              self.device, self.spec.precision)

    def snapshot(self) -> dict:
        return {k: v.detach().clone() for k, v in self.tb.model.state_dict().items()}

    def restore(self, state: dict) -> None:
        self.tb.model.load_state_dict(state)

    def param_counts(self) -> tuple[int, int]:
        params = list(self.tb.model.parameters())
        return (sum(p.numel() for p in params if p.requires_grad),
                sum(p.numel() for p in params))

    def model_only_rates(self, steps: int, warmup: int) -> dict[str, float]:
        """The last phase's train step on a synthetic batch already on the device (cached
        inputs' shape when the phase trained on a cache), and inference images -> logits
        (LoRA: on the weights with the adapters merged, checked against the unmerged
        logits; the difference is in the notes)."""
        trainer, spec, dev = self.trainer, self.spec, self.device
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randint(0, 256, (spec.batch_size, 3, spec.image_size, spec.image_size),
                          generator=gen, dtype=torch.uint8).to(dev)
        x = trainer.preprocess(x, train=False)
        y = torch.zeros(spec.batch_size, dtype=torch.long, device=dev)
        train_batches = self._batches("train")
        forward = trainer.forward_of(train_batches)
        x_train = x
        if isinstance(train_batches, CachedBatches):
            inputs = train_batches.inputs
            idx = batching.tile_indices(len(inputs), spec.batch_size)
            x_train = inputs[torch.from_numpy(idx).to(inputs.device)]
        set_train_mode(self.tb, self.phase)
        train_rate = measure(lambda: trainer.step(self.opt, x_train, y, forward),
                             spec.batch_size, steps, warmup, self.sync)
        self.tb.model.eval()
        model = trainer.forward_of()
        if lora.adapters(self.tb.model):  # LoRA: inference on the merged weights
            with torch.no_grad():
                with autocast(dev, spec.precision):
                    unmerged = model(x).float()
                n = lora.merge(self.tb.model)  # in the weights' precision, not autocast's
                with autocast(dev, spec.precision):
                    diff = (model(x).float() - unmerged).abs().max().item()
            self.tb.notes["lora_merge"] = (f"{n} adapters merged into their weights for "
                                           f"inference_images_per_sec; max |merged - "
                                           f"unmerged| logit = {diff:.3g}")

        def infer():
            with torch.no_grad(), autocast(dev, spec.precision):
                model(x)

        infer_rate = measure(infer, spec.batch_size, steps, warmup, self.sync)
        return {"model_only_train_images_per_sec": train_rate,
                "inference_images_per_sec": infer_rate}

    def peak_memory_mb(self) -> float:
        return peak_memory_mb(self.device)


def run_cell(spec: RunSpec, card: dict, ctx) -> None:
    """One cell: bench.cell.loop's loop on a TorchSession."""
    loop.run_cell(TorchSession(), spec, card, ctx)
