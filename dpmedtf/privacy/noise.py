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

from dpmedtf.privacy.clipping.norms import gpu_visible
from dpmedtf.quiet_xla import absorb_first_compile_notice

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

    On a CPU, a variable of ``XLA_PHILOX_MIN_SIZE`` values or more has its uniforms from the same Philox
    rounds compiled by XLA (``philox_uniform_pairs``), bit for bit TensorFlow's, and its pairs interleaved
    by XLA as well: ResNet9's noise then took 18 ms instead of 25 ms, 28 ms of CPU instead of 47.
    """
    if dtype != tf.float32:
        return tf.random.stateless_normal(shape, seed, stddev=stddev, dtype=dtype)
    stddev = tf.convert_to_tensor(stddev, tf.float32)
    if not tf.is_tensor(shape) and math.prod(shape) >= XLA_PHILOX_MIN_SIZE and not gpu_visible():
        absorb_first_compile_notice()
        size = math.prod(shape)
        key, counter = tf.raw_ops.StatelessRandomGetKeyCounter(seed=seed)
        radius, angle = _polar_pairs(key, counter, blocks=(size + 3) // 4, stddev=stddev)
        return tf.reshape(_interleaved(radius, tf.sin(angle), tf.cos(angle), size=size), shape)
    if tf.is_tensor(shape):
        size = tf.reduce_prod(shape)
        pairs_shape = tf.stack([(size + 1) // 2, 2])
    else:
        size = math.prod(shape)
        pairs_shape = [(size + 1) // 2, 2]
    pairs = tf.random.stateless_uniform(pairs_shape, seed, dtype=tf.float32)
    floored = tf.maximum(pairs[:, 0], _BOX_MULLER_EPSILON)
    radius = tf.sqrt(-2.0 * tf.math.log(floored)) * stddev
    angle = pairs[:, 1] * tf.constant(2.0 * math.pi, tf.float32)
    # Row j holds the pair's two normals, as TensorFlow writes them: values 2j and 2j + 1 of the stream.
    interleaved = tf.transpose(tf.stack([radius * tf.sin(angle), radius * tf.cos(angle)]))
    return tf.reshape(tf.reshape(interleaved, [-1])[:size], shape)


# TensorFlow's CPU Philox kernel computes one block of four words at a time in scalar code: of the 25 ms
# ResNet9's 4.9M normals took, 16 ms were its uniforms. The same rounds as XLA-compiled integer ops are
# vectorized (9 ms for those uniforms, on one core). Below this many values the kernel costs under
# 0.3 ms and an XLA compilation per variable size would not pay for itself. On a GPU TensorFlow's kernel
# is parallel already and is kept (not measured there: no GPU here).
XLA_PHILOX_MIN_SIZE = 1 << 16

# Philox-4×32-10 (Salmon et al. 2011), as TensorFlow's ``random::PhiloxRandom``: round multipliers and
# the key's increments (the golden ratio and √3 − 1 in 32 bits).
_PHILOX_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
_PHILOX_KEY_STEPS = (0x9E3779B9, 0xBB67AE85)
_PHILOX_ROUNDS = 10
_LOW_32 = 0xFFFFFFFF


def philox_words(key: tf.Tensor, counter: tf.Tensor, blocks: int) -> tuple[tf.Tensor, ...]:
    """Words 0–3 (uint64 tensors of uint32 values) of ``blocks`` consecutive Philox-4×32-10 blocks.

    ``key`` (1,) and ``counter`` (2,) are uint64 as ``tf.raw_ops.StatelessRandomGetKeyCounter`` makes them
    from a stateless seed; block j is computed at counter + j (128-bit), as TensorFlow's kernel computes
    values 4j … 4j + 3 of the stream. 32 × 32 → 64-bit products are uint64 multiplications of values below
    2³², which vectorize where TensorFlow has no 32-bit high-multiply op.
    """
    u64 = lambda value: tf.constant(value, tf.uint64)  # noqa: E731
    low_32, shift = u64(_LOW_32), u64(32)
    key_words = tf.bitcast(key, tf.uint32)  # (1, 2): the key's low and high halves
    key_low, key_high = tf.cast(key_words[0, 0], tf.uint64), tf.cast(key_words[0, 1], tf.uint64)
    start = tf.bitcast(counter[0], tf.uint64)
    counter_low = start + tf.cast(tf.range(blocks, dtype=tf.int64), tf.uint64)
    counter_high = tf.bitcast(counter[1], tf.uint64) + tf.cast(counter_low < start, tf.uint64)  # the carry
    x0, x1 = counter_low & low_32, tf.bitwise.right_shift(counter_low, shift)
    x2, x3 = counter_high & low_32, tf.bitwise.right_shift(counter_high, shift)
    for _ in range(_PHILOX_ROUNDS):
        product0, product2 = u64(_PHILOX_MULTIPLIERS[0]) * x0, u64(_PHILOX_MULTIPLIERS[1]) * x2
        x0, x1, x2, x3 = (tf.bitwise.right_shift(product2, shift) ^ x1 ^ key_low, product2 & low_32,
                          tf.bitwise.right_shift(product0, shift) ^ x3 ^ key_high, product0 & low_32)
        key_low = (key_low + u64(_PHILOX_KEY_STEPS[0])) & low_32
        key_high = (key_high + u64(_PHILOX_KEY_STEPS[1])) & low_32
    return x0, x1, x2, x3


def unit_float(words: tf.Tensor) -> tf.Tensor:
    """TensorFlow's ``Uint32ToFloat``: the low 23 bits as the mantissa of a float in [1, 2), minus 1."""
    mantissa = tf.cast(words & tf.constant(0x7FFFFF, tf.uint64), tf.uint32)
    return tf.bitcast(mantissa | tf.constant(0x3F800000, tf.uint32), tf.float32) - 1.0


@tf.function(jit_compile=True)
def philox_uniform_pairs(key: tf.Tensor, counter: tf.Tensor, blocks: int) -> tuple[tf.Tensor, tf.Tensor]:
    """The first and second uniforms of the 2·``blocks`` pairs of the stream, in order: what
    ``tf.random.stateless_uniform([2·blocks, 2], seed)`` holds in its two columns, bit for bit."""
    x0, x1, x2, x3 = philox_words(key, counter, blocks)
    # Block j holds pair 2j in words 0–1 and pair 2j + 1 in words 2–3.
    return (tf.reshape(tf.stack([unit_float(x0), unit_float(x2)], axis=1), [-1]),
            tf.reshape(tf.stack([unit_float(x1), unit_float(x3)], axis=1), [-1]))


@tf.function(jit_compile=True)
def _polar_pairs(key: tf.Tensor, counter: tf.Tensor, blocks: int, stddev: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Each pair's radius σ·√(−2 ln max(u₁, 10⁻⁷)) and angle 2π·u₂, in one compiled pass (XLA's log and
    square root are vectorized; its sine and cosine are not, so those stay TensorFlow's)."""
    first, second = philox_uniform_pairs(key, counter, blocks)
    radius = tf.sqrt(-2.0 * tf.math.log(tf.maximum(first, _BOX_MULLER_EPSILON))) * stddev
    return radius, second * tf.constant(2.0 * math.pi, tf.float32)


@tf.function(jit_compile=True)
def _interleaved(radius: tf.Tensor, sine: tf.Tensor, cosine: tf.Tensor, size: int) -> tf.Tensor:
    """The stream's first ``size`` normals: pair j gives values 2j (r·sin) and 2j + 1 (r·cos)."""
    return tf.reshape(tf.stack([radius * sine, radius * cosine], axis=1), [-1])[:size]


def _shape_of(tensor: tf.Tensor):
    """The static shape where known (all of a model's variables), else the dynamic one."""
    return tensor.shape.as_list() if tensor.shape.is_fully_defined() else tf.shape(tensor)
