"""`dpmedtf verify` and `predict` as a consumer's script runs them: `--format json` gives one JSON
document on stdout and nothing else, the exit codes say what was verified, the consumer modules never
import TensorFlow, and OpenSSF model-signing's own CLI verifies the same bundle."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
from pydicom.data import get_testdata_file

from dpmedtf.release.signing import SIGNATURE_FILE, fingerprint

BIN = Path(sys.executable).parent
CT_SLICE = get_testdata_file("CT_small.dcm")
REAL_RADIOGRAPH = get_testdata_file("RG1_UNCR.dcm")


def run(*args, tmp_path: Path, executable: str = "dpmedtf", **environment) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DPMEDTF_PUBLIC_KEY"}
    env.update({"DPMEDTF_TRUST_DIR": str(tmp_path / "trust"), "COLUMNS": "200", **environment})
    return subprocess.run([str(BIN / executable), *map(str, args)], capture_output=True, text=True, timeout=300,
                          env=env)


def test_consumer_modules_do_not_import_tensorflow():
    check = ("import sys, dpmedtf.release.verify, dpmedtf.release.predict, dpmedtf.release.trust, "
             "dpmedtf.release.modality_guard, dpmedtf.release.archive_predict, dpmedtf.release.structured_report, "
             "dpmedtf.data.dicomweb, dpmedtf.data.archive_export, dpmedtf.cli; "
             "assert 'tensorflow' not in sys.modules, 'TensorFlow imported'")
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_verify_json_is_one_document_naming_the_signer(bundle, keys, tmp_path):
    result = run("verify", bundle, "--format", "json", tmp_path=tmp_path,
                 DPMEDTF_PUBLIC_KEY=str(keys / "publisher.pub"))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # the whole of stdout, nothing before or after
    assert set(report) == {"bundle", "ok", "integrity_only", "signer", "passed", "failures", "warnings",
                           "synthetic_data"}
    assert report["ok"] is True and report["integrity_only"] is False and report["failures"] == []
    assert report["signer"] == {"fingerprint": fingerprint(keys / "publisher.pub"), "name": "publisher.pub",
                                "source": "env"}
    assert report["synthetic_data"] is True and report["bundle"] == str(bundle)

    refused = run("verify", bundle, "--format", "json", tmp_path=tmp_path)  # no key anywhere
    assert refused.returncode == 1
    report = json.loads(refused.stdout)
    assert report["ok"] is False and report["signer"] is None and report["integrity_only"] is False
    assert any("no publisher key given" in failure for failure in report["failures"])


def test_predict_json_with_a_refused_then_overridden_ct_slice(bundle, keys, tmp_path):
    key = keys / "publisher.pub"
    out = tmp_path / "preds.csv"
    refused = run("predict", bundle, REAL_RADIOGRAPH, CT_SLICE, "--public-key", key, "--out", out, tmp_path=tmp_path)
    assert refused.returncode == 1 and not out.exists()
    (line,) = [line for line in refused.stderr.splitlines() if line.startswith("dpmedtf: error:")]
    for part in (CT_SLICE, "Modality CT", "CR/DX", "--allow-modality-mismatch"):
        assert part in line, line
    assert "Traceback" not in refused.stderr

    result = run("predict", bundle, REAL_RADIOGRAPH, CT_SLICE, "--public-key", key, "--allow-modality-mismatch",
                 "--format", "json", "--out", out, tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    metadata = json.loads((bundle / "metadata.json").read_text())
    assert document["bundle"] == str(bundle) and document["model_version"] == metadata["model_version"]
    assert document["signer"] == {"fingerprint": fingerprint(key), "name": "publisher.pub", "source": "--public-key"}
    assert document["labels"] == metadata["labels"] and document["thresholds"] == metadata["thresholds"]
    radiograph, ct = document["inputs"]
    assert (radiograph["input"], radiograph["modality_check"]) == (REAL_RADIOGRAPH, "ok")
    assert (ct["input"], ct["modality_check"]) == (CT_SLICE, "overridden: Modality CT, expected CR/DX")
    for entry in document["inputs"]:
        for name, p in entry["probabilities"].items():
            assert entry["labels"][name] == int(p >= metadata["thresholds"][name])
    assert "despite a header that does not match" in result.stderr

    csv = pd.read_csv(out)  # the CSV, written too since --out was given, says the same
    assert list(csv["modality_check"]) == [radiograph["modality_check"], ct["modality_check"]]
    assert list(csv["signer_fingerprint"]) == [fingerprint(key)] * 2
    for name in metadata["labels"]:
        assert abs(csv[f"{name}_prob"][1] - ct["probabilities"][name]) <= 1e-6


def test_predict_out_is_optional_only_with_json_and_integrity_only_exits_3(bundle, keys, tmp_path):
    missing_out = run("predict", bundle, REAL_RADIOGRAPH, "--public-key", keys / "publisher.pub", tmp_path=tmp_path)
    assert missing_out.returncode == 2 and "--out is required" in missing_out.stderr

    result = run("predict", bundle, REAL_RADIOGRAPH, "--integrity-only", "--format", "json", tmp_path=tmp_path)
    assert result.returncode == 3, result.stderr
    document = json.loads(result.stdout)
    assert document["signer"] == {"fingerprint": fingerprint(bundle / "signing_key.pub"), "name": None,
                                  "source": "bundle (integrity only)"}
    assert len(document["inputs"]) == 1
    assert "integrity only: signer NOT verified" in result.stderr
    assert not list(tmp_path.glob("*.csv"))


def test_openssf_model_signing_cli_verifies_the_same_bundle(bundle, keys, tmp_path):
    """The command the README gives, for consumers who do not install dpmedtf."""
    command = ("verify", "key", bundle, "--signature", bundle / SIGNATURE_FILE)
    good = run(*command, "--public_key", keys / "publisher.pub", tmp_path=tmp_path, executable="model_signing")
    assert good.returncode == 0 and "Verification succeeded" in good.stdout, good.stdout + good.stderr
    wrong = run(*command, "--public_key", keys / "other.pub", tmp_path=tmp_path, executable="model_signing")
    assert wrong.returncode != 0 and "Key mismatch" in wrong.stdout + wrong.stderr
