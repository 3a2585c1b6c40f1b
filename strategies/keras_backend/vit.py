"""Vision transformers for the Keras backend, built with keras_hub's ViT layers.

The weights come from the same checkpoint folder PyTorch reads (strategies/transformers.py),
through keras_hub's own converter (`keras_hub/src/utils/transformers/convert_vit.py`) with
one change to its loader: the converter asks for `vit.`-prefixed keys (a
ViTForImageClassification file) and a `ViTModel` checkpoint such as
google/vit-base-patch16-224-in21k has none, so the loader also tries the key without the
prefix; and the position embeddings arrive resized when the image size is not the
checkpoint's (the same numpy resize PyTorch loads).

The model: uint8 images -> `preprocess` ((x/255 - mean)/std) -> `vit_embed` (keras_hub's
ViTPatchingAndEmbedding) -> per block: `vit_prompt<i>` (VPT) and `vit_block<i>` (keras_hub's
ViTEncoderBlock, with the adapter after its MLP where the strategy has one) -> `vit_norm`
(the final LayerNorm, then the class token) -> the new head. keras_hub's blocks compute
exactly the PyTorch ViTLayer's math (tested: the same features from the same checkpoint);
LayerNorm's epsilon is the checkpoint's (keras_hub's converter leaves its default, 1e-6).
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from strategies import transformers as tr


class Normalize(keras.layers.Layer):
    """uint8 images -> (x/255 - mean) / std, float32; weightless."""

    def __init__(self, mean, std, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.mean, self.std = tuple(mean), tuple(std)

    def call(self, x):
        x = keras.ops.cast(x, "float32") / 255.0
        return (x - np.array(self.mean, "float32")) / np.array(self.std, "float32")


class Embed(keras.layers.Layer):
    def __init__(self, inner, **kwargs):
        super().__init__(**kwargs)
        self.inner = inner

    def call(self, x):
        return self.inner(x)


class Prompt(keras.layers.Layer):
    """Prompt tokens after the class token, replacing `replace` earlier ones (VPT)."""

    def __init__(self, values: np.ndarray, replace: int, **kwargs):
        super().__init__(**kwargs)
        self.replace = replace
        self.prompt = self.add_weight(shape=values.shape, name="prompt",
                                      initializer=keras.initializers.Constant(values))

    def call(self, h):
        n = keras.ops.shape(h)[0]
        p = keras.ops.broadcast_to(keras.ops.cast(self.prompt, h.dtype)[None],
                                   (n, *self.prompt.shape))
        return keras.ops.concatenate([h[:, :1], p, h[:, 1 + self.replace:]], axis=1)


class Adapter(keras.layers.Layer):
    """y + up(gelu(down(y))), PyTorch's weights transposed (Keras' (in, out) kernels)."""

    def __init__(self, init: dict, **kwargs):
        super().__init__(**kwargs)
        const = keras.initializers.Constant
        self.down_kernel = self.add_weight(shape=init["down_w"].T.shape, name="adapter_down",
                                           initializer=const(init["down_w"].T))
        self.down_bias = self.add_weight(shape=init["down_b"].shape, name="adapter_down_b",
                                         initializer=const(init["down_b"]))
        self.up_kernel = self.add_weight(shape=init["up_w"].T.shape, name="adapter_up",
                                         initializer=const(init["up_w"].T))
        self.up_bias = self.add_weight(shape=init["up_b"].shape, name="adapter_up_b",
                                       initializer=const(init["up_b"]))

    def call(self, y):
        low = keras.activations.gelu(keras.ops.matmul(y, self.down_kernel) + self.down_bias,
                                     approximate=False)
        return y + keras.ops.matmul(low, self.up_kernel) + self.up_bias


class Block(keras.layers.Layer):
    """keras_hub's transformer block; with an adapter, the block's own call with the adapter
    on the MLP's output inside the residual branch (as PyTorch's hook on the layer's mlp):
    ViTEncoderBlock, or DINOv2's layer with its LayerScale after the adapted MLP."""

    def __init__(self, inner, adapter: Adapter | None = None, **kwargs):
        super().__init__(**kwargs)
        self.inner, self.adapter = inner, adapter

    def call(self, x):
        b = self.inner
        if self.adapter is None:
            return b(x)
        if hasattr(b, "layer_scale1"):  # keras_hub's DINOV2Layer (drop path: rate 0)
            h = b.layer_scale1(b.attention(b.norm1(x))) + x
            return h + b.layer_scale2(self.adapter(b.mlp(b.norm2(h))))
        h = b.layer_norm_1(x)
        h = b.dropout(b.mha(h, h)) + x
        return h + self.adapter(b.mlp(b.layer_norm_2(h)))


class ClassToken(keras.layers.Layer):
    """The final LayerNorm, then the class token: what the head sees."""

    def __init__(self, norm, **kwargs):
        super().__init__(**kwargs)
        self.norm = norm

    def call(self, x):
        return self.norm(x)[:, 0]


class _Loader:
    """keras_hub's SafetensorLoader, tolerant of a ViTModel file (keys without `vit.`), with
    the position embeddings resized to `grid` x `grid` patches."""

    def __new__(cls, folder, grid: int):
        from keras_hub.src.utils.transformers.safetensor_utils import SafetensorLoader

        class Loader(SafetensorLoader):
            def get_tensor(self, key):
                try:
                    value = super().get_tensor(key)
                except Exception:  # noqa: BLE001 - safetensors' own error type
                    if not key.startswith("vit."):
                        raise
                    self.prefix = None
                    value = super().get_tensor(key[len("vit."):])
                if key.endswith("embeddings.position_embeddings"):
                    value = tr.resize_position_embeddings(value, grid)
                return value

        return Loader(str(folder))


def keras_hub_backbone(name: str, weights: str, image_size: int):
    """keras_hub's backbone for `name` at `image_size` (ViTBackbone, DINOV2Backbone) with the
    checkpoint's weights (imagenet: the published folder; a path: that folder) or keras_hub's
    random init; and its parts: (embedding, blocks, final LayerNorm)."""
    from keras_hub.src.utils.transformers import convert_dinov2, convert_vit

    t = tr.info(name)
    random = weights == "none" or weights.startswith("pretrained:")
    folder = (None if random else tr.published_folder(name) if weights == "imagenet"
              else Path(weights).expanduser())
    config = t.config(image_size) if random else tr.read_config(folder)
    tr.check_fits(name, config)
    convert = convert_dinov2 if t.kind == "dinov2" else convert_vit
    # at the cell's size: keras_hub's own resize (TensorFlow's bicubic for DINOv2) never runs;
    # the loader hands it the position embeddings resized as PyTorch's are
    kwargs = convert.convert_backbone_config({**config, "image_size": image_size})
    if t.kind == "vit":  # keras_hub's converter leaves ViT's epsilon at its 1e-6 default
        kwargs["layer_norm_epsilon"] = config.get("layer_norm_eps", 1e-12)
    backbone = convert.backbone_cls(**kwargs)
    if folder is not None:
        with _Loader(folder, image_size // t.patch_size) as loader:
            convert.convert_weights(backbone, loader, config)
    if t.kind == "dinov2":
        return backbone, (backbone.embeddings, backbone.encoder.layers, backbone.layernorm)
    return backbone, (backbone.layers[1], backbone.layers[2].encoder_layers,
                      backbone.layers[2].layer_norm)


def build_body(name: str, weights: str, image_size: int, additions: dict, seed: int):
    """(input, features) of the transformer, layers named for the block map."""
    t = tr.info(name)
    _, (embed, blocks, norm) = keras_hub_backbone(name, weights, image_size)
    inp = keras.Input((image_size, image_size, 3), dtype="uint8", name="image")
    x = Normalize(t.mean, t.std, name="preprocess")(inp)
    x = Embed(embed, name="vit_embed")(x)
    prompts = additions.get("prompts")
    gen_p, gen_a = tr.rng(seed, "vpt"), tr.rng(seed, "adapter")
    for i, inner in enumerate(blocks):
        if prompts and (i == 0 or prompts[1]):
            x = Prompt(tr.prompt_init(gen_p, prompts[0], t), prompts[0] if i else 0,
                       name=f"vit_prompt{i + 1}")(x)
        adapter = (Adapter(tr.adapter_init(gen_a, additions["adapters"], t.hidden),
                           name=f"vit_adapter{i + 1}") if "adapters" in additions else None)
        x = Block(inner, adapter, name=f"vit_block{i + 1}")(x)
    return inp, ClassToken(norm, name="vit_norm")(x)


def block_patterns(name: str) -> dict[str, tuple[str, ...]]:
    """The named blocks as layer-name regexes (the final norm with the top block)."""
    n = tr.info(name).layers
    out = {"embed": (r"preprocess$", r"vit_embed$")}
    for i in range(1, n + 1):
        out[f"block{i}"] = (f"vit_prompt{i}$", f"vit_block{i}$",
                            *((r"vit_norm$",) if i == n else ()))
    return out
