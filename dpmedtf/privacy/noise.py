"""The Gaussian noise of one DP-SGD step, added once to the step's clipped gradient sum.

The noise is stateless Philox, one stream per variable, each seeded with 128 bits derived from the
run's secret for that (step, variable) (``privacy.randomness``): the same step draws the same noise
after a resume, and the secret is the only state to keep. With ``privacy.secure_rng`` the noise values
themselves come from the CSPRNG and are passed in (``noise=...``).

The noised sum is divided by the *expected* examples per step, never by the actual batch size: under
Poisson sampling that size is data-dependent (and may be 0), and only a data-independent constant may
scale the released sum without changing the guarantee.
"""

from __future__ import annotations

import math

import tensorflow as tf

# TensorFlow's Box–Muller (``random::BoxMullerFloat``) raises a uniform below this to it before its log.
_BOX_MULLER_EPSILON = 1.0e-7


def noised_mean(clipped_sums, noise_stddev: float, expected_batch_size: float, seeds: tf.Tensor | None = None,
                noise=None) -> list[tf.Tensor]:
    """(Σ clipped + N(0, noise_stddev²)) / B for each variable: one DP-SGD step's gradient.

    ``seeds`` (variables × 2 int64, from ``RunSecret.noise_seeds``) gives variable i its own 128-bit
    Philox seed, which TensorFlow mixes whole into the stream's key and counter (``gaussian_noise``).
    Alternatively ``noise`` gives the noise values (one tensor per variable, already of standard deviation
    ``noise_stddev``). ``noise_stddev`` must be a float32 value ≥ σ·C (``randomness.noise_stddev_float32``):
    it is used as is.
    """
    if noise is not None:
        return [(total + tf.reshape(tf.cast(n, total.dtype), tf.shape(total))) / expected_batch_size
                for total, n in zip(clipped_sums, noise)]
    seeds = tf.cast(seeds, tf.int64)
    return [(total + gaussian_noise(_shape_of(total), seeds[i], noise_stddev, total.dtype)) / expected_batch_size
            for i, total in enumerate(clipped_sums)]


def gaussian_noise(shape, seed: tf.Tensor, stddev: float, dtype: tf.DType = tf.float32) -> tf.Tensor:
    """N(0, stddev²) values: ``tf.random.stateless_normal(shape, seed, stddev=stddev)``, computed faster.

    TensorFlow's CPU kernel turns each pair of its Philox uniforms (u₁, u₂) into
    √(−2 ln u₁)·(sin 2πu₂, cos 2πu₂) with scalar log, sin and cos. Here the same uniforms
    (``stateless_uniform``: the same Philox words, the same conversion to [0, 1)) go through the same
    formula, with the same floor of 10⁻⁷ on u₁, in vectorized ops: the same values in the same order,
    within 2.5·10⁻⁶·stddev of the kernel's (the last bits of the angle, which the kernel rounds once from
    double, and of the transcendental functions; measured over 25M values). The same seed gives the same
    stream as before; tests/privacy/test_noise.py holds it to TensorFlow's kernel and to the formula in
    float64. For ResNet9's 4.9M weights it took 25 ms instead of 35 ms, 44 ms of CPU instead of 65, on
    2 cores (``benchmarks/secure_rng.py``). Dtypes other than float32 use TensorFlow's kernel itself.
    """
    if dtype != tf.float32:
        return tf.random.stateless_normal(shape, seed, stddev=stddev, dtype=dtype)
    if tf.is_tensor(shape):
        size = tf.reduce_prod(shape)
        pairs_shape = tf.stack([(size + 1) // 2, 2])
    else:
        size = math.prod(shape)
        pairs_shape = [(size + 1) // 2, 2]
    pairs = tf.random.stateless_uniform(pairs_shape, seed, dtype=tf.float32)
    floored = tf.maximum(pairs[:, 0], _BOX_MULLER_EPSILON)
    radius = tf.sqrt(-2.0 * tf.math.log(floored)) * tf.convert_to_tensor(stddev, tf.float32)
    angle = pairs[:, 1] * tf.constant(2.0 * math.pi, tf.float32)
    # Row j holds the pair's two normals, as TensorFlow writes them: values 2j and 2j + 1 of the stream.
    interleaved = tf.transpose(tf.stack([radius * tf.sin(angle), radius * tf.cos(angle)]))
    return tf.reshape(tf.reshape(interleaved, [-1])[:size], shape)


def _shape_of(tensor: tf.Tensor):
    """The static shape where known (all of a model's variables), else the dynamic one."""
    return tensor.shape.as_list() if tensor.shape.is_fully_defined() else tf.shape(tensor)
