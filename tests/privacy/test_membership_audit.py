"""The membership-inference audit separates memorised from unseen examples, and only those."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from dpmedtf.privacy.audit.membership import attack, membership_inference_audit, per_label_losses


def losses(n, scale, seed):
    return np.random.default_rng(seed).exponential(scale, (n, 8))


def test_memorised_members_are_detected_and_the_threshold_auc_is_the_loss_auroc():
    members, nonmembers = losses(400, 0.2, 0), losses(400, 1.0, 1)  # training losses much lower: overfit
    result = attack(members, nonmembers)
    direct = roc_auc_score(np.r_[np.ones(400), np.zeros(400)],
                           -np.log1p(np.vstack([members, nonmembers])).sum(axis=1))
    assert result["threshold_attack"]["auc"] == pytest.approx(direct)
    assert result["threshold_attack"]["auc"] > 0.9 and result["trained_attack"]["auc"] > 0.9
    assert result["threshold_attack"]["advantage"] > 0.6


def test_indistinguishable_members_give_chance_level():
    result = attack(losses(1000, 0.5, 2), losses(1000, 0.5, 3))
    for kind in ("threshold_attack", "trained_attack"):
        assert abs(result[kind]["auc"] - 0.5) < 0.05 and result[kind]["advantage"] < 0.1
        # At AUC 0.5 the Hanley–McNeil error is √((2n+1)/(12 n²)) for n members and n non-members.
        expected = np.sqrt(2001 / (12 * 1000 ** 2))
        assert result[kind]["auc_standard_error"] == pytest.approx(expected, rel=0.02)


def test_the_auc_standard_error_matches_the_spread_over_repeated_experiments():
    aucs, errors = [], []
    for seed in range(40):
        result = attack(losses(150, 0.8, 100 + seed), losses(150, 1.0, 200 + seed))
        aucs.append(result["threshold_attack"]["auc"])
        errors.append(result["threshold_attack"]["auc_standard_error"])
    assert np.mean(errors) == pytest.approx(np.std(aucs), rel=0.35)


def test_slices_by_subgroup_and_losses():
    rng = np.random.default_rng(4)
    member_sex, nonmember_sex = rng.choice(["F", "M"], 300), rng.choice(["F", "M"], 300)
    members = np.where((member_sex == "F")[:, None], losses(300, 0.2, 5), losses(300, 1.0, 6))  # only F memorised
    result = membership_inference_audit(members, losses(300, 1.0, 7), {"sex": member_sex}, {"sex": nonmember_sex})
    by_group = {s["group"]: s for s in result["slices"]}
    assert by_group["F"]["threshold_attack"]["auc"] > 0.85 > 0.6 > by_group["M"]["threshold_attack"]["auc"]
    np.testing.assert_allclose(per_label_losses([[1, 0]], [[0.5, 0.5]]), [[np.log(2), np.log(2)]])
