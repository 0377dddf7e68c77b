"""Prepare once: every input decoded and preprocessed into one memory-mapped array, reused by every
epoch and every later run with the same files and preprocessing.

Poisson sampling needs random access by example index, which ``tf.data``'s sequential ``cache()``
does not give; an ``.npy`` array opened with ``mmap_mode="r"`` does, at any dataset size. The cache
directory is keyed by the preprocessing spec and, per manifest row, the path as the manifest wrote it
(relative to the CSV) and the SHA-256 of the file's content — never an absolute path or a modification
time — so a run directory moved or copied together with its cohort finds its cache and resumes. The
digests are remembered by path, size and modification time (``file_digests.json``), so only new or
changed files are read twice. The cache is written to a temporary directory that is renamed into place
only when complete, so a killed preparation leaves nothing that looks finished.

Radiographs are decoded and preprocessed by a parallel ``tf.data`` map (tf.io / tensorflow-io /
pydicom as inspection chose); CT volumes by a thread pool over nibabel/pydicom/numpy. A file that
fails stops preparation with its manifest line and the reason, or with ``skip_bad`` is written to
``quarantine.csv`` and counted, never dropped silently: ``quarantine_note`` is what prepare, ``run``,
the summary page and the certificate say about it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import stat
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
from dpmedtf.files import read_json_object, removed_on_failure, sha256_file, write_json_atomic

CACHE_FORMAT = 2
"""2: keyed by manifest paths and content digests; quarantine.csv names array rows."""
DIGEST_MEMO = "file_digests.json"
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class PreprocessSpec:
    """Everything that determines what the model sees; part of the cache key and of release metadata."""

    modality: str
    image_size: int = radiograph.DEFAULT_IMAGE_SIZE
    volume_shape: tuple[int, int, int] = volume.DEFAULT_VOLUME_SHAPE
    hu_window: tuple[float, float] = volume.DEFAULT_HU_WINDOW
    dicom_decoder: str = "tensorflow-io"
    accept_modalities: tuple[str, ...] | None = None
    """DICOM Modality codes an input may have (data.accept_modalities); None: the modality's default, CR and DX
    for radiographs, CT for volumes."""

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
        given = self.accept_modalities
        if given is None:
            given = (radiograph.DEFAULT_ACCEPTED_MODALITIES if self.modality == "radiograph"
                     else volume.DEFAULT_ACCEPTED_MODALITIES)
        codes = tuple(str(code).strip().upper() for code in given)
        if not codes or not all(codes):
            example = "CR, DX" if self.modality == "radiograph" else "CT"
            raise ConfigError(f"data.accept_modalities must list DICOM Modality codes such as {example}, got "
                              f"{list(given)}")
        object.__setattr__(self, "accept_modalities", codes)

    def as_dict(self) -> dict:
        if self.modality == "radiograph":
            return {"modality": "radiograph", "image_size": self.image_size, "dicom_decoder": self.dicom_decoder,
                    "accept_modalities": list(self.accept_modalities), "steps": [
                "decode (air dark)", f"resize {self.image_size}x{self.image_size} bilinear antialiased",
                "min-max to uint8", "histogram equalisation", "3 channels", "scale to [0, 1]"]}
        return {"modality": "volume", "volume_shape_hwd": list(self.volume_shape), "hu_window": list(self.hu_window),
                "accept_modalities": list(self.accept_modalities),
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
    memo = _DigestMemo(cache_root)
    directory = cache_root / f"{spec.modality}-{_cache_key(cohort, spec, skip_bad, memo)}"
    if (directory / "meta.json").is_file():
        memo.save()
        return _load(directory, cohort, spec)
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=cache_root))
    except OSError as exc:
        blocker = _file_in_the_way(cache_root)
        reason = f"{blocker} is a file, not a folder" if blocker is not None else exc.strerror or str(exc)
        raise OutputError(f"{cache_root}: cannot create the cache directory ({reason}); choose another "
                          "--cache or data.cache_dir") from None
    with removed_on_failure(staging, lambda exc: f"{cache_root}: cannot write the cache ({exc.strerror or exc}); "
                                                 "free disk space or choose another --cache or data.cache_dir"):
        array = np.lib.format.open_memmap(staging / "data.npy", mode="w+", dtype=spec.dtype,
                                          shape=(len(cohort.frame), *spec.item_shape))
        writer = _prepare_radiographs if spec.modality == "radiograph" else _prepare_volumes
        failed = writer(cohort, spec, array, skip_bad, progress or (lambda done, total: None))
        array.flush()
        del array
        rows = {index: row for row, index in enumerate(cohort.frame.index)}
        quarantine = pd.DataFrame(
            [{"row": rows[i], "line": cohort.frame.loc[i, "line"], "path": cohort.frame.loc[i, "path"],
              "split": cohort.frame.loc[i, "split"], "reason": reason} for i, reason in sorted(failed.items())],
            columns=QUARANTINE_COLUMNS)
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
    memo.save()
    return _load(directory, cohort, spec)


def _file_in_the_way(directory: Path) -> Path | None:
    """The path itself or the nearest existing parent, when that is not a folder (a directory cannot go there)."""
    for candidate in (directory, *directory.parents):
        if os.path.lexists(candidate):
            return None if candidate.is_dir() else candidate
    return None


QUARANTINE_COLUMNS = ["row", "line", "path", "split", "reason"]
"""``row`` is the array row (= position in the cohort), which names the file wherever the run directory moved."""


def _load(directory: Path, cohort: Cohort, spec: PreprocessSpec) -> PreparedData:
    try:
        quarantine = pd.read_csv(directory / "quarantine.csv", dtype={"split": str, "path": str, "reason": str})
        array = np.load(directory / "data.npy", mmap_mode="r")
        if array.shape != (len(cohort.frame), *spec.item_shape) or list(quarantine.columns) != QUARANTINE_COLUMNS:
            raise ValueError(f"holds {array.shape} and quarantine columns {list(quarantine.columns)}, expected "
                             f"{(len(cohort.frame), *spec.item_shape)} and {QUARANTINE_COLUMNS}")
        rows = quarantine["row"].astype(int).to_numpy()
        if len(rows) and (rows.min() < 0 or rows.max() >= len(cohort.frame)):
            raise ValueError(f"quarantine.csv names row {rows.max()} of {len(cohort.frame)}")
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise RecordError(f"{directory}: the prepared-data cache is damaged ({type(exc).__name__}: {exc}); delete "
                          "this directory and run again to rebuild it") from None
    # The paths as they are now (a moved run directory's cache recorded the old ones).
    quarantine["path"] = cohort.frame["path"].to_numpy()[rows] if len(rows) else quarantine["path"]
    keep = np.ones(len(cohort.frame), bool)
    keep[rows] = False
    kept = dataclasses.replace(cohort, frame=cohort.frame[keep])
    # Quarantined rows stay in the array (zeros) so row numbers never shift; the cohort's index maps.
    return PreparedData(kept, array, quarantine, directory, spec)


def quarantine_note(prepared: PreparedData) -> str | None:
    """What every report says when ``skip_bad`` left rows out (None when none were): count and file."""
    count = len(prepared.quarantine)
    if not count:
        return None
    total = len(prepared.cohort.frame) + count
    by_split = prepared.quarantine["split"].value_counts()
    splits = ", ".join(f"{n} {name}" for name, n in sorted(by_split.items()))
    return (f"quarantined {count} of {total} manifest row(s) as unreadable ({splits}); they were left out of every "
            f"split. Reasons, by manifest line: {prepared.directory / 'quarantine.csv'}")


def _cache_key(cohort: Cohort, spec: PreprocessSpec, skip_bad: bool, memo: "_DigestMemo") -> str:
    """Spec and, per row in order, the manifest's own path and the content digest: where the files and the
    cache live does not enter, so a moved or copied run directory finds its cache."""
    digest = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, "spec": spec.as_dict(), "skip_bad": skip_bad},
                                       sort_keys=True).encode())
    frame = cohort.frame
    written = frame["manifest_path"] if "manifest_path" in frame.columns else frame["path"]
    contents = memo.digests(frame["path"].tolist())
    for name, content in zip(written, contents):
        digest.update(f"{name}\0{content}\n".encode())
    return digest.hexdigest()[:20]


class _DigestMemo:
    """SHA-256 of each input's content, remembered by absolute path, size, modification time and inode in
    ``<cache root>/file_digests.json`` so an unchanged cohort is not read again on every run. The memo only
    saves reading: the key is the content, whatever the memo holds for another path."""

    def __init__(self, root: Path):
        self.path = root / DIGEST_MEMO
        self.entries: dict[str, list] = {}
        self.changed = False
        if self.path.is_file():
            try:
                loaded = read_json_object(self.path, "the cache's file digests")
                self.entries = {k: v for k, v in loaded.get("files", {}).items() if isinstance(v, list) and len(v) == 4}
            except RecordError:
                self.entries = {}  # only a speed-up: rebuilt below

    def digests(self, paths: list[str]) -> list[str]:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
            return list(pool.map(self._content, paths))

    def _content(self, path: str) -> str:
        try:
            info = os.stat(path)
        except OSError as exc:  # missing, unreadable, a symbolic-link loop: prepare names it; the key just differs
            return f"unreadable:{type(exc).__name__}"
        if stat.S_ISDIR(info.st_mode):  # a DICOM series: every file volume.py reads, by name
            try:
                entries = sorted((e for e in os.scandir(path) if not e.name.startswith(".")), key=lambda e: e.name)
            except OSError as exc:
                return f"unreadable:{type(exc).__name__}"
            return "series:" + ";".join(f"{e.name}={self._content(e.path)}" for e in entries if e.is_file())
        if not stat.S_ISREG(info.st_mode):  # a FIFO or device: never read it (a FIFO would block)
            return f"special:{stat.S_IFMT(info.st_mode)}"
        signature = [info.st_size, info.st_mtime_ns, info.st_ino]
        remembered = self.entries.get(path)
        if remembered is not None and remembered[:3] == signature:
            return remembered[3]
        try:
            content = sha256_file(path)
        except OSError as exc:
            return f"unreadable:{type(exc).__name__}"
        self.entries[path] = [*signature, content]
        self.changed = True
        return content

    def save(self) -> None:
        if not self.changed:
            return
        try:
            write_json_atomic(self.path, {"format": CACHE_FORMAT, "files": self.entries})
        except OutputError:
            pass  # a read-only cache still works; it is only read again next time
        self.changed = False


def _fail(cohort: Cohort, index: int, reason: str, failed: dict, skip_bad: bool) -> None:
    if not skip_bad:
        raise DataError(f"{cohort.source} line {cohort.frame.loc[index, 'line']}: {reason}. Fix or remove the "
                        "row, or run with --skip-bad (in a job: data.skip_bad: true) to quarantine unreadable files "
                        "and continue")
    failed[index] = reason


def _prepare_radiographs(cohort: Cohort, spec: PreprocessSpec, array: np.ndarray, skip_bad: bool,
                         progress: Progress) -> dict[int, str]:
    failed: dict[int, str] = {}
    infos = {}
    for position, index in enumerate(cohort.frame.index):  # header-only checks, before any decoding
        try:
            infos[position] = radiograph.inspect_radiograph(cohort.frame.loc[index, "path"], spec.dicom_decoder,
                                                            spec.accept_modalities)
        except DataError as exc:
            _fail(cohort, index, str(exc), failed, skip_bad)
    with radiograph.dcmtk_messages_captured():  # DCMTK's "W:" lines for every real CR stay off the console
        _decode_radiographs(cohort, spec, array, skip_bad, progress, infos, failed)
    return failed


def _decode_radiographs(cohort: Cohort, spec: PreprocessSpec, array: np.ndarray, skip_bad: bool, progress: Progress,
                        infos: dict, failed: dict[int, str]) -> None:
    import tensorflow as tf

    todo = sorted(infos)
    done = 0
    while todo:
        dataset = tf.data.Dataset.from_tensor_slices((
            np.array(todo, np.int64), [infos[p].path for p in todo], [infos[p].decoder for p in todo],
            [infos[p].rows for p in todo], [infos[p].columns for p in todo]))

        def decode_and_preprocess(position, path, decoder, rows, columns):
            raw = radiograph.decode(path, decoder, rows, columns)
            return (position, radiograph.preprocess(raw, spec.image_size), tf.shape(raw),
                    tf.stack([tf.reduce_min(raw), tf.reduce_max(raw)]))

        dataset = dataset.map(decode_and_preprocess, num_parallel_calls=tf.data.AUTOTUNE,
                              deterministic=True).prefetch(tf.data.AUTOTUNE)
        received = 0
        try:
            for position, image, raw_shape, raw_range in dataset:
                position = int(position)
                received += 1
                if int(tf.reduce_min(raw_shape)) < radiograph.MIN_SOURCE_PIXELS:
                    _fail(cohort, cohort.frame.index[position],
                          f"{infos[position].path}: image is {int(raw_shape[0])}×{int(raw_shape[1])} pixels; "
                          "too small to be a radiograph", failed, skip_bad)
                    continue
                low, high = (float(value) for value in raw_range.numpy())
                try:
                    radiograph.refuse_blank(infos[position].path, low, high)
                except DataError as exc:
                    _fail(cohort, cohort.frame.index[position], str(exc), failed, skip_bad)
                    continue
                array[position] = image.numpy()
                done += 1
                progress(done + len(failed), len(cohort.frame))
            todo = []
        except tf.errors.OpError as exc:
            # Deterministic order: the element that failed is the one after the last received.
            position = todo[received]
            info = infos[position]
            _fail(cohort, cohort.frame.index[position],
                  radiograph.decode_failure(info, radiograph.decoder_error_text(info, exc)), failed, skip_bad)
            todo = todo[received + 1:]


def _prepare_volumes(cohort: Cohort, spec: PreprocessSpec, array: np.ndarray, skip_bad: bool,
                     progress: Progress) -> dict[int, str]:
    failed: dict[int, str] = {}
    paths = cohort.frame["path"].tolist()

    def work(position: int):
        try:
            return position, volume.preprocess_file(paths[position], spec.volume_shape, spec.hu_window,
                                                     spec.accept_modalities), None
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
