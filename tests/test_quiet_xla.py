"""XLA's one-time compile notice stays off stderr when TensorFlow is asked to be quiet (as the CLI asks).

TensorFlow 2.15 prints it through Abseil regardless of TF_CPP_MIN_LOG_LEVEL; with ``training.jit_compile``
the step's chunks are compiled by XLA, so without ``dpmedtf.quiet_xla`` every such CLI run would show it.
"""

import os
import subprocess
import sys

import pytest

from dpmedtf.quiet_xla import is_compile_notice

# A compiled DP step's clipped sums, traced in a graph as the trainer traces them, and then a compiled
# function of the user's own.
SCRIPT = """
import tensorflow as tf
from dpmedtf.models import build_resnet9
from dpmedtf.privacy.mechanism import DpSgdMechanism
from dpmedtf.training.step import GradientStep
mechanism = DpSgdMechanism(dataset_size=100, expected_batch_size=4, clip_norm=1.0, noise_multiplier=1.0,
                           delta=1e-5, accountant="rdp")
step = GradientStep(mechanism=mechanism, max_physical_batch=4, jit_compile=True)
model = build_resnet9((32, 32, 1), 2, groups=4, widths=(4, 8, 8, 8))
loss = lambda targets, logits: tf.reduce_sum(tf.nn.sigmoid_cross_entropy_with_logits(targets, logits), axis=1)
sums = tf.function(lambda x, y: step.clipped_sums(model, x, y, loss)[0])(tf.ones([3, 32, 32, 1]), tf.ones([3, 2]))
print(len(sums) == len(model.trainable_variables))
print(float(tf.function(lambda x: 2.0 * x, jit_compile=True)(tf.constant(2.0))))
"""


def run(level: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": level})


@pytest.mark.parametrize("level", ["2", "3"])
def test_quiet_levels_show_no_compile_notice(level):
    result = run(level)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-2:] == ["True", "4.0"], result.stdout
    assert not [line for line in result.stderr.splitlines() if is_compile_notice(line)], result.stderr


def test_info_level_keeps_tensorflows_notice():
    # The user asked for INFO lines: they are left alone (and this shows the notice is really printed).
    result = run("0")
    assert result.returncode == 0, result.stderr
    assert "Compiled cluster using XLA!" in result.stderr
