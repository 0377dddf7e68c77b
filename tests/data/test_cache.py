"""The prepared-data cache: keyed by content and the manifest's own paths, so a moved run finds it."""

import dataclasses
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np

from dpmedtf.data.cache import PreprocessSpec, prepare, quarantine_note
from dpmedtf.data.manifests import load_manifest

SPEC = PreprocessSpec("volume", volume_shape=(8, 8, 8))


def write_site(root: Path) -> Path:
    """A hospital site: a CT cohort of four tiny volumes and one unreadable file, manifest paths relative."""
    images = root / "cohort" / "volumes"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = ["volume_path,patient_id,sex,age,label,split"]
    for k in range(4):
        nib.save(nib.Nifti1Image(rng.normal(size=(6, 6, 6)).astype(np.float32), np.eye(4)), str(images / f"v{k}.nii.gz"))
        lines.append(f"volumes/v{k}.nii.gz,P{k},{'FM'[k % 2]},{50 + k},{k % 2},{['train', 'test'][k // 2]}")
    (images / "broken.nii.gz").write_bytes(b"")
    lines.append("volumes/broken.nii.gz,P9,F,60,1,train")
    (root / "cohort" / "ct.csv").write_text("\n".join(lines) + "\n")
    return root / "cohort" / "ct.csv"


def test_a_copied_run_directory_reuses_its_cache_without_preparing_again(tmp_path):
    manifest = write_site(tmp_path / "site-a")
    first = prepare(load_manifest(manifest, "volume"), SPEC, tmp_path / "site-a" / "run" / "cache", skip_bad=True)
    assert len(first.quarantine) == 1 and len(first.cohort.frame) == 4

    # Copied elsewhere as `cp -r` does: new absolute paths, new modification times, new inodes.
    shutil.copytree(tmp_path / "site-a", tmp_path / "moved" / "site-b", copy_function=shutil.copy)
    moved = tmp_path / "moved" / "site-b"
    data = next((moved / "run" / "cache").glob("volume-*")) / "data.npy"
    before = data.stat().st_mtime_ns
    calls = []
    again = prepare(load_manifest(moved / "cohort" / "ct.csv", "volume"), SPEC, moved / "run" / "cache",
                    skip_bad=True, progress=lambda done, total: calls.append(done))

    assert again.directory == data.parent and again.directory.name == first.directory.name
    assert calls == [] and data.stat().st_mtime_ns == before  # nothing decoded, nothing rewritten
    assert sorted(p.name for p in (moved / "run" / "cache").iterdir()) == ["file_digests.json", data.parent.name]
    np.testing.assert_array_equal(again.array, first.array)
    # The quarantined row is still the broken file, named where it is now.
    assert again.quarantine["path"].tolist() == [str(moved / "cohort" / "volumes" / "broken.nii.gz")]
    assert again.cohort.frame["path"].tolist() == [str(moved / "cohort" / "volumes" / f"v{k}.nii.gz") for k in range(4)]

    # Content, not size or time, is the key: the same bytes count, other bytes of the same size do not.
    volume = moved / "cohort" / "volumes" / "v2.nii.gz"
    original = volume.read_bytes()
    changed = bytearray(original)
    changed[-1] ^= 0xFF
    volume.write_bytes(bytes(changed))
    os.utime(volume, ns=(before, before))
    redone = prepare(load_manifest(moved / "cohort" / "ct.csv", "volume"), SPEC, moved / "run" / "cache", skip_bad=True)
    assert redone.directory.name != first.directory.name


def test_quarantine_note_gives_the_count_the_splits_and_the_file(tmp_path):
    manifest = write_site(tmp_path)
    cohort = load_manifest(manifest, "volume")
    clean = prepare(cohort, SPEC, tmp_path / "cache", skip_bad=True)
    note = quarantine_note(clean)
    assert note.startswith("quarantined 1 of 5 manifest row(s) as unreadable (1 train)")
    assert str(clean.directory / "quarantine.csv") in note
    assert (clean.directory / "quarantine.csv").read_text().splitlines()[1].startswith("4,6,")  # array row, line
    # Without skip_bad nothing is quarantined, so nothing is said.
    good = cohort.frame[cohort.frame["path"].str.endswith(("v0.nii.gz", "v1.nii.gz"))].reset_index(drop=True)
    assert quarantine_note(prepare(dataclasses.replace(cohort, frame=good), SPEC, tmp_path / "cache")) is None
