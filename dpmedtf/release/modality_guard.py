"""Refusing inputs whose headers say they are not what the model was trained on.

Preprocessing turns almost any image into a valid model input: a CT slice given to a chest-radiograph
model is resized and equalised like a radiograph and gets confident, meaningless probabilities. The
headers say what an input is, so ``predict`` compares them with the bundle's ``expected_input``
(``metadata.json``) before preprocessing and refuses a mismatch unless the user overrides it, and the
override is recorded per input in the output (``modality_check``).

Only what a header states is judged (a missing field is no mismatch); files whose header cannot be read
are left to preprocessing, which names the problem. PNG and JPEG carry no header: they are accepted and
recorded as such. No TensorFlow here: this runs in the consumer install.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from dpmedtf.data import radiograph_files, volume
from dpmedtf.data.radiograph_files import _JPEG_MAGIC, _PNG_MAGIC
from dpmedtf.errors import DataError

OVERRIDE_FLAG = "--allow-modality-mismatch"
OK = "ok"
# The modalities training accepts by default (data.accept_modalities) are the ones predict expects.
# Chest radiographs arrive as CR or DX; BodyPartExamined is free text in practice, and German and other
# European sites commonly write THORAX where US sites write CHEST.
RADIOGRAPH_EXPECTED_INPUT = {"dicom_modalities": list(radiograph_files.DEFAULT_ACCEPTED_MODALITIES),
                             "photometric_interpretations": ["MONOCHROME1", "MONOCHROME2"],
                             "frames": 1, "body_parts": ["CHEST", "THORAX"]}
VOLUME_EXPECTED_INPUT = {"dicom_modalities": list(volume.DEFAULT_ACCEPTED_MODALITIES), "dimensions": 3}
_NIFTI_SUFFIXES = (".nii", ".nii.gz")


def default_expected_input(modality: str) -> dict:
    """What a bundle of this preprocessing modality (``radiograph`` or ``volume``) takes."""
    defaults = {"radiograph": RADIOGRAPH_EXPECTED_INPUT, "volume": VOLUME_EXPECTED_INPUT}.get(modality)
    if defaults is not None:  # a copy: callers may change theirs
        return {key: (list(value) if isinstance(value, list) else value) for key, value in defaults.items()}
    raise DataError(f"unknown preprocessing modality {modality!r}; expected 'radiograph' or 'volume'")


def expected_input_of(metadata: Mapping) -> dict:
    """The bundle's ``expected_input``; bundles released before it existed get their modality's default."""
    stated = metadata.get("expected_input")
    if isinstance(stated, dict) and stated:
        return dict(stated)
    return default_expected_input(metadata["preprocessing"]["modality"])


@dataclass(frozen=True)
class InputCheck:
    """What one input's header says compared with what the model expects."""

    input: str
    header: str
    """"DICOM", "DICOM series", "NIfTI", "PNG", "JPEG", or "unread" (left to preprocessing)."""
    mismatches: tuple[str, ...] = ()
    """One per disagreeing field, e.g. "Modality CT, expected CR/DX"."""

    @property
    def matches(self) -> bool:
        return not self.mismatches

    def record(self) -> str:
        """The ``modality_check`` value written for this input (after any override was allowed)."""
        if self.mismatches:
            return "overridden: " + "; ".join(self.mismatches)
        if self.header in ("PNG", "JPEG"):
            return f"no header ({self.header})"
        if self.header == "unread":
            return "not checked (header unreadable)"
        return OK


def check_input(path: str | os.PathLike, expected: Mapping, modality: str) -> InputCheck:
    """Compares one input's header with ``expected`` (an ``expected_input`` mapping)."""
    path = Path(path)
    if modality == "volume":
        if path.is_dir():
            return _check_series(path, expected)
        if path.name.lower().endswith(_NIFTI_SUFFIXES):
            return _check_nifti(path, expected)
        return InputCheck(str(path), "unread")  # preprocessing refuses anything else, naming it
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return InputCheck(str(path), "unread")
    if head.startswith(_PNG_MAGIC):
        return InputCheck(str(path), "PNG")
    if head.startswith(_JPEG_MAGIC):
        return InputCheck(str(path), "JPEG")
    dataset = _dicom_header(path, has_preamble=head[128:132] == b"DICM")
    if dataset is None:
        return InputCheck(str(path), "unread")
    return InputCheck(str(path), "DICOM", tuple(_dicom_mismatches(dataset, expected)))


def check_inputs(inputs: Sequence[str | os.PathLike], expected: Mapping, modality: str,
                 allow_mismatch: bool = False) -> list[InputCheck]:
    """Every input's check, in order; DataError naming each mismatching input unless ``allow_mismatch``."""
    checks = [check_input(path, expected, modality) for path in inputs]
    refused = [check for check in checks if not check.matches]
    if refused and not allow_mismatch:
        listed = "; ".join(f"{c.input}: its {c.header} header says " + ", ".join(c.mismatches) for c in refused[:5])
        more = f"; and {len(refused) - 5} more" if len(refused) > 5 else ""
        raise DataError(f"{len(refused)} input(s) are not what this model was trained on ({describe(expected)}): "
                        f"{listed}{more}. Check the inputs; to predict anyway, pass {OVERRIDE_FLAG} "
                        "(allow_modality_mismatch=True in Python), which is recorded per input in the output")
    return checks


def describe(expected: Mapping) -> str:
    parts = []
    if expected.get("dicom_modalities"):
        parts.append("DICOM Modality " + "/".join(expected["dicom_modalities"]))
    if expected.get("photometric_interpretations"):
        parts.append("/".join(expected["photometric_interpretations"]))
    if expected.get("frames"):
        parts.append(f"{expected['frames']} frame")
    if expected.get("body_parts"):
        parts.append("body part " + "/".join(expected["body_parts"]))
    if expected.get("dimensions"):
        parts.append(f"{expected['dimensions']}-D volumes")
    return ", ".join(parts) or "no stated input"


def _dicom_header(path: Path, has_preamble: bool):
    import pydicom

    try:
        return pydicom.dcmread(path, stop_before_pixels=True, force=not has_preamble)
    except Exception:  # a damaged file: preprocessing reports it with the reason
        return None


def _text(dataset, keyword: str) -> str | None:
    try:
        value = dataset.get(keyword)
    except Exception:  # a damaged element raises on access; it states nothing
        return None
    text = str(value).strip() if value is not None else ""
    return text or None


def _dicom_mismatches(dataset, expected: Mapping) -> list[str]:
    mismatches = []
    for keyword, allowed in (("Modality", expected.get("dicom_modalities")),
                             ("PhotometricInterpretation", expected.get("photometric_interpretations")),
                             ("BodyPartExamined", expected.get("body_parts"))):
        value = _text(dataset, keyword)
        if allowed and value is not None and value.upper() not in {a.upper() for a in allowed}:
            mismatches.append(f"{keyword} {value}, expected {'/'.join(allowed)}")
    frames = _text(dataset, "NumberOfFrames")
    if expected.get("frames") and frames is not None and frames.isdigit() and int(frames) != int(expected["frames"]):
        mismatches.append(f"NumberOfFrames {frames}, expected {expected['frames']}")
    return mismatches


def _check_series(folder: Path, expected: Mapping) -> InputCheck:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    modalities: dict[str, str] = {}  # value → first file that states it
    read = 0
    for file in files:
        dataset = _dicom_header(file, has_preamble=_has_preamble(file))
        if dataset is None:
            continue
        read += 1
        value = _text(dataset, "Modality")
        if value is not None:
            modalities.setdefault(value.upper(), file.name)
    if not read:
        return InputCheck(str(folder), "unread")
    allowed = expected.get("dicom_modalities")
    wrong = sorted(m for m in modalities if allowed and m not in {a.upper() for a in allowed})
    return InputCheck(str(folder), "DICOM series",
                      tuple(f"Modality {m} (e.g. {modalities[m]}), expected {'/'.join(allowed)}" for m in wrong))


def _has_preamble(file: Path) -> bool:
    try:
        with open(file, "rb") as handle:
            return handle.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _check_nifti(path: Path, expected: Mapping) -> InputCheck:
    import nibabel as nib

    try:
        shape = tuple(int(s) for s in nib.load(str(path)).shape)
    except Exception:  # not a readable NIfTI: preprocessing says why
        return InputCheck(str(path), "unread")
    dimensions = len(shape) - 1 if len(shape) == 4 and shape[3] == 1 else len(shape)  # as preprocessing reads it
    wanted = expected.get("dimensions")
    if wanted and dimensions != int(wanted):
        return InputCheck(str(path), "NIfTI", (f"{dimensions} dimensions {shape}, expected {wanted}",))
    return InputCheck(str(path), "NIfTI")
