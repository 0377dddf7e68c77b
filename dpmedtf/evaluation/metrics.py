"""Diagnostic metrics: Youden thresholds (chosen on validation, never on test), sensitivity,
specificity, accuracy, and DeLong's test for two correlated AUROCs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats
from sklearn.metrics import roc_curve


def observed_rows(frame, finding: str) -> np.ndarray:
    """Boolean mask of the rows of a predictions table where ``finding`` is observed: its ``<finding>_true``
    cell holds 0 or 1, not empty (an entry the label set ignores)."""
    return np.isfinite(frame[f"{finding}_true"].to_numpy(float, na_value=np.nan))


def observed(frame, finding: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels, probabilities) of ``finding`` on the rows where it is observed."""
    keep = observed_rows(frame, finding)
    return (frame[f"{finding}_true"].to_numpy(float, na_value=np.nan)[keep].astype(int),
            frame[f"{finding}_prob"].to_numpy(float)[keep])


def youden_threshold(y_true: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold maximising sensitivity + specificity − 1 (ties: the highest such threshold).
    Defined on validation predictions; 0.5 when the labels hold a single class or none (a finding never
    observed on validation)."""
    y_true = np.asarray(y_true)
    if y_true.size == 0 or y_true.min() == y_true.max():
        return 0.5
    fpr, tpr, thresholds = roc_curve(y_true, scores)
    finite = np.isfinite(thresholds)  # sklearn's first threshold is +inf (nothing predicted positive)
    j = tpr[finite] - fpr[finite]
    return float(thresholds[finite][int(np.argmax(j))])


@dataclass(frozen=True)
class BinaryRates:
    sensitivity: float
    specificity: float
    accuracy: float
    false_negative_rate: float
    false_positive_rate: float


def binary_rates(y_true: np.ndarray, predicted: np.ndarray) -> BinaryRates:
    """Rates of thresholded predictions; NaN for a rate whose denominator is empty."""
    y_true, predicted = np.asarray(y_true).astype(bool), np.asarray(predicted).astype(bool)
    positives, negatives = y_true.sum(), (~y_true).sum()
    tp, tn = (y_true & predicted).sum(), (~y_true & ~predicted).sum()
    sensitivity = tp / positives if positives else float("nan")
    specificity = tn / negatives if negatives else float("nan")
    accuracy = (tp + tn) / len(y_true) if len(y_true) else float("nan")  # a finding observed on no image
    return BinaryRates(float(sensitivity), float(specificity), float(accuracy),
                       float(1 - sensitivity), float(1 - specificity))


def _midranks(x: np.ndarray) -> np.ndarray:
    return stats.rankdata(x, method="average")


def delong_test(y_true: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray) -> tuple[float, float, float]:
    """DeLong et al. (1988) for two AUROCs on the same examples, via the fast midrank algorithm of
    Sun & Xu (2014). Returns (AUROC a, AUROC b, two-sided p-value of the difference)."""
    y_true = np.asarray(y_true).astype(bool)
    positives, negatives = np.flatnonzero(y_true), np.flatnonzero(~y_true)
    m, n = len(positives), len(negatives)
    if m < 2 or n < 2:
        raise ValueError("DeLong's test needs at least two positives and two negatives")
    aucs, v01, v10 = [], [], []
    for scores in (np.asarray(scores_a, float), np.asarray(scores_b, float)):
        tx, ty = _midranks(scores[positives]), _midranks(scores[negatives])
        tz = _midranks(np.r_[scores[positives], scores[negatives]])
        aucs.append((tz[:m].sum() - m * (m + 1) / 2) / (m * n))
        v01.append((tz[:m] - tx) / n)          # structural components of the positives
        v10.append(1.0 - (tz[m:] - ty) / m)    # … and of the negatives
    covariance = np.cov(np.vstack(v01)) / m + np.cov(np.vstack(v10)) / n
    variance = covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1]
    if variance <= 0:
        return float(aucs[0]), float(aucs[1]), 1.0 if aucs[0] == aucs[1] else 0.0
    z = (aucs[0] - aucs[1]) / np.sqrt(variance)
    return float(aucs[0]), float(aucs[1]), float(2 * stats.norm.sf(abs(z)))
