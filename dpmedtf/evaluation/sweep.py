"""Across ε: the paper's analysis of a sweep's models on one test set.

- Pearson r of per-finding test AUROC against the finding's number of positive training images,
  for every model (does DP hurt rare findings more?);
- Pearson r of the DP − non-private AUROC drop against the same counts;
- per finding, each DP model against the non-private one: paired bootstrap CI of the AUROC
  difference and DeLong's p-value, on the same test images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from dpmedtf.evaluation.bootstrap import paired_bootstrap_difference
from dpmedtf.evaluation.metrics import delong_test, observed_rows


@dataclass(frozen=True)
class SweepMember:
    name: str
    epsilon: float | None
    """None for the non-private model."""
    metrics: dict
    predictions: pd.DataFrame
    fairness: dict
    """fairness_report.json of the model."""
    patient_epsilon: float | None = None
    """ε for all images of one patient (group privacy when the unit is the image), from the ledger."""
    unit: str | None = None
    """Unit of privacy of ``epsilon``: "image" or "patient"; None for the non-private model."""


def _pearson(x, y) -> dict:
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(x) & np.isfinite(y)
    if keep.sum() < 3 or np.ptp(x[keep]) == 0 or np.ptp(y[keep]) == 0:
        return {"r": None, "p": None, "n": int(keep.sum())}
    r, p = stats.pearsonr(x[keep], y[keep])
    return {"r": float(r), "p": float(p), "n": int(keep.sum())}


def analyse_sweep(members: list[SweepMember], findings: list[str], train_positives: dict[str, int],
                  redraws: int = 1000, seed: int = 0) -> dict:
    baseline = next((m for m in members if m.epsilon is None), None)
    positives = [train_positives[f] for f in findings]
    result = {"findings": findings, "train_positives": train_positives, "models": []}
    for member in sorted(members, key=lambda m: (m.epsilon is None, m.epsilon or 0.0)):
        aurocs = [member.metrics["findings"][f]["auroc"] for f in findings]
        entry = {"name": member.name, "epsilon": member.epsilon, "mean_auroc": member.metrics["mean"]["auroc"],
                 "auroc_vs_positives": _pearson(positives, aurocs)}
        if baseline is not None and member is not baseline:
            base = [baseline.metrics["findings"][f]["auroc"] for f in findings]
            entry["auroc_drop_vs_positives"] = _pearson(positives, np.subtract(base, aurocs))
            entry["versus_non_private"] = {}
            for f in findings:
                y = member.predictions[f"{f}_true"].to_numpy(float, na_value=np.nan)
                if not np.array_equal(y, baseline.predictions[f"{f}_true"].to_numpy(float, na_value=np.nan), equal_nan=True):
                    raise ValueError(f"{member.name} and {baseline.name} were not evaluated on the same test images")
                keep = observed_rows(member.predictions, f)
                y = y[keep].astype(int)
                dp = member.predictions[f"{f}_prob"].to_numpy()[keep]
                non_private = baseline.predictions[f"{f}_prob"].to_numpy()[keep]
                if y.sum() < 2 or (1 - y).sum() < 2:
                    entry["versus_non_private"][f] = None
                    continue
                difference, p_bootstrap = paired_bootstrap_difference(y, dp, non_private, redraws, seed)
                entry["versus_non_private"][f] = {"auroc_difference": difference.estimate, "ci_low": difference.low,
                                                  "ci_high": difference.high, "p_bootstrap": p_bootstrap,
                                                  "p_delong": delong_test(y, dp, non_private)[2]}
        result["models"].append(entry)
    return result
