"""One training-step throughput measurement of the paper's ResNet9 (8 outputs) with the trainer's own step.

  python benchmarks/dp_step.py --engine nondp|vectorized|fast --batch-size B --image-size H --steps S --json OUT
                               [--devices R]

Builds the 4.9M-parameter GroupNorm ResNet9 (8 outputs; Mish for every engine by default, so the engines
are compared on the same network — the paper trains its non-private baseline with ReLU, --activation relu),
runs warm-up steps, then S timed steps of one logical batch each (no chunking), and writes
{"engine","batch_size","image_size","samples_per_s","peak_rss_mb","devices"} to OUT. Run each engine in its
own process (as benchmarks/dp_engines.py does) so the peak memory is that engine's.

With --devices R > 1 the step runs under ``MirroredStrategy`` on R replicas, each computing B/R of the
batch, exactly as ``training.strategy: mirrored`` trains. Without R GPUs the CPU is split into R logical
devices: they share the same cores, so this measures the distribution overhead, not a speed-up.

With --paired-rounds R the step of --engine and the non-private step of the same network are built in this
one process and timed one step each per round, in a shuffled order, for R rounds; OUT then also holds every
step's seconds and the median and quartiles of the per-round time ratios. Separate processes differ by up to
±15 % on a shared machine (memory layout, thread placement); steps alternating in one process see the same
state, so their ratio is the tighter estimate. Peak memory is then that of both steps together.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from timing import interleaved_seconds  # noqa: E402  (benchmarks/timing.py, beside this script)

ENGINES = ("nondp", "vectorized", "fast")


def main() -> None:
    parser = argparse.ArgumentParser(description="DP-SGD vs non-private training-step throughput")
    parser.add_argument("--engine", choices=ENGINES, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--activation", choices=("mish", "relu"), default="mish")
    parser.add_argument("--xla", action="store_true",
                        help="compile the step's padded fixed-shape chunks with XLA (training.jit_compile: true)")
    parser.add_argument("--devices", type=int, default=1, help="replicas under MirroredStrategy (GPUs, else logical CPUs)")
    parser.add_argument("--paired-rounds", type=int, default=0,
                        help="also build the non-private step in this process and time both, alternating, for "
                             "this many rounds (the step-time ratio; see the module docstring)")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    if args.batch_size % args.devices:
        parser.error("--batch-size must be a multiple of --devices")
    if args.paired_rounds and args.engine == "nondp":
        parser.error("--paired-rounds times --engine against the non-private step: give a DP engine")

    import tensorflow as tf

    strategy, device_kind = mirrored_over(tf, args.devices)

    def build(engine: str, steps: int):
        return build_train_step(strategy, engine, args.batch_size, args.image_size, args.activation, args.xla, steps)

    if args.paired_rounds:
        result = paired(args, build)
    else:
        result = timed(args, build(args.engine, args.warmup + args.steps))
    result.update({"engine": args.engine, "batch_size": args.batch_size, "image_size": args.image_size,
                   "activation": args.activation, "xla": args.xla, "devices": strategy.num_replicas_in_sync,
                   "device_kind": device_kind,
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps({key: value for key, value in result.items() if key != "seconds"}))


def timed(args, train_step) -> dict:
    """Throughput of --steps steps after --warmup ones."""
    for _ in range(args.warmup):
        train_step().numpy()
    start = time.perf_counter()
    for _ in range(args.steps):
        train_step().numpy()
    seconds = time.perf_counter() - start
    return {"samples_per_s": args.batch_size * args.steps / seconds}


def paired(args, build) -> dict:
    """Step times of --engine and of the non-private step, alternating in a shuffled order each round."""
    # Each step function is called --warmup times here, once more by interleaved_seconds, then once a round.
    calls = args.warmup + 1 + args.paired_rounds
    steps = {"nondp": build("nondp", calls), args.engine: build(args.engine, calls)}
    for train_step in steps.values():
        for _ in range(args.warmup):
            train_step().numpy()
    seconds = interleaved_seconds({name: (lambda f=f: f().numpy()) for name, f in steps.items()},
                                  args.paired_rounds, shuffle_seed=0)
    ratios = sorted(dp / nondp for dp, nondp in zip(seconds[args.engine], seconds["nondp"]))
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {"paired_rounds": args.paired_rounds, "seconds": seconds,
            "samples_per_s": args.batch_size / statistics.median(seconds[args.engine]),
            "nondp_samples_per_s": args.batch_size / statistics.median(seconds["nondp"]),
            "step_time_vs_nondp": statistics.median(ratios),
            "step_time_vs_nondp_quartiles": [quartiles[0], quartiles[2]]}


def build_train_step(strategy, engine: str, batch_size: int, image_size: int, activation: str, xla: bool, steps: int):
    """The trainer's step for ``engine`` on a fresh ResNet9, as a ``tf.function`` that runs one step each call
    (``steps`` calls at most: its input holds that many batches) and returns the optimizer's step count."""
    import functools

    import numpy as np
    import tensorflow as tf

    from dpmedtf.models import build_resnet9
    from dpmedtf.privacy.mechanism import DpSgdMechanism
    from dpmedtf.privacy.randomness import RunSecret
    from dpmedtf.training.distribution import local_replicas
    from dpmedtf.training.losses import weighted_bce_per_example
    from dpmedtf.training.step import GradientStep, StepModel

    dp = engine != "nondp"
    tf.keras.utils.set_random_seed(0)
    mechanism = DpSgdMechanism(dataset_size=10_000, expected_batch_size=batch_size, clip_norm=1.5,
                               noise_multiplier=1.5, delta=1e-5, accountant="rdp") if dp else None
    # The trainer's own step: one chunk of the whole batch (compiled, it is padded to exactly that size).
    step = GradientStep(mechanism=mechanism, engine=engine if dp else "fast",
                        max_physical_batch=batch_size // strategy.num_replicas_in_sync, jit_compile=xla)
    ones = tf.ones(8)
    loss = functools.partial(weighted_bce_per_example, positive_weight=ones, negative_weight=ones)
    with strategy.scope():
        network = build_resnet9((image_size, image_size, 3), 8, activation=activation)
        model = StepModel(network, step=step, optimizer=tf.keras.optimizers.legacy.Nadam(5e-4 if dp else 5e-5),
                          per_example_loss=loss, secret=RunSecret.fresh())
        model.compile()
    rng = np.random.default_rng(0)
    replicas = strategy.num_replicas_in_sync
    # Each step's batch cut into one equal shard per replica, with the step number the trainer checks.
    images = rng.random((replicas, batch_size // replicas, image_size, image_size, 3), dtype=np.float32)
    labels = rng.integers(0, 2, (replicas, batch_size // replicas, 8)).astype(np.float32)
    # The noise seeds the input pipeline hands each replica (the same every step: the cost is what is timed).
    noise_seeds = np.stack([RunSecret.fresh().noise_seeds(0, len(network.trainable_variables))] * replicas)

    def shards_for_worker(context: tf.distribute.InputContext) -> tf.data.Dataset:
        local = local_replicas(context)
        return tf.data.Dataset.range(steps).flat_map(
            lambda step: tf.data.Dataset.from_tensor_slices({
                "images": images[local.start:local.stop], "labels": labels[local.start:local.stop],
                "step": tf.fill([len(local)], step), "noise_seeds": noise_seeds[local.start:local.stop]})).prefetch(2)

    inputs = iter(strategy.distribute_datasets_from_function(shards_for_worker))

    # With --xla the step's chunks are compiled (GradientStep.jit_compile), as training.jit_compile does:
    # the loop around them, the noise and the optimizer have dynamic shapes and stay outside XLA.
    @tf.function
    def train_step():
        strategy.run(model.train_step, args=(next(inputs),))
        return model.step_optimizer.iterations

    return train_step


def mirrored_over(tf, count: int):
    """MirroredStrategy over ``count`` GPUs, or over ``count`` logical CPUs where there are fewer GPUs."""
    if count == 1:
        return tf.distribute.get_strategy(), "default"
    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) >= count:
        return tf.distribute.MirroredStrategy([f"/gpu:{i}" for i in range(count)]), "GPU"
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    return tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(count)]), "logical CPU (shared cores)"


if __name__ == "__main__":
    main()
