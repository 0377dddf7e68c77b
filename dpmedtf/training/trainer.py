"""``dpmedtf train`` for one job: the plan, the network, the secret, resume, the epoch loop, the outputs.

This module only composes: the plan (``plan``), the network (``network``), what else is computed from
the private data (``data_uses``), the DP step (``step``), checkpoints (``checkpoints``), callbacks and the
epoch loop (``callbacks``, ``loop``); the run directory's files are named by ``layout``. Under
``training.strategy: multi_worker`` every worker calls ``train`` with the same config and ``out_dir``
(shared storage: resuming reads the chief's checkpoints); only the chief writes there.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import tensorflow as tf

from dpmedtf.config import JobConfig, config_to_dict
from dpmedtf.data.cache import PreparedData
from dpmedtf.data.pipeline import split_rows
from dpmedtf.errors import DpmedtfError
from dpmedtf.files import write_json_atomic
from dpmedtf.layout import ModelDir
from dpmedtf.models import validate_for_dp
from dpmedtf.privacy.ledger import Ledger
from dpmedtf.training import checkpoints
from dpmedtf.training.callbacks import CheckpointAndReport
from dpmedtf.training.data_uses import class_weights, initial_ledger
from dpmedtf.training.distribution import (LOST_WORKER_ERRORS, broadcast_from_chief, check_same_on_every_worker,
                                          is_chief, is_multi_worker, lost_worker_message, strategy_for)
from dpmedtf.training.loop import EpochSchedule, distributed_epoch_dataset, run_epochs
from dpmedtf.training.losses import weighted_bce_per_example
from dpmedtf.training.network import build_network, check_pretraining_is_public
from dpmedtf.training.noise_inputs import noise_inputs
from dpmedtf.training.plan import (BudgetExceededError, TrainingPlan, plan_summary, plan_training, sampler_for,
                                   stop_step_within_budget)
from dpmedtf.training.step import GradientStep, StepModel, jit_compile_for

__all__ = ["BudgetExceededError", "TrainingPlan", "TrainingResult", "plan_training", "train"]


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
    """Trains (or resumes) one job into ``out_dir``; refuses to overwrite a finished model."""
    out = ModelDir(out_dir)
    if training_finished(out) and not force:
        raise DpmedtfError(f"{out.model} already exists: this training finished. Use another output directory "
                           "or --force to train again")
    strategy = strategy_for(config.training)
    chief = is_chief(strategy)
    if chief and not force:
        _discard_interrupted_end(out)
    if force and chief:  # start over: nothing of the previous run may be mistaken for this one's
        for stale in out.training_outputs:
            if stale.is_dir():
                shutil.rmtree(stale)
            else:
                stale.unlink(missing_ok=True)
    plan = plan_training(config, prepared)
    check_pretraining_is_public(config, prepared)
    train_frame = prepared.cohort.frame.loc[split_rows(prepared, "train")]
    labels = prepared.cohort.labels(train_frame)
    tf.keras.utils.set_random_seed(config.training.seed)  # initialisation and augmentation, never the mechanism
    checkpoint = None if force else checkpoints.latest_checkpoint(out.checkpoints)
    # Other settings: say so before anything else of the checkpoint (its secret) is read.
    resumed_ledger = checkpoints.checkpoint_ledger(checkpoint, plan) if checkpoint is not None else None
    secret = broadcast_from_chief(strategy, checkpoints.run_secret_of(checkpoint, config.privacy.noise_seed,
                                                                      allow_erased=True))
    positive_weight, negative_weight, count_release = class_weights(config, plan, labels, train_frame, secret)
    with strategy.scope():  # variables are mirrored on every replica
        network = build_network(config, prepared, labels.shape[1])
        if plan.dp:
            validate_for_dp(network, engine=plan.clipping)
        loss = functools.partial(weighted_bce_per_example, positive_weight=tf.constant(positive_weight),
                                 negative_weight=tf.constant(negative_weight))
        step = GradientStep(mechanism=plan.mechanism, engine=plan.clipping or "fast",
                            max_physical_batch=config.training.max_physical_batch,
                            jit_compile=jit_compile_for(config.training.jit_compile))
        model = StepModel(network, step=step, optimizer=tf.keras.optimizers.legacy.Nadam(config.training.learning_rate),
                          per_example_loss=loss, secret=secret)
        model.compile(run_eagerly=False)
    ledger = initial_ledger(config, plan, prepared, secret, count_release) if plan.dp else None
    start_step = 0
    if checkpoint is not None:
        start_step = checkpoints.restore(checkpoint, model, plan, resumed_ledger, ledger)
        ledger = resumed_ledger
        print(f"resuming {out.root} at step {start_step}" + (f" (ε spent so far {ledger.epsilon():.4g})" if ledger else ""),
              file=sys.stderr, flush=True)
    check_same_on_every_worker(strategy, {"the number of training records": plan.dataset_size,
                                          "the step to resume at": start_step})
    schedule = EpochSchedule(start_step=start_step, stop_step=stop_step_within_budget(config, plan, ledger, start_step),
                             steps_per_epoch=plan.steps_per_epoch)
    if secret.is_erased and schedule.stop_step > schedule.start_step:  # only the final checkpoint is erased
        raise DpmedtfError(checkpoints.erased_message(checkpoint))
    write_dir = out if chief else ModelDir(tempfile.mkdtemp(prefix="dpmedtf-worker-"))
    try:
        return _fit(config, plan, prepared, model, secret, ledger, schedule, out, write_dir, chief, strategy)
    finally:
        if not chief:
            shutil.rmtree(write_dir.root, ignore_errors=True)


def training_finished(out: ModelDir) -> bool:
    """A finished training is decided by its record, written last, never by the model file's existence."""
    if not (out.model.is_file() and out.training_record.is_file()):
        return False
    try:
        return json.loads(out.training_record.read_text()).get("status") == "finished"
    except (OSError, ValueError, AttributeError):
        return False


def _discard_interrupted_end(out: ModelDir) -> None:
    """A model file without a finished record was left by a kill during the run's last writes: it is not
    trusted (it may be half written); the run resumes from its last checkpoint and writes it again."""
    leftovers = [path for path in (out.model, out.staged_model) if path.exists()]
    for path in leftovers:
        path.unlink()
    if out.model in leftovers:
        print(f"note: {out.model} was left by an interrupted end of training ({out.training_record.name} does "
              "not say finished); it was discarded and is written again from the last checkpoint",
              file=sys.stderr, flush=True)


def _fit(config, plan, prepared, model, secret, ledger, schedule, out: ModelDir, write_dir: ModelDir, chief, strategy):
    def ledger_after(steps_done: int) -> Ledger | None:
        return None if ledger is None else plan.mechanism.record_steps(ledger, steps_done - schedule.start_step)

    record = {"config": config_to_dict(config), "plan": dataclasses.asdict(plan),
              "synthetic_data": prepared.cohort.synthetic, "preprocessing": prepared.spec.as_dict()}
    if chief:
        out.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out.training_record, {**record, "status": "running"})
    started = time.monotonic()
    if schedule.stop_step > schedule.start_step:
        print(plan_summary(plan, schedule.start_step, schedule.stop_step, prepared, strategy), file=sys.stderr, flush=True)
        callbacks = [CheckpointAndReport(write_dir=write_dir, step_model=model, schedule=schedule,
                                         ledger_after=ledger_after, every_steps=config.training.checkpoint_every_steps,
                                         epsilon_budget=plan.epsilon_budget, chief=chief)]
        if chief:
            callbacks.append(tf.keras.callbacks.TensorBoard(str(out.tensorboard), update_freq="epoch"))
        sampler = sampler_for(config, plan, prepared, secret)
        variables = model.network.trainable_variables
        noise = (functools.partial(noise_inputs, secret=secret, variables=variables, mechanism=plan.mechanism,
                                   secure_rng=config.privacy.secure_rng) if plan.dp else None)
        channels = int(model.network.input_shape[-1]) if prepared.spec.modality == "volume" else 1
        try:
            run_epochs(model, schedule, lambda steps: distributed_epoch_dataset(
                strategy, sampler, prepared, steps, augment=bool(config.training.augment), seed=config.training.seed,
                volume_channels=channels, noise=noise), callbacks)
        except LOST_WORKER_ERRORS as exc:
            if not is_multi_worker(strategy):
                raise
            raise DpmedtfError(lost_worker_message(exc, config.training.collective_timeout_seconds)) from None
    steps_done = int(model.step_optimizer.iterations.numpy())
    if steps_done != schedule.stop_step:
        raise DpmedtfError(f"training ended at step {steps_done}, expected {schedule.stop_step}; the data pipeline "
                           "delivered fewer steps than planned")
    final_ledger = ledger_after(steps_done)
    # The end is staged so that a kill at any point leaves a run that resumes: the model is written under
    # another name, the secret is erased in a last checkpoint that still holds the weights, and only then
    # does the model take its name; "finished" is training.json's status, written last.
    write_dir.staged_model.unlink(missing_ok=True)
    model.network.save(write_dir.staged_model)  # every worker saves; only the chief's is kept
    if chief and final_ledger is not None:
        final_ledger.save(out.ledger)
    checkpoints.erase_secret(write_dir.checkpoints, model, steps_done, final_ledger if chief else None)
    os.replace(write_dir.staged_model, write_dir.model)
    if chief:
        write_json_atomic(out.training_record, {
            **record, "steps": steps_done, "stopped_at_budget": schedule.stop_step < plan.steps, "status": "finished",
            "epsilon": final_ledger.epsilon() if final_ledger is not None else None,
            "replicas": strategy.num_replicas_in_sync, "seconds_this_session": time.monotonic() - started})
    return TrainingResult(out.root, out.model, plan, final_ledger, steps_done, time.monotonic() - started, chief)
