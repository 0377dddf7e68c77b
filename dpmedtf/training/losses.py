"""Per-example binary cross-entropy, weighted per label (paper: inverse class frequency).

Per-example (no reduction), because DP-SGD clips each example's gradient: the loss of example i
must depend on example i only.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def inverse_frequency_weights(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positive, negative) weights per label, n / (2·count), so both classes weigh equally overall; n counts
    the label's observed entries only (NaN = ignored). A label with no positives (or no negatives) gets
    weight 1 for the empty class."""
    labels = np.asarray(labels, dtype=np.float64)
    n = np.isfinite(labels).sum(axis=0)
    positives = np.nansum(labels, axis=0)
    negatives = n - positives
    positive = np.where(positives > 0, n / (2 * np.maximum(positives, 1)), 1.0)
    negative = np.where(negatives > 0, n / (2 * np.maximum(negatives, 1)), 1.0)
    return positive.astype(np.float32), negative.astype(np.float32)


def prior_weights(prevalences) -> tuple[np.ndarray, np.ndarray]:
    """The same weighting from prevalences known publicly: 1/(2p) and 1/(2(1−p)). Uses no private data."""
    p = np.asarray(prevalences, dtype=np.float64)
    return (1 / (2 * p)).astype(np.float32), (1 / (2 * (1 - p))).astype(np.float32)


def weighted_bce_per_example(labels: tf.Tensor, logits: tf.Tensor, positive_weight: tf.Tensor,
                             negative_weight: tf.Tensor) -> tf.Tensor:
    """(n,) losses: per example, the class-weighted BCE with logits summed over the observed labels and
    divided by the number of labels L — the mean over labels when all are observed. An ignored label
    (NaN) adds exactly zero to the loss and to its gradient: it is replaced before the BCE (a NaN would
    poison the gradient even when multiplied by zero), and its weight is zero. Dividing by L, not by the
    observed count, keeps every observed label's weight independent of which others are missing."""
    labels = tf.cast(labels, logits.dtype)
    observed = tf.math.is_finite(labels)
    known = tf.where(observed, labels, tf.zeros_like(labels))
    elementwise = tf.nn.sigmoid_cross_entropy_with_logits(labels=known, logits=logits)
    weights = tf.where(observed, known * positive_weight + (1.0 - known) * negative_weight, tf.zeros_like(known))
    return tf.reduce_sum(weights * elementwise, axis=-1) / tf.cast(tf.shape(labels)[-1], logits.dtype)
