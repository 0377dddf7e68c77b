"""The step's Gaussian noise is TensorFlow's own stateless Philox Gaussian, value for value.

``noise.gaussian_noise`` evaluates TensorFlow's Box–Muller on TensorFlow's Philox uniforms with vectorized
ops instead of the kernel's scalar log, sin and cos. The accounting assumes the Gaussian of the certified
σ·C; these tests hold the faster draw to two definitions that are not its code: TensorFlow's
``stateless_normal`` kernel (the sampler dpmedtf used before) and the Box–Muller formula evaluated in float64
on the same uniforms.
"""

import math

import numpy as np
import pytest
import tensorflow as tf

from dpmedtf.privacy.noise import gaussian_noise, noised_mean
from dpmedtf.privacy.randomness import RunSecret

SHAPES = [(), (1,), (2,), (3,), (7, 3), (0,), (0, 4), (3, 3, 8, 9), (1001,)]
SEEDS = [(1, 2), (-5, 2**62), (123456789, -987654321), (-2**63, 2**63 - 1)]

# Measured over 5 × 4.9M values: at most 2.5e-6·σ apart (≤ 21 float32 ulps of max(|z|, 1)), from the
# transcendental functions' last bits; the bound leaves 4× room.
TOLERANCE = 1e-5


@pytest.mark.parametrize("shape", SHAPES)
def test_gaussian_noise_is_tensorflows_stateless_normal(shape):
    stddev = 1.7
    for seed in SEEDS:
        seed = tf.constant(seed, tf.int64)
        fast = gaussian_noise(list(shape), seed, stddev).numpy()
        kernel = tf.random.stateless_normal(shape, seed, stddev=stddev).numpy()
        assert fast.shape == kernel.shape == shape
        assert fast.dtype == np.float32
        np.testing.assert_allclose(fast, kernel, rtol=0, atol=TOLERANCE * stddev)


def test_gaussian_noise_is_box_muller_on_tensorflows_uniforms_in_float64():
    seed = tf.constant([20261204, -77], tf.int64)
    size, stddev = 200_001, 2.5
    uniforms = tf.random.stateless_uniform([size + 1], seed).numpy().astype(np.float64).reshape(-1, 2)
    radius = stddev * np.sqrt(-2.0 * np.log(np.maximum(uniforms[:, 0], np.float32(1e-7))))
    angle = np.float32(2 * math.pi) * uniforms[:, 1]
    expected = np.stack([radius * np.sin(angle), radius * np.cos(angle)], axis=1).ravel()[:size]
    fast = gaussian_noise([size], seed, stddev).numpy()
    np.testing.assert_allclose(fast, expected, rtol=0, atol=TOLERANCE * stddev)
    assert fast.std() == pytest.approx(stddev, rel=0.01)
    # The smallest uniform is floored at 1e-7 as in TensorFlow's kernel: no value beyond √(−2 ln 1e-7)·σ.
    assert np.abs(fast).max() <= stddev * math.sqrt(-2 * math.log(1e-7)) * (1 + 1e-6)


def test_gaussian_noise_with_a_dynamic_shape_in_a_graph_is_the_same_draw():
    seed = tf.constant([9, 10], tf.int64)
    graph = tf.function(lambda shape, seed: gaussian_noise(shape, seed, 0.5),
                        input_signature=[tf.TensorSpec([None], tf.int32), tf.TensorSpec([2], tf.int64)])
    for shape in [(5, 4), (3,), (0,), (2, 3, 5)]:
        np.testing.assert_array_equal(graph(tf.constant(shape, tf.int32), seed).numpy(),
                                      gaussian_noise(list(shape), seed, 0.5).numpy())


def test_noised_mean_adds_tensorflows_draw_once_per_variable():
    seeds = RunSecret.fresh().noise_seeds(3, 2)
    sums = [tf.fill((40, 5), 2.0), tf.fill((7,), -1.0)]
    released = noised_mean(sums, 1.25, 8.0, seeds)
    for total, noisy, seed in zip(sums, released, seeds):
        kernel = tf.random.stateless_normal(total.shape, seed, stddev=1.25).numpy()
        np.testing.assert_allclose(noisy.numpy(), (total.numpy() + kernel) / 8.0, rtol=0, atol=TOLERANCE * 1.25 / 8.0)


def test_other_dtypes_use_tensorflows_kernel_itself():
    seed = tf.constant([1, 2], tf.int64)
    np.testing.assert_array_equal(gaussian_noise([6], seed, 0.75, tf.float64).numpy(),
                                  tf.random.stateless_normal([6], seed, stddev=0.75, dtype=tf.float64).numpy())
