"""The canary audit has teeth: it passes the real mechanism and catches one that does less than it claims.

The same audit (a twin of one DP job: ResNet9, fast engine, Poisson sampling, 500 white-box canaries,
95% confidence) on (a) the mechanism as configured, (b) a mechanism whose noise is ten times smaller
than its ledger says, and (c) the same training without DP. The broken variants exist only here: the
test hands the twin its own ``GradientStep`` while the ledger keeps claiming the configured σ.
"""

import dataclasses
import math

import numpy as np
import pytest

from dpmedtf.config import config_from_mapping
from dpmedtf.privacy.audit.one_run import audit_scores
from dpmedtf.privacy.randomness import RunSecret
from dpmedtf.training.audit_twin import train_audit_twin, twin_plan
from dpmedtf.training.step import GradientStep

CANARIES = 500


def job(steps=20, **privacy):
    return config_from_mapping({
        "data": {"image_size": 32},
        "privacy": {"noise_multiplier": 3.0, "delta": 1e-5, "clip_norm": 1.0, "accountant": "rdp", "noise_seed": 7,
                    **privacy},
        "training": {"batch_size": 8, "max_physical_batch": 8, "steps": steps, "class_weights": "none"}})


def audit(config, prepared, kind="white-box", gradient_step=None):
    twin = train_audit_twin(config, prepared, kind=kind, canaries=CANARIES, gradient_step=gradient_step,
                            secret=RunSecret.from_experiment_seed(config.privacy.noise_seed), log=lambda _: None)
    return twin, audit_scores(twin.scores, twin.included, delta=config.privacy.delta)


def test_audit_passes_the_real_mechanism_and_catches_less_noise_and_no_dp(prepared):
    config = job()
    plan = twin_plan(config, prepared)
    honest, honest_bound = audit(config, prepared)
    certified = honest.ledger.epsilon()
    weak_noise = dataclasses.replace(plan.mechanism, noise_multiplier=plan.noise_multiplier / 10)
    broken, broken_bound = audit(config, prepared, gradient_step=GradientStep(mechanism=weak_noise, engine="fast",
                                                                              max_physical_batch=8))
    _, non_private_bound = audit(config, prepared, gradient_step=GradientStep(mechanism=None, max_physical_batch=8))
    print(f"certified ε {certified:.3f}; lower bounds: honest {honest_bound.epsilon_lower_bound:.3f}, "
          f"σ/10 {broken_bound.epsilon_lower_bound:.3f}, non-private {non_private_bound.epsilon_lower_bound:.3f}")
    # (a) the configured mechanism: the measured bound at or below what its ledger certifies
    assert honest_bound.epsilon_lower_bound <= certified
    # (b) and (c): the ledger still claims σ = 3, and the audit proves it wrong
    assert broken.ledger.epsilon() == certified
    assert broken_bound.epsilon_lower_bound > certified
    assert non_private_bound.epsilon_lower_bound > certified
    # the canaries were records like any other: each included one drawn at q per step
    expected = honest.included.sum() * plan.sampling_rate * plan.steps
    assert abs(honest.canary_samples - expected) < 4 * math.sqrt(expected)


def test_black_box_audit_scores_every_canary_and_stays_within_the_certificate(prepared):
    config = job(steps=10, noise_multiplier=1.0)
    twin, bound = audit(config, prepared, kind="black-box")
    assert twin.scores.shape == (CANARIES,) and np.all(np.isfinite(twin.scores)) and np.all(twin.scores < 0)
    assert len(np.unique(twin.scores)) > CANARIES // 2  # scored by the trained model, not a constant
    assert 0 <= bound.epsilon_lower_bound <= twin.ledger.epsilon()
    assert twin.kind == "black-box" and twin.steps == 10


def test_a_non_private_job_cannot_be_audited(prepared):
    from dpmedtf.errors import ConfigError

    with pytest.raises(ConfigError, match="privacy.enabled"):
        train_audit_twin(job(enabled=False, noise_multiplier=None), prepared, kind="white-box", canaries=10,
                         secret=RunSecret.fresh())
