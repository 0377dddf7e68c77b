"""The data commands as a user runs them: cohort table, prepare with and without --skip-bad, synthetic."""

import subprocess
import sys
from pathlib import Path

import pandas as pd

from dpmedtf.data import labels as L

DPMEDTF = str(Path(sys.executable).with_name("dpmedtf"))


def run(*args):
    return subprocess.run([DPMEDTF, *map(str, args)], capture_output=True, text=True, timeout=600)


def test_synthetic_then_cohort_table(tmp_path):
    made = run("synthetic", "--out", tmp_path / "cohort", "--patients", 15, "--volumes", 2)
    assert made.returncode == 0, made.stderr
    assert "SYNTHETIC DATA" in made.stdout
    table = run("cohort", tmp_path / "cohort" / "radiographs.csv", "--out", tmp_path / "table.csv")
    assert table.returncode == 0, table.stderr
    assert "SYNTHETIC DATA, not patients" in table.stdout and "cardiomegaly positive" in table.stdout
    written = pd.read_csv(tmp_path / "table.csv", index_col=0)
    assert int(written.loc["patients", "total"]) == 15
    assert "label positive" in run("cohort", tmp_path / "cohort" / "volumes.csv").stdout


def test_prepare_stops_on_a_bad_file_and_skip_bad_quarantines_it(tmp_path, real_cr):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    rows = [{"image_path": str(real_cr), "patient_id": "A", "sex": "M", "age": 60, **{f: "negative" for f in L.FINDINGS[1:]},
             "cardiomegaly": "normal", "split": "test"},
            {"image_path": "broken.png", "patient_id": "B", "sex": "F", "age": 70, **{f: 0 for f in L.FINDINGS},
             "split": "train"}]
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    stopped = run("prepare", tmp_path / "m.csv", "--cache", tmp_path / "cache", "--image-size", 64)
    assert stopped.returncode == 1
    assert f"{tmp_path / 'm.csv'} line 3:" in stopped.stderr and "broken.png" in stopped.stderr
    skipped = run("prepare", tmp_path / "m.csv", "--cache", tmp_path / "cache", "--image-size", 64, "--skip-bad")
    assert skipped.returncode == 0, skipped.stderr
    assert "quarantined 1 file(s)" in skipped.stderr
    line = next(l for l in skipped.stdout.splitlines() if l.startswith("quarantined (skipped)"))
    assert line.split()[-1] == "1"
