"""PyTorch, vision transformers: what the parameter-efficient methods cost per step.

VPT, LoRA and adapters backpropagate through the whole network (the gradient must reach the
prompts in block 1 and the adapters in every block) but update few weights: their step is
expected to cost about full fine-tuning's (target: step time <= 1.0x full's), with less
memory for gradients and optimizer state. Measured here per method on the same backbone and
batch: the train step (forward, backward, Adam step; a synthetic batch already on the
device, median of 10 after 3 warm-up) as a ratio to full fine-tuning's, and the memory a
step holds: on CUDA the peak allocated; on the CPU, where PyTorch has no allocator counter,
the tensors autograd saves for the backward (counted by saved_tensors_hooks) plus the
gradients and Adam's two moments of the trained parameters.

CPU (default): vit_tiny, 32 px, batch 32, fp32. --device cuda: ViT-B/16, 224 px, batch 64,
bf16 autocast with PyTorch's scaled-dot-product attention (transformers' "sdpa").
"""

from __future__ import annotations

import pytest
import torch

from bench.cell.timing import measure
from strategies import registry
from strategies.torch_backend import resolve_device
from strategies.torch_backend.backbones import build
from strategies.torch_backend.train import apply_phase, autocast, sync_fn

METHODS = {"full": {}, "lora": {"depth": "all", "rank": 8}, "vpt": {"length": 10},
           "adapter": {"width": 8}, "bitfit": {}, "feature_extraction": {}}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread, as test_1_torch (a shared 2-core machine)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for the backward while `fn` runs."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def _step_fn(tb, params, x, y, dev, precision):
    opt = torch.optim.Adam(params, lr=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        with autocast(dev, precision):
            loss = loss_fn(tb.model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def test_peft_step_vs_full_on_cpu_or_gpu(benchmark, device, report):
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    backbone, size, batch, precision = (("vit_b16", 224, 64, "bf16") if cuda
                                        else ("vit_tiny", 32, 32, "fp32"))
    sync = sync_fn(dev)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=gen).to(dev)
    y = torch.randint(0, 10, (batch,), generator=gen).to(dev)
    rates, memory, trained = {}, {}, {}
    for name, params in METHODS.items():
        strat = registry.get(name)
        torch.manual_seed(0)
        tb = build(backbone, "none", 10, image_size=size, additions=strat.additions(params))
        tb.model.to(dev).train()
        (phase, _), = strat.phases(params, 1, len(tb.block_map.blocks))
        ps = apply_phase(tb, phase, seed=0)
        trained[name] = sum(p.numel() for p in ps)
        step = _step_fn(tb, ps, x, y, dev, precision)
        if cuda:
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        rates[name] = measure(step, batch, steps=10, warmup=3, sync=sync)
        if name == "full":  # pytest-benchmark's own record of the reference step
            benchmark.pedantic(step, rounds=3, iterations=1)
        if cuda:
            memory[name] = torch.cuda.max_memory_allocated(dev) / 2**20
        else:
            state = sum(p.numel() * p.element_size() for p in ps) * 3  # grad + Adam's 2
            memory[name] = (_saved_bytes(step) + state) / 2**20
        del tb, step
    for name in METHODS:
        report(f"torch {backbone} {name} step vs full", device=str(dev), img_s=rates[name],
               step_time_ratio=rates["full"] / rates[name], target="<= 1.0 (peft)",
               memory_mb=memory[name], memory_ratio=memory[name] / memory["full"],
               trained_params=trained[name])
