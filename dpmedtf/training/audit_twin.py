"""The audit twin: the job's DP training run again, with canaries, for the one-run audit — never released.

The twin trains what ``dpmedtf train`` would — the same training split, network, loss and class
weights, optimizer, DP step (engine, clip norm, σ, chunking), sampling and number of steps — and in
addition gives each of m canaries (``privacy.audit.canaries``) a secret coin for inclusion and, when
included, a secret Poisson coin per step at the mechanism's rate q, as every record gets. The real
records are sampled exactly as in training (images or patients). Including canaries adds records, so
the twin's population is N + (canaries included) at the same q; the normaliser stays the job's
expected batch size (a data-independent constant).

What runs is ``GradientStep``: per-example clipping by the job's engine, the noised sum and the
normaliser are the training code's own. A white-box canary is one more "variable" of the step: an
m-entry audit block that no image touches, which the canary's C·eᵢ enters before the noise is added by
the same ``released`` call, with its own noise stream. Its score is the sum of what the released
updates put on eᵢ. A black-box canary is an image the step clips like any other.

The ledger returned is what the job's mechanism claims for the twin's steps (DP-SGD only: q, σ, T, δ).
A test that wants a mechanism that does less than it claims passes its own ``gradient_step``; nothing
here can weaken the step.
"""

from __future__ import annotations

import functools
import sys
import time
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from dpmedtf.config import JobConfig
from dpmedtf.data.cache import PreparedData
from dpmedtf.data.pipeline import model_inputs, split_rows
from dpmedtf.errors import ConfigError
from dpmedtf.models import validate_for_dp
from dpmedtf.privacy.audit.canaries import KINDS, CanaryDraw, canary_images, loss_scores
from dpmedtf.privacy.ledger import Ledger
from dpmedtf.privacy.mechanism import run_notes
from dpmedtf.privacy.engines import get_engine
from dpmedtf.privacy.randomness import RunSecret
from dpmedtf.training.data_uses import class_weights
from dpmedtf.training.losses import weighted_bce_per_example
from dpmedtf.training.network import build_network
from dpmedtf.training.plan import TrainingPlan, plan_training, sampler_for
from dpmedtf.training.step import GradientStep, create_optimizer_slots, jit_compile_for


@dataclass(frozen=True)
class TwinResult:
    kind: str
    scores: np.ndarray
    """(m,) per canary: higher means the attacker thinks it more likely included."""
    included: np.ndarray
    """(m,) bool: the secret inclusion coins (known to the auditor only)."""
    ledger: Ledger
    """What the job's mechanism claims for the twin's steps."""
    plan: TrainingPlan
    steps: int
    canary_samples: int
    """How many times included canaries were drawn into a batch, over the run."""
    seconds: float


def twin_plan(config: JobConfig, prepared: PreparedData) -> TrainingPlan:
    """The job's training plan; an audit needs a DP job."""
    if not config.privacy.enabled:
        raise ConfigError("the canary audit measures a DP training run: set privacy.enabled true (a non-private "
                          "model has no ε to audit)")
    return plan_training(config, prepared)


def train_audit_twin(config: JobConfig, prepared: PreparedData, *, kind: str, canaries: int, secret: RunSecret,
                     gradient_step: GradientStep | None = None, log=None) -> TwinResult:
    """Trains the twin with ``canaries`` canaries of ``kind`` and returns their scores and coins."""
    if kind not in KINDS:
        raise ConfigError(f"audit kind must be one of {', '.join(KINDS)}, got {kind!r}")
    log = log or functools.partial(print, file=sys.stderr, flush=True)
    plan = twin_plan(config, prepared)
    mechanism = plan.mechanism
    rows = split_rows(prepared, "train")
    train_frame = prepared.cohort.frame.loc[rows]
    labels = prepared.cohort.labels(train_frame).astype(np.float32)
    tf.keras.utils.set_random_seed(config.training.seed)  # initialisation only, as in training
    positive_weight, negative_weight, _ = class_weights(config, plan, labels, train_frame, secret)
    network = build_network(config, prepared, labels.shape[1])
    validate_for_dp(network, engine=plan.clipping)
    loss = functools.partial(weighted_bce_per_example, positive_weight=tf.constant(positive_weight),
                             negative_weight=tf.constant(negative_weight))
    step = gradient_step or GradientStep(mechanism=mechanism, engine=plan.clipping,
                                         max_physical_batch=config.training.max_physical_batch,
                                         jit_compile=jit_compile_for(config.training.jit_compile))
    optimizer = tf.keras.optimizers.legacy.Nadam(config.training.learning_rate)
    variables = network.trainable_variables
    create_optimizer_slots(optimizer, variables)

    draw = CanaryDraw(count=canaries, sampling_rate=mechanism.sampling_rate, randomness=secret)
    included = draw.included()
    sampler = sampler_for(config, plan, prepared, secret)
    channels = int(network.input_shape[-1]) if prepared.spec.modality == "volume" else 1
    if kind == "black-box":
        value_range = (0, 255) if np.issubdtype(prepared.array.dtype, np.integer) else (0.0, 1.0)
        canary_array, canary_labels = canary_images(canaries, prepared.array.shape[1:], prepared.array.dtype,
                                                    value_range, labels.shape[1])
    block = tf.Variable(tf.zeros([canaries]), trainable=False, name="audit_block_scores")
    streams = len(variables) + 1
    sizes = [int(np.prod(v.shape)) for v in variables] + [canaries]
    secure = config.privacy.secure_rng

    @tf.function(reduce_retracing=True)
    def twin_step(images, batch_labels, canary_block, canary_count, noise_seeds, noise):
        sums, _, count = step.clipped_sums(network, model_inputs(images, prepared.spec.modality, channels),
                                           batch_labels, loss)
        released = step.released([*sums, canary_block], count + canary_count, noise_seeds, noise)
        optimizer.apply_gradients(zip(released[:-1], variables))
        block.assign_add(released[-1])

    started, samples = time.monotonic(), 0
    report_every = max(1, plan.steps // 10)
    for t in range(plan.steps):
        indices = sampler.indices(t)
        images, batch_labels = np.asarray(prepared.array[rows[indices]]), labels[indices]
        sampled = draw.sampled(t, included)
        samples += len(sampled)
        canary_block = np.zeros(canaries, np.float32)
        canary_count = 0
        if kind == "white-box":
            canary_block[sampled] = mechanism.clip_norm  # a whole record's worth: C, even at the patient unit
            canary_count = len(sampled)
        elif len(sampled):
            images = np.concatenate([images, canary_array[sampled]])
            batch_labels = np.concatenate([batch_labels, canary_labels[sampled]])
        if secure:
            noise_seeds = np.zeros((streams, 2), np.int64)
            noise = tuple(secret.secure_gaussian("noise", t, sizes, mechanism.noise_stddev))
        else:
            noise_seeds, noise = secret.noise_seeds(t, streams), None
        twin_step(tf.constant(images), tf.constant(batch_labels), tf.constant(canary_block),
                  tf.constant(canary_count, tf.int32), tf.constant(noise_seeds), noise)
        if (t + 1) % report_every == 0 or t + 1 == plan.steps:
            log(f"audit twin: step {t + 1}/{plan.steps} ({time.monotonic() - started:.0f} s)")

    if kind == "white-box":
        scores = block.numpy().astype(np.float64)
    else:
        logits = network.predict(model_inputs(tf.constant(canary_array), prepared.spec.modality, channels),
                                 batch_size=config.training.max_physical_batch, verbose=0)
        scores = loss_scores(canary_labels, tf.sigmoid(logits).numpy())
    notes = run_notes(experiment=secret.is_experiment, secure_rng=secure, engine=get_engine(plan.clipping))
    ledger = mechanism.record_steps(mechanism.new_ledger(notes=notes), plan.steps)
    return TwinResult(kind, scores, included, ledger, plan, plan.steps, samples, time.monotonic() - started)
