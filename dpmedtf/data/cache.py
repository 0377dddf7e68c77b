"""Prepare once: every input decoded and preprocessed into one memory-mapped array, reused by every
epoch and every later run with the same files and preprocessing.

Poisson sampling needs random access by example index, which ``tf.data``'s sequential ``cache()``
does not give; an ``.npy`` array opened with ``mmap_mode="r"`` does, at any dataset size. The cache
directory is keyed by the preprocessing spec and each file's path, size and modification time, and
is written to a temporary directory that is renamed into place only when complete, so a killed
preparation leaves nothing that looks finished.

Radiographs are decoded and preprocessed by a parallel ``tf.data`` map (tf.io / tensorflow-io /
pydicom as inspection chose); CT volumes by a thread pool over nibabel/pydicom/numpy. A file that
fails stops preparation with its manifest line and the reason, or with ``skip_bad`` is written to
``quarantine.csv`` and counted, never dropped silently.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from dpmedtf.data import radiograph, volume
from dpmedtf.data.manifests import Cohort
from dpmedtf.errors import ConfigError, DataError, OutputError, RecordError
from dpmedtf.files import removed_on_failure

CACHE_FORMAT = 1
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class PreprocessSpec:
    """Everything that determines what the model sees; part of the cache key and of release metadata."""

    modality: str
    image_size: int = radiograph.DEFAULT_IMAGE_SIZE
    volume_shape: tuple[int, int, int] = volume.DEFAULT_VOLUME_SHAPE
    hu_window: tuple[float, float] = volume.DEFAULT_HU_WINDOW
    dicom_decoder: str = "tensorflow-io"

    def __post_init__(self):
        if self.modality not in ("radiograph", "volume"):
            raise ConfigError(f"modality must be radiograph or volume, got {self.modality!r}")
        if self.dicom_decoder not in radiograph.DICOM_DECODERS:
            raise ConfigError(f"dicom_decoder (data.dicom_decoder, --dicom-decoder) must be one of "
                              f"{', '.join(radiograph.DICOM_DECODERS)}, got {self.dicom_decoder!r}")
        if self.modality == "radiograph" and self.image_size < radiograph.MIN_SOURCE_PIXELS:
            raise ConfigError(f"image size (data.image_size, --image-size) must be ≥ {radiograph.MIN_SOURCE_PIXELS}, "
                              f"got {self.image_size}")
        if self.modality == "volume":
            volume.check_parameters(self.volume_shape, self.hu_window)

    def as_dict(self) -> dict:
        if self.modality == "radiograph":
            return {"modality": "radiograph", "image_size": self.image_size, "dicom_decoder": self.dicom_decoder, "steps": [
                "decode (air dark)", f"resize {self.image_size}x{self.image_size} bilinear antialiased",
                "min-max to uint8", "histogram equalisation", "3 channels", "scale to [0, 1]"]}
        return {"modality": "volume", "volume_shape_hwd": list(self.volume_shape), "hu_window": list(self.hu_window),
                "steps": ["HU (modality LUT)", "canonical orientation (D, H, W)", f"clip {self.hu_window} HU",
                          "scale to [0, 1]", f"trilinear resize to {self.volume_shape} (H, W, D)"]}

    @property
    def item_shape(self) -> tuple[int, ...]:
        if self.modality == "radiograph":
            return (self.image_size, self.image_size)
        height, width, depth = self.volume_shape
        return (depth, height, width)

    @property
    def dtype(self):
        # uint8 is exactly what the paper's radiograph preprocessing produces; float16 keeps a
        # 400 HU window at ~0.2 HU resolution for half the memory of float32.
        return np.uint8 if self.modality == "radiograph" else np.float16


@dataclass(frozen=True)
class PreparedData:
    cohort: Cohort
    """The rows that were prepared, in the array's order (``frame.index`` = array row)."""
    array: np.ndarray
    """(N, S, S) uint8 radiographs or (N, D, H, W) float16 volumes, memory-mapped read-only."""
    quarantine: pd.DataFrame
    """Rows skipped with ``skip_bad``: manifest line, path, split, reason."""
    directory: Path
    spec: PreprocessSpec


def prepare(cohort: Cohort, spec: PreprocessSpec, cache_root: str | os.PathLike, skip_bad: bool = False,
            progress: Progress | None = None) -> PreparedData:
    """Decode and preprocess every row of ``cohort`` into the cache (or reuse a complete cache)."""
    if spec.modality != cohort.modality:
        raise ValueError(f"spec is for {spec.modality} but the cohort is {cohort.modality}")
    cache_root = Path(cache_root)
    directory = cache_root / f"{spec.modality}-{_cache_key(cohort, spec, skip_bad)}"
    if (directory / "meta.json").is_file():
        return _load(directory, cohort, spec)
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=cache_root))
    except OSError as exc:
        raise OutputError(f"{cache_root}: cannot create the cache directory ({exc.strerror or exc}); choose another "
                          "--cache or data.cache_dir") from None
    with removed_on_failure(staging, lambda exc: f"{cache_root}: cannot write the cache ({exc.strerror or exc}); "
                                                 "free disk space or choose another --cache or data.cache_dir"):
        array = np.lib.format.open_memmap(staging / "data.npy", mode="w+", dtype=spec.dtype,
                                          shape=(len(cohort.frame), *spec.item_shape))
        writer = _prepare_radiographs if spec.modality == "radiograph" else _prepare_volumes
        failed = writer(cohort, spec, array, skip_bad, progress or (lambda done, total: None))
        array.flush()
        del array
        quarantine = pd.DataFrame(
            [{"line": cohort.frame.loc[i, "line"], "path": cohort.frame.loc[i, "path"],
              "split": cohort.frame.loc[i, "split"], "reason": reason} for i, reason in sorted(failed.items())],
            columns=["line", "path", "split", "reason"])
        quarantine.to_csv(staging / "quarantine.csv", index=False)
        (staging / "meta.json").write_text(json.dumps({
            "format": CACHE_FORMAT, "spec": spec.as_dict(), "manifest": str(cohort.source),
            "rows": len(cohort.frame), "quarantined": len(quarantine)}, indent=2))
        try:
            os.replace(staging, directory)
        except OSError:
            # Another process (e.g. another worker on shared storage) finished the same cache first:
            # the key names its content, so use theirs.
            if not (directory / "meta.json").is_file():
                raise
            shutil.rmtree(staging, ignore_errors=True)
    return _load(directory, cohort, spec)


def _load(directory: Path, cohort: Cohort, spec: PreprocessSpec) -> PreparedData:
    try:
        quarantine = pd.read_csv(directory / "quarantine.csv", dtype={"split": str})
        array = np.load(directory / "data.npy", mmap_mode="r")
        if array.shape != (len(cohort.frame), *spec.item_shape) or "path" not in quarantine.columns:
            raise ValueError(f"holds {array.shape}, expected {(len(cohort.frame), *spec.item_shape)}")
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise RecordError(f"{directory}: the prepared-data cache is damaged ({type(exc).__name__}: {exc}); delete "
                          "this directory and run again to rebuild it") from None
    keep = ~cohort.frame["path"].isin(set(quarantine["path"]))
    kept = dataclasses.replace(cohort, frame=cohort.frame[keep])
    # Quarantined rows stay in the array (zeros) so row numbers never shift; the cohort's index maps.
    return PreparedData(kept, array, quarantine, directory, spec)


def _cache_key(cohort: Cohort, spec: PreprocessSpec, skip_bad: bool) -> str:
    digest = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, "spec": spec.as_dict(), "skip_bad": skip_bad},
                                       sort_keys=True).encode())
    for path in cohort.frame["path"]:
        stat = _stat(path)
        digest.update(f"{path}\0{stat}\n".encode())
    return digest.hexdigest()[:20]


def _stat(path: str) -> str:
    try:
        if os.path.isdir(path):  # a DICOM series: every file in it counts
            return ";".join(f"{e.name}:{e.stat().st_size}:{e.stat().st_mtime_ns}"
                            for e in sorted(os.scandir(path), key=lambda e: e.name))
        st = os.stat(path)
        return f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        return "missing"


def _fail(cohort: Cohort, index: int, reason: str, failed: dict, skip_bad: bool) -> None:
    if not skip_bad:
        raise DataError(f"{cohort.source} line {cohort.frame.loc[index, 'line']}: {reason}. Fix or remove the "
                        "row, or run with --skip-bad to quarantine unreadable files and continue")
    failed[index] = reason


def _prepare_radiographs(cohort: Cohort, spec: PreprocessSpec, array: np.ndarray, skip_bad: bool,
                         progress: Progress) -> dict[int, str]:
    import tensorflow as tf

    failed: dict[int, str] = {}
    infos = {}
    for position, index in enumerate(cohort.frame.index):  # header-only checks, before any decoding
        try:
            infos[position] = radiograph.inspect_radiograph(cohort.frame.loc[index, "path"], spec.dicom_decoder)
        except DataError as exc:
            _fail(cohort, index, str(exc), failed, skip_bad)
    todo = sorted(infos)
    done = 0
    while todo:
        dataset = tf.data.Dataset.from_tensor_slices((
            np.array(todo, np.int64), [infos[p].path for p in todo], [infos[p].decoder for p in todo],
            [infos[p].rows for p in todo], [infos[p].columns for p in todo]))

        def decode_and_preprocess(position, path, decoder, rows, columns):
            raw = radiograph.decode(path, decoder, rows, columns)
            return position, radiograph.preprocess(raw, spec.image_size), tf.shape(raw)

        dataset = dataset.map(decode_and_preprocess, num_parallel_calls=tf.data.AUTOTUNE,
                              deterministic=True).prefetch(tf.data.AUTOTUNE)
        received = 0
        try:
            for position, image, raw_shape in dataset:
                position = int(position)
                received += 1
                if int(tf.reduce_min(raw_shape)) < radiograph.MIN_SOURCE_PIXELS:
                    _fail(cohort, cohort.frame.index[position],
                          f"{infos[position].path}: image is {int(raw_shape[0])}×{int(raw_shape[1])} pixels; "
                          "too small to be a radiograph", failed, skip_bad)
                    continue
                array[position] = image.numpy()
                done += 1
                progress(done + len(failed), len(cohort.frame))
            todo = []
        except tf.errors.OpError as exc:
            # Deterministic order: the element that failed is the one after the last received.
            position = todo[received]
            message = radiograph.tf_error_text(exc)
            _fail(cohort, cohort.frame.index[position],
                  f"{infos[position].path}: cannot decode the image with "
                  f"{radiograph.DECODER_NAMES[infos[position].decoder]} ({message})", failed, skip_bad)
            todo = todo[received + 1:]
    return failed


def _prepare_volumes(cohort: Cohort, spec: PreprocessSpec, array: np.ndarray, skip_bad: bool,
                     progress: Progress) -> dict[int, str]:
    failed: dict[int, str] = {}
    paths = cohort.frame["path"].tolist()

    def work(position: int):
        try:
            return position, volume.preprocess_file(paths[position], spec.volume_shape, spec.hu_window), None
        except DataError as exc:
            return position, None, str(exc)

    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        for done, (position, result, error) in enumerate(pool.map(work, range(len(paths))), start=1):
            if error is not None:
                _fail(cohort, cohort.frame.index[position], error, failed, skip_bad)
            else:
                array[position] = result.astype(spec.dtype)
            progress(done, len(paths))
    return failed
