"""Training on Keras ``fit``: DP-SGD (Poisson sampling, per-example clipping, calibrated Gaussian noise,
privacy ledger) or the non-private baseline, with resumable atomic checkpoints, on one device or
under a tf.distribute strategy (``training.strategy``).

One ``train_step`` is one logical step: each replica gets its shard of the step's batch (see
``data.sampling``), sums clipped gradients over physical chunks, and the optimizer applies the
all-reduced sum once. The numbers the accountant uses — N, expected batch B, q = B/N, steps, σ, C —
are computed once in ``plan_training`` and handed unchanged to the sampler, the step and the ledger.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from dpmedtf.config import JobConfig, config_to_dict
from dpmedtf.data.cache import PreparedData
from dpmedtf.data.pipeline import split_rows, training_dataset
from dpmedtf.data.sampling import PatientPoissonSampler, PoissonSampler, ShuffledBatches
from dpmedtf.errors import DpmedtfError
from dpmedtf.models import build_resnet9, convert_to_acs, load_model, validate_for_dp
from dpmedtf.privacy import accounting
from dpmedtf.privacy.class_counts import count_event, release_prevalences
from dpmedtf.privacy.randomness import RunSecret, effective_noise_multiplier, noise_stddev_float32
from dpmedtf.files import sha256_file, write_json_atomic
from dpmedtf.privacy.clipping import check_supported, fast_clipped_gradient_sum
from dpmedtf.privacy.ledger import Ledger
from dpmedtf.privacy.optimizers import clipped_gradient_sum, make_dp_nadam, noised_mean
from dpmedtf.training.distribution import (broadcast_from_chief, check_same_on_every_worker, is_chief,
                                           local_replicas, strategy_for)
from dpmedtf.training.losses import inverse_frequency_weights, prior_weights, weighted_bce_per_example


class BudgetExceededError(DpmedtfError):
    """The planned training would spend more ε than its budget."""


@dataclass(frozen=True)
class TrainingPlan:
    """The resolved numbers every part of a run agrees on."""

    dp: bool
    dataset_size: int
    """N: training records the sampler draws from (images, or patients)."""
    batch_size: int
    """Expected logical batch size B (records per step)."""
    steps: int
    """Total planned optimizer steps."""
    steps_per_epoch: float
    """N/B: an epoch is one expected pass over the data (epoch e ends at step round((e+1)·N/B))."""
    noise_multiplier: float | None
    clip_norm: float | None
    example_clip_norm: float | None
    """Clip norm per image: C, or C/k when a patient contributes up to k images per step."""
    max_images_per_patient: int
    unit_of_privacy: str
    delta: float | None
    accountant: str | None
    epsilon_budget: float | None
    planned_epsilon: float | None
    clipping: str | None = None
    """Per-example clipping engine with DP: "fast" or "vectorized" (``privacy.clipping``/``privacy.optimizers``)."""
    class_count_noise_std: float | None = None
    """With DP class counts: the noise on each count; their event is composed before DP-SGD's."""
    num_labels: int = 1

    @property
    def prior_event(self):
        """DP releases of the training data made before DP-SGD (the class counts), or None."""
        return count_event(self.class_count_noise_std, self.num_labels) if self.class_count_noise_std else None

    @property
    def sampling_rate(self) -> float:
        return self.batch_size / self.dataset_size


def plan_training(config: JobConfig, prepared: PreparedData) -> TrainingPlan:
    """N, B, steps and (for DP) σ calibrated so that the target ε is reached exactly at the last step."""
    train = prepared.cohort.frame.loc[split_rows(prepared, "train")]
    privacy, training = config.privacy, config.training
    num_labels = prepared.cohort.labels(train.iloc[:1]).shape[1]
    patient_unit = privacy.enabled and privacy.unit == "patient"
    dataset_size = train["patient_id"].nunique() if patient_unit else len(train)
    batch_size = training.batch_size
    if batch_size > dataset_size:
        raise DpmedtfError(f"training.batch_size {batch_size} exceeds the {dataset_size} training "
                           f"{'patients' if patient_unit else 'images'}; lower it")
    steps = training.steps or accounting.steps_for_epochs(dataset_size, batch_size, training.epochs)
    steps_per_epoch = dataset_size / batch_size
    if not privacy.enabled:
        return TrainingPlan(False, dataset_size, batch_size, steps, steps_per_epoch, None, None, None, 1,
                            "none", None, None, None, None, num_labels=num_labels)
    accounting.check_delta(privacy.delta, dataset_size, privacy.allow_large_delta)
    count_noise = training.class_count_noise_std if training.class_weights == "dp_counts" else None
    prior = count_event(count_noise, num_labels) if count_noise else None
    if privacy.target_epsilon is not None:
        calibration = accounting.calibrate_noise_multiplier(privacy.target_epsilon, privacy.delta, dataset_size,
                                                            batch_size, steps, privacy.accountant,
                                                            allow_large_delta=privacy.allow_large_delta,
                                                            prior_event=prior)
        sigma = calibration.accounting.schedule.noise_multiplier
        budget = privacy.epsilon_budget if privacy.epsilon_budget is not None else privacy.target_epsilon
    else:
        sigma = privacy.noise_multiplier
        budget = privacy.epsilon_budget
    # The graph adds float32 noise of σ·C rounded up; plan, ledger and certificate carry that σ.
    sigma = effective_noise_multiplier(sigma, privacy.clip_norm)
    planned = accounting.compute_epsilon(accounting.DpSgdSchedule(dataset_size, batch_size, steps, sigma),
                                         privacy.delta, privacy.accountant, privacy.allow_large_delta, prior).epsilon
    k = privacy.max_images_per_patient if patient_unit else 1
    return TrainingPlan(True, dataset_size, batch_size, steps, steps_per_epoch, float(sigma), privacy.clip_norm,
                        privacy.clip_norm / k, k, privacy.unit, privacy.delta, privacy.accountant, budget, planned,
                        training.clipping, count_noise, num_labels)


CLIPPING_ENGINES = {
    "fast": "dpmedtf fast clipping: per-layer per-example norms (ghost or instantiated), book-keeping clipped sum",
    "vectorized": "tensorflow-privacy vectorized DP optimizer: per-example gradients by tape.jacobian",
}


def make_optimizer(plan: TrainingPlan, learning_rate: float, network: tf.keras.Model):
    """NAdam; with the vectorized engine tensorflow-privacy's DP NAdam, which also does the clipping.

    The fast engine clips before the optimizer sees the gradient, so it takes Keras' NAdam itself (the
    DP NAdam's update is that same NAdam update; only its gradient computation differs).
    """
    if plan.dp and plan.clipping == "vectorized":
        return make_dp_nadam(learning_rate, plan.example_clip_norm)
    if plan.dp:
        check_supported(network)
    return tf.keras.optimizers.legacy.Nadam(learning_rate)


class _StepModel(tf.keras.Model):
    """The network plus one logical DP-SGD (or SGD) step per ``train_step`` call.

    Each call gets this replica's shard of one step (the whole step on a single device) and sums its
    clipped per-example gradients over physical chunks of at most ``max_physical_batch`` examples.
    The optimizer's ``apply_gradients`` then SUM-all-reduces what every replica hands it, so:

    - DP: each replica hands (its clipped sum)/B, and replica 0 alone adds N(0, σ²C²) before dividing.
      The applied gradient is (global clipped sum + one draw of noise)/B — the accountant's mechanism,
      however many replicas there are (noise on every replica would sum to √R·σC, not the σC certified).
    - Non-private: each replica hands its gradient sum over the global example count.

    Nothing is applied inside control flow, which tf.distribute forbids around a synchronisation point.
    """

    def __init__(self, network: tf.keras.Model, plan: TrainingPlan, optimizer, positive_weight, negative_weight,
                 secret: RunSecret, max_physical_batch: int = 32):
        super().__init__()
        self.network, self.plan = network, plan
        self.max_physical_batch = int(max_physical_batch)
        self.positive_weight = tf.constant(positive_weight)
        self.negative_weight = tf.constant(negative_weight)
        # The run's secret: the only state of the mechanism's randomness, kept in checkpoints and nowhere
        # else. The step never reads it: the input pipeline derives each step's noise seeds (or noise) from it.
        self.run_secret = tf.Variable(secret.to_words(), dtype=tf.int64, trainable=False, name="run_secret")
        self.step_optimizer = optimizer
        # Slots now, not on the first traced step: mirrored variables created inside a tf.function fail.
        optimizer._create_all_weights(network.trainable_variables)
        self.loss_tracker = tf.keras.metrics.Mean(name="loss")

    def call(self, inputs, training=False):
        return self.network(inputs, training=training)

    @property
    def metrics(self):
        return [self.loss_tracker]

    def train_step(self, data):
        images, labels = data["images"], data["labels"]
        variables = self.network.trainable_variables
        step = self.step_optimizer.iterations
        # Every replica must be on the step the optimizer is at: a shard of another step would mix batches.
        tf.debugging.assert_equal(tf.cast(data["step"], step.dtype), step, message="input step is not the optimizer step")
        count = tf.shape(images)[0]

        def add_chunk(start, sums, loss_sum):
            stop = tf.minimum(start + self.max_physical_batch, count)
            chunk_sums, chunk_loss = self._gradient_sum(images[start:stop], labels[start:stop])
            return stop, [a + b for a, b in zip(sums, chunk_sums)], loss_sum + chunk_loss

        # An empty shard (empty Poisson batch, or fewer examples than replicas) runs no chunk: its sum is 0.
        _, sums, loss_sum = tf.while_loop(
            lambda start, sums, loss_sum: start < count, add_chunk,
            (tf.constant(0), [tf.zeros(v.shape, v.dtype) for v in variables], tf.constant(0.0)))
        replica = tf.distribute.get_replica_context()
        if self.plan.dp:
            batch = float(self.plan.batch_size * self.plan.max_images_per_patient)
            stddev = noise_stddev_float32(self.plan.noise_multiplier, self.plan.clip_norm)
            gradients = tf.cond(
                tf.equal(replica.replica_id_in_sync_group, 0),
                lambda: noised_mean(sums, stddev, batch, data.get("noise_seeds"), data.get("noise")),
                lambda: [total / batch for total in sums])
        else:  # the mean loss gradient over the step's examples on all replicas
            examples = replica.all_reduce(tf.distribute.ReduceOp.SUM, tf.cast(count, tf.float32))
            gradients = [total / tf.maximum(examples, 1.0) for total in sums]
        self.step_optimizer.apply_gradients(zip(gradients, variables))
        self.loss_tracker.update_state(tf.math.divide_no_nan(loss_sum, tf.cast(count, tf.float32)),
                                       sample_weight=tf.cast(count, tf.float32))
        return {"loss": self.loss_tracker.result()}

    def _gradient_sum(self, images, labels):
        """Σ of the chunk's per-example gradients, clipped with DP; and its summed loss."""
        variables = self.network.trainable_variables

        def per_example_loss(logits):
            return weighted_bce_per_example(labels, logits, self.positive_weight, self.negative_weight)

        if self.plan.dp and self.plan.clipping == "fast":
            clipped = fast_clipped_gradient_sum(self.network, images, per_example_loss, self.plan.example_clip_norm)
            return list(clipped.sums), tf.reduce_sum(clipped.per_example_losses)
        with tf.GradientTape() as tape:
            losses = per_example_loss(self.network(images, training=True))
            total = tf.reduce_sum(losses)  # inside the tape, or its gradient is None
        if self.plan.dp:
            sums = clipped_gradient_sum(self.step_optimizer, losses, variables, tape)
        else:
            sums = tape.gradient(total, variables)
        return [tf.convert_to_tensor(s) for s in sums], total


# --- checkpoints ---------------------------------------------------------------------------------------

def _checkpoint(model: _StepModel) -> tf.train.Checkpoint:
    return tf.train.Checkpoint(network=model.network, optimizer=model.step_optimizer, run_secret=model.run_secret)


def save_checkpoint(directory: Path, model: _StepModel, step: int, ledger: Ledger | None, keep: int = 2) -> Path:
    """Atomically: model, optimizer, noise generator, sampler position (the next step) and ledger."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step:09d}"
    staging = directory / f".staging-{step:09d}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    _checkpoint(model).write(str(staging / "state"))
    if ledger is not None:
        ledger.save(staging / "ledger.json")
    (staging / "position.json").write_text(json.dumps({"next_step": step}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    write_json_atomic(directory / "latest.json", {"checkpoint": final.name, "next_step": step})
    for old in sorted(directory.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(directory: Path) -> Path | None:
    pointer = directory / "latest.json"
    if not pointer.is_file():
        return None
    return directory / json.loads(pointer.read_text())["checkpoint"]


class _Checkpointing(tf.keras.callbacks.Callback):
    """Checkpoints every ``every`` steps and at each epoch end; logs ε spent to TensorBoard and stdout."""

    def __init__(self, run: "_Run"):
        super().__init__()
        self.run = run
        self.last_saved = run.start_step
        self.writer = tf.summary.create_file_writer(str(run.write_dir / "tensorboard" / "privacy"))
        self.epoch_started = time.monotonic()

    def _steps_done(self) -> int:
        return int(self.run.model.step_optimizer.iterations.numpy())

    def _save(self):
        steps = self._steps_done()
        if steps == self.last_saved:
            return
        # Every worker saves (saving may need collectives); only the chief's copy is the run's.
        save_checkpoint(self.run.write_dir / "checkpoints", self.run.model, steps,
                        self.run.ledger_after(steps) if self.run.chief else None)
        self.last_saved = steps

    def on_train_batch_end(self, batch, logs=None):
        steps = self._steps_done()
        every = self.run.config.training.checkpoint_every_steps
        if every and steps != self.last_saved and steps % every == 0:
            self._save()

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_started = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        self._save()
        steps = self._steps_done()
        ledger = self.run.ledger_after(steps)
        epsilon = ledger.epsilon() if ledger is not None else None
        with self.writer.as_default():
            if epsilon is not None:
                tf.summary.scalar("privacy/epsilon", epsilon, step=steps)
            tf.summary.scalar("train/loss", (logs or {}).get("loss", float("nan")), step=steps)
        self.writer.flush()
        elapsed = time.monotonic() - self.epoch_started
        remaining = self.run.stop_step - steps
        eta = elapsed / max(1, steps - self.run.epoch_start(epoch)) * remaining if steps > self.run.epoch_start(epoch) else 0
        privacy = f", ε spent {epsilon:.3f} of {self.run.plan.epsilon_budget:.3g} (δ={self.run.plan.delta:g})" \
            if epsilon is not None and self.run.plan.epsilon_budget is not None else (
                f", ε spent {epsilon:.3f}" if epsilon is not None else "")
        print(f"epoch {epoch + 1}/{self.run.epochs}: step {steps}/{self.run.stop_step}, loss {(logs or {}).get('loss', float('nan')):.4f}"
              f"{privacy}, {elapsed:.1f} s, ETA {eta:.0f} s", file=sys.stderr, flush=True)


# --- the run -------------------------------------------------------------------------------------------

@dataclass
class _Run:
    config: JobConfig
    plan: TrainingPlan
    prepared: PreparedData
    out_dir: Path
    model: _StepModel
    ledger_at_start: Ledger | None
    """The ledger when this session started; the current one is always ``ledger_after(steps done)``."""
    start_step: int
    stop_step: int
    sampler: object
    strategy: tf.distribute.Strategy
    chief: bool
    write_dir: Path
    """Where this process writes: ``out_dir`` on the chief, a scratch directory on other workers."""
    secret: RunSecret
    """The source of the mechanism's randomness (sampling here, noise through ``noise_inputs``)."""

    @property
    def epochs(self) -> int:
        # ceil(E·N/B) steps overshoot E passes by under one step: the last epoch absorbs it.
        return max(1, round(self.stop_step / self.plan.steps_per_epoch))

    def epoch_start(self, epoch: int) -> int:
        return self.stop_step if epoch >= self.epochs else min(self.stop_step, round(epoch * self.plan.steps_per_epoch))

    def epoch_of(self, step: int) -> int:
        return max(e for e in range(self.epochs) if self.epoch_start(e) <= step)

    def ledger_after(self, steps_done: int) -> Ledger | None:
        if self.ledger_at_start is None:
            return None
        return self.ledger_at_start.record(steps_done - self.start_step, self.plan.sampling_rate,
                                           self.plan.noise_multiplier, self.plan.clip_norm)

    def epoch_steps(self, epoch: int) -> range:
        """The logical steps of one epoch (from the resume point in the first epoch)."""
        return range(max(self.start_step, self.epoch_start(epoch)), min(self.stop_step, self.epoch_start(epoch + 1)))

    def epoch_dataset(self, epoch: int) -> tf.distribute.DistributedDataset:
        """One element per replica per step of ``epoch``: every worker draws the same global batches and
        feeds its own replicas their shards."""
        steps = self.epoch_steps(epoch)
        volume_channels = int(self.model.network.input_shape[-1]) if self.prepared.spec.modality == "volume" else 1

        def dataset_for_worker(context: tf.distribute.InputContext) -> tf.data.Dataset:
            shards = list(self.sampler.shards(steps.start, steps.stop, local_replicas(context), context.num_replicas_in_sync))
            data = training_dataset(self.prepared, "train", shards, augment=bool(self.config.training.augment),
                                    seed=self.config.training.seed, volume_channels=volume_channels)
            if not self.plan.dp:
                return data
            return tf.data.Dataset.zip((data, self.noise_inputs(shards))).map(lambda d, n: {**d, **n})

        return self.strategy.distribute_datasets_from_function(dataset_for_worker)

    def noise_inputs(self, shards) -> tf.data.Dataset:
        """Per shard, what replica 0 needs to add the step's noise: 128-bit Philox seeds per variable, or
        with ``privacy.secure_rng`` the noise itself from the CSPRNG (made ahead of the step by tf.data).
        Other replicas add no noise and get zeros of the same shape."""
        variables = self.model.network.trainable_variables
        if not self.config.privacy.secure_rng:
            def seeds():
                for shard in shards:
                    yield {"noise_seeds": self.secret.noise_seeds(shard.step, len(variables)) if shard.replica == 0
                           else np.zeros((len(variables), 2), np.int64)}
            return tf.data.Dataset.from_generator(seeds, output_signature={
                "noise_seeds": tf.TensorSpec([len(variables), 2], tf.int64)})
        sizes = [int(np.prod(v.shape)) for v in variables]
        stddev = noise_stddev_float32(self.plan.noise_multiplier, self.plan.clip_norm)

        def noise():
            for shard in shards:
                yield {"noise": tuple(self.secret.secure_gaussian("noise", shard.step, sizes, stddev)
                                      if shard.replica == 0 else [np.zeros(n, np.float32) for n in sizes])}
        return tf.data.Dataset.from_generator(noise, output_signature={
            "noise": tuple(tf.TensorSpec([n], tf.float32) for n in sizes)}).prefetch(2)


@dataclass(frozen=True)
class TrainingResult:
    out_dir: Path
    model_path: Path
    plan: TrainingPlan
    ledger: Ledger | None
    steps: int
    seconds: float
    chief: bool = True
    """Whether this process wrote the run's files (False on the other workers of a multi-worker job)."""


def train(config: JobConfig, prepared: PreparedData, out_dir: str | os.PathLike, force: bool = False) -> TrainingResult:
    """Trains (or resumes) one job into ``out_dir``; refuses to overwrite a finished model.

    Under ``training.strategy: multi_worker`` every worker calls this with the same config and the same
    ``out_dir`` (shared storage: resuming reads the chief's checkpoints); only the chief writes there.
    """
    out_dir = Path(out_dir)
    model_path = out_dir / "model.keras"
    if model_path.exists() and not force:
        raise DpmedtfError(f"{model_path} already exists: this training finished. Use another output directory "
                           "or --force to train again")
    strategy = strategy_for(config.training)
    chief = is_chief(strategy)
    if force and chief:  # start over: nothing of the previous run may be mistaken for this one's
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
        shutil.rmtree(out_dir / "tensorboard", ignore_errors=True)
        for stale in (model_path, out_dir / "ledger.json", out_dir / "training.json"):
            stale.unlink(missing_ok=True)
    plan = plan_training(config, prepared)
    check_pretraining_is_public(config, prepared)
    train_rows = split_rows(prepared, "train")
    train_frame = prepared.cohort.frame.loc[train_rows]
    labels = prepared.cohort.labels(train_frame)
    tf.keras.utils.set_random_seed(config.training.seed)  # initialisation and augmentation, never the mechanism
    checkpoint = None if force else latest_checkpoint(out_dir / "checkpoints")
    # Other settings: say so before anything else of the checkpoint (its secret) is read.
    resumed_ledger = _checkpoint_ledger(checkpoint, plan) if checkpoint is not None else None
    secret = broadcast_from_chief(strategy, _run_secret(config, checkpoint))
    positive_weight, negative_weight, count_release = _class_weights(config, plan, labels, train_frame, secret)
    with strategy.scope():  # variables are mirrored on every replica
        network = _build_network(config, prepared, labels.shape[1])
        if plan.dp:
            validate_for_dp(network, engine=plan.clipping)
        optimizer = make_optimizer(plan, config.training.learning_rate, network)
        model = _StepModel(network, plan, optimizer, positive_weight, negative_weight, secret,
                           config.training.max_physical_batch)
        model.compile(run_eagerly=False)

    ledger = _initial_ledger(config, plan, prepared, secret, count_release) if plan.dp else None
    start_step = 0
    if checkpoint is not None:
        start_step, ledger = _resume(checkpoint, model, plan, resumed_ledger, ledger, out_dir)
    check_same_on_every_worker(strategy, {"the number of training records": plan.dataset_size,
                                          "the step to resume at": start_step})
    stop_step = plan.steps
    if plan.dp and plan.epsilon_budget is not None:
        fits = ledger.max_steps_within_budget(plan.steps - start_step, plan.sampling_rate, plan.noise_multiplier)
        if fits < plan.steps - start_step:
            message = (f"the plan's {plan.steps} steps would spend ε = {plan.planned_epsilon:.4g} > budget "
                       f"{plan.epsilon_budget:g}; only {start_step + fits} steps fit")
            if not config.training.stop_at_budget:
                raise BudgetExceededError(message + ". Lower epochs/steps, raise noise, or set "
                                          "training.stop_at_budget: true to stop there")
            print(f"note: {message}; training stops at step {start_step + fits}", file=sys.stderr)
            stop_step = start_step + fits

    sampler = _make_sampler(config, plan, train_frame, secret)
    write_dir = out_dir if chief else Path(tempfile.mkdtemp(prefix="dpmedtf-worker-"))
    run = _Run(config, plan, prepared, out_dir, model, ledger, start_step, stop_step, sampler, strategy, chief, write_dir,
               secret)
    try:
        return _fit(run, model_path)
    finally:
        if not chief:
            shutil.rmtree(write_dir, ignore_errors=True)


def _fit(run: "_Run", model_path: Path) -> TrainingResult:
    config, plan, prepared, model = run.config, run.plan, run.prepared, run.model
    if run.chief:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run.out_dir / "training.json", {
            "config": config_to_dict(config), "plan": dataclasses.asdict(plan),
            "synthetic_data": prepared.cohort.synthetic, "preprocessing": prepared.spec.as_dict(), "status": "running"})
    started = time.monotonic()
    if run.stop_step > run.start_step:
        print(_plan_summary(plan, run.start_step, run.stop_step, prepared, run.strategy), file=sys.stderr, flush=True)
        callbacks = [_Checkpointing(run)]
        if run.chief:
            callbacks.append(tf.keras.callbacks.TensorBoard(str(run.out_dir / "tensorboard"), update_freq="epoch"))
        # One fit call per epoch with its exact number of steps: Poisson epochs differ in length, and
        # Keras would otherwise fix every epoch to the first one's length (cutting steps or stopping early).
        for epoch in range(run.epoch_of(run.start_step), run.epochs):
            steps = run.epoch_steps(epoch)
            if not steps:  # round()ed epoch boundaries can leave the last epoch without steps
                continue
            model.fit(run.epoch_dataset(epoch), epochs=epoch + 1, initial_epoch=epoch, steps_per_epoch=len(steps),
                      verbose=0, callbacks=callbacks)
    steps_done = int(model.step_optimizer.iterations.numpy())
    if steps_done != run.stop_step:
        raise DpmedtfError(f"training ended at step {steps_done}, expected {run.stop_step}; the data pipeline "
                           "delivered fewer steps than planned")
    final_ledger = run.ledger_after(steps_done)
    model.network.save(run.write_dir / "model.keras")  # every worker saves; only the chief's is kept
    if run.chief and final_ledger is not None:
        final_ledger.save(run.out_dir / "ledger.json")
    # Training is over: the secret has nothing left to do, so no kept checkpoint may hold it (one leaked
    # checkpoint would otherwise reveal every batch and every noise draw). Every worker saves (collectives).
    model.run_secret.assign(np.zeros_like(model.run_secret.numpy()))
    save_checkpoint(run.write_dir / "checkpoints", model, steps_done, final_ledger if run.chief else None, keep=1)
    if run.chief:
        write_json_atomic(run.out_dir / "training.json", {
            "config": config_to_dict(config), "plan": dataclasses.asdict(plan), "steps": steps_done,
            "stopped_at_budget": run.stop_step < plan.steps, "synthetic_data": prepared.cohort.synthetic,
            "preprocessing": prepared.spec.as_dict(), "status": "finished",
            "epsilon": final_ledger.epsilon() if final_ledger is not None else None,
            "replicas": run.strategy.num_replicas_in_sync, "seconds_this_session": time.monotonic() - started})
    return TrainingResult(run.out_dir, model_path, plan, final_ledger, steps_done, time.monotonic() - started,
                          run.chief)


def _plan_summary(plan: TrainingPlan, start: int, stop: int, prepared: PreparedData,
                  strategy: tf.distribute.Strategy) -> str:
    what = "DP-SGD" if plan.dp else "non-private training"
    text = (f"{what}: N = {plan.dataset_size} {'patients' if plan.unit_of_privacy == 'patient' else 'images'}, "
            f"B = {plan.batch_size} (q = {plan.sampling_rate:.4g}), steps {start}→{stop} of {plan.steps}")
    if plan.dp:
        text += (f", σ = {plan.noise_multiplier:.5g}, C = {plan.clip_norm:g}, planned ε = {plan.planned_epsilon:.4g} "
                 f"at δ = {plan.delta:g} ({plan.accountant})")
    if strategy.num_replicas_in_sync > 1:
        text += f", on {strategy.num_replicas_in_sync} replicas ({type(strategy).__name__})"
    if prepared.cohort.synthetic:
        text += " — on SYNTHETIC data"
    return text


def _run_secret(config: JobConfig, checkpoint: Path | None) -> RunSecret:
    """A fresh secret from OS entropy, the experiment's seed-derived one, or a resumed run's own."""
    seed = config.privacy.noise_seed
    if checkpoint is None:
        return RunSecret.fresh() if seed is None else RunSecret.from_experiment_seed(seed)
    try:
        words = tf.train.load_checkpoint(str(checkpoint / "state")).get_tensor("run_secret/.ATTRIBUTES/VARIABLE_VALUE")
    except (tf.errors.NotFoundError, tf.errors.InvalidArgumentError) as exc:
        raise DpmedtfError(f"{checkpoint} holds no run secret (made by an older dpmedtf?): its batches and noise "
                           "cannot be continued; start over with --force or a new output directory") from exc
    secret = RunSecret.from_words(words, seed)
    if secret.is_erased:
        raise DpmedtfError(f"{checkpoint}: this training finished and its secret was erased; it cannot be continued. "
                           "Train again with --force or into a new output directory")
    if seed is not None and secret != RunSecret.from_experiment_seed(seed):
        raise DpmedtfError(f"{checkpoint} was not made with privacy.noise_seed {seed}; use the same privacy settings, "
                           "a new output directory, or --force to start over")
    return secret


def _class_weights(config: JobConfig, plan: TrainingPlan, labels: np.ndarray, train_frame, secret: RunSecret):
    """(positive, negative) loss weights per label and, for dp_counts, the DP release they come from."""
    weighting = config.training.class_weights
    if weighting == "dp_counts":
        records = train_frame["patient_id"].to_numpy() if plan.unit_of_privacy == "patient" else None
        noise = secret.secure_gaussian("class-counts", 0, [labels.shape[1]], 1.0)[0]
        release = release_prevalences(labels, records, plan.class_count_noise_std, noise)
        return (*prior_weights(release.prevalences), release)
    if weighting == "inverse_frequency":
        return (*inverse_frequency_weights(labels), None)
    if weighting == "public_prior":
        if len(config.training.class_prior) != labels.shape[1]:
            raise DpmedtfError(f"training.class_prior has {len(config.training.class_prior)} values for "
                               f"{labels.shape[1]} labels")
        return (*prior_weights(config.training.class_prior), None)
    ones = np.ones(labels.shape[1], np.float32)
    return ones, ones, None


def _initial_ledger(config: JobConfig, plan: TrainingPlan, prepared: PreparedData, secret: RunSecret,
                    count_release) -> Ledger:
    experiment = secret.is_experiment
    ledger = Ledger(plan.dataset_size, plan.batch_size, plan.delta, plan.accountant, plan.unit_of_privacy,
                    plan.epsilon_budget, notes={
                        "randomness": "experiment" if experiment else "secret",
                        "randomness_source": "derived from privacy.noise_seed in the job file: REPRODUCIBLE EXPERIMENT, "
                                             "no DP guarantee" if experiment else
                                             "256-bit secret from OS entropy, kept only in checkpoints and erased when training ends",
                        "sampling_rng": "ChaCha20 keyed by the run secret (HMAC-SHA256 sub-key), one coin per record and step",
                        "noise_rng": ("CSPRNG (ChaCha20) Gaussian, sum of four draws ÷ 2 (secure_rng)" if config.privacy.secure_rng
                                      else "stateless Philox, a 128-bit seed per (step, variable) from the run secret's ChaCha20 stream")
                                     + "; σ·C rounded up to float32",
                        "noise_added": "once per step to the global clipped sum (on replica 0 under a distribution strategy)",
                        "normalisation": "noised clipped sum divided by the expected batch size",
                        "clipping_engine": CLIPPING_ENGINES[plan.clipping],
                        "max_images_per_patient_per_step": plan.max_images_per_patient if plan.unit_of_privacy == "patient" else None,
                        "images_per_patient_max": int(prepared.cohort.frame.loc[split_rows(prepared, "train")]
                                                      .groupby("patient_id").size().max()),
                        "allow_large_delta": config.privacy.allow_large_delta,
                        "pretrained_weights": str(config.model.pretrained_weights) if config.model.pretrained_weights else None,
                        "pretrained_on": config.model.pretrained_on,
                        "synthetic_data": prepared.cohort.synthetic})
    if count_release is not None:
        ledger = ledger.with_release(count_release.ledger_release())
    if prepared.cohort.split_stratified_on_labels:
        ledger = ledger.with_non_dp_use("data split", "patients assigned to train/validation/test by a split stratified "
                                        "on their labels (which patients are trained on depends on the labels)",
                                        private_data_used=True)
    if config.training.class_weights == "inverse_frequency":
        ledger = ledger.with_non_dp_use("class weights", "inverse class frequencies counted exactly on the training "
                                        "labels (every example's loss depends on every training label)",
                                        private_data_used=True)
    elif config.training.class_weights == "public_prior":
        ledger = ledger.with_non_dp_use("class weights", f"from public prevalences {list(config.training.class_prior)}",
                                        private_data_used=False)
    return ledger


_SETTINGS_CHANGED = ("{checkpoint} was made with different privacy settings than this config; use a new output "
                     "directory or --force to start over (the old run's ε stays spent)")


def _checkpoint_ledger(checkpoint: Path, plan: TrainingPlan) -> Ledger | None:
    """The checkpoint's ledger, refused unless it was made with this plan's DP-SGD settings."""
    ledger = Ledger.load(checkpoint / "ledger.json") if (checkpoint / "ledger.json").is_file() else None
    if not plan.dp:
        return ledger
    if ledger is None:
        raise DpmedtfError(f"{checkpoint} has no privacy ledger: it is not a checkpoint of this DP run")
    segment = ledger.segments[-1] if ledger.segments else None
    if (ledger.dataset_size, ledger.batch_size, ledger.delta, ledger.unit_of_privacy) != (
            plan.dataset_size, plan.batch_size, plan.delta, plan.unit_of_privacy) or (segment and (
            segment.noise_multiplier, segment.clip_norm, segment.sampling_rate) != (
            plan.noise_multiplier, plan.clip_norm, plan.sampling_rate)):
        raise DpmedtfError(_SETTINGS_CHANGED.format(checkpoint=checkpoint))
    return ledger


def _resume(checkpoint: Path, model: _StepModel, plan: TrainingPlan, ledger: Ledger | None,
            fresh_ledger: Ledger | None, out_dir: Path) -> tuple[int, Ledger | None]:
    """Restores the checkpoint (whose ``ledger`` ``_checkpoint_ledger`` already checked against the plan)."""
    _checkpoint(model).read(str(checkpoint / "state")).assert_existing_objects_matched()
    step = json.loads((checkpoint / "position.json").read_text())["next_step"]
    if plan.dp:
        if (ledger.releases, ledger.notes.get("randomness")) != (fresh_ledger.releases,
                                                                fresh_ledger.notes.get("randomness")):
            raise DpmedtfError(_SETTINGS_CHANGED.format(checkpoint=checkpoint))
        if ledger.steps != step:
            raise DpmedtfError(f"{checkpoint}: ledger records {ledger.steps} steps but the model is at {step}")
    print(f"resuming {out_dir} at step {step}" + (f" (ε spent so far {ledger.epsilon():.4g})" if ledger else ""),
          file=sys.stderr, flush=True)
    return step, ledger


def _make_sampler(config: JobConfig, plan: TrainingPlan, train_frame, secret: RunSecret):
    if not plan.dp:
        return ShuffledBatches(plan.dataset_size, plan.batch_size, plan.steps, config.training.seed)
    if plan.unit_of_privacy == "patient":
        return PatientPoissonSampler(tuple(train_frame["patient_id"]), plan.batch_size, plan.steps, secret,
                                     plan.max_images_per_patient)
    return PoissonSampler(plan.dataset_size, plan.batch_size, plan.steps, secret)


def check_pretraining_is_public(config: JobConfig, prepared: PreparedData) -> None:
    """Refuses pretrained weights that dpmedtf trained without DP on this job's own data: the certificate
    would claim privacy for weights that already encode the private data. (Weights from elsewhere are the
    user's statement, recorded as ``model.pretrained_on``.)"""
    weights = config.model.pretrained_weights
    record = Path(weights).parent / "training.json" if weights else None
    if not config.privacy.enabled or record is None or not record.is_file():
        return
    recorded = json.loads(record.read_text()).get("config", {})
    manifest = recorded.get("data", {}).get("manifest")
    if recorded.get("privacy", {}).get("enabled", True) or not manifest or not Path(manifest).is_file():
        return
    ours = Path(config.data.manifest or prepared.cohort.source)
    if Path(manifest).resolve() == ours.resolve() or sha256_file(Path(manifest)) == sha256_file(ours):
        raise DpmedtfError(f"model.pretrained_weights {weights} were trained without DP on this job's own manifest "
                           f"({manifest}); DP fine-tuning cannot make them private. Pretrain on public data, or "
                           "train from scratch")


def _build_network(config: JobConfig, prepared: PreparedData, num_outputs: int) -> tf.keras.Model:
    model_config = config.model
    pretrained = load_model(model_config.pretrained_weights) if model_config.pretrained_weights else None
    if prepared.spec.modality == "radiograph":
        size = prepared.spec.image_size
        network = build_resnet9((size, size, 3), num_outputs, activation=model_config.activation,
                                groups=model_config.groups, scale_norm=model_config.scale_norm)
        if pretrained is not None:
            _copy_matching_weights(pretrained, network)
        return network
    depth, height, width = prepared.spec.item_shape
    if pretrained is not None and len(pretrained.input_shape) == 4:  # 2D-pretrained: the paper's PDAC route
        return convert_to_acs(pretrained, (depth, height, width, int(pretrained.input_shape[-1])), num_outputs)
    network = build_resnet9((depth, height, width, 1), num_outputs, activation=model_config.activation,
                            groups=model_config.groups, scale_norm=model_config.scale_norm)
    if pretrained is not None:
        _copy_matching_weights(pretrained, network)
    return network


def _copy_matching_weights(source: tf.keras.Model, target: tf.keras.Model) -> None:
    """Copies weights layer by layer where names and shapes match (a new head stays freshly initialised)."""
    copied = 0
    for layer in target.layers:
        try:
            weights = source.get_layer(layer.name).get_weights()
        except ValueError:
            continue
        if weights and [w.shape for w in weights] == [w.shape for w in layer.get_weights()]:
            layer.set_weights(weights)
            copied += 1
    if copied == 0:
        raise DpmedtfError(f"pretrained model {source.name} shares no layer with the network; is it a dpmedtf ResNet9?")
