"""DP training end to end on the synthetic cohort: ε from the ledger, budget, resume, TensorBoard, units."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from dpmedtf.config import config_from_mapping, load_config
from dpmedtf.data.sampling import PatientPoissonSampler
from dpmedtf.privacy import accounting as acc
from dpmedtf.privacy.ledger import Ledger
from dpmedtf.privacy.randomness import RunSecret
from dpmedtf.training.job import sweep_members
from dpmedtf.training.network import build_network
from dpmedtf.training.trainer import BudgetExceededError, plan_training, train
from tests.training.conftest import job_file

DPMEDTF = str(Path(sys.executable).with_name("dpmedtf"))
SMALL = {"batch_size": 8, "max_physical_batch": 4}


def config(privacy, training=None, model=None):
    # RDP calibrates in about 2 s where PLD takes 20–30 s on these tiny, high-q runs; tests that are about
    # the default accountant ask for PLD explicitly.
    privacy = {"accountant": "rdp", **privacy} if privacy.get("enabled", True) else privacy
    return config_from_mapping({"data": {"image_size": 32}, "privacy": privacy, "model": model or {},
                                "training": {**SMALL, "epochs": 1, **(training or {})}})


def test_epsilon_from_the_saved_ledger_is_the_reported_and_targeted_one(prepared, tmp_path):
    result = train(config({"target_epsilon": 4.0, "delta": 1e-3, "noise_seed": 3, "accountant": "pld"}), prepared,
                   tmp_path)
    ledger = Ledger.load(tmp_path / "ledger.json")
    summary = json.loads((tmp_path / "training.json").read_text())
    plan = summary["plan"]
    # Independently of dpmedtf's accounting code: dp_accounting's PLD on the two releases the run made —
    # the class counts (Gaussian, σ_counts/√labels) and DP-SGD — from the plan's own numbers.
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant
    counts = dp_accounting.GaussianDpEvent(plan["class_count_noise_std"] / np.sqrt(plan["num_labels"]))
    sgd = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
        plan["batch_size"] / plan["dataset_size"], dp_accounting.GaussianDpEvent(plan["noise_multiplier"])), summary["steps"])
    independent = pld_privacy_accountant.PLDAccountant().compose(counts).compose(sgd).get_epsilon(1e-3)
    assert ledger.epsilon() == summary["epsilon"] == result.ledger.epsilon()
    assert ledger.epsilon() == pytest.approx(independent, rel=1e-9)
    assert independent == pytest.approx(4.0, rel=1e-3) and ledger.epsilon() <= 4.0
    assert ledger.steps == result.steps == plan["steps"]
    assert ledger.segments[0].sampling_rate == 8 / plan["dataset_size"]
    assert [r.what for r in ledger.releases] == ["class counts"]  # dp_counts: the DP default
    assert "class weights" not in [u["what"] for u in ledger.non_dp_uses]
    assert ledger.accountant == "pld" and ledger.notes["randomness"] == "experiment"  # noise_seed was set
    assert ledger.notes["synthetic_data"] is True and summary["synthetic_data"] is True
    # TensorBoard has the ε scalar, ending at the ledger's value.
    values = [(event.step, tf.make_ndarray(value.tensor)) for file in (tmp_path / "tensorboard" / "privacy").glob("events*")
              for event in tf.compat.v1.train.summary_iterator(str(file)) for value in event.summary.value
              if value.tag == "privacy/epsilon"]
    assert values and values[-1][0] == ledger.steps and float(values[-1][1]) == pytest.approx(ledger.epsilon(), rel=1e-6)
    # A finished run is never overwritten silently.
    with pytest.raises(Exception, match="already exists"):
        train(config({"target_epsilon": 4.0, "delta": 1e-3}), prepared, tmp_path)


def test_a_plan_over_budget_refuses_to_start(prepared, tmp_path):
    cfg = config({"noise_multiplier": 0.5, "delta": 1e-3, "epsilon_budget": 2.0}, {"epochs": 3})
    with pytest.raises(BudgetExceededError, match=r"would spend ε = .* > budget 2; only \d+ steps fit"):
        train(cfg, prepared, tmp_path)
    assert not (tmp_path / "model.keras").exists() and not (tmp_path / "checkpoints").exists()


def test_stop_at_budget_trains_only_the_steps_that_fit(prepared, tmp_path):
    cfg = config({"noise_multiplier": 0.8, "delta": 1e-3, "epsilon_budget": 3.0}, {"epochs": 3, "stop_at_budget": True})
    result = train(cfg, prepared, tmp_path)
    assert 0 < result.steps < result.plan.steps
    assert result.ledger.epsilon() <= 3.0 < result.ledger.epsilon(1)
    assert json.loads((tmp_path / "training.json").read_text())["stopped_at_budget"] is True


def test_kill_and_resume_gives_the_uninterrupted_ledger_and_model(cohort_manifest, tmp_path):
    training = {**SMALL, "epochs": 3, "checkpoint_every_steps": 2}
    privacy = {"target_epsilon": 6.0, "delta": 1e-3, "noise_seed": 11, "accountant": "rdp"}
    env = {**os.environ, "TF_DETERMINISTIC_OPS": "1"}
    whole = job_file(tmp_path, cohort_manifest, privacy, training, name="whole")
    assert subprocess.run([DPMEDTF, "train", str(whole), "--out", str(tmp_path / "whole")], env=env,
                          capture_output=True, text=True, timeout=900).returncode == 0
    killed = job_file(tmp_path, cohort_manifest, privacy, training, name="killed")
    out = tmp_path / "killed"
    process = subprocess.Popen([DPMEDTF, "train", str(killed), "--out", str(out)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    total = json.loads((tmp_path / "whole" / "training.json").read_text())["steps"]
    stop_after = int(np.random.default_rng().integers(2, total - 2))  # a random point mid-training
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        pointer = out / "checkpoints" / "latest.json"
        if pointer.is_file() and json.loads(pointer.read_text())["next_step"] >= min(stop_after, total - 2):
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    interrupted_at = json.loads((out / "checkpoints" / "latest.json").read_text())["next_step"]
    assert 0 < interrupted_at < total and not (out / "model.keras").exists()
    resumed = subprocess.run([DPMEDTF, "train", str(killed), "--out", str(out)], env=env, capture_output=True,
                             text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {out} at step {interrupted_at}" in resumed.stderr
    assert Ledger.load(out / "ledger.json") == Ledger.load(tmp_path / "whole" / "ledger.json")
    a = tf.keras.models.load_model(out / "model.keras", compile=False)
    b = tf.keras.models.load_model(tmp_path / "whole" / "model.keras", compile=False)
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_allclose(wa, wb, rtol=1e-4, atol=1e-5)


def test_resuming_with_other_privacy_settings_is_refused(prepared, tmp_path):
    train(config({"target_epsilon": 5.0, "delta": 1e-3}, {"epochs": 2, "steps": 3}), prepared, tmp_path)
    (tmp_path / "model.keras").unlink()  # as if the run had been stopped after its last checkpoint
    with pytest.raises(Exception, match="different privacy settings"):
        train(config({"target_epsilon": 5.0, "delta": 1e-3, "clip_norm": 0.5}, {"epochs": 2, "steps": 3}),
              prepared, tmp_path)


def test_patient_level_privacy_samples_patients_and_bounds_their_images(prepared, tmp_path):
    cfg = config({"target_epsilon": 8.0, "delta": 1e-3, "unit": "patient", "max_images_per_patient": 2}, {"steps": 3})
    plan = plan_training(cfg, prepared)
    train_frame = prepared.cohort.frame[prepared.cohort.frame["split"] == "train"]
    assert plan.dataset_size == train_frame["patient_id"].nunique() and plan.example_clip_norm == 1.5 / 2
    sampler = PatientPoissonSampler(tuple(train_frame["patient_id"]), 4, 400, RunSecret.fresh(), max_images_per_patient=2)
    patients = np.asarray(train_frame["patient_id"])
    inclusions = np.zeros(sampler.dataset_size)
    codes = {p: i for i, p in enumerate(sorted(set(patients)))}
    for step in range(400):
        sampled = patients[sampler.indices(step)]
        unique, counts = np.unique(sampled, return_counts=True)
        assert counts.max(initial=0) <= 2  # no patient contributes more than k images to a step
        inclusions[[codes[p] for p in unique]] += 1
    assert inclusions.mean() / 400 == pytest.approx(sampler.sampling_rate, rel=0.1)
    result = train(cfg, prepared, tmp_path)
    assert result.ledger.unit_of_privacy == "patient" and result.ledger.dataset_size == plan.dataset_size


def test_non_private_baseline_and_transfer_from_pretrained_weights(prepared, tmp_path):
    baseline = train(config({"enabled": False}, {"steps": 3}), prepared, tmp_path / "public")
    assert baseline.ledger is None and not (tmp_path / "public" / "ledger.json").exists()
    pretrained = tf.keras.models.load_model(baseline.model_path, compile=False)
    cfg = config({"target_epsilon": 8.0, "delta": 1e-3},
                 model={"pretrained_weights": str(baseline.model_path), "activation": "relu",
                        "pretrained_on": "a public cohort (here: synthetic)"})
    network = build_network(cfg, prepared, 8)
    np.testing.assert_array_equal(network.get_layer("stage3_conv1").get_weights()[0],
                                  pretrained.get_layer("stage3_conv1").get_weights()[0])
    result = train(dataclass_steps(cfg, 2), prepared, tmp_path / "finetuned")
    assert result.ledger.notes["pretrained_on"] == "a public cohort (here: synthetic)"


def dataclass_steps(cfg, steps):
    import dataclasses
    return dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, steps=steps))


def test_epsilon_sweep_trains_each_target_and_the_baseline_with_shared_settings(cohort_manifest, tmp_path):
    path = job_file(tmp_path, cohort_manifest, {"epsilon_sweep": [2.0, 8.0], "sweep_non_private": True, "delta": 1e-3,
                                                       "accountant": "rdp"},
                    {**SMALL, "steps": 2}, name="sweep")
    members = dict(sweep_members(load_config(path)))
    assert list(members) == ["epsilon-2", "epsilon-8", "non-private"]
    assert members["epsilon-2"].model.activation == "mish" and members["non-private"].model.activation == "relu"
    assert members["non-private"].training.augment is True and members["epsilon-8"].training.augment is False
    result = subprocess.run([DPMEDTF, "train", str(path), "--out", str(tmp_path / "sweep")], capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    for name, epsilon in (("epsilon-2", 2.0), ("epsilon-8", 8.0)):
        assert Ledger.load(tmp_path / "sweep" / name / "ledger.json").epsilon() == pytest.approx(epsilon, rel=1e-3)
    assert (tmp_path / "sweep" / "non-private" / "model.keras").exists()


def test_class_weight_choices_are_recorded_in_the_ledger(prepared):
    from dpmedtf.training.losses import inverse_frequency_weights, prior_weights
    from dpmedtf.training.data_uses import initial_ledger

    labels = np.array([[1, 0], [0, 0], [0, 0], [1, 1]], np.float32)
    positive, negative = inverse_frequency_weights(labels)
    np.testing.assert_allclose(positive, [4 / (2 * 2), 4 / (2 * 1)])
    np.testing.assert_allclose(negative, [4 / (2 * 2), 4 / (2 * 3)])
    np.testing.assert_allclose(prior_weights([0.25])[0], [2.0])
    prior = (0.4, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1)
    secret = RunSecret.fresh()
    for weights, private in (("inverse_frequency", True), ("public_prior", False)):
        cfg = config({"target_epsilon": 8.0, "delta": 1e-3},
                     {"class_weights": weights, **({"class_prior": list(prior)} if weights == "public_prior" else {})})
        ledger = initial_ledger(cfg, plan_training(cfg, prepared), prepared, secret, None)
        assert [(u["what"], u["private_data_used"]) for u in ledger.non_dp_uses
                if u["what"] != "data split"] == [("class weights", private)]
    cfg = config({"target_epsilon": 8.0, "delta": 1e-3}, {"class_weights": "none"})
    assert [u["what"] for u in initial_ledger(cfg, plan_training(cfg, prepared), prepared, secret, None).non_dp_uses
            if u["what"] != "data split"] == []
    with pytest.raises(Exception, match="class_prior"):
        config({"target_epsilon": 8.0}, {"class_weights": "public_prior"})


def test_force_starts_over_without_leftovers(prepared, tmp_path):
    cfg = config({"target_epsilon": 5.0, "delta": 1e-3}, {"steps": 2})
    first = train(cfg, prepared, tmp_path)
    again = train(cfg, prepared, tmp_path, force=True)
    assert again.steps == first.steps == 2
    assert Ledger.load(tmp_path / "ledger.json").steps == 2  # not 4: the old run's ledger was not continued
    assert json.loads((tmp_path / "training.json").read_text())["status"] == "finished"


def test_fast_and_vectorized_engines_train_the_same_model(prepared, tmp_path):
    """Same seeds, same Poisson chunks, same noise: the two clipping engines, and the fast one compiled
    (training.jit_compile: true, chunks padded to exactly 4 masked rows), end at the same weights."""
    models = {}
    for engine, jit_compile in (("fast", False), ("vectorized", False), ("fast", True)):
        name = engine + ("-compiled" if jit_compile else "")
        job = config({"noise_multiplier": 1.0, "delta": 1e-3, "noise_seed": 5},
                     {"steps": 3, "clipping": engine, "jit_compile": jit_compile})
        result = train(job, prepared, tmp_path / name)
        models[name] = tf.keras.models.load_model(result.model_path).get_weights()
        assert engine in Ledger.load(tmp_path / name / "ledger.json").notes["clipping_engine"]
    for fast, vectorized, compiled in zip(models["fast"], models["vectorized"], models["fast-compiled"]):
        np.testing.assert_allclose(fast, vectorized, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(fast, compiled, rtol=1e-4, atol=1e-5)
    tf.keras.utils.set_random_seed(0)  # as train() does before building the network
    initial = build_network(config({"noise_multiplier": 1.0, "delta": 1e-3}), prepared, 8).get_weights()
    assert all(not np.array_equal(a, b) for a, b in zip(models["fast"], initial))  # every weight moved


def test_weights_pretrained_without_dp_on_the_same_manifest_are_refused(cohort_manifest, prepared, tmp_path):
    from dpmedtf.training.network import check_pretraining_is_public

    public = load_config(job_file(tmp_path, cohort_manifest, {"enabled": False}, {**SMALL, "steps": 1}, name="public"))
    baseline = train(public, prepared, tmp_path / "baseline")
    same_data = load_config(job_file(tmp_path, cohort_manifest, {"target_epsilon": 8.0, "delta": 1e-3},
                                     {**SMALL, "steps": 1}, name="dp",
                                     model={"pretrained_weights": str(baseline.model_path)}))
    with pytest.raises(Exception, match="trained without DP on this job's own manifest"):
        check_pretraining_is_public(same_data, prepared)
    with pytest.raises(Exception, match="trained without DP on this job's own manifest"):
        train(same_data, prepared, tmp_path / "dp")
    assert not (tmp_path / "dp" / "model.keras").exists()
    # A copy of the manifest under another name is the same data: refused by content, not only by path.
    copy = cohort_manifest.with_name("copy.csv")
    copy.write_bytes(cohort_manifest.read_bytes())
    renamed = load_config(job_file(tmp_path, copy, {"target_epsilon": 8.0, "delta": 1e-3}, {**SMALL, "steps": 1},
                                   name="renamed", model={"pretrained_weights": str(baseline.model_path)}))
    with pytest.raises(Exception, match="own manifest"):
        check_pretraining_is_public(renamed, prepared)
