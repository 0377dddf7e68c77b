"""Radiograph files without TensorFlow: inspection of headers and file structure, shared by training and consumers.

Training (``data.radiograph``) decodes with TensorFlow; a consumer install has none. Everything here is
numpy, pydicom and Pillow, so both sides share one inspection (what is refused, with which reason, and
which decoder a file gets) and a consumer can decode a file to exactly the float32 values training saw.

Inspection reads headers and file structure only, never pixels, and refuses with the file and the reason:
anything but a regular file (a directory, FIFO, symbolic-link loop or broken link, an unreachable path); a
header claiming more than ``MAX_SOURCE_PIXELS`` (decompression bombs); a PNG cut short or failing a critical
chunk's checksum, a JPEG without frame header or end-of-image marker; a DICOM cut inside its header or
pixel data, without pixel data, multi-frame, or whose uncompressed pixel data is shorter or longer than
Rows × Columns need; and for training, a DICOM Modality outside ``accept_modalities``. After decoding,
``refuse_blank`` refuses a constant image on both sides.

Decoding to the values training's decoders give is ``radiograph_decoding.py``.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import warnings
import zlib
from dataclasses import dataclass


from dpmedtf.errors import ConfigError, DataError

DEFAULT_IMAGE_SIZE = 512
MIN_SOURCE_PIXELS = 32  # an image smaller than this on a side is not a radiograph
MAX_SOURCE_PIXELS = 8192 * 8192
"""The most pixels a radiograph's header may claim (67 Mpx), checked before anything is decoded. The largest
flat-panel and CR plates are 43 × 43 cm at 100–150 µm, about 4300 × 4300 (18 Mpx); even a stitched full-leg
image (about 43 × 120 cm) at 100 µm is 52 Mpx. Beyond this a file is a decompression bomb (a 20000 × 20000 PNG
of 380 KB decodes into gigabytes) or not a radiograph; refusing it from its header costs nothing."""
DEFAULT_ACCEPTED_MODALITIES = ("CR", "DX")
"""DICOM Modality codes a training radiograph may have unless ``data.accept_modalities`` says otherwise.
CR and DX are the codes DICOM defines for projection radiographs (computed and digital radiography) and
what the release's modality guard expects at prediction. Refused by default, each with the override in
the message: DR (not a DICOM code, though some archives write it for DX), RG (digitised film), and OT
(other: secondary captures, which hold screenshots and scanned paper of any modality as often as a
radiograph); an archive that stores its chest radiographs under one of these lists it."""
NO_MODALITY = "unknown"
"""How a DICOM without a Modality element counts against ``accept_modalities`` (as for CT series)."""
DECODER_TF_IMAGE, DECODER_TFIO_DICOM, DECODER_PYDICOM = 0, 1, 2
DECODER_NAMES = ("tf.io", "tensorflow-io", "pydicom")
# Which library decodes DICOMs that both can read. tensorflow-io is the default; pydicom measured
# 3.5–6× faster on native 16-bit CRs (benchmarks/data_pipeline.py) and agrees to rounding.
DICOM_DECODERS = ("tensorflow-io", "pydicom")

_PNG_MAGIC, _JPEG_MAGIC = b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"
_JPEG_LOSSLESS = "1.2.840.10008.1.2.4.70"
# Syntaxes tensorflow-io's DCMTK decoder reads (checked against pydicom-data's files in the tests).
_TFIO_SYNTAXES = {
    "1.2.840.10008.1.2",        # Implicit VR Little Endian
    "1.2.840.10008.1.2.1",      # Explicit VR Little Endian
    _JPEG_LOSSLESS,             # JPEG Lossless, first-order prediction
    "1.2.840.10008.1.2.4.90",   # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91",   # JPEG 2000
}
_NATIVE_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"}
JPEG_LOSSLESS_PLUGINS = "pip install pylibjpeg pylibjpeg-libjpeg"
_MODALITY_NAMES = {
    "CT": "computed tomography", "MR": "magnetic resonance", "US": "ultrasound", "NM": "nuclear medicine",
    "PT": "PET", "MG": "mammography", "XA": "X-ray angiography", "RF": "fluoroscopy", "OT": "other",
    "RG": "digitised film", "IO": "intra-oral radiography", "PX": "panoramic X-ray", "SR": "structured report",
    "ES": "endoscopy", "XC": "photography", "SM": "slide microscopy", "OP": "ophthalmic photography",
}


@dataclass(frozen=True)
class SourceInfo:
    """What inspection learned about one input file."""

    path: str
    decoder: int
    rows: int
    columns: int
    kind: str = "DICOM"
    """"PNG", "JPEG" or "DICOM": how messages name the file's format."""


def inspect_radiograph(path: str | os.PathLike, dicom_decoder: str = "tensorflow-io",
                       accept_modalities: tuple[str, ...] | None = None) -> SourceInfo:
    """Checks from its header alone that a file can be a radiograph, and picks its decoder; DataError with the
    reason otherwise. ``accept_modalities``: the DICOM Modality codes training takes (None: not checked, as
    for ``preprocess`` and the consumer, whose modality guard judges headers with its own override)."""
    if dicom_decoder not in DICOM_DECODERS:
        raise ConfigError(f"dicom_decoder (data.dicom_decoder, --dicom-decoder) must be one of "
                          f"{', '.join(DICOM_DECODERS)}, got {dicom_decoder!r}")
    path = str(path)
    size = _regular_file_size(path)
    if size == 0:
        raise DataError(f"{path}: file is empty (0 bytes)")
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
            if head.startswith(_PNG_MAGIC):
                return _inspect_png(path, handle, size)
            if head.startswith(_JPEG_MAGIC):
                return _inspect_jpeg(path, handle, size)
    except OSError as exc:
        raise DataError(f"{path}: cannot read the file ({exc.strerror or exc}); check its permissions") from None
    return _inspect_dicom(path, size, head[128:132] == b"DICM", dicom_decoder, accept_modalities)


def _regular_file_size(path: str) -> int:
    """The size of ``path`` if it is a regular file (after symbolic links); DataError saying what it is otherwise."""
    try:
        status = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DataError(f"{path}: is a symbolic-link loop (the link leads back to itself), not a file; point the "
                            "manifest at the image itself or fix the link") from None
        if exc.errno == errno.ENOENT and os.path.islink(path):
            raise DataError(f"{path}: is a broken symbolic link (its target {_link_target(path)} does not exist); "
                            "fix the link or point the manifest at the image itself") from None
        if exc.errno == errno.ENOENT:
            raise DataError(f"{path}: file not found") from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise DataError(f"{path}: cannot be reached: permission denied on a folder in its path; check the "
                            "folders' permissions") from None
        if exc.errno == errno.ENOTDIR:
            raise DataError(f"{path}: cannot be reached: a part of its path is a file, not a folder") from None
        raise DataError(f"{path}: cannot read the file ({exc.strerror or exc})") from None
    mode = status.st_mode
    if stat.S_ISREG(mode):
        return status.st_size
    what = ("is a directory" if stat.S_ISDIR(mode) else "is a named pipe (FIFO), not a file" if stat.S_ISFIFO(mode)
            else "is a socket, not a file" if stat.S_ISSOCK(mode) else "is a device, not a file")
    raise DataError(f"{path}: {what}; a radiograph is one PNG, JPEG or DICOM file")


def _link_target(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


def check_pixel_count(path: str, kind: str, width: int, height: int, frames: int = 1) -> None:
    """DataError if the header claims more than ``MAX_SOURCE_PIXELS``: refused before any decoding."""
    pixels = width * height * frames
    if pixels > MAX_SOURCE_PIXELS:
        shape = f"{width}×{height}" + (f"×{frames} frames" if frames > 1 else "")
        raise DataError(f"{path}: {kind} header says {shape} pixels ({pixels / 1e6:.0f} megapixels), more than the "
                        f"{MAX_SOURCE_PIXELS / 1e6:.0f} megapixels (8192×8192) dpmedtf accepts: not a radiograph, or a "
                        "decompression bomb; it was not decoded. Remove the row, or downsample the image")


def refuse_blank(path: str, low: float, high: float) -> None:
    """DataError if a decoded image is constant (``low == high``): it carries nothing to learn or predict from."""
    if low == high:
        # The value itself is not shown: after decoding it is on the decoder's scale, not the file's.
        raise DataError(f"{path}: blank image: every pixel has the same value; an empty or failed export? Remove the "
                        "row or export the image again")


def decode_failure(info: SourceInfo, detail: str) -> str:
    """Why a file that passed inspection cannot be decoded, in the same words for training and the consumer;
    ``detail`` is the decoder's own short reason."""
    if info.kind in ("PNG", "JPEG"):
        return (f"{info.path}: corrupt {info.kind}: its header is valid but its image data cannot be decoded "
                f"({detail}); re-export or re-copy the file")
    return (f"{info.path}: DICOM pixel data cannot be decoded with {DECODER_NAMES[info.decoder]} ({detail}); "
            "re-export or re-copy the file")


# --- PNG and JPEG: the header and the file's structure, without decoding ------------------------------

_PNG_CRITICAL = (b"IHDR", b"PLTE", b"IDAT", b"IEND")
_PNG_BIT_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}


def _inspect_png(path: str, stream, size: int) -> SourceInfo:
    """Dimensions from IHDR (checked against the pixel limit first), then every chunk walked to the IEND chunk:
    lengths within the file and the CRC of the chunks a decoder cannot skip (libpng rejects those too)."""
    stream.seek(8)
    header = stream.read(25)
    if len(header) < 25:
        raise DataError(f"{path}: PNG is truncated: the file ends at byte {size}, inside its header; re-export or "
                        "re-copy the file")
    length, kind = struct.unpack(">I4s", header[:8])
    if kind != b"IHDR" or length != 13:
        raise DataError(f"{path}: corrupt PNG: it does not start with a header chunk (IHDR); re-export or re-copy "
                        "the file")
    if zlib.crc32(header[4:21]) != struct.unpack(">I", header[21:25])[0]:
        raise DataError(f"{path}: corrupt PNG: its header chunk (IHDR) fails its checksum; re-export or re-copy the "
                        "file")
    width, height, depth, colour = struct.unpack(">IIBB", header[8:18])
    if not (width and height and depth in _PNG_BIT_DEPTHS.get(colour, ())):
        raise DataError(f"{path}: corrupt PNG: its header says {width}×{height} pixels, bit depth {depth}, colour "
                        f"type {colour}, which no PNG has; re-export or re-copy the file")
    check_pixel_count(path, "PNG", width, height)
    position, has_data = 33, False
    while True:
        chunk = stream.read(8)
        if len(chunk) < 8:
            raise DataError(f"{path}: PNG is truncated: the file ends at byte {size} before its end chunk (IEND); "
                            "re-export or re-copy the file")
        length, kind = struct.unpack(">I4s", chunk)
        name = kind.decode("latin-1")
        if position + 12 + length > size:
            raise DataError(f"{path}: PNG is truncated: the file ends at byte {size}, inside its {name} chunk; "
                            "re-export or re-copy the file")
        if kind in _PNG_CRITICAL:
            data, checksum = stream.read(length), stream.read(4)
            if zlib.crc32(data, zlib.crc32(kind)) != struct.unpack(">I", checksum)[0]:
                raise DataError(f"{path}: corrupt PNG: its {name} chunk at byte {position} fails its checksum (the "
                                "file was damaged); re-export or re-copy the file")
        else:
            stream.seek(length + 4, os.SEEK_CUR)
        position += 12 + length
        has_data |= kind == b"IDAT"
        if kind == b"IEND":
            break
    if not has_data:
        raise DataError(f"{path}: corrupt PNG: it has no image data (no IDAT chunk); re-export or re-copy the file")
    return SourceInfo(path, DECODER_TF_IMAGE, height, width, "PNG")


_JPEG_FRAME_MARKERS = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # SOF0–SOF15 (not DHT, JPG, DAC)


def _inspect_jpeg(path: str, stream, size: int) -> SourceInfo:
    """Dimensions from the frame header (SOF), checked against the pixel limit; the file must end its image
    (an EOI marker after the frame header), or it was cut."""
    stream.seek(0)
    data = stream.read()
    position, frame = 2, None
    while frame is None:
        if position + 4 > len(data):
            raise DataError(f"{path}: JPEG is truncated: the file ends at byte {size} before its frame header; "
                            "re-export or re-copy the file")
        if data[position] != 0xFF:
            raise DataError(f"{path}: corrupt JPEG: no marker at byte {position} before its frame header; re-export "
                            "or re-copy the file")
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            position += 2
            continue
        if marker in (0xD9, 0xDA):  # the image ends or its data starts without a frame header
            raise DataError(f"{path}: corrupt JPEG: it has no frame header before its image data; re-export or "
                            "re-copy the file")
        if marker in _JPEG_FRAME_MARKERS:
            frame = position
        else:
            position += 2 + int.from_bytes(data[position + 2:position + 4], "big")
    if frame + 9 > len(data):
        raise DataError(f"{path}: JPEG is truncated: the file ends at byte {size}, inside its frame header; "
                        "re-export or re-copy the file")
    height, width = struct.unpack(">HH", data[frame + 5:frame + 9])
    if not (width and height):
        raise DataError(f"{path}: corrupt JPEG: its frame header says {width}×{height} pixels; re-export or re-copy "
                        "the file")
    check_pixel_count(path, "JPEG", width, height)
    # Entropy-coded data never holds FF D9 (an FF there is stuffed with 00), so the last one ends the image.
    if data.rfind(b"\xff\xd9") < frame:
        raise DataError(f"{path}: JPEG is truncated: the file ends at byte {size} without its end-of-image marker; "
                        "re-export or re-copy the file")
    return SourceInfo(path, DECODER_TF_IMAGE, height, width, "JPEG")


# --- DICOM: the header, and the pixel data's length against it ------------------------------------------

def _inspect_dicom(path: str, size: int, has_preamble: bool, dicom_decoder: str,
                   accept_modalities: tuple[str, ...] | None = None) -> SourceInfo:
    ds, failure, ended_early = _read_dicom(path, has_preamble, defer_size=4096)
    if ds is None or "Rows" not in ds or "Columns" not in ds:
        header, _, _ = _read_dicom(path, has_preamble, stop_before_pixels=True)
        if header is not None and "Rows" in header and "Columns" in header:
            # The image attributes read, the rest of the file not: the damage is in or before the pixel data.
            reason = "the file ends inside its compressed pixel data" if ended_early else failure or "unreadable"
            raise DataError(f"{path}: DICOM is truncated or damaged after its header: its pixel data cannot be read "
                            f"({reason}); re-export or re-copy the file")
        meta = getattr(ds, "file_meta", None)
        if not (has_preamble or (meta is not None and meta.get("TransferSyntaxUID"))):
            raise DataError(f"{path}: not a PNG, JPEG or DICOM image ({failure or 'no image header found'})")
        cut_at = _end_of_complete_elements(ds, size) if ds is not None else None
        if failure or ended_early or cut_at is not None or ds is None or not len(ds):
            inside = ", inside an element" if cut_at is not None or ended_early else ""
            reason = failure or f"the file ends at byte {size}{inside}"
            raise DataError(f"{path}: DICOM header is truncated or damaged ({reason}): the "
                            "image attributes (Rows, Columns) cannot be read; re-export or re-copy the file")
        raise DataError(f"{path}: DICOM {_sop_class_name(ds)}has no image attributes (Rows, Columns): not an image "
                        "(a report or structured document?); remove the row")
    try:
        return _dicom_source_info(path, size, ds, dicom_decoder, accept_modalities)
    except DataError:
        raise
    except Exception as exc:  # a damaged header makes pydicom raise many types while reading elements
        raise DataError(f"{path}: DICOM header cannot be read ({type(exc).__name__}: {exc}); re-export or "
                        "re-copy the file") from None


def _read_dicom(path: str, has_preamble: bool, **options):
    """(dataset or None, the exception pydicom raised, pydicom's end-of-file warning): pydicom warns rather than
    fails when a file ends inside an element of undefined length, and may then return an empty dataset."""
    import pydicom

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # recorded, not printed: the DataError says what matters
        try:
            ds, failure = pydicom.dcmread(path, force=not has_preamble, **options), None
        except Exception as exc:  # InvalidDicomError, EOFError, struct and value errors, … for a damaged file
            ds, failure = None, exc
    ended = next((str(w.message).split(" found in file")[0] for w in caught if "End of file" in str(w.message)), None)
    return ds, (f"{type(failure).__name__}: {failure}" if failure is not None else None), ended


def _end_of_complete_elements(ds, size: int) -> int | None:
    """Where the last element pydicom read ends, when that is not the end of the file: bytes follow it that form
    no element, or its value runs past the end (pydicom reads a cut value short). Either way the file was cut."""
    tags = list(ds.keys())
    if not tags:
        return None
    element = ds.get_item(max(tags))
    value_tell, length = getattr(element, "value_tell", None), getattr(element, "length", None)
    if value_tell is None or length is None or length == 0xFFFFFFFF:
        return None
    end = value_tell + length
    return end if end != size else None


def _sop_class_name(ds) -> str:
    meta = getattr(ds, "file_meta", None)
    uid = (meta.get("MediaStorageSOPClassUID") if meta is not None else None) or ds.get("SOPClassUID")
    name = getattr(uid, "name", "") if uid else ""
    return f"({name}) " if name else ""


def _dicom_source_info(path: str, size: int, ds, dicom_decoder: str,
                       accept_modalities: tuple[str, ...] | None = None) -> SourceInfo:
    rows, columns = int(ds.Rows), int(ds.Columns)
    if "PixelData" not in ds:
        cut_at = _end_of_complete_elements(ds, size)
        if cut_at is not None:
            raise DataError(f"{path}: DICOM is truncated: the file ends at byte {size}, inside its header, before its "
                            "pixel data; re-export or re-copy the file")
        raise DataError(f"{path}: DICOM has no pixel data (a report or structured document?); remove the row")
    if rows < MIN_SOURCE_PIXELS or columns < MIN_SOURCE_PIXELS:
        raise DataError(f"{path}: DICOM image is {rows}×{columns} pixels; too small to be a radiograph")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise DataError(f"{path}: DICOM has {frames} frames; a radiograph row must be a single image")
    check_pixel_count(path, "DICOM", columns, rows, frames)
    if accept_modalities is not None:
        _check_modality(path, ds, accept_modalities)
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if not (photometric in ("MONOCHROME1", "MONOCHROME2", "RGB") or photometric.startswith("YBR")):
        raise DataError(f"{path}: DICOM photometric interpretation {photometric or 'missing'} is not a "
                        "radiograph's (MONOCHROME1/2, or RGB/YBR for secondary captures)")
    syntax = _transfer_syntax(ds)
    element = ds.get_item("PixelData")
    offset = getattr(element, "value_tell", None)
    if syntax in _NATIVE_SYNTAXES:
        _check_native_length(path, size, ds, element, offset, rows, columns, frames, photometric)
    elif offset is not None and offset >= size:
        raise DataError(f"{path}: DICOM is truncated: the compressed pixel data is missing")
    tfio_can = syntax in _TFIO_SYNTAXES and photometric in ("MONOCHROME1", "MONOCHROME2")
    # pydicom (without extra plugins) cannot decode JPEG lossless; tensorflow-io keeps those.
    pydicom_can = syntax != _JPEG_LOSSLESS
    use_tfio = tfio_can and (dicom_decoder == "tensorflow-io" or not pydicom_can)
    decoder = DECODER_TFIO_DICOM if use_tfio else DECODER_PYDICOM
    return SourceInfo(path, decoder, rows, columns)


def _check_modality(path: str, ds, accept_modalities: tuple[str, ...]) -> None:
    accepted = {str(code).strip().upper() for code in accept_modalities}
    modality = str(ds.get("Modality", "") or "").strip().upper() or NO_MODALITY.upper()
    if modality in accepted:
        return
    if modality == NO_MODALITY.upper():
        what, listed = "has no Modality element", NO_MODALITY
    else:
        name = _MODALITY_NAMES.get(modality)
        what, listed = f"is Modality {modality}" + (f" ({name})" if name else ""), modality
    codes = ", ".join([*sorted(accepted), listed])
    raise DataError(f"{path}: DICOM {what}, not {' or '.join(sorted(accepted))}: it is refused as a radiograph. "
                    f"Remove the row, or, if this archive labels its radiographs so, set data.accept_modalities: "
                    f"[{codes}] in the job")


def _check_native_length(path: str, size: int, ds, element, offset, rows: int, columns: int, frames: int,
                         photometric: str) -> None:
    """Uncompressed pixel data must hold exactly what Rows × Columns × frames need (plus DICOM's one padding byte
    to an even length): less is a cut file, more means Rows or Columns is wrong and the image would be read
    cut or sheared."""
    bits = int(ds.get("BitsAllocated", 16))
    # YBR_FULL_422 stores two samples per pixel (Y Y Cb Cr for each pair of pixels).
    samples = 2 if photometric == "YBR_FULL_422" else int(ds.get("SamplesPerPixel", 1))
    expected = (rows * columns * frames * samples * bits + 7) // 8
    length = element.length if hasattr(element, "length") else len(element.value)
    available = size - offset if offset is not None else length
    shape = f"Rows × Columns = {rows}×{columns}" + (f" × {frames} frames" if frames > 1 else "")
    if min(length, available) < expected:
        raise DataError(f"{path}: DICOM is truncated: its pixel data has {min(length, available)} of the "
                        f"{expected} bytes that {rows}×{columns} pixels need; re-export or re-copy the file")
    if length > expected + expected % 2:
        raise DataError(f"{path}: DICOM pixel data has {length} bytes, but {shape} ({bits}-bit, {samples} sample(s) "
                        f"per pixel) need {expected}: Rows or Columns is wrong, so the image would be read cut or "
                        "sheared; fix the header or re-export the file")


def _transfer_syntax(ds) -> str:
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    return syntax or "1.2.840.10008.1.2"  # no meta header: DICOM's default, implicit VR little endian
