"""Keras callbacks of a CLI training run: checkpoints and the per-epoch progress line with ε spent."""

from __future__ import annotations

import sys
import time
from typing import Callable

import tensorflow as tf

from dpmedtf.layout import ModelDir
from dpmedtf.privacy.ledger import Ledger
from dpmedtf.training.checkpoints import save_checkpoint
from dpmedtf.training.loop import EpochSchedule


class CheckpointAndReport(tf.keras.callbacks.Callback):
    """Checkpoints every ``every_steps`` steps and at each epoch end; logs ε spent to TensorBoard and stderr.

    ``ledger_after(steps)`` gives the ledger after that many steps (None without DP). Every worker saves
    (saving may need collectives); only the chief's copy, written with its ledger, is the run's.
    """

    def __init__(self, *, write_dir: ModelDir, step_model, schedule: EpochSchedule,
                 ledger_after: Callable[[int], Ledger | None], every_steps: int, epsilon_budget: float | None,
                 chief: bool):
        super().__init__()
        self.write_dir, self.step_model, self.schedule = write_dir, step_model, schedule
        self.ledger_after, self.every_steps, self.epsilon_budget, self.chief = (ledger_after, every_steps,
                                                                                epsilon_budget, chief)
        self.last_saved = schedule.start_step
        self.writer = tf.summary.create_file_writer(str(write_dir.privacy_tensorboard))
        self.epoch_started = time.monotonic()

    def _steps_done(self) -> int:
        return int(self.step_model.step_optimizer.iterations.numpy())

    def _save(self):
        steps = self._steps_done()
        if steps == self.last_saved:
            return
        save_checkpoint(self.write_dir.checkpoints, self.step_model, steps,
                        self.ledger_after(steps) if self.chief else None)
        self.last_saved = steps

    def on_train_batch_end(self, batch, logs=None):
        steps = self._steps_done()
        if self.every_steps and steps != self.last_saved and steps % self.every_steps == 0:
            self._save()

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_started = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        self._save()
        steps = self._steps_done()
        ledger = self.ledger_after(steps)
        epsilon = ledger.epsilon() if ledger is not None else None
        loss = (logs or {}).get("loss")  # absent with DP (``step.StepModel``)
        with self.writer.as_default():
            if epsilon is not None:
                tf.summary.scalar("privacy/epsilon", epsilon, step=steps)
            if loss is not None:
                tf.summary.scalar("train/loss", loss, step=steps)
        self.writer.flush()
        print(self._progress_line(epoch, steps, loss, ledger, epsilon), file=sys.stderr, flush=True)

    def _progress_line(self, epoch: int, steps: int, loss: float | None, ledger: Ledger | None,
                       epsilon: float | None) -> str:
        elapsed = time.monotonic() - self.epoch_started
        done_this_epoch = steps - self.schedule.epoch_start(epoch)
        eta = elapsed / done_this_epoch * (self.schedule.stop_step - steps) if done_this_epoch > 0 else 0
        privacy = ""
        if epsilon is not None:
            privacy = f", ε spent {epsilon:.3f}"
            if self.epsilon_budget is not None:
                privacy += f" of {self.epsilon_budget:.3g} (δ={ledger.delta:g})"
        shown = f", loss {loss:.4f}" if loss is not None else ""
        return (f"epoch {epoch + 1}/{self.schedule.epochs}: step {steps}/{self.schedule.stop_step}{shown}"
                f"{privacy}, {elapsed:.1f} s, ETA {eta:.0f} s")
