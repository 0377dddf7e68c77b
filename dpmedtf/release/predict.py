"""Consumers' side of a bundle: load it verified, preprocess files exactly as training did, run ONNX.

``load`` refuses a bundle that fails verification, so every prediction dpmedtf makes comes from a
model whose files, signature and certificate were checked first. Preprocessing is dpmedtf's own
training code (``data.radiograph`` / ``data.volume``) driven by the spec stored in the bundle, so the
model sees at prediction time exactly what it saw in training.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from dpmedtf.errors import DataError, DpmedtfError, OutputError, OutputExistsError
from dpmedtf.release import onnx_model
from dpmedtf.release.layout import CERTIFICATE_FILE, METADATA_FILE, MODEL_FILE
from dpmedtf.release.verify import BundleVerificationError, VerificationReport, verify_bundle

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

    def preprocess(self, path: str | os.PathLike) -> np.ndarray:
        """One file → the float32 model input (without the batch axis), by the bundle's spec."""
        spec = self.metadata["preprocessing"]
        shape = tuple(self.metadata["input"]["shape"][1:])
        if spec["modality"] == "radiograph":
            from dpmedtf.data import radiograph

            image = radiograph.preprocess_file(path, spec["image_size"], spec.get("dicom_decoder", "tensorflow-io"))
            model_input = radiograph.to_model_input(image).numpy()
        else:
            from dpmedtf.data import volume

            data = volume.preprocess_file(path, tuple(spec["volume_shape_hwd"]), tuple(spec["hu_window"]))
            # Training reads volumes from a float16 cache; round the same way so the inputs match.
            data = data.astype(np.float16).astype(np.float32)
            model_input = np.repeat(data[..., None], shape[-1], axis=-1)
        if model_input.shape != shape:
            raise DpmedtfError(f"{path}: preprocessed to {model_input.shape}, but the model takes {shape}")
        return model_input.astype(np.float32)

    def probabilities(self, inputs: np.ndarray) -> np.ndarray:
        """Preprocessed inputs (N, …) → probabilities (N, labels)."""
        (output,) = self.session.run([onnx_model.OUTPUT_NAME], {onnx_model.INPUT_NAME: np.asarray(inputs, np.float32)})
        return output


def load(path: str | os.PathLike, public_key: str | os.PathLike | None = None) -> LoadedBundle:
    """The bundle at ``path``, verified (raises BundleVerificationError listing every failure)."""
    path = Path(path)
    report = verify_bundle(path, public_key)
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


def predict_files(bundle: LoadedBundle, inputs: Sequence[str | os.PathLike], progress=None,
                  save_inputs: str | os.PathLike | None = None) -> pd.DataFrame:
    """One row per input: its path, per label ``<label>_prob`` and ``<label>_label`` (thresholded).

    Every input is preprocessed before any result is returned: one unreadable file stops the whole
    call with its name, rather than yielding a table silently missing a row. ``save_inputs`` writes each
    preprocessed input as raw little-endian float32 (``<n>.f32`` plus ``inputs.json`` with shapes), so
    any other ONNX runtime can be checked against these probabilities.
    """
    check_inputs_exist(inputs)
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
    frame["model_version"] = bundle.metadata["model_version"]
    frame["trained_on_synthetic_data"] = bool(bundle.metadata.get("synthetic_data"))
    if save_inputs is not None:
        _save_inputs(Path(save_inputs), inputs, stacked)
    return frame


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
    partial = out.with_name(f".{out.name}.partial")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(partial, index=False)
        os.replace(partial, out)
    except OSError as exc:
        if partial.parent.is_dir():
            partial.unlink(missing_ok=True)
        raise OutputError(f"{out}: cannot write the predictions ({exc.strerror or exc}); choose another --out") from None
    return out

