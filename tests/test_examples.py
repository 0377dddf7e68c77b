"""The examples users copy from run as written (smaller, so the suite stays fast)."""

import importlib.util
import json
from pathlib import Path

import pytest

from dpmedtf.cli import main as cli
from dpmedtf.privacy.ledger import Ledger

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_keras_api_example_trains_certifies_and_releases_a_verified_bundle(tmp_path, capsys):
    bundle = load_example("keras_api").main(tmp_path, patients=60, epochs=2.0, bootstrap=20)
    printed = capsys.readouterr().out
    assert f"bundle {bundle}: verified" in printed
    certificate = json.loads((bundle / "privacy_certificate.json").read_text())
    ledger = Ledger.load(tmp_path / "model" / "ledger.json")
    assert certificate["unit_of_privacy"] == "example" and certificate["steps"] == ledger.steps > 0
    assert certificate["epsilon"] == pytest.approx(ledger.epsilon(), rel=1e-9) and certificate["epsilon"] <= 8.0
    assert certificate["patient_level"]["max_images_per_patient"] >= 1  # stated: a per-person bound is certified
    metadata = json.loads((bundle / "metadata.json").read_text())
    assert metadata["synthetic_data"] is True and "my_cnn" in metadata["model"]["architecture"]
    with pytest.raises(SystemExit) as verified:  # the consumer's own check, through the CLI
        cli(["verify", str(bundle), "--public-key", str(tmp_path / "keys" / "signing.pub")])
    assert verified.value.code == 0
