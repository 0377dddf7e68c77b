"""Chest radiographs: inspect, decode and preprocess exactly as the paper did.

Preprocessing (Commun Med 2024): resize to S×S (default 512), min-max normalise to uint8, histogram
equalisation, expand to 3 channels; the model then sees the image scaled to [0, 1]. The uint8 S×S
image is what the cache stores; channel expansion, scaling and augmentation happen per step.

Decoding: PNG/JPEG with ``tf.io``; DICOM with tensorflow-io (DCMTK, ``on_error="strict"``), whose
output is a *display* image: MONOCHROME1 already inverted so that air is dark (measured on pydicom-
data's RG1_UNCR). Transfer syntaxes tensorflow-io is not relied on for (RLE, big-endian, deflated,
colour) go through pydicom, which applies the modality LUT and inverts MONOCHROME1 itself. Every
DICOM is inspected with pydicom first: no pixel data, a truncated file or an implausible shape is
refused there, because tensorflow-io decodes a truncated file without complaint. DCMTK's "W:"/"E:" log
lines, which it writes beneath Python on every decode of many real CRs, are kept off the console
(``dcmtk_messages_captured``); decoder failures are reported in dpmedtf's words (``decode_failure``).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from pathlib import Path

import numpy as np
import tensorflow as tf

from dpmedtf.errors import DataError, OutputError
from dpmedtf.native_stderr import native_stderr_filtered

# Inspection and pydicom decoding are TF-free and shared with the consumer's preprocessing
# (release/preprocessing.py); they live in radiograph_files and stay importable from here.
from dpmedtf.data.radiograph_files import (  # noqa: F401
    _JPEG_MAGIC, _NATIVE_SYNTAXES, _PNG_MAGIC, _TFIO_SYNTAXES, DECODER_NAMES, DECODER_PYDICOM, DECODER_TF_IMAGE,
    DECODER_TFIO_DICOM, DEFAULT_ACCEPTED_MODALITIES, DEFAULT_IMAGE_SIZE, DICOM_DECODERS, MAX_SOURCE_PIXELS,
    MIN_SOURCE_PIXELS, SourceInfo, _dicom_source_info, _inspect_dicom, decode_failure, inspect_radiograph,
    refuse_blank)
from dpmedtf.data.radiograph_decoding import decode_with_pydicom  # noqa: F401  (training's pydicom decoder)


# --- decoding ----------------------------------------------------------------------------------------

def _decode_tf_image(path: tf.Tensor) -> tf.Tensor:
    image = tf.io.decode_image(tf.io.read_file(path), channels=0, dtype=tf.uint16, expand_animations=False)
    image = tf.cast(image, tf.float32)
    channels = tf.shape(image)[-1]
    image = tf.cond(channels >= 3, lambda: tf.image.rgb_to_grayscale(image[..., :3]), lambda: image[..., :1])
    return image[..., 0]


def _decode_tfio_dicom(path: tf.Tensor, rows: tf.Tensor, columns: tf.Tensor) -> tf.Tensor:
    import tensorflow_io as tfio

    image = tfio.image.decode_dicom_image(tf.io.read_file(path), dtype=tf.float32, scale="preserve",
                                          on_error="strict")
    # on_error="strict" still returns an empty tensor for some failures: check the shape against the header.
    tf.debugging.Assert(tf.reduce_all(tf.equal(tf.shape(image), tf.stack([1, rows, columns, 1]))),
                        ["tensorflow-io decoded an unexpected shape for", path, tf.shape(image)])
    return image[0, :, :, 0]


def _decode_pydicom(path: tf.Tensor) -> tf.Tensor:
    image = tf.numpy_function(lambda p: decode_with_pydicom(np.asarray(p).item().decode()), [path], tf.float32,
                              stateful=False)
    return tf.ensure_shape(image, [None, None])


def decode(path: tf.Tensor, decoder: tf.Tensor, rows: tf.Tensor, columns: tf.Tensor) -> tf.Tensor:
    """float32 (H, W) raw intensities, air dark, by the decoder inspection chose."""
    return tf.switch_case(tf.cast(decoder, tf.int32), [
        lambda: _decode_tf_image(path),
        lambda: _decode_tfio_dicom(path, rows, columns),
        lambda: _decode_pydicom(path),
    ])


# --- the paper's preprocessing -------------------------------------------------------------------------

def minmax_to_uint8(image: tf.Tensor) -> tf.Tensor:
    low, high = tf.reduce_min(image), tf.reduce_max(image)
    scaled = tf.math.divide_no_nan(image - low, high - low) * 255.0  # a constant image becomes all 0
    return tf.cast(tf.round(scaled), tf.uint8)


def equalize_histogram(image: tf.Tensor) -> tf.Tensor:
    """Histogram equalisation of a uint8 image (the OpenCV/``equalizeHist`` mapping)."""
    flat = tf.cast(tf.reshape(image, [-1]), tf.int32)
    cdf = tf.cumsum(tf.math.bincount(flat, minlength=256, maxlength=256))
    cdf_min = tf.reduce_min(tf.where(cdf > 0, cdf, tf.reduce_max(cdf)))
    denominator = tf.cast(tf.size(flat) - cdf_min, tf.float32)
    lut = tf.math.divide_no_nan(tf.cast(cdf - cdf_min, tf.float32) * 255.0, denominator)
    lut = tf.cast(tf.clip_by_value(tf.round(lut), 0, 255), tf.uint8)
    return tf.gather(lut, tf.cast(image, tf.int32))


def preprocess(image: tf.Tensor, image_size: int = DEFAULT_IMAGE_SIZE) -> tf.Tensor:
    """Raw float (H, W) → the paper's uint8 (S, S): resize, min-max to uint8, histogram equalisation."""
    resized = tf.image.resize(image[..., None], [image_size, image_size], method="bilinear", antialias=True)[..., 0]
    return equalize_histogram(minmax_to_uint8(resized))


def to_model_input(image_uint8: tf.Tensor) -> tf.Tensor:
    """uint8 (…, S, S) → float32 (…, S, S, 3) in [0, 1]: the three identical channels the model takes."""
    image = tf.cast(image_uint8, tf.float32) / 255.0
    return tf.repeat(image[..., None], 3, axis=-1)


def augment(images: tf.Tensor, seed: tf.Tensor, max_degrees: float = 10.0, example_ids: tf.Tensor | None = None,
            population: int | None = None) -> tf.Tensor:
    """Non-DP augmentation of a batch (N, S, S, C): rotation by U(±10°) and horizontal flip with p = 0.5.

    With ``example_ids`` (indices < ``population``) each example's draw depends only on (seed, its id),
    not on which other examples share its batch: a step's augmentation is then the same however the
    step is sharded across replicas.
    """
    if example_ids is None:  # the batch is the population
        example_ids, population = tf.range(tf.shape(images)[0]), tf.shape(images)[0]
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2)
    angles = tf.gather(tf.random.stateless_uniform([population], seeds[0], -max_degrees, max_degrees), example_ids)
    flip = tf.gather(tf.random.stateless_uniform([population], seeds[1]), example_ids) < 0.5
    images = tf.where(flip[:, None, None, None], tf.reverse(images, axis=[2]), images)
    return _rotate(images, angles * (math.pi / 180.0))


def _rotate(images: tf.Tensor, angles: tf.Tensor) -> tf.Tensor:
    height, width = tf.cast(tf.shape(images)[1], tf.float32), tf.cast(tf.shape(images)[2], tf.float32)
    cos, sin = tf.cos(angles), tf.sin(angles)
    # Output pixel (x, y) samples the input at the inverse rotation about the image centre.
    cx, cy = (width - 1) / 2, (height - 1) / 2
    transforms = tf.stack([cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy,
                           tf.zeros_like(cos), tf.zeros_like(cos)], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=tf.shape(images)[1:3], fill_value=0.0,
        interpolation="BILINEAR", fill_mode="CONSTANT")


def preprocess_file(path: str | os.PathLike, image_size: int = DEFAULT_IMAGE_SIZE,
                    dicom_decoder: str = "tensorflow-io",
                    accept_modalities: tuple[str, ...] | None = None) -> np.ndarray:
    """One file through inspection, decoding and preprocessing: the uint8 (S, S) image the model sees
    (before channel expansion). The same code the training pipeline and ``dpmedtf predict`` use."""
    info = inspect_radiograph(path, dicom_decoder, accept_modalities)
    try:
        with dcmtk_messages_captured():
            raw = decode(tf.constant(info.path), tf.constant(info.decoder), tf.constant(info.rows),
                         tf.constant(info.columns))
    except tf.errors.OpError as exc:
        raise DataError(decode_failure(info, decoder_error_text(info, exc))) from None
    if min(raw.shape) < MIN_SOURCE_PIXELS:
        raise DataError(f"{path}: image is {raw.shape[0]}×{raw.shape[1]} pixels; too small to be a radiograph")
    refuse_blank(info.path, float(tf.reduce_min(raw)), float(tf.reduce_max(raw)))
    return preprocess(raw, image_size).numpy()


def tf_error_text(exc: tf.errors.OpError) -> str:
    """The reason in a TensorFlow op error, without its graph-node prefix and op suffix."""
    text = (exc.message or "").strip().splitlines()[0] if (exc.message or "").strip() else ""
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", text)
    text = re.sub(r"\s*\[Op:\w+\].*$", "", text).strip()
    return text or type(exc).__name__


def decoder_error_text(info: SourceInfo, exc: tf.errors.OpError) -> str:
    """The decoder and its reason for ``decode_failure``, in words a user can act on."""
    text = tf_error_text(exc)
    if "tensorflow-io decoded an unexpected shape" in text:
        text = "it returned no image of the header's size"
    return f"{DECODER_NAMES[info.decoder]}: {text}"


# DCMTK (inside tensorflow-io) logs "W: …" and "E: …" lines straight to file descriptor 2 for header oddities
# of many real CRs, e.g. "W: invalid value for 'PixelHeight' (0) ... assuming 1", once per decode.
_DCMTK_PREFIXES = (b"W: ", b"E: ")


def _is_dcmtk_line(line: bytes) -> bool:
    return line.startswith(_DCMTK_PREFIXES)


def _may_start_dcmtk_line(partial: bytes) -> bool:
    return any(prefix.startswith(partial[:3]) for prefix in _DCMTK_PREFIXES)


def dcmtk_messages_captured() -> contextlib.AbstractContextManager[list[str]]:
    """Keeps DCMTK's "W:"/"E:" lines off the console while decoding; everything else on fd 2 passes on to
    the real stderr as it arrives. Yields the captured lines. fd 2 is restored on every exit, errors included."""
    return native_stderr_filtered(_is_dcmtk_line, may_be_caught=_may_start_dcmtk_line)


def save_png(image: np.ndarray, out: str | os.PathLike) -> Path:
    out = Path(out)
    data = tf.io.encode_png(np.asarray(image)[..., None] if image.ndim == 2 else image).numpy()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
    except OSError as exc:
        raise OutputError(f"{out}: cannot write the PNG ({exc.strerror or exc}); choose another --out") from None
    return out
