"""The one-run estimator against mechanisms whose ε is known in closed form or from another accountant.

Validity: the bound exceeds a mechanism's true ε in at most 1 − confidence of runs. Power: with a
strong enough mechanism-breaking signal it finds a large ε. Neither is checked against this module's
own arithmetic: randomised response has ε = log(p/(1−p)) exactly, and the Gaussian mechanism's ε(δ)
comes from dp_accounting's PLD accountant.
"""

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import pld_privacy_accountant
from scipy import stats

from dpmedtf.privacy.audit.one_run import (audit_scores, correct_guesses, epsilon_lower_bound_for, guess_counts,
                                            p_value)
from dpmedtf.privacy.audit.canaries import CanaryDraw
from dpmedtf.privacy.randomness import RunSecret


def randomised_response(epsilon, m, rng):
    included = rng.random(m) < 0.5
    truthful = rng.random(m) < math.exp(epsilon) / (1 + math.exp(epsilon))
    reported = np.where(truthful, included, ~included)
    return reported + 1e-3 * rng.random(m), included  # the tiny jitter only orders equal reports


def test_randomised_response_bound_stays_below_its_exact_epsilon_and_finds_most_of_it():
    epsilon, rng = 2.0, np.random.default_rng(0)
    bounds = [audit_scores(*randomised_response(epsilon, 1000, rng), delta=0.0).epsilon_lower_bound
              for _ in range(200)]
    # valid: over the exact ε in at most 5% of runs (Bonferroni makes it rarer still)
    assert np.mean(np.array(bounds) > epsilon) <= 0.05
    # powerful: 1000 canaries recover most of ε = 2 (about 1.6–1.8 at 95%)
    assert np.median(bounds) > 1.4


def test_gaussian_mechanism_bound_stays_below_the_pld_accountants_epsilon():
    mu, delta, m, rng = 2.0, 1e-5, 1000, np.random.default_rng(1)
    # a canary's score is its inclusion bit times μ plus N(0, 1): the Gaussian mechanism with σ = 1/μ
    true_epsilon = pld_privacy_accountant.PLDAccountant().compose(
        dp_accounting.GaussianDpEvent(1 / mu)).get_epsilon(delta)
    bounds = []
    for _ in range(100):
        included = rng.random(m) < 0.5
        bounds.append(audit_scores(included * mu + rng.standard_normal(m), included, delta=delta).epsilon_lower_bound)
    assert np.mean(np.array(bounds) > true_epsilon) <= 0.05
    assert 1.5 < np.median(bounds) < true_epsilon


def test_without_delta_the_p_value_is_the_binomial_tail_and_delta_only_raises_it():
    p = math.exp(1.0) / (1 + math.exp(1.0))
    direct = sum(stats.binom.pmf(k, 40, p) for k in range(33, 41))  # P[Bin(40, p) ≥ 33] summed by hand
    assert p_value(100, 40, 33, 1.0, 0.0) == pytest.approx(direct, rel=1e-9)
    assert p_value(100, 40, 33, 1.0, 1e-3) > p_value(100, 40, 33, 1.0, 0.0)
    assert epsilon_lower_bound_for(1000, 200, 190, 1e-3, 0.05) < epsilon_lower_bound_for(1000, 200, 190, 0.0, 0.05)


def test_no_better_than_chance_gives_zero_and_perfect_guesses_are_capped_by_the_number_of_guesses():
    assert epsilon_lower_bound_for(1000, 100, 50, 1e-5, 0.05) == 0.0
    # all r right: P[Bin(r, p) = r] = p^r < 0.05 ⇔ ε < log(1/(0.05^(−1/r) − 1)) — about log(r/3)
    for r in (16, 128, 1000):
        exact = -math.log(0.05 ** (-1 / r) - 1)
        assert epsilon_lower_bound_for(1000, r, r, 0.0, 0.05) == pytest.approx(exact, abs=1e-4)


def test_guesses_take_the_highest_and_lowest_scores_and_break_ties_by_canary_index():
    scores = np.array([0.0, 5.0, 0.0, -3.0, 5.0, 0.0])
    included = np.array([False, True, True, False, False, False])
    # top 2: canaries 1 and 4 (tie broken by index) → 1 right; bottom 2: canaries 3 then 5 → both right
    assert correct_guesses(scores, included, 4) == 3
    assert guess_counts(1000) == (2, 4, 8, 16, 32, 64, 128, 256, 512, 1000)
    assert guess_counts(5) == (2, 4)


def test_bad_inputs_are_refused_with_their_values():
    with pytest.raises(ValueError, match="equal-length"):
        audit_scores(np.zeros(4), np.zeros(5, bool), delta=1e-5)
    with pytest.raises(ValueError, match="finite"):
        audit_scores(np.array([0.0, np.nan]), np.array([True, False]), delta=1e-5)
    with pytest.raises(ValueError, match="confidence"):
        audit_scores(np.zeros(4), np.zeros(4, bool), delta=1e-5, confidence=1.5)
    with pytest.raises(ValueError, match="at least 2 canaries"):
        guess_counts(1)


def test_canary_coins_come_from_the_secret_include_half_and_sample_only_included_canaries_at_q():
    secret, m, q = RunSecret.fresh(), 4000, 0.1
    draw = CanaryDraw(count=m, sampling_rate=q, randomness=secret)
    included = draw.included()
    assert np.array_equal(included, CanaryDraw(count=m, sampling_rate=q, randomness=secret).included())
    assert not np.array_equal(included, CanaryDraw(count=m, sampling_rate=q, randomness=RunSecret.fresh()).included())
    assert abs(included.mean() - 0.5) < 4 * math.sqrt(0.25 / m)
    sampled = [draw.sampled(step, included) for step in range(20)]
    assert all(included[s].all() for s in sampled)
    rate = sum(len(s) for s in sampled) / (20 * included.sum())  # each included canary at q, per step
    assert abs(rate - q) < 4 * math.sqrt(q * (1 - q) / (20 * included.sum()))
    assert len({tuple(s) for s in sampled}) == 20  # a fresh draw every step
