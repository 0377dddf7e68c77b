"""Which model a job releases: the same answer for the runner's pre-flight check and for release_job."""

import pytest

from dpmedtf.config import config_from_mapping
from dpmedtf.errors import ConfigError
from dpmedtf.release.job import release_member


def job(privacy, release=None):
    return config_from_mapping({"privacy": {"delta": 1e-4, **privacy}, "release": release or {}})


def test_a_job_without_a_sweep_releases_its_one_model_from_the_run_directory_itself():
    name, member = release_member(job({"target_epsilon": 8.0}))
    assert name == "" and member.privacy.target_epsilon == 8.0


def test_a_sweep_of_one_releases_from_its_member_directory():
    # Training writes a sweep's models into <run>/<name> even when there is only one.
    name, member = release_member(job({"epsilon_sweep": [8.0]}))
    assert name == "epsilon-8" and member.privacy.target_epsilon == 8.0


def test_a_sweep_needs_release_member_and_says_which_names_exist():
    sweep = {"epsilon_sweep": [1.0, 8.0], "sweep_non_private": True}
    with pytest.raises(ConfigError, match=r"one of \['epsilon-1', 'epsilon-8', 'non-private'\]"):
        release_member(job(sweep))
    with pytest.raises(ConfigError, match="got 'epsilon-2'"):
        release_member(job(sweep, {"member": "epsilon-2"}))
    name, member = release_member(job(sweep, {"member": "non-private"}))
    assert name == "non-private" and not member.privacy.enabled
