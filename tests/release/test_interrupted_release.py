"""A killed release leaves nothing that verifies, and releasing again finishes one bundle, signed once."""

import subprocess
import sys

import pytest

from dpmedtf.config import load_config
from dpmedtf.release.job import release_job
from dpmedtf.release.signing import SIGNATURE_FILE
from dpmedtf.release.verify import verify_bundle


def every_directory_under(root):
    return [p for p in root.rglob("*") if p.is_dir()]


@pytest.mark.parametrize("point", ["signed", "renamed"])
def test_a_killed_release_leaves_nothing_that_verifies_and_a_rerun_finishes_it_once(point, released_run, keys,
                                                                                     tmp_path):
    job_path, run = released_run
    out = tmp_path / "releases" / "bundle"
    killed = subprocess.run([sys.executable, "-m", "tests.release.kill_release", point, str(job_path), str(run),
                             str(out)], capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    left = every_directory_under(tmp_path / "releases")
    assert left, "the kill left nothing at all: the kill point was not reached"
    # Nothing the kill left verifies, whatever a consumer points verify at.
    for directory in left:
        assert not verify_bundle(directory, keys / "publisher.pub").ok, directory
    assert not any(p.name == SIGNATURE_FILE for p in (tmp_path / "releases").rglob("*"))
    if point == "renamed":
        before = {p.name: p.read_bytes() for p in out.iterdir()}
    # Releasing again (the user's reaction) finishes: one bundle, verified, no workspace left beside it.
    bundle = release_job(load_config(job_path), run, out, override_reason="test model on synthetic data")
    assert bundle == out and verify_bundle(out, keys / "publisher.pub").ok
    assert [p.name for p in (tmp_path / "releases").iterdir()] == ["bundle"]
    if point == "renamed":  # the interrupted bundle itself, now signed: not a second bundle of the version
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != SIGNATURE_FILE} == before
