"""Class weights under DP: each label's prevalence from positive counts released by a Gaussian mechanism.

The paper weights the BCE loss by inverse class frequencies. Counted exactly on the training labels,
those weights make every example's loss depend on every other training label, which DP-SGD's
per-example clipping does not cover. Here the counts are a DP release of their own: each record (an
image, or a patient whose images contribute their mean label) adds a vector in [0, 1]^L, so one record
moves the count vector by at most √L in L2; Gaussian noise of standard deviation s on every count is
the Gaussian mechanism with noise multiplier s/√L. Its DpEvent is composed with DP-SGD's in the
ledger, so the certified ε covers the weights. The number of records N is treated as public.

When the label set may leave entries unobserved (an ``ignore`` policy), a label's denominator is its
number of observed entries, which is private too: then the negative counts are released beside the
positive ones, and prevalence = noisy positives / (noisy positives + noisy negatives). A record adds
(pos_j, neg_j) with pos_j + neg_j ≤ 1 for each label, so the 2L-vector still moves by at most √L in L2:
the same Gaussian mechanism, the same DpEvent, the same ε.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import dp_accounting
import numpy as np

from dpmedtf.privacy import accounting
from dpmedtf.privacy.ledger import Release

RELEASE_NAME = "class counts"


@dataclass(frozen=True, kw_only=True)
class CountRelease:
    """Noisy positive counts per label and what they reveal."""

    prevalences: np.ndarray
    """Noisy positive fraction per label, kept inside [1/(2N), 1 − 1/(2N)] so weights stay finite."""
    noise_std: float
    labels: int
    records: int
    observed_counts: bool = False
    """True when negative counts were released too (labels that may be unobserved)."""

    def dp_event(self) -> dp_accounting.DpEvent:
        return count_event(self.noise_std, self.labels)

    def ledger_release(self) -> Release:
        counted = "positive and negative" if self.observed_counts else "positive"
        return Release(RELEASE_NAME, f"per-label {counted} counts over {self.records} records + N(0, {self.noise_std:g}²) "
                                     f"each (L2 sensitivity √{self.labels}); loss weights 1/(2p), 1/(2(1−p))",
                       accounting.dp_event_to_json(self.dp_event()))


def count_event(noise_std: float, labels: int) -> dp_accounting.DpEvent:
    """The DpEvent of releasing ``labels`` counts with this noise (known before any data is read, so the
    plan calibrates σ with it and the release records the same event)."""
    return dp_accounting.GaussianDpEvent(noise_std / math.sqrt(labels))


def release_prevalences(labels: np.ndarray, record_of_example, noise_std: float, noise: np.ndarray,
                        observed_counts: bool = False) -> CountRelease:
    """Noisy prevalences of ``labels`` (examples × L: 1, 0, or NaN where not observed); ``record_of_example``
    groups examples into records (patient IDs for patient-level privacy, or None: each example is a record).
    ``noise``: standard normal draws from the run's secret, L of them, or 2L with ``observed_counts``
    (then negatives are counted and released too, and NaN entries count as neither)."""
    labels = np.asarray(labels, dtype=np.float64)
    count = labels.shape[1]
    if not observed_counts and np.isnan(labels).any():
        raise ValueError("labels hold unobserved (NaN) entries: release them with observed_counts=True")
    indicators = np.concatenate([labels == 1, labels == 0], axis=1).astype(np.float64) if observed_counts else labels
    if record_of_example is None:
        contributions = indicators
    else:  # a patient contributes the mean indicators of their images: pos_j + neg_j ≤ 1 still
        codes = np.unique(np.asarray(record_of_example), return_inverse=True)[1]
        contributions = np.zeros((codes.max() + 1, indicators.shape[1]))
        np.add.at(contributions, codes, indicators)
        contributions /= np.bincount(codes)[:, None]
    records = len(contributions)
    noisy = contributions.sum(axis=0) + noise_std * np.asarray(noise, dtype=np.float64)
    floor = 1.0 / (2 * records)
    if observed_counts:
        positives, negatives = noisy[:count], noisy[count:]
        prevalences = positives / np.maximum(positives + negatives, 1.0)
    else:
        prevalences = noisy / records
    return CountRelease(prevalences=np.clip(prevalences, floor, 1 - floor), noise_std=float(noise_std),
                        labels=count, records=records, observed_counts=observed_counts)
