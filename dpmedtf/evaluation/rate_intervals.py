"""Bootstrap CIs of the rates of thresholded predictions — sensitivity, specificity, accuracy and FNR
(underdiagnosis) — averaged over findings exactly as metrics.json's "mean" and the fairness report's
"mean" rows average them (a finding whose rate is undefined, e.g. no positives, is left out).

The redraws are ``bootstrap.redraw_weights`` with the evaluation's own (redraws, seed) for the same
examples, i.e. the very redraws behind the AUROC CIs of those examples: rate and AUROC intervals of a
model or group come from one resample. Each redraw's rate is a weighted count, so all redraws are
one matrix product.
"""

from __future__ import annotations

import warnings

import numpy as np

from dpmedtf.evaluation.bootstrap import Interval, percentile_interval, redraw_weights

RATES = ("sensitivity", "specificity", "accuracy", "fnr")


def thresholded(predictions, thresholds: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """(n, findings) true labels and decisions at each finding's threshold, from a predictions table
    (``<finding>_true`` / ``<finding>_prob`` columns), findings in ``thresholds``' order."""
    findings = list(thresholds)
    y = predictions[[f"{f}_true" for f in findings]].to_numpy(float, na_value=np.nan)  # NaN: not observed
    predicted = np.column_stack([predictions[f"{f}_prob"].to_numpy() >= thresholds[f] for f in findings])
    return y, predicted


def mean_rate_intervals(y_true: np.ndarray, predicted: np.ndarray, redraws: int, seed: int) -> dict[str, Interval]:
    """Rate → estimate and percentile 95% CI of its mean over findings, for (n, findings) 0/1 arrays."""
    y_true, predicted = _as_matrix(y_true), _as_matrix(predicted)
    n = len(y_true)
    point = _mean_rates(np.ones((1, n), np.float32), y_true, predicted)
    redrawn = _mean_rates(redraw_weights(n, redraws, seed), y_true, predicted)
    return {rate: percentile_interval(float(point[rate][0]), redrawn[rate]) for rate in RATES}


def _as_matrix(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values).astype(np.float32)  # integer counts stay exact in float32 below 2**24
    return values[:, None] if values.ndim == 1 else values


def _mean_rates(weights: np.ndarray, y: np.ndarray, predicted: np.ndarray) -> dict[str, np.ndarray]:
    # An unobserved label (NaN) is neither positive nor negative: it counts in no rate of its finding.
    positive, negative = (y == 1).astype(np.float32), (y == 0).astype(np.float32)
    positives, negatives = weights @ positive, weights @ negative
    true_positives, true_negatives = weights @ (positive * predicted), weights @ (negative * (1 - predicted))
    total = positives + negatives
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a redraw of a small group may lack a class: NaN
        sensitivity = np.nanmean(np.where(positives > 0, true_positives / positives, np.nan), axis=1)
        specificity = np.nanmean(np.where(negatives > 0, true_negatives / negatives, np.nan), axis=1)
        accuracy = np.nanmean((true_positives + true_negatives) / total, axis=1)
    return {"sensitivity": sensitivity, "specificity": specificity, "accuracy": accuracy, "fnr": 1 - sensitivity}
