"""The consumer's preprocessing: a file to the model's input as training made it, without TensorFlow.

Training preprocesses with TensorFlow (``data.radiograph``); a consumer install has only numpy, pydicom
and Pillow. This module reproduces training's float32 arithmetic step by step, not just its intent,
because histogram equalisation turns a one-level difference before it into many after it (a rounding
flip in a crowded bin moves that pixel across the bin's whole stretched range):

- decoding: ``data.radiograph_files`` gives the values training's decoder gave (tf.io for PNG/JPEG,
  tensorflow-io's DCMTK rendering or pydicom for DICOM, as inspection picks it);
- resize: TensorFlow's ScaleAndTranslate (``tf.image.resize(bilinear, antialias=True)``), with its
  float32 weights and its left-to-right accumulation, rows first (scale_and_translate_op.cc);
- min-max to uint8 with round half to even, histogram equalisation (``radiograph.equalize_histogram``),
  /255 and three channels.
CT volumes go through ``data.volume``, which is TF-free already, then the float16 round trip of
training's cache. ``preprocess_graph.py`` expresses the same radiograph arithmetic in ONNX.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from dpmedtf.data.radiograph_decoding import decode_image_like_tf, decode_like_tensorflow_io, decode_with_pydicom
from dpmedtf.data.radiograph_files import (DECODER_NAMES, DECODER_PYDICOM, DECODER_TF_IMAGE, MIN_SOURCE_PIXELS,
                                           inspect_radiograph, refuse_blank)
from dpmedtf.errors import DataError, DpmedtfError

_F = np.float32


def decode_radiograph(path: str | os.PathLike, dicom_decoder: str = "tensorflow-io") -> np.ndarray:
    """float32 (H, W), air dark: the values training's decoder produced for this file.

    PNG/JPEG: grey values as ``tf.io.decode_image(dtype=uint16)`` gives them (8-bit PNG × 257, JPEG × 256,
    colour → grey with TensorFlow's weights). DICOM: the modality LUT applied and MONOCHROME1 inverted,
    by the decoder training used for it (``dicom_decoder`` as recorded in the bundle): pydicom's
    max + min − x, or tensorflow-io's DCMTK rendering (values shifted to 0 … 2^bits − 1). Refuses a file
    training would refuse with the same DataError, naming the file, blank images included; the DICOM Modality
    is left to ``predict``'s modality guard, which has its own override."""
    info = inspect_radiograph(path, dicom_decoder)
    if info.decoder == DECODER_TF_IMAGE:
        pixels = decode_image_like_tf(info.path)
    elif info.decoder == DECODER_PYDICOM:
        pixels = decode_with_pydicom(info.path)
    else:
        pixels = decode_like_tensorflow_io(info.path)
    if min(pixels.shape) < MIN_SOURCE_PIXELS:
        raise DataError(f"{path}: image is {pixels.shape[0]}×{pixels.shape[1]} pixels; too small to be a radiograph")
    refuse_blank(str(path), pixels.min(), pixels.max())
    return pixels


def decoder_name(path: str | os.PathLike, dicom_decoder: str = "tensorflow-io") -> str:
    """Which of training's decoders this file goes through (tf.io, tensorflow-io or pydicom)."""
    return DECODER_NAMES[inspect_radiograph(path, dicom_decoder).decoder]


def radiograph_uint8(pixels: np.ndarray, image_size: int) -> np.ndarray:
    """Decoded pixels (H, W) → the paper's uint8 (S, S): resize, min-max to uint8, histogram equalisation."""
    return equalize_histogram(minmax_to_uint8(resize_antialiased(pixels, image_size)))


def resize_antialiased(pixels: np.ndarray, size: int) -> np.ndarray:
    """``tf.image.resize(pixels[..., None], [size, size], "bilinear", antialias=True)[..., 0]``, bit for bit."""
    image = np.asarray(pixels, _F)
    if image.ndim != 2 or min(image.shape) < 1:
        raise DpmedtfError(f"a radiograph to resize must be one 2D image, got shape {image.shape}")
    rows = _accumulate(image, *_spans(size, image.shape[0]))
    return _accumulate(rows.T, *_spans(size, image.shape[1])).T  # columns as rows of the transpose


def _spans(size: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """(source indices, weights), each (size, span): TensorFlow's ComputeSpansCore for the triangle kernel.

    Every step is one float32 operation in TensorFlow's order (its CPU build has no fused multiply-add)."""
    scale = _F(size) / _F(length)
    inv_scale = _F(1.0 / np.float64(scale))  # `1.0 / scale` is a double division in the C++ source
    kernel_scale = max(inv_scale, _F(1.0))  # antialiasing widens the kernel when downsampling only
    span = min(2 * int(np.ceil(kernel_scale)) + 1, length)
    sample = (np.arange(size, dtype=_F) + _F(0.5)) * inv_scale
    start = np.clip(np.ceil((sample - kernel_scale) - _F(0.5)).astype(np.int64), 0, length - 1)
    end = np.clip(np.floor((sample + kernel_scale) - _F(0.5)).astype(np.int64), 0, length - 1) + 1
    source = start[:, None] + np.arange(span)[None, :]
    distance = np.abs(((source.astype(_F) + _F(0.5)) - sample[:, None]) * (_F(1.0) / kernel_scale))
    weights = np.where((source < end[:, None]) & (distance < _F(1.0)), _F(1.0) - distance, _F(0.0)).astype(_F)
    total = np.add.accumulate(weights, axis=1)[:, -1]  # left to right, as TensorFlow sums them
    return np.minimum(source, length - 1), weights * (_F(1.0) / total)[:, None]


def _accumulate(image: np.ndarray, source: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """out[i] = Σ_j weights[i, j] · image[source[i, j]], summed left to right in float32."""
    out = np.zeros((source.shape[0], image.shape[1]), _F)
    for j in range(source.shape[1]):
        out = out + weights[:, j, None] * image[source[:, j]]
    return out


def minmax_to_uint8(image: np.ndarray) -> np.ndarray:
    """As ``radiograph.minmax_to_uint8``: a constant image becomes all 0; rounding is half to even."""
    image = np.asarray(image, _F)
    low, high = image.min(), image.max()
    spread = high - low
    scaled = (image - low) / spread if spread != 0 else np.zeros_like(image)
    return np.round(scaled * _F(255.0)).astype(np.uint8)


def equalize_histogram(image: np.ndarray) -> np.ndarray:
    """As ``radiograph.equalize_histogram`` (the OpenCV ``equalizeHist`` mapping), in the same float32 steps."""
    cdf = np.cumsum(np.bincount(image.ravel(), minlength=256)[:256])
    cdf_min = cdf[cdf > 0].min()
    denominator = _F(image.size - cdf_min)
    numerator = (cdf - cdf_min).astype(_F) * _F(255.0)
    lut = numerator / denominator if denominator != 0 else np.zeros_like(numerator)
    return np.clip(np.round(lut), 0, 255).astype(np.uint8)[image]


def to_model_input(image_uint8: np.ndarray) -> np.ndarray:
    """uint8 (S, S) → float32 (S, S, 3) in [0, 1], as ``radiograph.to_model_input``."""
    image = image_uint8.astype(_F) / _F(255.0)
    return np.repeat(image[..., None], 3, axis=-1)


def model_input(path: str | os.PathLike, metadata: Mapping[str, Any]) -> np.ndarray:
    """One file → the float32 model input (without the batch axis), by a bundle's ``metadata.json``."""
    spec = metadata["preprocessing"]
    shape = tuple(metadata["input"]["shape"][1:])
    if spec["modality"] == "radiograph":
        pixels = decode_radiograph(path, spec.get("dicom_decoder", "tensorflow-io"))
        array = to_model_input(radiograph_uint8(pixels, int(spec["image_size"])))
    elif spec["modality"] == "volume":
        from dpmedtf.data import volume

        data = volume.preprocess_file(path, tuple(spec["volume_shape_hwd"]), tuple(spec["hu_window"]),
                                      tuple(spec.get("accept_modalities", volume.DEFAULT_ACCEPTED_MODALITIES)))
        # Training reads volumes from a float16 cache; round the same way so the inputs match.
        data = data.astype(np.float16).astype(_F)
        array = np.repeat(data[..., None], shape[-1], axis=-1)
    else:
        raise DpmedtfError(f"{path}: the bundle's preprocessing modality {spec['modality']!r} is neither radiograph "
                           "nor volume; this dpmedtf cannot prepare inputs for it (upgrade dpmedtf)")
    if array.shape != shape:
        raise DpmedtfError(f"{path}: preprocessed to {array.shape}, but the model takes {shape}")
    return array
