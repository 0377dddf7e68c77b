"""CT: correct HU from real slices, spatial order along the slice normal, canonical orientation, bad volumes."""

import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from dpmedtf.data import volume as V
from dpmedtf.data.cache import PreprocessSpec, prepare
from dpmedtf.data.manifests import load_manifest
from dpmedtf.errors import DataError
from tests.data.conftest import copy_to

DPMEDTF = str(Path(sys.executable).with_name("dpmedtf"))
REAL_SERIES = Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests" / "77654033" / "CT2"


def test_real_ct_slice_is_in_hounsfield_units(tmp_path):
    folder = tmp_path / "ct"
    folder.mkdir()
    copy_to(folder, Path(get_testdata_file("693_UNCR.dcm")), "slice.dcm")
    hu = V.load_hu(folder)
    assert hu.shape == (1, 512, 512)
    inside = hu[hu > -2000]  # the scanner's outside-the-field padding is −3024
    assert -1050 < np.percentile(inside, 5) < -950  # air, before any windowing
    window = V.window(hu)
    assert window.min() == 0.0 and window.max() == 1.0
    assert np.all(window[hu <= -150] == 0) and np.all(window[hu >= 250] == 1)


def test_real_series_is_assembled_along_the_slice_normal(tmp_path):
    # pydicom-data's CT2 holds instances 18 and 180–182 of one series: 180–182 are contiguous (1.25 mm apart).
    folder = tmp_path / "ct2"
    folder.mkdir()
    for name in ("17196", "17136", "17166"):
        copy_to(folder, REAL_SERIES / name, name)
    hu = V.load_hu(folder)
    datasets = sorted((pydicom.dcmread(p) for p in folder.iterdir()), key=lambda d: float(d.ImagePositionPatient[2]))
    assert hu.shape == (3, 16, 16)
    for depth, ds in enumerate(datasets):  # depth runs inferior → superior
        expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        # Standard axial orientation (rows → posterior, columns → patient's left) already is the radiological view.
        np.testing.assert_array_equal(hu[depth], expected)


def scrambled_series(tmp_path, orientation, normal_axis):
    """Copies of a real CT slice header, each filled with a constant that encodes its spatial rank along
    the slice normal, written with InstanceNumbers and file names in an unrelated order."""
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    folder = tmp_path / "series"
    folder.mkdir()
    order = [3, 0, 4, 1, 2]  # spatial rank of the slice written as file k
    for k, rank in enumerate(order):
        ds = source.copy()
        ds.ImageOrientationPatient = orientation
        position = np.zeros(3)
        position[normal_axis] = 5.0 * rank
        ds.ImagePositionPatient = list(position)
        ds.InstanceNumber = k + 1  # file order, deliberately not spatial order
        ds.PixelData = np.full(ds.pixel_array.shape, 1024 + 100 * rank, np.int16).tobytes()  # HU = 100·rank
        ds.save_as(folder / f"slice_{k}.dcm")
    return folder


def test_real_series_with_missing_slices_is_refused_naming_the_gap():
    # Instance 18 lies 202.5 mm below instance 180: 161 slices of 1.25 mm are not in the folder.
    with pytest.raises(DataError) as info:
        V.load_hu(REAL_SERIES)
    message = str(info.value)
    for fragment in (str(REAL_SERIES), "has a gap", "between slices 17106", "and 17136", "step is 202.5 mm",
                     "series' step is 1.25 mm", "161 slice(s) are missing"):
        assert fragment in message, message


def write_series(folder: Path, heights, modality="CT", values=None, tilt=(0.0, 0.0)) -> Path:
    """Axial slices of a real CT header at ``heights`` (mm along +z), file k holding HU ``values[k]``
    (default 100·k); ``tilt`` shifts each slice in-plane per mm of height (a gantry-tilted series)."""
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    folder.mkdir()
    for k, height in enumerate(heights):
        ds = source.copy()
        ds.Modality = modality
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [tilt[0] * height, tilt[1] * height, height]
        value = 100 * k if values is None else values[k]
        ds.PixelData = np.full(ds.pixel_array.shape, 1024 + value, np.int16).tobytes()
        ds.save_as(folder / f"slice_{k}.dcm")
    return folder


@pytest.mark.parametrize("heights, fragments", [
    ([0, 5, 10, 20, 25, 30], ["has a gap", "between slices slice_2.dcm (at 10.00 mm", "slice_3.dcm (at 20.00 mm)",
                              "step is 10 mm where the series' step is 5 mm", "1 slice(s) are missing"]),
    ([0, 5, 15, 20, 30, 35], ["has a gap", "between slices slice_1.dcm", "1 slice(s) are missing there; 2 slice(s) are "
                              "missing in all"]),
    ([0, 5, 10, 16, 21, 26], ["unevenly spaced", "between slice_2.dcm (at 10.00 mm", "slice_3.dcm (at 16.00 mm)",
                              "step is 6 mm", "median step is 5 mm", "±10%"]),
    ([0, 5, 7.5, 12.5, 17.5], ["unevenly spaced", "between slice_1.dcm", "step is 2.5 mm"]),
])
def test_series_with_a_gap_or_uneven_spacing_is_refused_naming_the_slices(tmp_path, heights, fragments):
    folder = write_series(tmp_path / "series", heights)
    with pytest.raises(DataError) as info:
        V.load_hu(folder)
    message = str(info.value)
    assert message.startswith(str(folder)), message
    for fragment in fragments:
        assert fragment in message, message


def test_evenly_spaced_series_within_the_tolerance_and_a_tilted_gantry_are_accepted(tmp_path):
    # Positions rounded by the scanner (±0.2 mm of 5 mm) are even; so is a series sheared by gantry tilt.
    hu = V.load_hu(write_series(tmp_path / "rounded", [0, 5.2, 9.9, 15.1, 20]))
    assert [float(np.unique(hu[d])[0]) for d in range(5)] == [0, 100, 200, 300, 400]
    assert V.load_hu(write_series(tmp_path / "tilted", [0, 5, 10, 15], tilt=(0.0, 0.3))).shape == (4, 128, 128)


def test_non_ct_series_is_refused_unless_its_modality_is_accepted(tmp_path):
    folder = write_series(tmp_path / "mr", [0, 5, 10], modality="MR")
    with pytest.raises(DataError) as info:
        V.load_hu(folder)
    message = str(info.value)
    for fragment in (str(folder / "slice_0.dcm"), "is Modality MR, not CT", "not Hounsfield units",
                     "data.accept_modalities: [CT, MR]"):
        assert fragment in message, message
    assert V.load_hu(folder, accept_modalities=("CT", "MR")).shape == (3, 128, 128)  # the override works
    with pytest.raises(DataError, match="has no Modality element"):
        V.load_hu(write_series(tmp_path / "none", [0, 5, 10], modality=""))


def test_blank_volumes_are_refused(tmp_path):
    folder = write_series(tmp_path / "blank", [0, 5, 10], values=[-1000, -1000, -1000])
    with pytest.raises(DataError, match=r"volume is blank: every one of its 49152 voxels is -1000 HU"):
        V.load_hu(folder)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(tmp_path / "zeros.nii.gz"))
    with pytest.raises(DataError, match=r"zeros.nii.gz: volume is blank"):
        V.load_hu(tmp_path / "zeros.nii.gz")


def nifti_with_sform(path: Path, affine) -> Path:
    image = nib.Nifti1Image(np.random.default_rng(0).normal(size=(4, 4, 4)).astype(np.float32), None)
    image.header.set_sform(np.asarray(affine, float), code=1)
    image.header.set_qform(None, code=0)
    nib.save(image, str(path))
    return path


@pytest.mark.parametrize("affine, reason", [
    (np.diag([1.0, 1.0, 0.0, 1.0]), "affine is singular (voxel axis k of zero length"),
    ([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], "affine is singular (two voxel axes point the same way"),
    (np.full((4, 4), np.nan), "affine (voxel → patient coordinates) holds NaN or Inf"),
])
def test_nifti_with_an_unusable_affine_is_refused_in_dpmedtfs_words(tmp_path, affine, reason):
    path = nifti_with_sform(tmp_path / "v.nii.gz", affine)
    with pytest.raises(DataError) as info:
        V.load_hu(path)
    assert str(info.value).startswith(str(path)) and reason in str(info.value), str(info.value)
    assert "Error" not in str(info.value)  # no library exception names


def test_series_out_of_order_is_assembled_in_spatial_order_axial(tmp_path):
    hu = V.load_hu(scrambled_series(tmp_path, [1, 0, 0, 0, 1, 0], normal_axis=2))  # axial: normal +z (superior)
    assert hu.shape == (5, 128, 128)
    assert [float(np.unique(hu[d])[0]) for d in range(5)] == [0, 100, 200, 300, 400]  # depth runs inferior → superior


def test_series_sorted_along_an_oblique_normal_not_instance_number(tmp_path):
    # Sagittal slices: rows along +y, columns along −z, so the normal is +x (the patient's left in LPS).
    hu = V.load_hu(scrambled_series(tmp_path, [0, 1, 0, 0, 0, -1], normal_axis=0))
    assert hu.shape == (128, 128, 5)  # slices now lie along the width (right → left) axis
    assert [float(np.unique(hu[:, :, w])[0]) for w in range(5)] == [0, 100, 200, 300, 400]


def test_enhanced_ct_takes_rescale_from_functional_groups(tmp_path):
    folder = tmp_path / "enhanced"
    folder.mkdir()
    copy_to(folder, Path(get_testdata_file("eCT_Supplemental.dcm")), "ect.dcm")
    raw = pydicom.dcmread(folder / "ect.dcm").pixel_array
    hu = V.load_hu(folder)
    assert hu.shape == (2, 512, 512)
    assert hu.min() == raw.min() - 1024 and hu.max() == raw.max() - 1024  # intercept −1024 from the groups


def test_nifti_orientation_is_canonicalised(tmp_path):
    data = np.random.default_rng(0).normal(size=(6, 7, 8)).astype(np.float32)
    ras = np.diag([2.0, 2.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(data, ras), str(tmp_path / "ras.nii.gz"))
    las = ras.copy()
    las[0, 0] = -2.0  # x axis stored the other way round
    nib.save(nib.Nifti1Image(data[::-1].copy(), las), str(tmp_path / "las.nii.gz"))
    a, b = V.load_hu(tmp_path / "ras.nii.gz"), V.load_hu(tmp_path / "las.nii.gz")
    assert a.shape == (8, 7, 6)
    np.testing.assert_array_equal(a, b)


def test_trilinear_resize_keeps_constants_and_linear_ramps():
    constant = np.full((5, 6, 7), 0.25, np.float32)
    np.testing.assert_allclose(V.resize_trilinear(constant, (9, 4, 11)), 0.25, rtol=1e-6)
    ramp = np.broadcast_to(np.arange(8, dtype=np.float32)[:, None, None], (8, 4, 4))
    resized = V.resize_trilinear(ramp, (16, 4, 4))[:, 0, 0]
    centres = (np.arange(16) + 0.5) * 0.5 - 0.5  # half-voxel centres: align_corners=False
    np.testing.assert_allclose(resized[1:-1], centres[1:-1], atol=1e-6)
    assert V.preprocess(np.zeros((10, 20, 30)), (16, 24, 8)).shape == (8, 16, 24)


@pytest.mark.parametrize("make, reason", [
    (lambda d: nib.save(nib.Nifti1Image(np.full((4, 4, 4), np.nan, np.float32), np.eye(4)), str(d / "v.nii.gz")), "NaN/Inf"),
    (lambda d: nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)), str(d / "v.nii.gz")), "4 dimensions"),
    (lambda d: nib.save(nib.Nifti1Image(np.zeros((4, 4), np.float32), np.eye(4)), str(d / "v.nii.gz")), "2 dimensions"),
    (lambda d: nib.save(nib.Nifti1Image(np.zeros((4, 0, 4), np.float32), np.eye(4)), str(d / "v.nii.gz")),
     "volume has shape (4, 0, 4), so no voxels"),
    (lambda d: (d / "v.nii.gz").write_bytes(b""), "file is empty"),
    (lambda d: (d / "v.nii.gz").write_text("not a volume" * 30), "not a readable NIfTI"),
    (lambda d: (d / "v.nii.gz").mkdir(), "folder contains no files"),
    (lambda d: (d / "v.mha").write_text("x"), "must be a NIfTI file"),
])
def test_bad_volumes_are_refused_naming_the_file(tmp_path, make, reason):
    make(tmp_path)
    target = tmp_path / ("v.mha" if reason == "must be a NIfTI file" else "v.nii.gz")
    with pytest.raises(DataError) as info:
        V.load_hu(target)
    assert str(target) in str(info.value) and reason in str(info.value), str(info.value)


def test_mixed_series_and_inf_in_a_manifest(tmp_path, synthetic_cohort):
    folder = tmp_path / "mixed"
    folder.mkdir()
    copy_to(folder, Path(get_testdata_file("693_UNCR.dcm")), "a.dcm")
    copy_to(folder, Path(get_testdata_file("CT_small.dcm")), "b.dcm")
    with pytest.raises(DataError, match="different series"):
        V.load_hu(folder)
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), np.inf, np.float32), np.eye(4)), str(tmp_path / "inf.nii.gz"))
    (tmp_path / "ct.csv").write_text(f"volume_path,patient_id,sex,age,label\ninf.nii.gz,C1,F,60,1\n")
    cohort = load_manifest(tmp_path / "ct.csv", "volume")
    with pytest.raises(DataError, match=r"ct.csv line 2: .*inf.nii.gz: volume contains 64 NaN/Inf"):
        prepare(cohort, PreprocessSpec("volume", volume_shape=(8, 8, 8)), tmp_path / "cache")


def test_synthetic_volumes_prepare_and_cli(synthetic_cohort, tmp_path):
    cohort = load_manifest(synthetic_cohort["volume"], "volume")
    prepared = prepare(cohort, PreprocessSpec("volume", volume_shape=(32, 32, 16)), tmp_path)
    assert prepared.array.shape == (8, 16, 32, 32) and prepared.array.dtype == np.float16
    first = cohort.frame.loc[0, "path"]
    np.testing.assert_allclose(prepared.array[0], V.preprocess_file(first, (32, 32, 16)), atol=1e-3)
    out = tmp_path / "view.nii.gz"
    result = subprocess.run([DPMEDTF, "preprocess", "volume", first, "--out", str(out), "--shape", "32", "32", "16"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    written = nib.load(str(out)).get_fdata()
    assert written.shape == (32, 32, 16) and 0 <= written.min() and written.max() <= 1
