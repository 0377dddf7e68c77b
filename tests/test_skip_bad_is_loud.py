"""With data.skip_bad, rows left out are never silent: `dpmedtf run` prints the count and the quarantine file,
the summary page shows them, the ledger records them and the certificate's data section states them."""

import pandas as pd
import pytest
import yaml

from dpmedtf.cli import main
from dpmedtf.config import load_config
from dpmedtf.privacy.ledger import Ledger
from dpmedtf.privacy.randomness import RunSecret
from dpmedtf.release.certificate import build_certificate
from dpmedtf.resources import schema_problems
from dpmedtf.training.data_uses import initial_ledger
from dpmedtf.training.job import prepare_data
from dpmedtf.training.plan import plan_training


def test_quarantined_rows_are_printed_shown_and_recorded_in_the_ledger(tmp_path, cohort_manifest, capsys):
    rows = pd.read_csv(cohort_manifest, dtype=str, keep_default_na=False)
    rows["image_path"] = [str((cohort_manifest.parent / p).resolve()) for p in rows["image_path"]]
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    broken = {**rows.iloc[0].to_dict(), "image_path": str(tmp_path / "broken.png"), "patient_id": "BROKEN"}
    manifest = tmp_path / "manifest.csv"
    pd.concat([rows, pd.DataFrame([broken])]).to_csv(manifest, index=False)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"name": "loud", "data": {"manifest": str(manifest), "image_size": 32, "skip_bad": True},
                                   "privacy": {"noise_multiplier": 1.0, "delta": 1e-3, "accountant": "rdp"},
                                   "training": {"steps": 2, "batch_size": 4, "max_physical_batch": 4},
                                   "pipeline": {"stages": ["prepare"]}}))
    out = tmp_path / "run"
    total = len(rows) + 1

    for attempt in ("prepares", "skips the finished prepare"):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main(["run", str(job), "--out", str(out)])
        assert exit_info.value.code == 0, attempt
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"WARNING: quarantined 1 of {total} manifest row(s) as unreadable"), err
        assert "quarantine.csv" in last
        if attempt == "prepares":  # said at the end of the prepare stage as well
            assert err.count(f"quarantined 1 of {total}") == 2, err
    quarantine_file = last.split("Reasons, by manifest line: ")[1]
    assert pd.read_csv(quarantine_file)["path"].tolist() == [str(tmp_path / "broken.png")]
    page = (out / "index.html").read_text()
    assert f"quarantined 1 of {total} manifest row(s)" in page and quarantine_file in page

    # The ledger a DP run of this job starts with records them, for the certificate's data section.
    config = load_config(job)
    prepared = prepare_data(config, out)
    ledger = initial_ledger(config, plan_training(config, prepared), prepared, RunSecret.fresh(), None)
    notes = ledger.notes
    # … and lists publishing that count as a use of the private data outside DP.
    assert [u["private_data_used"] for u in ledger.non_dp_uses if u["what"] == "quarantined rows"] == [True]
    assert notes["quarantined_rows"] == 1
    assert notes["quarantined_training_rows"] == int((prepared.quarantine["split"] == "train").sum())


@pytest.mark.parametrize("notes, data", [
    ({"quarantined_rows": 7, "quarantined_training_rows": 5},
     {"quarantined_rows": 7, "quarantined_training_rows": 5,
      "statement": "7 manifest row(s) were quarantined as unreadable (data.skip_bad) and left out, 5 of them from the "
                   "training split; N = 1,000 counts only the records trained on."}),
    ({"quarantined_rows": 0, "quarantined_training_rows": 0},
     {"quarantined_rows": 0, "quarantined_training_rows": 0,
      "statement": "Every manifest row was read; none was quarantined."}),
    ({}, {"quarantined_rows": None, "quarantined_training_rows": None,
          "statement": "Whether data.skip_bad left manifest rows out was not recorded in the training ledger."}),
])
def test_the_certificate_data_section_states_the_quarantine(notes, data):
    ledger = Ledger(dataset_size=1000, batch_size=10, delta=1e-5, accountant="rdp", unit_of_privacy="image",
                    notes={"randomness": "secret", **notes}).record(10, 0.01, 1.0, 1.0)
    certificate = build_certificate(ledger)
    assert certificate["data"] == data
    assert schema_problems(certificate, "privacy_certificate.schema.json") == []
