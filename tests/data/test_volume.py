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
    hu = V.load_hu(REAL_SERIES)
    datasets = sorted((pydicom.dcmread(p) for p in REAL_SERIES.iterdir()), key=lambda d: float(d.ImagePositionPatient[2]))
    assert hu.shape == (4, 16, 16)
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
