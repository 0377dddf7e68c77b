"""Keep XLA's one-time compile notice off stderr when the user has asked TensorFlow to be quiet.

TensorFlow 2.15 logs "Compiled cluster using XLA!" (an INFO line, once per process) through its own
copy of Abseil's logging, which ignores ``TF_CPP_MIN_LOG_LEVEL`` and, never initialised, adds a warning
that "all log messages before absl::InitializeLog() are written to STDERR". The CLI sets the level to 3
so that a user sees dpmedtf's lines, not TensorFlow's; with ``training.jit_compile`` (true, or auto where a
GPU is visible) the step's chunks are compiled with XLA, so those two lines would appear in every such run.

Both are printed at most once per process. ``absorb_first_compile_notice`` therefore compiles one trivial
function first, with the process's stderr (file descriptor 2) caught in a temporary file, and writes back
everything it caught except those two lines: nothing else is lost, and later compilations print nothing.
With ``TF_CPP_MIN_LOG_LEVEL`` unset or 0 (INFO wanted) it does nothing.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading

import tensorflow as tf

_NOTICES = ("WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
            "Compiled cluster using XLA!")
_lock = threading.Lock()
_absorbed = False


def info_logs_wanted() -> bool:
    """Whether ``TF_CPP_MIN_LOG_LEVEL`` lets TensorFlow's INFO lines through (unset, empty or 0)."""
    level = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "").strip()
    return not level.isdigit() or int(level) < 1


def is_compile_notice(line: str) -> bool:
    return any(notice in line for notice in _NOTICES)


@tf.function(jit_compile=True)
def _trivial(value):
    return value + 1.0


def absorb_first_compile_notice() -> None:
    """Compile once with stderr caught, so that XLA's one-time notice is not shown (see the module docstring).

    Safe to call while a ``tf.function`` is being traced (it runs eagerly, outside the graph) and from
    several threads (the first call does the work).
    """
    global _absorbed
    with _lock:
        if _absorbed or info_logs_wanted():
            return
        _absorbed = True
        with tf.init_scope(), tempfile.TemporaryFile() as caught:
            sys.stderr.flush()
            saved = os.dup(2)
            os.dup2(caught.fileno(), 2)
            try:
                with tf.device("/CPU:0"):
                    _trivial(tf.constant(0.0)).numpy()
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
            caught.seek(0)
            kept = [line for line in caught.read().decode(errors="replace").splitlines()
                    if not is_compile_notice(line)]
        if kept:
            sys.stderr.write("\n".join(kept) + "\n")
