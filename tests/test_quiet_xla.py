"""XLA's one-time compile notice stays off stderr when TensorFlow is asked to be quiet (as the CLI asks).

TensorFlow 2.15 prints it through Abseil regardless of TF_CPP_MIN_LOG_LEVEL; the DP step compiles the
noise's Philox rounds with XLA on a CPU, so without ``dpmedtf.quiet_xla`` every CLI run would show it.
"""

import os
import subprocess
import sys

import pytest

from dpmedtf.quiet_xla import is_compile_notice

# A DP noise draw large enough for the compiled Philox path, traced in a graph as the step traces it,
# and then a compiled function of the user's own.
SCRIPT = """
import tensorflow as tf
from dpmedtf.privacy.noise import XLA_PHILOX_MIN_SIZE, gaussian_noise
draw = tf.function(lambda seed: tf.reduce_sum(gaussian_noise([XLA_PHILOX_MIN_SIZE], seed, 1.0)))
print(float(draw(tf.constant([3, 4], tf.int64))))
print(float(tf.function(lambda x: 2.0 * x, jit_compile=True)(tf.constant(2.0))))
"""


def run(level: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": level})


@pytest.mark.parametrize("level", ["2", "3"])
def test_quiet_levels_show_no_compile_notice(level):
    result = run(level)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "4.0"
    assert not [line for line in result.stderr.splitlines() if is_compile_notice(line)], result.stderr


def test_info_level_keeps_tensorflows_notice():
    # The user asked for INFO lines: they are left alone (and this shows the notice is really printed).
    result = run("0")
    assert result.returncode == 0, result.stderr
    assert "Compiled cluster using XLA!" in result.stderr
