"""`dpmedtf predict --dicomweb` against a real Orthanc server: studies in, DICOM SR out and stored back,
and each fault (wrong credentials, unknown UID, wrong modality, server gone mid-study, no server) a clear
one-line error that names the UID and leaves nothing in the archive."""

import json
import time

import numpy as np
import pandas as pd
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from pydicom.data import get_testdata_file

from dpmedtf.data.dicomweb import ArchiveError, DicomwebArchive, RetryPolicy
from dpmedtf.data.synthetic import SyntheticCohortSpec, write_synthetic_cohort
from dpmedtf.release.archive_predict import ArchiveSelection, predict_archive
from dpmedtf.release.predict import load
from dpmedtf.release.signing import fingerprint
from dpmedtf.release.structured_report import read_report
from tests.orthanc import OrthancServer
from tests.release.test_consumer_cli import run

REAL_RADIOGRAPH = get_testdata_file("RG1_UNCR.dcm")
CT_SLICE = get_testdata_file("CT_small.dcm")


def _uid(path, keyword="StudyInstanceUID"):
    return str(pydicom.dcmread(path, stop_before_pixels=True)[keyword].value)


@pytest.fixture(scope="module")
def synthetic_dicoms(tmp_path_factory):
    root = tmp_path_factory.mktemp("archive-cohort")
    write_synthetic_cohort(root, SyntheticCohortSpec(patients=3, image_size=48, seed=21, dicom_fraction=1.0))
    return sorted(root.rglob("*.dcm"))


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, synthetic_dicoms):
    server = OrthancServer(tmp_path_factory.mktemp("orthanc")).start()
    server.upload([REAL_RADIOGRAPH, CT_SLICE, *synthetic_dicoms])
    yield server
    server.stop()


def _error_line(result) -> str:
    """The one error line a failed command prints (verification notes may precede it), and no traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("dpmedtf: error:")]
    return line


def _archive_run(bundle, orthanc, tmp_path, *args, **environment):
    return run("predict", bundle, "--dicomweb", orthanc.url, *args, tmp_path=tmp_path,
               **{**orthanc.environment(), **environment})


def test_predict_from_archive_stores_srs_that_read_back_as_the_csv(bundle, keys, orthanc, synthetic_dicoms, tmp_path):
    key = keys / "publisher.pub"
    studies = [_uid(REAL_RADIOGRAPH), *(_uid(p) for p in synthetic_dicoms[:2])]
    result = _archive_run(bundle, orthanc, tmp_path, *(a for s in studies for a in ("--study", s)),
                          "--public-key", key, "--out", tmp_path / "preds.csv", "--sr-out", tmp_path / "sr", "--store")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr and f"stored 3 DICOM SR(s) in {orthanc.url}" in result.stdout
    frame = pd.read_csv(tmp_path / "preds.csv")
    assert sorted(frame["study_uid"]) == sorted(studies) and frame["sop_instance_uid"].notna().all()
    labels = json.loads((bundle / "metadata.json").read_text())["labels"]
    certificate = json.loads((bundle / "privacy_certificate.json").read_text())

    # The same file predicted locally gives the same numbers: the archive path adds nothing of its own
    # (up to float32 rounding: onnxruntime batches three inputs here, one there).
    local = run("predict", bundle, REAL_RADIOGRAPH, "--public-key", key, "--out", tmp_path / "local.csv",
                tmp_path=tmp_path)
    assert local.returncode == 0, local.stderr
    local_row = pd.read_csv(tmp_path / "local.csv").iloc[0]
    archive_row = frame.set_index("study_uid").loc[_uid(REAL_RADIOGRAPH)]
    for label in labels:
        assert archive_row[f"{label}_prob"] == pytest.approx(local_row[f"{label}_prob"], abs=1e-5)

    # Every SR: a file per study that pydicom reads and highdicom parses, and the stored copy read back
    # through DICOMweb (a separate client) holds the CSV's probabilities and calls.
    written = sorted((tmp_path / "sr").glob("*.sr.dcm"))
    assert sorted(p.name for p in written) == sorted(f"{s}.sr.dcm" for s in studies)
    client = DICOMwebClient(orthanc.url)
    client._session.auth = orthanc.auth
    for study in studies:
        stored = orthanc.instances(study, "SR")
        assert len(stored) == 1, f"study {study}: {len(stored)} SRs stored"
        dataset = client.retrieve_instance(study, stored[0]["0020000E"]["Value"][0], stored[0]["00080018"]["Value"][0])
        assert dataset.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
        from_file = pydicom.dcmread(tmp_path / "sr" / f"{study}.sr.dcm")
        assert from_file.SOPInstanceUID == dataset.SOPInstanceUID
        report = read_report(dataset)
        rows = frame[frame["study_uid"] == study]
        assert set(report["images"]) == set(rows["sop_instance_uid"])
        for _, row in rows.iterrows():
            image = report["images"][row["sop_instance_uid"]]
            for label in labels:
                # The model's float32, exactly: the CSV writes its shortest round-trip text, the SR more digits.
                assert np.float32(image["probabilities"][label]) == np.float32(row[f"{label}_prob"])
                assert image["calls"][label] == bool(row[f"{label}_label"])
        parameters = report["algorithm_parameters"]
        assert float(parameters["epsilon"]) == certificate["epsilon"]
        assert float(parameters["delta"]) == certificate["delta"]
        assert parameters["unit_of_privacy"] == certificate["unit_of_privacy"]
        assert parameters["signature_key_fingerprint"] == fingerprint(key)
        assert parameters["signature_verified"] == "true" and parameters["trained_on_synthetic_data"] == "true"
        assert "SYNTHETIC" in report["series_description"]

    # Predicting the study again skips the SR now in it, and says so.
    again = _archive_run(bundle, orthanc, tmp_path, "--study", studies[0], "--public-key", key, "--format", "json")
    assert again.returncode == 0, again.stderr
    assert "skipped 1 instance(s) that are not images (SR)" in again.stderr
    (entry,) = json.loads(again.stdout)["inputs"]
    assert entry["study_uid"] == studies[0] and entry["sop_instance_uid"] == _uid(REAL_RADIOGRAPH, "SOPInstanceUID")


def test_a_query_selects_studies_by_date_and_modality(bundle, keys, orthanc, synthetic_dicoms):
    archive = DicomwebArchive(orthanc.url, orthanc.auth)
    found = set(archive.find_studies(study_date="20260101", modality="CR"))
    assert found == {_uid(p) for p in synthetic_dicoms}  # RG1_UNCR is from 2004, CT_small is CT
    assert archive.find_studies(study_date="19990101-19991231") == []


def test_wrong_credentials_are_refused_naming_the_variables(bundle, keys, orthanc, tmp_path):
    result = _archive_run(bundle, orthanc, tmp_path, "--study", _uid(REAL_RADIOGRAPH), "--public-key",
                          keys / "publisher.pub", "--out", tmp_path / "p.csv", DPMEDTF_DICOMWEB_PASSWORD="wrong")
    assert result.returncode == 1 and not (tmp_path / "p.csv").exists()
    line = _error_line(result)
    assert "refused the credentials (HTTP 401)" in line and "DPMEDTF_DICOMWEB_PASSWORD" in line
    assert _uid(REAL_RADIOGRAPH) in line


def test_an_unknown_study_is_named(bundle, keys, orthanc, tmp_path):
    unknown = "1.2.826.0.1.3680043.8.498.1"
    result = _archive_run(bundle, orthanc, tmp_path, "--study", unknown, "--public-key", keys / "publisher.pub",
                          "--out", tmp_path / "p.csv")
    assert result.returncode == 1 and not (tmp_path / "p.csv").exists()
    line = _error_line(result)
    assert f"holds no study {unknown}" in line


def test_a_wrong_modality_series_stops_the_run_and_nothing_is_stored(bundle, keys, orthanc, tmp_path):
    radiograph_study, ct_study = _uid(REAL_RADIOGRAPH), _uid(CT_SLICE)
    before = len(orthanc.instances(radiograph_study, "SR"))
    result = _archive_run(bundle, orthanc, tmp_path, "--study", radiograph_study, "--study", ct_study,
                          "--public-key", keys / "publisher.pub", "--sr-out", tmp_path / "sr", "--store")
    assert result.returncode == 1
    line = _error_line(result)
    assert ct_study in line and "CT" in line
    assert not (tmp_path / "sr").exists()
    assert len(orthanc.instances(radiograph_study, "SR")) == before and orthanc.instances(ct_study, "SR") == []


def test_server_stopped_mid_study_names_the_study_and_stores_nothing(bundle, keys, synthetic_dicoms, tmp_path):
    # A study of two series, so the server can go away between its instances.
    study = pydicom.uid.generate_uid()
    parts = []
    for i, source in enumerate(synthetic_dicoms[:2]):
        dataset = pydicom.dcmread(source)
        dataset.StudyInstanceUID = study
        parts.append(tmp_path / f"part{i}.dcm")
        dataset.save_as(parts[-1])
    server = OrthancServer(tmp_path / "orthanc").start()
    try:
        server.upload(parts)
        archive = DicomwebArchive(server.url, server.auth, retry=RetryPolicy(attempts=3, first_wait_seconds=0.2))
        loaded = load(bundle, keys / "publisher.pub")

        def stop_after_first(stage, done, total):
            if stage == "retrieving" and done == 1:
                server.stop()

        started = time.monotonic()
        with pytest.raises(ArchiveError) as raised:
            predict_archive(loaded, archive, ArchiveSelection(studies=[study]), sr_out=tmp_path / "sr", store=True,
                            progress=stop_after_first)
        message = str(raised.value)
        assert f"study {study}: download stopped after 1 of 2 instance(s)" in message
        assert "cannot reach the archive" in message and "3 attempt(s)" in message
        assert time.monotonic() - started < 30  # bounded retries, not a hang
        assert not (tmp_path / "sr").exists()
    finally:
        server.stop()


def test_no_server_at_the_url_is_a_clear_error(bundle, keys, tmp_path):
    from tests.orthanc import _free_port

    url = f"http://127.0.0.1:{_free_port()}/dicom-web"
    result = run("predict", bundle, "--dicomweb", url, "--study", "1.2.3", "--public-key", keys / "publisher.pub",
                 "--out", tmp_path / "p.csv", tmp_path=tmp_path)
    assert result.returncode == 1
    line = _error_line(result)
    assert url in line and "cannot reach the archive" in line and "study 1.2.3" in line


def test_tls_is_verified_and_a_hospital_ca_is_given_by_file(bundle, keys, tmp_path):
    server = OrthancServer(tmp_path / "orthanc", tls=True).start()
    try:
        server.upload([REAL_RADIOGRAPH])
        study = _uid(REAL_RADIOGRAPH)
        common = ("predict", bundle, "--dicomweb", server.url, "--study", study, "--public-key", keys / "publisher.pub")
        refused = run(*common, "--out", tmp_path / "p.csv", tmp_path=tmp_path, **server.environment())
        assert refused.returncode == 1 and not (tmp_path / "p.csv").exists()
        line = _error_line(refused)
        assert "TLS certificate verification failed" in line and "--ca-bundle" in line and study in line
        trusted = run(*common, "--ca-bundle", server.ca_certificate, "--out", tmp_path / "p.csv", tmp_path=tmp_path,
                      **server.environment())
        assert trusted.returncode == 0, trusted.stderr
        assert pd.read_csv(tmp_path / "p.csv")["input"].iloc[0].startswith(f"{server.url}/studies/{study}/series/")
    finally:
        server.stop()
