"""Membership-inference audit: can an attacker tell training images from held-out ones?

Two attacks, as defined by tensorflow-privacy's membership-inference library (whose 0.9.0 wheel
ships only import shims for a package it does not contain — tensorflow/privacy#555 — so the
attacks are computed here with scikit-learn, following the same definitions):
- threshold attack: the per-example loss itself is the membership score (low loss → member);
- trained attack: logistic regression on per-label losses, scored out-of-fold (5-fold CV) on a
  member/non-member set balanced by subsampling.
For each: attack AUC with its standard error, and advantage = max over thresholds of (TPR − FPR). A DP
model should leave them near 0.5 (within about two standard errors) and 0. Reported for the whole set and per subgroup slice.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.model_selection import StratifiedKFold, cross_val_predict

MIN_SLICE = 20


def per_label_losses(y_true: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """(n, L) binary cross-entropy of each label (the attacker's raw observations); 0 where a label is not
    observed (NaN), as it adds nothing to the training loss either."""
    p = np.clip(np.asarray(probabilities, float), 1e-7, 1 - 1e-7)
    y = np.asarray(y_true, float)
    return np.where(np.isfinite(y), -(np.nan_to_num(y) * np.log(p) + (1 - np.nan_to_num(y)) * np.log(1 - p)), 0.0)


def auc_standard_error(auc: float, n_members: int, n_nonmembers: int) -> float:
    """Standard error of an attack AUC (Hanley & McNeil 1982): how far from 0.5 is still chance."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    variance = auc * (1 - auc) + (n_members - 1) * (q1 - auc * auc) + (n_nonmembers - 1) * (q2 - auc * auc)
    return float(np.sqrt(max(variance, 0.0) / (n_members * n_nonmembers)))


def _auc_and_advantage(is_member: np.ndarray, score: np.ndarray) -> dict:
    fpr, tpr, _ = roc_curve(is_member, score)
    auc = float(roc_auc_score(is_member, score))
    n_members = int(is_member.sum())
    return {"auc": auc, "auc_standard_error": auc_standard_error(auc, n_members, len(is_member) - n_members),
            "advantage": float(np.max(tpr - fpr))}


def attack(member_losses: np.ndarray, nonmember_losses: np.ndarray, seed: int = 0) -> dict:
    """Both attacks on (n, L) per-label losses of members (training) and non-members (held out)."""
    rng = np.random.default_rng(seed)
    n = min(len(member_losses), len(nonmember_losses))
    members = member_losses[rng.choice(len(member_losses), n, replace=False)]
    nonmembers = nonmember_losses[rng.choice(len(nonmember_losses), n, replace=False)]
    features = np.log1p(np.vstack([members, nonmembers]))
    is_member = np.r_[np.ones(n), np.zeros(n)]
    threshold = _auc_and_advantage(is_member, -features.sum(axis=1))
    folds = StratifiedKFold(n_splits=min(5, n), shuffle=True, random_state=seed)
    trained_score = cross_val_predict(LogisticRegression(max_iter=1000), features, is_member, cv=folds,
                                      method="predict_proba")[:, 1]
    return {"n_members": n, "n_nonmembers": n, "threshold_attack": threshold,
            "trained_attack": _auc_and_advantage(is_member, trained_score)}


def membership_inference_audit(member_losses: np.ndarray, nonmember_losses: np.ndarray,
                               member_groups: dict[str, np.ndarray], nonmember_groups: dict[str, np.ndarray],
                               seed: int = 0) -> dict:
    """The attacks on everyone and on each subgroup slice with at least MIN_SLICE examples per side."""
    result = {"entire_dataset": attack(member_losses, nonmember_losses, seed), "slices": []}
    for attribute, member_values in member_groups.items():
        nonmember_values = nonmember_groups[attribute]
        for group in sorted(set(member_values) & set(nonmember_values)):
            m, o = member_values == group, nonmember_values == group
            if min(m.sum(), o.sum()) < MIN_SLICE:
                continue
            result["slices"].append({"attribute": attribute, "group": str(group),
                                     **attack(member_losses[m], nonmember_losses[o], seed)})
    return result
