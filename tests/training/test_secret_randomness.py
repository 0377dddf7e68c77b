"""The mechanism's randomness against the adversary of DESIGN.md, who holds the job file and the run records."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import yaml

from dpmedtf.config import load_config
from dpmedtf.privacy.ledger import Ledger
from dpmedtf.privacy.randomness import RunSecret
from dpmedtf.training.trainer import train
from tests.training.conftest import job_file

DPMEDTF = str(Path(sys.executable).with_name("dpmedtf"))
TRAINING = {"steps": 1, "batch_size": 8, "max_physical_batch": 8, "seed": 0}


def logged(run: Path) -> dict[str, list[float]]:
    """Every scalar in the run's TensorBoard files, by tag (Keras' own and dpmedtf's privacy log)."""
    tags = {}
    for file in (run / "tensorboard").rglob("events*"):
        for event in tf.compat.v1.train.summary_iterator(str(file)):
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(float(tf.make_ndarray(value.tensor)))
    return tags


def model_weights(run: Path) -> list[np.ndarray]:
    return tf.keras.models.load_model(run / "model.keras").get_weights()


def train_cli(job: Path, out: Path) -> None:
    result = subprocess.run([DPMEDTF, "train", str(job), "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr


def test_one_job_file_trained_twice_draws_different_batches_unless_noise_seed_fixes_them(cohort_manifest, prepared,
                                                                                           tmp_path):
    secret_job = load_config(job_file(tmp_path, cohort_manifest, {"noise_multiplier": 1.0, "delta": 1e-3}, TRAINING,
                                      name="secret"))
    for run in ("a", "b"):
        train(secret_job, prepared, tmp_path / run)
    seeded_job = load_config(job_file(tmp_path, cohort_manifest, {"noise_multiplier": 1.0, "delta": 1e-3,
                                                                  "noise_seed": 42}, TRAINING, name="seeded"))
    for run in ("c", "d"):
        train(seeded_job, prepared, tmp_path / run)
    assert not all(np.array_equal(x, y) for x, y in zip(model_weights(tmp_path / "a"), model_weights(tmp_path / "b")))
    # sampling and noise both fixed by the published seed: the same model
    assert all(np.array_equal(x, y) for x, y in zip(model_weights(tmp_path / "c"), model_weights(tmp_path / "d")))
    # The training loss of the private batches is outside DP: no DP run's records carry it, only ε.
    for run in "abcd":
        tags = logged(tmp_path / run)
        assert "privacy/epsilon" in tags and not any("loss" in tag for tag in tags), tags
    assert Ledger.load(tmp_path / "a" / "ledger.json").notes["randomness"] == "secret"
    assert Ledger.load(tmp_path / "c" / "ledger.json").notes["randomness"] == "experiment"


def test_the_secret_is_in_no_run_record_and_erased_from_the_kept_checkpoint(cohort_manifest, prepared, tmp_path):
    """With a seed-derived key (so the test knows it), nothing but the checkpoint ever held it, and after
    training not even that: the kept checkpoint's key is zero and cannot be resumed."""
    from dpmedtf.training.checkpoints import latest_checkpoint, run_secret_of

    job = job_file(tmp_path, cohort_manifest, {"noise_multiplier": 1.0, "delta": 1e-3, "noise_seed": 7},
                   {**TRAINING, "steps": 2, "checkpoint_every_steps": 1}, name="job")
    run = tmp_path / "run"
    train(load_config(job), prepared, run)
    key = RunSecret.from_experiment_seed(7)
    needles = [key.key, key.key.hex().encode(), *(str(w).encode() for w in key.to_words())]
    for path in run.rglob("*"):
        if path.is_file() and "checkpoints" not in path.parts:
            content = path.read_bytes()
            assert not any(n in content for n in needles), path
    checkpoints = list((run / "checkpoints").glob("step-*"))
    assert [c.name for c in checkpoints] == ["step-000000002"]
    words = tf.train.load_checkpoint(str(checkpoints[0] / "state")).get_tensor("run_secret/.ATTRIBUTES/VARIABLE_VALUE")
    assert not np.any(words)
    (run / "model.keras").unlink()
    with pytest.raises(Exception, match="secret was erased"):
        run_secret_of(latest_checkpoint(run / "checkpoints"), load_config(job).privacy.noise_seed)


def test_release_refuses_a_reproducible_experiment_under_the_default_policy(cohort_manifest, tmp_path):
    from dpmedtf.evaluation.job import evaluate_job
    from dpmedtf.release.signing import generate_keypair

    generate_keypair(tmp_path / "key.pem", tmp_path / "key.pub")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "name": "experiment", "data": {"manifest": str(cohort_manifest), "image_size": 32},
        "privacy": {"target_epsilon": 8.0, "delta": 1e-3, "unit": "patient", "noise_seed": 3, "accountant": "rdp"},
        "training": TRAINING, "evaluation": {"bootstrap_redraws": 20},
        "release": {"private_key": str(tmp_path / "key.pem")}}))
    run = tmp_path / "run"
    train_cli(job, run)
    evaluate_job(load_config(job), run)
    refused = subprocess.run([DPMEDTF, "release", str(job), "--run", str(run), "--out", str(tmp_path / "bundle")],
                             capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0
    assert "privacy.require_secret_randomness" in refused.stderr + refused.stdout
    assert "Traceback" not in refused.stderr
    assert not (tmp_path / "bundle").exists()
    overridden = subprocess.run([DPMEDTF, "release", str(job), "--run", str(run), "--out", str(tmp_path / "bundle"),
                                 "--override-policy", "pipeline test of an experiment"],
                                capture_output=True, text=True, timeout=600)
    assert overridden.returncode == 0, overridden.stderr
    certificate = json.loads((tmp_path / "bundle" / "privacy_certificate.json").read_text())
    assert certificate["randomness"]["secret"] is False
    assert certificate["statement"].startswith("NO DIFFERENTIAL PRIVACY GUARANTEE APPLIES")
    metadata = json.loads((tmp_path / "bundle" / "metadata.json").read_text())
    assert "require_secret_randomness" in json.dumps(metadata)  # the override is recorded with the broken rule


def test_secure_rng_trains_end_to_end_and_is_reproducible_from_the_secret(cohort_manifest, prepared, tmp_path):
    """privacy.secure_rng through the real input pipeline: the CSPRNG noise reaches the step (two runs with
    one experiment key train the same model; a different key, a different one) and the ledger says how."""
    def run(name, seed):
        job = load_config(job_file(tmp_path, cohort_manifest, {"noise_multiplier": 1.0, "delta": 1e-3, "noise_seed": seed,
                                                               "secure_rng": True, "accountant": "rdp"},
                                   {**TRAINING, "steps": 2}, name=name))
        return tf.keras.models.load_model(train(job, prepared, tmp_path / name).model_path).get_weights()

    a, b, c = run("a", 1), run("b", 1), run("c", 2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert "CSPRNG" in Ledger.load(tmp_path / "a" / "ledger.json").notes["noise_rng"]
