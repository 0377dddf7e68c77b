"""AUROC, bootstrap, thresholds and tests, each checked against an independent computation."""

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import confusion_matrix, roc_auc_score

from dpmedtf.evaluation.bootstrap import (bootstrap_auroc, paired_bootstrap_difference, redraw_weights,
                                          weighted_auroc)
from dpmedtf.evaluation.metrics import binary_rates, delong_test, youden_threshold


def data(n=300, seed=0, ties=True):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    scores = y * 0.8 + rng.normal(0, 0.7, n)
    return y, (np.round(scores, 1) if ties else scores)  # rounding creates many ties


def test_unweighted_auroc_is_sklearns_with_ties():
    y, s = data()
    assert weighted_auroc(y, s, np.ones((1, len(y))))[0] == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_every_redraw_equals_sklearn_on_the_explicitly_resampled_data():
    y, s = data(120, seed=1)
    rng = np.random.default_rng(5)
    indices = rng.integers(0, len(y), (40, len(y)))
    weights = np.stack([np.bincount(row, minlength=len(y)) for row in indices]).astype(np.float32)
    got = weighted_auroc(y, s, weights)
    expected = [roc_auc_score(y[row], s[row]) for row in indices]
    np.testing.assert_allclose(got, expected, atol=1e-12)


def test_redraws_are_seeded_resamples_and_can_be_stratified():
    w = redraw_weights(50, 200, seed=3)
    assert w.shape == (200, 50) and (w.sum(axis=1) == 50).all()
    np.testing.assert_array_equal(w, redraw_weights(50, 200, seed=3))
    labels = np.r_[np.ones(3), np.zeros(47)]
    stratified = redraw_weights(50, 200, seed=3, stratify=labels)
    assert (stratified[:, :3].sum(axis=1) == 3).all() and (stratified[:, 3:].sum(axis=1) == 47).all()


def test_bootstrap_intervals_cover_the_estimate_and_narrow_with_n():
    y, s = data(200, seed=2)
    intervals, mean, matrix = bootstrap_auroc(np.c_[y, y], np.c_[s, -s], redraws=500, seed=0)
    assert matrix.shape == (500, 2)
    first = intervals[0]
    assert first.low < first.estimate < first.high and first.estimate == pytest.approx(roc_auc_score(y, s))
    assert intervals[1].estimate == pytest.approx(1 - first.estimate)
    assert mean.estimate == pytest.approx(0.5)
    big_y, big_s = data(4000, seed=2)
    big = bootstrap_auroc(big_y, big_s, redraws=500)[0][0]
    assert (big.high - big.low) < 0.5 * (first.high - first.low)


def test_youden_threshold_is_the_brute_force_maximum():
    y, s = data(150, seed=4)
    threshold = youden_threshold(y, s)
    best = max(np.unique(s), key=lambda t: binary_rates(y, s >= t).sensitivity + binary_rates(y, s >= t).specificity)
    assert (binary_rates(y, s >= threshold).sensitivity + binary_rates(y, s >= threshold).specificity
            == pytest.approx(binary_rates(y, s >= best).sensitivity + binary_rates(y, s >= best).specificity))
    assert youden_threshold(np.zeros(5), np.arange(5)) == 0.5


def test_binary_rates_match_the_confusion_matrix():
    y, s = data(100, seed=6)
    predicted = s >= 0.4
    tn, fp, fn, tp = confusion_matrix(y, predicted).ravel()
    rates = binary_rates(y, predicted)
    assert rates.sensitivity == tp / (tp + fn) and rates.specificity == tn / (tn + fp)
    assert rates.accuracy == (tp + tn) / 100 and rates.false_negative_rate == pytest.approx(fn / (tp + fn))


def slow_delong(y, a, b):
    """DeLong from the definition: pairwise kernels ψ, structural components, covariance."""
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    components = []
    for s in (a, b):
        psi = (s[pos][:, None] > s[neg][None, :]) + 0.5 * (s[pos][:, None] == s[neg][None, :])
        components.append((psi.mean(axis=1), psi.mean(axis=0), psi.mean()))
    s10 = np.cov(np.vstack([c[0] for c in components]))
    s01 = np.cov(np.vstack([c[1] for c in components]))
    cov = s10 / len(pos) + s01 / len(neg)
    z = (components[0][2] - components[1][2]) / np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    return components[0][2], components[1][2], 2 * stats.norm.sf(abs(z))


def test_delong_matches_the_definition():
    y, a = data(180, seed=7)
    b = np.round(a + np.random.default_rng(8).normal(0, 0.5, len(a)), 1)
    np.testing.assert_allclose(delong_test(y, a, b), slow_delong(y, a, b), rtol=1e-10)
    assert delong_test(y, a, a)[2] == 1.0


def test_paired_bootstrap_difference():
    y, a = data(400, seed=9, ties=False)
    noise = np.random.default_rng(10).normal(0, 3, len(a))
    interval, p = paired_bootstrap_difference(y, a, a + noise, redraws=400)
    assert interval.estimate == pytest.approx(roc_auc_score(y, a) - roc_auc_score(y, a + noise))
    assert interval.low > 0 and p < 0.01  # a clearly better model
    same, p_same = paired_bootstrap_difference(y, a, a, redraws=200)
    assert same.estimate == same.low == same.high == 0 and p_same == 1.0
