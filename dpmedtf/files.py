"""Writing result files so that a crash never leaves half of one behind."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from dpmedtf.errors import OutputError, RecordError


@contextmanager
def removed_on_failure(staging: Path, failure: Callable[[OSError], str]) -> Iterator[Path]:
    """For filling a staging directory that is renamed into place at the end: on any failure the staging
    directory is removed, and an OSError becomes an OutputError with the message ``failure(error)``."""
    try:
        yield staging
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(exc, OutputError):
            raise
        raise OutputError(failure(exc)) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_beside_and_rename(path: str | os.PathLike, write: Callable[[Path], None],
                            failure: Callable[[OSError], str]) -> Path:
    """``write(partial)`` fills ``.<name>.partial`` beside ``path``, which is then renamed into place, so
    ``path`` is never half-written. On any failure the partial file is removed, and an OSError becomes an
    OutputError with the message ``failure(error)``."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(partial)
        os.replace(partial, path)
    except BaseException as exc:
        with suppress(OSError):
            partial.unlink(missing_ok=True)
        if isinstance(exc, OSError) and not isinstance(exc, OutputError):
            raise OutputError(failure(exc)) from None
        raise
    return path


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc}); check that its folder is writable, or "
                          "choose another output directory") from None
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(data, stream, indent=2)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        Path(temporary).unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc}); free disk space or choose another "
                          "output directory") from None
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def read_json_object(path: str | os.PathLike, what: str) -> dict:
    """A JSON object dpmedtf wrote earlier, or RecordError saying which file is damaged and what to do."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RecordError(f"{path}: cannot read {what} ({type(exc).__name__}: {exc}); restore it, or delete it "
                          "(and what it describes) to redo that step") from None
    if not isinstance(data, dict):
        raise RecordError(f"{path}: {what} must be a JSON object, got {type(data).__name__}; restore it, or delete "
                          "it to redo that step")
    return data


def json_safe(value):
    """NaN is not JSON: undefined numbers (a group without positives) become null."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in blocks (bundles hold models of hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
