"""Release policy: every broken rule is listed, nothing is written, overrides are recorded."""

import dataclasses
import json

import pytest
import yaml

from dpmedtf.errors import ConfigError
from dpmedtf.release.bundle import PolicyViolationError, build_bundle, load_candidate
from dpmedtf.release.certificate import build_certificate
from dpmedtf.release.policy import FairnessRules, PrivacyRules, ReleasePolicy, check_policy, load_policy

PARITY_OK = {"max_abs_difference": 1e-6, "passed": True}


@pytest.fixture(scope="module")
def candidate(released_run):
    return load_candidate(released_run[1])


def rules_broken(policy, candidate, ledger=None, parity=PARITY_OK):
    certificate = build_certificate(ledger or candidate.ledger)
    return [v.rule for v in check_policy(policy, certificate, candidate.fairness_report, parity)]


def test_default_policy_file_is_dpmedtfs_own_and_strict(tmp_path):
    policy = load_policy()
    assert policy.source.endswith("policy.yaml") and policy.privacy.max_epsilon == 10.0
    bad = tmp_path / "policy.yaml"
    bad.write_text(yaml.safe_dump({"privacy": {"max_epsilom": 1.0}}))
    with pytest.raises(ConfigError, match="max_epsilom"):
        load_policy(bad)


def test_epsilon_above_the_limit_is_refused(candidate):
    strict = ReleasePolicy(privacy=PrivacyRules(max_epsilon=1.0), fairness=FairnessRules(attributes=(), check_job_attributes=False))
    assert rules_broken(strict, candidate) == ["privacy.max_epsilon"]


def test_delta_at_or_above_one_over_n_is_refused(candidate):
    relaxed = ReleasePolicy(fairness=FairnessRules(attributes=(), check_job_attributes=False))
    n = candidate.ledger.dataset_size
    large = dataclasses.replace(candidate.ledger, delta=1.0 / n, notes={**candidate.ledger.notes, "allow_large_delta": True})
    assert rules_broken(relaxed, candidate, large) == ["privacy.require_delta_below_one_over_n"]
    assert rules_broken(relaxed, candidate) == []


def test_fairness_limits_are_checked_on_groups_large_enough(candidate):
    demanding = ReleasePolicy(fairness=FairnessRules(min_group_size=1, min_worst_group_auroc=0.99,
                                                     max_abs_statistical_parity_difference=0.0))
    broken = rules_broken(demanding, candidate)
    assert "fairness.min_worst_group_auroc" in broken and "fairness.max_abs_statistical_parity_difference" in broken
    lenient_sizes = ReleasePolicy(fairness=FairnessRules(min_group_size=10_000, min_worst_group_auroc=0.99,
                                                         max_abs_statistical_parity_difference=0.0))
    assert rules_broken(lenient_sizes, candidate) == []  # no group is large enough to be held to the limits


def test_parity_failure_is_a_policy_violation(candidate):
    relaxed = ReleasePolicy(fairness=FairnessRules(attributes=(), check_job_attributes=False))
    assert rules_broken(relaxed, candidate, parity={"max_abs_difference": 0.2, "passed": False}) == [
        "export.max_parity_difference"]


def test_release_refuses_listing_every_broken_rule_and_writes_nothing(candidate, keys, tmp_path):
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(yaml.safe_dump({"privacy": {"max_epsilon": 1.0},
                                           "fairness": {"min_group_size": 1, "min_worst_group_auroc": 0.99}}))
    out = tmp_path / "releases" / "bundle"
    with pytest.raises(PolicyViolationError) as refused:
        build_bundle(candidate, out, load_policy(policy_file), keys / "publisher.pem")
    message = str(refused.value)
    assert "privacy.max_epsilon" in message and "fairness.min_worst_group_auroc" in message
    assert "--override-policy" in message
    assert not out.exists()
    assert not (tmp_path / "releases").exists() or list((tmp_path / "releases").iterdir()) == []  # no staging left

    # the same release with an explicit override is built, and the override is on record
    built = build_bundle(candidate, out, load_policy(policy_file), keys / "publisher.pem",
                         override_reason="reviewed by the board, ticket 42")
    metadata = json.loads((built / "metadata.json").read_text())
    override = metadata["release"]["override"]
    assert override["reason"] == "reviewed by the board, ticket 42"
    assert any(v.startswith("privacy.max_epsilon") for v in override["violations_overridden"])
    assert "explicit policy override" in (built / "model_card.md").read_text()


def test_patient_level_epsilon_experiments_and_exact_class_counts_break_the_default_rules(candidate):
    """The release candidate itself passes these rules (patient unit, secret randomness, DP class counts);
    each way a run can fall short of them is refused by its own rule."""
    from dpmedtf.privacy.ledger import Ledger

    privacy_only = ReleasePolicy(fairness=FairnessRules(attributes=(), check_job_attributes=False))
    assert rules_broken(privacy_only, candidate) == []
    ledger = candidate.ledger
    per_image = Ledger(dataset_size=60, batch_size=ledger.batch_size, delta=ledger.delta, accountant="pld",
                       unit_of_privacy="image", releases=ledger.releases, segments=ledger.segments,
                       notes={**ledger.notes, "images_per_patient_max": 3})
    assert rules_broken(privacy_only, candidate, per_image) == ["privacy.max_patient_epsilon"]
    experiment = dataclasses.replace(ledger, notes={**ledger.notes, "randomness": "experiment"})
    assert rules_broken(privacy_only, candidate, experiment) == ["privacy.require_secret_randomness"]
    exact = ledger.with_non_dp_use("class weights", "inverse class frequencies counted exactly", private_data_used=True)
    assert rules_broken(privacy_only, candidate, exact) == ["privacy.forbidden_non_dp_uses"]
    relaxed = ReleasePolicy(privacy=PrivacyRules(forbidden_non_dp_uses=(), require_secret_randomness=False,
                                                 max_patient_epsilon=None), fairness=FairnessRules(attributes=(), check_job_attributes=False))
    assert rules_broken(relaxed, candidate, experiment) == rules_broken(relaxed, candidate, exact) == []


def test_the_jobs_own_attributes_are_held_to_the_limits_too():
    from dpmedtf.release.policy import _fairness_violations

    def row(attribute, group, auroc):
        return {"attribute": attribute, "group": group, "finding": "mean", "n": 50, "auroc": auroc,
                "statistical_parity_difference": 0.0}

    report = {"grouping": {"attributes": [{"name": "sex"}, {"name": "site"}]},
              "rows": [row("sex", "F", 0.8), row("sex", "M", 0.8), row("site", "site-A", 0.8), row("site", "site-C", 0.5)]}
    broken = _fairness_violations(FairnessRules(attributes=("sex",)), report)
    assert [v.rule for v in broken] == ["fairness.min_worst_group_auroc"] and "site = site-C" in broken[0].detail
    assert _fairness_violations(FairnessRules(attributes=("sex",), check_job_attributes=False), report) == []
    missing = _fairness_violations(FairnessRules(attributes=("sex", "age_group"), check_job_attributes=False), report)
    assert [v.detail for v in missing] == ["the fairness report has no rows for 'age_group'"]
