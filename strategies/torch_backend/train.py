"""The PyTorch training loop: apply a strategy's phases to a backbone, train, evaluate.

Frozen means frozen: a frozen block has requires_grad=False, is left out of the optimizer,
and runs in eval mode (so its BatchNorm running statistics never move) even while the rest
of the model trains. `bn="frozen"` extends eval mode to the BatchNorm layers of the
trainable blocks too. A phase with `only` (bitfit, norm) sets requires_grad per parameter
inside its trainable blocks; their modules keep the trainable blocks' mode. A LoRA phase
(only='lora') first wraps the trainable blocks' convolutions and linear layers with adapters
(lora.py) and trains those alone, with the head.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from bench.cell.loop import Diverged
from bench.cell.timing import StepMeter
from strategies.lora import ADAPTER_NAMES
from strategies.registry import ONLY, Phase, block_lr_scales, phase_blocks
from strategies.torch_backend import lora
from strategies.torch_backend.backbones import TorchBackbone

_NORMS = (nn.modules.batchnorm._BatchNorm,)
# the norm layers whose affine weight/bias `only="norm"` trains (torchvision's LayerNorm2d is
# an nn.LayerNorm)
_AFFINE_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def trainable_blocks(tb: TorchBackbone, phase: Phase) -> list[str]:
    return phase_blocks(phase, list(tb.block_map.blocks), tb.name)


def selected_parameters(module: nn.Module, only: str) -> list[nn.Parameter]:
    """The parameters of `module` a phase with `only` trains (registry.ONLY): every one, the
    biases (every parameter named `bias`: convolutions', linear layers', norm layers' beta),
    or the norm layers' affine weight and bias; LoRA's, VPT's or the adapters' own."""
    if only == "all":
        return list(module.parameters())
    if only == "bias":
        return [p for n, p in module.named_parameters() if n.rsplit(".", 1)[-1] == "bias"]
    if only == "norm":
        return [p for m in module.modules() if isinstance(m, _AFFINE_NORMS)
                for p in m.parameters(recurse=False)]
    if only == "lora":
        return [p for n, p in module.named_parameters()
                if n.rsplit(".", 1)[-1] in ADAPTER_NAMES]
    if only == "prompt":  # VPT's tokens (torch_backend/vit.py Prompt)
        return [p for n, p in module.named_parameters() if n.rsplit(".", 1)[-1] == "prompt"]
    if only == "adapter":  # the bottleneck adapters (vit.py Adapter, `adapter` submodules)
        return [p for n, p in module.named_parameters() if "adapter" in n.split(".")]
    raise ValueError(f"unknown only={only!r}; allowed: {', '.join(ONLY)}")


def apply_phase(tb: TorchBackbone, phase: Phase, seed: int = 0) -> list[nn.Parameter]:
    """Set requires_grad for the phase; return the trainable parameters (the head's unless
    the phase freezes it). A LoRA phase adds its adapters first (once; A drawn from `seed`,
    the cell's), their summary in tb.notes['lora']."""
    if phase.lora is not None:
        tag = lora.install(tb, trainable_blocks(tb, phase), *phase.lora, seed=seed)
        if tag:
            tb.notes["lora"] = tag
    tb.model.requires_grad_(False)
    for block in trainable_blocks(tb, phase):
        for m in tb.block_modules(block):
            for p in selected_parameters(m, phase.only):
                p.requires_grad_(True)
    tb.head.requires_grad_(phase.train_head)  # frozen: kept as loaded (blocks[head=frozen])
    return [p for p in tb.model.parameters() if p.requires_grad]


def set_train_mode(tb: TorchBackbone, phase: Phase) -> None:
    """model.train(), then eval mode for every frozen block (and, with bn='frozen', for the
    norm layers of the trainable ones). Call at the start of every training epoch: a bare
    model.train() would put frozen BatchNorm layers back into updating their statistics."""
    tb.model.train()
    unfrozen = set(trainable_blocks(tb, phase))
    for block in tb.block_map.blocks:
        for m in tb.block_modules(block):
            if block not in unfrozen:
                m.eval()
            elif phase.bn == "frozen":
                for sub in m.modules():
                    if isinstance(sub, _NORMS):
                        sub.eval()


@torch.no_grad()
def recalibrate_bn(tb: TorchBackbone, phase: Phase, batches, preprocess, device: torch.device,
                   precision: str) -> int:
    """Precise BatchNorm (bench/cell/loop.py): the norm layers the phase trains get their
    running statistics recomputed as the plain average over `batches` (momentum None),
    everything else in eval mode (frozen norms untouched, dropout off). Returns the number
    of layers recomputed; the model is left in eval mode."""
    set_train_mode(tb, phase)
    norms = [m for m in tb.model.modules()
             if isinstance(m, _NORMS) and m.training and m.track_running_stats]
    tb.model.eval()
    if not norms:
        return 0
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
        m.train()
    try:
        for x, _ in batches:
            with autocast(device, precision):
                tb.model(preprocess(x, train=False))
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
            m.eval()
    return len(norms)


def make_optimizer(name: str, params, lr: float, weight_decay: float):
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; allowed: adam, adamw, sgd")


def phase_optimizer(tb: TorchBackbone, phase: Phase, params: list[nn.Parameter], name: str,
                    lr: float, weight_decay: float):
    """make_optimizer for a phase's trainable `params`, with the phase's optimizer hooks:
    lr_decay -> one param group per named block at lr * its block_lr_scales; l2sp -> its
    penalty's gradient added before every step (l2sp_hook)."""
    groups = params
    if phase.lr_decay != 1.0:
        owner = dict(zip((id(p) for _, p in tb.model.named_parameters()),
                         tb.param_owner().values(), strict=True))
        scales = block_lr_scales(list(tb.block_map.blocks), phase)
        groups = [{"params": [p for p in params if owner[id(p)] == block], "lr": lr * s}
                  for block, s in scales.items()]
        groups = [g for g in groups if g["params"]]
    opt = make_optimizer(name, groups, lr, weight_decay)
    if phase.l2sp is not None:
        opt.register_step_pre_hook(l2sp_hook(tb, params, *phase.l2sp))
    return opt


def l2sp_hook(tb: TorchBackbone, params: list[nn.Parameter], alpha: float, beta: float):
    """An optimizer step pre-hook adding the gradient of L2-SP (Li et al. 2018),
    alpha/2 ||w - w0||^2 over the backbone and beta/2 ||w||^2 over the head, to the
    gradients: alpha * (w - w0) and beta * w, w0 the weights now (the phase's start). It
    runs inside opt.step(), so after GradScaler has unscaled the gradients; a zero
    coefficient adds nothing."""
    owner = dict(zip((id(p) for _, p in tb.model.named_parameters()),
                     tb.param_owner().values(), strict=True))
    terms = [(p, beta, None) if owner[id(p)] == "head" else (p, alpha, p.detach().clone())
             for p in params]
    terms = [t for t in terms if t[1]]

    @torch.no_grad()
    def hook(opt, args, kwargs):
        for p, c, w0 in terms:
            if p.grad is not None:
                p.grad.add_(p if w0 is None else p - w0, alpha=c)

    return hook


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def sync_fn(device: torch.device):
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    if device.type == "mps":
        return torch.mps.synchronize
    return lambda: None


class Trainer:
    """One model, its loss and precision settings; `train_epoch` and `evaluate`."""

    def __init__(self, tb: TorchBackbone, device: torch.device, precision: str = "fp32",
                 preprocess=None, compile: bool = False):
        self.tb = tb
        self.device = device
        self.precision = precision
        self.preprocess = preprocess
        self.compile = compile
        self._compiled: dict[int, nn.Module] = {}
        self.loss_fn = nn.CrossEntropyLoss()
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.sync = sync_fn(device)

    def forward_of(self, batches=None):
        """The module a batch goes through: the whole model, or the part above a feature
        cache (`batches.forward`); torch.compile'd once per module when asked (a change of
        requires_grad between phases recompiles through dynamo's guards)."""
        module = getattr(batches, "forward", None) or self.tb.model
        if not self.compile:
            return module
        if id(module) not in self._compiled:
            self._compiled[id(module)] = torch.compile(module)
        return self._compiled[id(module)]

    def inputs(self, batches, x: torch.Tensor, train: bool) -> torch.Tensor:
        """Images are preprocessed on the device; cached inputs already are."""
        if self.preprocess is None or getattr(batches, "preprocessed", False):
            return x
        return self.preprocess(x, train=train)

    def step(self, opt, x: torch.Tensor, y: torch.Tensor,
             forward=None) -> tuple[torch.Tensor, torch.Tensor]:
        forward = self.forward_of() if forward is None else forward
        with autocast(self.device, self.precision):
            logits = forward(x)
            loss = self.loss_fn(logits, y)
        opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(opt)
        self.scaler.update()
        return loss.detach(), logits.detach()

    def train_epoch(self, phase: Phase, opt, batches, meter: StepMeter | None = None,
                    on_step=None) -> dict[str, float]:
        set_train_mode(self.tb, phase)
        total_loss = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        n = 0
        forward = self.forward_of(batches)
        if meter is not None:
            meter.start()
        for i, (x, y) in enumerate(batches):
            loss, logits = self.step(opt, self.inputs(batches, x, train=True), y, forward)
            if not torch.isfinite(loss):  # a sync, but the meter syncs every step anyway
                raise Diverged(i + 1, loss.item())
            total_loss += loss * y.shape[0]
            correct += (logits.argmax(1) == y).sum()
            n += y.shape[0]
            if meter is not None:
                meter.step(y.shape[0])
            if on_step is not None:
                on_step(i)
        return {"train_loss": (total_loss / max(n, 1)).item(),
                "train_acc": correct.item() / max(n, 1)}

    @torch.no_grad()
    def evaluate(self, batches, topk: int = 1) -> dict[str, float]:
        self.tb.model.eval()
        total_loss = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        correct_k = torch.zeros((), device=self.device, dtype=torch.long)
        n = 0
        forward = self.forward_of(batches)
        for x, y in batches:
            with autocast(self.device, self.precision):
                logits = forward(self.inputs(batches, x, train=False))
            total_loss += nn.functional.cross_entropy(logits.float(), y, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
            if topk > 1:
                top = logits.topk(topk, dim=1).indices
                correct_k += (top == y[:, None]).any(1).sum()
            n += y.shape[0]
        out = {"loss": (total_loss / max(n, 1)).item(), "acc": correct.item() / max(n, 1)}
        if topk > 1:
            out[f"top{topk}"] = correct_k.item() / max(n, 1)
        return out
