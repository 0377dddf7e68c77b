"""Per-example binary cross-entropy, weighted per label (paper: inverse class frequency).

Per-example (no reduction), because DP-SGD clips each example's gradient: the loss of example i
must depend on example i only.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def inverse_frequency_weights(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positive, negative) weights per label, n / (2·count), so both classes weigh equally overall.
    A label with no positives (or no negatives) gets weight 1 for the empty class."""
    labels = np.asarray(labels, dtype=np.float64)
    n = len(labels)
    positives, negatives = labels.sum(axis=0), n - labels.sum(axis=0)
    positive = np.where(positives > 0, n / (2 * np.maximum(positives, 1)), 1.0)
    negative = np.where(negatives > 0, n / (2 * np.maximum(negatives, 1)), 1.0)
    return positive.astype(np.float32), negative.astype(np.float32)


def prior_weights(prevalences) -> tuple[np.ndarray, np.ndarray]:
    """The same weighting from prevalences known publicly: 1/(2p) and 1/(2(1−p)). Uses no private data."""
    p = np.asarray(prevalences, dtype=np.float64)
    return (1 / (2 * p)).astype(np.float32), (1 / (2 * (1 - p))).astype(np.float32)


def weighted_bce_per_example(labels: tf.Tensor, logits: tf.Tensor, positive_weight: tf.Tensor,
                             negative_weight: tf.Tensor) -> tf.Tensor:
    """(n,) losses: per example, the mean over labels of the class-weighted BCE with logits."""
    labels = tf.cast(labels, logits.dtype)
    elementwise = tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)
    weights = labels * positive_weight + (1.0 - labels) * negative_weight
    return tf.reduce_mean(weights * elementwise, axis=-1)
