"""Subgroup fairness with fairlearn's MetricFrame: per attribute the job names (default: sex, age group and
sex × age), per finding and averaged.

Definitions (the paper's where it gives them):
- statistical parity difference of group g = accuracy(g) − accuracy(everyone not in g);
- underdiagnosis = false negative rate (FNR) per group; FPR likewise;
- equalized-odds difference of an attribute = max over groups of the TPR or FPR gap (fairlearn);
- ECE = Σ_bins (n_bin / n) · |positive rate − mean predicted probability| over 10 equal-width bins;
- worst-group AUROC of an attribute = the lowest group AUROC;
- "mean" rows average the per-finding values, as the paper averages over its eight labels.
A group with fewer than ``MIN_POSITIVES`` positives (or negatives) is flagged: its numbers are noise.
A finding's rows use only the images where it is observed (``n`` says how many); a "mean" row's ``n``
counts the group's images.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
from fairlearn.metrics import MetricFrame, equalized_odds_difference, false_negative_rate, false_positive_rate
from sklearn.metrics import accuracy_score

from dpmedtf.data.attributes import FairnessSpec, Intersection, default_spec, with_intersections
from dpmedtf.evaluation.bootstrap import bootstrap_auroc
from dpmedtf.evaluation.metrics import observed, observed_rows

MIN_POSITIVES = 10
ECE_BINS = 10
ATTRIBUTES = default_spec("radiograph").names
"""The default audit's groupings: sex, age_group, sex_x_age."""


@dataclass(frozen=True)
class CalibrationBins:
    """The non-empty bins of a reliability diagram: images per bin, their mean predicted probability and
    their observed positive rate. One binning serves both the ECE and the drawn diagram."""

    count: np.ndarray
    mean_probability: np.ndarray
    positive_rate: np.ndarray


def calibration_bins(y_true: np.ndarray, probabilities: np.ndarray, bins: int = ECE_BINS) -> CalibrationBins:
    y_true, probabilities = np.asarray(y_true, float), np.asarray(probabilities, float)
    index = np.minimum((probabilities * bins).astype(int), bins - 1)  # 1.0 belongs to the last bin
    count = np.bincount(index, minlength=bins)
    used = count > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_probability = np.bincount(index, probabilities, minlength=bins) / count
        positive_rate = np.bincount(index, y_true, minlength=bins) / count
    return CalibrationBins(count[used], mean_probability[used], positive_rate[used])


def expected_calibration_error(y_true: np.ndarray, probabilities: np.ndarray, bins: int = ECE_BINS) -> float:
    calibration = calibration_bins(y_true, probabilities, bins)
    if calibration.count.sum() == 0:
        return 0.0
    weights = calibration.count / calibration.count.sum()
    return float(np.sum(weights * np.abs(calibration.positive_rate - calibration.mean_probability)))


def intersections_of(report_or_spec) -> tuple[Intersection, ...]:
    """The intersections of a ``FairnessSpec``, or of a fairness report's ``grouping`` (the paper's sex × age
    for reports written before the job could choose)."""
    if isinstance(report_or_spec, FairnessSpec):
        return report_or_spec.intersections
    grouping = (report_or_spec or {}).get("grouping")
    if not grouping:
        return default_spec("radiograph").intersections
    return tuple(Intersection(first=i["of"][0], second=i["of"][1]) for i in grouping.get("intersections", []))


def with_attribute_columns(predictions: pd.DataFrame, grouping=None) -> pd.DataFrame:
    """``predictions`` with the intersections (``sex_x_age``, ``race_x_sex``) as columns, as the report's groups
    are; ``grouping`` is the job's ``FairnessSpec`` or the fairness report that names them."""
    return with_intersections(predictions, intersections_of(grouping))


def fairness_rows(predictions: pd.DataFrame, thresholds: dict[str, float], findings: Sequence[str],
                  spec: FairnessSpec | None = None, redraws: int = 1000, seed: int = 0,
                  attributes: Sequence[str] | None = None) -> list[dict]:
    """The fairness report's ``rows``: one per (attribute, group, finding or 'mean'), for the groupings of
    ``spec`` (default: the paper's), or only those named in ``attributes``."""
    spec = spec or default_spec("radiograph")
    frame = with_attribute_columns(predictions, spec)
    rows = []
    for attribute in attributes or spec.names:
        groups = frame[attribute].astype(str)
        per_finding = []
        for finding in findings:
            keep = observed_rows(frame, finding)  # only the images where this finding is observed
            y, p = observed(frame, finding)
            predicted = (p >= thresholds[finding]).astype(int)
            per_finding.append(_finding_rows(attribute, groups[keep].reset_index(drop=True), finding, y, p,
                                             predicted, redraws, seed))
        rows.extend(r for block in per_finding for r in block)
        rows.extend(_mean_rows(attribute, per_finding, groups.value_counts().to_dict()))
    return rows


def _finding_rows(attribute, groups, finding, y, p, predicted, redraws, seed) -> list[dict]:
    with warnings.catch_warnings():  # fairlearn/sklearn warn on groups without one class; we flag those ourselves
        warnings.simplefilter("ignore")
        frame = MetricFrame(metrics={"accuracy": accuracy_score, "fnr": false_negative_rate, "fpr": false_positive_rate},
                            y_true=y, y_pred=predicted, sensitive_features=groups)
        eod = float(equalized_odds_difference(y, predicted, sensitive_features=groups))
    rows = []
    for group, metrics in frame.by_group.iterrows():
        members = (groups == group).to_numpy()
        n, positives = int(members.sum()), int(y[members].sum())
        intervals, _, _ = bootstrap_auroc(y[members], p[members], redraws=redraws, seed=seed)
        auroc = intervals[0]
        rest = ~members
        parity = float(metrics["accuracy"] - accuracy_score(y[rest], predicted[rest])) if rest.any() else 0.0
        warning = None
        if min(positives, n - positives) < MIN_POSITIVES:
            warning = (f"only {positives} positive and {n - positives} negative example(s): "
                       "AUROC and rates of this group are unreliable")
        rows.append({"attribute": attribute, "group": str(group), "finding": finding, "n": n,
                     "n_positive": positives, "prevalence": positives / n if n else float("nan"),
                     "auroc": auroc.estimate, "auroc_ci_low": auroc.low, "auroc_ci_high": auroc.high,
                     "accuracy": float(metrics["accuracy"]), "statistical_parity_difference": parity,
                     "fnr": _nan_if_undefined(metrics["fnr"], positives), "fpr": _nan_if_undefined(metrics["fpr"], n - positives),
                     "ece": expected_calibration_error(y[members], p[members]),
                     "equalized_odds_difference": eod, "warning": warning})
    worst = min((r["auroc"] for r in rows if np.isfinite(r["auroc"])), default=float("nan"))
    for r in rows:
        r["worst_group_auroc"] = worst
    return rows


def _nan_if_undefined(value, denominator: int) -> float:
    return float(value) if denominator > 0 else float("nan")


def _mean_rows(attribute: str, per_finding: list[list[dict]], group_sizes: dict[str, int]) -> list[dict]:
    """Per group, the average over findings of each metric (NaNs ignored), like the paper's averages. A group
    in which a finding is never observed averages over the findings it has."""
    numeric = ("prevalence", "auroc", "auroc_ci_low", "auroc_ci_high", "accuracy", "statistical_parity_difference",
               "fnr", "fpr", "ece", "equalized_odds_difference")
    groups = list(dict.fromkeys(r["group"] for block in per_finding for r in block))
    rows = []
    for group in groups:
        block = [r for finding_rows in per_finding for r in finding_rows if r["group"] == group]
        row = {"attribute": attribute, "group": group, "finding": "mean", "n": int(group_sizes.get(group, 0)),
               "n_positive": int(sum(r["n_positive"] for r in block))}
        for key in numeric:
            values = np.array([r[key] for r in block], float)
            row[key] = float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")
        warned = [r["finding"] for r in block if r["warning"]]
        row["warning"] = f"unreliable for {', '.join(warned)}" if warned else None
        rows.append(row)
    worst = min((r["auroc"] for r in rows if np.isfinite(r["auroc"])), default=float("nan"))
    for row in rows:  # the worst group by mean AUROC, not the mean of per-finding worst groups
        row["worst_group_auroc"] = worst
    return rows
