"""`dpmedtf data export-manifest` against a real Orthanc server: the exported cohort passes `prepare` and
trains a DP step; demographics come from the headers, labels from a CSV, and what is not exported is
listed, not dropped unseen."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pydicom
import pytest
import yaml
from pydicom.data import get_testdata_file

from dpmedtf.data import labels as L
from dpmedtf.data.archive_export import age_in_years
from dpmedtf.data.synthetic import SyntheticCohortSpec, write_synthetic_cohort
from tests.orthanc import OrthancServer

DPMEDTF = str(Path(sys.executable).with_name("dpmedtf"))
CT_SLICE = get_testdata_file("CT_small.dcm")
REAL_RADIOGRAPH = get_testdata_file("RG1_UNCR.dcm")


def dpmedtf(*args, env=None):
    return subprocess.run([DPMEDTF, *map(str, args)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("archive-export-cohort")
    manifest = write_synthetic_cohort(root, SyntheticCohortSpec(patients=8, image_size=48, seed=4,
                                                                dicom_fraction=1.0))["radiograph"]
    return manifest


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, cohort):
    server = OrthancServer(tmp_path_factory.mktemp("orthanc-export")).start()
    server.upload([CT_SLICE, REAL_RADIOGRAPH, *sorted(cohort.parent.rglob("*.dcm"))])
    yield server
    server.stop()


def test_exported_cohort_passes_prepare_and_trains_a_dp_step(cohort, orthanc, tmp_path):
    # The hospital's labels, kept apart from the images and keyed by study UID, as a registry would.
    source = pd.read_csv(cohort)
    study_of = {row.image_path: str(pydicom.dcmread(cohort.parent / row.image_path).StudyInstanceUID)
                for row in source.itertuples()}
    labels = source.assign(study_uid=source["image_path"].map(study_of))[["study_uid", *L.FINDINGS]]
    labels.to_csv(tmp_path / "labels.csv", index=False)
    ct_study = str(pydicom.dcmread(CT_SLICE).StudyInstanceUID)
    (tmp_path / "studies.csv").write_text("study_uid\n" + "\n".join([*study_of.values(), ct_study]) + "\n")

    out = tmp_path / "export"
    result = dpmedtf("data", "export-manifest", "--dicomweb", orthanc.url, "--studies", tmp_path / "studies.csv",
                     "--labels", tmp_path / "labels.csv", "--out", out, env=orthanc.environment())
    assert result.returncode == 0, result.stderr
    assert f"{len(source)} image(s) from {len(source) + 1} stud(ies)" in result.stdout
    assert "1 instance(s) not exported" in result.stderr  # the CT slice, listed
    with (out / "skipped.csv").open() as handle:
        (skipped,) = list(csv.DictReader(handle))
    assert skipped["study_uid"] == ct_study and skipped["modality"] == "CT"

    exported = pd.read_csv(out / "manifest.csv")
    assert len(exported) == len(source)
    by_study = exported.set_index("study_uid")
    for row in source.itertuples():
        mine = by_study.loc[study_of[row.image_path]]
        header = pydicom.dcmread(cohort.parent / row.image_path, stop_before_pixels=True)
        assert mine["patient_id"] == row.patient_id and mine["sex"] == row.sex
        assert mine["age"] == int(header.PatientAge[:3])  # the synthetic header's whole years
        assert (out / mine["image_path"]).read_bytes() == (cohort.parent / row.image_path).read_bytes()
        for finding in L.FINDINGS:
            assert str(mine[finding]) == str(getattr(row, finding))

    prepared = dpmedtf("prepare", out / "manifest.csv", "--cache", tmp_path / "cache", "--image-size", "32")
    assert prepared.returncode == 0, prepared.stderr
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "name": "from-archive", "data": {"manifest": str(out / "manifest.csv"), "image_size": 32},
        "privacy": {"noise_multiplier": 1.0, "delta": 1e-3, "accountant": "rdp"},
        "training": {"steps": 1, "batch_size": 4, "max_physical_batch": 4, "seed": 1}}))
    trained = dpmedtf("train", job, "--out", tmp_path / "run")
    assert trained.returncode == 0, trained.stderr
    summary = json.loads((tmp_path / "run" / "training.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 1 and summary["epsilon"] > 0


def test_without_labels_the_findings_are_left_empty_and_age_comes_from_the_dates(orthanc, tmp_path):
    study = str(pydicom.dcmread(REAL_RADIOGRAPH).StudyInstanceUID)
    (tmp_path / "studies.csv").write_text(f"study_uid\n{study}\n")
    result = dpmedtf("data", "export-manifest", "--dicomweb", orthanc.url, "--studies", tmp_path / "studies.csv",
                     "--out", tmp_path / "export", env=orthanc.environment())
    assert result.returncode == 0, result.stderr
    assert "finding columns are empty" in result.stderr
    (row,) = pd.read_csv(tmp_path / "export" / "manifest.csv", dtype=str, keep_default_na=False).to_dict("records")
    # RG1_UNCR: no PatientAge; born 1940-03-05, studied 2004-08-26.
    assert float(row["age"]) == pytest.approx(64.48, abs=0.005) and row["sex"] == "F"
    assert all(row[finding] == "" for finding in L.FINDINGS)
    again = dpmedtf("data", "export-manifest", "--dicomweb", orthanc.url, "--studies", tmp_path / "studies.csv",
                    "--out", tmp_path / "export", env=orthanc.environment())
    assert again.returncode == 1 and "already exists" in again.stderr and "Traceback" not in again.stderr


def test_age_in_years_reads_dicom_ages_and_dates():
    assert age_in_years("045Y", None, None) == 45
    assert age_in_years("006M", None, None) == 0.5
    assert age_in_years(None, "20000101", "20100101") == pytest.approx(10.0, abs=0.01)
    assert age_in_years("", "", "20100101") is None and age_in_years(None, "20200101", "20100101") is None
