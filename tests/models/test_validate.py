"""validate_for_dp refuses what DP-SGD cannot train, naming each layer and the fix."""

import pytest
import tensorflow as tf

from dpmedtf.models import DpIncompatibleModelError, build_resnet9, convert_to_acs, dp_problems, validate_for_dp


def test_resnet9_2d_and_3d_pass():
    model_2d = build_resnet9((32, 32, 3), 8)
    assert validate_for_dp(model_2d) is None
    assert dp_problems(convert_to_acs(model_2d, (32, 32, 32, 3))) == []


def test_batchnorm_is_refused_by_name_with_the_fix():
    model = tf.keras.Sequential([
        tf.keras.layers.Input((32, 32, 3)),
        tf.keras.layers.Conv2D(8, 3, name="conv"),
        tf.keras.layers.BatchNormalization(name="bn_after_conv"),
        tf.keras.layers.GlobalAveragePooling2D(),
        tf.keras.layers.Dense(2),
    ], name="classic")
    with pytest.raises(DpIncompatibleModelError) as info:
        validate_for_dp(model)
    message = str(info.value)
    assert "model 'classic'" in message and "'bn_after_conv' (BatchNormalization)" in message
    assert "replace it with GroupNormalization" in message


def test_frozen_batchnorm_is_still_refused_and_nested_models_are_searched():
    inner = tf.keras.Sequential([tf.keras.layers.Input((8,)), tf.keras.layers.BatchNormalization(name="inner_bn")],
                                name="inner")
    inner.trainable = False
    outer = tf.keras.Sequential([tf.keras.layers.Input((8,)), inner, tf.keras.layers.Dense(1)], name="outer")
    assert [p.split(" (")[0] for p in dp_problems(outer)] == ["layer 'inner_bn'"]


def test_every_unclippable_layer_is_listed_at_once():
    model = tf.keras.Sequential([
        tf.keras.layers.Input((16, 16, 3)),
        tf.keras.layers.DepthwiseConv2D(3, name="depthwise"),
        tf.keras.layers.LayerNormalization(name="layernorm"),
        tf.keras.layers.BatchNormalization(name="bn"),
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(1, name="head"),
    ])
    problems = dp_problems(model)
    assert len(problems) == 3
    assert "'depthwise' (DepthwiseConv2D) has trainable weights the DP engine cannot clip" in problems[0]
    assert "freeze it (layer.trainable = False)" in problems[0]
    assert "'layernorm'" in problems[1] and "'bn'" in problems[2]
    model.get_layer("depthwise").trainable = False
    model.get_layer("layernorm").trainable = False
    assert len(dp_problems(model)) == 1  # frozen layers receive no gradient; the BatchNorm remains
