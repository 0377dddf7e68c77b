"""The installed `dpmedtf` console script, run as a user runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import dpmedtf

DPMEDTF = str(Path(sys.executable).with_name("dpmedtf"))


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([DPMEDTF, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})


def test_version():
    result = run("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"dpmedtf {dpmedtf.__version__}"


def test_privacy_epsilon_prints_one_json_object_with_the_contract_keys():
    result = run("privacy", "epsilon", "--dataset-size", "1625", "--batch-size", "512", "--epochs", "10",
                 "--noise-multiplier", "2.0", "--delta", "1e-4", "--accountant", "pld")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    for key in ("epsilon", "delta", "noise_multiplier", "sampling_rate", "steps", "batch_size",
                "dataset_size", "accountant", "dp_event"):
        assert key in out
    assert out["steps"] == 32 and out["sampling_rate"] == 512 / 1625 and out["accountant"] == "pld"
    assert 0 < out["epsilon"] < 100


@pytest.mark.parametrize("args, reason", [
    (["--batch-size", "2000", "--epochs", "1", "--noise-multiplier", "1", "--delta", "1e-5"], "exceeds dataset size"),
    (["--batch-size", "10", "--epochs", "1", "--noise-multiplier", "1", "--delta", "1e-3"], "1/N"),
    (["--batch-size", "10", "--epochs", "1", "--noise-multiplier", "0", "--delta", "1e-5"], "noise multiplier must be"),
    (["--batch-size", "10", "--epochs", "1", "--noise-multiplier", "-2", "--delta", "1e-5"], "noise multiplier must be"),
    (["--batch-size", "ten", "--epochs", "1", "--noise-multiplier", "1", "--delta", "1e-5"], "Invalid value for '--batch-size'"),
    (["--batch-size", "10", "--noise-multiplier", "1", "--delta", "1e-5"], "exactly one of --epochs or --steps"),
    (["--batch-size", "10", "--epochs", "1", "--noise-multiplier", "1", "--delta", "1e-5", "--accountant", "gdp"], "'gdp' is not one of"),
])
def test_bad_input_exits_non_zero_with_one_line(args, reason):
    result = run("privacy", "epsilon", "--dataset-size", "1000", *args)
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dpmedtf: error: ") and reason in lines[0], result.stderr


def test_unreachable_target_exits_non_zero():
    result = run("privacy", "noise", "--dataset-size", "1000", "--batch-size", "10", "--steps", "500",
                 "--target-epsilon", "0.01", "--delta", "1e-8", "--accountant", "rdp")
    assert result.returncode == 1 and "no noise multiplier reaches" in result.stderr


def test_large_delta_only_with_the_override():
    base = ["privacy", "epsilon", "--dataset-size", "1000", "--batch-size", "10", "--steps", "10",
            "--noise-multiplier", "1", "--delta", "0.01"]
    assert run(*base).returncode == 1
    result = run(*base, "--allow-large-delta")
    assert result.returncode == 0 and json.loads(result.stdout)["delta"] == 0.01


def test_config_show_validates_and_resolves(tmp_path):
    (tmp_path / "job.yaml").write_text("privacy: {target_epsilon: 8}\n")
    result = run("config", "show", str(tmp_path / "job.yaml"))
    assert result.returncode == 0 and "learning_rate: 0.0005" in result.stdout
    (tmp_path / "bad.yaml").write_text("privacy: {target_epsilon: 8, sigma: 1}\n")
    result = run("config", "show", str(tmp_path / "bad.yaml"))
    assert result.returncode == 1
    assert result.stderr.strip() == (f"dpmedtf: error: {tmp_path / 'bad.yaml'}: privacy.sigma: unknown key; allowed: "
                                     "enabled, target_epsilon, noise_multiplier, delta, clip_norm, accountant, unit, "
                                     "max_images_per_patient, epsilon_budget, noise_seed, secure_rng, epsilon_sweep, "
                                     "sweep_non_private, allow_large_delta")
