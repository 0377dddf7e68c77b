"""Distributed DP-SGD (tf.distribute): on 2 logical CPU devices (MirroredStrategy) and on 2 local workers
(MultiWorkerMirroredStrategy, TF_CONFIG on 127.0.0.1), one step's update equals the single-device update,
and the noise on the global update has standard deviation σ·C (added once, not once per replica).

Each distributed case runs in fresh processes (``tests/training/distributed_run.py``): logical devices
and cluster membership can only be set before TensorFlow starts.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import yaml

from dpmedtf.config import load_config
from dpmedtf.privacy.ledger import Ledger
from dpmedtf.training.trainer import train
from tests.training.conftest import job_file
from tests.training.distributed_run import CLIP, EXPECTED_BATCH, LEARNING_RATE, STEP_CASES, step_updates

ROOT = Path(__file__).resolve().parents[2]
DPMEDTF = str(Path(sys.executable).with_name("dpmedtf"))
TWO_CPUS = {"logical_cpus": 2, "devices": ["/cpu:0", "/cpu:1"]}
TIMEOUT = 900


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def worker_envs(count: int, scratch: Path) -> list[dict]:
    """TF_CONFIG for ``count`` workers on this machine; each worker's TMPDIR in ``scratch`` so the test
    can see what a non-chief leaves behind."""
    workers = [f"127.0.0.1:{port}" for port in free_ports(count)]
    envs = []
    for index in range(count):
        tmp = scratch / f"tmp-worker-{index}"
        tmp.mkdir(parents=True, exist_ok=True)
        envs.append({**os.environ, "TMPDIR": str(tmp), "TF_CPP_MIN_LOG_LEVEL": "2", "TF_CONFIG": json.dumps(
            {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})})
    return envs


def run_together(commands: list[list[str]], envs: list[dict], expect_exit: int = 0) -> list[str]:
    processes = [subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for command, env in zip(commands, envs)]
    try:
        outputs = [process.communicate(timeout=TIMEOUT)[0] for process in processes]
    finally:
        for process in processes:
            process.kill()
    for process, output in zip(processes, outputs):
        assert process.returncode == expect_exit, output[-3000:]
    return outputs


def distributed_run(args: dict) -> list[str]:
    return [sys.executable, "-m", "tests.training.distributed_run", json.dumps(args)]


# The step's distribution logic is the same for every engine: the default tests cover the fast engine
# and the non-private step; the vectorized engine under MirroredStrategy is in `make test-slow`.
FAST_CASES = ("fast", "fast-noise", "nondp")
VECTORIZED_CASES = ("vectorized", "vectorized-noise")


@pytest.fixture(scope="module")
def single_device_updates():
    return step_updates(tf.distribute.get_strategy(), FAST_CASES)


def check_updates(updates, reference, cases=tuple(STEP_CASES)):
    assert int(updates["replicas"]) == 2
    for name in cases:
        # float32 sums in another order: equal to ~1e-6 of the update's size.
        difference = np.linalg.norm(updates[name] - reference[name]) / np.linalg.norm(reference[name])
        assert difference < 1e-5, (name, difference)
    for engine in {case.split("-")[0] for case in cases} - {"nondp"}:
        # SGD moves by −lr·(Σ clipped + noise)/B: recover the noise on the global sum from two runs.
        noise = -(updates[f"{engine}-noise"] - updates[engine]) * EXPECTED_BATCH / LEARNING_RATE
        assert noise.size > 20_000
        # σ = 1: σ·C = 0.2. Noise on each of 2 replicas would give √2·σ·C = 0.28.
        assert noise.std() == pytest.approx(1.0 * CLIP, rel=0.03)
        assert abs(noise.mean()) < 0.03 * CLIP


def test_mirrored_on_two_logical_cpus_equals_one_device(tmp_path, single_device_updates):
    out = tmp_path / "updates.npz"
    run_together([distributed_run({"strategy": "mirrored", **TWO_CPUS, "out": str(out), "cases": FAST_CASES})],
                 [os.environ])
    check_updates(np.load(out), single_device_updates, FAST_CASES)


@pytest.mark.slow
def test_mirrored_vectorized_engine_equals_one_device(tmp_path):
    out = tmp_path / "updates.npz"
    run_together([distributed_run({"strategy": "mirrored", **TWO_CPUS, "out": str(out),
                                   "cases": VECTORIZED_CASES})], [os.environ])
    check_updates(np.load(out), step_updates(tf.distribute.get_strategy(), VECTORIZED_CASES), VECTORIZED_CASES)


def test_two_workers_equal_one_device(tmp_path, single_device_updates):
    out = tmp_path / "updates.npz"
    run_together([distributed_run({"strategy": "multi_worker", "out": str(out), "cases": FAST_CASES})] * 2,
                 worker_envs(2, tmp_path))
    check_updates(np.load(out), single_device_updates, FAST_CASES)


# --- whole training jobs ---------------------------------------------------------------------------

PRIVACY = {"noise_multiplier": 1.0, "delta": 1e-3, "noise_seed": 7}
TRAINING = {"batch_size": 8, "max_physical_batch": 3, "steps": 4, "checkpoint_every_steps": 2}


@pytest.fixture(scope="module")
def single_device_run(cohort_manifest, tmp_path_factory):
    directory = tmp_path_factory.mktemp("single")
    job = load_config(job_file(directory, cohort_manifest, PRIVACY, TRAINING))
    from dpmedtf.training.job import prepare_data

    run = directory / "run"
    train(job, prepare_data(job, run), run)
    return run


def weights(run: Path) -> list[np.ndarray]:
    return tf.keras.models.load_model(run / "model.keras", compile=False).get_weights()


def files_per_directory(run: Path) -> dict[str, int]:
    counts = {}
    for path in run.rglob("*"):
        if path.is_file():
            key = str(path.parent.relative_to(run))
            counts[key] = counts.get(key, 0) + 1
    return counts


def check_same_training(run: Path, reference: Path):
    for a, b in zip(weights(run), weights(reference)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert Ledger.load(run / "ledger.json") == Ledger.load(reference / "ledger.json")
    assert json.loads((run / "training.json").read_text())["replicas"] == 2


def test_mirrored_training_job_trains_the_single_device_model(cohort_manifest, tmp_path, single_device_run):
    """Same seeds: same Poisson batches (sharded), same noise (added once, by replica 0), same weights."""
    job = job_file(tmp_path, cohort_manifest, PRIVACY, {**TRAINING, "strategy": "mirrored", "devices": TWO_CPUS["devices"]})
    run_together([distributed_run({"job": str(job), "logical_cpus": 2, "out": str(tmp_path / "run")})], [os.environ])
    check_same_training(tmp_path / "run", single_device_run)


def test_two_worker_cli_training_writes_only_from_the_chief(cohort_manifest, tmp_path, single_device_run):
    job = job_file(tmp_path, cohort_manifest, PRIVACY, {**TRAINING, "strategy": "multi_worker"})
    out = tmp_path / "run"
    envs = worker_envs(2, tmp_path)
    chief_output, worker_output = run_together([[DPMEDTF, "train", str(job), "--out", str(out)]] * 2, envs)
    check_same_training(out, single_device_run)
    # Each worker says who wrote the model; none warns of running collectives eagerly.
    assert "written by the chief" not in chief_output and "written by the chief worker" in worker_output
    assert "eagerly" not in chief_output + worker_output
    # The worker's checkpoint and model copies went to its own scratch directory, removed at the end.
    assert list((tmp_path / "tmp-worker-1").iterdir()) == []
    # The same files as one process writes: no second TensorBoard event file, ledger or checkpoint.
    assert files_per_directory(out) == files_per_directory(single_device_run)
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["next_step"] == TRAINING["steps"]


def test_a_lost_worker_stops_the_chief_naming_it_and_a_relaunch_resumes_to_the_same_run(cohort_manifest, tmp_path,
                                                                                        single_device_run):
    timeout = 60
    job = job_file(tmp_path, cohort_manifest, PRIVACY, {**TRAINING, "strategy": "multi_worker",
                                                        "collective_timeout_seconds": timeout})
    out = tmp_path / "run"
    envs = worker_envs(2, tmp_path)
    # Worker 1 dies by SIGKILL right after the first checkpoint (step 2 of 4): a real lost worker.
    commands = [[DPMEDTF, "train", str(job), "--out", str(out)],
                [sys.executable, "-m", "tests.training.kill_at", "after-first-checkpoint", str(job), str(out)]]
    processes = [subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for command, env in zip(commands, envs)]
    try:
        worker_output = processes[1].communicate(timeout=TIMEOUT)[0]
        lost_at = time.monotonic()
        chief_output = processes[0].communicate(timeout=timeout + 120)[0]
        stopped_after = time.monotonic() - lost_at
    finally:
        for process in processes:
            process.kill()
    assert processes[1].returncode == -9, worker_output[-3000:]
    assert processes[0].returncode == 1 and stopped_after <= timeout + 30, chief_output[-3000:]
    address = json.loads(envs[1]["TF_CONFIG"])["cluster"]["worker"][1]
    assert f"dpmedtf: error: lost worker 1 ({address}) of the training cluster" in chief_output, chief_output[-3000:]
    assert "Re-launch every worker" in chief_output and "Traceback" not in chief_output
    assert json.loads((out / "checkpoints" / "latest.json").read_text())["next_step"] == 2
    # Both workers again, as the message says: the run finishes as if never interrupted.
    run_together([[DPMEDTF, "train", str(job), "--out", str(out)]] * 2, worker_envs(2, tmp_path))
    check_same_training(out, single_device_run)


def test_workers_that_disagree_all_stop_with_the_same_error(tmp_path):
    """E.g. a worker that cannot see the chief's checkpoints would resume at another step — by one step
    a million steps in, which a check by floating-point spread would miss."""
    outputs = run_together([distributed_run({"strategy": "multi_worker", "disagree": True})] * 2,
                           worker_envs(2, tmp_path), expect_exit=3)
    for output in outputs:
        assert "the workers disagree on the step to resume at (replicas: 1000000, 1000001)" in output
        assert "shared storage" in output and "on N" not in output


def test_workers_receive_the_chiefs_secret_not_their_own(tmp_path):
    """Every worker draws a fresh secret; after the broadcast all hold the chief's, so all draw the same
    Poisson batches, and no worker's secret came from anything but the chief."""
    outputs = run_together([distributed_run({"strategy": "multi_worker", "broadcast": True})] * 2,
                           worker_envs(2, tmp_path))
    reports = [json.loads(next(line for line in output.splitlines() if line.startswith("{"))) for output in outputs]
    chief = next(r for r in reports if r["chief"])
    other = next(r for r in reports if not r["chief"])
    assert other["own"] != chief["own"]  # they drew different secrets
    assert chief["received"] == other["received"] == chief["own"]


def test_strategy_settings_are_checked_before_training(monkeypatch):
    from dpmedtf.config import TrainingConfig
    from dpmedtf.errors import DpmedtfError
    from dpmedtf.training.distribution import strategy_for

    with pytest.raises(DpmedtfError, match=r"training.devices: \['/cpu:7'\] not found on this machine"):
        strategy_for(TrainingConfig(strategy="mirrored", devices=("/cpu:0", "/cpu:7")))
    with pytest.raises(DpmedtfError, match="needs training.strategy: mirrored"):
        strategy_for(TrainingConfig(devices=("/cpu:0",)))
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(DpmedtfError, match="multi_worker needs TF_CONFIG"):
        strategy_for(TrainingConfig(strategy="multi_worker"))
    monkeypatch.setenv("TF_CONFIG", "{cluster")
    with pytest.raises(DpmedtfError, match="TF_CONFIG is not valid JSON"):
        strategy_for(TrainingConfig(strategy="multi_worker"))


def test_a_pipeline_points_multi_worker_training_to_dpmedtf_train(cohort_manifest, tmp_path):
    from dpmedtf.errors import ConfigError
    from dpmedtf.runner import check_before_running

    job = load_config(job_file(tmp_path, cohort_manifest, PRIVACY, {**TRAINING, "strategy": "multi_worker"}))
    with pytest.raises(ConfigError, match="start `dpmedtf train` on every worker"):
        check_before_running(job)


def test_the_kubernetes_example_gives_each_worker_its_tf_config():
    documents = list(yaml.safe_load_all((ROOT / "examples" / "kubernetes" / "train-job.yaml").read_text()))
    service = next(d for d in documents if d["kind"] == "Service")
    job = next(d for d in documents if d["kind"] == "Job")
    pod = job["spec"]["template"]["spec"]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    assert pod["subdomain"] == service["metadata"]["name"] and job["spec"]["completionMode"] == "Indexed"
    script = pod["containers"][0]["args"][0]
    export = next(line for line in script.splitlines() if line.startswith("export TF_CONFIG="))
    port = service["spec"]["ports"][0]["port"]
    workers = job["spec"]["completions"]
    for index in range(workers):
        printed = subprocess.run(["sh", "-c", f'{export}; printf %s "$TF_CONFIG"'], capture_output=True, text=True,
                                 env={"JOB_COMPLETION_INDEX": str(index)}, check=True).stdout
        tf_config = json.loads(printed)
        assert tf_config["task"] == {"type": "worker", "index": index}
        # Each pod's DNS name under the headless service: <job>-<index>.<subdomain>.
        assert tf_config["cluster"]["worker"] == [f"{job['metadata']['name']}-{i}.{pod['subdomain']}:{port}"
                                                  for i in range(workers)]
    assert "dpmedtf train" in script
