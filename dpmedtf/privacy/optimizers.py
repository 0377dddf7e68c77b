"""DP-SGD on tensorflow-privacy's vectorized DP-Keras NAdam: per-example clipping, Gaussian noise.

``VectorizedDPKerasNadamOptimizer`` is built with ``make_vectorized_keras_optimizer_class`` on Keras 2's
legacy Nadam. It is used for what it does exactly right: each example's gradient (via
``tape.jacobian``) clipped to norm C and summed. Noise is *not* left to it, for two reasons:

1. It adds noise on every call. With a physical-batch cap a logical step spans several calls, and the
   accountant's mechanism adds noise once per step: N(0, σ²C²) on the step's clipped sum.
2. It divides by the actual batch size. Under Poisson sampling that size is data-dependent (and may
   be 0), while only a data-independent constant may scale the released sum without changing the
   guarantee; we divide by the expected batch size B.

So the optimizer is constructed with noise 0 for clipping, and ``noised_mean`` adds the step's noise,
then scales by 1/B. The noise is stateless Philox, one stream per variable, each seeded with 128 bits
derived from the run's secret for that (step, variable) (``privacy.randomness``): the same step draws
the same noise after a resume, and the secret is the only state to keep. With ``privacy.secure_rng``
the noise values themselves come from the CSPRNG and are passed in (``noised_mean(noise=...)``).
"""

from __future__ import annotations

import tensorflow as tf
from tensorflow_privacy.privacy.optimizers.dp_optimizer_keras_vectorized import make_vectorized_keras_optimizer_class

VectorizedDPKerasNadamOptimizer = make_vectorized_keras_optimizer_class(tf.keras.optimizers.legacy.Nadam)


def make_dp_nadam(learning_rate: float, clip_norm: float) -> tf.keras.optimizers.legacy.Optimizer:
    """The vectorized DP NAdam, clipping per example to ``clip_norm``; noise is added per logical step."""
    return VectorizedDPKerasNadamOptimizer(l2_norm_clip=clip_norm, noise_multiplier=0.0, num_microbatches=None,
                                           learning_rate=learning_rate)


def clipped_gradient_sum(optimizer, per_example_loss: tf.Tensor, variables, tape: tf.GradientTape) -> list[tf.Tensor]:
    """Σ_i clip(∇ℓ_i, C) over the examples of ``per_example_loss`` (shape (n,), n ≥ 1)."""
    n = tf.cast(tf.shape(per_example_loss)[0], tf.float32)
    # With noise 0 the optimizer returns (Σ clipped) / n; multiplying by n recovers the sum.
    return [gradient * n for gradient, _ in optimizer._compute_gradients(per_example_loss, variables, tape=tape)]


def noised_mean(clipped_sums, noise_stddev: float, expected_batch_size: float, seeds: tf.Tensor | None = None,
                noise=None) -> list[tf.Tensor]:
    """(Σ clipped + N(0, noise_stddev²)) / B for each variable: one DP-SGD step's gradient.

    ``seeds`` (variables × 2 int64, from ``RunSecret.noise_seeds``) gives variable i its own 128-bit
    Philox seed, which TensorFlow mixes whole into the stream's key and counter. Alternatively ``noise``
    gives the noise values (one tensor per variable, already of standard deviation ``noise_stddev``).
    ``noise_stddev`` must be a float32 value ≥ σ·C (``randomness.noise_stddev_float32``): it is used as is.
    """
    if noise is not None:
        return [(total + tf.reshape(tf.cast(n, total.dtype), tf.shape(total))) / expected_batch_size
                for total, n in zip(clipped_sums, noise)]
    seeds = tf.cast(seeds, tf.int64)
    return [(total + tf.random.stateless_normal(tf.shape(total), seeds[i], stddev=noise_stddev, dtype=total.dtype))
            / expected_batch_size for i, total in enumerate(clipped_sums)]
