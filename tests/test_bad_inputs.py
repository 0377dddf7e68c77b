"""A corpus of user mistakes, each run through the real CLI in-process.

Every case must end in a non-zero exit with a one-line ``dpmedtf: error: …`` (or, for ``verify``, the
list of failures) that names the offending file, row or config key: never a Python traceback (an
uncaught exception escapes ``main`` and fails the test), and never a half-written or replaced output.
Every case fails before any model is trained; the whole file runs in well under a minute.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image
from pydicom.data import get_testdata_file

from dpmedtf.cli import main
from dpmedtf.data import labels as L
from tests.data.test_radiograph import jpeg_claiming, png_file, small_cr

REAL_CR = Path(get_testdata_file("RG1_UNCR.dcm"))  # a real PA chest CR, 1955×1841
REAL_CR_J2K = Path(get_testdata_file("RG1_J2KR.dcm"))  # the same, JPEG 2000 lossless
CT_SLICE = Path(get_testdata_file("CT_small.dcm"))
MR_SLICE = Path(get_testdata_file("MR_small.dcm"))


@dataclass
class Expect:
    args: list
    """Command line after ``dpmedtf``."""
    messages: list[str]
    """Texts the error output must contain (the offending file, line, key, and the reason)."""
    untouched: list[Path] = field(default_factory=list)
    """Paths that must be exactly as before: outputs that must not appear, files that must not change."""
    left_empty: list[Path] = field(default_factory=list)
    """Directories that may be created but must hold no file afterwards (no half-written cache)."""


@dataclass
class Workspace:
    tmp: Path
    cohort: pd.DataFrame
    """The session's synthetic radiograph cohort, image paths made absolute (rows of a valid manifest)."""
    bundle: Path
    """A signed bundle directory (fake model, documents that fail their schemas), copied for this case."""
    public_key: Path

    def manifest(self, rows: pd.DataFrame | list[dict], name: str = "manifest.csv") -> Path:
        path = self.tmp / name
        pd.DataFrame(rows).to_csv(path, index=False)
        return path

    def job(self, manifest: Path | None, name: str = "job.yaml", **sections) -> Path:
        """A job that would pass every check; ``sections`` replace or extend its settings."""
        config = {"name": "bad-input", "data": {"image_size": 32},
                  "privacy": {"target_epsilon": 8.0, "delta": 1e-3},
                  "training": {"steps": 2, "batch_size": 4, "max_physical_batch": 4},
                  "evaluation": {"bootstrap_redraws": 10},
                  "pipeline": {"stages": ["prepare", "train", "evaluate"]}}
        if manifest is not None:
            config["data"]["manifest"] = str(manifest)
        for section, values in sections.items():
            config[section] = {**config.get(section, {}), **values}
        path = self.tmp / name
        path.write_text(yaml.safe_dump(config))
        return path

    def write(self, name: str, content: bytes | str) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path


CASES: dict[str, Callable[[Workspace], Expect]] = {}


def case(name: str):
    def register(build: Callable[[Workspace], Expect]):
        assert name not in CASES
        CASES[name] = build
        return build
    return register


def radiograph_row(path, patient="P1", **values) -> dict:
    return {"image_path": str(path), "patient_id": patient, "sex": "F", "age": "64",
            **{finding: "0" for finding in L.FINDINGS}, **values}


# --- job files ---------------------------------------------------------------------------------------

@case("config-not-yaml")
def _(ws):
    path = ws.write("job.yaml", "privacy: {target_epsilon: 8\ntraining: [batch_size: 4\n")
    return Expect(["config", "show", path], [str(path), "not valid YAML"])


@case("config-binary-file")
def _(ws):
    path = ws.write("job.yaml", REAL_CR.read_bytes()[:4096])
    return Expect(["config", "show", path], [str(path), "not a text file"])


@case("config-missing-file")
def _(ws):
    return Expect(["config", "show", ws.tmp / "nowhere.yaml"], ["nowhere.yaml", "cannot read the config file"])


@case("config-not-a-mapping")
def _(ws):
    path = ws.write("job.yaml", "- privacy\n- training\n")
    return Expect(["config", "show", path], [str(path), "must be a mapping"])


@case("config-unknown-key")
def _(ws):
    path = ws.write("job.yaml", "privacy: {target_epsilom: 8}\n")
    return Expect(["config", "show", path],
                  [str(path), "privacy.target_epsilom: unknown key", "did you mean 'target_epsilon'"])


@case("config-wrong-type")
def _(ws):
    path = ws.write("job.yaml", "privacy: {target_epsilon: 8}\ntraining: {batch_size: many}\n")
    return Expect(["config", "show", path], [str(path), "training.batch_size: must be a whole number, got 'many'"])


@case("config-negative-epsilon")
def _(ws):
    path = ws.write("job.yaml", "privacy: {target_epsilon: -1}\n")
    return Expect(["config", "show", path], [str(path), "privacy.target_epsilon: must be > 0"])


@case("config-delta-not-a-probability")
def _(ws):
    path = ws.write("job.yaml", "privacy: {target_epsilon: 8, delta: 1.5}\n")
    return Expect(["config", "show", path], [str(path), "privacy.delta: must be < 1"])


@case("config-epsilon-and-noise")
def _(ws):
    path = ws.write("job.yaml", "privacy: {target_epsilon: 8, noise_multiplier: 1.1}\n")
    return Expect(["config", "show", path], [str(path), "privacy", "exactly one of target_epsilon"])


@case("config-groups-do-not-divide-widths")
def _(ws):
    path = ws.write("job.yaml", "privacy: {target_epsilon: 8}\nmodel: {groups: 5}\n")
    return Expect(["config", "show", path], [str(path), "model.groups", "got 5"])


@case("config-augment-on-ct")
def _(ws):
    path = ws.write("job.yaml", "privacy: {enabled: false}\ndata: {modality: volume}\ntraining: {augment: true}\n")
    return Expect(["config", "show", path], [str(path), "training.augment", "radiographs only"])


@case("config-volume-too-small-for-the-network")
def _(ws):
    path = ws.write("job.yaml", "privacy: {target_epsilon: 8}\ndata: {modality: volume, volume_shape: [64, 64, 16]}\n")
    return Expect(["config", "show", path], [str(path), "data.volume_shape", "≥ 32"])


# --- `dpmedtf run`: everything is checked before the first stage writes anything ----------------------

def run_case(ws: Workspace, job: Path, messages: list[str], *extra) -> Expect:
    out = ws.tmp / "run"
    return Expect(["run", job, "--out", out, *extra], messages, untouched=[out])


@case("run-delta-at-least-one-over-n")
def _(ws):
    job = ws.job(ws.manifest(ws.cohort), privacy={"delta": 0.5})
    return run_case(ws, job, ["privacy.delta 0.5", "1/N", "allow_large_delta"])


@case("run-batch-larger-than-data")
def _(ws):
    job = ws.job(ws.manifest(ws.cohort), training={"batch_size": 5000})
    return run_case(ws, job, ["training.batch_size 5000 exceeds", "manifest.csv"])


@case("run-missing-manifest")
def _(ws):
    job = ws.job(ws.tmp / "no_such_manifest.csv")
    return run_case(ws, job, ["data.manifest", "no_such_manifest.csv"])


@case("run-manifest-missing-columns")
def _(ws):
    manifest = ws.manifest(ws.cohort.drop(columns=["age", "congestion"]))
    return run_case(ws, ws.job(manifest), [str(manifest), "missing column(s) age, congestion"])


@case("run-manifest-of-the-other-modality")
def _(ws):
    manifest = ws.manifest(ws.cohort)
    job = ws.job(manifest, data={"modality": "volume", "volume_shape": [32, 32, 32]}, privacy={"enabled": False,
                 "target_epsilon": None}, training={"augment": False})
    return run_case(ws, job, [str(manifest), "volume_path", "set data.modality: radiograph"])


@case("run-missing-image-file")
def _(ws):
    rows = ws.cohort.copy()
    rows.loc[3, "image_path"] = str(ws.tmp / "images" / "lost.png")
    manifest = ws.manifest(rows)
    return run_case(ws, ws.job(manifest), [str(manifest), "line 5:", "lost.png not found", "skip_bad"])


@case("run-unparseable-age")
def _(ws):
    rows = ws.cohort.copy()
    rows.loc[0, "age"] = "sixty-four"
    manifest = ws.manifest(rows)
    return run_case(ws, ws.job(manifest), [str(manifest), "line 2: age 'sixty-four' is not a number"])


@case("run-required-sex-missing")
def _(ws):
    rows = ws.cohort.copy()
    rows.loc[1, "sex"] = ""
    manifest = ws.manifest(rows)
    job = ws.job(manifest, fairness={"attributes": [{"column": "sex", "required": True}, "age"]})
    return run_case(ws, job, [str(manifest), "line 3: sex '' is missing or not recognised",
                              "fairness.attributes marks sex required"])


@case("run-duplicate-image")
def _(ws):
    rows = ws.cohort.copy()
    rows.loc[2, "image_path"] = rows.loc[0, "image_path"]
    manifest = ws.manifest(rows)
    return run_case(ws, ws.job(manifest), [str(manifest), "line(s) 2, 4", "name the same file"])


@case("run-grade-out-of-range")
def _(ws):
    rows = ws.cohort.copy()
    rows.loc[4, "congestion"] = "7"
    manifest = ws.manifest(rows)
    return run_case(ws, ws.job(manifest), [str(manifest), "line 6: unknown grade 7 for congestion", "use 0–4"])


@case("run-empty-train-split")
def _(ws):
    rows = ws.cohort.assign(split="test")
    manifest = ws.manifest(rows)
    return run_case(ws, ws.job(manifest), [str(manifest), "the train split is empty", "split column"])


@case("run-unknown-force-stage")
def _(ws):
    return run_case(ws, ws.job(ws.manifest(ws.cohort)), ["--force: unknown stage(s) ['trian']"], "--force", "trian")


@case("run-mistyped-release-policy")
def _(ws):
    policy = ws.write("policy.yaml", "privacy: {max_epsilon: ten}\n")
    key = ws.public_key.with_suffix(".pem")
    job = ws.job(ws.manifest(ws.cohort), release={"private_key": str(key), "public_key": str(ws.public_key),
                                                  "policy": str(policy)},
                 pipeline={"stages": ["prepare", "train", "evaluate", "release"]})
    return run_case(ws, job, [str(policy), "privacy.max_epsilon must be a finite number, got 'ten'"])


@case("run-out-is-a-file")
def _(ws):
    out = ws.write("run", "not a directory")
    job = ws.job(ws.manifest(ws.cohort), pipeline={"stages": ["prepare"]})
    return Expect(["run", job, "--out", out], [str(out), "cannot create the run directory"], untouched=[out])


@case("run-damaged-stage-record")
def _(ws):
    out = ws.tmp / "run"
    record = ws.write("run/stages/prepare.json", '{"status": "finished", "config"')
    job = ws.job(ws.manifest(ws.cohort), pipeline={"stages": ["prepare"]})
    return Expect(["run", job, "--out", out], [str(record), "cannot read the record of stage prepare"],
                  untouched=[out])


# --- other stages ------------------------------------------------------------------------------------

@case("evaluate-without-a-trained-model")
def _(ws):
    run = ws.tmp / "run"
    return Expect(["evaluate", ws.job(ws.manifest(ws.cohort)), "--run", run],
                  [f"no finished training at {run}", "train the job first"], untouched=[run])


@case("release-without-a-trained-model")
def _(ws):
    run, out = ws.tmp / "run", ws.tmp / "bundle"
    job = ws.job(ws.manifest(ws.cohort), release={"private_key": str(ws.public_key.with_suffix(".pem"))})
    return Expect(["release", job, "--run", run, "--out", out], [str(run / "model.keras"), "dpmedtf train"],
                  untouched=[run, out])


def finished_run(ws: Workspace, model: bytes, training: str) -> Path:
    """A run directory holding every file release reads, with the given model and training summary."""
    run = ws.tmp / "run"
    ws.write("run/model.keras", model)
    ws.write("run/training.json", training)
    ws.write("run/ledger.json", "{}")
    for name in ("metrics", "thresholds", "fairness_report"):
        ws.write(f"run/evaluation/{name}.json", "{}")
    return run


@case("release-damaged-training-summary")
def _(ws):
    run, out = finished_run(ws, b"PK\x03\x04", '{"status": "finis'), ws.tmp / "bundle-out"
    job = ws.job(ws.manifest(ws.cohort), release={"private_key": str(ws.public_key.with_suffix(".pem"))})
    return Expect(["release", job, "--run", run, "--out", out],
                  [str(run / "training.json"), "cannot read the training summary"], untouched=[run, out])


@case("release-damaged-model")
def _(ws):
    run, out = finished_run(ws, b"not a keras file", '{"status": "finished"}'), ws.tmp / "bundle-out"
    job = ws.job(ws.manifest(ws.cohort), release={"private_key": str(ws.public_key.with_suffix(".pem"))})
    return Expect(["release", job, "--run", run, "--out", out],
                  [str(run / "model.keras"), "cannot load the model", "train again"],
                  untouched=[run, out])


# --- data commands -----------------------------------------------------------------------------------

@case("cohort-missing-manifest")
def _(ws):
    return Expect(["cohort", ws.tmp / "absent.csv"], ["absent.csv", "manifest not found"])


@case("cohort-manifest-is-a-directory")
def _(ws):
    return Expect(["cohort", ws.tmp], [str(ws.tmp), "is a directory"])


@case("cohort-binary-manifest")
def _(ws):
    path = ws.write("manifest.csv", REAL_CR.read_bytes()[:2048])
    return Expect(["cohort", path], [str(path), "not a readable CSV manifest"])


@case("cohort-unknown-ct-label")
def _(ws):
    path = ws.manifest([{"volume_path": "a.nii.gz", "patient_id": "C1", "sex": "M", "age": 70, "label": "maybe"}])
    return Expect(["cohort", path], [str(path), "line 2: unknown label 'maybe'"])


@case("prepare-truncated-dicom-row")
def _(ws):
    truncated = ws.write("cut.dcm", REAL_CR.read_bytes()[:20000])
    manifest = ws.manifest([*ws.cohort.iloc[:2].to_dict("records"), radiograph_row(truncated, patient="CUT")])
    cache = ws.tmp / "cache"
    return Expect(["prepare", manifest, "--cache", cache, "--image-size", 32],
                  [f"{manifest} line 4", "cut.dcm", "truncated", "--skip-bad"], left_empty=[cache])


def prepare_case(ws, bad: Path, messages: list[str], *extra) -> Expect:
    """``prepare`` of two good rows and ``bad`` on manifest line 4: the message names the line and the file."""
    manifest = ws.manifest([*ws.cohort.iloc[:2].to_dict("records"), radiograph_row(bad, patient="BAD")])
    cache = ws.tmp / "cache"
    return Expect(["prepare", manifest, "--cache", cache, "--image-size", 32, *extra],
                  [f"{manifest} line 4", str(bad), *messages], left_empty=[cache])


@case("prepare-png-decompression-bomb")
def _(ws):
    # 20000 × 20000 in the header: refused from it, so nothing is decoded (the image data here is a stub).
    bomb = png_file(ws.tmp / "bomb.png", 20000, 20000, idat=zlib.compress(b"\x00" * 64))
    return prepare_case(ws, bomb, ["20000×20000 pixels", "decompression bomb", "was not decoded"])


@case("prepare-dicom-bomb")
def _(ws):
    return prepare_case(ws, small_cr(ws.tmp / "bomb.dcm", Rows=9000, Columns=9000),
                        ["DICOM header says 9000×9000 pixels", "8192×8192"])


@case("prepare-dicom-rows-smaller-than-its-pixel-data")
def _(ws):
    return prepare_case(ws, small_cr(ws.tmp / "half-rows.dcm", Rows=64),
                        ["pixel data has 32768 bytes", "64×128", "need 16384", "Rows or Columns is wrong"])


@case("prepare-ct-slice-as-radiograph")
def _(ws):
    return prepare_case(ws, ws.write("ct.dcm", CT_SLICE.read_bytes()),
                        ["DICOM is Modality CT (computed tomography), not CR or DX",
                         "data.accept_modalities: [CR, DX, CT]"])


@case("prepare-secondary-capture-as-radiograph")
def _(ws):
    return prepare_case(ws, ws.write("sc.dcm", Path(get_testdata_file("mlut_18.dcm")).read_bytes()),
                        ["DICOM is Modality OT", "data.accept_modalities: [CR, DX, OT]"])


@case("prepare-blank-dicom")
def _(ws):
    blank = small_cr(ws.tmp / "blank.dcm", PixelData=np.zeros((128, 128), np.int16).tobytes())
    return prepare_case(ws, blank, ["blank image: every pixel has the same value"])


@case("prepare-png-tensorflow-cannot-decode")
def _(ws):
    # Valid chunks and checksums around image data that is no zlib stream: TensorFlow's decoder finds it.
    return prepare_case(ws, png_file(ws.tmp / "garbled.png", 64, 64, idat=b"not zlib data" * 20),
                        ["corrupt PNG", "image data cannot be decoded"])


@case("prepare-png-failing-its-checksum")
def _(ws):
    data = bytearray(png_file(ws.tmp / "ok.png", 64, 64).read_bytes())
    data[45] ^= 0xFF  # inside the IDAT chunk
    return prepare_case(ws, ws.write("damaged.png", bytes(data)), ["corrupt PNG", "IDAT chunk", "fails its checksum"])


@case("prepare-symbolic-link-loop")
def _(ws):
    os.symlink(ws.tmp / "b.png", ws.tmp / "a.png")
    os.symlink(ws.tmp / "a.png", ws.tmp / "b.png")
    return prepare_case(ws, ws.tmp / "a.png", ["symbolic-link loop"])


@case("prepare-directory-as-image")
def _(ws):
    (ws.tmp / "scan.png").mkdir()
    return prepare_case(ws, ws.tmp / "scan.png", ["is a directory"])


@case("prepare-fifo-as-image")
def _(ws):
    os.mkfifo(ws.tmp / "stream.png")  # never opened: reading a FIFO would block
    return prepare_case(ws, ws.tmp / "stream.png", ["is a named pipe (FIFO), not a file"])


@case("prepare-cache-under-a-file")
def _(ws):
    blocker = ws.write("cache", "a file where the cache folder should go")
    manifest = ws.manifest(ws.cohort.iloc[:2])
    return Expect(["prepare", manifest, "--cache", blocker / "sub", "--image-size", 32],
                  [str(blocker / "sub"), "cannot create the cache directory", f"{blocker} is a file, not a folder"],
                  untouched=[blocker])


@case("run-out-under-a-file")
def _(ws):
    blocker = ws.write("runs", "a file where the run folder should go")
    job = ws.job(ws.manifest(ws.cohort), pipeline={"stages": ["prepare"]})
    return Expect(["run", job, "--out", blocker / "run"], [str(blocker / "run"), "cannot create the run directory"],
                  untouched=[blocker])


@case("prepare-empty-nifti-row")
def _(ws):
    empty = ws.write("empty.nii.gz", b"")
    manifest = ws.manifest([{"volume_path": str(empty), "patient_id": "C1", "sex": "M", "age": 70, "label": 1}])
    cache = ws.tmp / "cache"
    return Expect(["prepare", manifest, "--cache", cache, "--shape", 32, 32, 32],
                  [f"{manifest} line 2", "empty.nii.gz", "file is empty"], left_empty=[cache])


@case("prepare-impossible-shape")
def _(ws):
    manifest = ws.manifest([{"volume_path": "a.nii.gz", "patient_id": "C1", "sex": "M", "age": 70, "label": 1}])
    cache = ws.tmp / "cache"
    return Expect(["prepare", manifest, "--cache", cache, "--shape", 0, 32, 32],
                  ["--shape", "got [0, 32, 32]"], untouched=[cache])


@case("synthetic-into-an-existing-cohort")
def _(ws):
    marker = ws.write("cohort/SYNTHETIC.txt", "already here")
    return Expect(["synthetic", "--out", marker.parent, "--patients", 2], [str(marker.parent), "already holds"],
                  untouched=[marker.parent])


# --- preprocess --------------------------------------------------------------------------------------

def preprocess_case(ws, kind: str, source, messages, *extra, out_name: str = "out.png") -> Expect:
    out = ws.tmp / out_name
    return Expect(["preprocess", kind, source, "--out", out, *extra], messages, untouched=[out])


@case("preprocess-missing-file")
def _(ws):
    return preprocess_case(ws, "radiograph", ws.tmp / "absent.dcm", ["absent.dcm", "file not found"])


@case("preprocess-truncated-dicom")
def _(ws):
    path = ws.write("cut.dcm", REAL_CR.read_bytes()[:50000])
    return preprocess_case(ws, "radiograph", path, [str(path), "DICOM is truncated", "re-copy"])


@case("preprocess-text-file-named-dcm")
def _(ws):
    path = ws.write("notes.dcm", "Patient was seen today. No DICOM here.\n" * 20)
    return preprocess_case(ws, "radiograph", path, [str(path), "not a PNG, JPEG or DICOM image"])


@case("preprocess-corrupt-png")
def _(ws):
    path = ws.write("broken.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    return preprocess_case(ws, "radiograph", path, [str(path), "corrupt PNG", "header chunk (IHDR)"])


@case("preprocess-png-image-data-tensorflow-cannot-decode")
def _(ws):
    path = png_file(ws.tmp / "garbled.png", 64, 64, idat=b"not zlib data" * 20)
    return preprocess_case(ws, "radiograph", path, [str(path), "corrupt PNG", "image data cannot be decoded"])


@case("preprocess-truncated-jpeg2000-dicom")
def _(ws):
    path = ws.write("j2k-cut.dcm", REAL_CR_J2K.read_bytes()[:3000])
    return preprocess_case(ws, "radiograph", path, [str(path), "DICOM is truncated or damaged after its header",
                                                    "ends inside its compressed pixel data"])


@case("preprocess-dicom-cut-inside-its-header")
def _(ws):
    path = ws.write("header-cut.dcm", REAL_CR.read_bytes()[:1000])
    return preprocess_case(ws, "radiograph", path, [str(path), "DICOM header is truncated or damaged",
                                                    "file ends at byte 1000", "re-copy"])


@case("preprocess-jpeg-decompression-bomb")
def _(ws):
    path = jpeg_claiming(ws.tmp / "huge.jpg", 30000, 30000)
    return preprocess_case(ws, "radiograph", path, [str(path), "30000×30000 pixels", "decompression bomb"])


@case("preprocess-blank-png")
def _(ws):
    path = ws.tmp / "blank.png"
    Image.fromarray(np.full((64, 64), 200, np.uint8)).save(path)
    return preprocess_case(ws, "radiograph", path, [str(path), "blank image: every pixel has the same value"])


@case("preprocess-refuses-to-overwrite")
def _(ws):
    out = ws.write("out.png", b"keep me")
    return Expect(["preprocess", "radiograph", REAL_CR, "--out", out], [str(out), "already exists", "--force"],
                  untouched=[out])


@case("preprocess-empty-nifti")
def _(ws):
    path = ws.write("empty.nii.gz", b"")
    return preprocess_case(ws, "volume", path, [str(path), "file is empty"], out_name="out.npy")


@case("preprocess-nifti-without-voxels")
def _(ws):
    path = ws.tmp / "hollow.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((0, 0, 0), np.float32), np.eye(4)), str(path))
    return preprocess_case(ws, "volume", path, [str(path), "volume has shape (0, 0, 0)"], out_name="out.npy")


@case("preprocess-corrupt-nifti")
def _(ws):
    path = ws.write("garbage.nii.gz", gzip.compress(b"not a nifti header" * 30))
    return preprocess_case(ws, "volume", path, [str(path), "not a readable NIfTI volume"], out_name="out.npy")


@case("preprocess-folder-without-dicom-series")
def _(ws):
    ws.write("series/readme.txt", "exported with the wrong option")
    return preprocess_case(ws, "volume", ws.tmp / "series", ["readme.txt", "not a DICOM image slice"],
                           out_name="out.npy")


@case("preprocess-empty-folder")
def _(ws):
    (ws.tmp / "series").mkdir()
    return preprocess_case(ws, "volume", ws.tmp / "series", [str(ws.tmp / "series"), "folder contains no files"],
                           out_name="out.npy")


@case("preprocess-folder-mixing-two-series")
def _(ws):
    (ws.tmp / "series").mkdir()
    shutil.copy(CT_SLICE, ws.tmp / "series" / "1.dcm")
    shutil.copy(MR_SLICE, ws.tmp / "series" / "2.dcm")
    return preprocess_case(ws, "volume", ws.tmp / "series", [str(ws.tmp / "series"), "2 different series"],
                           out_name="out.npy")


@case("preprocess-volume-to-png")
def _(ws):
    path = ws.tmp / "ok.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), str(path))
    return preprocess_case(ws, "volume", path, ["out.png", ".nii, .nii.gz, .npy"], "--shape", 8, 8, 8)


@case("preprocess-inverted-hu-window")
def _(ws):
    path = ws.tmp / "ok.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), str(path))
    return preprocess_case(ws, "volume", path, ["--hu-window", "LOW < HIGH", "[250.0, -150.0]"],
                           "--shape", 8, 8, 8, "--hu-window", 250, -150, out_name="out.npy")


# --- CT series geometry and content, NIfTI geometry (issue 19) -----------------------------------------

REAL_SERIES_WITH_GAP = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests" / "77654033" / "CT2"
"""pydicom-data's CT2: instances 18 and 180–182 of one series, 1.25 mm apart: 161 slices are missing."""


def ct_series(folder: Path, heights, modality="CT") -> Path:
    """Axial slices of a real CT header at ``heights`` mm, each filled with its own HU value."""
    import pydicom

    source = pydicom.dcmread(CT_SLICE)
    folder.mkdir(parents=True)
    for k, height in enumerate(heights):
        ds = source.copy()
        ds.Modality = modality
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, float(height)]
        ds.PixelData = np.full(ds.pixel_array.shape, 1024 + 50 * k, np.int16).tobytes()
        ds.save_as(folder / f"slice_{k}.dcm")
    return folder


def volume_row(path, patient="C1", **values) -> dict:
    return {"volume_path": str(path), "patient_id": patient, "sex": "M", "age": 70, "label": 1, **values}


@case("preprocess-series-with-missing-slices")
def _(ws):
    return preprocess_case(ws, "volume", REAL_SERIES_WITH_GAP,
                           [str(REAL_SERIES_WITH_GAP), "has a gap", "between slices 17106", "and 17136",
                            "161 slice(s) are missing"], out_name="out.npy")


@case("preprocess-series-unevenly-spaced")
def _(ws):
    folder = ct_series(ws.tmp / "series", [0, 5, 10, 16, 21, 26])
    return preprocess_case(ws, "volume", folder, [str(folder), "unevenly spaced", "slice_2.dcm", "slice_3.dcm",
                                                  "step is 6 mm", "median step is 5 mm"], out_name="out.npy")


@case("preprocess-mr-series")
def _(ws):
    (ws.tmp / "series").mkdir()
    shutil.copy(MR_SLICE, ws.tmp / "series" / "mr.dcm")
    return preprocess_case(ws, "volume", ws.tmp / "series", [str(ws.tmp / "series" / "mr.dcm"), "is Modality MR, not CT",
                                                             "not Hounsfield units", "data.accept_modalities"],
                           out_name="out.npy")


@case("preprocess-blank-volume")
def _(ws):
    path = ws.tmp / "blank.nii.gz"
    nib.save(nib.Nifti1Image(np.full((8, 8, 8), -1000, np.float32), np.eye(4)), str(path))
    return preprocess_case(ws, "volume", path, [str(path), "volume is blank", "-1000 HU"], out_name="out.npy")


@case("preprocess-nifti-with-a-zero-size-dimension")
def _(ws):
    path = ws.tmp / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 0, 8), np.float32), np.eye(4)), str(path))
    return preprocess_case(ws, "volume", path, [str(path), "volume has shape (8, 0, 8), so no voxels"],
                           out_name="out.npy")


@case("preprocess-nifti-with-a-singular-affine")
def _(ws):
    path = ws.tmp / "singular.nii.gz"
    image = nib.Nifti1Image(np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32), None)
    image.header.set_sform(np.diag([1.0, 1.0, 0.0, 1.0]), code=1)
    image.header.set_qform(None, code=0)
    nib.save(image, str(path))
    return preprocess_case(ws, "volume", path, [str(path), "affine is singular", "orientation"], out_name="out.npy")


@case("prepare-series-with-missing-slices-row")
def _(ws):
    manifest = ws.manifest([volume_row(REAL_SERIES_WITH_GAP)])
    cache = ws.tmp / "cache"
    return Expect(["prepare", manifest, "--cache", cache, "--shape", 8, 8, 8],
                  [f"{manifest} line 2", str(REAL_SERIES_WITH_GAP), "161 slice(s) are missing", "--skip-bad"],
                  left_empty=[cache])


@case("prepare-mr-series-row")
def _(ws):
    folder = ct_series(ws.tmp / "mr", [0, 5, 10], modality="MR")
    manifest = ws.manifest([volume_row(folder)])
    cache = ws.tmp / "cache"
    return Expect(["prepare", manifest, "--cache", cache, "--shape", 8, 8, 8],
                  [f"{manifest} line 2", str(folder / "slice_0.dcm"), "is Modality MR"], left_empty=[cache])


# --- manifest headers, paths, encoding, separator (issue 19) -----------------------------------------------

@case("cohort-duplicate-header")
def _(ws):
    path = ws.write("manifest.csv", ws.cohort.iloc[:3].assign(Age="50").to_csv(index=False))
    return Expect(["cohort", path], [f"{path} line 1", "names a column more than once", "'age' in columns 4, "])


@case("cohort-same-file-through-dotdot")
def _(ws):
    rows = [radiograph_row("images/a.png", patient="P1"), radiograph_row("images/../images/a.png", patient="P2")]
    path = ws.manifest(rows)
    return Expect(["cohort", path], [str(path), "line(s) 2, 3 name the same file", str(ws.tmp / "images" / "a.png"),
                                     "'images/../images/a.png'"])


@case("cohort-latin1-manifest")
def _(ws):
    rows = ws.cohort.iloc[:3].copy()
    rows.loc[rows.index[1], "patient_id"] = "Müller"
    path = ws.write("manifest.csv", rows.to_csv(index=False).encode("latin-1"))
    return Expect(["cohort", path], [f"{path} line 3", "byte 0xFC", "not UTF-8", "Latin-1", "Save the manifest as UTF-8"])


@case("cohort-semicolon-manifest")
def _(ws):
    path = ws.write("manifest.csv", ws.cohort.iloc[:3].to_csv(index=False, sep=";"))
    return Expect(["cohort", path], [f"{path} line 1", "separated by semicolons (;)", "comma-separated"])


@case("cohort-row-with-an-extra-field")
def _(ws):
    text = ws.cohort.iloc[:3].to_csv(index=False).splitlines()
    text[2] += ",surplus"
    path = ws.write("manifest.csv", "\n".join(text) + "\n")
    return Expect(["cohort", path], [str(path), "line 3:", "field(s) where the header has"])


# --- privacy calculator ------------------------------------------------------------------------------

EPSILON = ["privacy", "epsilon", "--dataset-size", 1000, "--batch-size", 10]


@case("privacy-negative-dataset-size")
def _(ws):
    return Expect(["privacy", "epsilon", "--dataset-size", -5, "--batch-size", 1, "--epochs", 1,
                   "--noise-multiplier", 1, "--delta", 1e-5], ["dataset size must be a whole number ≥ 1, got -5"])


@case("privacy-delta-at-least-one-over-n")
def _(ws):
    return Expect([*EPSILON, "--epochs", 1, "--noise-multiplier", 1, "--delta", 0.01],
                  ["delta 0.01 ≥ 1/N", "override"])


@case("privacy-delta-nan")
def _(ws):
    return Expect([*EPSILON, "--epochs", 1, "--noise-multiplier", 1, "--delta", "nan"], ["delta must be a number in (0, 1)"])


@case("privacy-vanishing-noise")
def _(ws):
    # PLD on σ = 0.01 would take minutes and gigabytes for an ε that means nothing: refused at once.
    return Expect([*EPSILON, "--steps", 100, "--noise-multiplier", 0.01, "--delta", 1e-5],
                  ["ε would exceed 1000", "add noise"])


@case("privacy-absurd-noise")
def _(ws):
    return Expect([*EPSILON, "--steps", 100, "--noise-multiplier", 1e300, "--delta", 1e-5, "--accountant", "rdp"],
                  ["rdp accountant cannot evaluate", "noise multiplier between"])


@case("privacy-absurd-epochs")
def _(ws):
    return Expect([*EPSILON, "--epochs", 1e300, "--noise-multiplier", 1, "--delta", 1e-5],
                  ["cannot evaluate", "realistic number of steps"])


@case("privacy-no-finite-epsilon")
def _(ws):
    return Expect([*EPSILON, "--steps", 100, "--noise-multiplier", 1, "--delta", 1e-300], ["no finite ε at δ = 1e-300"])


@case("privacy-negative-target")
def _(ws):
    return Expect(["privacy", "noise", "--dataset-size", 1000, "--batch-size", 10, "--steps", 100,
                   "--target-epsilon", -1, "--delta", 1e-5], ["target epsilon must be a finite number > 0, got -1"])


# --- consumers ---------------------------------------------------------------------------------------

@case("verify-tampered-bundle")
def _(ws):
    metadata = ws.bundle / "metadata.json"
    metadata.write_text(metadata.read_text().replace('"1.0.0"', '"9.9.9"'))
    return Expect(["verify", ws.bundle, "--public-key", ws.public_key],
                  ["metadata.json: SHA-256 differs from SHA256SUMS", "FAILED verification"], untouched=[ws.bundle])


@case("verify-bundle-with-non-object-documents")
def _(ws):
    (ws.bundle / "metadata.json").write_text("[1, 2, 3]")
    (ws.bundle / "privacy_certificate.json").write_text('"certified"')
    return Expect(["verify", ws.bundle, "--public-key", ws.public_key],
                  ["metadata.json: must be a JSON object", "privacy_certificate.json: must be a JSON object"])


@case("verify-missing-bundle")
def _(ws):
    return Expect(["verify", ws.tmp / "nothing"], [str(ws.tmp / "nothing"), "not a bundle directory"])


@case("predict-missing-input")
def _(ws):
    out = ws.tmp / "predictions.csv"
    return Expect(["predict", ws.bundle, REAL_CR, ws.tmp / "scan_42.dcm", "--out", out],
                  ["1 input(s) not found", "scan_42.dcm"], untouched=[out])


@case("predict-with-a-tampered-bundle")
def _(ws):
    (ws.bundle / "model_card.md").write_text("Approved for clinical use.")
    out = ws.tmp / "predictions.csv"
    return Expect(["predict", ws.bundle, REAL_CR, "--out", out, "--public-key", ws.public_key],
                  [str(ws.bundle), "failed verification", "model_card.md"], untouched=[out])


@case("keygen-refuses-to-replace-a-key")
def _(ws):
    key = ws.write("signing.pem", "the only copy of my key")
    return Expect(["keygen", "--private-key", key], [str(key), "already exists"], untouched=[key])


# --- the corpus runner -------------------------------------------------------------------------------

def snapshot(path: Path):
    """Everything under ``path`` (None if it does not exist), to prove nothing was written or replaced."""
    if not path.exists():
        return None
    if path.is_file():
        return path.read_bytes()
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


@pytest.fixture(scope="module")
def cohort_rows(cohort_manifest) -> pd.DataFrame:
    rows = pd.read_csv(cohort_manifest, dtype=str, keep_default_na=False)
    rows["image_path"] = [str((cohort_manifest.parent / p).resolve()) for p in rows["image_path"]]
    return rows


@pytest.fixture(scope="module")
def signed_bundle(tmp_path_factory) -> tuple[Path, Path]:
    """A bundle-shaped directory signed by a fresh key: intact as signed, though its model is no model."""
    from dpmedtf.release.bundle import write_sums
    from dpmedtf.release.signing import generate_keypair, sign_bundle

    root = tmp_path_factory.mktemp("signed")
    generate_keypair(root / "publisher.pem", root / "publisher.pub")
    bundle = root / "bundle"
    bundle.mkdir()
    (bundle / "model.onnx").write_bytes(b"\x08\x07not an onnx graph")
    (bundle / "privacy_certificate.json").write_text(json.dumps({"epsilon": 8.0, "delta": 1e-5}))
    (bundle / "fairness_report.json").write_text(json.dumps({"rows": []}))
    (bundle / "fairness_report.md").write_text("# Fairness report\n")
    (bundle / "model_card.md").write_text("# Model card\n")
    (bundle / "metadata.json").write_text(json.dumps({"model_version": "1.0.0", "labels": ["a"],
                                                      "thresholds": {"a": 0.5}}))
    shutil.copyfile(root / "publisher.pub", bundle / "signing_key.pub")
    write_sums(bundle)
    sign_bundle(bundle, root / "publisher.pem")
    return bundle, root / "publisher.pub"


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_fails_with_a_message_naming_the_problem(name, tmp_path, cohort_rows, signed_bundle, capsys):
    bundle = tmp_path / "bundle"
    shutil.copytree(signed_bundle[0], bundle)
    expect = CASES[name](Workspace(tmp_path, cohort_rows.copy(), bundle, signed_bundle[1]))
    before = {path: snapshot(path) for path in expect.untouched}
    capsys.readouterr()

    with pytest.raises(SystemExit) as exit_info:  # any other exception is a traceback for the user
        main([str(arg) for arg in expect.args])

    out, err = capsys.readouterr()
    assert exit_info.value.code not in (0, None), out
    assert "Traceback" not in out + err
    assert "function_node" not in err and "[Op:" not in err  # no TensorFlow internals
    if expect.args[0] != "verify":  # verify lists every failed check; everything else says one thing
        # (after any progress lines of the work done before the failure, e.g. "preparing: 2/3 (0.2 s)")
        said = [line for line in err.splitlines() if not re.fullmatch(r"[\w ]+: \d+/\d+ \([\d.]+ s\)", line)]
        assert said and said[0].startswith("dpmedtf: error: "), err
    for message in expect.messages:
        assert message in err, f"{message!r} missing from:\n{err}"
    for path, content in before.items():
        assert snapshot(path) == content, f"{path} was written or changed"
    for directory in expect.left_empty:
        assert not directory.exists() or not any(p.is_file() for p in directory.rglob("*")), f"{directory} not empty"


def test_an_unreadable_image_is_named_and_with_skip_bad_quarantined(tmp_path, cohort_rows, capsys, monkeypatch):
    import builtins
    import errno

    locked = png_file(tmp_path / "locked.png", 64, 64)
    locked.chmod(0)
    if os.geteuid() == 0:  # root reads any file: refuse this one to dpmedtf as the kernel refuses it to a user
        real_open = builtins.open

        def guarded_open(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and os.fspath(file) == str(locked):
                raise PermissionError(errno.EACCES, "Permission denied", str(locked))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", guarded_open)
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame([*cohort_rows.iloc[:2].to_dict("records"), radiograph_row(locked, patient="LOCKED")]).to_csv(
        manifest, index=False)
    reason = f"{locked}: cannot read the file (Permission denied); check its permissions"
    for extra, code in (([], 1), (["--skip-bad"], 0)):
        with pytest.raises(SystemExit) as exit_info:
            main(["prepare", str(manifest), "--cache", str(tmp_path / "cache"), "--image-size", "32", *extra])
        out, err = capsys.readouterr()
        assert exit_info.value.code == code and "Traceback" not in out + err, err
        if not extra:
            assert f"{manifest} line 4: {reason}" in err and "--skip-bad" in err, err
        else:
            assert "quarantined 1 file(s)" in err, err
            cache = Path(re.search(r"^cache: (.+)$", out, re.M).group(1))
            quarantine = pd.read_csv(cache / "quarantine.csv")
            assert quarantine[["line", "path", "reason"]].values.tolist() == [[4, str(locked), reason]]
