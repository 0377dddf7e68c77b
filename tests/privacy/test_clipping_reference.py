"""The fast engine against the definition: each example's gradient alone, clipped by hand, summed.

In float64 the only difference left between the two is the algorithm, so a wrong norm rule, a
missing bias term or a gradient that never reached a layer shows as a difference far above 1e-10.
Every convolution here carries a bias, the first layer of each model a fused activation, and both
norm paths (ghost and instantiated) are forced in turn, as well as the one the cost model picks.
"""

import numpy as np
import pytest
import tensorflow as tf

from dpmedtf.models import ACSConv, build_resnet9, convert_to_acs
from dpmedtf.privacy.clipping import fast_clipped_gradient_sum, make_layer_registry
from dpmedtf.privacy.clipping import rules as rules_module
from dpmedtf.privacy.clipping.norms import ghost_is_cheaper

L = tf.keras.layers
BIAS = {"use_bias": True, "bias_initializer": "random_normal"}


def conv1d_model():
    inputs = tf.keras.Input((12, 3))
    x = L.Conv1D(4, 3, strides=2, padding="same", activation="tanh", **BIAS)(inputs)
    x = L.Conv1D(5, 3, padding="valid", **BIAS)(x)
    x = L.Conv1D(3, 1, strides=2, padding="same", **BIAS)(x)
    return tf.keras.Model(inputs, L.Dense(2)(L.GlobalAveragePooling1D()(x)))


def conv2d_model():
    inputs = tf.keras.Input((10, 9, 3))
    x = L.Conv2D(4, 3, strides=2, padding="same", activation="tanh", **BIAS)(inputs)
    x = L.GroupNormalization(2)(x)
    x = L.Conv2D(6, 3, padding="valid", **BIAS)(x)
    x = L.Conv2D(5, 1, strides=2, padding="same", **BIAS)(x)
    return tf.keras.Model(inputs, L.Dense(2)(L.GlobalAveragePooling2D()(x)))


def conv3d_model():
    inputs = tf.keras.Input((8, 9, 8, 2))
    x = L.Conv3D(4, 3, strides=2, padding="same", activation="tanh", **BIAS)(inputs)
    x = L.Conv3D(5, (1, 3, 3), padding="valid", **BIAS)(x)
    x = L.Conv3D(3, (3, 1, 1), strides=(1, 2, 1), padding="same", **BIAS)(x)
    return tf.keras.Model(inputs, L.Dense(2)(L.GlobalAveragePooling3D()(x)))


def acs_model():
    inputs = tf.keras.Input((8, 9, 10, 2))
    x = ACSConv(6, 3, 1, padding="same", **BIAS)(inputs)
    x = L.Activation("tanh")(L.GroupNormalization(1)(x))
    x = ACSConv(5, 3, 2, padding="same", **BIAS)(x)
    x = ACSConv(4, 1, 1, padding="same", **BIAS)(x)
    return tf.keras.Model(inputs, L.Dense(2)(L.GlobalAveragePooling3D()(x)))


def sequence_dense_model():
    """Dense on (B, T, d): its kernel gradient Σₜ xₜ gₜᵀ is normed like a kernel-size-1 convolution."""
    inputs = tf.keras.Input((7, 4))
    x = L.Dense(5, activation="tanh")(inputs)
    x = L.Dense(3, **BIAS)(x)
    return tf.keras.Model(inputs, L.Dense(2)(L.GlobalAveragePooling1D()(x)))


MODELS = {"conv1d": (conv1d_model, (12, 3)), "conv2d": (conv2d_model, (10, 9, 3)),
          "conv3d": (conv3d_model, (8, 9, 8, 2)), "acs": (acs_model, (8, 9, 10, 2)),
          "sequence_dense": (sequence_dense_model, (7, 4))}


def build_in(dtype, build, seed):
    tf.keras.utils.set_random_seed(seed)
    tf.keras.backend.set_floatx(dtype)
    try:
        return build()
    finally:
        tf.keras.backend.set_floatx("float32")


def squared_error(targets):
    return lambda outputs: tf.reduce_sum(tf.square(outputs - targets), axis=1)


def per_example_gradients(model, inputs, targets):
    """Each example's gradient, from a tape over that example alone (in a graph: TF 2.15's eager Conv3D
    gradient cannot read its data_format)."""
    @tf.function
    def one(example, target):
        with tf.GradientTape() as tape:
            loss = squared_error(target[None])(model(example[None]))[0]
        return tape.gradient(loss, model.trainable_variables)

    return [[np.asarray(g, np.float64) for g in one(inputs[i], targets[i])] for i in range(int(inputs.shape[0]))]


def clipped_sum_by_hand(gradients, clip):
    norms = np.array([np.sqrt(sum(np.sum(g ** 2) for g in grads)) for grads in gradients])
    factors = np.minimum(1.0, clip / norms)
    return [sum(f * grads[k] for f, grads in zip(factors, gradients)) for k in range(len(gradients[0]))], norms


def a_clip_norm_between(norms):
    """C between the 2nd and 3rd smallest norm: two examples pass unclipped, the others are clipped."""
    low, high = np.sort(norms)[1:3]
    return float((low + high) / 2)


def relative_difference(got, expected):
    flat = lambda tensors: np.concatenate([np.ravel(t) for t in tensors])  # noqa: E731
    return float(np.linalg.norm(flat(got) - flat(expected)) / np.linalg.norm(flat(expected)))


def max_abs_difference(got, expected):
    return max(float(np.max(np.abs(np.asarray(a) - b))) for a, b in zip(got, expected))


class PathSpy:
    """Counts the calls of each norm method the registry makes."""

    def __init__(self, monkeypatch):
        self.calls = {"ghost_conv": 0, "instantiated_conv": 0, "ghost_dense": 0}
        for name, key in (("conv_ghost_squared_norms", "ghost_conv"),
                          ("per_example_conv_kernel_grads", "instantiated_conv"), ("gram_squared_norms", "ghost_dense")):
            monkeypatch.setattr(rules_module, name, self._counting(getattr(rules_module, name), key))

    def _counting(self, function, key):
        def counted(*args, **kwargs):
            self.calls[key] += 1
            return function(*args, **kwargs)
        return counted


@pytest.mark.parametrize("norm_method", ["ghost", "instantiate", "cost"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_in_float64_fast_equals_the_per_example_loop_to_1e_10(name, norm_method, monkeypatch):
    build, shape = MODELS[name]
    model = build_in("float64", build, seed=len(name))
    rng = np.random.default_rng(7)
    inputs = tf.constant(rng.standard_normal((5, *shape)))
    targets = tf.constant(rng.standard_normal((5, 2)))
    gradients = per_example_gradients(model, inputs, targets)
    _, norms = clipped_sum_by_hand(gradients, np.inf)
    clip = a_clip_norm_between(norms)
    expected, norms = clipped_sum_by_hand(gradients, clip)
    assert sum(norms > clip) == 3 and all(norm > 0 for norm in norms)

    spy = PathSpy(monkeypatch)
    registry = make_layer_registry(norm_method)
    got = tf.function(lambda x, y: fast_clipped_gradient_sum(model, x, squared_error(y), clip, registry))(inputs, targets)

    assert relative_difference(got.sums, expected) < 1e-10, max_abs_difference(got.sums, expected)
    np.testing.assert_allclose(got.norms.numpy(), norms, rtol=1e-10)
    assert np.all(got.norms.numpy() >= norms * (1 - 1e-15))  # rounded up, never down
    if name == "sequence_dense":
        # "cost" weighs each sequence layer's 7² Gram entries against its d × p kept values per example
        cost_prefers_ghost = any(ghost_is_cheaper(positions=7, patch_size=d, out_channels=p)
                                 for d, p in ((4, 5), (5, 3)))
        assert (spy.calls["ghost_dense"] > 0) == (norm_method == "ghost"
                                                  or norm_method == "cost" and cost_prefers_ghost)
    elif norm_method != "cost":
        assert (spy.calls["ghost_conv"] > 0, spy.calls["instantiated_conv"] > 0) == (
            norm_method == "ghost", norm_method == "instantiate")


def max_pool_3d_in_any_float(self, inputs):
    """MaxPool3D as a max over patches: TensorFlow's CPU MaxPool3D has no float64 kernel."""
    pads = [(0, 0)]
    for size, window, stride in zip(inputs.shape[1:4], self.pool_size, self.strides):
        out = -(-size // stride) if self.padding == "same" else (size - window) // stride + 1
        total = max((out - 1) * stride + window - size, 0)
        pads.append((total // 2, total - total // 2))
    padded = tf.pad(inputs, pads + [(0, 0)], constant_values=-1e300)  # padding never wins the max
    channels = inputs.shape[-1]
    patches = tf.extract_volume_patches(padded, [1, *self.pool_size, 1], [1, *self.strides, 1], "VALID")
    patches = tf.reshape(patches, [-1, *patches.shape[1:4], int(np.prod(self.pool_size)), channels])
    return tf.reduce_max(patches, axis=-2)


@pytest.mark.parametrize("norm_method", ["ghost", "instantiate"])  # "cost": test_clipping's float32 ACS test
def test_in_float64_the_acs_3d_resnet9_equals_the_per_example_loop_to_1e_10(norm_method, monkeypatch):
    """convert_to_acs of a tiny ResNet9: ACSConv, GroupNorm, Mish, residual adds, Dense head."""
    monkeypatch.setattr(tf.keras.layers.MaxPool3D, "call", max_pool_3d_in_any_float)
    model = build_in("float64", lambda: convert_to_acs(build_resnet9((32, 32, 1), 2, groups=3, widths=(3, 6, 6, 6)),
                                                       (32, 32, 32, 1)), seed=11)
    rng = np.random.default_rng(11)
    inputs = tf.constant(rng.standard_normal((4, 32, 32, 32, 1)))
    targets = tf.constant(rng.standard_normal((4, 2)))
    gradients = per_example_gradients(model, inputs, targets)
    _, norms = clipped_sum_by_hand(gradients, np.inf)
    low, high = np.sort(norms)[1:3]
    clip = float((low + high) / 2)
    expected, norms = clipped_sum_by_hand(gradients, clip)
    assert sum(norms > clip) == 2
    registry = make_layer_registry(norm_method)
    got = tf.function(lambda x, y: fast_clipped_gradient_sum(model, x, squared_error(y), clip, registry))(inputs, targets)
    assert relative_difference(got.sums, expected) < 1e-10, max_abs_difference(got.sums, expected)
    np.testing.assert_allclose(got.norms.numpy(), norms, rtol=1e-10)


def test_a_fused_activation_on_the_first_layer_still_gets_its_gradient():
    """The engine's tape watches no variable: an activation applied before the layer's pre-activation
    output is watched is not recorded when nothing upstream is watched, and the first layer's gradient
    (and its norm) silently became zero."""
    model = build_in("float64", conv2d_model, seed=3)
    rng = np.random.default_rng(3)
    inputs, targets = tf.constant(rng.standard_normal((3, 10, 9, 3))), tf.constant(rng.standard_normal((3, 2)))
    expected, _ = clipped_sum_by_hand(per_example_gradients(model, inputs, targets), np.inf)
    got = fast_clipped_gradient_sum(model, inputs, squared_error(targets), 1e6)
    first_kernel = model.trainable_variables.index(model.layers[1].kernel)
    assert np.linalg.norm(expected[first_kernel]) > 0.1
    np.testing.assert_allclose(got.sums[first_kernel], expected[first_kernel], rtol=1e-10)
