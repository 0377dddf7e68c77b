"""The consumer install, `pip install dpmedtf` with no extras, run as a hospital runs it: no TensorFlow,
yet it verifies the release bundle and predicts what the full install predicts.

The consumer venv is `make test`'s `.venv-consumer` (DPMEDTF_CONSUMER_PYTHON); without that variable
this module builds one itself from the lock into a temporary directory (a few minutes).
"""

import csv
import json
import os
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from pydicom.data import get_testdata_file

import dpmedtf

CONSUMER_PYTHON_ENVIRONMENT = "DPMEDTF_CONSUMER_PYTHON"
REPOSITORY = Path(__file__).resolve().parents[2]
FULL_DPMEDTF = Path(sys.executable).with_name("dpmedtf")
TRAINING_DISTRIBUTIONS = ("tensorflow", "tensorflow-privacy", "tensorflow-io", "tf2onnx", "keras", "tensorboard",
                          "fairlearn", "scikit-learn", "matplotlib")
TRAIN_HINT = "install it with: pip install 'dpmedtf[train]'"


def _run(command: list, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    # Out of the repository and without PYTHONPATH, so nothing but the installed package is imported.
    environment = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run([str(part) for part in command], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**environment, "COLUMNS": "200"})


@pytest.fixture(scope="module")
def consumer_python(tmp_path_factory) -> Path:
    given = os.environ.get(CONSUMER_PYTHON_ENVIRONMENT)
    if given:
        if not Path(given).is_file():
            pytest.fail(f"{CONSUMER_PYTHON_ENVIRONMENT}={given} does not exist; build it with `make consumer-venv` "
                        "or unset the variable to let this test build its own")
        return Path(given)
    venv = tmp_path_factory.mktemp("consumer-install") / "venv"
    work = venv.parent
    for command in ([sys.executable, "-m", "venv", venv],
                    [venv / "bin" / "python", "-m", "pip", "install", "--quiet", "-c", REPOSITORY / "constraints.txt",
                     REPOSITORY]):
        result = _run(command, work, timeout=1800)
        assert result.returncode == 0, f"building the consumer venv failed:\n{result.stderr[-3000:]}"
    return venv / "bin" / "python"


@pytest.fixture
def consumer(consumer_python, tmp_path):
    """Runs the consumer install's `dpmedtf` console script."""
    return lambda *args: _run([consumer_python.with_name("dpmedtf"), *args], tmp_path)


def test_the_consumer_install_has_no_training_stack(consumer_python, tmp_path):
    imported = _run([consumer_python, "-c", "import tensorflow"], tmp_path)
    assert imported.returncode != 0 and "No module named 'tensorflow'" in imported.stderr
    shown = _run([consumer_python, "-m", "pip", "show", *TRAINING_DISTRIBUTIONS], tmp_path)
    assert "Name:" not in shown.stdout, f"the plain install pulled in training packages:\n{shown.stdout}"
    assert shown.returncode != 0 and all(name in shown.stderr for name in TRAINING_DISTRIBUTIONS), shown.stderr
    installed = _run([consumer_python, "-m", "pip", "show", "dpmedtf"], tmp_path)
    assert installed.returncode == 0 and f"Version: {dpmedtf.__version__}" in installed.stdout


def test_the_cli_knows_every_package_of_the_train_extra():
    """`dpmedtf <training command>` names the extra for any missing module of it: keep the two in step."""
    extra = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]["optional-dependencies"]["train"]
    names = [canonicalize_name(Requirement(requirement).name) for requirement in extra]
    modules_of = {}
    for module, distributions in metadata.packages_distributions().items():
        for distribution in distributions:
            modules_of.setdefault(canonicalize_name(distribution), set()).add(module)
    unknown = {name: sorted(modules_of.get(name, ())) for name in names
               if not modules_of.get(name, set()) & dpmedtf.TRAINING_MODULES}
    assert not unknown, f"add these import names to dpmedtf.TRAINING_MODULES: {unknown}"


def test_light_commands_run_without_tensorflow(consumer, tmp_path):
    assert consumer("--help").returncode == 0
    epsilon = consumer("privacy", "epsilon", "--dataset-size", "1000", "--batch-size", "100", "--epochs", "1",
                       "--noise-multiplier", "1.0", "--delta", "1e-5")
    assert epsilon.returncode == 0 and '"epsilon"' in epsilon.stdout, epsilon.stderr
    keys = consumer("keygen", "--private-key", tmp_path / "site.pem")
    assert keys.returncode == 0 and (tmp_path / "site.pub").is_file(), keys.stderr


def test_a_training_command_names_the_extra_in_one_line(consumer, released_run):
    job_path, _ = released_run
    result = consumer("train", job_path, "--out", "run")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == ("dpmedtf: error: 'dpmedtf train' needs the training stack (tensorflow is not "
                                     f"installed); {TRAIN_HINT}")


def test_make_private_names_the_extra(consumer_python, tmp_path):
    script = ("import dpmedtf\ntry:\n    dpmedtf.make_private\nexcept ImportError as exc:\n"
              "    print(type(exc).__name__, exc)\nelse:\n    print('imported')")
    result = _run([consumer_python, "-c", script], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("TrainingStackMissing dpmedtf.make_private needs the training stack (tensorflow "
                                     f"is not installed); {TRAIN_HINT}")


def test_the_consumer_verifies_the_bundle_with_the_publisher_key(consumer, bundle, keys):
    result = consumer("verify", bundle, "--public-key", keys / "publisher.pub")
    assert result.returncode == 0, result.stdout + result.stderr
    assert any(line.startswith(f"{bundle}: verified") for line in result.stdout.splitlines()), result.stdout


def _training_png(released_run) -> Path:
    """A synthetic radiograph from the cohort the bundle was trained on."""
    job_path, _ = released_run
    manifest = Path(yaml.safe_load(Path(job_path).read_text())["data"]["manifest"])
    with manifest.open(newline="") as rows:
        return next(manifest.parent / row["image_path"] for row in csv.DictReader(rows)
                    if row["image_path"].endswith(".png"))


def _predictions(dpmedtf_script: Path, bundle: Path, public_key: Path, inputs: list, work: Path) -> dict:
    out = work / "predictions.csv"
    result = _run([dpmedtf_script, "predict", bundle, *inputs, "--public-key", public_key, "--out", out], work)
    assert result.returncode == 0, f"{dpmedtf_script} predict failed:\n{result.stderr[-3000:]}"
    with out.open(newline="") as rows:
        return {row["input"]: row for row in csv.DictReader(rows)}


def test_consumer_predictions_match_the_full_install(consumer_python, bundle, keys, released_run, tmp_path):
    # pydicom-data's real radiograph is passed by path from this (full) install: the consumer needs no test extras.
    inputs = [Path(get_testdata_file("RG1_UNCR.dcm")), _training_png(released_run)]
    labels = json.loads((bundle / "metadata.json").read_text())["labels"]
    (tmp_path / "consumer").mkdir()
    (tmp_path / "full").mkdir()
    light = _predictions(consumer_python.with_name("dpmedtf"), bundle, keys / "publisher.pub", inputs,
                         tmp_path / "consumer")
    full = _predictions(FULL_DPMEDTF, bundle, keys / "publisher.pub", inputs, tmp_path / "full")
    assert set(light) == set(full) == {str(path) for path in inputs}
    for path in light:
        for label in labels:
            assert abs(float(light[path][f"{label}_prob"]) - float(full[path][f"{label}_prob"])) <= 1e-4, (path, label)
            assert light[path][f"{label}_label"] == full[path][f"{label}_label"], (path, label)
