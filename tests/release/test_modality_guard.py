"""The modality guard on real files: a CT slice is refused by a chest-radiograph model unless the user
overrides it (and the override is recorded), headers of NIfTI volumes and DICOM series are judged
for CT models, and a folder given to a radiograph model is every file under it."""

import shutil

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

import dpmedtf.release
from dpmedtf.errors import DataError
from dpmedtf.release.modality_guard import (RADIOGRAPH_EXPECTED_INPUT, VOLUME_EXPECTED_INPUT, check_input,
                                            check_inputs, expected_input_of)
from dpmedtf.release.predict import expand_inputs, predict_files

CT_SLICE = get_testdata_file("CT_small.dcm")  # Modality CT, 128×128: passes the radiograph inspection
MR_SLICE = get_testdata_file("MR_small.dcm")
REAL_RADIOGRAPH = get_testdata_file("RG1_UNCR.dcm")  # CR, MONOCHROME1, BodyPartExamined CHEST


@pytest.fixture(scope="module")
def loaded(bundle, keys):
    return dpmedtf.release.load(bundle, keys / "publisher.pub")


def write_png(path, size=48):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size), dtype=np.uint8)).save(path)
    return path


def test_bundles_state_what_they_expect_and_old_bundles_get_their_modalitys_default(loaded):
    assert loaded.metadata["expected_input"] == RADIOGRAPH_EXPECTED_INPUT
    assert loaded.metadata["expected_input"]["dicom_modalities"] == ["CR", "DX"]
    assert expected_input_of({"preprocessing": {"modality": "radiograph"}}) == RADIOGRAPH_EXPECTED_INPUT
    assert expected_input_of({"preprocessing": {"modality": "volume"}}) == VOLUME_EXPECTED_INPUT


def test_a_ct_slice_is_refused_by_a_radiograph_model_naming_file_header_and_expectation(loaded):
    with pytest.raises(DataError) as refused:
        predict_files(loaded, [REAL_RADIOGRAPH, CT_SLICE])
    message = str(refused.value)
    assert "\n" not in message
    for part in (CT_SLICE, "Modality CT", "CR/DX", "--allow-modality-mismatch"):
        assert part in message, message
    assert REAL_RADIOGRAPH + ":" not in message  # the radiograph itself is fine


def test_with_the_override_the_ct_slice_is_predicted_and_the_override_recorded(loaded, tmp_path):
    png = write_png(tmp_path / "image.png")
    frame = predict_files(loaded, [CT_SLICE, REAL_RADIOGRAPH, png], allow_modality_mismatch=True)
    assert list(frame["modality_check"]) == ["overridden: Modality CT, expected CR/DX", "ok", "no header (PNG)"]
    assert list(frame["input"]) == [CT_SLICE, REAL_RADIOGRAPH, str(png)]
    assert frame[[f"{n}_prob" for n in loaded.labels]].notna().all().all()


def test_other_dicom_fields_are_judged_where_present(tmp_path):
    import pydicom

    ds = pydicom.dcmread(REAL_RADIOGRAPH)
    ds.BodyPartExamined, ds.PhotometricInterpretation = "ABDOMEN", "RGB"
    ds.save_as(tmp_path / "abdomen.dcm")
    check = check_input(tmp_path / "abdomen.dcm", RADIOGRAPH_EXPECTED_INPUT, "radiograph")
    assert set(check.mismatches) == {"BodyPartExamined ABDOMEN, expected CHEST/THORAX",
                                     "PhotometricInterpretation RGB, expected MONOCHROME1/MONOCHROME2"}
    del ds.BodyPartExamined
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.Modality = "DX"
    ds.save_as(tmp_path / "dx.dcm")
    assert check_input(tmp_path / "dx.dcm", RADIOGRAPH_EXPECTED_INPUT, "radiograph").record() == "ok"


def test_ct_models_judge_nifti_dimensions_and_series_modality(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.float32), np.eye(4)), str(tmp_path / "volume.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), str(tmp_path / "slice.nii.gz"))
    ct_series, mr_series = tmp_path / "ct", tmp_path / "mr"
    for folder, source in ((ct_series, CT_SLICE), (mr_series, MR_SLICE)):
        folder.mkdir()
        shutil.copyfile(source, folder / "1.dcm")
    checks = check_inputs([tmp_path / "volume.nii.gz", ct_series], VOLUME_EXPECTED_INPUT, "volume")
    assert [c.record() for c in checks] == ["ok", "ok"]
    with pytest.raises(DataError, match=r"slice.nii.gz: its NIfTI header says 2 dimensions .*expected 3"):
        check_inputs([tmp_path / "slice.nii.gz"], VOLUME_EXPECTED_INPUT, "volume")
    with pytest.raises(DataError, match=r"mr: its DICOM series header says Modality MR \(e.g. 1.dcm\), expected CT"):
        check_inputs([mr_series], VOLUME_EXPECTED_INPUT, "volume")


def test_a_folder_is_every_non_hidden_file_under_it_sorted(loaded, tmp_path):
    folder = tmp_path / "study"
    write_png(folder / "b.png")
    write_png(folder / "a" / "z.png")
    shutil.copyfile(REAL_RADIOGRAPH, folder / "c.dcm")
    write_png(folder / ".thumbnail.png")
    write_png(folder / ".cache" / "x.png")
    expected = [folder / "a" / "z.png", folder / "b.png", folder / "c.dcm"]
    assert expand_inputs(loaded, [folder]) == expected
    frame = predict_files(loaded, [folder])
    assert list(frame["input"]) == [str(p) for p in expected]
    assert list(frame["modality_check"]) == ["no header (PNG)", "no header (PNG)", "ok"]

    (tmp_path / "empty" / ".hidden").mkdir(parents=True)
    with pytest.raises(DataError, match=r"empty: folder holds no \(non-hidden\) files"):
        expand_inputs(loaded, [tmp_path / "empty"])


def test_a_model_trained_on_widened_modalities_expects_them_at_predict():
    """A job that set data.accept_modalities: [CR, DX, CT] released a model that takes CT-labelled images."""
    from dpmedtf.release.bundle import _expected_input

    widened = _expected_input({"modality": "radiograph", "accept_modalities": ["CR", "DX", "CT"]})
    assert widened["dicom_modalities"] == ["CR", "DX", "CT"]
    assert _expected_input({"modality": "radiograph"}) == RADIOGRAPH_EXPECTED_INPUT
    assert check_input(CT_SLICE, widened, "radiograph").matches
    assert check_input(CT_SLICE, RADIOGRAPH_EXPECTED_INPUT, "radiograph").mismatches == ("Modality CT, expected CR/DX",)
