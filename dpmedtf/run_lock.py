"""One writer per run directory: ``<run>/writer.lock`` names the process that writes there.

``run``, ``train``, ``evaluate`` and ``release`` take the lock before they write anything into a run
directory and give it back when they end, however they end. A second process is refused with a
message naming the holder (command, PID, host, start time). The lock file appears complete or not at
all: it is written under a private name and hard-linked into place, which fails if the name exists
(atomic on local file systems and NFS alike).

A lock whose holder is gone is stale: same host, and the PID is dead, a zombie, or now a different
process (its start time differs), or the machine rebooted since (boot id differs). A stale lock is taken
over with a note; the takeover happens under ``flock`` on the run directory, so two processes that find
the same stale lock cannot both take it over. A lock held from another host is never taken over: its
PID means nothing here, so the message says how to remove it once that process is known to be gone.

The lock is re-entrant within a process (a ``run`` that calls library code which locks again), and the
directory it had to create for the lock is removed again if nothing else was written into it.
"""

from __future__ import annotations

import datetime as _datetime
import json
import os
import socket
import sys
from pathlib import Path

from dpmedtf.errors import DpmedtfError, OutputError
from dpmedtf.layout import RunDir

_held: dict[str, "RunLock"] = {}


class RunDirectoryBusy(DpmedtfError):
    """Another process writes the run directory (or may: a lock from another host)."""


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), which tells a reused PID apart."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    return fields[19] if len(fields) > 19 else None


def _process_state(pid: int) -> str | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()[0]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return _process_state(pid) != "Z"  # a killed process its parent has not reaped yet holds nothing


def describe_holder(holder: dict) -> str:
    command = holder.get("command") or "a dpmedtf process"
    return (f"{command} (PID {holder.get('pid')} on host {holder.get('host')}, since "
            f"{holder.get('started_at', 'an unknown time')})")


class RunLock:
    """``with RunLock(run_dir, "dpmedtf train"):`` — the exclusive right to write ``run_dir``.

    ``create=False`` (evaluate, release): a directory that does not exist is not created and not locked;
    the command then says what is missing."""

    def __init__(self, directory: str | os.PathLike, command: str, *, create: bool = True, log=None):
        self.directory = Path(directory)
        self.path = RunDir(self.directory).writer_lock
        self.command = command
        self.create = create
        self.log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        self._key: str | None = None
        self._state = "idle"  # idle | owner | nested (this process already held it) | absent (no directory)
        self._created: list[Path] = []
        self._record: dict | None = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def acquire(self) -> None:
        if self._state != "idle":
            raise RuntimeError(f"{self.path}: this RunLock is in use already")  # a bug in the caller
        if not self.directory.exists():
            if not self.create:
                self._state = "absent"
                return
            self._make_directory()
        self._key = str(self.directory.resolve())
        if self._key in _held:
            self._state = "nested"
            return
        record = {"host": socket.gethostname(), "pid": os.getpid(), "command": self.command,
                  "started_at": _datetime.datetime.now(_datetime.timezone.utc).isoformat(timespec="seconds"),
                  "boot_id": _boot_id(), "process_start": _process_start(os.getpid())}
        if not self._create_lock(record):
            holder = self._read_holder()
            reason = self._stale_reason(holder)
            if reason is None or not self._take_over(holder, record, reason):
                self._give_up_directory()
                holder = self._read_holder() or holder
                raise RunDirectoryBusy(
                    f"{self.directory} is being written by {describe_holder(holder)}; a run directory takes one "
                    f"writer at a time, so this {self.command} stops before writing anything. Wait for that process "
                    f"to finish, or use another output directory. If that process is gone (e.g. its machine "
                    f"crashed), delete {self.path} and start again")
        self._record = record
        self._state = "owner"
        _held[self._key] = self

    def release(self) -> None:
        state, self._state = self._state, "idle"
        if state != "owner":
            return
        _held.pop(self._key, None)
        current = self._read_holder(quiet=True)
        mine = tuple(self._record[k] for k in ("pid", "host", "started_at"))
        if tuple(current.get(k) for k in ("pid", "host", "started_at")) == mine:
            self.path.unlink(missing_ok=True)
        else:  # someone took it over (it looked stale to them): theirs now
            self.log(f"note: {self.path} no longer names this process; left it in place")
        self._give_up_directory()

    # --- the file -------------------------------------------------------------------------------------

    def _create_lock(self, record: dict) -> bool:
        """Writes ``record`` to the lock file if none exists; False if one does."""
        private = self.path.with_name(f".{self.path.name}.{os.getpid()}.{os.urandom(4).hex()}")
        try:
            private.write_text(json.dumps(record, indent=2) + "\n")
            try:
                os.link(private, self.path)
                return True
            except FileExistsError:
                return False
            finally:
                private.unlink(missing_ok=True)
        except OSError as exc:
            self._give_up_directory()
            raise OutputError(f"{self.directory}: cannot write the lock file {self.path.name} there "
                              f"({exc.strerror or exc}); check that the directory is writable, or choose another "
                              "output directory") from None

    def _read_holder(self, quiet: bool = False) -> dict:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return {} if quiet else {"command": f"an unknown process (the lock file {self.path} is unreadable)"}

    def _stale_reason(self, holder: dict) -> str | None:
        """Why the holder is known to be gone, or None (alive, or on another host, or unknown)."""
        if not holder:
            return "the lock file vanished"  # released between our attempt and the read: simply try again
        if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            return None
        pid = holder["pid"]
        if holder.get("boot_id") and _boot_id() and holder["boot_id"] != _boot_id():
            return "this machine restarted since it took the lock"
        if not _alive(pid):
            return f"process {pid} is no longer running"
        if holder.get("process_start") and _process_start(pid) not in (None, holder["process_start"]):
            return f"process {pid} is no longer running (its PID now belongs to another process)"
        return None

    def _take_over(self, stale: dict, record: dict, reason: str) -> bool:
        """Replaces a stale lock, serialised by flock on the directory; False if someone else got it first."""
        with _DirectoryGuard(self.directory):
            if self._read_holder(quiet=True) != stale:
                return self._create_lock(record)  # it changed meanwhile: taken by another, or released
            if not stale:
                return self._create_lock(record)
            self.path.unlink(missing_ok=True)
            if not self._create_lock({**record, "took_over_from": stale}):
                return False
        self.log(f"note: took over the lock of {self.directory} from {describe_holder(stale)}: {reason}")
        return True

    # --- the directory --------------------------------------------------------------------------------

    def _make_directory(self) -> None:
        missing = []
        for parent in [self.directory, *self.directory.parents]:
            if parent.exists():
                break
            missing.append(parent)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{self.directory}: cannot create the run directory ({exc.strerror or exc}); choose "
                              "another output directory") from None
        self._created = missing  # deepest first

    def _give_up_directory(self) -> None:
        """Removes the directories this lock created if they are still empty (a command that failed early)."""
        for directory in self._created:
            try:
                directory.rmdir()
            except OSError:
                break
        self._created = []


class _DirectoryGuard:
    """flock on the directory itself (no extra file to leave behind); a no-op where flock is unavailable."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.fd = None

    def __enter__(self):
        try:
            import fcntl

            self.fd = os.open(self.directory, os.O_RDONLY)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except (ImportError, OSError):
            if self.fd is not None:
                os.close(self.fd)
            self.fd = None
        return self

    def __exit__(self, *exc_info):
        if self.fd is not None:
            os.close(self.fd)  # closing releases the flock
            self.fd = None


def training_lock(directory: str | os.PathLike, training, command: str = "dpmedtf train"):
    """The lock for training into ``directory``: every worker of a multi-worker job is started with the
    same output directory, but only the chief writes there, so only the chief holds it."""
    from contextlib import nullcontext

    from dpmedtf.training.distribution import is_chief, strategy_for

    return RunLock(directory, command) if is_chief(strategy_for(training)) else nullcontext()
