"""Manifests from public chest radiograph datasets: MIMIC-CXR-JPG and CheXpert, as their publishers ship them.

The manifest has one row per image: ``image_path`` (relative to the manifest's folder when a relative path
exists, else absolute), ``patient_id``, ``sex`` (F, M or ``unknown``), ``age`` (empty when unknown),
``view_position``, then for MIMIC-CXR ``split`` (with its split file; ``validate`` becomes ``validation``),
``race`` and ``insurance`` (with MIMIC-IV's admissions file), then the 14 CheXpert observations under the
names of ``label_sets.CHEXPERT_COLUMNS`` with their cells as CheXpert writes them (1.0, 0.0, -1.0 or empty),
so that the ``chexpert`` label preset decides what uncertain and blank mean, not this import.

MIMIC-CXR-JPG: labels per study (``mimic-cxr-2.0.0-chexpert.csv`` or ``-negbio.csv``), images from
``mimic-cxr-2.0.0-metadata.csv`` at ``files/p<first two digits of subject_id>/p<subject_id>/s<study_id>/
<dicom_id>.jpg``, sex and age from MIMIC-IV ``patients.csv``. Age at the study = anchor_age + (year of
StudyDate − anchor_year): MIMIC shifts a patient's dates by one offset, so the difference of years is real;
anchor_age is top-coded (91 means "over 89"), so such ages are lower bounds. Race and insurance: over a
subject's admissions, the most frequent value that is not unknown (UNKNOWN, UNABLE TO OBTAIN, PATIENT
DECLINED TO ANSWER, empty); a tie goes to the value of the latest admission (admittime), else to the
alphabetically first; a subject with no known value gets an empty cell (the group ``unknown``).

CheXpert: ``train.csv`` or ``valid.csv``; ``Path`` is relative to the folder that holds the dataset folder
(``CheXpert-v1.0-small/train/patient00001/...``), the patient is the ``patientNNNNN`` folder.

Views: ``frontal`` (the default), ``lateral``, ``all``, or a view as the dataset writes it, case-insensitively.
In MIMIC-CXR they match ViewPosition, ``frontal`` meaning PA and AP and ``lateral`` LATERAL and LL. In CheXpert
``frontal``/``lateral`` match its Frontal/Lateral column (the dataset's own call) and other words its AP/PA.

Every image left out is counted with its reason in the result's summary, and so are input records that name
no image; nothing is dropped unseen. Image files need not exist yet (``prepare`` checks each); the result
says how many do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import pandas as pd

from dpmedtf.data.label_sets import CHEXPERT_COLUMNS
from dpmedtf.errors import DataError, OutputError, OutputExistsError
from dpmedtf.files import write_beside_and_rename

DEFAULT_VIEWS: tuple[str, ...] = ("frontal",)
MIMIC_VIEW_GROUPS = {"frontal": ("pa", "ap"), "lateral": ("lateral", "ll")}
CHEXPERT_CELLS = frozenset({"1.0", "0.0", "-1.0", "1", "0", "-1", ""})
UNKNOWN_DEMOGRAPHIC = frozenset({"", "UNKNOWN", "UNABLE TO OBTAIN", "PATIENT DECLINED TO ANSWER",
                                 "UNKNOWN/NOT SPECIFIED"})
MIMIC_SPLITS = {"train": "train", "validate": "validation", "validation": "validation", "test": "test"}
SEXES = {"F": "F", "M": "M", "FEMALE": "F", "MALE": "M"}
MAX_AGE = 120
MAX_LISTED = 5


@dataclass
class ImportedManifest:
    """What an import wrote, and everything it did not write, with reasons."""

    manifest: Path
    images: int
    patients: int
    images_root: Path
    images_found: int
    left_out: list[tuple[int, str]] = field(default_factory=list)
    """(images, why): image rows of the inputs that are not in the manifest."""
    unused: list[tuple[int, str]] = field(default_factory=list)
    """(records, what): input records that name no image, so have no row to write."""
    notes: list[str] = field(default_factory=list)
    """Rows written with a gap (an empty age or race), counted."""

    def summary(self) -> str:
        """One paragraph: rows, patients, each category left out, gaps, how many image files exist."""
        parts = [f"wrote {self.manifest}: {self.images} image(s) of {self.patients} patient(s)."]
        dropped = sum(n for n, _ in self.left_out)
        parts.append(f"Left out {dropped} image(s): " + "; ".join(f"{n} {why}" for n, why in self.left_out) + "."
                     if dropped else "No image was left out.")
        if self.unused:
            parts.append("Not used: " + "; ".join(f"{n} {what}" for n, what in self.unused) + ".")
        if self.notes:
            parts.append("Written with gaps: " + "; ".join(self.notes) + ".")
        parts.append(f"{self.images_found} of {self.images} image file(s) exist under {self.images_root} "
                     "(dpmedtf prepare checks every one).")
        return " ".join(parts)


class _Tally:
    """Image rows left out, step by step, each with its reason, so that the counts add up to the input."""

    def __init__(self) -> None:
        self.left_out: list[tuple[int, str]] = []

    def leave_out(self, rows: pd.DataFrame, mask: pd.Series, why: str) -> pd.DataFrame:
        count = int(mask.sum())
        if count:
            self.left_out.append((count, why))
        return rows[~mask]


def import_mimic_cxr(*, labels: Path, metadata: Path, patients: Path, images_root: Path, out: Path,
                     split: Path | None = None, admissions: Path | None = None,
                     views: Sequence[str] = DEFAULT_VIEWS, force: bool = False) -> ImportedManifest:
    """The MIMIC-CXR-JPG manifest (see the module); refuses to replace ``out`` unless ``force``."""
    out = _check_output(out, force)
    labels, metadata, patients = Path(labels), Path(metadata), Path(patients)
    split, admissions = (None if path is None else Path(path) for path in (split, admissions))
    study = ["subject_id", "study_id"]
    label_rows = _read_table(labels, "the MIMIC-CXR-JPG labels (mimic-cxr-2.0.0-chexpert.csv)",
                             (*study, *CHEXPERT_COLUMNS))
    _check_chexpert_cells(label_rows, labels)
    _refuse_repeats(label_rows, study, labels, "a study")
    images = _read_table(metadata, "mimic-cxr-2.0.0-metadata.csv", ("dicom_id", *study, "ViewPosition", "StudyDate"))
    _refuse_repeats(images, ["dicom_id"], metadata, "an image")
    people = _read_table(patients, "MIMIC-IV patients.csv", ("subject_id", "gender", "anchor_age", "anchor_year"))
    _refuse_repeats(people, ["subject_id"], patients, "a subject")

    tally, unused = _Tally(), []
    imaged_studies = pd.MultiIndex.from_frame(images[study])
    unimaged = int((~pd.MultiIndex.from_frame(label_rows[study]).isin(imaged_studies)).sum())
    if unimaged:
        unused.append((unimaged, f"labelled stud(ies) of {labels.name} with no image in {metadata.name}"))
    images = _leave_out_views(tally, images, images["ViewPosition"], _mimic_view_selected(images, views))
    images = images.merge(label_rows[[*study, *CHEXPERT_COLUMNS]], on=study, how="left", indicator="has_labels",
                          validate="many_to_one")
    images = tally.leave_out(images, images.pop("has_labels") == "left_only",
                             f"whose study has no row in {labels.name}")
    images = images.merge(people[["subject_id", "gender", "anchor_age", "anchor_year"]], on="subject_id",
                          how="left", indicator="has_patient", validate="many_to_one")
    images = tally.leave_out(images, images.pop("has_patient") == "left_only",
                             f"whose subject is missing from {patients.name}")
    if split is not None:
        images = _with_split(tally, images, split)

    manifest = pd.DataFrame({
        "image_path": "files/p" + images["subject_id"].str[:2] + "/p" + images["subject_id"] + "/s"
                      + images["study_id"] + "/" + images["dicom_id"] + ".jpg",
        "patient_id": images["subject_id"],
        "sex": images["gender"].str.upper().map(SEXES).fillna("unknown"),
        "age": _mimic_age(images),
        "view_position": images["ViewPosition"]}).reset_index(drop=True)
    notes = _age_note(manifest, "no StudyDate, anchor_age or anchor_year, or an age outside 0–120")
    if split is not None:
        manifest["split"] = images["split"].to_numpy()
    if admissions is not None:
        per_subject = _demographics_per_subject(admissions)
        for column in ("race", "insurance"):
            manifest[column] = images["subject_id"].map(per_subject[column]).fillna("").to_numpy()
            blank = manifest[column] == ""
            if blank.any():
                notes.append(f"{column} empty (unknown) for {manifest.loc[blank, 'patient_id'].nunique()} patient(s) "
                             f"with no known {column} in {admissions.name}")
    for column in CHEXPERT_COLUMNS:
        manifest[column] = images[column].to_numpy()
    return _write(manifest, out, Path(images_root), metadata, tally, unused, notes)


def import_chexpert(table: Path, *, images_root: Path, out: Path, views: Sequence[str] = DEFAULT_VIEWS,
                    force: bool = False) -> ImportedManifest:
    """The CheXpert manifest from its train.csv or valid.csv (see the module); refuses to replace ``out``
    unless ``force``."""
    out, table = _check_output(out, force), Path(table)
    rows = _read_table(table, "CheXpert's train.csv or valid.csv",
                       ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_COLUMNS))
    _check_chexpert_cells(rows, table)
    _refuse_repeats(rows, ["Path"], table, "an image")
    patient = rows["Path"].str.extract(r"(?:^|/)(patient\d+)(?:/|$)", expand=False)
    if patient.isna().any():
        lines = [str(i + 2) for i in rows.index[patient.isna()][:MAX_LISTED]]
        raise DataError(f"{table}: line(s) {', '.join(lines)}: Path names no patientNNNNN folder (e.g. "
                        f"{rows.loc[patient.isna(), 'Path'].iloc[0]!r}); CheXpert's Path looks like "
                        "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg")
    rows = rows.assign(patient_id=patient,
                       view_position=rows["AP/PA"].where(rows["AP/PA"] != "", rows["Frontal/Lateral"]))
    wanted = _view_words(views)
    selected = None if wanted is None else (rows["Frontal/Lateral"].str.lower().isin(wanted)
                                            | rows["AP/PA"].str.lower().isin(wanted - {"frontal", "lateral"}))
    tally = _Tally()
    rows = _leave_out_views(tally, rows, rows["view_position"], selected)
    age = pd.to_numeric(rows["Age"], errors="coerce")
    manifest = pd.DataFrame({
        "image_path": rows["Path"],
        "patient_id": rows["patient_id"],
        "sex": rows["Sex"].str.upper().map(SEXES).fillna("unknown"),
        "age": _age_text(age),
        "view_position": rows["view_position"],
        **{column: rows[column] for column in CHEXPERT_COLUMNS}}).reset_index(drop=True)
    notes = _age_note(manifest, "Age missing or outside 0–120")
    return _write(manifest, out, Path(images_root), table, tally, [], notes)


# --- reading -------------------------------------------------------------------------------------------

def _read_table(path: Path, what: str, required: Sequence[str]) -> pd.DataFrame:
    """Every cell as stripped text (empty for blank), exactly as written: 1.0 stays 1.0. ``.csv.gz`` is read too."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; give the path of {what}")
    try:
        rows = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty; give {what}") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable CSV file ({' '.join(str(exc).split())}); give {what}") from None
    rows.columns = [str(c).strip() for c in rows.columns]
    _require_columns(rows, path, what, required)
    return rows.apply(lambda column: column.str.strip())


def _require_columns(rows: pd.DataFrame, path: Path, what: str, required: Sequence[str]) -> None:
    missing = [c for c in required if c not in rows.columns]
    if missing:
        found = ", ".join(rows.columns[:20]) + (", …" if len(rows.columns) > 20 else "")
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (needed from {what}; this file's "
                        f"columns: {found})")


def _check_chexpert_cells(rows: pd.DataFrame, path: Path) -> None:
    bad = [(index + 2, column, value) for column in CHEXPERT_COLUMNS
           for index, value in rows.loc[~rows[column].isin(CHEXPERT_CELLS), column].items()]
    if bad:
        shown = "; ".join(f"line {line} {column}: {value!r}" for line, column, value in sorted(bad)[:MAX_LISTED])
        raise DataError(f"{path}: {len(bad)} label cell(s) are not CheXpert values (1.0 positive, 0.0 negative, "
                        f"-1.0 uncertain, empty not mentioned): {shown}")


def _refuse_repeats(rows: pd.DataFrame, key: list[str], path: Path, what: str) -> None:
    repeated = rows[rows.duplicated(key, keep=False)]
    if not repeated.empty:
        first = repeated.iloc[0][key]
        same = repeated[(repeated[key] == first).all(axis=1)]
        lines = ", ".join(str(i + 2) for i in same.index)
        raise DataError(f"{path}: lines {lines} repeat {' '.join(f'{k} {first[k]}' for k in key)}; each row is "
                        f"{what} and must appear once ({len(repeated)} row(s) affected)")


# --- selecting and deriving ----------------------------------------------------------------------------

def _view_words(views: Sequence[str]) -> set[str] | None:
    """The lower-case view words asked for (commas split too); None for ``all``."""
    words = {w.strip().lower() for v in views for w in str(v).split(",") if w.strip()} or set(DEFAULT_VIEWS)
    return None if "all" in words else words


def _mimic_view_selected(images: pd.DataFrame, views: Sequence[str]) -> pd.Series | None:
    wanted = _view_words(views)
    if wanted is None:
        return None
    wanted |= {member for group, members in MIMIC_VIEW_GROUPS.items() if group in wanted for member in members}
    return images["ViewPosition"].str.lower().isin(wanted)


def _leave_out_views(tally: _Tally, rows: pd.DataFrame, view: pd.Series, selected: pd.Series | None) -> pd.DataFrame:
    if selected is None:
        return rows
    counts = view[~selected].replace("", "no view").value_counts()
    detail = ", ".join(f"{name} {n}" for name, n in counts.items())
    return tally.leave_out(rows, ~selected, f"with a view not selected ({detail}; choose with --views)")


def _with_split(tally: _Tally, images: pd.DataFrame, path: Path) -> pd.DataFrame:
    splits = _read_table(path, "mimic-cxr-2.0.0-split.csv", ("dicom_id", "split"))
    _refuse_repeats(splits, ["dicom_id"], path, "an image")
    unknown = splits[~splits["split"].str.lower().isin(MIMIC_SPLITS)]
    if not unknown.empty:
        shown = "; ".join(f"line {i + 2}: {v!r}" for i, v in unknown["split"].head(MAX_LISTED).items())
        raise DataError(f"{path}: {len(unknown)} row(s) with an unknown split ({shown}); MIMIC-CXR's splits are "
                        "train, validate and test")
    images = images.merge(splits[["dicom_id", "split"]], on="dicom_id", how="left", indicator="has_split")
    images = tally.leave_out(images, images.pop("has_split") == "left_only", f"with no row in {path.name}")
    return images.assign(split=images["split"].str.lower().map(MIMIC_SPLITS))


def _mimic_age(images: pd.DataFrame) -> pd.Series:
    year = pd.to_numeric(images["StudyDate"].where(images["StudyDate"].str.fullmatch(r"\d{8}")).str[:4],
                         errors="coerce")
    age = (pd.to_numeric(images["anchor_age"], errors="coerce") + year
           - pd.to_numeric(images["anchor_year"], errors="coerce"))
    return _age_text(age)


def _age_text(age: pd.Series) -> pd.Series:
    """Ages as written in a manifest: 63 or 63.5; empty when unknown or implausible (outside 0–120)."""
    known = age.notna() & age.between(0, MAX_AGE)
    return age.where(known).map(lambda a: "" if pd.isna(a) else f"{a:g}")


def _age_note(manifest: pd.DataFrame, why: str) -> list[str]:
    blank = int((manifest["age"] == "").sum())
    return [f"age empty for {blank} image(s) ({why})"] if blank else []


def _demographics_per_subject(path: Path) -> pd.DataFrame:
    """subject_id → race and insurance: the most frequent known value over the subject's admissions (see the
    module for ties). MIMIC-IV before v2.0 calls race ``ethnicity``."""
    what = "MIMIC-IV admissions.csv"
    rows = _read_table(path, what, ("subject_id",))
    race = "ethnicity" if "ethnicity" in rows.columns and "race" not in rows.columns else "race"
    _require_columns(rows, path, what, ("subject_id", race, "insurance"))
    rows = rows.rename(columns={race: "race"})
    rows["when"] = rows["admittime"] if "admittime" in rows.columns else ""
    result = {}
    for column in ("race", "insurance"):
        known = rows[~rows[column].str.upper().isin(UNKNOWN_DEMOGRAPHIC)]
        votes = known.groupby(["subject_id", column]).agg(n=("when", "size"), latest=("when", "max")).reset_index()
        votes = votes.sort_values(["subject_id", "n", "latest", column], ascending=[True, False, False, True])
        result[column] = votes.drop_duplicates("subject_id").set_index("subject_id")[column]
    return pd.DataFrame(result)


# --- writing -------------------------------------------------------------------------------------------

def _check_output(out: Path, force: bool) -> Path:
    out = Path(out)
    if out.is_dir():
        raise OutputError(f"{out} is a folder; give --out the path of the manifest CSV to write")
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists; choose another --out or pass --force to replace it")
    return out


def _manifest_prefix(images_root: Path, folder: Path) -> str:
    """How the manifest names ``images_root``: relative to the manifest's folder (which the loader reads paths
    against), or absolute when there is no relative path (another drive on Windows)."""
    root = os.path.abspath(images_root)
    try:
        return Path(os.path.relpath(root, os.path.abspath(folder))).as_posix()
    except ValueError:
        return Path(root).as_posix()


def _write(manifest: pd.DataFrame, out: Path, images_root: Path, source: Path, tally: _Tally,
           unused: list[tuple[int, str]], notes: list[str]) -> ImportedManifest:
    """Names the images from ``images_root``, writes the CSV atomically and counts the image files there."""
    if manifest.empty:
        reasons = "; ".join(f"{n} {why}" for n, why in tally.left_out) or "the input has no rows"
        raise DataError(f"{source}: no image is left to write a manifest of (left out: {reasons})")
    within_root = manifest["image_path"]
    found = sum(os.path.exists(os.path.join(images_root, p)) for p in within_root)
    prefix = _manifest_prefix(images_root, out.parent)
    manifest["image_path"] = within_root if prefix == "." else prefix + "/" + within_root
    write_beside_and_rename(out, lambda partial: manifest.to_csv(partial, index=False),
                            lambda exc: f"{out}: cannot write ({exc.strerror or exc}); free disk space or choose "
                                        "another --out")
    return ImportedManifest(manifest=out, images=len(manifest), patients=int(manifest["patient_id"].nunique()),
                            images_root=images_root, images_found=int(found), left_out=tally.left_out,
                            unused=unused, notes=notes)
