"""Resumable, atomic checkpoints of a training run, and the checks before one is resumed.

A checkpoint is a directory ``step-NNNNNNNNN`` holding the network, the optimizer, the run's secret
(the only state of the mechanism's randomness), the position (the next step) and the ledger up to it.
It is written under a staging name and renamed into place, and ``latest.json`` points at the newest,
so an interrupted save never leaves a half-written checkpoint that looks whole.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import tensorflow as tf

from dpmedtf.errors import DpmedtfError
from dpmedtf.files import write_json_atomic
from dpmedtf.privacy.ledger import Ledger
from dpmedtf.privacy.randomness import RunSecret

_STATE, _LEDGER, _POSITION, _LATEST = "state", "ledger.json", "position.json", "latest.json"
_SECRET_KEY = "run_secret/.ATTRIBUTES/VARIABLE_VALUE"
_SETTINGS_CHANGED = ("{checkpoint} was made with different privacy settings than this config; use a new output "
                     "directory or --force to start over (the old run's ε stays spent)")


def _checkpoint(model) -> tf.train.Checkpoint:
    return tf.train.Checkpoint(network=model.network, optimizer=model.step_optimizer, run_secret=model.run_secret)


def save_checkpoint(directory: Path, model, step: int, ledger: Ledger | None, keep: int = 2) -> Path:
    """Atomically: model, optimizer, run secret, sampler position (the next step) and ledger."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step:09d}"
    staging = directory / f".staging-{step:09d}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    _checkpoint(model).write(str(staging / _STATE))
    if ledger is not None:
        ledger.save(staging / _LEDGER)
    (staging / _POSITION).write_text(json.dumps({"next_step": step}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    write_json_atomic(directory / _LATEST, {"checkpoint": final.name, "next_step": step})
    for old in sorted(directory.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(directory: Path) -> Path | None:
    pointer = directory / _LATEST
    if not pointer.is_file():
        return None
    return directory / json.loads(pointer.read_text())["checkpoint"]


def erase_secret(directory: Path, model, step: int, ledger: Ledger | None) -> None:
    """Zeroes the run's secret and keeps only a checkpoint without it.

    Training is over: the secret has nothing left to do, so no kept checkpoint may hold it (one leaked
    checkpoint would otherwise reveal every batch and every noise draw). Every worker calls this
    (saving may need collectives).
    """
    model.run_secret.assign(tf.zeros_like(model.run_secret))
    save_checkpoint(directory, model, step, ledger, keep=1)


def run_secret_of(checkpoint: Path | None, experiment_seed: int | None, allow_erased: bool = False) -> RunSecret:
    """A fresh secret from OS entropy, the experiment's seed-derived one, or a resumed run's own.

    ``allow_erased``: a run killed after its final checkpoint erased the secret but before its last
    files were written may be finished from that checkpoint (no step left to run needs the secret)."""
    if checkpoint is None:
        return RunSecret.fresh() if experiment_seed is None else RunSecret.from_experiment_seed(experiment_seed)
    try:
        words = tf.train.load_checkpoint(str(checkpoint / _STATE)).get_tensor(_SECRET_KEY)
    except (tf.errors.NotFoundError, tf.errors.InvalidArgumentError) as exc:
        raise DpmedtfError(f"{checkpoint} holds no run secret (made by an older dpmedtf?): its batches and noise "
                           "cannot be continued; start over with --force or a new output directory") from exc
    secret = RunSecret.from_words(words, experiment_seed)
    if secret.is_erased and allow_erased:
        return secret
    if secret.is_erased:
        raise DpmedtfError(erased_message(checkpoint))
    if experiment_seed is not None and secret != RunSecret.from_experiment_seed(experiment_seed):
        raise DpmedtfError(f"{checkpoint} was not made with privacy.noise_seed {experiment_seed}; use the same privacy "
                           "settings, a new output directory, or --force to start over")
    return secret


def erased_message(checkpoint: Path) -> str:
    return (f"{checkpoint}: this training finished and its secret was erased; it cannot be continued. "
            "Train again with --force or into a new output directory")


def checkpoint_ledger(checkpoint: Path, plan) -> Ledger | None:
    """The checkpoint's ledger, refused unless it was made with this plan's DP-SGD settings."""
    ledger = Ledger.load(checkpoint / _LEDGER) if (checkpoint / _LEDGER).is_file() else None
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


def restore(checkpoint: Path, model, plan, ledger: Ledger | None, fresh_ledger: Ledger | None) -> int:
    """Loads the checkpoint into ``model`` and returns its next step; ``ledger`` is its ledger, already
    checked by ``checkpoint_ledger``, and must agree with a fresh run's releases and randomness."""
    _checkpoint(model).read(str(checkpoint / _STATE)).assert_existing_objects_matched()
    step = json.loads((checkpoint / _POSITION).read_text())["next_step"]
    if plan.dp:
        if (ledger.releases, ledger.notes.get("randomness")) != (fresh_ledger.releases,
                                                                fresh_ledger.notes.get("randomness")):
            raise DpmedtfError(_SETTINGS_CHANGED.format(checkpoint=checkpoint))
        if ledger.steps != step:
            raise DpmedtfError(f"{checkpoint}: ledger records {ledger.steps} steps but the model is at {step}")
    return step
