"""Rounding must never shrink a norm or let a clipped gradient exceed C.

An under-estimated norm clips too little, and the DP sensitivity bound (every example moves the sum
by at most C) no longer holds. Three places could do it: a ghost norm, a sum of signed Gram products
that cancels for gradients of opposite sign at different positions; a sum of float32 squares, each
square and addition rounded (or flushed to zero); and the clip factor C/‖g‖, whose rounding can put
c·‖g‖ an ulp above C.
"""

import math

import numpy as np
import pytest
import tensorflow as tf

from dpmedtf.privacy.clipping import fast_clipped_gradient_sum, make_layer_registry
from dpmedtf.privacy.clipping.norms import (clip_factors, conv_ghost_squared_norms, gram_squared_norms, round_down_to,
                                            round_up_to, squared_norms_of)

L = tf.keras.layers
POSITIONS, FEATURES, UNITS = 64, 8, 4
SIGNS = np.where(np.arange(POSITIONS) % 2 == 0, 1.0, -1.0)  # Σₜ sₜ = 0


def nearly_cancelling(examples=32, offset=3e3, noise=0.3, seed=0):
    """xₜ = a·u + nₜ (large shared part, small noise), gₜ = sₜ·v: Σₜ xₜ gₜᵀ = (Σₜ sₜ nₜ) vᵀ, the a·u part
    cancelling exactly, while each Gram product is ~(a/noise)² = 10⁸ times larger than the result."""
    rng = np.random.default_rng(seed)
    inputs = offset * rng.standard_normal(FEATURES) + noise * rng.standard_normal((examples, POSITIONS, FEATURES))
    grads = np.broadcast_to(SIGNS[None, :, None] * rng.standard_normal(UNITS), (examples, POSITIONS, UNITS))
    return inputs.astype(np.float32), grads.astype(np.float32)


def exact_squared_norms(inputs, grads):
    """‖Σₜ xₜ gₜᵀ‖² of the float32 values, in float64 with the gradient formed (no Gram products)."""
    return np.array([np.sum((x.astype(np.float64).T @ g.astype(np.float64)) ** 2) for x, g in zip(inputs, grads)])


def test_the_case_defeats_float32_gram_products():
    """What the norms were before: float32 Gram matrices give negative and too-small squared norms here."""
    inputs, grads = nearly_cancelling()
    x, g = tf.constant(inputs), tf.constant(grads)
    float32 = tf.reduce_sum(tf.matmul(x, x, transpose_b=True) * tf.matmul(g, g, transpose_b=True), axis=[1, 2])
    relative = float32.numpy() / exact_squared_norms(inputs, grads) - 1
    assert np.min(relative) < -1 and np.sum(float32.numpy() < 0) >= 5


def test_ghost_norms_never_fall_below_the_float64_reference_or_below_zero():
    inputs, grads = nearly_cancelling()
    exact = exact_squared_norms(inputs, grads)
    got = gram_squared_norms(tf.constant(inputs), tf.constant(grads)).numpy()
    assert got.dtype == np.float64
    assert np.all(np.sqrt(got) >= np.sqrt(exact) * (1 - 1e-6))
    np.testing.assert_allclose(got, exact, rtol=1e-6)
    # A 1×1 convolution is the same sum over positions, read through patches.
    images, maps = inputs.reshape(-1, 8, 8, FEATURES), grads.reshape(-1, 8, 8, UNITS)
    conv = conv_ghost_squared_norms(tf.constant(images), tf.constant(maps), (1, 1), (1, 1), "same").numpy()
    np.testing.assert_allclose(conv, exact, rtol=1e-6)


@pytest.mark.parametrize("kind", ["normal", "wide range", "squares that round", "below the normal range"])
def test_float32_sums_of_squares_never_fall_below_the_exact_sum(kind):
    """Exact reference: float64 squares of float32 values are exact (48 bits), and math.fsum adds them exactly
    rounded. Without the margin, float32 rounding puts up to 1e-7 of these below it (and flushes the last kind
    to zero); with it, none falls below and the normal ones rise by at most 2e-6."""
    rng = np.random.default_rng(len(kind))
    values = []
    for size in rng.integers(1, 3000, 40):
        shape = (3, int(size))
        values.append({"normal": lambda: rng.standard_normal(shape),
                       "wide range": lambda: np.exp(rng.uniform(-40, 40, shape)) * rng.choice([-1, 1], shape),
                       "squares that round": lambda: 1 + rng.integers(0, 8, shape) * 2.0 ** -23,
                       "below the normal range": lambda: 1e-20 * rng.standard_normal(shape)}[kind]().astype(np.float32))
    for per_example in values + [values[0].reshape(3, -1, 1)]:  # and a size that is no multiple of the run
        got = squared_norms_of(tf.constant(per_example)).numpy()
        exact = np.array([math.fsum(v * v for v in row.astype(np.float64).ravel()) for row in per_example])
        assert got.dtype == np.float64 and np.all((got >= exact) | ((got == 0) & (kind == "below the normal range")))
        if kind != "below the normal range":
            assert np.all(got <= exact * (1 + 2e-6))
        else:  # flushed to zero by float32 squaring where it is not raised: a norm far below any clip norm
            assert np.all((got >= exact) | (got == 0)) and np.all(np.sqrt(exact) < 1e-15)
    assert np.all(squared_norms_of(tf.zeros((2, 100))).numpy() == 0)  # a padded row: norm exactly 0


def test_an_exactly_cancelling_gradient_has_norm_zero_not_below():
    inputs, grads = nearly_cancelling()
    same_everywhere = np.broadcast_to(inputs[:, :1], inputs.shape).copy()  # Σₜ sₜ x = 0 exactly
    got = gram_squared_norms(tf.constant(same_everywhere), tf.constant(grads)).numpy()
    assert np.all(got >= 0) and np.all(np.sqrt(got) < 1e-6 * 3e3 * POSITIONS)


def cancelling_model(kind):
    inputs = tf.keras.Input((POSITIONS, FEATURES) if kind != "conv2d" else (8, 8, FEATURES))
    layer = {"dense": L.Dense(UNITS, use_bias=False), "conv1d": L.Conv1D(UNITS, 1, use_bias=False),
             "conv2d": L.Conv2D(UNITS, 1, use_bias=False)}[kind]
    return tf.keras.Model(inputs, layer(inputs))


@pytest.mark.parametrize("kind", ["dense", "conv1d", "conv2d"])
def test_the_engine_does_not_under_estimate_a_cancelling_gradient(kind):
    """End to end in float32 with the ghost method forced: the loss Σₜ ⟨outₜ, sₜ v⟩ makes gₜ = sₜ v."""
    tf.keras.utils.set_random_seed(0)
    model = cancelling_model(kind)
    inputs, grads = nearly_cancelling()
    shaped = lambda array: array.reshape(-1, *model.input_shape[1:-1], array.shape[-1])  # noqa: E731
    weights = tf.constant(shaped(grads)[0])
    loss = lambda outputs: tf.reduce_sum(outputs * weights, axis=list(range(1, outputs.shape.rank)))  # noqa: E731
    exact = np.sqrt(exact_squared_norms(inputs, grads))
    got = fast_clipped_gradient_sum(model, tf.constant(shaped(inputs)), loss, 1.0, make_layer_registry("ghost"))
    assert np.all(got.norms.numpy() >= exact * (1 - 1e-6))
    np.testing.assert_allclose(got.norms.numpy(), exact, rtol=1e-6)


def vectors_with_norms_at(clip, count=400, dims=37, seed=1):
    """float32 vectors whose exact norms lie within ±3e-7 (relative) of ``clip``: on either side of C."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((count, dims))
    vectors *= clip * (1 + rng.uniform(-3e-7, 3e-7, (count, 1))) / np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float32)


@pytest.mark.parametrize("clip", [1.5, 1.0, 0.1, 7.3, 3e-20, 4e18])
def test_no_clipped_gradient_exceeds_c_after_rounding(clip):
    vectors = vectors_with_norms_at(clip)
    squared = np.sum(vectors.astype(np.float64) ** 2, axis=1)
    factors = clip_factors(tf.constant(squared), clip, tf.float32).numpy()
    assert factors.dtype == np.float32 and np.all(factors <= 1)
    clipped = vectors * factors[:, None]  # rounded to float32 as the engine's products are
    assert np.all(np.sqrt(np.sum(clipped.astype(np.float64) ** 2, axis=1)) <= clip)
    norms32 = np.sqrt(squared).astype(np.float32)
    assert np.all(factors * norms32 <= np.float32(clip))  # also in float32 arithmetic
    # The plain factor C / max(C, ‖g‖) in float32 lets some of these exceed C by an ulp or two.
    plain = np.float32(clip) / np.maximum(np.float32(clip), norms32)
    assert np.any(np.sqrt(np.sum((vectors * plain[:, None]).astype(np.float64) ** 2, axis=1)) > clip)


def test_clip_factors_leave_small_norms_alone_and_scale_large_ones():
    squared = tf.constant([0.0, 0.25, 4.0, 1e6], tf.float64)
    factors = clip_factors(squared, 1.0, tf.float32).numpy()
    np.testing.assert_array_equal(factors[:2], [1.0, 1.0])
    np.testing.assert_allclose(factors[2:], [0.5, 1e-3], rtol=1e-6)
    assert clip_factors(squared, 1.0, tf.float64).dtype == tf.float64


def test_rounding_helpers_round_in_the_stated_direction():
    values = tf.constant(np.random.default_rng(2).standard_normal(1000) * 1e3, tf.float64)
    up, down = round_up_to(values, tf.float32), round_down_to(values, tf.float32)
    assert up.dtype == down.dtype == tf.float32
    assert np.all(up.numpy().astype(np.float64) >= values.numpy())
    assert np.all(down.numpy().astype(np.float64) <= values.numpy())
    assert np.all(up.numpy() - down.numpy() <= np.spacing(np.abs(up.numpy())))  # adjacent or equal floats


@pytest.mark.parametrize("factor_of_norm", [1 - 2e-7, 1 - 6e-8, 1.0])
def test_the_engine_clips_a_single_example_to_at_most_c(factor_of_norm):
    """Batch of one with instantiated norms, C a hair below the example's norm: ‖Σ‖ = ‖c·g‖ ≤ C."""
    tf.keras.utils.set_random_seed(4)
    inputs = tf.keras.Input((9, 9, 2))
    x = L.GroupNormalization(2)(L.Conv2D(4, 3, activation="tanh", bias_initializer="random_normal")(inputs))
    model = tf.keras.Model(inputs, L.Dense(3)(L.Flatten()(x)))
    images = tf.random.stateless_normal((6, 9, 9, 2), seed=(4, 5))
    registry = make_layer_registry("instantiate")
    loss = lambda outputs: tf.reduce_sum(tf.square(outputs), axis=1)  # noqa: E731
    for i in range(6):
        norm = float(fast_clipped_gradient_sum(model, images[i:i + 1], loss, 1e30, registry).norms[0])
        clip = norm * factor_of_norm
        sums = fast_clipped_gradient_sum(model, images[i:i + 1], loss, clip, registry).sums
        assert np.sqrt(sum(np.sum(np.asarray(s, np.float64) ** 2) for s in sums)) <= clip
