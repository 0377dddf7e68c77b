"""Keep XLA's one-time compile notice off stderr when the user has asked TensorFlow to be quiet.

TensorFlow 2.15 logs "Compiled cluster using XLA!" (an INFO line, once per process) through its own
copy of Abseil's logging, which ignores ``TF_CPP_MIN_LOG_LEVEL`` and, never initialised, adds a warning
that "all log messages before absl::InitializeLog() are written to STDERR". The CLI sets the level to 3
so that a user sees dpmedtf's lines, not TensorFlow's; with ``training.jit_compile`` (true, or auto where a
GPU is visible) the step's chunks are compiled with XLA, so those two lines would appear in every such run.

Both are printed at most once per process. ``absorb_first_compile_notice`` therefore compiles one trivial
function first with file descriptor 2 filtered (``dpmedtf.native_stderr``, the mechanism that also keeps
DCMTK's lines off the console): everything else passes on, and later compilations print nothing.
With ``TF_CPP_MIN_LOG_LEVEL`` unset or 0 (INFO wanted) it does nothing.
"""

from __future__ import annotations

import os
import threading

import tensorflow as tf

from dpmedtf.native_stderr import native_stderr_filtered

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


def _is_compile_notice_bytes(line: bytes) -> bool:
    return is_compile_notice(line.decode(errors="replace"))


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
        with tf.init_scope(), native_stderr_filtered(_is_compile_notice_bytes), tf.device("/CPU:0"):
            _trivial(tf.constant(0.0)).numpy()
