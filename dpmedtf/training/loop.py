"""The epoch loop of a CLI training run: which logical steps make each epoch, and one Keras ``fit`` per epoch.

An epoch is one expected pass over the data: epoch e ends at step round((e+1)·N/B). Poisson epochs
differ in length, and Keras would fix every epoch to the first one's length (cutting steps or stopping
early), so each epoch is its own ``fit`` call with exactly its steps. A resumed run starts inside the
epoch of its checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import tensorflow as tf

from dpmedtf.data.cache import PreparedData
from dpmedtf.data.pipeline import training_dataset
from dpmedtf.training.distribution import local_replicas


@dataclass(frozen=True, kw_only=True)
class EpochSchedule:
    start_step: int
    """The first step this session trains (0, or a checkpoint's next step)."""
    stop_step: int
    """The step this session stops before (the plan's end, or where the ε budget runs out)."""
    steps_per_epoch: float
    """N/B."""

    @property
    def epochs(self) -> int:
        # ceil(E·N/B) steps overshoot E passes by under one step: the last epoch absorbs it.
        return max(1, round(self.stop_step / self.steps_per_epoch))

    def epoch_start(self, epoch: int) -> int:
        return self.stop_step if epoch >= self.epochs else min(self.stop_step, round(epoch * self.steps_per_epoch))

    def epoch_of(self, step: int) -> int:
        return max(e for e in range(self.epochs) if self.epoch_start(e) <= step)

    def epoch_steps(self, epoch: int) -> range:
        """The logical steps of one epoch (from the resume point in the first epoch)."""
        return range(max(self.start_step, self.epoch_start(epoch)), min(self.stop_step, self.epoch_start(epoch + 1)))


def distributed_epoch_dataset(strategy: tf.distribute.Strategy, sampler, prepared: PreparedData, steps: range, *,
                              augment: bool, seed: int, volume_channels: int,
                              noise: Callable | None) -> tf.distribute.DistributedDataset:
    """One element per replica per step: every worker draws the same global batches and feeds its own
    replicas their shards; ``noise(shards)`` (with DP) zips in what replica 0 needs to add the noise."""

    def dataset_for_worker(context: tf.distribute.InputContext) -> tf.data.Dataset:
        shards = list(sampler.shards(steps.start, steps.stop, local_replicas(context), context.num_replicas_in_sync))
        data = training_dataset(prepared, "train", shards, augment=augment, seed=seed, volume_channels=volume_channels)
        if noise is None:
            return data
        return tf.data.Dataset.zip((data, noise(shards))).map(lambda d, n: {**d, **n})

    return strategy.distribute_datasets_from_function(dataset_for_worker)


def run_epochs(model: tf.keras.Model, schedule: EpochSchedule, dataset_for: Callable[[range], object],
               callbacks: list[tf.keras.callbacks.Callback]) -> None:
    """Trains ``model`` from ``schedule.start_step`` to ``schedule.stop_step``, epoch by epoch."""
    for epoch in range(schedule.epoch_of(schedule.start_step), schedule.epochs):
        steps = schedule.epoch_steps(epoch)
        if not steps:  # round()ed epoch boundaries can leave the last epoch without steps
            continue
        model.fit(dataset_for(steps), epochs=epoch + 1, initial_epoch=epoch, steps_per_epoch=len(steps),
                  verbose=0, callbacks=callbacks)
