"""Vision transformers, framework-free: one checkpoint in the Hugging Face format for both
frameworks, and the parameter-efficient methods made for attention blocks.

A checkpoint is a folder with `config.json` (transformers' ViTConfig) and
`model.safetensors`, the layout `ViTModel.save_pretrained` writes and the Hub serves. PyTorch
reads it with transformers (`ViTModel.from_pretrained`), Keras with keras_hub's own converter
(`keras_hub/src/utils/transformers/convert_vit.py`); a test writes one with random weights
and checks that both give the same features. The published weights (`weights = "imagenet"`)
come from the Hub's cache (`HF_HOME`, `HF_HUB_CACHE`), downloaded there when online; offline
with an empty cache a cell fails naming the file and the folder. `vit_tiny` has no published
weights: it trains from scratch or from the harness's own pretraining (`pretrained:<dataset>`).

Another input size than the checkpoint's: the position embeddings of the patch grid are
resized once, bicubic with align_corners=False, exactly as transformers' ViTEmbeddings
`interpolate_pos_encoding` does on every forward (`resize_position_embeddings`, numpy, the
same array loaded into both frameworks; tested against torch's `F.interpolate`).

Blocks: `embed` (patch embedding, class token, position embeddings), `block1..blockN` (one
transformer block each; the final LayerNorm belongs to the top block, as the last stage of a
CNN owns its last norm), then the head on the class token.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class TransformerInfo:
    name: str
    repo: str  # the Hub repository of the published weights ("": none, vit_tiny)
    image_size: int  # the checkpoint's
    patch_size: int
    hidden: int
    layers: int
    heads: int
    mlp: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str  # what the published weights are, for notes and the docs
    kind: str = "vit"  # transformers' model_type: vit (ViTModel) or dinov2 (Dinov2Model)

    def config(self, image_size: int | None = None) -> dict:
        """transformers' config fields for this architecture (random weights)."""
        common = {"image_size": image_size or self.image_size, "patch_size": self.patch_size,
                  "hidden_size": self.hidden, "num_hidden_layers": self.layers,
                  "num_attention_heads": self.heads, "hidden_act": "gelu",
                  "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
                  "qkv_bias": True, "num_channels": 3, "initializer_range": 0.02}
        if self.kind == "dinov2":  # LayerScale, a mask token, LayerNorm eps 1e-6
            return {"model_type": "dinov2", "architectures": ["Dinov2Model"], **common,
                    "mlp_ratio": self.mlp // self.hidden, "layer_norm_eps": 1e-6,
                    "layerscale_value": 1.0, "drop_path_rate": 0.0, "use_swiglu_ffn": False,
                    "use_mask_token": True}
        return {"model_type": "vit", "architectures": ["ViTModel"], **common,
                "intermediate_size": self.mlp, "layer_norm_eps": 1e-12}


_HALF = (0.5, 0.5, 0.5)
TRANSFORMERS: dict[str, TransformerInfo] = {
    t.name: t for t in [
        # Dosovitskiy et al. 2021's ViT-B/16 pretrained on ImageNet-21k, the weights V-PETL
        # Bench and VTAB-1k papers start from
        TransformerInfo("vit_b16", "google/vit-base-patch16-224-in21k", 224, 16, 768, 12, 12,
                        3072, _HALF, _HALF, "ImageNet-21k (google/vit-base-patch16-224-in21k)"),
        # small enough to train on two CPU cores: 6 blocks of width 128 on 4x4 patches of a
        # 32x32 image (65 tokens); not DeiT-Ti (192 wide, 12 blocks)
        TransformerInfo("vit_tiny", "", 32, 4, 128, 6, 4, 256, _HALF, _HALF,
                        "none published: pretrain it (pretrained:<dataset>)"),
        # Oquab et al. 2024's DINOv2 ViT-S/14 (self-supervised on LVD-142M), at 518 px as
        # published; a cell at 224 px resizes its position embeddings (16x16 patches)
        TransformerInfo("dinov2_s14", "facebook/dinov2-small", 518, 14, 384, 12, 6, 1536,
                        (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                        "LVD-142M, self-supervised (facebook/dinov2-small)", kind="dinov2"),
    ]
}


def info(name: str) -> TransformerInfo:
    return TRANSFORMERS[name]


def image_problem(name: str, image_size: int) -> str | None:
    """Why `name` cannot run at `image_size`, or None."""
    t = TRANSFORMERS[name]
    if image_size % t.patch_size:
        ok = [s for s in (t.image_size, 224, 32) if s % t.patch_size == 0]
        return (f"{name} cuts images into {t.patch_size}x{t.patch_size} patches: image_size "
                f"{image_size} is not a multiple of {t.patch_size} (e.g. {ok[0]})")
    return None


# ---- the checkpoint folder --------------------------------------------------------------
CONFIG, WEIGHTS = "config.json", "model.safetensors"


class CheckpointUnavailable(RuntimeError):
    pass


def hub_cache_dir() -> Path:
    """Where huggingface_hub keeps downloaded repositories (HF_HUB_CACHE, else HF_HOME/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def published_problem(name: str) -> str | None:
    """Why `name` has no `imagenet` weights (none published), or None."""
    t = TRANSFORMERS[name]
    if t.repo:
        return None
    return (f"{name} has no published weights; pretrain it (weights = "
            f"'pretrained:<dataset>') or start from random ('none')")


def published_folder(name: str) -> Path:
    """The folder holding `name`'s published checkpoint (config.json + model.safetensors),
    from the Hub's cache, downloaded into it when online."""
    t = TRANSFORMERS[name]
    problem = published_problem(name)
    if problem:
        raise CheckpointUnavailable(problem)
    from huggingface_hub import hf_hub_download

    paths = []
    for fname in (CONFIG, WEIGHTS):
        try:
            paths.append(Path(hf_hub_download(t.repo, fname)))
        except Exception as e:  # offline, no cache, a partial download
            raise CheckpointUnavailable(
                f"{name}: {fname} of {t.repo} is not in the Hugging Face cache and could not "
                f"be downloaded ({type(e).__name__}: {str(e)[:160]}). Put the repository's "
                f"{fname} into {hub_cache_dir()}/models--{t.repo.replace('/', '--')}/"
                f"snapshots/<revision>/ (`huggingface-cli download {t.repo}` on a machine "
                f"with network; HF_HOME moves the cache), or use weights = 'none'") from e
    return paths[0].parent


def read_config(folder: Path) -> dict:
    return json.loads((Path(folder) / CONFIG).read_text())


def folder_problem(name: str, folder: Path) -> str | None:
    """Why `folder` is not a checkpoint `name` can load (the Hugging Face layout, the same
    architecture), or None: what a grid's `weights = "<path>"` must be for a transformer."""
    missing = [f for f in (CONFIG, WEIGHTS) if not (folder / f).is_file()]
    if missing:
        return (f"{name} loads a checkpoint folder in the Hugging Face layout ({CONFIG} and "
                f"{WEIGHTS}, as save_pretrained writes it); {folder} has no "
                f"{' or '.join(missing)}")
    try:
        check_fits(name, read_config(folder))
    except (OSError, ValueError) as e:  # unreadable or not JSON; another architecture
        return str(e)
    return None


def check_fits(name: str, config: dict) -> None:
    """The checkpoint's architecture is `name`'s (not another width or depth)."""
    t = TRANSFORMERS[name]
    want = {"model_type": t.kind, "hidden_size": t.hidden, "num_hidden_layers": t.layers,
            "num_attention_heads": t.heads, "patch_size": t.patch_size,
            **({"mlp_ratio": t.mlp // t.hidden} if t.kind == "dinov2"
               else {"intermediate_size": t.mlp})}
    bad = {k: (config.get(k), v) for k, v in want.items() if config.get(k) != v}
    if bad:
        raise ValueError(f"checkpoint config does not fit {name}: " + ", ".join(
            f"{k} = {got} (expected {exp})" for k, (got, exp) in bad.items()))


# ---- position embeddings at another image size --------------------------------------------
def _cubic(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """The 4 weights of torch's bicubic kernel (a = -0.75) for offsets -1, 0, 1, 2 at t."""
    def near(x):
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def _resize_axis(x: np.ndarray, out: int, axis: int) -> np.ndarray:
    """torch's bicubic along one axis (align_corners=False, borders clamped)."""
    n = x.shape[axis]
    src = (np.arange(out) + 0.5) * (n / out) - 0.5
    base = np.floor(src).astype(int)
    w = _cubic(src - base)  # (out, 4)
    idx = np.clip(base[:, None] + np.arange(-1, 3)[None, :], 0, n - 1)  # (out, 4)
    moved = np.moveaxis(x, axis, 0)  # (n, ...)
    res = np.einsum("ok,ok...->o...", w, moved[idx])
    return np.moveaxis(res, 0, axis)


def resize_position_embeddings(pos: np.ndarray, grid: int) -> np.ndarray:
    """(1, 1 + g*g, D) -> (1, 1 + grid*grid, D): the class token's kept, the patch grid's
    resized bicubic (transformers' interpolate_pos_encoding, once instead of every forward)."""
    g = int(round(math.sqrt(pos.shape[1] - 1)))
    if g * g != pos.shape[1] - 1:
        raise ValueError(f"position embeddings of {pos.shape[1] - 1} patches are not a square "
                         f"grid")
    if g == grid:
        return pos
    patches = pos[0, 1:].reshape(g, g, -1).astype(np.float64)
    patches = _resize_axis(_resize_axis(patches, grid, 0), grid, 1)
    flat = patches.reshape(1, grid * grid, -1).astype(pos.dtype)
    return np.concatenate([pos[:, :1], flat], axis=1)


# ---- parameter-efficient methods: shared initialisation ----------------------------------
def is_addition(name: str) -> bool:
    """Whether a parameter (PyTorch name) or variable (Keras path) is a method's own, built
    with the model (VPT's prompts, the adapters): a pretrained checkpoint of the backbone has
    none, and they keep their fresh init when it is loaded."""
    parts = name.replace("/", ".").split(".")
    return parts[-1] == "prompt" or any(p == "adapter" or p.startswith("adapter_")
                                        for p in parts)


def rng(seed: int, what: str) -> np.random.Generator:
    """The generator a method's new parameters are drawn from (the same in both frameworks)."""
    return np.random.default_rng([seed, sum(map(ord, what)), 0xB0B])


def prompt_init(gen: np.random.Generator, length: int, t: TransformerInfo) -> np.ndarray:
    """VPT's prompts (Jia et al., ECCV 2022, their code): uniform in +-sqrt(6 / (3 p^2 + D))
    (Xavier over the patch projection's fan), float32 (length, D)."""
    bound = math.sqrt(6.0 / (3 * t.patch_size ** 2 + t.hidden))
    return gen.uniform(-bound, bound, size=(length, t.hidden)).astype(np.float32)


def adapter_init(gen: np.random.Generator, width: int, hidden: int) -> dict[str, np.ndarray]:
    """A bottleneck adapter (down D->w, GELU, up w->D) that starts as the identity: the down
    projection uniform in +-1/sqrt(D) (kaiming_uniform(a=sqrt(5)), PyTorch's Linear init),
    the up projection and both biases zero (AdaptFormer's init). Weights in PyTorch's
    (out, in) layout."""
    bound = 1.0 / math.sqrt(hidden)
    return {"down_w": gen.uniform(-bound, bound, (width, hidden)).astype(np.float32),
            "down_b": np.zeros(width, np.float32),
            "up_w": np.zeros((hidden, width), np.float32),
            "up_b": np.zeros(hidden, np.float32)}
