"""The DP-SGD mechanism as one frozen object: what is clipped, how much noise, how records are sampled.

Everything that must agree for a privacy claim to be true — the clip norm the step clips to, the noise
the step adds, the sampling rate the sampler draws with, the DpEvent the accountant composes and the
ledger the certificate is built from — is read from one ``DpSgdMechanism`` (as jax_privacy's
``DPExecutionPlan`` bundles them), so no two parts of a run can disagree on a number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import dp_accounting

from dpmedtf.errors import PrivacyParameterError
from dpmedtf.privacy import accounting
from dpmedtf.privacy.ledger import Ledger
from dpmedtf.privacy.randomness import effective_noise_multiplier, noise_stddev_float32

UNITS: tuple[str, ...] = ("example", "image", "patient")
"""What one record of the guarantee is: one training example (an "image" in the CLI's imaging jobs), or
a "patient": all of a patient's examples, each clipped to C/k with at most k sampled per step."""


@dataclass(frozen=True, kw_only=True)
class DpSgdMechanism:
    """One DP-SGD run's mechanism: Poisson sampling at rate B/N, clipping to C, Gaussian noise σ·C per step."""

    dataset_size: int
    """N: records the sampler draws from (examples, or patients with ``unit="patient"``)."""
    expected_batch_size: int
    """B: expected records per step (the Poisson sampler draws each with probability B/N)."""
    clip_norm: float
    """C: bound on one record's contribution to a step's gradient sum."""
    noise_multiplier: float
    """σ as applied: the noise standard deviation σ·C rounded up to float32, divided by C."""
    delta: float
    accountant: str = accounting.DEFAULT_ACCOUNTANT
    unit: str = "example"
    max_examples_per_record: int = 1
    """k: with ``unit="patient"``, at most k of a patient's examples per step, each clipped to C/k."""
    allow_large_delta: bool = False
    prior_event: Any = None
    """DP releases of the same data composed before DP-SGD (e.g. noisy class counts), or None."""

    def __post_init__(self):
        accounting.check_sampling(self.dataset_size, self.expected_batch_size)
        accounting.check_delta(self.delta, self.dataset_size, self.allow_large_delta)
        if not (isinstance(self.clip_norm, (int, float)) and math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise PrivacyParameterError(f"clip_norm must be a finite number > 0, got {self.clip_norm!r}")
        # σ = 0 is a mechanism too (ε = ∞; tests use it to see clipping alone); ``with_noise`` and
        # ``calibrated``, which users reach, refuse it.
        if not (isinstance(self.noise_multiplier, (int, float)) and math.isfinite(self.noise_multiplier)
                and self.noise_multiplier >= 0):
            raise PrivacyParameterError(f"noise_multiplier must be a finite number ≥ 0, got {self.noise_multiplier!r}")
        if self.unit not in UNITS:
            raise PrivacyParameterError(f"unit must be one of {UNITS}, got {self.unit!r}")
        if self.accountant not in ("pld", "rdp"):
            raise PrivacyParameterError(f"accountant must be 'pld' or 'rdp', got {self.accountant!r}")
        if not isinstance(self.max_examples_per_record, int) or self.max_examples_per_record < 1:
            raise PrivacyParameterError(f"max_examples_per_record must be a whole number ≥ 1, "
                                        f"got {self.max_examples_per_record!r}")

    @classmethod
    def calibrated(cls, *, target_epsilon: float, dataset_size: int, expected_batch_size: int, steps: int,
                   clip_norm: float, delta: float, accountant: str = accounting.DEFAULT_ACCOUNTANT,
                   **settings) -> "DpSgdMechanism":
        """The mechanism with the smallest σ that spends ``target_epsilon`` exactly at step ``steps``."""
        calibration = accounting.calibrate_noise_multiplier(
            target_epsilon, delta, dataset_size, expected_batch_size, steps, accountant,
            allow_large_delta=settings.get("allow_large_delta", False), prior_event=settings.get("prior_event"))
        return cls.with_noise(noise_multiplier=calibration.accounting.schedule.noise_multiplier,
                              dataset_size=dataset_size, expected_batch_size=expected_batch_size, clip_norm=clip_norm,
                              delta=delta, accountant=accountant, **settings)

    @classmethod
    def with_noise(cls, *, noise_multiplier: float, clip_norm: float, **settings) -> "DpSgdMechanism":
        """The mechanism for a requested σ, raised to the σ the float32 graph actually applies."""
        if not (isinstance(clip_norm, (int, float)) and math.isfinite(clip_norm) and clip_norm > 0):
            raise PrivacyParameterError(f"clip_norm must be a finite number > 0, got {clip_norm!r}")
        if not (isinstance(noise_multiplier, (int, float)) and math.isfinite(noise_multiplier) and noise_multiplier > 0):
            raise PrivacyParameterError(f"noise_multiplier must be a finite number > 0, got {noise_multiplier!r}; σ = 0 "
                                        "is no privacy (train without DP instead)")
        return cls(noise_multiplier=effective_noise_multiplier(noise_multiplier, clip_norm), clip_norm=clip_norm,
                   **settings)

    @property
    def sampling_rate(self) -> float:
        """q = B/N, every record's probability of being in a step's batch."""
        return self.expected_batch_size / self.dataset_size

    @property
    def example_clip_norm(self) -> float:
        """What one example is clipped to: C, or C/k when a record (patient) adds up to k examples per step."""
        return self.clip_norm / self.max_examples_per_record

    @property
    def noise_stddev(self) -> float:
        """The float32 standard deviation the step adds to the clipped sum (≥ σ·C)."""
        return noise_stddev_float32(self.noise_multiplier, self.clip_norm)

    @property
    def normaliser(self) -> float:
        """The data-independent constant the noised sum is divided by: expected examples per step."""
        return float(self.expected_batch_size * self.max_examples_per_record)

    def dp_event(self, steps: int) -> dp_accounting.DpEvent:
        """``steps`` steps of this mechanism, after its prior releases."""
        return accounting.with_prior_releases(accounting.dp_sgd_event(self.sampling_rate, self.noise_multiplier, steps),
                                              self.prior_event)

    def epsilon(self, steps: int) -> float:
        """ε at δ after ``steps`` steps (and the prior releases), from the accountant."""
        return accounting.epsilon_of_event(self.dp_event(steps), self.delta, self.accountant)[0]

    def new_ledger(self, *, epsilon_budget: float | None = None, notes: dict | None = None) -> Ledger:
        """An empty ledger for this mechanism (no step taken yet); ``record_steps`` adds to it."""
        return Ledger(self.dataset_size, self.expected_batch_size, self.delta, self.accountant, self.unit,
                      epsilon_budget, notes=dict(notes or {}))

    def record_steps(self, ledger: Ledger, steps: int) -> Ledger:
        """``ledger`` after ``steps`` more steps of this mechanism."""
        return ledger.record(steps, self.sampling_rate, self.noise_multiplier, self.clip_norm)


def run_notes(*, experiment: bool, secure_rng: bool, engine) -> dict[str, str]:
    """What the ledger (and so the certificate) says about how a run's randomness, noise and clipping worked."""
    return {
        "randomness": "experiment" if experiment else "secret",
        "randomness_source": "derived from privacy.noise_seed in the job file: REPRODUCIBLE EXPERIMENT, no DP guarantee"
                             if experiment else
                             "256-bit secret from OS entropy, kept only in checkpoints and erased when training ends",
        "sampling_rng": "ChaCha20 keyed by the run secret (HMAC-SHA256 sub-key), one coin per record and step",
        "noise_rng": ("CSPRNG (ChaCha20) Gaussian, sum of four draws ÷ 2 (secure_rng)" if secure_rng
                      else "stateless Philox, a 128-bit seed per (step, variable) from the run secret's ChaCha20 stream")
                     + "; σ·C rounded up to float32",
        "noise_added": "once per step to the global clipped sum (on replica 0 under a distribution strategy)",
        "normalisation": "noised clipped sum divided by the expected batch size",
        "clipping_engine": engine.description,
    }
