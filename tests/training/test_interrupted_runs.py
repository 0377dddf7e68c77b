"""A kill at any point of a training's writes resumes to the uninterrupted run's ledger and weights.

Each case kills a real ``dpmedtf train`` process (SIGKILL, see ``kill_at.py``) at one point of its
writes, then runs the same job again into the same directory, as a user would after a crash.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from dpmedtf.config import load_config
from dpmedtf.evaluation.job import evaluate_job
from dpmedtf.privacy.ledger import Ledger
from dpmedtf.training.job import run_training_job
from tests.training.conftest import job_file

TRAINING = {"batch_size": 8, "max_physical_batch": 8, "steps": 6, "checkpoint_every_steps": 2}
PRIVACY = {"target_epsilon": 6.0, "delta": 1e-3, "noise_seed": 11, "accountant": "rdp"}


@pytest.fixture(scope="module")
def uninterrupted(cohort_manifest, tmp_path_factory):
    work = tmp_path_factory.mktemp("uninterrupted")
    run_training_job(load_config(job_file(work, cohort_manifest, PRIVACY, TRAINING)), work / "run")
    return work / "run"


def assert_same_run(run, reference):
    assert Ledger.load(run / "ledger.json") == Ledger.load(reference / "ledger.json")
    assert json.loads((run / "training.json").read_text())["status"] == "finished"
    a = tf.keras.models.load_model(run / "model.keras", compile=False)
    b = tf.keras.models.load_model(reference / "model.keras", compile=False)
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_allclose(wa, wb, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("point", ["model-save", "secret-erased", "checkpoint-write"])
def test_a_killed_training_resumes_to_the_uninterrupted_run(point, uninterrupted, cohort_manifest, tmp_path):
    job = job_file(tmp_path, cohort_manifest, PRIVACY, TRAINING)
    run = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-m", "tests.training.kill_at", point, str(job), str(run)],
                            capture_output=True, text=True, timeout=600, cwd=os.getcwd())
    assert killed.returncode == -9, killed.stderr[-2000:]
    if point == "model-save":  # what the issue saw: a partial model.keras and no finished record
        assert (run / ".partial-model.keras").exists() and not (run / "model.keras").exists()
    if point == "checkpoint-write":
        assert json.loads((run / "checkpoints" / "latest.json").read_text())["next_step"] == 2
    # Nothing half-done is taken for a finished model: evaluation says to resume training …
    with pytest.raises(Exception, match="no finished training .* resumes an interrupted run"):
        evaluate_job(load_config(job), run)
    # … and training again resumes to exactly the run that was never interrupted.
    run_training_job(load_config(job), run)
    assert_same_run(run, uninterrupted)
    assert not (run / ".partial-model.keras").exists()


def test_a_model_file_without_a_finished_record_is_discarded_not_trusted(uninterrupted, tmp_path, capsys,
                                                                          cohort_manifest):
    """The layout of the original report: a complete-looking model.keras beside a record saying running."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    record = json.loads((run / "training.json").read_text())
    (run / "training.json").write_text(json.dumps({**record, "status": "running"}))
    (run / "model.keras").write_bytes((run / "model.keras").read_bytes()[:1000])
    job = job_file(tmp_path, cohort_manifest, PRIVACY, TRAINING)
    run_training_job(load_config(job), run)
    assert "was left by an interrupted end of training" in capsys.readouterr().err
    assert_same_run(run, uninterrupted)
