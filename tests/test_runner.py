"""`dpmedtf run`: checks before work, skips what is finished, and survives being killed mid-training."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dpmedtf.cli import main
from dpmedtf.config import load_config
from dpmedtf.errors import DpmedtfError
from dpmedtf.runner import Pipeline

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


def write_pipeline(directory: Path, manifest: Path, **overrides) -> Path:
    job = {"name": "resumable", "data": {"manifest": str(manifest), "image_size": 32},
           "privacy": {"target_epsilon": 4.0, "delta": 1e-3, "accountant": "rdp"},
           "training": {"steps": 30, "batch_size": 8, "max_physical_batch": 8, "checkpoint_every_steps": 2, "seed": 1},
           "pipeline": {"stages": ["prepare", "train"]}}
    for section, values in overrides.items():
        job[section] = {**job.get(section, {}), **values} if isinstance(values, dict) else values
    path = directory / "pipeline.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def run_cli(*args) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    return exit_info.value.code


@pytest.mark.parametrize("name", sorted(p.name for p in PIPELINES.glob("*.yaml")))
def test_shipped_pipelines_are_valid_configs(name):
    job = load_config(PIPELINES / name)
    assert job.pipeline.stages[0] == "prepare"


def test_unknown_key_fails_before_any_stage(tmp_path, capsys):
    pipeline = tmp_path / "bad.yaml"
    pipeline.write_text(yaml.safe_dump({"name": "x", "training": {"epochz": 3}}))
    assert run_cli("run", pipeline, "--out", tmp_path / "run") != 0
    assert "training.epochz" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_missing_manifest_fails_before_any_stage(tmp_path, capsys):
    pipeline = write_pipeline(tmp_path, tmp_path / "nowhere" / "manifest.csv")
    assert run_cli("run", pipeline, "--out", tmp_path / "run") != 0
    err = capsys.readouterr().err
    assert "data.manifest" in err and "nowhere/manifest.csv" in err
    assert not (tmp_path / "run").exists()


def test_missing_signing_key_fails_before_any_stage(tmp_path, cohort_manifest, capsys):
    pipeline = write_pipeline(tmp_path, cohort_manifest, release={"private_key": str(tmp_path / "none.pem")},
                              pipeline={"stages": ["prepare", "train", "evaluate", "release"]})
    assert run_cli("run", pipeline, "--out", tmp_path / "run") != 0
    assert "release.private_key" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            raise AssertionError(f"dpmedtf run exited ({process.returncode}) before {path} appeared")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)


def test_killed_run_resumes_to_the_same_ledger_as_an_uninterrupted_run(tmp_path, cohort_manifest):
    pipeline = write_pipeline(tmp_path, cohort_manifest)
    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen([sys.executable, "-m", "dpmedtf.cli", "run", str(pipeline), "--out", str(interrupted)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    _wait_for(interrupted / "checkpoints" / "latest.json", process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (interrupted / "ledger.json").exists(), "the run should have been killed mid-training"
    killed_at = json.loads((interrupted / "checkpoints" / "latest.json").read_text())["next_step"]
    assert 0 < killed_at < 30

    outcomes = Pipeline(load_config(pipeline), interrupted).run()  # resumes from the checkpoint
    assert [o.status for o in outcomes] == ["skipped", "ran"]
    uninterrupted = tmp_path / "uninterrupted"
    Pipeline(load_config(pipeline), uninterrupted).run()

    resumed, reference = (json.loads((d / "ledger.json").read_text()) for d in (interrupted, uninterrupted))
    assert resumed["segments"] == reference["segments"] and resumed["steps"] == reference["steps"] == 30
    assert resumed["epsilon"] == reference["epsilon"] <= 4.0

    # finished stages are skipped; a changed config is refused by name; --force redoes and records it
    assert [o.status for o in Pipeline(load_config(pipeline), interrupted).run()] == ["skipped", "skipped"]
    changed = write_pipeline(tmp_path, cohort_manifest, training={"steps": 31})
    with pytest.raises(DpmedtfError, match="training.steps"):
        Pipeline(load_config(changed), interrupted).run()
    with pytest.raises(DpmedtfError, match="unknown stage"):
        Pipeline(load_config(pipeline), interrupted, force=["trian"])
