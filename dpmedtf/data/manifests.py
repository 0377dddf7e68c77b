"""Manifests: the CSV a user brings, validated into a cohort with labels, subgroups and splits.

Radiograph manifest: ``image_path`` (relative to the CSV), ``patient_id``, ``sex``, ``age``, one
column per finding with its grade (name or 0–4), optional ``split``. CT manifest: ``volume_path``
(NIfTI file or DICOM series folder), ``patient_id``, ``sex``, ``age``, ``label`` (0/1), optional
``split``. Every problem is reported with the CSV file, its line number and what to do; nothing is
dropped. Without a ``split`` column the split is made patient-wise here.

The file is read as UTF-8, comma-separated. Reserved column names (those above, and ``synthetic``) are
matched case-insensitively: a column ``Split`` or ``Patient_ID`` means what it says, since ignoring it
(and, for ``Split``, silently redoing the split) would be the worse mistake. A column named twice, a
file listed twice (after resolving ``..`` and symbolic links), another encoding (named with its line)
and a ``;``- or tab-separated file (with a hint) are refused.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from dpmedtf.data import attributes, label_sets
from dpmedtf.data import labels as L
from dpmedtf.data.attributes import FairnessSpec
from dpmedtf.data.label_sets import LabelSet
from dpmedtf.errors import DataError

Modality = Literal["radiograph", "volume"]
PATH_COLUMN = {"radiograph": "image_path", "volume": "volume_path"}
RESERVED_COLUMNS = frozenset({*PATH_COLUMN.values(), "patient_id", "sex", "age", "label", "split", "synthetic",
                              *L.FINDINGS})
MAX_LISTED_PROBLEMS = 20
_OTHER_SEPARATORS = {";": "semicolons (;)", "\t": "tabs", "|": "vertical bars (|)"}


@dataclass(frozen=True)
class Cohort:
    """A validated manifest. ``frame`` has one row per image (or volume) with absolute ``path`` (``..`` and
    symbolic links resolved), ``manifest_path`` (as the CSV wrote it), ``patient_id``, ``sex``, ``age``
    (NaN when unknown), ``age_group``, ``split``, a column per sensitive attribute holding its group, one
    label column per finding (1.0, 0.0, or NaN where the label set ignores the entry), and ``line`` (the
    CSV line the row came from)."""

    frame: pd.DataFrame
    modality: Modality
    label_names: tuple[str, ...]
    source: Path
    synthetic: bool = False
    """True when the manifest marks every row synthetic (the demo cohort): reports must say so."""
    split_stratified_on_labels: bool = False
    """True when dpmedtf made the split (stratified on the labels), False when the manifest gave it."""
    label_set: LabelSet | None = None
    """How the manifest's cells became the labels (the job's ``labels:``; the modality's preset when None)."""
    fairness: FairnessSpec | None = None
    """The attributes (columns of ``frame``) and intersections the fairness audit groups by (the paper's when None)."""

    def __post_init__(self):
        # Filled here once, so every reader of a cohort has both without a fallback of its own.
        if self.label_set is None:
            object.__setattr__(self, "label_set", label_sets.preset(label_sets.default_preset(self.modality)))
        if self.fairness is None:
            object.__setattr__(self, "fairness", attributes.default_spec(self.modality))

    def split(self, name: str) -> pd.DataFrame:
        return self.frame[self.frame["split"] == name]

    def labels(self, rows: pd.DataFrame | None = None) -> np.ndarray:
        """(n, L) float32: 1, 0, or NaN for an entry that is not observed (ignored)."""
        rows = self.frame if rows is None else rows
        return rows[list(self.label_names)].to_numpy(np.float32)

    def where(self, index: int) -> str:
        """'manifest.csv line 7 (path/to/file)': how messages name a row."""
        row = self.frame.loc[index]
        return f"{self.source} line {row['line']} ({row['path']})"


def load_manifest(path: str | Path, modality: Modality, split_fractions=(0.7, 0.1, 0.2),
                  split_seed: int = 0, *, label_set: LabelSet | None = None,
                  fairness: FairnessSpec | None = None) -> Cohort:
    """Reads and validates a manifest; splits patient-wise when it has no ``split`` column. ``label_set``
    and ``fairness`` default to the modality's (UKA-CXR's graded findings or one binary label; sex, age)."""
    path = Path(path)
    label_set = label_set or label_sets.preset(label_sets.default_preset(modality))
    fairness = fairness or attributes.default_spec(modality)
    extra_columns = [a.column for a in fairness.attributes if a.column not in ("sex", "age")]
    header, rows = _read_csv(path, expected=(*label_set.columns, *extra_columns))
    required = [PATH_COLUMN[modality], "patient_id", "sex", "age", *label_set.columns]
    missing = [c for c in required if c not in header]
    if missing:
        other = next((m for m, column in PATH_COLUMN.items() if m != modality and column in header), None)
        hint = (f" (its {PATH_COLUMN[other]} column makes it a {other} manifest: set data.modality: {other})"
                if other else "")
        looks_chexpert = sum(c.lower() in {h.lower() for h in header} for c in label_sets.CHEXPERT_COLUMNS) >= 7
        labels_hint = ("" if not any(c in label_set.columns for c in missing) else
                       f"; the findings are those of the label set {label_set.name!r}" +
                       ("; its header has the CheXpert observations: set labels: chexpert in the job (or --labels "
                        "chexpert)" if looks_chexpert and label_set.name != "chexpert" else
                        " (set labels: in the job for another)"))
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; a {modality} manifest needs "
                        f"{', '.join(required)} and optionally split{hint}{labels_hint}")
    absent = [c for c in extra_columns if c not in header]
    if absent:
        raise DataError(f"{path}: fairness.attributes names column(s) {', '.join(absent)}, which the manifest does "
                        f"not have (its columns: {', '.join(header)}); add the column or remove the attribute")
    if not rows:
        raise DataError(f"{path}: the manifest has no rows")
    width_problems = [f"line {line}: {len(values)} field(s) where the header has {len(header)} (a missing or "
                      "extra comma, or a value with a comma that is not in quotes?)"
                      for line, values in rows if len(values) != len(header)]
    _raise_problems(path, width_problems, "fix these rows")
    raw = pd.DataFrame([values for _, values in rows], columns=header, dtype=str)
    lines = [line for line, _ in rows]
    numeric = {a.column: a for a in fairness.attributes if a.numeric and a.column != "age"}
    required_columns = {a.column for a in fairness.attributes if a.required}

    problems: list[str] = []
    records = []
    for line, row in zip(lines, raw.to_dict("records")):
        record = {"line": line}
        try:
            rel = row[PATH_COLUMN[modality]].strip()
            if not rel:
                raise ValueError(f"empty {PATH_COLUMN[modality]}")
            record["path"] = _normalised(path.parent, rel)
            record["manifest_path"] = rel
            record["patient_id"] = row["patient_id"].strip()
            if not record["patient_id"]:
                raise ValueError("empty patient_id")
            record["sex"] = attributes.parse_sex(row["sex"])
            record["age"] = float("nan") if attributes.is_missing(row["age"]) else L.parse_age(row["age"])
            for column in extra_columns:
                record[column] = (attributes.parse_number(numeric[column], row[column]) if column in numeric
                                  else row[column])
            for column in required_columns:
                if attributes.is_missing(row[column]) or (column == "sex" and record["sex"] == attributes.UNKNOWN):
                    raise ValueError(f"{column} {row[column]!r} is missing or not recognised, and fairness.attributes "
                                     f"marks {column} required")
            for finding in label_set.findings:
                record[finding.name] = finding.parse(row[finding.column])
            if "split" in raw.columns:
                record["split"] = L.parse_split(row["split"])
        except ValueError as exc:
            problems.append(f"line {line}: {exc}")
            continue
        records.append(record)
    _raise_problems(path, problems, "fix these rows")

    frame = pd.DataFrame.from_records(records)
    duplicated = frame[frame.duplicated("path", keep=False)]
    if not duplicated.empty:
        same = duplicated[duplicated["path"] == duplicated.iloc[0]["path"]]
        written = sorted(set(same["manifest_path"]))
        how = f" (written as {', '.join(map(repr, written))})" if len(written) > 1 else ""
        raise DataError(f"{path}: line(s) {', '.join(map(str, same['line']))} name the same file "
                        f"{same.iloc[0]['path']}{how}; each file may appear once: remove the repeated rows")
    _check_patients_consistent(path, frame)
    if "split" in frame.columns:
        _check_patient_in_one_split(path, frame)
    else:
        frame["split"] = patient_wise_split(frame, label_set.names, split_fractions, split_seed)
    if "age_group" not in fairness.attribute_names:  # predictions.csv always carries the default age groups
        frame["age_group"] = attributes.groups_of(attributes.attribute("age", modality=modality), frame["age"])
    for attribute_ in fairness.attributes:
        frame[attribute_.name] = attributes.groups_of(attribute_, frame[attribute_.column])
    synthetic = "synthetic" in raw.columns and raw["synthetic"].str.strip().str.lower().eq("true").all()
    return Cohort(frame.reset_index(drop=True), modality, label_set.names, path, bool(synthetic),
                  split_stratified_on_labels="split" not in raw.columns, label_set=label_set, fairness=fairness)


def _require_file(path: Path) -> None:
    if path.is_dir():
        raise DataError(f"{path}: is a directory; give the path of the manifest CSV file inside it")
    if not path.is_file():
        raise DataError(f"{path}: manifest not found; give the path of the CSV file")


def _normalised(folder: Path, written: str) -> str:
    """The absolute path a manifest entry names, ``..`` and symbolic links resolved (so one file is one path)."""
    target = Path(written) if Path(written).is_absolute() else folder / written
    try:
        return str(target.resolve())
    except (OSError, RuntimeError):  # a symbolic-link loop: the file check names it later
        return os.path.normpath(os.path.abspath(target))


def _read_csv(path: Path, expected: tuple[str, ...] = ()) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and the non-blank rows with the line each starts on. Reserved names, and the ``expected``
    columns of the job's label set and attributes, are matched regardless of capitals and spelled as expected."""
    _require_file(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read the manifest ({exc.strerror or exc})") from None
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise DataError(f"{path}: not a readable CSV manifest: it is UTF-16 text (Excel's 'Unicode Text'); save it "
                        "as UTF-8 CSV (Excel: 'CSV UTF-8 (Comma delimited)')")
    if b"\0" in data:
        line = data[:data.index(b"\0")].count(b"\n") + 1
        raise DataError(f"{path}: not a readable CSV manifest: it holds binary data (NUL bytes at line {line}); is it "
                        "an image or a spreadsheet? Export the manifest as CSV")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        line = data[:exc.start].count(b"\n") + 1
        try:
            data.decode("cp1252")
            guess = " It looks like Latin-1/Windows-1252 text (e.g. Excel's plain 'CSV' export)."
        except UnicodeDecodeError:
            guess = ""
        raise DataError(f"{path} line {line}: not a readable CSV manifest: byte 0x{data[exc.start]:02X} at column "
                        f"{exc.start - line_start + 1} is not UTF-8.{guess} Save the manifest as UTF-8 (Excel: "
                        "'CSV UTF-8 (Comma delimited)')") from None
    reader = csv.reader(io.StringIO(text, newline=""), skipinitialspace=True)
    records, line = [], 1
    try:
        for values in reader:
            if any(value.strip() for value in values):  # blank lines and rows of empty cells carry no data
                records.append((line, values))
            line = reader.line_num + 1
    except csv.Error as exc:
        raise DataError(f"{path} line {reader.line_num}: not a readable CSV manifest ({exc})") from None
    if not records:
        raise DataError(f"{path}: not a readable CSV manifest: the file has no header line (it is empty)")
    (header_line, fields), rows = records[0], records[1:]
    spelling = {**{c: c for c in RESERVED_COLUMNS}, **{c.lower(): c for c in expected}}
    header = [_column_name(field, spelling) or f"unnamed column {index}" for index, field in enumerate(fields, start=1)]
    _check_separator(path, header_line, header)
    _check_duplicate_columns(path, header_line, header, set(spelling.values()))
    return header, rows


def _column_name(field: str, spelling: dict[str, str] | None = None) -> str:
    name = field.strip()
    return (spelling or {c: c for c in RESERVED_COLUMNS}).get(name.lower(), name)


def _check_separator(path: Path, line: int, header: list[str]) -> None:
    if len(header) > 1 and RESERVED_COLUMNS & set(header):
        return
    joined = ",".join(header)
    for separator, name in _OTHER_SEPARATORS.items():
        columns = [_column_name(part) for part in joined.split(separator)]
        if len(columns) > 1 and RESERVED_COLUMNS & set(columns):
            raise DataError(f"{path} line {line}: the header is separated by {name} ({joined[:60]!r}…), but a "
                            "manifest is comma-separated; save it as comma-separated CSV (Excel: 'CSV UTF-8 (Comma "
                            "delimited)'), or replace the separators")


def _check_duplicate_columns(path: Path, line: int, header: list[str], known: set[str]) -> None:
    positions: dict[str, list[int]] = {}
    for index, name in enumerate(header, start=1):
        if not name.startswith("unnamed column "):  # empty names (trailing commas) carry nothing
            positions.setdefault(name.lower() if name in known else name, []).append(index)
    repeated = {name: where for name, where in positions.items() if len(where) > 1}
    if repeated:
        listed = "; ".join(f"{name!r} in columns {', '.join(map(str, where))}" for name, where in repeated.items())
        raise DataError(f"{path} line {line}: the header names a column more than once ({listed}); which one holds "
                        "the data is ambiguous, so keep one of each (reserved names such as split or age count "
                        "regardless of capitals)")


def detect_modality(path: str | Path) -> Modality:
    """'radiograph' or 'volume', from the manifest's path column."""
    columns, _ = _read_csv(Path(path))
    for modality, column in PATH_COLUMN.items():
        if column in columns:
            return modality
    raise DataError(f"{path}: has neither an image_path (radiographs) nor a volume_path (CT) column")


def _exists(path: str) -> bool:
    """Whether a manifest's file is there; True when that cannot be known (``Path.exists`` raises PermissionError
    for a folder on the way that may not be searched): preparing the row then names the real problem."""
    try:
        return Path(path).exists()
    except OSError:
        return True


def check_files_exist(cohort: Cohort) -> None:
    """DataError listing every row whose image or volume does not exist (checked before any decoding)."""
    missing = [f"line {row.line}: {row.path} not found" for row in cohort.frame.itertuples()
               if not _exists(row.path)]
    column = PATH_COLUMN[cohort.modality]
    _raise_problems(cohort.source, missing, f"fix {column} (relative paths are relative to the CSV's folder), "
                                            "remove the rows, or set data.skip_bad: true to quarantine them")


def require_split(cohort: Cohort, split: str, needed_for: str) -> None:
    """DataError unless ``split`` has at least one row; says where the rows went and how to fix it."""
    if (cohort.frame["split"] == split).any():
        return
    counts = cohort.frame["split"].value_counts()
    where = ", ".join(f"{n} in {name}" for name, n in counts.items()) or "none"
    fix = (f"put some patients' rows in split {split} in the manifest's split column"
           if not cohort.split_stratified_on_labels
           else f"add patients to the manifest or raise the {split} share of data.split_fractions")
    raise DataError(f"{cohort.source}: the {split} split is empty (rows: {where}), but {needed_for} needs it; {fix}")


def _raise_problems(path: Path, problems: list[str], what_to_do: str) -> None:
    if not problems:
        return
    shown = problems[:MAX_LISTED_PROBLEMS]
    more = f"\n  … and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
    raise DataError(f"{path}: {len(problems)} invalid row(s); {what_to_do}:\n  " + "\n  ".join(shown) + more)


def _check_patients_consistent(path: Path, frame: pd.DataFrame) -> None:
    # One patient, one sex: a conflict means two patients share an ID (or a data-entry error). A row whose
    # sex is unknown conflicts with none.
    known = frame[frame["sex"] != attributes.UNKNOWN]
    sexes = known.groupby("patient_id")["sex"].nunique()
    for patient in sexes[sexes > 1].index[:1]:
        lines = frame.loc[frame["patient_id"] == patient, "line"].tolist()
        raise DataError(f"{path}: patient {patient!r} has different sex values on lines {lines}; "
                        "correct the rows or give the patients distinct IDs")


def _check_patient_in_one_split(path: Path, frame: pd.DataFrame) -> None:
    splits = frame.groupby("patient_id")["split"].nunique()
    leaking = splits[splits > 1].index.tolist()
    if leaking:
        patient = leaking[0]
        rows = frame[frame["patient_id"] == patient]
        where = ", ".join(f"line {r.line} → {r.split}" for r in rows.itertuples())
        raise DataError(f"{path}: patient {patient!r} is in more than one split ({where}); a patient's images "
                        f"must all be in one split, or the test set leaks training patients "
                        f"({len(leaking)} patient(s) affected)")


def patient_wise_split(frame: pd.DataFrame, label_names, fractions=(0.7, 0.1, 0.2), seed: int = 0) -> pd.Series:
    """Assigns whole patients to train/validation/test by iterative stratification (Sechidis et al.
    2011) at patient level: the label with the fewest unplaced positive patients goes first, each of
    its patients to the split that still wants most of that label's positives (ties: most images
    still wanted, then chance). Deterministic by seed; image counts and prevalences follow the fractions."""
    fractions = np.asarray(fractions, dtype=float)
    grouped = frame.groupby("patient_id", sort=True)
    positives = grouped[list(label_names)].sum().to_numpy(float)
    images = grouped.size().to_numpy(float)
    patients = grouped.size().index
    rng = np.random.default_rng(seed)
    wanted_labels = fractions[:, None] * positives.sum(axis=0)[None, :]
    wanted_images = fractions * images.sum()
    allowed = fractions > 0
    assignment = np.full(len(patients), -1)
    tiebreak = rng.random(len(patients))

    def place(p: int, label: int | None) -> None:
        need = wanted_labels[:, label] if label is not None else np.zeros(3)
        keys = np.lexsort((rng.random(3), -wanted_images, -need))  # primary key last
        s = next(int(k) for k in keys if allowed[k])
        assignment[p] = s
        wanted_labels[s] -= positives[p]
        wanted_images[s] -= images[p]

    while True:
        unplaced = assignment < 0
        carrying = (positives[unplaced] > 0).sum(axis=0)
        if not carrying.any():
            break
        label = int(np.argmin(np.where(carrying > 0, carrying, np.inf)))
        for p in np.flatnonzero(unplaced & (positives[:, label] > 0))[np.argsort(tiebreak[unplaced & (positives[:, label] > 0)])]:
            place(int(p), label)
    for p in np.flatnonzero(assignment < 0)[np.argsort(tiebreak[assignment < 0])]:
        place(int(p), None)
    split_of_patient = dict(zip(patients, np.asarray(L.SPLITS)[assignment]))
    return frame["patient_id"].map(split_of_patient)


def cohort_table(cohort: Cohort, quarantined: pd.DataFrame | None = None) -> pd.DataFrame:
    """Counts per split like the paper's Table 1: images, patients, sex, age group, positives per label."""
    f = cohort.frame
    columns = {}
    for split in (*L.SPLITS, "total"):
        part = f if split == "total" else f[f["split"] == split]
        col = {"images": len(part), "patients": part["patient_id"].nunique()}
        for sex in sorted({*L.SEXES, *f["sex"].unique()}, key=attributes.group_order_key):
            col[f"sex {sex}"] = int((part["sex"] == sex).sum())
        for group in sorted(f["age_group"].unique(), key=attributes.group_order_key):
            col[f"age {group}"] = int((part["age_group"] == group).sum())
        col["age mean ± sd"] = f"{part['age'].mean():.1f} ± {part['age'].std(ddof=0):.1f}" if part["age"].notna().any() else "-"
        for attribute_ in cohort.fairness.attributes:
            if attribute_.name not in ("sex", "age_group"):
                for group in sorted(f[attribute_.name].unique(), key=attributes.group_order_key):
                    col[f"{attribute_.name} {group}"] = int((part[attribute_.name] == group).sum())
        for name in cohort.label_names:
            col[f"{name} positive"] = int(np.nansum(part[name].to_numpy(float)))
            if cohort.label_set.may_ignore:
                col[f"{name} not observed"] = int(part[name].isna().sum())
        if quarantined is not None:
            col["quarantined (skipped)"] = len(quarantined) if split == "total" else int(
                (quarantined.get("split", pd.Series(dtype=str)) == split).sum())
        columns[split] = col
    return pd.DataFrame(columns)
