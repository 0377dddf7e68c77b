"""``dpmedtf.make_private``: DP-SGD for any Keras model the clipping engines can clip, through ``fit``.

As JAX Privacy's ``keras_api.make_private`` does, the user's own model object is kept and two of its
methods are replaced: ``train_step`` becomes the public DP step (``training.step.GradientStep``, the
same one ``dpmedtf train`` runs) and ``fit`` feeds it Poisson-sampled batches drawn from a per-run
secret, with each step's noise seeds derived from that secret. Everything else stays Keras: the
user's optimizer and loss from ``compile``, their callbacks (EarlyStopping, ModelCheckpoint,
TensorBoard, …), ``evaluate``/``predict``, saving. ``model.privacy_ledger()`` is the exact record of
the steps taken (stopping early included), ``model.privacy_spent()`` its (ε, δ).

The secret lives only in this process's memory (it is never an attribute Keras tracks, so no saved
model or checkpoint holds it) and the mechanism's randomness follows from nothing else.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from dpmedtf.data.sampling import PoissonSampler, Shard
from dpmedtf.errors import DpmedtfError
from dpmedtf.files import write_json_atomic
from dpmedtf.layout import ModelDir
from dpmedtf.models.validate import validate_for_dp
from dpmedtf.privacy import accounting
from dpmedtf.privacy.engines import get_engine
from dpmedtf.privacy.ledger import Ledger
from dpmedtf.privacy.mechanism import DpSgdMechanism, run_notes
from dpmedtf.privacy.randomness import RunSecret
from dpmedtf.training.noise_inputs import noise_inputs
from dpmedtf.training.step import GradientStep, jit_compile_for

_REFUSED_FIT_ARGUMENTS = {
    "validation_split": "it would take its validation rows out of the N examples the mechanism was planned for; "
                        "pass validation_data instead",
    "class_weight": "weights computed from the training labels are a use of private data outside DP; weight the "
                    "loss with public prevalences in your loss function instead",
    "sample_weight": "per-example weights are not part of the clipped mechanism; fold public weights into the loss",
    "batch_size": "the batch size is the mechanism's expected batch size (make_private(batch_size=...)): "
                  "Poisson sampling draws each step's batch",
    "steps_per_epoch": "an epoch is N/B steps of the mechanism; set steps or epochs in make_private",
}


class PrivateTrainingError(DpmedtfError, ValueError):
    """``make_private`` or a private ``fit`` was used in a way that would break or misstate the guarantee."""


@dataclass
class _PrivateState:
    """What make_private adds to a model. A plain object: Keras does not track it, so it is never saved."""

    mechanism: DpSgdMechanism
    step: GradientStep
    planned_steps: int
    secret: RunSecret
    secure_rng: bool
    max_examples_per_person: int | None
    steps_taken: tf.Variable
    loss_metric: tf.keras.metrics.Mean
    per_example_loss: object = None

    @property
    def steps_per_epoch(self) -> int:
        return max(1, round(self.mechanism.dataset_size / self.mechanism.expected_batch_size))


def make_private(model: tf.keras.Model, *, dataset_size: int, batch_size: int, clip_norm: float, delta: float,
                 target_epsilon: float | None = None, noise_multiplier: float | None = None,
                 epochs: float | None = None, steps: int | None = None, unit: str = "example",
                 accountant: str = accounting.DEFAULT_ACCOUNTANT, engine: str = "fast", max_physical_batch: int = 32,
                 max_examples_per_person: int | None = None, secure_rng: bool = False,
                 experiment_seed: int | None = None, allow_large_delta: bool = False,
                 jit_compile: str | bool = "auto") -> tf.keras.Model:
    """Makes ``model.fit`` train with DP-SGD and returns ``model``.

    ``dataset_size`` N and ``batch_size`` B give the Poisson sampling rate B/N; ``epochs`` or ``steps``
    the planned steps T; ``target_epsilon`` (σ calibrated so that ε is reached at step T) or
    ``noise_multiplier`` σ the noise. ``fit(x, y)`` then needs exactly N examples and trains at most T steps.
    ``max_examples_per_person`` (e.g. images per patient) lets the certificate bound one person's privacy
    by group privacy; without it that bound is stated as unknown. ``experiment_seed`` fixes the sampling and noise for a reproducible experiment: its ledger says so
    and it certifies nothing. ``engine`` is a name in ``dpmedtf.privacy.engines``. ``jit_compile`` (auto, True,
    False) compiles each chunk of ``max_physical_batch`` padded, masked rows with XLA (auto: with a GPU).
    """
    if unit != "example":
        raise PrivateTrainingError(f"make_private protects one training example (unit='example'), got unit={unit!r}; "
                                   "patient-level privacy is in `dpmedtf train` (privacy.unit: patient)")
    if (epochs is None) == (steps is None):
        raise PrivateTrainingError("give exactly one of epochs= or steps= (the planned number of DP-SGD steps)")
    if (target_epsilon is None) == (noise_multiplier is None):
        raise PrivateTrainingError("give exactly one of target_epsilon= (σ is calibrated to reach it at the last "
                                   "step) or noise_multiplier=")
    if max_examples_per_person is not None and (not isinstance(max_examples_per_person, int)
                                                or max_examples_per_person < 1):
        raise PrivateTrainingError(f"max_examples_per_person must be a whole number ≥ 1, got {max_examples_per_person!r}")
    if hasattr(model, "_dpmedtf_private"):
        raise PrivateTrainingError(f"model '{model.name}' is private already; call make_private once per model")
    planned = steps if steps is not None else accounting.steps_for_epochs(dataset_size, batch_size, epochs)
    if not model.built:
        raise PrivateTrainingError(f"model '{model.name}' is not built: give it an input shape (tf.keras.Input, or "
                                   "input_shape= on its first layer) so its layers can be checked before training")
    validate_for_dp(model, engine=engine)
    settings = dict(dataset_size=dataset_size, expected_batch_size=batch_size, clip_norm=clip_norm, delta=delta,
                    accountant=accountant, unit=unit, allow_large_delta=allow_large_delta)
    mechanism = (DpSgdMechanism.calibrated(target_epsilon=target_epsilon, steps=planned, **settings)
                 if target_epsilon is not None else DpSgdMechanism.with_noise(noise_multiplier=noise_multiplier,
                                                                              **settings))
    state = _PrivateState(
        mechanism=mechanism,
        step=GradientStep(mechanism=mechanism, engine=engine, max_physical_batch=max_physical_batch,
                          jit_compile=jit_compile_for(jit_compile)),
        planned_steps=planned,
        secret=RunSecret.fresh() if experiment_seed is None else RunSecret.from_experiment_seed(experiment_seed),
        secure_rng=secure_rng,
        max_examples_per_person=max_examples_per_person,
        steps_taken=tf.Variable(0, dtype=tf.int64, trainable=False, name="dp_steps_taken"),
        loss_metric=tf.keras.metrics.Mean(name="loss"))
    # object.__setattr__: Keras would otherwise track the state (and so save the step counter with the model).
    object.__setattr__(model, "_dpmedtf_private", state)
    model.train_step = types.MethodType(_private_train_step, model)
    model.fit = types.MethodType(_private_fit, model)
    model.privacy_ledger = types.MethodType(_privacy_ledger, model)
    model.privacy_spent = types.MethodType(_privacy_spent, model)
    model.train_function = None  # a train function traced before would still hold the non-private step
    return model


def _privacy_ledger(self) -> Ledger:
    """The ledger of the DP-SGD steps this model has taken so far (save it with ``.save(path)``)."""
    state: _PrivateState = self._dpmedtf_private
    ledger = state.mechanism.new_ledger(notes={
        **run_notes(experiment=state.secret.is_experiment, secure_rng=state.secure_rng,
                    engine=get_engine(state.step.engine)),
        "trained_with": "dpmedtf.make_private + Keras fit", "model": self.name,
        "images_per_patient_max": state.max_examples_per_person})
    return state.mechanism.record_steps(ledger, int(state.steps_taken.numpy()))


def _privacy_spent(self) -> tuple[float, float]:
    """(ε, δ) spent by the steps taken so far, from the accountant."""
    ledger = self.privacy_ledger()
    return ledger.epsilon(), ledger.delta


def save_trained_model(model: tf.keras.Model, directory, *, preprocessing: dict, synthetic_data: bool) -> ModelDir:
    """Writes a make_private-trained model as a model directory that ``dpmedtf.evaluation.evaluate`` and the
    release path accept: the Keras model, its ledger and a training record.

    ``preprocessing`` is what turns a raw input into the model's input (``PreprocessSpec.as_dict()``),
    stated in the bundle for consumers; ``synthetic_data`` says whether the training data were generated.
    Refuses to overwrite a model that is there already.
    """
    out = ModelDir(directory)
    if out.model.exists():
        raise PrivateTrainingError(f"{out.model} exists already; save into a new directory")
    out.root.mkdir(parents=True, exist_ok=True)
    ledger = model.privacy_ledger()
    model.save(out.model)
    ledger.save(out.ledger)
    write_json_atomic(out.training_record, {
        "status": "finished", "steps": ledger.steps, "epsilon": ledger.epsilon(), "synthetic_data": synthetic_data,
        "preprocessing": preprocessing, "trained_with": "dpmedtf.make_private",
        "config": {"model": {"architecture": f"Keras model '{model.name}' (make_private)", "activation": None}}})
    return out


def _per_example_loss(model: tf.keras.Model):
    loss = getattr(model, "loss", None)
    if not loss or isinstance(loss, (dict, list, tuple)):
        raise PrivateTrainingError(f"compile model '{model.name}' with one loss (model.compile(optimizer=..., "
                                   "loss=...)) before fit; per-output losses are not supported by make_private")
    loss = tf.keras.losses.get(loss)
    if isinstance(loss, tf.keras.losses.Loss):  # the same loss, unreduced: one value per example
        loss = type(loss).from_config({**loss.get_config(), "reduction": tf.keras.losses.Reduction.NONE})

    def per_example(targets, outputs):
        values = loss(targets, outputs)
        rank = values.shape.rank
        return tf.reduce_mean(values, axis=list(range(1, rank))) if rank and rank > 1 else values

    return per_example


def _private_train_step(self, data):
    state: _PrivateState = self._dpmedtf_private
    tf.debugging.assert_equal(data["step"], state.steps_taken, message="input step is not the next DP step")
    gradients, loss_sum, count = state.step.gradients(self, data["x"], data["y"], state.per_example_loss,
                                                      data.get("noise_seeds"), data.get("noise"))
    self.optimizer.apply_gradients(zip(gradients, self.trainable_variables))
    state.steps_taken.assign_add(1)
    state.loss_metric.update_state(tf.math.divide_no_nan(loss_sum, tf.cast(count, tf.float32)),
                                   sample_weight=tf.cast(count, tf.float32))
    return {"loss": state.loss_metric.result()}


class _StopAtPlannedSteps(tf.keras.callbacks.Callback):
    """Ends training exactly at the planned step T, and resets the training loss each epoch."""

    def __init__(self, state: _PrivateState):
        super().__init__()
        self.state = state

    def on_epoch_begin(self, epoch, logs=None):
        self.state.loss_metric.reset_state()

    def on_train_batch_end(self, batch, logs=None):
        if int(self.state.steps_taken.numpy()) >= self.state.planned_steps:
            self.model.stop_training = True


def _private_fit(self, x=None, y=None, *, epochs=None, callbacks=None, validation_data=None, initial_epoch=None,
                 **keras_arguments):
    """Keras ``fit`` on Poisson-sampled batches of (x, y), continuing where the last private fit stopped.

    ``x``, ``y``: arrays (or anything indexable by an array of row numbers, such as an h5py dataset or a
    memmap) with N rows; or ``x`` alone, a source whose ``x[rows]`` returns an (inputs, targets) pair.
    ``epochs`` is Keras' final epoch index (an epoch is round(N/B) steps); training never goes past the
    mechanism's planned steps.
    """
    state: _PrivateState = self._dpmedtf_private
    for name, value in keras_arguments.items():
        if name in _REFUSED_FIT_ARGUMENTS and value not in (None, 0.0):
            raise PrivateTrainingError(f"fit({name}=...) is not available with make_private: "
                                       f"{_REFUSED_FIT_ARGUMENTS[name]}")
    keras_arguments = {k: v for k, v in keras_arguments.items() if k not in _REFUSED_FIT_ARGUMENTS and k != "shuffle"}
    gather = _row_gatherer(x, y, state.mechanism.dataset_size)
    state.per_example_loss = _per_example_loss(self)
    start = int(state.steps_taken.numpy())
    if start >= state.planned_steps:
        raise PrivateTrainingError(f"model '{self.name}' has taken all {state.planned_steps} planned DP-SGD steps "
                                   f"(ε = {self.privacy_spent()[0]:.4g}); more training needs a new privacy budget")
    per_epoch = state.steps_per_epoch
    total_epochs = math.ceil(state.planned_steps / per_epoch)
    epochs = total_epochs if epochs is None else epochs
    if epochs > total_epochs:
        raise PrivateTrainingError(f"fit(epochs={epochs}) goes past the {state.planned_steps} planned steps "
                                   f"({total_epochs} epochs of {per_epoch} steps); plan more in make_private")
    dataset = _poisson_dataset(self, state, gather, start)
    return tf.keras.Model.fit(self, dataset, epochs=epochs, steps_per_epoch=per_epoch,
                              initial_epoch=start // per_epoch if initial_epoch is None else initial_epoch,
                              callbacks=[*(callbacks or []), _StopAtPlannedSteps(state)],
                              validation_data=validation_data, **keras_arguments)


def _row_gatherer(x, y, dataset_size: int):
    """rows (sorted int array) → (inputs, targets), after checking there are exactly N rows."""
    if x is None:
        raise PrivateTrainingError("fit needs the training data: fit(x, y) with N rows each")
    if isinstance(x, (tf.data.Dataset, tf.keras.utils.Sequence)) or (y is None and not hasattr(x, "__getitem__")):
        raise PrivateTrainingError("make_private samples rows itself (Poisson sampling), so fit needs random access: "
                                   "arrays x and y, or a source whose x[rows] returns (inputs, targets) — not a "
                                   "tf.data.Dataset, generator or Sequence, whose batches are already drawn")
    rows = len(x)
    if y is not None and len(y) != rows:
        raise PrivateTrainingError(f"x has {rows} rows but y has {len(y)}")
    if rows != dataset_size:
        raise PrivateTrainingError(f"make_private was planned for dataset_size={dataset_size} examples but fit got "
                                   f"{rows}: the sampling rate and ε depend on N; make_private with the real N")
    if y is None:
        return lambda indices: tuple(np.asarray(part) for part in x[indices])
    return lambda indices: (np.asarray(x[indices]), np.asarray(y[indices]))


def _poisson_dataset(model, state: _PrivateState, gather, start: int) -> tf.data.Dataset:
    """Steps start … T−1: {"x", "y", "step"} of each Poisson batch, zipped with its noise seeds."""
    mechanism = state.mechanism
    sampler = PoissonSampler(mechanism.dataset_size, mechanism.expected_batch_size, state.planned_steps, state.secret)
    sample_x, sample_y = gather(np.zeros(1, np.int64))

    def batches():
        for step in range(start, state.planned_steps):
            batch_x, batch_y = gather(sampler.indices(step))
            yield {"x": batch_x, "y": batch_y, "step": np.int64(step)}

    data = tf.data.Dataset.from_generator(batches, output_signature={
        "x": tf.TensorSpec([None, *sample_x.shape[1:]], tf.as_dtype(sample_x.dtype)),
        "y": tf.TensorSpec([None, *sample_y.shape[1:]], tf.as_dtype(sample_y.dtype)),
        "step": tf.TensorSpec([], tf.int64)})
    steps = [Shard(step, np.empty(0, np.int64), 0) for step in range(start, state.planned_steps)]
    noise = noise_inputs(steps, state.secret, model.trainable_variables, mechanism, state.secure_rng)
    return tf.data.Dataset.zip((data, noise)).map(lambda d, n: {**d, **n}).prefetch(2)
