"""One writer per run directory: a second run/train/evaluate/release is refused naming the holder; a lock
left by a dead process on this host is taken over with a note; one from another host never is."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dpmedtf.cli import main
from dpmedtf.run_lock import RunDirectoryBusy, RunLock

HOLD = ("import sys\nfrom dpmedtf.run_lock import RunLock\nlock = RunLock(sys.argv[1], 'dpmedtf run (test holder)')\n"
        "lock.acquire()\nprint('held', flush=True)\nsys.stdin.read()\nlock.release()\n")
ABANDON = ("import os, sys\nfrom dpmedtf.run_lock import RunLock\nRunLock(sys.argv[1], 'dpmedtf train (killed)').acquire()\n"
           "os._exit(0)\n")  # ends without releasing, as a SIGKILL would


def snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture
def held(tmp_path):
    """A run directory whose lock another process holds; yields (directory, that process)."""
    run = tmp_path / "run"
    (run / "stages").mkdir(parents=True)
    (run / "stages" / "prepare.json").write_text("{}")  # something of an earlier run, which must stay as it is
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield run, holder
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_a_second_writer_is_refused_naming_the_holder(held):
    run, holder = held
    with pytest.raises(RunDirectoryBusy) as info:
        RunLock(run, "dpmedtf train").acquire()
    message = str(info.value)
    for fragment in (f"{run} is being written by dpmedtf run (test holder)", f"PID {holder.pid}",
                     f"on host {socket.gethostname()}", "stops before writing anything", f"delete {run / 'writer.lock'}"):
        assert fragment in message, message
    holder.stdin.close()  # the holder finishes: its lock goes, and the next writer gets it
    holder.wait(timeout=30)
    assert not (run / "writer.lock").exists()
    with RunLock(run, "dpmedtf train"):
        assert json.loads((run / "writer.lock").read_text())["pid"] == os.getpid()
    assert not (run / "writer.lock").exists()


@pytest.mark.parametrize("command", ["run", "train", "evaluate", "release", "audit"])
def test_every_writing_command_refuses_a_run_directory_in_use(held, tmp_path, cohort_manifest, capsys, command):
    run, holder = held
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"name": "locked", "data": {"manifest": str(cohort_manifest), "image_size": 32},
                                   "privacy": {"target_epsilon": 8.0, "delta": 1e-3},
                                   "training": {"steps": 2, "batch_size": 4, "max_physical_batch": 4},
                                   "release": {"private_key": str(tmp_path / "key.pem")},
                                   "pipeline": {"stages": ["prepare", "train"]}}))
    before = snapshot(run)
    args = {"run": ["run", job, "--out", run], "train": ["train", job, "--out", run],
            "evaluate": ["evaluate", job, "--run", run], "release": ["release", job, "--run", run],
            "audit": ["audit", job, "--out", run]}[command]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 1
    assert err.startswith("dpmedtf: error: ") and "Traceback" not in out + err
    assert f"{run} is being written by dpmedtf run (test holder) (PID {holder.pid}" in err, err
    assert snapshot(run) == before  # nothing written, the holder's lock untouched


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_note(tmp_path):
    run = tmp_path / "run"
    dead = subprocess.run([sys.executable, "-c", ABANDON, str(run)], timeout=60)
    assert dead.returncode == 0 and (run / "writer.lock").exists()
    stale = json.loads((run / "writer.lock").read_text())
    notes = []
    with RunLock(run, "dpmedtf run", log=notes.append):
        record = json.loads((run / "writer.lock").read_text())
        assert record["pid"] == os.getpid() and record["took_over_from"] == stale
    assert len(notes) == 1 and f"took over the lock of {run}" in notes[0]
    assert f"dpmedtf train (killed) (PID {stale['pid']}" in notes[0] and "is no longer running" in notes[0]
    assert not (run / "writer.lock").exists()


def test_a_lock_from_another_host_is_never_taken_over(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    foreign = {"host": "ward-gpu-7", "pid": os.getpid(), "command": "dpmedtf run", "started_at": "2026-01-01T00:00:00+00:00"}
    (run / "writer.lock").write_text(json.dumps(foreign))
    with pytest.raises(RunDirectoryBusy, match=r"dpmedtf run \(PID \d+ on host ward-gpu-7, since 2026-01-01"):
        RunLock(run, "dpmedtf evaluate").acquire()
    assert json.loads((run / "writer.lock").read_text()) == foreign


def test_the_lock_is_reentrant_and_leaves_no_trace(tmp_path):
    run = tmp_path / "new" / "run"
    with pytest.raises(ValueError):
        with RunLock(run, "dpmedtf train"):
            with RunLock(run, "dpmedtf run"):  # the same process again: no deadlock, no second file
                pass
            assert (run / "writer.lock").exists()
            raise ValueError("the command failed before writing anything")
    assert not (tmp_path / "new").exists()  # the directories it had to create are gone again
    with RunLock(tmp_path / "absent", "dpmedtf evaluate", create=False):
        assert not (tmp_path / "absent").exists()  # evaluate/release never create a run directory
