"""Feature caching for PyTorch: the frozen part of a model computed once, in eval mode.

Two cuts (bench/cell/loop.py decides which a phase gets):
- `features`: the whole backbone is frozen; the cut is the head's input (pooled, flattened
  features, captured by a forward pre-hook), so it works for any model with a head module.
- `prefix`: the bottom blocks are frozen; torch.fx splits the traced model after them, at the
  first point where a single tensor crosses, into a prefix (cached) and a suffix (trained).
  Both GraphModules hold the model's own modules (shared parameters, buffers and train/eval
  flags). Every shipped backbone gets this cut at every depth (tested). A model fx cannot
  trace, or without a single-tensor cut, gets `CacheUnavailable` with the reason.

The tracer keeps every module without submodules opaque (a `call_module` node, run as it is,
owned by its block), torch.nn's and others alike: EfficientNet-Lite0's SameConv2d computes
TensorFlow's "SAME" padding from its input's size, which fx cannot trace through, and
torchvision's StochasticDepth and LayerNorm2d run their own forward unchanged. Only modules
with submodules are traced through, except transformers' modules (a ViT's embeddings and
layers check their inputs' shapes in Python): each runs whole, as one node of its block.
Tracing bakes such a module's `self.training` into the graph, so the suffix is traced with
the model in the phase's training mode (bench's set_train_mode): it is used for training
only; evaluation runs the whole model.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from bench.cell.loop import CacheUnavailable
from strategies.torch_backend.backbones import TorchBackbone

__all__ = ["CacheUnavailable", "compute", "head_inputs", "shares_parameters", "split_after"]


def head_inputs(tb: TorchBackbone, x: torch.Tensor) -> torch.Tensor:
    """What the head receives for images `x` (already preprocessed): the model run once with a
    pre-hook on the head."""
    seen = []
    hook = tb.head.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        tb.model(x)
    finally:
        hook.remove()
    return seen[0]


class _LeafTracer(fx.Tracer):
    """fx's tracer with every module that has no submodules kept opaque (see the docstring):
    the computation is the module's own forward, unchanged."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (next(m.children(), None) is None
                or type(m).__module__.startswith("transformers.")
                or super().is_leaf_module(m, module_qualified_name))


def _trace(model: nn.Module) -> fx.GraphModule:
    tracer = _LeafTracer()
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _owner_fn(tb: TorchBackbone):
    prefixes = [(p, b) for b, ps in tb.block_map.blocks.items() for p in ps]
    prefixes.append((tb.block_map.classifier, "head"))

    def owner(target: str) -> str | None:
        hits = [b for p, b in prefixes if target == p or target.startswith(p + ".")]
        return hits[0] if hits else None  # weightless modules outside the map (ReLU, pools)

    return owner


def split_after(tb: TorchBackbone, n_frozen: int) -> tuple[fx.GraphModule, fx.GraphModule]:
    """(prefix, suffix) with suffix(prefix(x)) == model(x): prefix runs the bottom `n_frozen`
    blocks. Trace with the model already in the phase's training mode (see the docstring)."""
    blocks = list(tb.block_map.blocks)
    frozen = set(blocks[:n_frozen])
    try:
        gm = _trace(tb.model)
    except Exception as e:  # noqa: BLE001 - any tracing failure means no prefix cache
        raise CacheUnavailable(f"torch.fx cannot trace {tb.name} "
                               f"({type(e).__name__}: {str(e)[:120]})") from e
    owner = _owner_fn(tb)
    nodes = list(gm.graph.nodes)
    index = {nd: i for i, nd in enumerate(nodes)}
    owners = [owner(nd.target) if nd.op in ("call_module", "get_attr") else None for nd in nodes]
    last = max((i for i, o in enumerate(owners) if o in frozen), default=-1)
    if last < 0:
        raise CacheUnavailable(f"no traced module belongs to {sorted(frozen)}")
    last_use = {nd: max((index[u] for u in nd.users), default=-1) for nd in nodes}
    cut_at = None
    for p in range(last, len(nodes) - 1):
        if owners[p] is not None and owners[p] not in frozen:
            break  # a trainable module before any single-tensor cut
        live = [nd for nd in nodes[:p + 1] if last_use[nd] > p]
        if len(live) == 1 and live[0].op != "placeholder":
            cut_at = p
            break
    if cut_at is None:
        raise CacheUnavailable(f"{tb.name}: no single tensor leaves the bottom {n_frozen} "
                               f"blocks")
    cut = next(nd for nd in nodes[:cut_at + 1] if last_use[nd] > cut_at)

    pg, env = fx.Graph(), {}
    for nd in nodes[:cut_at + 1]:
        env[nd] = pg.node_copy(nd, lambda n: env[n])
    pg.output(env[cut])
    sg = fx.Graph()
    env = {cut: sg.placeholder("cut")}
    for nd in nodes[cut_at + 1:]:
        if nd.op == "output":
            sg.output(fx.map_arg(nd.args[0], lambda n: env[n]))
        else:
            env[nd] = sg.node_copy(nd, lambda n: env[n])
    return fx.GraphModule(gm, pg), fx.GraphModule(gm, sg)


@torch.no_grad()
def compute(batches, fn, preprocess, autocast_ctx, limit_bytes: int) -> torch.Tensor:
    """fn(preprocessed images) for every item of `batches` in index order, concatenated;
    CacheUnavailable as soon as the whole would exceed `limit_bytes`."""
    out, total = [], None
    for x, _ in batches.ordered():
        with autocast_ctx():
            f = fn(preprocess(x, train=False))
        if total is None:
            total = f[0].numel() * f.element_size() * batches.n
            if total > limit_bytes:
                raise CacheUnavailable(f"needs {total / 2**20:.0f} MB, more than the "
                                       f"{limit_bytes / 2**20:.0f} MB allowed")
        out.append(f)
    return torch.cat(out)


def shares_parameters(part: nn.Module, model: nn.Module) -> bool:
    """Every parameter of `part` is one of `model`'s (the split holds no copies)."""
    ids = {id(p) for p in model.parameters()}
    return all(id(p) in ids for p in part.parameters())
