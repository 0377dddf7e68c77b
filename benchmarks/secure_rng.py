"""What `privacy.secure_rng` costs per DP-SGD step, side by side with the default noise, in one run.

For the paper's network (GroupNorm ResNet9, 4,909,896 weights, 8 outputs), per logical step:
- default: the 128-bit Philox seeds the input pipeline derives from the run secret (host), plus the
  in-graph stateless Gaussian draw for every weight (device, ``noise.gaussian_noise``), side by side in
  alternating rounds with TensorFlow's own kernel for the same draw (``tf.random.stateless_normal``: the
  same values within 2.5e-6·σ, but scalar log, sin and cos), in wall and CPU time;
- secure_rng: the noise itself from ChaCha20 on the host (four Gaussians per weight, summed ÷ 2);
- for scale, one fast-engine DP step (forward, per-example clipping, update) at the given size.
tf.data makes the secure noise ahead of the step on the host, so it costs wall time only when it takes
longer than the step itself (or when the host's cores are busy feeding images).
Usage: python benchmarks/secure_rng.py [--image-size 128] [--batch-size 32] [--repeats 5]
Writes benchmarks/results/secure_rng.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from dpmedtf.models import build_resnet9  # noqa: E402
from dpmedtf.privacy.mechanism import DpSgdMechanism  # noqa: E402
from dpmedtf.privacy.noise import noised_mean  # noqa: E402
from dpmedtf.privacy.randomness import RunSecret, noise_stddev_float32  # noqa: E402
from dpmedtf.training.losses import weighted_bce_per_example  # noqa: E402
from dpmedtf.training.step import GradientStep, StepModel  # noqa: E402
from timing import interleaved_seconds, median_seconds  # noqa: E402  (benchmarks/timing.py, beside this script)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "secure_rng.json")
    args = parser.parse_args()

    tf.keras.utils.set_random_seed(0)
    network = build_resnet9((args.image_size, args.image_size, 3), 8, activation="mish")
    variables = network.trainable_variables
    sizes = [int(np.prod(v.shape)) for v in variables]
    secret = RunSecret.fresh()
    stddev = noise_stddev_float32(1.0, 1.5)
    zeros = [tf.zeros_like(v) for v in variables]
    step = iter(range(10**9))

    philox_graph = tf.function(lambda seeds: noised_mean(zeros, stddev, 1.0, seeds))
    kernel_graph = tf.function(lambda seeds: [
        (total + tf.random.stateless_normal(tf.shape(total), seeds[i], stddev=stddev)) / 1.0
        for i, total in enumerate(zeros)])
    default_host, _ = median_seconds(lambda: secret.noise_seeds(next(step), len(variables)), args.repeats)
    cpu_seconds = {"default": [], "tensorflow_kernel": []}

    def timed(name, graph):
        def run():
            seeds = secret.noise_seeds(next(step), len(variables))
            start = time.process_time()
            [t.numpy() for t in graph(seeds)]
            cpu_seconds[name].append(time.process_time() - start)
        return run

    noise_times = interleaved_seconds({"default": timed("default", philox_graph),
                                       "tensorflow_kernel": timed("tensorflow_kernel", kernel_graph)},
                                      max(args.repeats, 10), shuffle_seed=0)
    default_device, kernel_device = (statistics.median(noise_times[name]) for name in ("default", "tensorflow_kernel"))
    # [1:]: interleaved_seconds' warm-up call (tracing) is recorded here too, but not in its own times.
    default_cpu, kernel_cpu = (statistics.median(cpu_seconds[name][1:]) for name in ("default", "tensorflow_kernel"))
    secure_host, secure_times = median_seconds(lambda: secret.secure_gaussian("noise", next(step), sizes, stddev),
                                               args.repeats)

    mechanism = DpSgdMechanism(dataset_size=10_000, expected_batch_size=args.batch_size, clip_norm=1.5,
                               noise_multiplier=1.0, delta=1e-5, accountant="rdp")
    ones = tf.ones(8)
    model = StepModel(network, step=GradientStep(mechanism=mechanism, max_physical_batch=args.batch_size),
                      optimizer=tf.keras.optimizers.legacy.Nadam(5e-4), secret=secret,
                      per_example_loss=functools.partial(weighted_bce_per_example, positive_weight=ones,
                                                         negative_weight=ones))
    rng = np.random.default_rng(0)
    images = tf.constant(rng.random((args.batch_size, args.image_size, args.image_size, 3), dtype=np.float32))
    labels = tf.constant(rng.integers(0, 2, (args.batch_size, 8)).astype(np.float32))
    train_step = tf.function(model.train_step)

    def one_step():
        current = int(model.step_optimizer.iterations.numpy())
        train_step({"images": images, "labels": labels, "step": tf.constant(current, tf.int64),
                    "noise_seeds": secret.noise_seeds(current, len(variables))})
        model.step_optimizer.iterations.numpy()

    dp_step, _ = median_seconds(one_step, args.repeats)
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "weights": int(sum(sizes)),
        "image_size": args.image_size, "batch_size": args.batch_size, "repeats": args.repeats,
        "seconds_per_step": {"default_seed_derivation_host": default_host, "default_noise_in_graph": default_device,
                             "secure_noise_host": secure_host, "fast_dp_step": dp_step,
                             "tensorflow_kernel_noise_in_graph": kernel_device},
        "noise_cpu_seconds_per_step": {"default": default_cpu, "tensorflow_kernel": kernel_cpu},
        "tensorflow_kernel_over_default_noise": kernel_device / default_device,
        "tensorflow_kernel_over_default_noise_cpu": kernel_cpu / default_cpu,
        "secure_noise_host_runs": secure_times,
        "secure_over_default_noise": secure_host / (default_host + default_device),
        "secure_noise_over_dp_step": secure_host / dp_step,
    }
    print(f"ResNet9 ({sum(sizes):,} weights), fast DP step at {args.image_size} px, B = {args.batch_size}; "
          f"medians of {args.repeats}:")
    print(f"  default noise: seeds on host {default_host * 1e3:.2f} ms + Philox in graph {default_device * 1e3:.1f} ms "
          f"({default_cpu * 1e3:.0f} ms of CPU)")
    print(f"  the same draw by TensorFlow's stateless_normal kernel: {kernel_device * 1e3:.1f} ms ({kernel_cpu * 1e3:.0f} ms "
          f"of CPU): {result['tensorflow_kernel_over_default_noise']:.2f}x the default's time, "
          f"{result['tensorflow_kernel_over_default_noise_cpu']:.2f}x its CPU")
    print(f"  secure_rng noise on host:   {secure_host * 1e3:.0f} ms "
          f"({result['secure_over_default_noise']:.1f}x the default noise)")
    print(f"  one fast DP step:           {dp_step * 1e3:.0f} ms → secure noise = {result['secure_noise_over_dp_step']:.2f}x "
          "a step (hidden by tf.data prefetch while below 1x and a host core is free)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
