"""Group privacy: patient-level ε from image-level DP, checked against tf-privacy and a closed form."""

import math
import re

import dp_accounting
import pytest
from scipy import optimize, stats

from dpmedtf.errors import PrivacyParameterError
from dpmedtf.privacy import accounting as acc
from dpmedtf.privacy.group import GroupPrivacy, _bracket, group_epsilon

# Demo-like: a few hundred images, image-level ε ≈ 8 at δ = 1e-3.
DEMO_N, DEMO_B, DEMO_EPOCHS, DEMO_SIGMA, DEMO_DELTA = 300, 32, 30, 1.1, 1e-3


def demo_event():
    return acc.dp_sgd_event(DEMO_B / DEMO_N, DEMO_SIGMA, acc.steps_for_epochs(DEMO_N, DEMO_B, DEMO_EPOCHS))


def exact_gaussian_delta(epsilon, mu):
    """δ(ε) of a Gaussian mechanism with sensitivity / noise std = μ (Balle & Wang 2018, Theorem 8)."""
    return stats.norm.cdf(-epsilon / mu + mu / 2) - math.exp(epsilon) * stats.norm.cdf(-epsilon / mu - mu / 2)


def exact_gaussian_epsilon(mu, delta):
    return optimize.brentq(lambda e: exact_gaussian_delta(e, mu) - delta, 0, 500)


def tf_privacy_poisson_epsilons(k):
    """(example ε, user ε) 'assuming Poisson sampling' from tf-privacy's RDP privacy statement."""
    from tensorflow_privacy.privacy.analysis import compute_dp_sgd_privacy_lib as tfp_lib

    text = tfp_lib.compute_dp_sgd_privacy_statement(
        number_of_examples=DEMO_N, batch_size=DEMO_B, num_epochs=DEMO_EPOCHS, noise_multiplier=DEMO_SIGMA,
        delta=DEMO_DELTA, used_microbatching=False, max_examples_per_user=k,
        accountant_type=tfp_lib.AccountantType.RDP)
    example_part, user_part = text.split("User-level DP")
    poisson = re.compile(r"Poisson sampling \(\*\):\s+(\S+)")
    return float(poisson.search(example_part).group(1)), float(poisson.search(user_part).group(1))


def test_matches_tf_privacy_user_level_rdp_on_the_demo_setting():
    k = 3
    tfp_example, tfp_user = tf_privacy_poisson_epsilons(k)
    ours = group_epsilon(demo_event(), DEMO_DELTA, k, accountant="rdp")
    # Same event: tf-privacy runs ceil(E/q) = ceil(30 / (32/300)) = ceil(281.25) = 282 steps, as does
    # steps_for_epochs (for an exact multiple its float division could add a step; here it cannot), with
    # the same default RDP orders. Remaining differences: tf-privacy prints 3 decimals, its Brent
    # tolerance differs, and we step to the low side of the root; all far below 1e-3.
    assert group_epsilon(demo_event(), DEMO_DELTA, 1, "rdp").epsilon == pytest.approx(tfp_example, abs=1e-3)
    assert ours.epsilon == pytest.approx(tfp_user, abs=1e-3)
    assert ours.epsilon >= tfp_user - 5e-4  # never below theirs beyond print rounding
    # At image-level ε ≈ 9 the lemma's δ factor (1 + e^ε + e^2ε) forces a tiny image δ: patient ε ≈ 117.
    assert ours.epsilon > 100 and ours.example_delta < 1e-30


def test_pld_is_no_looser_than_rdp_when_both_are_finite():
    event = demo_event()
    rdp, pld = (group_epsilon(event, DEMO_DELTA, 2, a) for a in ("rdp", "pld"))
    assert math.isfinite(pld.epsilon) and pld.epsilon <= rdp.epsilon
    assert pld.accountant == "pld" and "pld" in pld.method and "Vadhan 2017 Lemma 2.2" in pld.method


def test_no_finite_bound_is_reported_as_infinite():
    # PLD answers ε = ∞ for δ below the tail mass its discretisation puts at infinity (~1e-20 here); k = 3
    # at image ε ≈ 8 needs an image δ near 1e-37 (see the RDP result above), so PLD has no finite bound.
    pld = group_epsilon(demo_event(), DEMO_DELTA, 3, "pld")
    assert pld.epsilon == math.inf and "no finite bound" in pld.method
    # A non-private mechanism: no bound at any group size.
    for k in (1, 3):
        assert group_epsilon(dp_accounting.NonPrivateDpEvent(), 1e-5, k).epsilon == math.inf


def test_search_does_not_jump_over_the_only_valid_example_deltas():
    # gap(x) = log(group δ / target) at example δ = e^x. PLD's ε turns infinite below its tail mass, so
    # the valid example δs can be a narrow window just above that: a decade step from 0 lands at −3.3,
    # in the infinite region, while [−2.5, −2] is valid. (Example ε never falls as example δ falls,
    # so gap may drop by at most 1 per unit of x going down, as it does here.)
    def window(x):
        return 1 + 0.5 * x if x >= -2.5 else math.inf
    low, high, why = _bracket(window, 0.0)
    assert why is None and window(low) <= 0 < window(high)

    def no_window(x):
        return 1 + 0.1 * x if x >= -3 else math.inf
    assert _bracket(no_window, 0.0)[2] is not None


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
@pytest.mark.parametrize("sigma", [1.0, 4.0, 16.0])
@pytest.mark.parametrize("k", [2, 3, 5])
def test_never_under_claims_against_the_exact_group_gaussian(accountant, sigma, k):
    # A group of k records moves a Gaussian mechanism's sensitivity-1 query by k: its exact (ε, δ)
    # curve is the Gaussian one with μ = k/σ. The lemma's bound must never claim less.
    delta = 1e-5
    bound = group_epsilon(dp_accounting.GaussianDpEvent(sigma), delta, k, accountant)
    if accountant == "pld" and k / sigma >= 5:
        # The lemma needs an image δ near 1e-23 here, below the tail mass (~1e-22) PLD puts at ε = ∞.
        assert bound.epsilon == math.inf and "no finite bound" in bound.method
        return
    exact = exact_gaussian_epsilon(k / sigma, delta)
    assert bound.epsilon >= exact
    assert exact_gaussian_delta(bound.epsilon, k / sigma) <= delta
    # The lemma's own accounting is kept, and the search ends next to the target (not at a loose point).
    assert bound.achieved_delta <= delta and bound.achieved_delta == pytest.approx(delta, rel=1e-6)
    assert bound.epsilon == k * bound.example_epsilon
    factor = sum(math.exp(i * bound.example_epsilon) for i in range(k))
    assert bound.example_delta * factor <= delta * (1 + 1e-12)


def test_works_for_any_event_and_uses_the_dpmedtf_accountant():
    # DP-SGD plus a noisy count of the training set, as a ledger would compose them.
    composed = dp_accounting.ComposedDpEvent([demo_event(), dp_accounting.GaussianDpEvent(20.0)])
    for accountant in ("rdp", "pld"):
        both = group_epsilon(composed, DEMO_DELTA, 2, accountant)
        assert both.epsilon > group_epsilon(demo_event(), DEMO_DELTA, 2, accountant).epsilon
        assert both.example_epsilon == acc.epsilon_of_event(composed, both.example_delta, accountant)[0]


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_group_of_one_is_the_plain_epsilon(accountant):
    event = demo_event()
    one = group_epsilon(event, DEMO_DELTA, 1, accountant)
    plain = acc.epsilon_of_event(event, DEMO_DELTA, accountant)[0]
    assert one == GroupPrivacy(plain, DEMO_DELTA, 1, plain, DEMO_DELTA, DEMO_DELTA, one.method, accountant)
    assert group_epsilon(event, DEMO_DELTA, 2, accountant).epsilon > 2 * plain


@pytest.mark.parametrize("kwargs, message", [
    (dict(group_size=0), "group size must be"),
    (dict(group_size=-2), "group size must be"),
    (dict(group_size=2.0), "group size must be"),
    (dict(group_size=True), "group size must be"),
    (dict(delta=0.0), r"delta must be a number in \(0, 1\)"),
    (dict(delta=1.0), r"delta must be a number in \(0, 1\)"),
    (dict(delta=-1e-5), r"delta must be a number in \(0, 1\)"),
    (dict(delta=float("nan")), r"delta must be a number in \(0, 1\)"),
    (dict(accountant="moments"), "unknown accountant"),
    (dict(event="SelfComposed"), "needs a dp_accounting DpEvent"),
    (dict(event=dp_accounting.UnsupportedDpEvent()), "cannot account for"),
])
def test_invalid_arguments_are_refused(kwargs, message):
    args = dict(event=dp_accounting.GaussianDpEvent(2.0), delta=1e-5, group_size=2, accountant="pld") | kwargs
    with pytest.raises(PrivacyParameterError, match=message):
        group_epsilon(**args)
