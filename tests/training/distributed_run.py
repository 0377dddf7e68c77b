"""One process of a distributed-training test: joins a tf.distribute strategy, then runs trainer steps.

  python -m tests.training.distributed_run '{"strategy": "mirrored", "logical_cpus": 2, "out": "updates.npz"}'
  python -m tests.training.distributed_run '{"job": "job.yaml", "logical_cpus": 2, "out": "run"}'
  python -m tests.training.distributed_run '{"strategy": "multi_worker", "disagree": true}'

Logical CPU devices and a multi-worker cluster (TF_CONFIG) must both be set up before TensorFlow runs
anything, so each case is its own process. The updates of one trainer step are computed for every case
in ``STEP_CASES`` and the chief writes them to ``out``; ``step_updates`` is also what the tests call
in-process for the single-device reference. With ``job``, the process trains that job as
``dpmedtf train`` does (the CLI itself cannot split the CPU into logical devices).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

STEP_CASES = {  # name: (clipping engine or None for non-private, noise multiplier)
    "fast": ("fast", 0.0), "vectorized": ("vectorized", 0.0), "nondp": (None, None),
    "fast-noise": ("fast", 1.0), "vectorized-noise": ("vectorized", 1.0)}
EXAMPLES, EXPECTED_BATCH, CLIP, LEARNING_RATE = 7, 10, 0.2, 1000.0


def step_updates(strategy, cases=tuple(STEP_CASES)) -> dict[str, np.ndarray]:
    """For each case: the change of every weight (flattened, concatenated) after one trainer step with
    plain SGD on the same 7 examples, sharded over the strategy's replicas, in chunks of at most 3."""
    import tensorflow as tf
    import functools

    from dpmedtf.data.sampling import split_among_replicas
    from dpmedtf.models import build_resnet9
    from dpmedtf.training.distribution import local_replicas
    from dpmedtf.privacy.randomness import RunSecret
    from dpmedtf.privacy.mechanism import DpSgdMechanism
    from dpmedtf.training.losses import weighted_bce_per_example
    from dpmedtf.training.step import GradientStep, StepModel

    SECRET = RunSecret.from_experiment_seed(3)
    rng = np.random.default_rng(2)
    images = rng.random((EXAMPLES, 32, 32, 3), dtype=np.float32)
    labels = rng.integers(0, 2, (EXAMPLES, 4)).astype(np.float32)

    def shards_for_worker(context):
        parts = split_among_replicas(np.arange(EXAMPLES), context.num_replicas_in_sync)
        local = [(r, parts[r]) for r in local_replicas(context)]
        variables = len(network.trainable_variables)
        seeds = {r: SECRET.noise_seeds(0, variables) if r == 0 else np.zeros((variables, 2), np.int64) for r, _ in local}
        return tf.data.Dataset.from_generator(
            lambda: ({"images": images[p], "labels": labels[p], "step": np.int64(0), "noise_seeds": seeds[r]}
                     for r, p in local),
            output_signature={"images": tf.TensorSpec([None, 32, 32, 3]), "labels": tf.TensorSpec([None, 4]),
                              "step": tf.TensorSpec([], tf.int64), "noise_seeds": tf.TensorSpec([None, 2], tf.int64)})

    updates = {}
    for name in cases:
        engine, noise = STEP_CASES[name]
        tf.keras.utils.set_random_seed(0)
        with strategy.scope():
            network = build_resnet9((32, 32, 3), 4, groups=4, widths=(8, 16, 16, 32))
            mechanism = None if engine is None else DpSgdMechanism(
                dataset_size=100, expected_batch_size=EXPECTED_BATCH, clip_norm=CLIP, noise_multiplier=noise,
                delta=1e-5, accountant="rdp")
            loss = functools.partial(weighted_bce_per_example, positive_weight=tf.ones(4), negative_weight=tf.ones(4))
            model = StepModel(network, step=GradientStep(mechanism=mechanism, engine=engine or "fast",
                                                         max_physical_batch=3),
                              optimizer=tf.keras.optimizers.legacy.SGD(LEARNING_RATE), per_example_loss=loss,
                              secret=SECRET)
        before = np.concatenate([v.numpy().ravel() for v in network.trainable_variables])
        inputs = iter(strategy.distribute_datasets_from_function(shards_for_worker))
        tf.function(lambda: strategy.run(model.train_step, args=(next(inputs),)))()
        updates[name] = np.concatenate([v.numpy().ravel() for v in network.trainable_variables]) - before
    return updates


def main() -> None:
    args = json.loads(sys.argv[1])
    import tensorflow as tf

    if args.get("logical_cpus", 1) > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * args["logical_cpus"])
    from dpmedtf.config import TrainingConfig, load_config
    from dpmedtf.errors import DpmedtfError
    from dpmedtf.training.distribution import is_chief, strategy_for

    if "job" in args:
        from dpmedtf.training.job import prepare_data
        from dpmedtf.training.trainer import train

        job = load_config(args["job"])
        strategy_for(job.training)
        out = Path(args["out"])
        train(job, prepare_data(job, out), out)
        return
    strategy = strategy_for(TrainingConfig(strategy=args["strategy"], devices=args.get("devices")))
    if "broadcast" in args:  # each worker draws its own secret; all must end with the chief's
        import hashlib

        from dpmedtf.privacy.randomness import RunSecret
        from dpmedtf.training.distribution import broadcast_from_chief

        own = RunSecret.fresh()
        received = broadcast_from_chief(strategy, own)
        print(json.dumps({"chief": is_chief(strategy), "own": hashlib.sha256(own.key).hexdigest(),
                          "received": hashlib.sha256(received.key).hexdigest()}))
        return
    if "disagree" in args:  # the workers hold 10⁶ and 10⁶ + 1: every one must stop with the same error
        from dpmedtf.training.distribution import check_same_on_every_worker

        index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
        try:
            check_same_on_every_worker(strategy, {"the step to resume at": 1_000_000 + index, "N": 500})
        except DpmedtfError as error:
            print(error)
            sys.exit(3)
        return
    updates = step_updates(strategy, args.get("cases", tuple(STEP_CASES)))
    if is_chief(strategy):
        np.savez(args["out"], replicas=strategy.num_replicas_in_sync, **updates)

if __name__ == "__main__":
    main()
