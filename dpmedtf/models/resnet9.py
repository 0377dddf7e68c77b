"""The paper's GroupNorm ResNet9 in 2D and its ACS-3D twin.

A residual network after He et al. with one basic block per stage: stem Conv7×7/2 → GN → act →
MaxPool3×3/2; stages of width 64, 128, 256, 512 with strides 1, 2, 2, 2, each Conv3×3 → GN → act →
Conv3×3 → GN plus a 1×1 conv + GN shortcut where the shape changes, added, then act; global average
pooling to a 512-long feature vector and a linear head producing logits. Every BatchNorm of the
original is GroupNorm(32) (batch statistics mix examples, which DP-SGD forbids), and Klause et al.'s
modifications are available: Mish (the DP default) and scale normalisation (a GroupNorm after each
residual add). Convolutions carry no bias (the GroupNorm after each supplies the shift), which gives
the paper's 4,909,896 trainable parameters for 3-channel input and 8 outputs.

Layer names are the same in 2D and 3D, so ``convert_to_acs`` can carry weights across by name.
GroupNorm and Mish are ``models.layers``' faster equivalents of Keras' GroupNormalization and
Activation("mish") (same weights, names and outputs); ``fast_layers=False`` builds Keras' own, the
layers of models saved before, which still load and convert.
"""

from __future__ import annotations

from typing import Sequence

import tensorflow as tf

from dpmedtf.errors import ModelError
from dpmedtf.models.acs import ACSConv
from dpmedtf.models.layers import GroupNorm, Mish

PAPER_WIDTHS = (64, 128, 256, 512)
STAGE_STRIDES = (1, 2, 2, 2)
# PyTorch's GroupNorm epsilon, which the paper's implementation used (Keras defaults to 1e-3).
GROUPNORM_EPSILON = 1e-5
MIN_INPUT_SIZE = 32


def build_resnet9(input_shape: Sequence[int], num_outputs: int, activation: str = "mish", groups: int = 32,
                  scale_norm: bool = False, widths: Sequence[int] = PAPER_WIDTHS,
                  name: str = "resnet9", fast_layers: bool = True) -> tf.keras.Model:
    """GroupNorm ResNet9: 2D for ``input_shape`` (H, W, C), ACS-3D for (D, H, W, C). Outputs logits.

    ``fast_layers=False`` uses Keras' GroupNormalization and Activation("mish") instead of dpmedtf's
    GroupNorm and Mish (the same network, slower; for comparison).
    """
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) not in (3, 4):
        raise ModelError(f"input_shape must be (H, W, C) or (D, H, W, C), got {input_shape}")
    if any(s < MIN_INPUT_SIZE for s in input_shape[:-1]):
        raise ModelError(f"every spatial size must be ≥ {MIN_INPUT_SIZE} (five halvings), got {input_shape[:-1]}; "
                         "raise data.image_size or data.volume_shape")
    if activation not in ("mish", "relu"):
        raise ModelError(f"activation must be 'mish' or 'relu', got {activation!r} (model.activation)")
    if len(widths) != 4 or any(w % groups for w in widths):
        raise ModelError(f"widths must be 4 stage widths divisible by groups={groups}, got {tuple(widths)}; "
                         "set model.groups to a divisor of every width, e.g. 32")
    if num_outputs < 1:
        raise ModelError(f"num_outputs must be ≥ 1, got {num_outputs}")
    ops = _Ops(volumetric=len(input_shape) == 4, activation=activation, groups=groups, fast=fast_layers)

    inputs = tf.keras.Input(input_shape, name="image")
    x = ops.conv(inputs, widths[0], 7, 2, "stem_conv")
    x = ops.act(ops.norm(x, "stem_gn"), "stem_act")
    x = ops.max_pool(x, "stem_pool")
    for stage, (width, stride) in enumerate(zip(widths, STAGE_STRIDES), start=1):
        x = _basic_block(ops, x, width, stride, scale_norm, f"stage{stage}")
    features = ops.global_pool(x, "features")
    logits = tf.keras.layers.Dense(num_outputs, name="logits")(features)
    return tf.keras.Model(inputs, logits, name=name)


def _basic_block(ops: "_Ops", x: tf.Tensor, width: int, stride: int, scale_norm: bool, prefix: str) -> tf.Tensor:
    shortcut = x
    if stride != 1 or int(x.shape[-1]) != width:
        shortcut = ops.norm(ops.conv(x, width, 1, stride, f"{prefix}_shortcut_conv"), f"{prefix}_shortcut_gn")
    y = ops.act(ops.norm(ops.conv(x, width, 3, stride, f"{prefix}_conv1"), f"{prefix}_gn1"), f"{prefix}_act1")
    y = ops.norm(ops.conv(y, width, 3, 1, f"{prefix}_conv2"), f"{prefix}_gn2")
    y = tf.keras.layers.Add(name=f"{prefix}_add")([y, shortcut])
    if scale_norm:
        y = ops.norm(y, f"{prefix}_scale_gn")
    return ops.act(y, f"{prefix}_act2")


class _Ops:
    """The layer vocabulary of one dimensionality: Conv2D/pools for 2D, ACSConv/3D pools for volumes."""

    def __init__(self, volumetric: bool, activation: str, groups: int, fast: bool = True):
        self.volumetric, self.activation, self.groups, self.fast = volumetric, activation, groups, fast

    def conv(self, x, filters, kernel_size, strides, name):
        if self.volumetric:
            return ACSConv(filters, kernel_size, strides, padding="same", use_bias=False, name=name)(x)
        return tf.keras.layers.Conv2D(filters, kernel_size, strides, padding="same", use_bias=False,
                                      kernel_initializer="he_normal", name=name)(x)

    def norm(self, x, name):
        norm = GroupNorm if self.fast else tf.keras.layers.GroupNormalization
        return norm(self.groups, epsilon=GROUPNORM_EPSILON, name=name)(x)

    def act(self, x, name):
        if self.fast and self.activation == "mish":
            return Mish(name=name)(x)
        return tf.keras.layers.Activation(self.activation, name=name)(x)

    def max_pool(self, x, name):
        pool = tf.keras.layers.MaxPool3D if self.volumetric else tf.keras.layers.MaxPool2D
        return pool(pool_size=3, strides=2, padding="same", name=name)(x)

    def global_pool(self, x, name):
        pool = tf.keras.layers.GlobalAveragePooling3D if self.volumetric else tf.keras.layers.GlobalAveragePooling2D
        return pool(name=name)(x)


def convert_to_acs(model_2d: tf.keras.Model, input_shape: Sequence[int], num_outputs: int | None = None,
                   name: str | None = None, carry_head: bool = True) -> tf.keras.Model:
    """The ACS-3D twin of a 2D ResNet9, its convolutions sharing the 2D weights.

    ``input_shape`` is the volume's (D, H, W, C). Convolution kernels and GroupNorm parameters are
    copied by layer name; the head is copied when ``num_outputs`` matches the 2D head (the feature
    vector is 512 long in both) and ``carry_head`` (the same findings), otherwise it starts freshly
    initialised for the new task.
    """
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) != 4:
        raise ModelError(f"input_shape must be a volume's (D, H, W, C), got {input_shape}")
    arch = describe_resnet9(model_2d)
    if arch["volumetric"]:
        raise ModelError(f"{model_2d.name} is already a 3D model; load it directly instead of converting it")
    if input_shape[-1] != arch["input_channels"]:
        raise ModelError(f"the 2D model takes {arch['input_channels']} channel(s) but the volume has "
                         f"{input_shape[-1]}; give the volume input the same number of channels")
    head_2d = model_2d.get_layer("logits")
    num_outputs = num_outputs or head_2d.units
    model_3d = build_resnet9(input_shape, num_outputs, activation=arch["activation"], groups=arch["groups"],
                             scale_norm=arch["scale_norm"], widths=arch["widths"], name=name or f"{model_2d.name}_acs")
    for layer in model_3d.layers:
        if not layer.weights or (layer.name == "logits" and (num_outputs != head_2d.units or not carry_head)):
            continue
        layer.set_weights(model_2d.get_layer(layer.name).get_weights())
    return model_3d


def describe_resnet9(model: tf.keras.Model) -> dict:
    """The builder arguments of a ResNet9 read back from its layers (they survive save/load)."""
    try:
        stem_conv, stem_gn = model.get_layer("stem_conv"), model.get_layer("stem_gn")
        widths = tuple(int(model.get_layer(f"stage{i}_conv2").get_config()["filters"]) for i in range(1, 5))
        stem_act = model.get_layer("stem_act")
        activation = "mish" if isinstance(stem_act, Mish) else stem_act.get_config()["activation"]
    except ValueError as exc:
        raise ModelError(f"{model.name} is not a dpmedtf ResNet9 ({exc}); model.pretrained_weights must be a model "
                         "dpmedtf trained (a ResNet9 .keras file)") from None
    return {"volumetric": isinstance(stem_conv, ACSConv), "activation": activation,
            "groups": int(stem_gn.groups), "widths": widths,
            "scale_norm": any(layer.name.endswith("_scale_gn") for layer in model.layers),
            "input_channels": int(model.input_shape[-1]), "num_outputs": int(model.get_layer("logits").units)}
