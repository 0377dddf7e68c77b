"""The consumer's preprocessing (numpy, pydicom, Pillow) gives the model exactly the input training gave it.

Training's side is dpmedtf's TensorFlow code itself (``radiograph.preprocess_file`` + ``to_model_input``,
and the cache + ``pipeline.model_inputs`` that training batches come from); the consumer's side must
match it on real CRs from pydicom-data, on the synthetic cohort, on PNG/JPEG variants and on CT. The
contract is one grey level (1/255 on the model input); the measured difference is zero pixels.
"""

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from dpmedtf.data import radiograph
from dpmedtf.data.cache import PreprocessSpec, prepare
from dpmedtf.data.labels import FINDINGS
from dpmedtf.data.manifests import load_manifest
from dpmedtf.data.pipeline import model_inputs
from dpmedtf.data.synthetic import SyntheticCohortSpec, draw_radiograph, write_synthetic_cohort
from dpmedtf.errors import DataError
from dpmedtf.release import preprocessing

ONE_GREY_LEVEL = 1 / 255
REAL_SERIES = Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests" / "77654033" / "CT2"


def radiograph_metadata(size: int, dicom_decoder: str = "tensorflow-io") -> dict:
    """The two parts of a bundle's metadata.json that preprocessing reads."""
    return {"preprocessing": PreprocessSpec("radiograph", image_size=size, dicom_decoder=dicom_decoder).as_dict(),
            "input": {"shape": ["batch", size, size, 3]}}


def training_input(path, size: int, dicom_decoder: str = "tensorflow-io") -> np.ndarray:
    return radiograph.to_model_input(radiograph.preprocess_file(path, size, dicom_decoder)).numpy()


def assert_same_input(consumer: np.ndarray, training: np.ndarray, what: str) -> None:
    assert consumer.shape == training.shape and consumer.dtype == np.float32, (consumer.shape, training.shape)
    difference = np.abs(consumer - training)
    differing = int((difference > 0).sum())
    levels = difference.max() * 255
    assert difference.max() <= ONE_GREY_LEVEL, f"{what}: {levels:.2f} grey levels, {differing} pixels"
    assert differing == 0, f"{what}: {differing} of {difference.size} values differ (max {levels:.2f} levels)"


def test_importing_and_running_it_never_imports_tensorflow(tmp_path):
    import json

    png = tmp_path / "grey.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48), dtype=np.uint8)).save(png)
    script = (
        "import sys, json\n"
        "import dpmedtf.release.preprocessing as p, dpmedtf.release.preprocess_graph as g\n"
        "assert 'tensorflow' not in sys.modules, 'imported tensorflow'\n"
        "metadata = json.loads(sys.argv[1])\n"
        "for path in sys.argv[2:]:\n"
        "    assert p.model_input(path, metadata).shape == (32, 32, 3)\n"
        "g.build_preprocess_graph(32)\n"
        "assert not {'tensorflow', 'tensorflow_io'} & set(sys.modules), 'imported tensorflow while running'\n")
    result = subprocess.run([sys.executable, "-c", script, json.dumps(radiograph_metadata(32)), str(png),
                             get_testdata_file("RG1_UNCR.dcm")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("decoder", ["tensorflow-io", "pydicom"])
@pytest.mark.parametrize("size", [32, 64, 512])
def test_the_real_chest_cr_gets_trainings_input(decoder, size):
    # RG1_UNCR: PA chest CR, MONOCHROME1, 15 bits; 512 is the paper's size, where equalisation spreads
    # any rounding flip widest (pydicom's max + min − x instead of DCMTK's inversion: 585 pixels, 7 levels).
    path = get_testdata_file("RG1_UNCR.dcm")
    assert preprocessing.decoder_name(path, decoder) == decoder
    assert_same_input(preprocessing.model_input(path, radiograph_metadata(size, decoder)),
                      training_input(path, size, decoder), f"RG1_UNCR at {size} via {decoder}")


@pytest.mark.parametrize("name", ["RG1_UNCI.dcm", "RG3_UNCR.dcm", "RG1_J2KR.dcm", "RG3_J2KI.dcm"])
def test_every_real_cr_in_pydicom_data_gets_trainings_input(name):
    # RG3: 10-bit CR (DCMTK's inversion steps at 512); J2KR/J2KI: JPEG 2000 lossless and lossy, which
    # training decodes with tensorflow-io and the consumer with pydicom.
    path = get_testdata_file(name)
    assert preprocessing.decoder_name(path) == "tensorflow-io"
    assert_same_input(preprocessing.model_input(path, radiograph_metadata(64)), training_input(path, 64), name)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR2_UNCR.dcm", "mlut_18.dcm", "examples_overlay.dcm"])
def test_tensorflow_ios_rendering_is_reproduced_to_the_value(name):
    # Each exercises one DCMTK rule: signed data with an integer rescale (17 bits), a fractional rescale
    # slope (truncated intermediate values), a Modality LUT Sequence, a burnt-in graphics overlay.
    path = get_testdata_file(name)
    assert preprocessing.decoder_name(path) == "tensorflow-io"
    info = radiograph.inspect_radiograph(path)
    import tensorflow as tf

    decoded = radiograph.decode(tf.constant(info.path), tf.constant(info.decoder), tf.constant(info.rows),
                                tf.constant(info.columns)).numpy()
    np.testing.assert_array_equal(preprocessing.decode_radiograph(path), decoded)
    assert_same_input(preprocessing.model_input(path, radiograph_metadata(64)), training_input(path, 64), name)


def test_the_synthetic_cohort_gets_the_input_training_batches_hold(tmp_path):
    # PNG (16-bit), MONOCHROME1 and MONOCHROME2 DICOMs, through training's own cache and batch code.
    cohort = load_manifest(write_synthetic_cohort(tmp_path / "cohort", SyntheticCohortSpec(
        patients=12, image_size=48, dicom_fraction=0.5, seed=5))["radiograph"], "radiograph")
    spec = PreprocessSpec("radiograph", image_size=32)
    prepared = prepare(cohort, spec, tmp_path / "cache")
    trained_on = model_inputs(prepared.array, "radiograph").numpy()
    kinds = set()
    for row, path in enumerate(cohort.frame["path"]):
        dicom = str(path).endswith(".dcm")
        kinds.add(Path(path).suffix + (str(pydicom.dcmread(path).PhotometricInterpretation) if dicom else ""))
        assert_same_input(preprocessing.model_input(path, radiograph_metadata(32)), trained_on[row], path)
    assert kinds == {".png", ".dcmMONOCHROME1", ".dcmMONOCHROME2"}


def write_variants(folder: Path) -> dict[str, Path]:
    """One synthetic radiograph saved in every PNG/JPEG form training decodes."""
    grades = {finding: 2 for finding in FINDINGS}
    grey = np.round(draw_radiograph(np.random.default_rng(0), 96, grades, 50, "F") * 255).astype(np.uint8)
    colour = np.stack([grey, np.roll(grey, 5, 0), np.roll(grey, 9, 1)], axis=-1)
    images = {"grey8.png": (grey, {}), "grey1.png": (Image.fromarray(grey).convert("1"), {}),
              "grey4.png": (grey, {"bits": 4}), "rgb.png": (colour, {}),
              "palette.png": (Image.fromarray(colour).convert("P"), {}),
              "rgba.png": (np.concatenate([colour, grey[..., None]], -1), {}),
              "grey_alpha.png": (Image.fromarray(np.stack([grey, grey], -1), "LA"), {}),
              "grey.jpg": (grey, {"quality": 85}), "progressive.jpg": (grey, {"quality": 85, "progressive": True}),
              "grey_as_rgb420.jpg": (np.repeat(grey[..., None], 3, -1), {"quality": 85}),
              "colour444.jpg": (colour, {"quality": 85, "subsampling": 0})}
    paths = {}
    for name, (image, options) in images.items():
        image = image if isinstance(image, Image.Image) else Image.fromarray(image)
        image.save(folder / name, **options)
        paths[name] = folder / name
    return paths


def test_png_and_jpeg_variants_get_trainings_input(tmp_path):
    # 8-bit PNG samples are widened × 257 and JPEG × 256 by TensorFlow; JPEG is decoded with the fast DCT.
    for name, path in write_variants(tmp_path).items():
        for size in (32, 64):
            assert_same_input(preprocessing.model_input(path, radiograph_metadata(size)), training_input(path, size),
                              f"{name} at {size}")


def test_files_the_consumer_cannot_reproduce_are_refused_naming_the_file_and_the_fix(tmp_path):
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rgb16 = tmp_path / "rgb16.png"  # 16-bit colour: Pillow would keep 8 bits per channel
    rows = b"".join(b"\x00" + np.full((1, 40 * 3), 40000, ">u2").tobytes() for _ in range(40))
    rgb16.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 40, 40, 16, 2, 0, 0, 0))
                      + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (40, 40), (10, 20, 30, 40)).save(cmyk)
    cases = {rgb16: "16-bit colour", cmyk: "CMYK JPEG"}
    try:
        import libjpeg  # noqa: F401  (pylibjpeg-libjpeg: then JPEG lossless decodes, tested below)
    except ImportError:
        cases[Path(get_testdata_file("JPEG-LL.dcm"))] = "pip install pylibjpeg pylibjpeg-libjpeg"
    for path, reason in cases.items():
        with pytest.raises(DataError) as info:
            preprocessing.model_input(path, radiograph_metadata(32))
        assert str(path) in str(info.value) and reason in str(info.value), info.value


def test_jpeg_lossless_dicom_gets_trainings_input_when_pydicom_has_its_plugin():
    pytest.importorskip("libjpeg", reason="pylibjpeg-libjpeg is not installed (the refusal is tested above)")
    path = get_testdata_file("JPEG-LL.dcm")
    assert_same_input(preprocessing.model_input(path, radiograph_metadata(64)), training_input(path, 64), "JPEG-LL")


def test_bad_files_are_refused_with_trainings_reasons(tmp_path):
    from tests.data.test_radiograph import bad_inputs

    real_cr = Path(get_testdata_file("RG1_UNCR.dcm"))
    for name, (path, reason) in bad_inputs(tmp_path, real_cr).items():  # blank images and bombs included
        with pytest.raises(DataError) as info:
            preprocessing.decode_radiograph(path)
        assert str(path) in str(info.value) and reason in str(info.value), (name, str(info.value))


def volume_metadata(shape_hwd, channels: int = 1) -> dict:
    height, width, depth = shape_hwd
    return {"preprocessing": PreprocessSpec("volume", volume_shape=shape_hwd).as_dict(),
            "input": {"shape": ["batch", depth, height, width, channels]}}


def test_ct_volumes_get_the_input_training_batches_hold(tmp_path):
    # A real CT series folder (3 slices of pydicom-data's CT2), a real 512×512 slice, a synthetic NIfTI.
    series = tmp_path / "ct2"
    series.mkdir()
    for name in ("17196", "17136", "17166"):
        (series / name).write_bytes((REAL_SERIES / name).read_bytes())
    single = tmp_path / "ct693"
    single.mkdir()
    (single / "slice.dcm").write_bytes(Path(get_testdata_file("693_UNCR.dcm")).read_bytes())
    synthetic = write_synthetic_cohort(tmp_path / "cohort", SyntheticCohortSpec(
        patients=2, volumes=1, volume_shape=(20, 20, 10), seed=1))["volume"]
    nifti = load_manifest(synthetic, "volume").frame["path"][0]
    assert nib.load(nifti).shape == (20, 20, 10)
    manifest = tmp_path / "ct.csv"
    manifest.write_text("volume_path,patient_id,sex,age,label,split\n"
                        f"{series},C1,F,60,1,train\n{single},C2,M,70,0,train\n{nifti},C3,F,50,1,train\n")
    cohort = load_manifest(manifest, "volume")
    shape_hwd = (24, 24, 8)
    prepared = prepare(cohort, PreprocessSpec("volume", volume_shape=shape_hwd), tmp_path / "cache")
    for channels in (1, 3):
        trained_on = model_inputs(prepared.array, "volume", channels).numpy()
        for row, path in enumerate(cohort.frame["path"]):
            consumer = preprocessing.model_input(path, volume_metadata(shape_hwd, channels))
            assert consumer.shape == trained_on[row].shape == (8, 24, 24, channels)
            difference = np.abs(consumer - trained_on[row])
            assert difference.max() <= 1e-3 and not difference.any(), (path, difference.max())
