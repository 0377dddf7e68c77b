"""Canaries of an audit run: which are included, when each is sampled, what they look like, how they score.

An audit inserts m canaries into a twin of the training run. Each is *included* with probability ½ by
a coin from the run's secret (the auditor keeps the coins to count right guesses; nothing the
adversary holds predicts them), and an included canary is a record like any other: at every step it
joins the batch with the mechanism's sampling rate q, by its own coin from the same secret.

Two kinds (``KINDS``):
- ``white-box`` — gradient canaries (Nasr et al. 2021, 2023; Steinke et al. 2023 §6): canary i adds
  C·eᵢ to the clipped sum of the steps it is sampled in, along a coordinate of an audit block of m
  parameters that the network does not use, so no image's gradient lands there. Its score is what the
  noised updates put on that coordinate over the whole run (Σₜ of the released gradient's eᵢ entry):
  exactly the view of an adversary who sees every update, for which DP-SGD's accounting is made.
- ``black-box`` — canary images: public random-noise images with random labels (out of distribution, so
  only memorisation can fit them), added to the training data when included. Their score is minus
  their loss under the final model: the view of someone holding only the released network.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dpmedtf.data.sampling import StepRandomness, poisson_subset

KINDS = ("white-box", "black-box")
DEFAULT_KIND = "white-box"
DEFAULT_CANARIES = 1000
CANARY_IMAGE_SEED = 20231210
"""Canary images and labels are public (the attacker designs them): a fixed seed, not the secret."""


@dataclass(frozen=True, kw_only=True)
class CanaryDraw:
    """The secret coins of ``count`` canaries: inclusion once, sampling per step at ``sampling_rate``."""

    count: int
    sampling_rate: float
    randomness: StepRandomness

    def __post_init__(self):
        if not isinstance(self.count, int) or self.count < 2:
            raise ValueError(f"an audit needs at least 2 canaries, got {self.count!r}")
        if not 0 < self.sampling_rate <= 1:
            raise ValueError(f"sampling rate must be in (0, 1], got {self.sampling_rate}")

    def included(self) -> np.ndarray:
        """(m,) bool: which canaries are in the twin's training data (probability ½ each)."""
        return self.randomness.uniforms("audit-canary-inclusion", 0, self.count) < 0.5

    def sampled(self, step: int, included: np.ndarray | None = None) -> np.ndarray:
        """Sorted indices of the included canaries in ``step``'s batch: Poisson at the mechanism's q."""
        included = self.included() if included is None else included
        candidates = poisson_subset(self.randomness.uniforms("audit-canary-sampling", step, self.count),
                                    self.sampling_rate)
        return candidates[included[candidates]]


def canary_images(count: int, item_shape: tuple[int, ...], dtype, value_range: tuple[float, float],
                  num_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` black-box canaries in the prepared array's space: uniform noise images and random 0/1 labels."""
    rng = np.random.default_rng(CANARY_IMAGE_SEED)
    low, high = value_range
    if np.issubdtype(np.dtype(dtype), np.integer):
        images = rng.integers(int(low), int(high) + 1, size=(count, *item_shape)).astype(dtype)
    else:
        images = rng.uniform(low, high, size=(count, *item_shape)).astype(dtype)
    labels = rng.integers(0, 2, size=(count, num_labels)).astype(np.float32)
    return images, labels


def loss_scores(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Black-box scores: minus each canary's summed binary cross-entropy (lower loss → more likely included)."""
    p = np.clip(np.asarray(probabilities, np.float64), 1e-7, 1 - 1e-7)
    y = np.asarray(labels, np.float64)
    return (y * np.log(p) + (1 - y) * np.log1p(-p)).sum(axis=1)
