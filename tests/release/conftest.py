"""One tiny DP model, trained and evaluated for real, shared by the release tests (about a minute)."""

import shutil
from pathlib import Path

import pytest
import yaml

from dpmedtf.config import load_config
from dpmedtf.data.synthetic import SyntheticCohortSpec, write_synthetic_cohort
from dpmedtf.evaluation.job import evaluate_job
from dpmedtf.release.signing import generate_keypair
from dpmedtf.training.job import run_training_job


def write_job(directory: Path, manifest: Path, key: Path, **release) -> Path:
    path = directory / "job.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny-release",
        "data": {"manifest": str(manifest), "image_size": 32},
        "privacy": {"target_epsilon": 8.0, "delta": 1e-3, "unit": "patient"},  # patient ε within the default policy
        "training": {"epochs": 2, "batch_size": 16, "max_physical_batch": 16, "seed": 3},
        "evaluation": {"bootstrap_redraws": 50},
        "release": {"private_key": str(key), **release}}))
    return path


RELEASE_MANAGER_FIELDS = {  # what release managers state in the model card; the session's job sets them all
    "owners": ["Radiology AI group, test site", "DP release team"],
    "license": "CC-BY-NC-4.0",
    "contact": "dp-release@example.org",
    "citation": "Test site radiology AI group. tiny-release, a DP chest radiograph model (2026).",
    "limitations": ["Only ever evaluated at 32 × 32 pixels."],
}


@pytest.fixture(scope="session")
def keys(tmp_path_factory):
    directory = tmp_path_factory.mktemp("keys")
    generate_keypair(directory / "publisher.pem", directory / "publisher.pub")
    generate_keypair(directory / "other.pem", directory / "other.pub")
    return directory


@pytest.fixture(scope="session")
def released_run(tmp_path_factory, keys):
    """(job file, run directory) of a finished, evaluated DP model on the synthetic cohort."""
    root = tmp_path_factory.mktemp("release-run")
    manifest = write_synthetic_cohort(root / "cohort", SyntheticCohortSpec(patients=40, image_size=48, seed=11))["radiograph"]
    job_path = write_job(root, manifest, keys / "publisher.pem", **RELEASE_MANAGER_FIELDS)
    job = load_config(job_path)
    run_training_job(job, root / "run")
    evaluate_job(job, root / "run")
    return job_path, root / "run"


@pytest.fixture(scope="session")
def bundle(released_run, keys, tmp_path_factory):
    """A bundle released with a recorded override (a 2-epoch model on 40 patients cannot meet the
    default fairness limits), built once through the library."""
    from dpmedtf.release.job import release_job

    job_path, run = released_run
    out = tmp_path_factory.mktemp("bundles") / "bundle"
    return release_job(load_config(job_path), run, out, override_reason="test model on synthetic data")


@pytest.fixture
def bundle_copy(bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    return copy
