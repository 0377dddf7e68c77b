"""Which examples each training step sees.

DP-SGD's privacy amplification holds for Poisson sampling: at every step every example joins the
batch independently with probability q, so batch sizes vary (and may be 0 — such a step still adds
noise and must still happen). ``PoissonSampler`` draws exactly that: one coin per example, compared
against q. Its ``sampling_rate`` and ``steps`` are the numbers the accountant must be given.

The amplification also assumes the adversary cannot tell which records a step drew, so the coins come
from a ``StepRandomness`` the caller holds secret (training passes the run's secret, a cryptographically
secure generator; see ``privacy.randomness``). This module only asks it for uniforms per (purpose, step):
data knows nothing of privacy. Each step's draw depends only on (secret, step), so a resumed run sees
exactly the batches an uninterrupted run would have: the sampler's whole state is the next step number.

Under a distribution strategy every worker runs the same sampler (the chief's secret), so all agree on
each step's batch without talking; the batch is cut into one contiguous shard per replica (``shards``).
A shard larger than memory allows is computed in physical chunks inside the trainer's step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence

import numpy as np


@dataclass(frozen=True)
class Shard:
    """One replica's part of a logical step's batch (the whole batch when there is one replica)."""

    step: int
    indices: np.ndarray
    """Example indices (into the dataset); may be empty (an empty Poisson batch, or fewer examples than replicas)."""
    replica: int
    """Global replica index (0 … num_replicas − 1) this shard is computed on."""


def split_among_replicas(indices: np.ndarray, num_replicas: int) -> list[np.ndarray]:
    """Contiguous, near-equal parts, one per replica, covering ``indices`` exactly once."""
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be ≥ 1, got {num_replicas}")
    return np.array_split(indices, num_replicas)


class StepRandomness(Protocol):
    """Independent uniforms on [0, 1) per (purpose, step), reproducible for the holder of the key."""

    def uniforms(self, purpose: str, step: int, count: int) -> np.ndarray: ...


def poisson_subset(coins: np.ndarray, rate: float) -> np.ndarray:
    """Sorted indices of the items whose uniform coin falls below ``rate``: each item independently
    with probability ``rate`` — Poisson sampling by its definition."""
    return np.flatnonzero(coins < rate)


class _StepSampler:
    """A sampler's whole state is the next step: ``indices(step)`` depends only on (key or seed, step)."""

    steps: int

    def indices(self, step: int) -> np.ndarray:
        raise NotImplementedError

    def shards(self, start_step: int = 0, stop_step: int | None = None, replicas: Sequence[int] = (0,),
               num_replicas: int = 1) -> Iterator[Shard]:
        """Steps ``start_step`` … ``stop_step`` − 1 (default: to the end), for each the shards of ``replicas``
        (a worker's local replicas, in the order its devices take elements) out of ``num_replicas``."""
        for step in range(start_step, self.steps if stop_step is None else min(stop_step, self.steps)):
            parts = split_among_replicas(self.indices(step), num_replicas)
            for replica in replicas:
                yield Shard(step, parts[replica], replica)


@dataclass(frozen=True)
class PoissonSampler(_StepSampler):
    """Poisson sampling over ``dataset_size`` examples with rate q = batch_size / dataset_size."""

    dataset_size: int
    batch_size: int
    """Expected logical batch size B; q = B / N exactly as the accountant computes it."""
    steps: int
    randomness: StepRandomness
    """The secret source of the coins (the run's secret in training)."""

    def __post_init__(self):
        if not 1 <= self.batch_size <= self.dataset_size:
            raise ValueError(f"batch size {self.batch_size} must be between 1 and the dataset size {self.dataset_size}")
        if self.steps < 1:
            raise ValueError(f"steps must be ≥ 1, got {self.steps}")

    @property
    def sampling_rate(self) -> float:
        return self.batch_size / self.dataset_size

    def indices(self, step: int) -> np.ndarray:
        """The sorted example indices of ``step``'s logical batch."""
        return poisson_subset(self.randomness.uniforms("poisson-sampling", step, self.dataset_size), self.sampling_rate)


@dataclass(frozen=True)
class ShuffledBatches(_StepSampler):
    """Non-private training: a fresh permutation each epoch, cut into batches of ``batch_size``.
    The last, smaller batch of an epoch is kept, so every example is seen once per epoch."""

    dataset_size: int
    batch_size: int
    steps: int
    seed: int = 0

    def __post_init__(self):
        if not 1 <= self.batch_size:
            raise ValueError(f"batch size must be ≥ 1, got {self.batch_size}")

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.dataset_size // self.batch_size)

    def indices(self, step: int) -> np.ndarray:
        epoch, position = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.dataset_size)
        return np.sort(order[position * self.batch_size:(position + 1) * self.batch_size])


@dataclass(frozen=True)
class PatientPoissonSampler(_StepSampler):
    """Patient-level Poisson sampling: each *patient* joins a step with probability q = B / P and then
    contributes up to ``max_images_per_patient`` (k) of their images, drawn at random. With every image
    clipped to C/k a patient's total contribution to a step is at most C, so the guarantee protects
    whole patients: N = P patients, sensitivity C."""

    patient_of_example: tuple
    """Patient ID of each example (training row), in example order."""
    batch_size: int
    """Expected patients per step."""
    steps: int
    randomness: StepRandomness
    """The secret source of the coins and of the choice of images (the run's secret in training)."""
    max_images_per_patient: int = 1

    def __post_init__(self):
        codes = np.unique(np.asarray(self.patient_of_example), return_inverse=True)[1]
        object.__setattr__(self, "_images_of", [np.flatnonzero(codes == p) for p in range(codes.max() + 1)])
        if not 1 <= self.batch_size <= self.dataset_size:
            raise ValueError(f"batch size {self.batch_size} must be between 1 and the {self.dataset_size} patients")

    @property
    def dataset_size(self) -> int:
        return len(self._images_of)

    @property
    def sampling_rate(self) -> float:
        return self.batch_size / self.dataset_size

    def indices(self, step: int) -> np.ndarray:
        patients = poisson_subset(self.randomness.uniforms("patient-sampling", step, self.dataset_size),
                                  self.sampling_rate)
        # A uniformly random k-subset of each sampled patient's images: the k with the smallest secret keys.
        keys = self.randomness.uniforms("image-choice", step, len(self.patient_of_example))
        chosen = [images[np.argsort(keys[images], kind="stable")[:self.max_images_per_patient]]
                  for images in (self._images_of[p] for p in patients)]
        return np.sort(np.concatenate(chosen)) if chosen else np.array([], dtype=np.int64)
