"""Saving and loading dpmedtf models in the Keras format or as a SavedModel, no custom_objects needed."""

from __future__ import annotations

import zipfile
from pathlib import Path

import tensorflow as tf

from dpmedtf.errors import ModelError
from dpmedtf.models import acs  # noqa: F401  (registers ACSConv with Keras' serialisation)


def save_model(model: tf.keras.Model, path: str | Path, overwrite: bool = False) -> Path:
    """``*.keras`` → Keras v3 file; any other path → SavedModel directory. Never overwrites silently."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another path or pass overwrite=True")
    if path.suffix == ".keras":
        model.save(path, overwrite=True)
    else:
        model.save(path, overwrite=True, save_format="tf")
    return path


def load_model(path: str | Path) -> tf.keras.Model:
    """Loads what ``save_model`` wrote (architecture and weights; the optimizer state is not restored)."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"no model at {path}")
    try:
        return tf.keras.models.load_model(path, compile=False)
    except (OSError, ValueError, TypeError, KeyError, zipfile.BadZipFile) as exc:  # h5py/zip/Keras errors for a damaged or foreign file
        raise ModelError(f"{path}: cannot load the model ({type(exc).__name__}: {exc}); it is damaged or not a "
                         "Keras model saved by dpmedtf (train again, or point at the right file)") from None
