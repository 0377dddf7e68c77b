"""Round trip train → release → verify → predict on the real RG1_UNCR radiograph, and tampering."""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from pydicom.data import get_testdata_file

import dpmedtf.release
from dpmedtf.cli import main
from dpmedtf.config import load_config
from dpmedtf.data import radiograph
from dpmedtf.errors import DpmedtfError
from dpmedtf.models import load_model
from dpmedtf.release.job import release_job
from dpmedtf.release.layout import FIGURE_SUFFIX, PREPROCESS_FILE, REQUIRED_FILES
from dpmedtf.release.verify import BundleVerificationError, verify_bundle

REAL_RADIOGRAPH = get_testdata_file("RG1_UNCR.dcm")
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "node"


def run_cli(*args) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    return exit_info.value.code


def test_bundle_has_the_contract_files_and_consistent_metadata(bundle, released_run):
    figures = sorted(p.name for p in (released_run[1] / "evaluation").glob(f"*{FIGURE_SUFFIX}"))
    # no audit in this run; a radiograph bundle carries its preprocessing graph
    assert sorted(p.name for p in bundle.iterdir()) == sorted([*REQUIRED_FILES, PREPROCESS_FILE, *figures])
    certificate = json.loads((bundle / "privacy_certificate.json").read_text())
    for key in ("schema_version", "epsilon", "delta", "accountant", "unit_of_privacy", "sampling", "sampling_rate",
                "noise_multiplier", "clip_norm", "steps", "dataset_size", "dp_event", "statement"):
        assert key in certificate
    assert certificate["epsilon"] <= 8.0 and certificate["synthetic_data"] is True
    metadata = json.loads((bundle / "metadata.json").read_text())
    assert metadata["export"]["parity"]["passed"] and metadata["export"]["parity"]["max_abs_difference"] <= 1e-4
    assert metadata["preprocessing"]["image_size"] == 32 and len(metadata["labels"]) == 8
    assert "SYNTHETIC" in (bundle / "model_card.md").read_text()
    assert "SYNTHETIC" in (bundle / "fairness_report.md").read_text()


def test_verify_passes_with_the_publishers_key(bundle, keys, capsys):
    assert run_cli("verify", bundle, "--public-key", keys / "publisher.pub") == 0
    assert "verified" in capsys.readouterr().out


def test_predict_on_the_real_radiograph_matches_keras(bundle, released_run, keys, tmp_path):
    out = tmp_path / "preds.csv"
    assert run_cli("predict", bundle, REAL_RADIOGRAPH, "--out", out, "--public-key", keys / "publisher.pub") == 0
    predictions = pd.read_csv(out)
    metadata = json.loads((bundle / "metadata.json").read_text())
    labels = metadata["labels"]
    assert len(predictions) == 1 and predictions["input"][0] == REAL_RADIOGRAPH

    keras_model = load_model(released_run[1] / "model.keras")
    image = radiograph.to_model_input(radiograph.preprocess_file(REAL_RADIOGRAPH, 32))[None]
    expected = tf.sigmoid(keras_model(image)).numpy()[0]
    actual = predictions[[f"{n}_prob" for n in labels]].to_numpy()[0]
    assert np.max(np.abs(actual - expected)) <= 1e-4
    thresholds = np.array([metadata["thresholds"][n] for n in labels])
    np.testing.assert_array_equal(predictions[[f"{n}_label" for n in labels]].to_numpy()[0], actual >= thresholds)

    assert run_cli("predict", bundle, REAL_RADIOGRAPH, "--out", out,  # never replaces a result silently
                   "--public-key", keys / "publisher.pub") != 0


def test_python_consumers_load_a_verified_session(bundle, keys):
    loaded = dpmedtf.release.load(bundle, keys / "publisher.pub")
    x = loaded.preprocess(REAL_RADIOGRAPH)[None]
    probabilities = loaded.probabilities(x)
    assert probabilities.shape == (1, 8) and loaded.labels == loaded.metadata["labels"]
    assert loaded.certificate["epsilon"] == loaded.metadata["privacy"]["epsilon"]
    assert loaded.signer.verified and loaded.signer.source == "--public-key"


@pytest.mark.parametrize("name", REQUIRED_FILES)
def test_changing_one_byte_of_any_file_fails_verification_naming_it(bundle_copy, keys, name):
    path = bundle_copy / name
    data = bytearray(path.read_bytes())
    position = len(data) // 2
    data[position] ^= 0x01
    path.write_bytes(bytes(data))
    report = verify_bundle(bundle_copy, keys / "publisher.pub")
    assert not report.ok
    assert any(name in failure for failure in report.failures), report.failures


@pytest.mark.parametrize("name", REQUIRED_FILES)
def test_deleting_any_file_fails_verification_naming_it(bundle_copy, keys, name):
    (bundle_copy / name).unlink()
    report = verify_bundle(bundle_copy, keys / "publisher.pub")
    assert any(name in failure for failure in report.failures), report.failures


def test_an_added_file_or_the_wrong_key_fails(bundle_copy, keys):
    assert not verify_bundle(bundle_copy, keys / "other.pub").ok
    assert "Key mismatch" in " ".join(verify_bundle(bundle_copy, keys / "other.pub").failures)
    (bundle_copy / "extra.txt").write_text("added later")
    assert any("extra.txt" in f for f in verify_bundle(bundle_copy, keys / "publisher.pub").failures)


def test_predict_refuses_a_tampered_bundle(bundle_copy, keys, tmp_path, capsys):
    metadata = json.loads((bundle_copy / "metadata.json").read_text())
    metadata["thresholds"] = {name: 0.0 for name in metadata["thresholds"]}  # "everything is positive"
    (bundle_copy / "metadata.json").write_text(json.dumps(metadata))
    out = tmp_path / "preds.csv"
    assert run_cli("predict", bundle_copy, REAL_RADIOGRAPH, "--out", out, "--public-key", keys / "publisher.pub") == 1
    assert "metadata.json" in capsys.readouterr().err and not out.exists()
    with pytest.raises(BundleVerificationError, match="metadata.json"):
        dpmedtf.release.load(bundle_copy, keys / "publisher.pub")


def test_a_release_is_never_overwritten(bundle, released_run):
    before = {p.name: p.read_bytes() for p in bundle.iterdir()}
    with pytest.raises(DpmedtfError, match="never overwritten"):
        release_job(load_config(released_run[0]), released_run[1], bundle)
    assert {p.name: p.read_bytes() for p in bundle.iterdir()} == before


@pytest.mark.skipif(shutil.which("node") is None or shutil.which("npm") is None, reason="Node.js is not installed")
def test_node_consumer_reproduces_dpmedtf_predict(bundle, keys, tmp_path):
    out, inputs = tmp_path / "preds.csv", tmp_path / "inputs"
    assert run_cli("predict", bundle, REAL_RADIOGRAPH, "--out", out, "--save-inputs", inputs,
                   "--public-key", keys / "publisher.pub") == 0
    example = tmp_path / "node"
    shutil.copytree(EXAMPLES, example, ignore=shutil.ignore_patterns("node_modules"))
    env = {"ONNXRUNTIME_NODE_INSTALL": "skip", "PATH": __import__("os").environ["PATH"], "HOME": str(tmp_path)}
    subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=example, env=env, check=True, capture_output=True)
    result = subprocess.run(["node", "predict.mjs", str(bundle), str(inputs)], cwd=example, check=True,
                            capture_output=True, text=True)
    node = json.loads(result.stdout)["rows"][0]
    python = pd.read_csv(out).iloc[0]
    for name in node["probabilities"]:
        assert abs(node["probabilities"][name] - python[f"{name}_prob"]) <= 1e-5
        assert node["labels"][name] == python[f"{name}_label"]
