"""Vision transformers for the PyTorch backend, built with transformers' ViT modules.

`ViTNet` holds the parts of transformers' `ViTModel` (or `Dinov2Model`) as its own children,
`embeddings`, `layers` (one ViTLayer / Dinov2Layer per block) and `layernorm`, and runs them
in a plain loop, then the new head on the class token: the same computation as the model's
`last_hidden_state[:, 0]` (tested), with two places the parameter-efficient methods hook
into:

- VPT (Jia et al., ECCV 2022): `prompts.block<i>` holds block i's prompt tokens, inserted
  after the class token before the block runs; deep prompts replace the previous block's,
  shallow ones (block1 only) travel through every block.
- adapters: `layers.<i>.adapter`, a bottleneck (down, GELU, up) added to the MLP's output
  inside its residual branch (Houlsby/Pfeiffer placement: after the MLP), by a forward hook
  on `layers.<i>.mlp`.

Adapters start as the identity (their up projection at zero); prompts add tokens, so a VPT
model's class token differs from the backbone's from the first step, as in the paper. Both
are drawn from the cell's seed (strategies/transformers.py) when the model is built, so the
block map knows them. Weights: a checkpoint folder read by `from_pretrained` (the published
ones from the Hub cache) or transformers' own random init from the cell's seed ('none').
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from strategies import transformers as tr


class Prompt(nn.Module):
    """Prompt tokens placed after the class token, replacing `replace` earlier ones."""

    def __init__(self, values, replace: int):
        super().__init__()
        self.prompt = nn.Parameter(torch.from_numpy(values))
        self.replace = replace

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        p = self.prompt.to(h.dtype).unsqueeze(0).expand(h.shape[0], -1, -1)
        return torch.cat([h[:, :1], p, h[:, 1 + self.replace:]], dim=1)


class Adapter(nn.Module):
    def __init__(self, init: dict):
        super().__init__()
        width, hidden = init["down_w"].shape
        self.down, self.up = nn.Linear(hidden, width), nn.Linear(width, hidden)
        with torch.no_grad():
            for lin, key in ((self.down, "down"), (self.up, "up")):
                lin.weight.copy_(torch.from_numpy(init[f"{key}_w"]))
                lin.bias.copy_(torch.from_numpy(init[f"{key}_b"]))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.up(F.gelu(self.down(y)))


def _add_adapter_hook(module, inputs, output):
    return module.adapter_ref(output)


class ViTNet(nn.Module):
    def __init__(self, vit, head: nn.Module):
        super().__init__()
        layers = vit.layers if hasattr(vit, "layers") else vit.encoder.layer  # Dinov2Model
        self.embeddings, self.layers, self.layernorm = vit.embeddings, layers, vit.layernorm
        self.head = head
        self.prompts = nn.ModuleDict()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embeddings(x)
        for i, layer in enumerate(self.layers):
            key = f"block{i + 1}"
            if key in self.prompts:
                h = self.prompts[key](h)
            h = layer(h)
        return self.head(self.layernorm(h)[:, 0])

    def add_prompts(self, t: tr.TransformerInfo, length: int, deep: bool, seed: int) -> None:
        gen = tr.rng(seed, "vpt")
        for i in range(len(self.layers) if deep else 1):
            replace = length if i else 0
            self.prompts[f"block{i + 1}"] = Prompt(tr.prompt_init(gen, length, t), replace)

    def add_adapters(self, t: tr.TransformerInfo, width: int, seed: int) -> None:
        gen = tr.rng(seed, "adapter")
        for layer in self.layers:
            layer.adapter = Adapter(tr.adapter_init(gen, width, t.hidden))
            object.__setattr__(layer.mlp, "adapter_ref", layer.adapter)  # not a 2nd owner
            layer.mlp.register_forward_hook(_add_adapter_hook)


def vit_model(name: str, weights: str, image_size: int):
    """transformers' ViTModel for `name` at `image_size`: the published checkpoint
    (weights='imagenet'), a checkpoint folder (a path), or random ('none', 'pretrained:...'
    which load_backbone fills). Another size than the checkpoint's: the position embeddings
    resized once (strategies/transformers.py)."""
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # no "some weights were not initialised" for the pooler
    hf_logging.disable_progress_bar()
    t = tr.info(name)
    cls, config_cls = ((transformers.Dinov2Model, transformers.Dinov2Config) if t.kind ==
                       "dinov2" else (transformers.ViTModel, transformers.ViTConfig))
    extra = {} if t.kind == "dinov2" else {"add_pooling_layer": False}
    if weights == "none" or weights.startswith("pretrained:"):
        # transformers' init draws from torch's global generator: the cell seeded it
        return cls(config_cls(**t.config(image_size)), **extra)
    folder = tr.published_folder(name) if weights == "imagenet" else Path(weights).expanduser()
    config = tr.read_config(folder)
    tr.check_fits(name, config)
    model = cls.from_pretrained(str(folder), attn_implementation="sdpa", **extra)
    if config["image_size"] != image_size:
        pos = model.embeddings.position_embeddings.detach().numpy()
        grid = image_size // t.patch_size
        model.embeddings.position_embeddings = nn.Parameter(
            torch.from_numpy(tr.resize_position_embeddings(pos, grid)))
        model.config.image_size = image_size
        model.embeddings.image_size = (image_size, image_size)
        model.embeddings.patch_embeddings.image_size = (image_size, image_size)
        model.embeddings.patch_embeddings.num_patches = grid * grid
    return model


def block_prefixes(net: ViTNet) -> dict[str, tuple[str, ...]]:
    """The named blocks as module prefixes: embed, block<i> (its layer and prompts), the
    final LayerNorm with the top block."""
    n = len(net.layers)
    out = {"embed": ("embeddings",)}
    for i in range(n):
        key = f"block{i + 1}"
        out[key] = (f"layers.{i}", *((f"prompts.{key}",) if key in net.prompts else ()),
                    *(("layernorm",) if i == n - 1 else ()))
    return out
