"""One training-step throughput measurement of the paper's ResNet9 (8 outputs) with the trainer's own step.

  python benchmarks/dp_step.py --engine nondp|vectorized|fast --batch-size B --image-size H --steps S --json OUT

Builds the 4.9M-parameter GroupNorm ResNet9 (8 outputs; Mish for every engine by default, so the engines
are compared on the same network — the paper trains its non-private baseline with ReLU, --activation relu),
runs warm-up steps, then S timed steps of one logical batch each (no chunking), and writes
{"engine","batch_size","image_size","samples_per_s","peak_rss_mb"} to OUT. Run each engine in its own
process (as benchmarks/dp_vs_nondp.py does) so the peak memory is that engine's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ENGINES = ("nondp", "vectorized", "fast")


def main() -> None:
    parser = argparse.ArgumentParser(description="DP-SGD vs non-private training-step throughput")
    parser.add_argument("--engine", choices=ENGINES, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--activation", choices=("mish", "relu"), default="mish")
    parser.add_argument("--xla", action="store_true", help="compile the step with XLA (jit_compile=True)")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()

    import numpy as np
    import tensorflow as tf

    from dpmedtf.models import build_resnet9
    from dpmedtf.training.trainer import TrainingPlan, _StepModel, make_optimizer

    dp = args.engine != "nondp"
    tf.keras.utils.set_random_seed(0)
    network = build_resnet9((args.image_size, args.image_size, 3), 8, activation=args.activation)
    plan = TrainingPlan(dp, 10_000, args.batch_size, args.steps, 100, 1.0 if dp else None, 1.5 if dp else None,
                        1.5 if dp else None, 1, "image" if dp else "none", 1e-5, "rdp", None, None,
                        args.engine if dp else None)
    optimizer = make_optimizer(plan, 5e-4 if dp else 5e-5, network)
    model = _StepModel(network, plan, optimizer, np.ones(8, np.float32), np.ones(8, np.float32), noise_seed=0)
    step = tf.function(model.train_step, jit_compile=args.xla or None)
    rng = np.random.default_rng(0)
    batch = {"images": tf.constant(rng.random((args.batch_size, args.image_size, args.image_size, 3), dtype=np.float32)),
             "labels": tf.constant(rng.integers(0, 2, (args.batch_size, 8)).astype(np.float32)),
             "step": tf.constant(0, tf.int64), "chunk": tf.constant(0, tf.int64),
             "chunks_in_step": tf.constant(1, tf.int64), "logical_batch_size": tf.constant(args.batch_size, tf.int64)}
    for _ in range(args.warmup):
        step(batch)["loss"].numpy()
    start = time.perf_counter()
    for _ in range(args.steps):
        step(batch)["loss"].numpy()
    seconds = time.perf_counter() - start
    result = {"engine": args.engine, "batch_size": args.batch_size, "image_size": args.image_size,
              "activation": args.activation, "xla": args.xla,
              "samples_per_s": args.batch_size * args.steps / seconds,
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
