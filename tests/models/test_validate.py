"""validate_for_dp refuses what DP-SGD cannot train, naming each layer and the fix."""

import numpy as np
import pytest
import tensorflow as tf

from dpmedtf.models import (ACSConv, CLIPPABLE_LAYERS, DpIncompatibleModelError, build_resnet9, convert_to_acs,
                            dp_problems, validate_for_dp)
from dpmedtf.privacy.clipping import supported_layer_types, unsupported_layers
from dpmedtf.privacy.engines import vectorized_clipped_gradient_sum

L = tf.keras.layers


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
        tf.keras.layers.PReLU(name="prelu"),
        tf.keras.layers.BatchNormalization(name="bn"),
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(1, name="head"),
    ])
    problems = dp_problems(model)
    assert len(problems) == 3
    assert "'depthwise' (DepthwiseConv2D) has trainable weights the fast clipping engine cannot clip" in problems[0]
    assert "freeze it (layer.trainable = False)" in problems[0] and "dpmedtf.register_layer" in problems[0]
    assert "'prelu'" in problems[1] and "'bn'" in problems[2]
    model.get_layer("depthwise").trainable = False
    model.get_layer("prelu").trainable = False
    assert len(dp_problems(model)) == 1  # frozen layers receive no gradient; the BatchNorm remains


def test_the_vectorized_engine_takes_any_layer_but_batchnorm_and_layernorm():
    layernorm = tf.keras.Sequential([L.Input((4,)), L.LayerNormalization(name="ln"), L.Dense(1)])
    assert "'ln' (LayerNormalization)" in dp_problems(layernorm, engine="vectorized")[0]  # pfor corrupts memory
    assert dp_problems(layernorm) == []  # the fast engine clips it
    model = tf.keras.Sequential([
        L.Input((16, 16, 3)),
        L.DepthwiseConv2D(3, name="depthwise"),
        L.PReLU(name="prelu"),
        L.BatchNormalization(name="bn"),
        L.Flatten(),
        L.Dense(1, name="head"),
    ])
    problems = dp_problems(model, engine="vectorized")
    assert len(problems) == 1 and "'bn' (BatchNormalization)" in problems[0]
    model.get_layer("bn").trainable = False
    with pytest.raises(DpIncompatibleModelError, match=r"clipping engine: vectorized.*\n.*'bn'"):
        validate_for_dp(model, engine="vectorized")  # frozen, it still mixes examples
    prelu_model = tf.keras.Sequential([L.Input((8,)), L.PReLU(name="prelu"), L.Dense(1)], name="prelu_model")
    assert validate_for_dp(prelu_model, engine="vectorized") is None
    with pytest.raises(DpIncompatibleModelError, match=r"'prelu' \(PReLU\).*training.clipping: vectorized"):
        validate_for_dp(prelu_model)  # the fast engine is the default


def test_a_subclassed_model_is_refused_by_the_fast_engine_and_taken_by_the_vectorized():
    class Subclassed(tf.keras.Model):
        def __init__(self):
            super().__init__(name="mine")
            self.head = L.Dense(1)

        def call(self, inputs):
            return self.head(inputs)

    model = Subclassed()
    model.build((None, 4))
    assert "subclassed Keras model" in dp_problems(model)[0]
    assert dp_problems(model, engine="vectorized") == []


def test_what_validation_accepts_for_the_vectorized_engine_it_really_clips_per_example():
    """A depthwise convolution, GroupNormalization and PReLU: the jacobian engine's clipped sum is the
    per-example definition."""
    tf.keras.utils.set_random_seed(5)
    model = tf.keras.Sequential([L.Input((8, 8, 2)), L.DepthwiseConv2D(3), L.GroupNormalization(2), L.PReLU(),
                                 L.Flatten(), L.Dense(2)])
    assert dp_problems(model, engine="vectorized") == [] and dp_problems(model) != []
    rng = np.random.default_rng(5)
    images = tf.constant(rng.standard_normal((5, 8, 8, 2)).astype(np.float32))
    targets = tf.constant(rng.standard_normal((5, 2)).astype(np.float32))
    loss = lambda x, y: tf.reduce_sum(tf.square(model(x) - y), axis=1)  # noqa: E731
    per_example = []
    for i in range(5):
        with tf.GradientTape() as tape:
            value = loss(images[i:i + 1], targets[i:i + 1])[0]
        per_example.append([np.asarray(g, np.float64) for g in tape.gradient(value, model.trainable_variables)])
    norms = np.array([np.sqrt(sum(np.sum(g ** 2) for g in grads)) for grads in per_example])
    clip = float(np.median(norms))
    expected = [sum(min(1.0, clip / n) * grads[k] for n, grads in zip(norms, per_example))
                for k in range(len(model.trainable_variables))]
    got, _ = vectorized_clipped_gradient_sum(model, images, lambda outputs: tf.reduce_sum(tf.square(outputs - targets), axis=1),
                                             clip)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


def test_an_unknown_engine_is_refused():
    with pytest.raises(ValueError, match="no clipping engine 'jacobian'; choose one of"):
        dp_problems(build_resnet9((32, 32, 3), 8), engine="jacobian")


def test_the_supported_list_is_the_clipping_registrys():
    assert CLIPPABLE_LAYERS == supported_layer_types()
    problem = dp_problems(tf.keras.Sequential([L.Input((4,)), L.PReLU(name="prelu")]))[0]
    assert "(supported: " + ", ".join(cls.__name__ for cls in supported_layer_types()) + ")" in problem


class MyConv2D(L.Conv2D):
    """A subclass may change the computation; the registry matches exact classes."""


@pytest.mark.parametrize("make_layer", [
    lambda: L.Dense(2), lambda: L.Conv1D(2, 3), lambda: L.Conv2D(2, 3), lambda: L.Conv3D(3, 3),
    lambda: ACSConv(3, 3), lambda: L.GroupNormalization(1), lambda: L.Conv2DTranspose(2, 3),
    lambda: L.DepthwiseConv2D(3), lambda: L.SeparableConv2D(2, 3), lambda: L.LayerNormalization(),
    lambda: L.PReLU(), lambda: MyConv2D(2, 3), lambda: L.Embedding(5, 2), lambda: L.Dropout(0.1),
    lambda: L.MaxPool2D(), lambda: L.Activation("relu")])
def test_fast_validation_accepts_exactly_what_the_fast_engine_runs(make_layer):
    """One source of truth: validate_for_dp and the engine's own check agree on every layer."""
    layer = make_layer()
    shapes = {L.Dense: (4,), L.Embedding: (3,), L.Conv1D: (9, 2), L.Conv3D: (9, 9, 9, 1), ACSConv: (9, 9, 9, 1),
              L.PReLU: (4,), L.LayerNormalization: (4,), L.Dropout: (4,)}
    shape = next((s for cls, s in shapes.items() if type(layer) is cls), (9, 9, 2))
    inputs = tf.keras.Input(shape, dtype="int32" if isinstance(layer, L.Embedding) else "float32")
    model = tf.keras.Model(inputs, layer(inputs))
    accepted = dp_problems(model) == []
    assert accepted == (unsupported_layers(model) == [])
    assert accepted == (type(layer) in supported_layer_types() or not layer.trainable_weights)
