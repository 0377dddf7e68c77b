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

import tensorflow as tf


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
