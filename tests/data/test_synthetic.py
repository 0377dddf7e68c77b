"""The synthetic cohort: labelled synthetic everywhere, deterministic, with visible, age-dependent findings."""

import hashlib

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from dpmedtf.data import labels as L
from dpmedtf.data.manifests import load_manifest
from dpmedtf.data.synthetic import NOTICE, SyntheticCohortSpec, draw_ct, draw_radiograph, write_synthetic_cohort


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_cohort_is_deterministic_and_labelled_synthetic(tmp_path):
    spec = SyntheticCohortSpec(patients=12, image_size=48, volumes=2, volume_shape=(16, 16, 8), seed=9)
    first = write_synthetic_cohort(tmp_path / "a", spec)
    write_synthetic_cohort(tmp_path / "b", spec)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert (tmp_path / "a" / "SYNTHETIC.txt").read_text().strip() == NOTICE
    manifest = pd.read_csv(first["radiograph"])
    assert (manifest["synthetic"] == True).all() and manifest["image_path"].str.contains("synthetic_").all()  # noqa: E712
    with pytest.raises(FileExistsError):
        write_synthetic_cohort(tmp_path / "a", spec)


def test_cohort_has_png_dicom_both_photometrics_and_several_images_per_patient(synthetic_cohort):
    cohort = load_manifest(synthetic_cohort["radiograph"], "radiograph")
    assert cohort.synthetic
    paths = cohort.frame["path"]
    dicoms = [pydicom.dcmread(p) for p in paths if p.endswith(".dcm")]
    assert paths.str.endswith(".png").any() and dicoms
    assert {d.PhotometricInterpretation for d in dicoms} == {"MONOCHROME1", "MONOCHROME2"}
    assert all(d.PatientName == "SYNTHETIC^DEMO" and "SYNTHETIC" in d.ImageComments for d in dicoms)
    assert cohort.frame.groupby("patient_id").size().max() > 1
    assert cohort.labels().sum(axis=0).min() > 0  # every finding occurs


def test_demographics_follow_the_spec_on_a_larger_draw(tmp_path):
    manifest = write_synthetic_cohort(tmp_path, SyntheticCohortSpec(patients=600, image_size=32, max_images_per_patient=1, seed=1))
    frame = load_manifest(manifest["radiograph"], "radiograph").frame
    assert (frame["sex"] == "F").mean() == pytest.approx(0.35, abs=0.05)
    assert (frame["age_group"] == "70-79").mean() == pytest.approx(0.29, abs=0.05)
    assert frame["cardiomegaly"].mean() == pytest.approx(0.45, abs=0.07)


def right_base(image):
    """Mean of the patient's right lung base (the image's lower left), where a right effusion sits."""
    return image[int(0.62 * image.shape[0]):int(0.75 * image.shape[0]), int(0.18 * image.shape[1]):int(0.44 * image.shape[1])].mean()


def test_findings_are_visible_at_their_grade_and_fade_with_age():
    def effusion_signal(grade, age):
        values = []
        for seed in range(8):
            grades = {f: 0 for f in L.FINDINGS}
            grades["pleural_effusion_right"] = grade
            image = draw_radiograph(np.random.default_rng(seed), 96, grades, age, "M")
            values.append(right_base(image))
        return np.mean(values)

    young_none, young_severe, old_severe = effusion_signal(0, 30), effusion_signal(4, 30), effusion_signal(4, 90)
    assert young_severe - young_none > 0.05  # the opacity is there, at the patient's right base
    assert (old_severe - young_none) < 0.6 * (young_severe - young_none)  # and harder to see when old


def test_ct_lesion_only_in_positive_cases(synthetic_cohort):
    positive = draw_ct(np.random.default_rng(0), (40, 40, 20), 1, 50)
    negative = draw_ct(np.random.default_rng(0), (40, 40, 20), 0, 50)
    assert (positive < negative - 40).sum() > 20
    frame = load_manifest(synthetic_cohort["volume"], "volume").frame
    assert nib.load(frame.loc[0, "path"]).shape == (40, 40, 20)


def test_the_chexpert_convention_cohort_has_uncertain_and_blank_entries_and_more_attributes(tmp_path):
    from dpmedtf.data import label_sets

    manifest = write_synthetic_cohort(tmp_path / "c", SyntheticCohortSpec(patients=60, image_size=32, seed=4,
                                                                          convention="chexpert"))["radiograph"]
    raw = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    cells = raw[list(label_sets.CHEXPERT_COLUMNS)]
    assert set(cells.stack()) == {"1.0", "0.0", "-1.0", ""}
    assert not set(L.FINDINGS) & set(raw.columns) and raw["synthetic"].eq("true").all()
    assert (raw.groupby("patient_id")[["site", "race", "sex"]].nunique() == 1).all().all()
    assert raw["site"].nunique() == 3 and "unknown" in set(raw["sex"])
    no_finding = raw["No Finding"] == "1.0"
    others = cells.drop(columns=["No Finding", "Support Devices"])
    assert not (others[no_finding].isin(["1.0", "-1.0"])).any().any()  # No Finding only when nothing else is
    assert "Enlarged Cardiomediastinum" in raw.columns and "Pleural Effusion" in raw.columns
    cohort = load_manifest(manifest, "radiograph", label_set=label_sets.preset("chexpert"))
    labels = cohort.labels()
    assert np.isnan(labels).any() and np.isnan(labels).sum() == (cells == "-1.0").to_numpy().sum()
    assert cohort.synthetic


def test_site_and_race_leave_the_uka_cohort_of_a_seed_as_it_was(tmp_path):
    """Recorded before site and race existed: the first rows of seed 0 (12 patients, 32 px)."""
    manifest = write_synthetic_cohort(tmp_path / "u", SyntheticCohortSpec(patients=12, image_size=32, seed=0))["radiograph"]
    raw = pd.read_csv(manifest)
    assert {"site", "race"} <= set(raw.columns)
    assert (raw.groupby("patient_id")[["site", "race"]].nunique() == 1).all().all()
    recorded = raw.drop(columns=["site", "race"])
    assert recorded.iloc[:3].to_dict("list") == EXPECTED_FIRST_ROWS
    as_text = pd.read_csv(manifest, dtype=str, keep_default_na=False).drop(columns=["site", "race"])
    assert hashlib.sha256(as_text.to_csv(index=False).encode()).hexdigest() == EXPECTED_MANIFEST_SHA256
    images = manifest.parent / "images"
    png = np.asarray(Image.open(images / "synthetic_SYN00000_0.png"))
    dcm = pydicom.dcmread(images / "synthetic_SYN00001_2.dcm").pixel_array
    assert [hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() for a in (png, dcm)] == EXPECTED_PIXELS_SHA256


EXPECTED_FIRST_ROWS = {  # written by the generator before site and race were added
    "image_path": ["images/synthetic_SYN00000_0.png", "images/synthetic_SYN00001_0.png", "images/synthetic_SYN00001_1.png"],
    "patient_id": ["SYN00000", "SYN00001", "SYN00001"], "sex": ["M", "F", "F"], "age": [39, 54, 55],
    "cardiomegaly": ["3", "normal", "massively enlarged"], "congestion": ["0", "uncertain", "0"],
    "pleural_effusion_right": ["negative", "negative", "negative"], "pleural_effusion_left": ["negative", "negative", "mild"],
    "pneumonic_infiltrates_right": ["4", "1", "0"], "pneumonic_infiltrates_left": ["moderate", "negative", "0"],
    "atelectasis_right": ["uncertain", "negative", "0"], "atelectasis_left": ["negative", "2", "negative"],
    "synthetic": [True, True, True]}
# The whole manifest of that cohort (25 rows, read as text, without site and race) and the decoded pixels of its
# first PNG and first DICOM, as the generator wrote them before site and race were added.
EXPECTED_MANIFEST_SHA256 = "33467029774dcb366dcb744a24a2d6c6bc340b1717961c4ec9a4714719ea9647"
EXPECTED_PIXELS_SHA256 = ["5290bc6a1b330e124e15bc54f86f21d087429f0176d5a4ca670187133b320fd2",
                          "bbfdcdab74aa7c95e571d2f631a66620ee07a594b79efe96df04a7a1ddf7c5d8"]


def test_chexpert_images_follow_their_observations_and_their_site(tmp_path):
    """Unknown sex stays unknown in the DICOM header; positive observations are visible; sites differ in
    brightness; the CT manifest has site and race too."""
    out = tmp_path / "c"
    manifests = write_synthetic_cohort(out, SyntheticCohortSpec(patients=80, image_size=32, seed=2, dicom_fraction=1.0,
                                                                monochrome1_fraction=0.0, max_images_per_patient=1,
                                                                volumes=3, volume_shape=(8, 8, 4), convention="chexpert"))
    raw = pd.read_csv(manifests["radiograph"], dtype=str, keep_default_na=False)
    headers = [pydicom.dcmread(out / p) for p in raw["image_path"]]
    assert all(h.PatientName == "SYNTHETIC^DEMO" for h in headers)
    assert [h.PatientSex or "unknown" for h in headers] == raw["sex"].tolist() and "unknown" in set(raw["sex"])
    pixels = np.stack([h.pixel_array / 4095 for h in headers])
    centred = (pixels - pixels.mean(axis=(1, 2), keepdims=True)).reshape(len(raw), -1)  # without the site's offset
    train = np.arange(len(raw)) % 2 == 0  # one image per patient: rows are patients
    for observation in ("Pleural Effusion", "Cardiomegaly"):  # a mean-difference template learnt on half finds the rest
        positive, negative = (raw[observation] == "1.0").to_numpy(), raw[observation].isin(["0.0", ""]).to_numpy()
        template = centred[train & positive].mean(axis=0) - centred[train & negative].mean(axis=0)
        held_out = ~train & (positive | negative)
        assert roc_auc_score(positive[held_out], centred[held_out] @ template) > 0.7, observation
    brightness = pd.Series(pixels.mean(axis=(1, 2))).groupby(raw["site"]).mean()
    assert brightness["site-B"] > brightness["site-A"] > brightness["site-C"]
    ct = pd.read_csv(manifests["volume"])
    assert {"site", "race"} <= set(ct.columns) and ct["race"].str.startswith("group-").all()


def test_synthetic_command_writes_a_chexpert_cohort(tmp_path):
    from typer.testing import CliRunner

    from dpmedtf.cli import app
    from dpmedtf.data.label_sets import CHEXPERT_COLUMNS

    result = CliRunner().invoke(app, ["synthetic", "--out", str(tmp_path / "c"), "--patients", "3", "--convention",
                                      "chexpert"])
    assert result.exit_code == 0, result.output
    assert "SYNTHETIC DATA" in result.output and (tmp_path / "c" / "SYNTHETIC.txt").is_file()
    raw = pd.read_csv(tmp_path / "c" / "radiographs.csv", dtype=str, keep_default_na=False)
    assert set(CHEXPERT_COLUMNS) <= set(raw.columns) and not set(L.FINDINGS) & set(raw.columns)
    assert raw["synthetic"].eq("true").all() and {"site", "race"} <= set(raw.columns)
    refused = CliRunner().invoke(app, ["synthetic", "--out", str(tmp_path / "d"), "--convention", "mimic"])
    assert refused.exit_code != 0
