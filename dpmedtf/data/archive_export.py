"""A training cohort exported from a hospital archive (DICOMweb) into local files and a manifest.

For each study: its instances are listed (QIDO-RS), the radiographs of the accepted modalities retrieved
(WADO-RS) under ``OUT/images/<study>/<series>/<sop>.dcm``, and one manifest row written per image with
``patient_id``, ``sex`` and ``age`` from the DICOM header (age from PatientAge, else from the birth and
study dates). The finding columns come from a labels CSV joined on the study UID or accession number;
without one they are left empty for the user to fill in. What is not exported (other modalities,
non-image instances) is listed in ``OUT/skipped.csv``; rows whose header lacks sex or age, and studies
without labels, are counted on the way out, so that nothing is dropped unseen.
"""

from __future__ import annotations

import csv
import datetime as _datetime
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from dpmedtf.data import labels as L
from dpmedtf.data.dicomweb import UID_COLUMNS, DicomwebArchive, InstanceRef
from dpmedtf.errors import DataError, OutputExistsError
from dpmedtf.files import write_beside_and_rename

MANIFEST_FILE = "manifest.csv"
SKIPPED_FILE = "skipped.csv"
IMAGES_FOLDER = "images"
JOIN_KEYS = ("study_uid", "accession_number")
ARCHIVE_COLUMNS = (*UID_COLUMNS, "accession_number")
DEFAULT_MODALITIES = ("CR", "DX")


@dataclass
class ExportedCohort:
    manifest: Path
    images: int = 0
    studies: int = 0
    skipped: list[tuple[InstanceRef, str]] = field(default_factory=list)
    unlabelled_studies: list[str] = field(default_factory=list)
    incomplete_demographics: list[str] = field(default_factory=list)
    """SOP instance UIDs whose header gives no usable sex or age (their cells are empty)."""
    unused_label_rows: int = 0


def read_study_list(path: str | os.PathLike) -> list[str]:
    """Study UIDs from a CSV with a ``study_uid`` (or ``StudyInstanceUID``) column; each once."""
    path = Path(path)
    rows = _read_rows(path)
    column = next((c for c in ("study_uid", "StudyInstanceUID") if c in (rows[0].keys() if rows else ())), None)
    if column is None:
        raise DataError(f"{path}: needs a study_uid column (one StudyInstanceUID per row)")
    uids, seen = [], set()
    for line, row in enumerate(rows, 2):
        uid = (row[column] or "").strip()
        if not uid:
            raise DataError(f"{path}: line {line}: empty {column}; give a StudyInstanceUID or remove the row")
        if uid not in seen:
            seen.add(uid)
            uids.append(uid)
    return uids


def export_manifest(archive: DicomwebArchive, studies: Sequence[str], out: str | os.PathLike, *,
                    labels_csv: str | os.PathLike | None = None, join_on: str = "study_uid",
                    accept_modalities: Sequence[str] = DEFAULT_MODALITIES, force: bool = False,
                    progress: Callable[[str, int, int], None] | None = None) -> ExportedCohort:
    """Retrieve the studies' radiographs into ``out`` and write ``out/manifest.csv``; see the module."""
    out = Path(out)
    manifest = out / MANIFEST_FILE
    if manifest.exists() and not force:
        raise OutputExistsError(f"{manifest} already exists; choose another --out or pass --force to replace it")
    if not studies:
        raise DataError("no studies to export; give --studies UIDS.csv or a query")
    label_rows = _read_labels(Path(labels_csv), join_on) if labels_csv is not None else None
    accepted = {m.upper() for m in accept_modalities}

    refs: list[InstanceRef] = []
    for done, study in enumerate(studies, 1):
        refs += archive.study_instances(study)
        if progress:
            progress("listing studies", done, len(studies))
    result = ExportedCohort(manifest=manifest, studies=len(studies))
    wanted = []
    for ref in refs:
        if not ref.is_image:
            result.skipped.append((ref, "not an image"))
        elif ref.modality.upper() not in accepted:
            result.skipped.append((ref, f"modality {ref.modality or '(none)'} not among {', '.join(sorted(accepted))}"))
        else:
            wanted.append(ref)
    if not wanted:
        raise DataError(f"{archive.url}: the {len(studies)} stud(ies) hold no images of modality "
                        f"{', '.join(sorted(accepted))}; widen --accept-modality if that is intended")
    paths = archive.download(wanted, out / IMAGES_FOLDER,
                             (lambda d, n: progress("retrieving", d, n)) if progress else None)

    rows, labelled = [], set()
    for ref, path in zip(wanted, paths):
        row = _row_of(ref, path, out)
        if not (row["sex"] and row["age"] != ""):
            result.incomplete_demographics.append(ref.sop_uid)
        key = row[join_on]
        if label_rows is not None and key in label_rows:
            row.update(label_rows[key])
            labelled.add(key)
        else:
            row.update({finding: "" for finding in L.FINDINGS})
            if label_rows is not None and ref.study_uid not in result.unlabelled_studies:
                result.unlabelled_studies.append(ref.study_uid)
        rows.append(row)
    if label_rows is not None:
        result.unused_label_rows = len(set(label_rows) - labelled)
    result.images = len(rows)
    _write_csv(manifest, ["image_path", "patient_id", "sex", "age", *L.FINDINGS, *ARCHIVE_COLUMNS], rows)
    _write_csv(out / SKIPPED_FILE, [*UID_COLUMNS, "modality", "reason"],
               [{"study_uid": r.study_uid, "series_uid": r.series_uid, "sop_instance_uid": r.sop_uid,
                 "modality": r.modality, "reason": reason} for r, reason in result.skipped])
    return result


def _row_of(ref: InstanceRef, path: Path, out: Path) -> dict:
    import pydicom

    header = pydicom.dcmread(path, stop_before_pixels=True)
    return {"image_path": path.relative_to(out).as_posix(), "patient_id": str(header.get("PatientID", "")).strip(),
            "sex": str(header.get("PatientSex", "")).strip(), "age": _age_of(header),
            "study_uid": ref.study_uid, "series_uid": ref.series_uid, "sop_instance_uid": ref.sop_uid,
            "accession_number": str(header.get("AccessionNumber", "")).strip()}


def age_in_years(patient_age: str | None, birth_date: str | None, study_date: str | None) -> float | None:
    """Age at the study: DICOM's PatientAge (``045Y``, ``006M``, ``003W``, ``010D``), else from the dates."""
    text = (patient_age or "").strip().upper()
    if len(text) == 4 and text[:3].isdigit() and text[3] in "YMWD":
        return round(int(text[:3]) / {"Y": 1, "M": 12, "W": 52.1775, "D": 365.25}[text[3]], 2)
    try:
        born = _datetime.datetime.strptime((birth_date or "").strip(), "%Y%m%d").date()
        seen = _datetime.datetime.strptime((study_date or "").strip(), "%Y%m%d").date()
    except ValueError:
        return None
    years = (seen - born).days / 365.25
    return round(years, 2) if years >= 0 else None


def _age_of(header) -> float | str:
    age = age_in_years(header.get("PatientAge"), header.get("PatientBirthDate"), header.get("StudyDate"))
    return "" if age is None else age


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with path.open(newline="", encoding="utf-8-sig") as handle:
        return list(csv.DictReader(handle))


def _read_labels(path: Path, join_on: str) -> dict[str, dict]:
    """Key → the finding columns of one labels row; every finding column must be there, each key once."""
    if join_on not in JOIN_KEYS:
        raise DataError(f"--join-on must be one of {', '.join(JOIN_KEYS)}, not {join_on!r}")
    rows = _read_rows(path)
    header = set(rows[0]) if rows else set()
    missing = [c for c in (join_on, *L.FINDINGS) if c not in header]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; a labels CSV has {join_on} and one "
                        f"column per finding ({', '.join(L.FINDINGS)})")
    labels: dict[str, dict] = {}
    for line, row in enumerate(rows, 2):
        key = (row[join_on] or "").strip()
        if not key:
            raise DataError(f"{path}: line {line}: empty {join_on}")
        if key in labels:
            raise DataError(f"{path}: line {line}: {join_on} {key} appears twice; keep one row per study")
        labels[key] = {finding: row[finding] for finding in L.FINDINGS}
    return labels


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    def write(partial: Path) -> None:
        with partial.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)

    write_beside_and_rename(path, write, lambda exc: f"{path}: cannot write ({exc.strerror or exc}); free disk "
                                                     "space or choose another --out")
