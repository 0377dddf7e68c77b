"""One logical DP-SGD step's gradient — the public step every training path uses.

A step gets this replica's share of one Poisson batch (the whole batch on one device), sums its
clipped per-example gradients over physical chunks of at most ``max_physical_batch`` examples (so a
large logical batch fits in memory), and turns the sum into the gradient the optimizer applies:

- DP: replica 0 adds N(0, σ²C²) to its clipped sum once, every replica divides by the expected
  examples per step (a data-independent constant), and the optimizer's SUM all-reduce makes the
  applied gradient (global clipped sum + one draw of noise)/B — the accountant's mechanism however
  many replicas there are (noise on every replica would sum to √R·σC, not the σC certified).
- Non-private: the mean loss gradient over the step's examples on all replicas.

The noise comes in with the data: 128-bit Philox seeds per variable (``noise_seeds``), or the noise
itself from the CSPRNG (``noise``), both drawn from the run's secret by the input pipeline; the step
holds no random state. ``dpmedtf train`` (``StepModel``) and ``make_private`` both call ``GradientStep``.

Compiled (``jit_compile``), every chunk has exactly ``max_physical_batch`` rows: the shard is padded with
rows of zeros and a row mask multiplies the per-example losses, so a padded row's loss and gradient are
exactly zero (its norm is 0, its clip factor 1, its clipped contribution 0 — in both engines). The chunk
then has one static shape, traces once and compiles with XLA, however many examples Poisson sampling
drew; the count stays the real one, so the divisor, the noise and the ledger do not change. The loop over
chunks, the noise and the optimizer stay outside the compiled function: their shapes are dynamic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import tensorflow as tf

from dpmedtf.errors import ConfigError
from dpmedtf.privacy.clipping.norms import gpu_visible
from dpmedtf.privacy.engines import get_engine
from dpmedtf.privacy.mechanism import DpSgdMechanism
from dpmedtf.privacy.noise import noised_mean
from dpmedtf.privacy.randomness import RunSecret
from dpmedtf.quiet_xla import absorb_first_compile_notice

PerExampleLoss = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
"""(targets, model outputs) → (B,) losses."""


@dataclass(frozen=True, kw_only=True)
class GradientStep:
    """How a logical step's gradient is made: the mechanism (None for non-private), engine and chunk size."""

    mechanism: DpSgdMechanism | None
    engine: str = "fast"
    """Per-example clipping engine (``privacy.engines``); unused without a mechanism."""
    max_physical_batch: int = 32
    """Most examples one device computes at once; a larger share of a step is summed over chunks."""
    jit_compile: bool = False
    """Pad every chunk to exactly ``max_physical_batch`` masked rows and compile it with XLA."""
    _compiled: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    """The compiled chunk function per (network, loss): traced once, not once per step."""

    def __post_init__(self):
        if self.mechanism is not None:
            get_engine(self.engine)  # an unknown engine fails here, not inside a traced step
        if not isinstance(self.max_physical_batch, int) or self.max_physical_batch < 1:
            raise ConfigError(f"max_physical_batch must be a whole number ≥ 1, got {self.max_physical_batch!r}")
        if not isinstance(self.jit_compile, bool):
            raise ConfigError(f"jit_compile must be true or false here, got {self.jit_compile!r} "
                              "(resolve 'auto' with training.step.jit_compile_for)")

    def gradients(self, network: tf.keras.Model, inputs, targets, per_example_loss: PerExampleLoss,
                  noise_seeds=None, noise=None) -> tuple[list[tf.Tensor], tf.Tensor, tf.Tensor]:
        """(gradient per trainable variable, summed loss, example count) of this replica's shard."""
        sums, loss_sum, count = self.clipped_sums(network, inputs, targets, per_example_loss)
        return self.released(sums, count, noise_seeds, noise), loss_sum, count

    def released(self, sums: list[tf.Tensor], count, noise_seeds=None, noise=None) -> list[tf.Tensor]:
        """What the optimizer applies from this replica's sums of ``count`` examples: with DP the noised sum
        over the expected batch size (noise once, on replica 0), without DP the mean over the step's examples."""
        replica = tf.distribute.get_replica_context()
        if self.mechanism is None:
            examples = replica.all_reduce(tf.distribute.ReduceOp.SUM, tf.cast(count, tf.float32))
            return [total / tf.maximum(examples, 1.0) for total in sums]
        normaliser = self.mechanism.normaliser
        return tf.cond(
            tf.equal(replica.replica_id_in_sync_group, 0),
            lambda: noised_mean(sums, self.mechanism.noise_stddev, normaliser, noise_seeds, noise),
            lambda: [total / normaliser for total in sums])

    def clipped_sums(self, network: tf.keras.Model, inputs, targets, per_example_loss: PerExampleLoss):
        """Σ of the shard's per-example gradients (clipped with DP), its summed loss and its size."""
        if self.jit_compile:
            return self._padded_clipped_sums(network, inputs, targets, per_example_loss)
        variables = network.trainable_variables
        count = tf.shape(inputs)[0]

        def add_chunk(start, sums, loss_sum):
            stop = tf.minimum(start + self.max_physical_batch, count)
            chunk_sums, chunk_loss = self._chunk_sums(network, inputs[start:stop], targets[start:stop],
                                                      per_example_loss)
            return stop, [a + b for a, b in zip(sums, chunk_sums)], loss_sum + chunk_loss

        # An empty shard (empty Poisson batch, or fewer examples than replicas) runs no chunk: its sum is 0.
        _, sums, loss_sum = tf.while_loop(
            lambda start, sums, loss_sum: start < count, add_chunk,
            (tf.constant(0), [tf.zeros(v.shape, v.dtype) for v in variables], tf.constant(0.0)))
        return sums, loss_sum, count

    def _padded_clipped_sums(self, network, inputs, targets, per_example_loss):
        """``clipped_sums`` over chunks of exactly ``max_physical_batch`` rows, each one compiled call."""
        size = self.max_physical_batch
        count = tf.shape(inputs)[0]
        chunks = (count + size - 1) // size
        padding = chunks * size - count
        # Zeros, never NaN, in padded rows (an ignored label is NaN, and 0·NaN would be NaN).
        inputs = tf.reshape(tf.pad(inputs, [[0, padding]] + [[0, 0]] * (inputs.shape.rank - 1)),
                            [-1, size, *inputs.shape[1:]])
        targets = tf.reshape(tf.pad(targets, [[0, padding]] + [[0, 0]] * (targets.shape.rank - 1)),
                             [-1, size, *targets.shape[1:]])
        compiled = self._compiled_chunk(network, per_example_loss)

        def add_chunk(chunk, sums, loss_sum):
            mask = tf.cast(tf.range(size) + chunk * size < count, tf.float32)
            chunk_sums, chunk_loss = compiled(inputs[chunk], targets[chunk], mask)
            return chunk + 1, [a + b for a, b in zip(sums, chunk_sums)], loss_sum + chunk_loss

        _, sums, loss_sum = tf.while_loop(
            lambda chunk, sums, loss_sum: chunk < chunks, add_chunk,
            (tf.constant(0), [tf.zeros(v.shape, v.dtype) for v in network.trainable_variables], tf.constant(0.0)))
        return sums, loss_sum, count

    def _compiled_chunk(self, network, per_example_loss):
        key = (id(network), id(per_example_loss))
        if key not in self._compiled:
            absorb_first_compile_notice()

            def masked_chunk_sums(inputs, targets, mask):
                return self._chunk_sums(network, inputs, targets, per_example_loss, mask)

            self._compiled[key] = tf.function(masked_chunk_sums, jit_compile=True)
        return self._compiled[key]

    def _chunk_sums(self, network, inputs, targets, per_example_loss, mask=None):
        def losses_of(outputs):
            losses = per_example_loss(targets, outputs)
            # A padded row's loss is multiplied by 0, so its gradient is exactly 0, not merely small.
            return losses if mask is None else losses * tf.cast(mask, losses.dtype)

        if self.mechanism is not None:
            engine = get_engine(self.engine)
            sums, losses = engine.clipped_gradient_sum(network, inputs, losses_of, self.mechanism.example_clip_norm)
            return [tf.convert_to_tensor(s) for s in sums], tf.cast(tf.reduce_sum(losses), tf.float32)
        with tf.GradientTape() as tape:
            total = tf.reduce_sum(losses_of(network(inputs, training=True)))  # inside the tape, or no gradient
        sums = tape.gradient(total, network.trainable_variables, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return [tf.convert_to_tensor(s) for s in sums], tf.cast(total, tf.float32)


def jit_compile_for(setting: str | bool) -> bool:
    """``training.jit_compile`` as it runs here: "auto" compiles where a GPU is visible.

    Measured (``benchmarks/dp_engines.py``, ``benchmarks/dp_step.py --xla``): on 2 CPU cores XLA made the
    non-private ResNet9 step 2× and the fast DP step 9–30× slower (its per-example loops become XLA
    while-loops), so auto leaves the step uncompiled there; on GPUs XLA fuses GroupNorm, Mish and the
    clipping arithmetic, TensorFlow's main lever for convolutional training.
    """
    if setting == "auto":
        return gpu_visible()
    if not isinstance(setting, bool):
        raise ConfigError(f"training.jit_compile must be auto, true or false, got {setting!r}")
    return setting


class StepModel(tf.keras.Model):
    """A network trained by ``dpmedtf train``: one ``GradientStep`` per ``train_step``, applied by its optimizer.

    Nothing is applied inside control flow, which tf.distribute forbids around a synchronisation point.
    With DP it reports no training loss: the mean loss of the private batches is a statistic of the
    training data outside DP, and the run's logs and TensorBoard files are records the adversary holds.
    """

    def __init__(self, network: tf.keras.Model, *, step: GradientStep, optimizer, per_example_loss: PerExampleLoss,
                 secret: RunSecret):
        super().__init__()
        self.network, self.step = network, step
        self.per_example_loss = per_example_loss
        # The run's secret: the only state of the mechanism's randomness, kept in checkpoints and nowhere
        # else. The step never reads it: the input pipeline derives each step's noise seeds (or noise) from it.
        self.run_secret = tf.Variable(secret.to_words(), dtype=tf.int64, trainable=False, name="run_secret")
        self.step_optimizer = optimizer
        # Slots now, not on the first traced step: mirrored variables created inside a tf.function fail.
        create_optimizer_slots(optimizer, network.trainable_variables)
        self.loss_tracker = tf.keras.metrics.Mean(name="loss")

    def call(self, inputs, training=False):
        return self.network(inputs, training=training)

    @property
    def metrics(self):
        return [] if self.step.mechanism is not None else [self.loss_tracker]

    def train_step(self, data):
        step = self.step_optimizer.iterations
        # Every replica must be on the step the optimizer is at: a shard of another step would mix batches.
        tf.debugging.assert_equal(tf.cast(data["step"], step.dtype), step, message="input step is not the optimizer step")
        gradients, loss_sum, count = self.step.gradients(self.network, data["images"], data["labels"],
                                                         self.per_example_loss, data.get("noise_seeds"),
                                                         data.get("noise"))
        self.step_optimizer.apply_gradients(zip(gradients, self.network.trainable_variables))
        if self.step.mechanism is not None:
            return {}
        self.loss_tracker.update_state(tf.math.divide_no_nan(loss_sum, tf.cast(count, tf.float32)),
                                       sample_weight=tf.cast(count, tf.float32))
        return {"loss": self.loss_tracker.result()}


def create_optimizer_slots(optimizer, variables) -> None:
    """The optimizer's slot variables for ``variables``, created now (Keras 2 legacy and new optimizers)."""
    if hasattr(optimizer, "_create_all_weights"):  # legacy optimizers
        optimizer._create_all_weights(variables)
    else:
        optimizer.build(variables)
