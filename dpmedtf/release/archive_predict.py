"""Predict on studies in a hospital's archive (DICOMweb) and give the results back as DICOM SR.

The path of a study: QIDO-RS lists its instances → the images are retrieved (WADO-RS) into a local folder
→ ``predict_files`` checks each header against the bundle's modality guard, preprocesses exactly as in
training and runs the model → one Comprehensive SR per study (``structured_report``) → written to a
folder and/or stored back (STOW-RS).

Nothing half-done reaches the archive: every study is retrieved and every input predicted before the
first report is built, and a report is stored only when the reports of all studies were built. Instances
that are not images (an earlier SR, a key-object note, a presentation state) are skipped and counted,
never silently. A model whose signer was not verified (``--integrity-only``) may not store.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd

from dpmedtf.data.dicomweb import UID_COLUMNS, ArchiveError, DicomwebArchive, InstanceRef
from dpmedtf.errors import DataError
from dpmedtf.release import structured_report
from dpmedtf.release.predict import LoadedBundle, predict_files


@dataclass(frozen=True, kw_only=True)
class ArchiveSelection:
    """Which studies to predict on: UIDs, series (their study found by QIDO-RS), or a query."""

    studies: Sequence[str] = ()
    series: Sequence[str] = ()
    study_date: str | None = None
    """A DICOM date range such as ``20240101-20240131`` (with ``modality``, a query over the archive)."""
    modality: str | None = None

    @property
    def is_query(self) -> bool:
        return bool(self.study_date or self.modality)

    def describe(self) -> str:
        parts = [f"{len(self.studies)} study UID(s)"] if self.studies else []
        parts += [f"{len(self.series)} series UID(s)"] if self.series else []
        if self.is_query:
            parts.append("studies with " + ", ".join(f"{key} {value}" for key, value in
                                                      (("date", self.study_date), ("modality", self.modality)) if value))
        return " and ".join(parts) or "nothing"


@dataclass
class ArchivePrediction:
    """What one run produced: the table (as ``predict`` writes it, with the UIDs), the SR per study, and
    what was skipped or stored."""

    frame: pd.DataFrame
    reports: dict = field(default_factory=dict)
    """Study UID → highdicom ComprehensiveSR."""
    skipped: list[InstanceRef] = field(default_factory=list)
    written: list[Path] = field(default_factory=list)
    stored: list[str] = field(default_factory=list)
    """Study UIDs whose report the archive accepted."""


def resolve_targets(archive: DicomwebArchive, selection: ArchiveSelection) -> list[tuple[str, str | None]]:
    """(study UID, series UID or None) pairs to retrieve, in a stable order, each once."""
    targets: list[tuple[str, str | None]] = [(uid.strip(), None) for uid in selection.studies if uid.strip()]
    targets += [(archive.study_of_series(uid.strip()), uid.strip()) for uid in selection.series if uid.strip()]
    if selection.is_query:
        found = archive.find_studies(study_date=selection.study_date, modality=selection.modality)
        if not found:
            raise ArchiveError(f"{archive.url}: no study matches {selection.describe()}; widen the query")
        targets += [(uid, None) for uid in found]
    if not targets:
        raise DataError("name the studies to predict on: --study UID, --series UID, or a query (--study-date, "
                        "--modality)")
    whole_studies = {study for study, series in targets if series is None}
    unique = list(dict.fromkeys((study, None if study in whole_studies else series) for study, series in targets))
    return unique


def predict_archive(bundle: LoadedBundle, archive: DicomwebArchive, selection: ArchiveSelection, *,
                    download_dir: str | os.PathLike | None = None, sr_out: str | os.PathLike | None = None,
                    store: bool = False, force: bool = False, allow_modality_mismatch: bool = False,
                    progress: Callable[[str, int, int], None] | None = None) -> ArchivePrediction:
    """Retrieve, predict, report; see the module. ``progress(stage, done, total)`` for long work.

    ``download_dir`` keeps the retrieved files (and lets an interrupted run resume); without it they live
    in a temporary folder that is removed at the end."""
    if store and not (bundle.signer and bundle.signer.verified):
        raise DataError("--store needs a model whose signer was verified (a publisher's key or the trust store); "
                        "results of a bundle checked only for integrity are not written into the archive")
    targets = resolve_targets(archive, selection)
    refs: list[InstanceRef] = []
    for study, series in targets:
        refs += archive.study_instances(study, series)
    images = [ref for ref in refs if ref.is_image]
    skipped = [ref for ref in refs if not ref.is_image]
    if not images:
        raise DataError(f"{archive.url}: {selection.describe()} hold(s) no images, only {len(skipped)} non-image "
                        f"instance(s) ({', '.join(sorted({r.modality or '?' for r in skipped}))}); nothing to predict on")
    if not allow_modality_mismatch:
        _refuse_other_modalities(archive, images, bundle.expected_input)
    with _download_folder(download_dir) as folder:
        paths = archive.download(images, folder, (lambda d, n: progress("retrieving", d, n)) if progress else None)
        inputs, sources = _inputs_of(bundle, images, paths)
        frame = predict_files(bundle, inputs, (lambda d, n: progress("preprocessing", d, n)) if progress else None,
                              allow_modality_mismatch=allow_modality_mismatch)
        # The source is the archive's address of the instance (or series), not the temporary copy.
        frame["input"] = [archive.address(refs_[0], series=len(refs_) > 1) for refs_ in sources]
        uids = {"study_uid": [refs_[0].study_uid for refs_ in sources],
                "series_uid": [refs_[0].series_uid for refs_ in sources],
                "sop_instance_uid": [refs_[0].sop_uid if len(refs_) == 1 else "" for refs_ in sources]}
        for position, column in enumerate(UID_COLUMNS, 1):
            frame.insert(position, column, uids[column])
        reports = _reports(bundle, frame, sources, {ref: _header(path) for ref, path in zip(images, paths)})
    result = ArchivePrediction(frame=frame, reports=reports, skipped=skipped)
    if sr_out is not None:
        result.written = [structured_report.write_report(report, sr_out, force) for report in reports.values()]
    if store:
        for study, report in reports.items():
            archive.store([report], f"the report of study {study}")
            result.stored.append(study)
    return result


def _refuse_other_modalities(archive: DicomwebArchive, images: list[InstanceRef], expected: dict) -> None:
    """Before retrieving anything: a series whose archive record gives a modality the model was not trained
    on is refused by its UIDs (the header check after retrieval still applies to what does come)."""
    allowed = {m.upper() for m in expected.get("dicom_modalities") or ()}
    if not allowed:
        return
    other = {(r.study_uid, r.series_uid, r.modality) for r in images if r.modality and r.modality.upper() not in allowed}
    if other:
        listed = "; ".join(f"series {series} of study {study} is {modality}" for study, series, modality in sorted(other))
        raise DataError(f"{archive.url}: {len(other)} series are not what this model was trained on (DICOM Modality "
                        f"{'/'.join(sorted(allowed))}): {listed}. Leave them out (--series), or pass "
                        "--allow-modality-mismatch to predict anyway (recorded per input)")


def _inputs_of(bundle: LoadedBundle, images: list[InstanceRef], paths: list[Path]):
    """The model's inputs and the instances behind each: one file per radiograph, one folder per CT series."""
    if bundle.modality == "radiograph":
        return paths, [[ref] for ref in images]
    by_series: dict[Path, list[InstanceRef]] = {}
    for ref, path in zip(images, paths):
        by_series.setdefault(path.parent, []).append(ref)
    return list(by_series), list(by_series.values())


def _header(path: Path):
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True)


def _reports(bundle: LoadedBundle, frame: pd.DataFrame, sources, header_of: dict) -> dict:
    by_study: dict[str, list] = {}
    for (_, row), refs in zip(frame.iterrows(), sources):
        result = structured_report.ImageResult(
            sources=[header_of[ref] for ref in refs],
            probabilities={name: float(row[f"{name}_prob"]) for name in bundle.labels},
            calls={name: int(row[f"{name}_label"]) for name in bundle.labels})
        by_study.setdefault(row["study_uid"], []).append(result)
    return {study: structured_report.build_report(metadata=bundle.metadata, certificate=bundle.certificate,
                                                  signer=bundle.signer, results=results)
            for study, results in by_study.items()}


@contextmanager
def _download_folder(download_dir):
    if download_dir is not None:
        Path(download_dir).mkdir(parents=True, exist_ok=True)
        yield Path(download_dir)
        return
    with tempfile.TemporaryDirectory(prefix="dpmedtf-archive-") as folder:
        yield Path(folder)
