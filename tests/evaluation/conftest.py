"""A tiny DP model trained and evaluated through the CLI once per session, shared by the evaluation tests."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dpmedtf.data.synthetic import SyntheticCohortSpec, write_synthetic_cohort

DPMEDTF = str(Path(sys.executable).with_name("dpmedtf"))


@pytest.fixture(scope="session")
def evaluated(tmp_path_factory):
    """(work directory, the `dpmedtf evaluate` result); the run is ``work / "run"``."""
    work = tmp_path_factory.mktemp("evaluate")
    manifest = write_synthetic_cohort(work / "cohort", SyntheticCohortSpec(patients=40, image_size=48, seed=2))["radiograph"]
    job = work / "job.yaml"
    job.write_text(yaml.safe_dump({"name": "tiny", "data": {"manifest": str(manifest), "image_size": 32},
                                   "privacy": {"target_epsilon": 8, "delta": 1e-3, "accountant": "rdp"},
                                   "training": {"steps": 3, "batch_size": 8, "max_physical_batch": 8},
                                   "evaluation": {"bootstrap_redraws": 200}}))
    for command in (["train", str(job), "--out", str(work / "run")], ["evaluate", str(job), "--run", str(work / "run")]):
        result = subprocess.run([DPMEDTF, *command], capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr
    return work, result
