"""Where training runs: one device, several local devices, or several machines — TensorFlow's own
``tf.distribute`` strategies, chosen by ``training.strategy``.

- ``none``: TensorFlow's default strategy (one device: the first GPU if there is one, else the CPU).
- ``mirrored``: ``MirroredStrategy`` over ``training.devices`` (default: every local GPU, else the CPU).
- ``multi_worker``: ``MultiWorkerMirroredStrategy`` over the cluster in ``TF_CONFIG``, every local GPU
  of every worker (or its CPU). It must be created before TensorFlow runs anything, so the CLI
  creates it first thing (``strategy_for``) and training finds the same one.

How DP-SGD stays one global mechanism across replicas is the trainer's business (see
``trainer._StepModel``); this module only says which replicas exist, which shard of each step a worker
feeds them, and whether this process is the chief that writes the run's files.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import tensorflow as tf

from dpmedtf.config import TrainingConfig
from dpmedtf.errors import DpmedtfError
from dpmedtf.privacy.randomness import RunSecret

_strategies: dict[tuple, tf.distribute.Strategy] = {}


def strategy_for(training: TrainingConfig) -> tf.distribute.Strategy:
    """The process's strategy for these settings, created once (a cluster can only be joined once, and
    every member of an ε sweep trains on the same replicas)."""
    key = (training.strategy, tuple(training.devices or ()))
    if key not in _strategies:
        _strategies[key] = _create(training)
    return _strategies[key]


def _create(training: TrainingConfig) -> tf.distribute.Strategy:
    if training.strategy == "none":
        if training.devices:
            raise DpmedtfError("training.devices needs training.strategy: mirrored")
        return tf.distribute.get_strategy()
    if training.strategy == "mirrored":
        devices = list(training.devices) if training.devices else None
        missing = _missing(devices or ())  # MirroredStrategy would accept (and soft-place) a device that is not there
        if missing:
            raise DpmedtfError(f"training.devices: {missing} not found on this machine; it has "
                               f"{sorted(d.name for d in tf.config.list_logical_devices())}")
        return tf.distribute.MirroredStrategy(devices)
    if training.devices:
        raise DpmedtfError("training.devices applies to training.strategy: mirrored; a multi_worker job uses every "
                           "local GPU (or the CPU) of each worker")
    try:
        cluster = json.loads(os.environ.get("TF_CONFIG") or "{}")
    except json.JSONDecodeError as exc:
        raise DpmedtfError(f"TF_CONFIG is not valid JSON ({exc})") from exc
    if not cluster.get("cluster") or not cluster.get("task"):
        raise DpmedtfError("training.strategy: multi_worker needs TF_CONFIG with 'cluster' and 'task' set on every "
                           "worker (see README, 'Training on several machines')")
    # Without a timeout a worker whose peer vanished (no connection reset) waits in a collective forever.
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=training.collective_timeout_seconds)
    try:
        return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
    except RuntimeError as exc:  # collective ops can only be configured before TensorFlow starts
        raise DpmedtfError(f"cannot join the TF_CONFIG cluster: {exc}. Create the strategy before TensorFlow runs "
                           f"anything (`dpmedtf train` does)") from exc


LOST_WORKER_ERRORS = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.CancelledError,
                      tf.errors.AbortedError)
"""What a collective raises on the surviving workers when one worker of the cluster is gone."""


def is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


def lost_worker_message(error: tf.errors.OpError, timeout_seconds: int) -> str:
    """The survivors' one line: which worker was lost (by its TF_CONFIG address), why, and how to resume."""
    text = error.message or ""
    task = re.search(r"/job:(\w+)/replica:\d+/task:(\d+)", text)
    try:
        cluster = json.loads(os.environ.get("TF_CONFIG") or "{}").get("cluster", {})
    except json.JSONDecodeError:
        cluster = {}
    if task:
        kind, index = task.group(1), int(task.group(2))
        addresses = cluster.get(kind) or []
        who = f"{kind} {index}" + (f" ({addresses[index]})" if index < len(addresses) else "")
    else:
        who = "another worker"
    why = ("it did not answer within training.collective_timeout_seconds = "
           f"{timeout_seconds} s" if isinstance(error, tf.errors.DeadlineExceededError)
           else "its connection was lost (the process or its machine stopped)")
    return (f"lost {who} of the training cluster: {why}. This worker stopped too. Re-launch every worker with the "
            "same command: training resumes from the chief's last checkpoint with the same ledger")


def _missing(devices) -> list[str]:
    def type_and_index(name: str) -> tuple[str, int | None]:
        spec = tf.DeviceSpec.from_string(name)
        return (spec.device_type or "").upper(), spec.device_index

    present = {type_and_index(d.name) for d in tf.config.list_logical_devices()}
    return [d for d in devices if type_and_index(d) not in present]


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes the run's files (ledger, checkpoints, model): the single process, or
    the cluster's chief (worker 0 when TF_CONFIG names no chief)."""
    return bool(strategy.extended.should_checkpoint)


def local_replicas(context: tf.distribute.InputContext) -> range:
    """Global indices of the replicas whose input this worker's dataset feeds, in the order its devices
    take elements (round-robin from the worker's one dataset)."""
    per_worker = context.num_replicas_in_sync // context.num_input_pipelines
    return range(context.input_pipeline_id * per_worker, (context.input_pipeline_id + 1) * per_worker)


def check_same_on_every_worker(strategy: tf.distribute.Strategy, values: dict[str, int]) -> None:
    """Stops every worker with the same error unless all of them hold the same ``values`` (what → int).

    Workers that disagree (say, on the step to resume at, because one cannot see the chief's
    checkpoints) would all-reduce gradients onto different weights and train a model nobody ran.
    tf.distribute reduces only by sum or mean, so each replica writes its values into its own row of a
    replicas × values table and the table is summed: every worker then holds every replica's values
    exactly (integers below 2⁵³ in float64) and all stop together. One all-reduce for all the values.
    """
    replicas = strategy.num_replicas_in_sync
    if replicas == 1:
        return
    mine = tf.constant(list(values.values()), tf.float64)

    def own_row():
        row = tf.one_hot(tf.distribute.get_replica_context().replica_id_in_sync_group, replicas, dtype=tf.float64)
        return row[:, None] * mine[None, :]

    @tf.function  # run eagerly, a collective strategy warns of its overhead on every call
    def summed_table():
        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(own_row), axis=None)

    table = summed_table().numpy()
    for what, column in zip(values, table.T):
        if len(set(column)) > 1:
            raise DpmedtfError(f"the workers disagree on {what} (replicas: {', '.join(f'{v:.0f}' for v in column)}); "
                               "every worker must see the same run directory (shared storage) and the same config")


def broadcast_from_chief(strategy: tf.distribute.Strategy, secret: RunSecret) -> RunSecret:
    """The chief's run secret on every worker: workers must draw the same Poisson batches, and the secret
    may come from nowhere but the chief (never from the job file, which every worker could read).

    Replica 0 contributes the key cut into 16-bit pieces (exact in float64), every other replica zeros;
    the summed table is the chief's key. Whether it is an experiment's seed-derived key travels with it
    through the config, which every worker shares.
    """
    if strategy.num_replicas_in_sync == 1:
        return secret
    pieces = np.frombuffer(secret.key, dtype="<u2").astype(np.float64)

    def own_part():
        is_chief_replica = tf.equal(tf.distribute.get_replica_context().replica_id_in_sync_group, 0)
        return tf.where(is_chief_replica, tf.constant(pieces), tf.zeros_like(pieces))

    @tf.function
    def summed():
        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(own_part), axis=None)

    key = summed().numpy().astype("<u2").tobytes()
    return RunSecret(key, secret.experiment_seed)
