"""The accountant: exact DP-SGD parameters in, ε (or the smallest σ) out, checked independently."""

import json
import math

import dp_accounting
import pytest
from scipy import optimize, stats

from dpmedtf.errors import PrivacyParameterError
from dpmedtf.privacy import accounting as acc

PAPER_N, PAPER_B, PAPER_EPOCHS, PAPER_DELTA = 153_502, 128, 150, 6e-6
PAPER_EPSILONS = (0.29, 0.54, 1.06, 2.04, 4.71, 7.89)


def exact_gaussian_delta(epsilon, sigma):
    """δ(ε) of the Gaussian mechanism with sensitivity 1 (Balle & Wang 2018, Theorem 8)."""
    return (stats.norm.cdf(-epsilon * sigma + 1 / (2 * sigma))
            - math.exp(epsilon) * stats.norm.cdf(-epsilon * sigma - 1 / (2 * sigma)))


def exact_gaussian_epsilon(sigma, delta):
    return optimize.brentq(lambda e: exact_gaussian_delta(e, sigma) - delta, 0, 100)


def test_paper_steps_and_sampling_rate():
    assert acc.steps_for_epochs(PAPER_N, PAPER_B, PAPER_EPOCHS) == 179_886  # ceil(150 · 153502 / 128)
    assert acc.steps_for_epochs(100, 10, 1) == 10  # exact multiple: no extra step from float error
    schedule = acc.DpSgdSchedule(PAPER_N, PAPER_B, 179_886, 1.0)
    assert schedule.sampling_rate == PAPER_B / PAPER_N
    assert schedule.epochs == pytest.approx(150, rel=1e-4)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_full_batch_matches_the_exact_gaussian_mechanism(accountant):
    # q = 1: T steps of Gaussian(σ) compose to one Gaussian mechanism with noise σ/√T, whose ε is exact.
    sigma, steps, delta = 4.0, 16, 1e-5
    exact = exact_gaussian_epsilon(sigma / math.sqrt(steps), delta)
    got = acc.compute_epsilon(acc.DpSgdSchedule(100, 100, steps, sigma), delta, accountant).epsilon
    assert got >= exact * (1 - 1e-3), "an accountant must never report less than the true ε"
    if accountant == "pld":
        assert got == pytest.approx(exact, rel=0.01)  # PLD is (near) tight
    else:
        assert got < exact * 1.5  # RDP is a looser, but still sensible, upper bound


def test_epsilon_grows_with_steps_and_falls_with_noise():
    def eps(steps, sigma):
        return acc.compute_epsilon(acc.DpSgdSchedule(10_000, 100, steps, sigma), 1e-5).epsilon
    assert eps(100, 1.0) < eps(1000, 1.0)
    assert eps(1000, 2.0) < eps(1000, 1.0)


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_calibration_gives_the_smallest_sigma_for_the_target(accountant):
    target, delta, n, b, steps = 2.0, 1e-5, 10_000, 100, 500
    cal = acc.calibrate_noise_multiplier(target, delta, n, b, steps, accountant, sigma_tolerance=1e-4)
    sigma = cal.accounting.schedule.noise_multiplier
    # Recomputed independently of the calibration: ε at σ meets the target, a slightly smaller σ does not.
    at_sigma = acc.compute_epsilon(acc.DpSgdSchedule(n, b, steps, sigma), delta, accountant).epsilon
    below = acc.compute_epsilon(acc.DpSgdSchedule(n, b, steps, sigma - 1e-4), delta, accountant).epsilon
    assert at_sigma <= target < below
    assert at_sigma == pytest.approx(target, rel=1e-3)
    assert json.loads(json.dumps(cal.to_json_dict()))["calibration"]["sigma_tolerance"] == 1e-4


def test_paper_grid_round_trips_through_the_cli_with_both_accountants(capsys):
    """The issue's acceptance check, through the real CLI: noise for each ε, fed back into epsilon."""
    from dpmedtf.cli import main

    def run(argv):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
        return json.loads(capsys.readouterr().out)

    common = ["--dataset-size", str(PAPER_N), "--batch-size", str(PAPER_B), "--epochs", str(PAPER_EPOCHS),
              "--delta", str(PAPER_DELTA)]
    sigmas = {}
    for accountant in ("rdp", "pld"):
        for target in PAPER_EPSILONS:
            noise = run(["privacy", "noise", *common, "--target-epsilon", str(target), "--accountant", accountant])
            assert noise["steps"] == 179_886 and noise["sampling_rate"] == PAPER_B / PAPER_N
            back = run(["privacy", "epsilon", *common, "--noise-multiplier", repr(noise["noise_multiplier"]),
                        "--accountant", accountant])
            assert back["epsilon"] <= target and back["epsilon"] == pytest.approx(target, rel=0.01)
            sigmas[accountant, target] = noise["noise_multiplier"]
    for target in PAPER_EPSILONS:
        # PLD is tighter, so it needs less noise for the same guarantee; both decrease with ε.
        assert sigmas["pld", target] < sigmas["rdp", target]
    assert [sigmas["rdp", t] for t in PAPER_EPSILONS] == sorted((sigmas["rdp", t] for t in PAPER_EPSILONS), reverse=True)


def test_dp_event_json_round_trip_and_recompute():
    schedule = acc.DpSgdSchedule(1625, 512, 300, 1.3)
    data = json.loads(json.dumps(acc.dp_event_to_json(schedule.dp_event())))
    assert data["class_name"] == "SelfComposedDpEvent" and data["count"] == 300
    assert data["event"]["sampling_probability"] == 512 / 1625
    event = acc.dp_event_from_json(data)
    assert event == schedule.dp_event()
    assert acc.epsilon_of_event(event, 1e-4, "rdp")[0] == acc.compute_epsilon(schedule, 1e-4, "rdp").epsilon
    assert acc.epsilon_of_event(event, 1e-4, "pld")[0] == acc.compute_epsilon(schedule, 1e-4).epsilon  # PLD: the default


def test_dp_event_from_json_refuses_foreign_classes():
    with pytest.raises(PrivacyParameterError, match="unknown DpEvent class"):
        acc.dp_event_from_json({"class_name": "PrivacyAccountant"})
    with pytest.raises(PrivacyParameterError, match="unknown DpEvent class"):
        acc.dp_event_from_json({"class_name": "__builtins__"})
    with pytest.raises(PrivacyParameterError, match="malformed GaussianDpEvent"):
        acc.dp_event_from_json({"class_name": "GaussianDpEvent", "sigma": 1.0})


@pytest.mark.parametrize("kwargs, message", [
    (dict(dataset_size=100, batch_size=128, steps=10, noise_multiplier=1.0), "exceeds dataset size"),
    (dict(dataset_size=100, batch_size=0, steps=10, noise_multiplier=1.0), "batch size must be"),
    (dict(dataset_size=100, batch_size=10, steps=0, noise_multiplier=1.0), "steps must be"),
    (dict(dataset_size=100, batch_size=10, steps=10, noise_multiplier=0.0), "noise multiplier must be"),
    (dict(dataset_size=100, batch_size=10, steps=10, noise_multiplier=float("nan")), "noise multiplier must be"),
])
def test_invalid_schedules_are_refused(kwargs, message):
    with pytest.raises(PrivacyParameterError, match=message):
        acc.DpSgdSchedule(**kwargs)


def test_delta_at_or_above_one_over_n_needs_the_override():
    schedule = acc.DpSgdSchedule(1000, 10, 100, 1.0)
    with pytest.raises(PrivacyParameterError, match="1/N"):
        acc.compute_epsilon(schedule, 1e-3)
    assert acc.compute_epsilon(schedule, 1e-3, allow_large_delta=True).epsilon > 0
    # The paper's PDAC setting (δ = 1e-3, N = 1625 cases) is such a δ: it is only accepted explicitly.
    pdac = acc.DpSgdSchedule(1625, 512, 100, 1.0)
    with pytest.raises(PrivacyParameterError, match="N = 1625"):
        acc.compute_epsilon(pdac, 1e-3)
    with pytest.raises(PrivacyParameterError, match=r"delta must be a number in \(0, 1\)"):
        acc.compute_epsilon(schedule, 1.5, allow_large_delta=True)


def test_unreachable_target_is_refused_with_the_reason():
    # RDP cannot certify ε below ~log(1/δ)/(max order − 1) whatever the noise.
    with pytest.raises(PrivacyParameterError, match="no noise multiplier reaches"):
        acc.calibrate_noise_multiplier(0.01, 1e-8, 1000, 10, 500, "rdp")
    with pytest.raises(PrivacyParameterError, match="target epsilon must be"):
        acc.calibrate_noise_multiplier(0.0, 1e-5, 1000, 10, 500)


def test_pld_reaches_small_targets_rdp_cannot():
    cal = acc.calibrate_noise_multiplier(0.01, 1e-8, 1000, 10, 500, "pld")
    assert cal.accounting.epsilon <= 0.01


def test_schedule_event_is_the_dp_sgd_event():
    event = acc.DpSgdSchedule(1000, 10, 7, 1.1).dp_event()
    assert event == dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.1)), 7)
