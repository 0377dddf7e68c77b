"""Consumers' side of a bundle: load it verified, preprocess files exactly as training did, run ONNX.

``load`` refuses a bundle that fails verification, so every prediction dpmedtf makes comes from a
model whose files, signature and certificate were checked first. Preprocessing (``preprocessing``, no
TensorFlow) is driven by the spec stored in the bundle and tested equal to the training pipeline's, so
the model sees at prediction time exactly what it saw in training.

``load`` needs the publisher's key (argument, ``DPMEDTF_PUBLIC_KEY`` or the trust store; see
``verify``), and before preprocessing ``predict_files`` checks each input's header against what the
model was trained on (``modality_guard``), refusing a CT slice given to a chest-radiograph model unless
the mismatch is explicitly allowed, in which case each row records it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

from dpmedtf.data.dicomweb import UID_COLUMNS
from dpmedtf.errors import DataError, OutputError, OutputExistsError
from dpmedtf.files import write_beside_and_rename
from dpmedtf.release import modality_guard, onnx_model
from dpmedtf.release.layout import CERTIFICATE_FILE, METADATA_FILE, MODEL_FILE
from dpmedtf.release.trust import TrustedKey
from dpmedtf.release.verify import BundleVerificationError, Signer, VerificationReport, verify_bundle

BATCH_SIZE = 8


@dataclass(frozen=True)
class LoadedBundle:
    """A verified bundle: an onnxruntime session plus what the consumer needs to use it correctly."""

    path: Path
    session: Any
    """onnxruntime.InferenceSession; input ``image``, output ``probabilities``."""
    metadata: dict
    certificate: dict
    verification: VerificationReport

    @property
    def labels(self) -> list[str]:
        return list(self.metadata["labels"])

    @property
    def thresholds(self) -> np.ndarray:
        return np.array([self.metadata["thresholds"][name] for name in self.labels])

    @property
    def modality(self) -> str:
        """``radiograph`` (one file per input) or ``volume`` (a NIfTI file or DICOM series folder)."""
        return self.metadata["preprocessing"]["modality"]

    @property
    def expected_input(self) -> dict:
        """What the inputs' headers must say (``metadata.json``'s ``expected_input``, or the modality's default)."""
        return modality_guard.expected_input_of(self.metadata)

    @property
    def signer(self) -> Signer | None:
        """Whose key the signature verified with; ``signer.verified`` is False for an integrity-only load."""
        return self.verification.signer

    def preprocess(self, path: str | os.PathLike) -> np.ndarray:
        """One file → the float32 model input (without the batch axis), by the bundle's spec.

        numpy/pydicom/Pillow code proven equal to the training pipeline (tests/release/test_preprocessing.py),
        so predicting needs no TensorFlow."""
        from dpmedtf.release.preprocessing import model_input

        return model_input(path, self.metadata)

    def probabilities(self, inputs: np.ndarray) -> np.ndarray:
        """Preprocessed inputs (N, …) → probabilities (N, labels)."""
        (output,) = self.session.run([onnx_model.OUTPUT_NAME], {onnx_model.INPUT_NAME: np.asarray(inputs, np.float32)})
        return output


def load(path: str | os.PathLike, public_key: str | os.PathLike | None = None, *,
         trusted_keys: Iterable[TrustedKey | str | os.PathLike] | None = None,
         integrity_only: bool = False) -> LoadedBundle:
    """The bundle at ``path``, verified (raises BundleVerificationError listing every failure).

    The signature must verify with the publisher's key: ``public_key``, else ``$DPMEDTF_PUBLIC_KEY``, else
    one of ``trusted_keys`` (default: the user's trust store, ``dpmedtf trust add``). ``integrity_only``
    accepts the key inside the bundle instead; ``signer.verified`` is then False."""
    path = Path(path)
    report = verify_bundle(path, public_key, trusted_keys=trusted_keys, integrity_only=integrity_only)
    if not report.ok:
        raise BundleVerificationError(report)
    metadata = json.loads((path / METADATA_FILE).read_text())
    certificate = json.loads((path / CERTIFICATE_FILE).read_text())
    return LoadedBundle(path, onnx_model.session((path / MODEL_FILE).read_bytes()), metadata, certificate, report)


def check_inputs_exist(inputs: Sequence[str | os.PathLike]) -> None:
    """DataError naming every input that does not exist: checked before the bundle is loaded and verified."""
    if not inputs:
        raise DataError("no inputs given; name the radiographs (or CT volumes) to predict on")
    missing = [str(path) for path in inputs if not Path(path).exists()]
    if missing:
        raise DataError(f"{len(missing)} input(s) not found: {', '.join(missing[:10])}"
                        + (" …" if len(missing) > 10 else "") + "; check the paths (nothing was predicted or written)")


def expand_inputs(bundle: LoadedBundle, inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """The inputs with each folder replaced by every file under it (sorted, recursive, hidden files and
    folders skipped) for a radiograph model; for a CT model a folder is one DICOM series and stays."""
    check_inputs_exist(inputs)
    if bundle.modality != "radiograph":
        return [Path(p) for p in inputs]
    expanded = []
    for path in map(Path, inputs):
        if not path.is_dir():
            expanded.append(path)
            continue
        files = sorted(p for p in path.rglob("*")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise DataError(f"{path}: folder holds no (non-hidden) files; give a folder of radiographs "
                            "(DICOM, PNG or JPEG) or the files themselves")
        expanded.extend(files)
    return expanded


def predict_files(bundle: LoadedBundle, inputs: Sequence[str | os.PathLike], progress=None,
                  save_inputs: str | os.PathLike | None = None, *,
                  allow_modality_mismatch: bool = False) -> pd.DataFrame:
    """One row per input: its path, per label ``<label>_prob`` and ``<label>_label`` (thresholded), and
    ``modality_check`` (see ``modality_guard``), then the model version and who signed it.

    For a radiograph model a folder stands for every file under it (``expand_inputs``). Before anything
    is preprocessed, each input's header is compared with what the model was trained on; a mismatch is
    a DataError naming the inputs unless ``allow_modality_mismatch``, and then the row says
    ``overridden: …``. Every input is preprocessed before any result is returned: one unreadable file
    stops the whole call with its name, rather than yielding a table silently missing a row.
    ``save_inputs`` writes each preprocessed input as raw little-endian float32 (``<n>.f32`` plus
    ``inputs.json`` with shapes), so any other ONNX runtime can be checked against these probabilities.
    """
    inputs = expand_inputs(bundle, inputs)
    checks = modality_guard.check_inputs(inputs, bundle.expected_input, bundle.modality, allow_modality_mismatch)
    arrays = []
    for done, path in enumerate(inputs, 1):
        arrays.append(bundle.preprocess(path))
        if progress:
            progress(done, len(inputs))
    stacked = np.stack(arrays)
    probabilities = np.concatenate([bundle.probabilities(stacked[i:i + BATCH_SIZE])
                                    for i in range(0, len(stacked), BATCH_SIZE)])
    frame = pd.DataFrame({"input": [str(p) for p in inputs]})
    for j, name in enumerate(bundle.labels):
        frame[f"{name}_prob"] = probabilities[:, j]
        frame[f"{name}_label"] = (probabilities[:, j] >= bundle.thresholds[j]).astype(int)
    frame["modality_check"] = [check.record() for check in checks]
    frame["model_version"] = bundle.metadata["model_version"]
    frame["trained_on_synthetic_data"] = bool(bundle.metadata.get("synthetic_data"))
    signer = bundle.signer
    frame["signer_fingerprint"] = signer.fingerprint if signer else None
    frame["signer_source"] = signer.source if signer else None
    if save_inputs is not None:
        _save_inputs(Path(save_inputs), inputs, stacked)
    return frame


def predictions_document(bundle: LoadedBundle, frame: pd.DataFrame) -> dict:
    """``predict --format json``: the bundle, who signed it, labels, thresholds and one entry per input."""
    labels = bundle.labels
    return {"bundle": str(bundle.path), "model_version": bundle.metadata["model_version"],
            "signer": bundle.signer.to_json_dict() if bundle.signer else None,
            "synthetic_data": bool(bundle.metadata.get("synthetic_data")),
            "labels": labels, "thresholds": {name: float(bundle.metadata["thresholds"][name]) for name in labels},
            "inputs": [{"input": row["input"],
                        **{uid: row[uid] for uid in UID_COLUMNS if uid in frame.columns},
                        "probabilities": {name: float(row[f"{name}_prob"]) for name in labels},
                        "labels": {name: int(row[f"{name}_label"]) for name in labels},
                        "modality_check": row["modality_check"]}
                       for _, row in frame.iterrows()]}


def _save_inputs(directory: Path, inputs, stacked: np.ndarray) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        entries = []
        for i, (path, array) in enumerate(zip(inputs, stacked)):
            name = f"{i}.f32"
            array.astype("<f4").tofile(directory / name)
            entries.append({"input": str(path), "file": name, "shape": [1, *array.shape]})
        (directory / "inputs.json").write_text(json.dumps(entries, indent=2) + "\n")
    except OSError as exc:
        raise OutputError(f"{directory}: cannot write the preprocessed inputs ({exc.strerror or exc}); choose "
                          "another --save-inputs") from None


def write_predictions(frame: pd.DataFrame, out: str | os.PathLike, force: bool = False) -> Path:
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists; choose another --out or pass --force to replace it")
    return write_beside_and_rename(out, lambda partial: frame.to_csv(partial, index=False), lambda exc: (
        f"{out}: cannot write the predictions ({exc.strerror or exc}); choose another --out"))

