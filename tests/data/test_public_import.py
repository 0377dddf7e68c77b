"""`dpmedtf data import mimic-cxr|chexpert` on files in exactly the published formats (MIMIC-CXR-JPG 2.0.0 with
MIMIC-IV's patients and admissions; CheXpert-v1.0-small's train.csv), with real JPEGs where the rows point:
the manifest has the right rows, ages, labels as written and relative paths; every image left out is
reported; and the manifest passes `dpmedtf run` (prepare) of a job with `labels: {preset: chexpert}`."""

import csv
import math

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from dpmedtf.cli import app, main
from dpmedtf.data import label_sets, manifests
from dpmedtf.data.label_sets import CHEXPERT_COLUMNS

# MIMIC-CXR-JPG's chexpert.csv orders the observations alphabetically, CheXpert's train.csv does not.
MIMIC_LABEL_ORDER = sorted(CHEXPERT_COLUMNS)
METADATA_COLUMNS = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
                    "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning",
                    "ViewCodeSequence_CodeMeaning", "PatientOrientationCodeSequence_CodeMeaning"]
VIEW_MEANING = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral", "LL": "left lateral"}
ADMISSION_COLUMNS = ["subject_id", "hadm_id", "admittime", "dischtime", "deathtime", "admission_type",
                     "admit_provider_id", "admission_location", "discharge_location", "insurance", "language",
                     "marital_status", "race", "edregtime", "edouttime", "hospital_expire_flag"]
# subject_id: (gender, anchor_age, anchor_year, anchor_year_group)
PATIENTS = {"10000032": ("F", "52", "2180", "2014 - 2016"), "10000764": ("M", "86", "2132", "2014 - 2016"),
            "10000898": ("F", "39", "2187", "2011 - 2013"), "10000935": ("F", "52", "2187", "2008 - 2010"),
            "10001038": ("M", "58", "2146", "2011 - 2013"), "10001122": ("M", "46", "2142", "2017 - 2019")}
SPLIT_OF = {"10000032": "train", "10000764": "train", "10000898": "validate", "10000935": "train",
            "10001038": "test", "10001122": "train", "10009999": "train"}
# (subject, study, view, StudyDate, why left out or None): 20 images.
IMAGES = [
    ("10000032", "50414267", "PA", "21800506", None), ("10000032", "50414267", "LATERAL", "21800506", "view"),
    ("10000032", "53189527", "AP", "21800626", None), ("10000032", "53911762", "AP", "21820722", None),
    ("10000764", "57375967", "AP", "21321014", None), ("10000764", "57375967", "LL", "21321014", "view"),
    ("10000898", "50771383", "PA", "21871107", None), ("10000898", "54205396", "PA", "21880214", None),
    ("10000935", "50578979", "PA", "21870403", None), ("10000935", "51178377", "AP", "21871030", None),
    ("10000935", "55697293", "PA", "", None),  # no StudyDate: age unknown, row kept
    ("10000935", "55697293", "LATERAL", "", "view"),
    ("10001038", "58224503", "PA", "21460102", None), ("10001038", "58224503", "AP", "21460102", None),
    ("10001122", "51008279", "AP", "21420315", None), ("10001122", "57346914", "PA", "21430101", "no split"),
    ("10001122", "59999999", "PA", "21430505", "no labels"),
    ("10009999", "52222222", "PA", "21500101", "no patient"),
    ("10001038", "56464164", "AP", "21470808", None), ("10000764", "58111111", "PA", "21330101", None),
]


def _cells(rng):
    """A CheXpert label row as the labeller writes it: mostly blank, some 1.0/0.0/-1.0."""
    return [rng.choice(["", "", "1.0", "0.0", "-1.0"]) for _ in CHEXPERT_COLUMNS]


def _write_csv(path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _jpeg(path, rng, noisy):
    path.parent.mkdir(parents=True, exist_ok=True)
    # A grey ramp, not one flat grey: prepare refuses a constant image as a failed export.
    pixels = np.tile(np.linspace(60, 180, 64), (64, 1)).T
    if noisy:
        pixels = pixels + rng.normal(0, 25, (64, 64))
    pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    Image.fromarray(pixels, mode="L").save(path, "JPEG", quality=90)


def _dicom_id(rng):
    return "-".join(f"{rng.integers(0, 16 ** 8):08x}" for _ in range(5))


@pytest.fixture
def mimic(tmp_path):
    """MIMIC-CXR-JPG and MIMIC-IV files as PhysioNet ships them, with JPEGs for the images the manifest keeps."""
    rng = np.random.default_rng(7)
    root = tmp_path / "physionet.org" / "files" / "mimic-cxr-jpg" / "2.0.0"
    images = [dict(zip(("subject", "study", "view", "date", "why"), row), dicom=_dicom_id(rng)) for row in IMAGES]
    studies = sorted({(i["subject"], i["study"]) for i in images if i["why"] != "no labels"})
    studies.append(("10000898", "56699142"))  # labelled, but no image in the metadata
    labels = {study: dict(zip(CHEXPERT_COLUMNS, _cells(rng))) for study in studies}
    labels[("10000032", "50414267")].update({"Edema": "-1.0", "Cardiomegaly": "", "No Finding": "1.0"})
    _write_csv(root / "mimic-cxr-2.0.0-chexpert.csv", ["subject_id", "study_id", *MIMIC_LABEL_ORDER],
               [[s, t, *(labels[(s, t)][c] for c in MIMIC_LABEL_ORDER)] for s, t in studies])
    _write_csv(root / "mimic-cxr-2.0.0-metadata.csv", METADATA_COLUMNS, [
        [i["dicom"], i["subject"], i["study"], "CHEST (PA AND LAT)", i["view"], "3056", "2544", i["date"], "134220.125",
         "CHEST (PA AND LAT)", VIEW_MEANING[i["view"]], "Erect"] for i in images])
    _write_csv(root / "mimic-cxr-2.0.0-split.csv", ["dicom_id", "study_id", "subject_id", "split"], [
        [i["dicom"], i["study"], i["subject"], SPLIT_OF[i["subject"]]] for i in images if i["why"] != "no split"])
    hosp = tmp_path / "physionet.org" / "files" / "mimiciv" / "2.2" / "hosp"
    _write_csv(hosp / "patients.csv", ["subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod"],
               [[s, *values, ""] for s, values in PATIENTS.items()])
    admissions = [("10000032", "2180-05-06 22:23:00", "Other", "WHITE"),
                  ("10000032", "2180-06-26 18:27:00", "Medicaid", "WHITE"),
                  ("10000032", "2180-07-23 12:35:00", "Medicaid", "UNKNOWN"),
                  ("10000764", "2132-10-14 23:31:00", "Medicare", "UNABLE TO OBTAIN"),  # no known race
                  ("10000898", "2187-11-07 08:00:00", "Other", "OTHER"),  # a tie: the latest admission's
                  ("10000898", "2188-02-14 09:00:00", "Other", "BLACK/AFRICAN AMERICAN"),
                  ("10001038", "2146-01-02 10:00:00", "Medicare", "HISPANIC/LATINO - PUERTO RICAN")]
    _write_csv(hosp / "admissions.csv", ADMISSION_COLUMNS, [
        [s, str(20000000 + n), when, when, "", "EW EMER.", "P01", "EMERGENCY ROOM", "HOME", insurance, "ENGLISH",
         "MARRIED", race, "", "", "0"] for n, (s, when, insurance, race) in enumerate(admissions)])
    for n, i in enumerate(images):
        if i["why"] is None:
            _jpeg(root / "files" / f"p{i['subject'][:2]}" / f"p{i['subject']}" / f"s{i['study']}" / f"{i['dicom']}.jpg",
                  rng, noisy=n % 2 == 0)
    return {"root": root, "hosp": hosp, "images": images, "labels": labels}


def _import_mimic(mimic, out, *extra):
    root, hosp = mimic["root"], mimic["hosp"]
    return CliRunner().invoke(app, ["data", "import", "mimic-cxr", "--labels", str(root / "mimic-cxr-2.0.0-chexpert.csv"),
                                    "--metadata", str(root / "mimic-cxr-2.0.0-metadata.csv"),
                                    "--patients", str(hosp / "patients.csv"), "--images-root", str(root),
                                    "--out", str(out), *map(str, extra)])


def _prepare_with_chexpert_labels(tmp_path, manifest, fairness=None):
    """`dpmedtf run` of a prepare-only job that selects the CheXpert labels."""
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "name": "public-import", "data": {"manifest": str(manifest), "image_size": 32},
        "labels": {"preset": "chexpert"}, **({"fairness": fairness} if fairness else {}),
        "privacy": {"noise_multiplier": 1.0, "delta": 1e-3, "accountant": "rdp"},
        "training": {"steps": 1, "batch_size": 4, "max_physical_batch": 4},
        "pipeline": {"stages": ["prepare"]}}))
    result = CliRunner().invoke(app, ["run", str(job), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    return result


def test_mimic_cxr_manifest_has_labelled_frontal_images_with_ages_and_passes_prepare(mimic, tmp_path):
    out = tmp_path / "manifests" / "mimic.csv"
    result = _import_mimic(mimic, out, "--split", mimic["root"] / "mimic-cxr-2.0.0-split.csv",
                           "--admissions", mimic["hosp"] / "admissions.csv")
    assert result.exit_code == 0, result.output
    kept = [i for i in mimic["images"] if i["why"] is None]
    assert f"wrote {out}: {len(kept)} image(s) of 6 patient(s)" in result.stdout

    # The summary accounts for every one of the 20 images, and for the labelled study without one.
    summary = result.stderr
    assert "\n" not in summary.strip()
    assert "Left out 6 image(s): 3 with a view not selected (LATERAL 2, LL 1; choose with --views)" in summary
    assert "1 whose study has no row in mimic-cxr-2.0.0-chexpert.csv" in summary
    assert "1 whose subject is missing from patients.csv" in summary
    assert "1 with no row in mimic-cxr-2.0.0-split.csv" in summary
    assert "1 labelled stud(ies) of mimic-cxr-2.0.0-chexpert.csv with no image in mimic-cxr-2.0.0-metadata.csv" in summary
    assert "age empty for 1 image(s)" in summary and "race empty (unknown) for 3 patient(s)" in summary
    assert f"{len(kept)} of {len(kept)} image file(s) exist under" in summary

    written = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert list(written.columns) == ["image_path", "patient_id", "sex", "age", "view_position", "split", "race",
                                     "insurance", *CHEXPERT_COLUMNS]
    assert len(written) == len(kept) and set(written["view_position"]) == {"PA", "AP"}
    by_path = written.set_index("image_path")
    for image in kept:
        path = f"../physionet.org/files/mimic-cxr-jpg/2.0.0/files/p10/p{image['subject']}/s{image['study']}/" \
               f"{image['dicom']}.jpg"
        assert (out.parent / path).is_file()  # relative to the manifest's folder
        row = by_path.loc[path]
        assert row["patient_id"] == image["subject"] and row["sex"] == PATIENTS[image["subject"]][0]
        labels = mimic["labels"][(image["subject"], image["study"])]
        assert [row[c] for c in CHEXPERT_COLUMNS] == [labels[c] for c in CHEXPERT_COLUMNS]  # as written
    first = by_path.loc[by_path.index.str.contains("s50414267")].iloc[0]
    assert (first["Edema"], first["Cardiomegaly"], first["No Finding"]) == ("-1.0", "", "1.0")
    ages = dict(zip(written["image_path"].str.extract(r"/s(\d+)/", expand=False), written["age"]))
    assert ages["50414267"] == "52" and ages["53911762"] == "54"  # anchor_age 52 in 2180; 2182 → 54
    assert ages["57375967"] == "86" and ages["58111111"] == "87" and ages["55697293"] == ""
    assert dict(zip(written["patient_id"], written["split"]))["10000898"] == "validation"
    race = dict(zip(written["patient_id"], written["race"]))
    assert race["10000032"] == "WHITE" and race["10000764"] == "" and race["10000898"] == "BLACK/AFRICAN AMERICAN"
    assert dict(zip(written["patient_id"], written["insurance"]))["10000032"] == "Medicaid"

    # The chexpert preset reads the cells: -1.0 not observed (ignored), blank absent.
    cohort = manifests.load_manifest(out, "radiograph", label_set=label_sets.preset("chexpert"))
    labelled = cohort.frame.set_index("manifest_path").loc[first.name]
    assert math.isnan(labelled["edema"]) and labelled["cardiomegaly"] == 0.0 and labelled["no_finding"] == 1.0
    _prepare_with_chexpert_labels(tmp_path, out, fairness={"attributes": ["sex", "age", "race", "insurance"]})


def test_mimic_cxr_views_choose_laterals_too_and_without_split_or_admissions_those_columns_are_absent(mimic, tmp_path):
    out = tmp_path / "all-views.csv"
    result = _import_mimic(mimic, out, "--views", "all")
    assert result.exit_code == 0, result.output
    written = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert {"split", "race", "insurance"}.isdisjoint(written.columns)
    assert len(written) == 20 - 2 and "LATERAL" in set(written["view_position"])  # no labels; no patient
    assert "view not selected" not in result.stderr

    only_lateral = _import_mimic(mimic, tmp_path / "lateral.csv", "--views", "lateral")
    assert only_lateral.exit_code == 0, only_lateral.output
    assert set(pd.read_csv(tmp_path / "lateral.csv")["view_position"]) == {"LATERAL", "LL"}


def test_chexpert_manifest_keeps_frontal_views_and_passes_prepare(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "datasets"
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_COLUMNS]
    rows = []
    for n in range(20):
        patient = f"patient{n // 3 + 1:05d}"
        lateral = n % 5 == 4
        view = "view2_lateral.jpg" if lateral else "view1_frontal.jpg"
        path = f"CheXpert-v1.0-small/train/{patient}/study{n % 3 + 1}/{view}"
        sex = "Unknown" if patient == "patient00004" else ("Female" if n // 3 % 2 else "Male")
        rows.append([path, sex, str(40 + n), "Lateral" if lateral else "Frontal", "" if lateral else ("AP", "PA")[n % 2],
                     *_cells(rng)])
        if not lateral:
            _jpeg(root / path, rng, noisy=n % 2 == 1)
    rows[0][5:] = ["", "", "-1.0", "1.0", "", "0.0", "", "", "", "", "", "", "", "1.0"]
    table = _write_csv(root / "CheXpert-v1.0-small" / "train.csv", header, rows)
    out = tmp_path / "manifests" / "chexpert.csv"

    result = CliRunner().invoke(app, ["data", "import", "chexpert", str(table), "--images-root", str(root),
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    laterals = sum(1 for r in rows if r[3] == "Lateral")
    assert "Left out 4 image(s): 4 with a view not selected (Lateral 4; choose with --views)" in result.stderr
    assert f"16 of 16 image file(s) exist under {root}" in result.stderr and laterals == 4
    written = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert list(written.columns) == ["image_path", "patient_id", "sex", "age", "view_position", *CHEXPERT_COLUMNS]
    assert len(written) == 16 and set(written["view_position"]) == {"AP", "PA"}
    first = written.iloc[0]
    assert first["image_path"] == "../datasets/CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"
    assert (first["patient_id"], first["sex"], first["age"]) == ("patient00001", "M", "40")
    assert [first[c] for c in CHEXPERT_COLUMNS] == rows[0][5:]
    assert set(written.loc[written["patient_id"] == "patient00004", "sex"]) == {"unknown"}
    assert written["patient_id"].nunique() == 7 and "of 7 patient(s)" in result.stdout
    _prepare_with_chexpert_labels(tmp_path, out)

    only_pa = CliRunner().invoke(app, ["data", "import", "chexpert", str(table), "--images-root", str(root),
                                       "--out", str(tmp_path / "pa.csv"), "--views", "PA"])
    assert only_pa.exit_code == 0, only_pa.output
    assert "(AP 8, Lateral 4; choose with --views)" in only_pa.stderr
    assert set(pd.read_csv(tmp_path / "pa.csv")["view_position"]) == {"PA"}


def test_image_files_need_not_exist_yet_but_the_summary_says_how_many_do(tmp_path):
    table = _write_csv(tmp_path / "CheXpert-v1.0-small" / "valid.csv",
                       ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_COLUMNS],
                       [["CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg", "Male", "73", "Frontal",
                         "AP", *["0.0"] * 14]])
    result = CliRunner().invoke(app, ["data", "import", "chexpert", str(table), "--images-root", str(tmp_path),
                                      "--out", str(tmp_path / "valid_manifest.csv")])
    assert result.exit_code == 0, result.output
    assert "No image was left out" in result.stderr and "0 of 1 image file(s) exist" in result.stderr
    written = pd.read_csv(tmp_path / "valid_manifest.csv", dtype=str, keep_default_na=False)
    assert written["image_path"].tolist() == ["CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg"]


def _error(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "import", *map(str, argv)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "Traceback" not in err
    return err


def test_a_missing_column_is_named_with_its_file(mimic, tmp_path, capsys):
    patients = mimic["hosp"] / "patients.csv"
    pd.read_csv(patients, dtype=str).drop(columns=["anchor_age"]).to_csv(patients, index=False)
    root = mimic["root"]
    err = _error(capsys, ["mimic-cxr", "--labels", root / "mimic-cxr-2.0.0-chexpert.csv", "--metadata",
                          root / "mimic-cxr-2.0.0-metadata.csv", "--patients", patients, "--images-root", root,
                          "--out", tmp_path / "m.csv"])
    assert f"dpmedtf: error: {patients}: missing column(s) anchor_age (needed from MIMIC-IV patients.csv;" in err
    assert not (tmp_path / "m.csv").exists()


def test_an_existing_manifest_is_not_replaced_without_force(mimic, tmp_path, capsys):
    out = tmp_path / "m.csv"
    out.write_text("mine\n")
    root = mimic["root"]
    argv = ["mimic-cxr", "--labels", root / "mimic-cxr-2.0.0-chexpert.csv", "--metadata",
            root / "mimic-cxr-2.0.0-metadata.csv", "--patients", mimic["hosp"] / "patients.csv", "--images-root", root,
            "--out", out]
    err = _error(capsys, argv)
    assert f"{out} already exists; choose another --out or pass --force" in err and out.read_text() == "mine\n"
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "import", *map(str, argv), "--force"])
    assert exit_info.value.code == 0 and len(pd.read_csv(out)) == 15  # no --split: none left out for it


def test_a_label_that_is_not_a_chexpert_value_is_refused_with_its_line(tmp_path, capsys):
    table = _write_csv(tmp_path / "train.csv", ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_COLUMNS],
                       [["CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg", "Female", "50", "Frontal",
                         "PA", "yes", *[""] * 13]])
    err = _error(capsys, ["chexpert", table, "--images-root", tmp_path, "--out", tmp_path / "m.csv"])
    assert f"{table}: 1 label cell(s) are not CheXpert values" in err and "line 2 No Finding: 'yes'" in err
