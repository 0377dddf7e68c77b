"""Filter the lines native libraries write straight to file descriptor 2.

C++ code beneath Python writes to fd 2 directly, past ``sys.stderr`` and past ``TF_CPP_MIN_LOG_LEVEL``:
tensorflow-io's DCMTK logs "W:"/"E:" lines for header oddities of many real CRs, and TensorFlow 2.15's
Abseil prints XLA's one-time compile notice. ``native_stderr_filtered`` is the one mechanism for both:
fd 2 is pointed at a pipe whose reader passes every other line on to the real stderr as it arrives, so
nothing else is lost or held back, and collects the lines the caller names.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Callable, Iterator


def _always(_: bytes) -> bool:
    return True


@contextlib.contextmanager
def native_stderr_filtered(is_caught: Callable[[bytes], object], *,
                           may_be_caught: Callable[[bytes], bool] = _always) -> Iterator[list[str]]:
    """Keeps the fd-2 lines for which ``is_caught(line)`` is true off the console; yields them, decoded.

    ``may_be_caught(partial)`` says whether the start of a line not yet ended could still be caught; when it
    cannot, the partial line is passed on at once instead of waiting for its newline. fd 2 is restored on
    every exit, errors included; with no fd 2 to redirect (a closed descriptor) nothing is captured.
    """
    try:
        sys.stderr.flush()  # Python's own buffered output goes out before the redirection
        saved = os.dup(2)
    except (OSError, ValueError):
        yield []
        return
    read_end, write_end = os.pipe()
    captured: list[str] = []

    def emit(line: bytes) -> None:
        if is_caught(line):
            captured.append(line.decode(errors="replace").rstrip())
            return
        while line:
            line = line[os.write(saved, line):]

    def forward() -> None:
        pending = b""
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    emit(line + b"\n")
                if pending and not may_be_caught(pending):
                    emit(pending)  # a partial line that cannot be caught: pass it on now
                    pending = b""
        if pending:
            emit(pending)

    reader = threading.Thread(target=forward, name="native-stderr", daemon=True)
    reader.start()
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        yield captured
    finally:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(saved, 2)  # drops the pipe's last write end: the reader drains it and stops
        reader.join(timeout=10)
        if not reader.is_alive():  # else a stray holder of the pipe keeps it open; leave the reader its fd
            os.close(saved)
