"""Radiograph files decoded without TensorFlow to exactly the float32 values training's decoders give.

Training (``data.radiograph``) decodes with TensorFlow; a consumer install has none. These numpy, pydicom
and Pillow decoders let a consumer reproduce training's input to the bit (tests/release/test_preprocessing.py).
Files reach them only after ``radiograph_files.inspect_radiograph`` accepted them.

- ``decode_with_pydicom``: training's own pydicom decoder (modality LUT, MONOCHROME1 as max + min − x).
- ``decode_like_tensorflow_io``: what tensorflow-io's DCMTK decoder (``scale="preserve"``) returns, from
  pydicom's pixel data: DCMTK's monochrome rendering without a VOI window. It maps the modality values'
  *possible* range [absmin, absmax] linearly onto 0 … 2^bits − 1 (bits: what that range needs),
  descending for MONOCHROME1, and truncates; overlay planes are burnt in. Its inversion is not
  max + min − x: for a 15-bit CR it is 32767 − x below 16384 and 32768 − x above (the gradient is
  (2 − 2^bits) / 2^bits, not −1), so pydicom's inversion differs by a step that equalisation widens.
- ``decode_image_like_tf``: what ``tf.io.decode_image(dtype=uint16)`` and ``rgb_to_grayscale`` give:
  8-bit PNG × 257, JPEG × 256 (``convert_image_dtype``), JPEG decoded with libjpeg's fast integer DCT
  as TensorFlow does, grey = (0.2989 R + 0.587 G) + 0.114 B in float32.
"""

from __future__ import annotations

import numpy as np

from dpmedtf.data.radiograph_files import (_JPEG_LOSSLESS, _PNG_MAGIC, DECODER_TF_IMAGE, JPEG_LOSSLESS_PLUGINS,
                                           SourceInfo, _transfer_syntax, decode_failure)
from dpmedtf.errors import DataError


def decode_with_pydicom(path: str) -> np.ndarray:
    """float32 (H, W) with the modality LUT applied and MONOCHROME1 inverted (air dark)."""
    import pydicom
    from pydicom.pixels import apply_modality_lut

    ds = pydicom.dcmread(path)
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises many types for undecodable pixel data
        raise DataError(f"{path}: DICOM pixel data cannot be decoded ({exc})") from None
    photometric = str(ds.PhotometricInterpretation).upper()
    if int(ds.get("SamplesPerPixel", 1)) == 3:
        if photometric.startswith("YBR"):
            from pydicom.pixels import convert_color_space
            pixels = convert_color_space(pixels, photometric, "RGB")
        pixels = pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    else:
        pixels = apply_modality_lut(pixels, ds).astype(np.float32)
        if photometric == "MONOCHROME1":
            pixels = pixels.max() + pixels.min() - pixels
    if pixels.ndim != 2 or pixels.size == 0:
        raise DataError(f"{path}: decoded pixel data has shape {pixels.shape}; expected one 2D image")
    return pixels


def decode_like_tensorflow_io(path: str) -> np.ndarray:
    """float32 (H, W): the values tensorflow-io's DCMTK decoder gives training for a monochrome DICOM.

    DCMTK (dcmimgle, ``DicomImage::getOutputData(getDepth())`` without a VOI window): modality values m
    (rescale truncated to an integer, or the modality LUT), their possible range [absmin, absmax] from
    BitsStored/PixelRepresentation through the same transform, ``bits`` = what that range needs, and
    ``out = trunc(low + (m − absmin) · (high − low + 1) / (absmax − absmin + 1))`` with (low, high) =
    (0, 2^bits − 1), swapped when the image is shown inverted (MONOCHROME1 without a Presentation LUT
    Shape, or Presentation LUT Shape INVERSE). Graphics overlay planes are then burnt in at the output
    type's maximum. Each rule is checked against tensorflow-io on pydicom-data's files in the tests."""
    import pydicom

    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # inspection read it already; a file that changed since is still refused
        raise DataError(f"{path}: not a readable DICOM image ({type(exc).__name__}: {exc})") from None
    stored = _pixel_array(ds, path)
    if stored.ndim != 2 or stored.size == 0:
        raise DataError(f"{path}: decoded pixel data has shape {stored.shape}; expected one 2D image")
    values, absmin, absmax, bits = _dcmtk_modality(ds, stored, path)
    maxval = 2.0 ** bits - 1
    low, high = (maxval, 0.0) if _dcmtk_inverse(ds) else (0.0, maxval)
    gradient = (high - low + 1) / (absmax - absmin + 1)
    if absmin != np.trunc(absmin) and _dcmtk_uses_lookup_table(stored.size, absmin, absmax, bits):
        # DCMTK's lookup-table shortcut indexes by (value − (int) absmin): only differs for a fractional absmin.
        absmin = np.trunc(absmin)
    rendered = np.trunc(low + (values - absmin) * gradient)
    rendered = _burn_in_overlays(ds, rendered, bits, path)
    return rendered.astype(np.float32)


def _pixel_array(ds, path: str) -> np.ndarray:
    try:
        return ds.pixel_array
    except Exception as exc:  # pydicom raises many types for undecodable pixel data
        if _transfer_syntax(ds) == _JPEG_LOSSLESS and "missing dependencies" in str(exc):
            raise DataError(f"{path}: DICOM is JPEG Lossless ({_JPEG_LOSSLESS}); decoding it without the training "
                            f"stack needs a JPEG plugin for pydicom: {JPEG_LOSSLESS_PLUGINS} "
                            "(or pip install python-gdcm)") from None
        raise DataError(f"{path}: DICOM pixel data cannot be decoded ({type(exc).__name__}: {exc})") from None


def _dcmtk_modality(ds, stored: np.ndarray, path: str) -> tuple[np.ndarray, float, float, int]:
    """(modality values, absmin, absmax, bits) as DCMTK's DiMonoModality computes them."""
    bits_stored = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    if int(ds.get("PixelRepresentation", 0)) == 1:
        input_min, input_max = -(2.0 ** (bits_stored - 1)), 2.0 ** (bits_stored - 1) - 1
    else:
        input_min, input_max = 0.0, 2.0 ** bits_stored - 1
    if "ModalityLUTSequence" in ds:
        from pydicom.pixels import apply_modality_lut

        lut_bits = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        values = np.asarray(apply_modality_lut(stored, ds), np.float64)
        return values, 0.0, 2.0 ** lut_bits - 1, lut_bits
    values = stored.astype(np.float64)
    # DCMTK rescales only when both attributes are present, and never with a zero slope.
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        try:
            slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        except (TypeError, ValueError):
            raise DataError(f"{path}: RescaleSlope/RescaleIntercept are not numbers; fix the file's header") from None
        if slope != 0:
            # DCMTK's intermediate image is an integer type: rescaled values are truncated toward zero.
            values = np.trunc(values * slope + intercept)
            ends = (input_min * slope + intercept, input_max * slope + intercept)
            input_min, input_max = min(ends), max(ends)
    return values, input_min, input_max, _range_bits(input_min, input_max)


def _range_bits(low: float, high: float) -> int:
    """DCMTK's DicomImageClass::rangeToBits: the bits a value range needs (one more if it is signed)."""
    def to_bits(value: int, subtract: int = 0) -> int:
        value = value - subtract if value > 0 else value
        return max(int(value).bit_length(), 1)

    if low < 0:
        if abs(low) > abs(high):
            return to_bits(int(abs(low)), 1) + 1
        return to_bits(int(abs(high))) + 1
    return to_bits(int(high))


def _dcmtk_inverse(ds) -> bool:
    shape = str(ds.get("PresentationLUTShape", "")).upper()
    if shape in ("IDENTITY", "INVERSE"):
        return shape == "INVERSE"
    return str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1"


def _dcmtk_uses_lookup_table(count: int, absmin: float, absmax: float, bits: int) -> bool:
    # DCMTK builds a lookup table when the intermediate type has ≤ 16 bits and the image has more than
    # three pixels per possible value.
    return bits <= 16 and count > 3 * int(absmax - absmin + 1)


def _burn_in_overlays(ds, rendered: np.ndarray, bits: int, path: str) -> np.ndarray:
    """DCMTK shows every overlay plane of the dataset: graphics planes replace pixels with the maximum of
    the output type (uint8/16/32 by ``bits``)."""
    groups = [group for group in range(0x6000, 0x6020, 2) if (group, 0x0010) in ds]
    if not groups:
        return rendered
    output_bits = 8 if bits <= 8 else 16 if bits <= 16 else 32
    rendered = rendered.copy()
    for group in groups:
        kind = str(ds[group, 0x0040].value if (group, 0x0040) in ds else "G").upper()
        if (group, 0x3000) not in ds or kind != "G":
            what = "a region-of-interest overlay" if kind == "R" else "an overlay embedded in the pixel data"
            raise DataError(f"{path}: DICOM has {what} (group {group:04X}), which tensorflow-io burns into the "
                            "image in a way dpmedtf's consumer preprocessing does not reproduce; remove the overlay "
                            "or predict with the training install (pip install 'dpmedtf[train]')")
        try:
            plane = np.asarray(ds.overlay_array(group)).astype(bool)
        except Exception as exc:  # pydicom raises many types for malformed overlay elements
            raise DataError(f"{path}: DICOM overlay plane {group:04X} cannot be read ({type(exc).__name__}: "
                            f"{exc}); remove it or re-export the file") from None
        plane = plane[0] if plane.ndim == 3 else plane  # the image's single frame is the overlay's first
        origin = ds[group, 0x0050].value if (group, 0x0050) in ds else (1, 1)
        top, left = int(origin[0]) - 1, int(origin[1]) - 1
        rows = slice(max(top, 0), min(top + plane.shape[0], rendered.shape[0]))
        columns = slice(max(left, 0), min(left + plane.shape[1], rendered.shape[1]))
        visible = plane[rows.start - top:rows.stop - top, columns.start - left:columns.stop - left]
        rendered[rows, columns][visible] = 2.0 ** output_bits - 1
    return rendered


def decode_image_like_tf(path: str) -> np.ndarray:
    """float32 (H, W): what training's ``tf.io.decode_image(dtype=uint16)`` + ``rgb_to_grayscale`` give for
    a PNG or JPEG, decoded with Pillow."""
    try:
        from PIL import Image
    except ImportError:
        raise DataError(f"{path}: decoding PNG and JPEG needs Pillow: pip install pillow") from None
    try:
        with Image.open(path) as image:
            if image.format not in ("PNG", "JPEG", "MPO"):
                raise DataError(f"{path}: a {image.format} image; a radiograph is a PNG, JPEG or DICOM file")
            if image.format == "PNG":
                pixels, scale = _png_pixels(image, path)
            else:
                pixels, scale = _jpeg_pixels(image, path)
    except DataError:
        raise
    except Exception as exc:  # truncated or corrupt files: Pillow raises OSError, SyntaxError, ValueError, …
        kind = "PNG" if _starts_with(path, _PNG_MAGIC) else "JPEG"
        raise DataError(decode_failure(SourceInfo(path, DECODER_TF_IMAGE, -1, -1, kind),
                                       f"Pillow: {type(exc).__name__}: {exc}")) from None
    pixels = pixels.astype(np.float32) * np.float32(scale)  # uint16 values: exact in float32
    if pixels.ndim == 3:
        if pixels.shape[-1] >= 3:
            weights = np.array([0.2989, 0.5870, 0.1140], np.float32)
            # TensorFlow's tensordot sums left to right in float32, without fused multiply-adds.
            pixels = (pixels[..., 0] * weights[0] + pixels[..., 1] * weights[1]) + pixels[..., 2] * weights[2]
        else:
            pixels = pixels[..., 0]
    return np.ascontiguousarray(pixels, np.float32)


def _starts_with(path: str, magic: bytes) -> bool:
    with open(path, "rb") as handle:
        return handle.read(len(magic)) == magic


def _png_pixels(image, path: str) -> tuple[np.ndarray, int]:
    """Pixels as libpng expands them for TensorFlow, and the factor to uint16 (257 for 8 bits)."""
    with open(path, "rb") as handle:
        header = handle.read(26)
    bit_depth, colour_type = header[24], header[25]
    if bit_depth == 16 and colour_type != 0:
        # Pillow keeps only 8 bits per channel of a 16-bit colour or grey+alpha PNG; TensorFlow keeps 16.
        raise DataError(f"{path}: a 16-bit colour (or grey + alpha) PNG, which Pillow reads with 8 bits per "
                        "channel; save it as a 16-bit greyscale PNG, or predict with the training install")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    pixels = np.asarray(image)
    if bit_depth == 16:
        return pixels.astype(np.uint16), 1
    if pixels.dtype == bool:  # 1-bit greyscale: libpng expands it to 0 / 255
        pixels = pixels.astype(np.uint8) * 255
    return pixels, 257  # TensorFlow widens 8-bit PNG samples by bit replication: v · 257


def _jpeg_pixels(image, path: str) -> tuple[np.ndarray, int]:
    if image.mode not in ("L", "RGB"):
        raise DataError(f"{path}: a {image.mode} JPEG; a radiograph JPEG is greyscale or RGB")
    # TensorFlow's decode_jpeg uses libjpeg's fast integer DCT (JDCT_IFAST); Pillow's draft flag selects
    # it too (scale 1 keeps the full size). Grey JPEGs then decode identically; colour JPEGs with chroma
    # subsampling differ at edges because the flag also turns off fancy upsampling.
    image.decoderconfig = (1, 1)
    image.load()
    return np.asarray(image), 256  # convert_image_dtype(uint8 → uint16) multiplies by 256
