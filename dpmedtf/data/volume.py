"""CT volumes: NIfTI or DICOM series → Hounsfield units → the paper's windowed, resized volume.

Both sources go through one orientation path: DICOM slices get an affine from their positions and
orientation (sorted along the slice normal, never by InstanceNumber) and are handed to nibabel like
a NIfTI file, which brings either to RAS+ (``as_closest_canonical``). The model then sees
(depth, height, width) = (inferior→superior slices, anterior→posterior rows, right→left columns):
axial slices as a radiologist views them.

HU: per-slice RescaleSlope/Intercept, or for enhanced multi-frame CT the PixelValueTransformation in
the per-frame or shared functional groups (pydicom's modality LUT does not look there).
Preprocessing (paper): clip to −150…250 HU, scale to [0, 1], trilinear resize to 224×224×128 (H×W×D).

What is refused, because resampling would silently distort it or it is not CT at all:
- a series whose slices are not evenly spaced along the slice normal: the spacing is measured between
  neighbouring slices, and a step more than ``SLICE_SPACING_TOLERANCE`` (10 %) away from the series' median
  step is a missing slice (a whole multiple of the step) or uneven spacing, named with the two slices;
- a series whose Modality is not in ``accept_modalities`` (default CT: an MR or PET series has no Hounsfield
  units; ``data.accept_modalities`` overrides it for unusual archives), or whose pixels are not greyscale;
- a constant (blank) volume, and a NIfTI whose affine is singular or not finite (its orientation is unknown).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dpmedtf.errors import ConfigError, DataError, OutputError

DEFAULT_VOLUME_SHAPE = (224, 224, 128)  # (H, W, D), as the paper states it
DEFAULT_HU_WINDOW = (-150.0, 250.0)
DEFAULT_ACCEPTED_MODALITIES = ("CT",)
SLICE_SPACING_TOLERANCE = 0.10
"""A step between neighbouring slices may differ from the series' median step by this fraction."""
NO_MODALITY = "unknown"
"""How a DICOM without a Modality element counts against ``accept_modalities``."""
_NIFTI_SUFFIXES = (".nii", ".nii.gz")


def load_hu(path: str | os.PathLike, accept_modalities=DEFAULT_ACCEPTED_MODALITIES) -> np.ndarray:
    """float32 (D, H, W) in Hounsfield units, canonically oriented, from a NIfTI file or DICOM folder.
    A DICOM series must have one of ``accept_modalities`` (DICOM Modality codes, e.g. CT)."""
    import nibabel as nib

    path = Path(path)
    if path.is_dir():
        data, affine = _dicom_series(path, accept_modalities)
        image = nib.Nifti1Image(data, affine)
    elif path.is_file():
        if path.stat().st_size == 0:
            raise DataError(f"{path}: file is empty (0 bytes)")
        if not path.name.lower().endswith(_NIFTI_SUFFIXES):
            raise DataError(f"{path}: a CT volume must be a NIfTI file (.nii, .nii.gz) or a folder of DICOM slices")
        try:
            image = nib.load(str(path))
            image.get_fdata(dtype=np.float32)  # force the read so a corrupt file fails here
        except Exception as exc:  # nibabel raises a variety of types for bad files
            raise DataError(f"{path}: not a readable NIfTI volume ({type(exc).__name__}: {exc})") from None
    else:
        raise DataError(f"{path}: volume not found")
    if image.ndim == 4 and image.shape[3] == 1:
        image = image.slicer[..., 0]
    if image.ndim != 3:
        raise DataError(f"{path}: volume has {image.ndim} dimensions {tuple(image.shape)}; a CT volume has 3")
    if min(image.shape) < 1:
        raise DataError(f"{path}: volume has shape {tuple(image.shape)}, so no voxels (an empty export?); "
                        "re-export the volume")
    _check_affine(path, np.asarray(image.affine, float))
    try:
        canonical = nib.as_closest_canonical(image)
        hu = np.asarray(canonical.get_fdata(dtype=np.float32))
    except Exception as exc:  # what _check_affine cannot foresee: still the orientation, still this file
        raise DataError(f"{path}: the volume's orientation (affine) is unusable ({type(exc).__name__}: {exc}); "
                        "fix the conversion that produced it") from None
    if not np.isfinite(hu).all():
        raise DataError(f"{path}: volume contains {int((~np.isfinite(hu)).sum())} NaN/Inf voxel(s); "
                        "fix the conversion that produced it")
    if hu.max() == hu.min():
        raise DataError(f"{path}: volume is blank: every one of its {hu.size} voxels is {float(hu.flat[0]):g} HU; "
                        "a failed or empty export? Re-export the volume, or remove the row")
    # RAS+ (x: →Right, y: →Anterior, z: →Superior) to (z, rows anterior→posterior, columns right→left).
    return np.ascontiguousarray(hu[::-1, ::-1, :].transpose(2, 1, 0))


def _check_affine(path: Path, affine: np.ndarray) -> None:
    """DataError unless the voxel axes of ``affine`` are finite and independent (a volume has an orientation)."""
    axes = affine[:3, :3]
    if not np.isfinite(affine).all():
        raise DataError(f"{path}: the volume's affine (voxel → patient coordinates) holds NaN or Inf, so its "
                        "orientation is unknown; fix the conversion that produced it")
    lengths = np.linalg.norm(axes, axis=0)
    if lengths.min() == 0 or abs(np.linalg.det(axes / lengths)) < 1e-6:
        zero = [axis for axis, length in zip("ijk", lengths) if length == 0]
        why = (f"voxel {'axis' if len(zero) == 1 else 'axes'} {', '.join(zero)} of zero length" if zero
               else "two voxel axes point the same way")
        raise DataError(f"{path}: the volume's affine is singular ({why}: {np.round(axes, 4).tolist()}), so its "
                        "orientation and voxel spacing are unknown; fix the conversion that produced it")


def _dicom_series(folder: Path, accept_modalities=DEFAULT_ACCEPTED_MODALITIES) -> tuple[np.ndarray, np.ndarray]:
    """(columns, rows, slices) HU array and its RAS affine, from the DICOM files in ``folder``."""
    import pydicom

    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise DataError(f"{folder}: folder contains no files; a DICOM series folder holds one file per slice")
    datasets = []
    for file in files:
        try:
            ds = pydicom.dcmread(file, force=file.suffix.lower() != ".dcm")
            ds.Rows  # noqa: B018  (a file without an image header fails here)
        except AttributeError:
            raise DataError(f"{file}: not a DICOM image slice (no image header); a series folder must hold only "
                            "the slices of one series") from None
        except Exception as exc:  # InvalidDicomError, EOFError, struct and value errors, … for a damaged file
            raise DataError(f"{file}: not a readable DICOM slice ({type(exc).__name__}: {exc})") from None
        if "PixelData" not in ds:
            raise DataError(f"{file}: DICOM has no pixel data; remove it from the series folder")
        datasets.append(ds)
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series) > 1:
        raise DataError(f"{folder}: holds {len(series)} different series; give each series its own folder")
    _check_content(folder, datasets, files, accept_modalities)
    try:
        if len(datasets) == 1 and int(datasets[0].get("NumberOfFrames", 1) or 1) > 1:
            slices, positions, orientation, spacing = _enhanced_frames(datasets[0], files[0])
            names = [f"{files[0].name} frame {k + 1}" for k in range(len(slices))]
        else:
            slices, positions, orientation, spacing = _classic_slices(datasets, files)
            names = [file.name for file in files]
    except DataError:
        raise
    except Exception as exc:  # malformed geometry elements (wrong count, not numbers, missing sequences)
        raise DataError(f"{folder}: the series' geometry (positions, orientation, spacing) cannot be read "
                        f"({type(exc).__name__}: {exc}); re-export the series") from None
    row_cosine, column_cosine = orientation[:3], orientation[3:]
    normal = np.cross(row_cosine, column_cosine)
    order = np.argsort(positions @ normal, kind="stable")
    positions = positions[order]
    volume = np.stack([slices[i] for i in order], axis=-1)  # (rows, columns, slices)
    if len(positions) > 1:
        distances = np.diff(positions @ normal)
        if np.any(distances < 1e-3):
            raise DataError(f"{folder}: two slices share a position; the folder mixes series or holds duplicates")
        _check_even_spacing(folder, positions @ normal, [names[i] for i in order])
        step = (positions[-1] - positions[0]) / (len(positions) - 1)  # evenly spaced: the mean step is every step
    else:
        step = normal * spacing[2]
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_cosine * spacing[1]     # along a row: increasing column index
    affine_lps[:3, 1] = column_cosine * spacing[0]  # down a column: increasing row index
    affine_lps[:3, 2] = step
    affine_lps[:3, 3] = positions[0]
    affine_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps  # DICOM is LPS, NIfTI RAS
    return volume.transpose(1, 0, 2), affine_ras


def _check_content(folder: Path, datasets, files, accept_modalities) -> None:
    """DataError unless every file is a greyscale image of an accepted modality (CT by default)."""
    accepted = {str(m).strip().upper() for m in accept_modalities}
    for ds, file in zip(datasets, files):
        modality = str(ds.get("Modality", "") or "").strip().upper() or NO_MODALITY.upper()
        if modality not in accepted:
            what = "has no Modality element" if modality == NO_MODALITY.upper() else f"is Modality {modality}"
            listed = ", ".join(sorted(accepted | {NO_MODALITY if modality == NO_MODALITY.upper() else modality}))
            raise DataError(f"{file}: the series in {folder} {what}, not {' or '.join(sorted(accepted))}: its pixel "
                            f"values are not Hounsfield units, so it is refused as a CT volume. Remove the row, or, if "
                            f"this archive labels CT oddly, set data.accept_modalities: [{listed}]")
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2").strip().upper()
        if samples != 1 or not photometric.startswith("MONOCHROME"):
            raise DataError(f"{file}: the slice is a colour image ({photometric}, {samples} samples per pixel); a CT "
                            "slice is greyscale (MONOCHROME2). Is it a secondary capture or a screenshot? Remove it "
                            "from the series folder")


def _check_even_spacing(folder: Path, heights: np.ndarray, names: list[str]) -> None:
    """DataError naming the first gap when neighbouring slices (sorted ``heights`` along the normal, mm) are
    not evenly spaced within ``SLICE_SPACING_TOLERANCE`` of the median step."""
    steps = np.diff(heights)
    if len(steps) < 2:
        return  # two slices: one step, nothing to compare it with
    expected = float(np.median(steps))
    off = np.abs(steps - expected) > SLICE_SPACING_TOLERANCE * expected
    if not off.any():
        return
    # Most steps equal and the odd ones whole multiples of them: slices missing from an even series.
    multiples = steps / expected
    whole = (np.round(multiples) >= 2) & (np.abs(multiples - np.round(multiples)) <= SLICE_SPACING_TOLERANCE)
    if np.all(whole[off]):
        i = int(np.flatnonzero(off)[0])
        count = int(np.round(multiples[i])) - 1
        total = int(np.sum(np.round(multiples[off]) - 1))
        more = f"; {total} slice(s) are missing in all" if total > count else ""
        raise DataError(
            f"{folder}: the series has a gap: between slices {names[i]} (at {heights[i]:.2f} mm along the slice "
            f"normal) and {names[i + 1]} (at {heights[i + 1]:.2f} mm) the step is {steps[i]:.4g} mm where the series' "
            f"step is {expected:.4g} mm, so {count} slice(s) are missing there{more}. Resampling would stretch the "
            "anatomy across the gap; re-export the complete series, or remove the row")
    i = int(np.flatnonzero(off)[0])
    raise DataError(
        f"{folder}: the slices are unevenly spaced: between {names[i]} (at {heights[i]:.2f} mm along the slice "
        f"normal) and {names[i + 1]} (at {heights[i + 1]:.2f} mm) the step is {steps[i]:.4g} mm, but the series' "
        f"median step is {expected:.4g} mm (tolerance ±{SLICE_SPACING_TOLERANCE:.0%}; steps range "
        f"{steps.min():.4g}–{steps.max():.4g} mm). dpmedtf resamples on an even grid, which would distort this "
        "series; re-export it with even spacing, or remove the row")


def _rescale(pixels: np.ndarray, holder) -> np.ndarray:
    slope = float(getattr(holder, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(holder, "RescaleIntercept", 0.0) or 0.0)
    return pixels.astype(np.float32) * slope + intercept


def _pixels(ds, file: Path) -> np.ndarray:
    try:
        return ds.pixel_array
    except Exception as exc:  # pydicom raises many types for undecodable or short pixel data
        raise DataError(f"{file}: DICOM pixel data cannot be decoded ({type(exc).__name__}: {exc})") from None


def _classic_slices(datasets, files):
    slices, positions = [], []
    orientation = None
    for ds, file in zip(datasets, files):
        if "ImagePositionPatient" not in ds or "ImageOrientationPatient" not in ds:
            raise DataError(f"{file}: slice has no ImagePositionPatient/ImageOrientationPatient; its place "
                            "in the volume is unknown")
        this = np.asarray(ds.ImageOrientationPatient, float)
        if orientation is None:
            orientation = this
        elif not np.allclose(this, orientation, atol=1e-4):
            raise DataError(f"{file}: slice orientation differs from the rest of the series")
        slices.append(_rescale(_pixels(ds, file), ds))
        positions.append(np.asarray(ds.ImagePositionPatient, float))
    if len({s.shape for s in slices}) > 1:
        raise DataError(f"{files[0].parent}: slices have different sizes {sorted({s.shape for s in slices})}")
    first = datasets[0]
    spacing = [*map(float, first.get("PixelSpacing", [1.0, 1.0])), float(first.get("SliceThickness", 1.0) or 1.0)]
    return slices, np.asarray(positions), orientation, spacing


def _enhanced_frames(ds, file: Path):
    """Frames of an enhanced multi-frame CT: geometry and rescale live in the functional groups."""
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else None
    per_frame = ds.PerFrameFunctionalGroupsSequence

    def group(frame, keyword):
        if keyword in frame:
            return frame[keyword].value[0]
        if shared is not None and keyword in shared:
            return shared[keyword].value[0]
        raise DataError(f"{file}: enhanced DICOM lacks {keyword} for its frames")

    pixels = _pixels(ds, file)
    slices, positions = [], []
    orientation = np.asarray(group(per_frame[0], "PlaneOrientationSequence").ImageOrientationPatient, float)
    for index, frame in enumerate(per_frame):
        slices.append(_rescale(pixels[index], group(frame, "PixelValueTransformationSequence")))
        positions.append(np.asarray(group(frame, "PlanePositionSequence").ImagePositionPatient, float))
    measures = group(per_frame[0], "PixelMeasuresSequence")
    spacing = [*map(float, measures.get("PixelSpacing", [1.0, 1.0])), float(measures.get("SliceThickness", 1.0) or 1.0)]
    return slices, np.asarray(positions), orientation, spacing


# --- the paper's preprocessing -------------------------------------------------------------------------

def window(hu: np.ndarray, hu_window=DEFAULT_HU_WINDOW) -> np.ndarray:
    """Clip to the HU window and scale it to [0, 1]."""
    low, high = hu_window
    return ((np.clip(hu, low, high) - low) / (high - low)).astype(np.float32)


def resize_trilinear(volume: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Separable linear interpolation on each axis with half-voxel centres (align_corners=False, as in
    PyTorch/MONAI), i.e. trilinear resampling."""
    out = volume.astype(np.float32, copy=False)
    for axis, size in enumerate(shape):
        out = _resize_axis(out, size, axis)
    return out


def _resize_axis(array: np.ndarray, size: int, axis: int) -> np.ndarray:
    length = array.shape[axis]
    if length == size:
        return array
    source = np.clip((np.arange(size) + 0.5) * (length / size) - 0.5, 0, length - 1)
    low = np.floor(source).astype(int)
    high = np.minimum(low + 1, length - 1)
    weight = (source - low).astype(np.float32)
    shape = [1] * array.ndim
    shape[axis] = size
    weight = weight.reshape(shape)
    return np.take(array, low, axis=axis) * (1 - weight) + np.take(array, high, axis=axis) * weight


def check_parameters(volume_shape, hu_window) -> None:
    """ConfigError unless the shape is three sizes ≥ 1 and the window's low is below its high."""
    if len(volume_shape) != 3 or any(int(size) < 1 for size in volume_shape):
        raise ConfigError(f"volume shape (--shape, data.volume_shape) must be three sizes H W D ≥ 1, "
                          f"got {list(volume_shape)}")
    low, high = hu_window
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise ConfigError(f"HU window (--hu-window, data.hu_window) must be two numbers LOW < HIGH, got {[low, high]}")


def preprocess(hu: np.ndarray, volume_shape=DEFAULT_VOLUME_SHAPE, hu_window=DEFAULT_HU_WINDOW) -> np.ndarray:
    """HU (D, H, W) → float32 (D, H, W) in [0, 1], resized to ``volume_shape`` given as (H, W, D)."""
    check_parameters(volume_shape, hu_window)
    height, width, depth = volume_shape
    return resize_trilinear(window(hu, hu_window), (depth, height, width))


def preprocess_file(path: str | os.PathLike, volume_shape=DEFAULT_VOLUME_SHAPE,
                    hu_window=DEFAULT_HU_WINDOW, accept_modalities=DEFAULT_ACCEPTED_MODALITIES) -> np.ndarray:
    """One NIfTI file or DICOM folder to what the model sees (before channel expansion)."""
    check_parameters(volume_shape, hu_window)  # before the read: a bad option is not the file's fault
    return preprocess(load_hu(path, accept_modalities), volume_shape, hu_window)


OUTPUT_SUFFIXES = (".nii", ".nii.gz", ".npy")


def check_output_path(out: str | os.PathLike) -> None:
    """ConfigError unless ``out`` names a NIfTI (.nii, .nii.gz) or NumPy (.npy) file."""
    if not str(out).lower().endswith(OUTPUT_SUFFIXES):
        raise ConfigError(f"{out}: a preprocessed volume is written as {', '.join(OUTPUT_SUFFIXES)}; "
                          "give --out one of those suffixes")


def save_npy(volume: np.ndarray, out: str | os.PathLike) -> Path:
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        np.save(out, volume)
    except OSError as exc:
        raise OutputError(f"{out}: cannot write the volume ({exc.strerror or exc}); choose another --out") from None
    return out


def save_nifti(volume: np.ndarray, out: str | os.PathLike) -> Path:
    """Writes a (D, H, W) model-view volume as NIfTI, with an affine that states its orientation."""
    import nibabel as nib

    out = Path(out)
    if not out.name.lower().endswith(_NIFTI_SUFFIXES):
        raise ConfigError(f"{out}: a NIfTI file name ends in .nii or .nii.gz")
    # (D, H, W) = (z ↑, rows anterior→posterior, columns right→left) back to RAS voxel axes.
    ras = np.ascontiguousarray(volume.transpose(2, 1, 0)[::-1, ::-1, :])
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(ras.astype(np.float32), np.eye(4)), str(out))
    except OSError as exc:
        raise OutputError(f"{out}: cannot write the volume ({exc.strerror or exc}); choose another --out") from None
    return out
