"""Radiographs: the paper's preprocessing on the real RG1_UNCR chest CR, every decoder path, every bad input."""

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import tensorflow as tf
from PIL import Image
from pydicom.data import get_testdata_file

from dpmedtf.data import labels as L
from dpmedtf.data import radiograph as R
from dpmedtf.data.cache import PreprocessSpec, prepare
from dpmedtf.data.manifests import cohort_table, load_manifest
from dpmedtf.errors import DataError
from tests.data.conftest import copy_to

DPMEDTF = str(Path(sys.executable).with_name("dpmedtf"))


def reference_preprocessing(path: str, size: int = 512) -> np.ndarray:
    """The paper's steps written independently with pydicom, Pillow and numpy."""
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array.astype(np.float32)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        pixels = pixels.max() - pixels
    resized = np.asarray(Image.fromarray(pixels, mode="F").resize((size, size), Image.BILINEAR))
    scaled = np.round((resized - resized.min()) / (resized.max() - resized.min()) * 255).astype(np.uint8)
    cdf = np.cumsum(np.bincount(scaled.ravel(), minlength=256))
    cdf_min = cdf[cdf > 0][0]
    lut = np.clip(np.round((cdf - cdf_min) * 255.0 / (scaled.size - cdf_min)), 0, 255).astype(np.uint8)
    return np.repeat(lut[scaled][..., None], 3, axis=-1)


def test_real_chest_radiograph_through_the_cli(real_cr, tmp_path):
    out = tmp_path / "rg1.png"
    result = subprocess.run([DPMEDTF, "preprocess", "radiograph", str(real_cr), "--out", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "W:" not in result.stderr  # DCMTK's warnings about RG1's header are captured
    image = np.asarray(Image.open(out))
    assert image.shape == (512, 512, 3) and image.dtype == np.uint8
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
    gray = image[..., 0].astype(float)
    # MONOCHROME1 handled: lungs (air) dark, spine (bone) bright.
    right_lung, left_lung, spine = gray[110:240, 90:180].mean(), gray[110:240, 330:420].mean(), gray[80:300, 245:268].mean()
    assert right_lung < 80 and left_lung < 80 and spine > 160, (right_lung, left_lung, spine)
    # Histogram equalisation: the cumulative histogram is close to the identity line.
    cdf = np.cumsum(np.bincount(image[..., 0].ravel(), minlength=256)) / gray.size
    assert np.abs(cdf - (np.arange(256) + 1) / 256).max() < 0.05
    # The same as an independent pydicom + numpy implementation of the paper's steps.
    difference = np.abs(reference_preprocessing(str(real_cr)).astype(int) - image.astype(int))
    assert difference.mean() < 0.05 and np.percentile(difference, 99.9) <= 1 and difference.max() <= 12
    # Never overwrites silently.
    again = subprocess.run([DPMEDTF, "preprocess", "radiograph", str(real_cr), "--out", str(out)],
                           capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "already exists" in again.stderr


def test_every_decoder_path_gives_the_same_image(real_cr):
    tfio_image = R.preprocess_file(real_cr)
    assert R.inspect_radiograph(real_cr).decoder == R.DECODER_TFIO_DICOM
    # JPEG 2000 lossless copy of the same radiograph (tensorflow-io decodes it).
    j2k = get_testdata_file("RG1_J2KR.dcm")
    np.testing.assert_array_equal(R.preprocess_file(j2k), tfio_image)
    # pydicom's decoder with its own MONOCHROME1 inversion, chosen explicitly.
    assert R.inspect_radiograph(real_cr, "pydicom").decoder == R.DECODER_PYDICOM
    assert R.inspect_radiograph(get_testdata_file("JPEG-LL.dcm"), "pydicom").decoder == R.DECODER_TFIO_DICOM
    pydicom_image = R.preprocess_file(real_cr, 512, dicom_decoder="pydicom")
    difference = np.abs(pydicom_image.astype(int) - tfio_image)
    assert difference.mean() < 0.05 and difference.max() <= 12


def test_monochrome1_monochrome2_and_png_of_one_image_agree(tmp_path):
    from dpmedtf.data.synthetic import _write_dicom, _write_png, draw_radiograph

    pixels = draw_radiograph(np.random.default_rng(0), 96, {f: 3 for f in L.FINDINGS}, 40, "F")
    rng = np.random.default_rng(1)
    _write_dicom(tmp_path / "m1.dcm", pixels, "P", "F", 40, True, rng)
    _write_dicom(tmp_path / "m2.dcm", pixels, "P", "F", 40, False, rng)
    _write_png(tmp_path / "p.png", pixels)
    assert pydicom.dcmread(tmp_path / "m1.dcm").PhotometricInterpretation == "MONOCHROME1"
    m1, m2, png = (R.preprocess_file(tmp_path / name, 64) for name in ("m1.dcm", "m2.dcm", "p.png"))
    # Identical up to float rounding at uint8 boundaries (which equalisation can widen to a few levels);
    # a missed or doubled MONOCHROME1 inversion would instead turn the whole image negative.
    assert np.abs(m1.astype(int) - m2).mean() < 0.2 and np.mean(m1 != m2) < 0.05
    assert np.corrcoef(m1.ravel(), m2.ravel())[0, 1] > 0.99
    assert np.abs(png.astype(int) - m2).mean() < 1.0  # 16-bit PNG vs 12-bit DICOM quantisation


def test_rle_compressed_dicom_goes_through_pydicom(tmp_path):
    # A grey-scale image RLE-compressed by pydicom: a syntax routed to pydicom, not tensorflow-io.
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.compress(pydicom.uid.RLELossless)
    ds.save_as(tmp_path / "rle.dcm")
    assert R.inspect_radiograph(tmp_path / "rle.dcm").decoder == R.DECODER_PYDICOM
    np.testing.assert_array_equal(R.preprocess_file(tmp_path / "rle.dcm", 64),
                                  R.preprocess_file(get_testdata_file("CT_small.dcm"), 64))


def png_file(path: Path, width: int, height: int, idat: bytes | None = None, bit_depth: int = 8) -> Path:
    """A greyscale PNG written chunk by chunk: a gradient, or ``idat`` as its (compressed) image data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    if idat is None:
        row = b"\x00" + bytes(range(width % 256)) + bytes(max(0, width - 256))
        idat = zlib.compress(row * height)
    header = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def small_cr(path: Path, **header) -> Path:
    """pydicom-data's CT_small (128×128, 16 bits, native) relabelled Modality CR, with ``header`` changed."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.Modality = "CR"
    for keyword, value in header.items():
        setattr(ds, keyword, value)
    ds.save_as(path)
    return path


def jpeg_claiming(path: Path, width: int, height: int) -> Path:
    """A real 40×40 JPEG whose frame header (SOF0) claims ``width`` × ``height`` pixels."""
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40), dtype=np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    frame = data.index(b"\xff\xc0")
    data[frame + 5:frame + 9] = struct.pack(">HH", height, width)
    path.write_bytes(bytes(data))
    return path


def bad_inputs(tmp_path: Path, real_cr: Path) -> dict[str, tuple[Path, str]]:
    """The bad-input corpus: file → the reason its error must give (training and the consumer alike)."""
    cases = {}
    cases["missing"] = (tmp_path / "missing.png", "file not found")
    (tmp_path / "empty.png").write_bytes(b"")
    cases["empty"] = (tmp_path / "empty.png", "file is empty (0 bytes)")
    (tmp_path / "notes.png").write_text("this is a clinical note, not an image\n" * 20)
    cases["not an image"] = (tmp_path / "notes.png", "not a PNG, JPEG or")
    (tmp_path / "text.dcm").write_text("not dicom either\n" * 20)
    cases["text as dcm"] = (tmp_path / "text.dcm", "not a PNG, JPEG or")
    truncated = tmp_path / "truncated.dcm"
    data = real_cr.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    cases["truncated dicom"] = (truncated, "DICOM is truncated")
    (tmp_path / "header-cut.dcm").write_bytes(data[:1000])  # has the DICM preamble, ends inside its header
    cases["dicom cut inside its header"] = (tmp_path / "header-cut.dcm", "DICOM header is truncated or damaged")
    j2k = Path(get_testdata_file("RG1_J2KR.dcm")).read_bytes()
    (tmp_path / "j2k-cut.dcm").write_bytes(j2k[:3000])
    cases["truncated jpeg 2000"] = (tmp_path / "j2k-cut.dcm", "ends inside its compressed pixel data")
    no_pixels = pydicom.dcmread(real_cr)
    del no_pixels.PixelData
    no_pixels.save_as(tmp_path / "nopixels.dcm")
    cases["dicom without pixel data"] = (tmp_path / "nopixels.dcm", "DICOM has no pixel data")
    cases["multi-frame"] = (copy_to(tmp_path, Path(get_testdata_file("emri_small.dcm")), "cine.dcm"), "has 10 frames")
    cases["rows smaller than the pixel data"] = (small_cr(tmp_path / "half-rows.dcm", Rows=64),
                                                 "Rows or Columns is wrong")
    cases["dicom bomb"] = (small_cr(tmp_path / "bomb.dcm", Rows=9000, Columns=9000), "9000×9000 pixels")
    cases["png bomb"] = (png_file(tmp_path / "bomb.png", 20000, 20000, idat=zlib.compress(b"\x00" * 64)),
                         "20000×20000 pixels (400 megapixels), more than the 67 megapixels")
    cases["jpeg bomb"] = (jpeg_claiming(tmp_path / "bomb.jpg", 30000, 30000), "decompression bomb")
    good = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    good.save(tmp_path / "good.png")
    png = (tmp_path / "good.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    cases["truncated png"] = (tmp_path / "cut.png", "PNG is truncated")
    damaged = bytearray(png)
    damaged[len(png) // 2] ^= 0xFF
    (tmp_path / "damaged.png").write_bytes(bytes(damaged))
    cases["png failing its checksum"] = (tmp_path / "damaged.png", "fails its checksum")
    # Valid chunks around image data that is no zlib stream: only the decoder (TensorFlow / Pillow) finds it.
    cases["corrupt png"] = (png_file(tmp_path / "corrupt.png", 64, 64, idat=b"not zlib data" * 20), "corrupt PNG")
    good.save(tmp_path / "good.jpg")
    jpeg = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    cases["truncated jpeg"] = (tmp_path / "cut.jpg", "JPEG is truncated")
    Image.fromarray(np.full((64, 64), 7, np.uint8)).save(tmp_path / "blank.png")
    cases["blank png"] = (tmp_path / "blank.png", "blank image: every pixel has the same value")
    blank = small_cr(tmp_path / "blank.dcm")
    ds = pydicom.dcmread(blank)
    ds.PixelData = np.full((ds.Rows, ds.Columns), 100, np.int16).tobytes()
    ds.save_as(blank)
    cases["blank dicom"] = (blank, "blank image: every pixel has the same value")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "tiny.png")
    cases["tiny png"] = (tmp_path / "tiny.png", "too small to be a radiograph")
    (tmp_path / "folder.png").mkdir()
    cases["directory"] = (tmp_path / "folder.png", "is a directory")
    os.mkfifo(tmp_path / "pipe.png")
    cases["fifo"] = (tmp_path / "pipe.png", "is a named pipe (FIFO)")
    os.symlink(tmp_path / "loop-b.png", tmp_path / "loop-a.png")
    os.symlink(tmp_path / "loop-a.png", tmp_path / "loop-b.png")
    cases["symbolic-link loop"] = (tmp_path / "loop-a.png", "symbolic-link loop")
    return cases


def test_bad_inputs_each_stop_with_the_file_and_reason(tmp_path, real_cr):
    for name, (path, reason) in bad_inputs(tmp_path, real_cr).items():
        with pytest.raises(DataError) as info:
            R.preprocess_file(path, 64)
        assert str(path) in str(info.value) and reason in str(info.value), (name, str(info.value))


def write_manifest(tmp_path, files, name="manifest.csv"):
    rows = [{"image_path": str(p), "patient_id": f"P{i}", "sex": "F", "age": 50, **{f: 0 for f in L.FINDINGS},
             "split": "train"} for i, p in enumerate(files)]
    pd.DataFrame(rows).to_csv(tmp_path / name, index=False)
    return tmp_path / name


def test_prepare_stops_at_a_bad_file_naming_its_manifest_line(tmp_path, real_cr):
    cases = bad_inputs(tmp_path, real_cr)
    for name, (bad, reason) in cases.items():
        manifest = write_manifest(tmp_path, [tmp_path / "good.png", bad], f"{name.replace(' ', '_')}.csv")
        cohort = load_manifest(manifest, "radiograph")
        with pytest.raises(DataError) as info:
            prepare(cohort, PreprocessSpec("radiograph", image_size=32), tmp_path / "cache")
        message = str(info.value)
        assert f"{manifest} line 3:" in message and reason in message and "--skip-bad" in message, (name, message)
    assert not any(p.name.startswith("radiograph-") for p in (tmp_path / "cache").iterdir())  # nothing half-written


def test_skip_bad_quarantines_every_bad_file_and_counts_them(tmp_path, real_cr):
    cases = bad_inputs(tmp_path, real_cr)
    good = [tmp_path / "good.png", real_cr]
    manifest = write_manifest(tmp_path, [good[0], *(p for p, _ in cases.values()), good[1]])
    cohort = load_manifest(manifest, "radiograph")
    prepared = prepare(cohort, PreprocessSpec("radiograph", image_size=32), tmp_path / "cache", skip_bad=True)
    quarantine = pd.read_csv(prepared.directory / "quarantine.csv")
    assert len(quarantine) == len(cases) and len(prepared.cohort.frame) == 2
    for _, (path, reason) in cases.items():
        listed = quarantine[quarantine["path"] == str(path)]
        assert len(listed) == 1 and reason in listed["reason"].iloc[0]
    assert cohort_table(prepared.cohort, prepared.quarantine).loc["quarantined (skipped)", "total"] == len(cases)
    np.testing.assert_array_equal(prepared.array[len(cases) + 1], R.preprocess_file(real_cr, 32))


def test_prepare_takes_only_radiograph_modalities_unless_told(tmp_path):
    # CR and DX by default (the synthetic cohort's DICOMs and pydicom-data's RG1 are CR: tested above); a CT
    # slice or a secondary capture (OT) is refused naming the override, which then accepts it.
    assert PreprocessSpec("radiograph").accept_modalities == ("CR", "DX")
    assert PreprocessSpec("volume").accept_modalities == ("CT",)
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(good)
    for source, code in (("CT_small.dcm", "CT"), ("mlut_18.dcm", "OT")):
        manifest = write_manifest(tmp_path, [good, Path(get_testdata_file(source))], f"{code}.csv")
        cohort = load_manifest(manifest, "radiograph")
        with pytest.raises(DataError) as info:
            prepare(cohort, PreprocessSpec("radiograph", image_size=32), tmp_path / "cache")
        message = str(info.value)
        assert f"{manifest} line 3:" in message and f"DICOM is Modality {code}" in message, message
        assert f"data.accept_modalities: [CR, DX, {code}]" in message, message
        widened = PreprocessSpec("radiograph", image_size=32, accept_modalities=("CR", "DX", code.lower()))
        assert len(prepare(cohort, widened, tmp_path / "cache").cohort.frame) == 2


def test_dcmtk_warnings_stay_off_the_console_and_everything_else_passes(tmp_path, real_cr, capfd):
    # tensorflow-io's DCMTK writes "W: invalid value for 'PixelHeight' (0) ... assuming 1" to fd 2 for RG1.
    cohort = load_manifest(write_manifest(tmp_path, [real_cr]), "radiograph")
    prepare(cohort, PreprocessSpec("radiograph", image_size=32), tmp_path / "cache")
    assert "W:" not in capfd.readouterr().err
    with R.dcmtk_messages_captured() as captured:
        os.write(2, b"W: invalid value for 'PixelWidth' (0) ... assuming 1\nkept: not DCMTK\nE: broken\n")
    os.write(2, b"after: fd 2 restored\n")
    err = capfd.readouterr().err
    assert captured == ["W: invalid value for 'PixelWidth' (0) ... assuming 1", "E: broken"]
    assert "kept: not DCMTK\n" in err and "after: fd 2 restored" in err and "W:" not in err and "E:" not in err
    with pytest.raises(ValueError), R.dcmtk_messages_captured():  # restored after an error too
        raise ValueError
    os.write(2, b"after an error\n")
    assert "after an error" in capfd.readouterr().err


def test_prepare_reuses_a_complete_cache_and_redoes_it_when_a_file_changes(synthetic_cohort, tmp_path):
    cohort = load_manifest(synthetic_cohort["radiograph"], "radiograph")
    spec = PreprocessSpec("radiograph", image_size=32)
    first = prepare(cohort, spec, tmp_path)
    calls = []
    again = prepare(cohort, spec, tmp_path, progress=lambda done, total: calls.append(done))
    assert again.directory == first.directory and calls == []  # nothing decoded again
    for index in (0, len(cohort.frame) - 1):
        np.testing.assert_array_equal(first.array[index], R.preprocess_file(cohort.frame.loc[index, "path"], 32))
    path = Path(cohort.frame.loc[0, "path"])
    os.utime(path, ns=(0, 0))  # new times, same bytes (a copied cohort): the cache is keyed by content
    assert prepare(cohort, spec, tmp_path).directory == first.directory
    original = path.read_bytes()
    try:
        path.write_bytes(Path(cohort.frame.loc[1, "path"]).read_bytes())  # other content: prepared again
        assert prepare(cohort, spec, tmp_path).directory != first.directory
    finally:
        path.write_bytes(original)  # the cohort is shared by the session's tests


def test_augmentation_is_seeded_flips_half_and_rotates_within_ten_degrees():
    images = tf.constant(np.random.default_rng(0).random((400, 33, 33, 1)), tf.float32)
    a = R.augment(images, tf.constant([1, 2], tf.int64))
    np.testing.assert_array_equal(a.numpy(), R.augment(images, tf.constant([1, 2], tf.int64)).numpy())
    flipped_only = R.augment(images, tf.constant([1, 2], tf.int64), max_degrees=0.0).numpy()
    is_flipped = [np.allclose(f, im[:, ::-1], atol=1e-5) for f, im in zip(flipped_only, images.numpy())]
    is_same = [np.allclose(f, im, atol=1e-5) for f, im in zip(flipped_only, images.numpy())]
    assert all(f or s for f, s in zip(is_flipped, is_same)) and 0.4 < np.mean(is_flipped) < 0.6
    # A bright dot at radius 12 from the centre moves by at most 12·sin(10°) ≈ 2.1 px.
    dot = np.zeros((1, 33, 33, 1), np.float32)
    dot[0, 16, 28, 0] = 1.0
    for seed in range(20):
        rotated = R.augment(tf.constant(dot), tf.constant([seed, 0], tf.int64)).numpy()[0, ..., 0]
        y, x = np.unravel_index(np.argmax(rotated), rotated.shape)
        assert min(np.hypot(y - 16, x - 28), np.hypot(y - 16, x - 4)) <= 3.0
