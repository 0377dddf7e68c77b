"""One variant of benchmarks/keras_api.py, in its own process (so its peak memory is its own).

  python benchmarks/keras_api_worker.py --variant nondp|dpmedtf|dpmedtf-vectorized|tfp-vectorized|
                                                  tfp-dpmodel-registry|tfp-dpmodel
                                        [--large] [--steps 30] [--warmup 5] --json OUT

Builds the same user CNN for every variant (Conv2D → GroupNormalization → Conv2D/2 → LayerNormalization →
Conv2D/2 → GlobalAveragePooling2D → Dense(8) logits, BinaryCrossentropy(from_logits=True)), random float32
data N = 1024, batch 64, and trains it with ``model.fit`` the way each library documents:

- ``nondp``: ``compile(Adam(1e-3), loss)`` + ``fit(x, y, batch_size=64)``.
- ``dpmedtf`` / ``dpmedtf-vectorized``: ``dpmedtf.make_private(model, ..., engine=fast|vectorized)``, then
  ``compile`` + ``fit(x, y)`` (make_private's fit draws Poisson batches of expected size 64 itself).
- ``tfp-vectorized``: tensorflow-privacy's ``VectorizedDPKerasAdamOptimizer`` (num_microbatches=None, i.e.
  per example) with the loss unreduced (``Reduction.NONE``), ``fit(x, y, batch_size=64)``.
- ``tfp-dpmodel-registry`` / ``tfp-dpmodel``: tensorflow-privacy's ``DPSequential`` (``make_dp_model_class``)
  over the same layers, with / without ``layer_registry.make_default_layer_registry()``, its default
  ``use_xla=True``, a standard reduced loss and optimizer. Whether it took its fast (ghost-norm) path is
  recorded (``fast_path_enabled``): it falls back to per-example ``vectorized_map`` when a trainable layer
  is not in the registry.

Every variant trains warmup + steps steps; a callback stamps ``on_train_batch_end`` and the steady-state
seconds per step is (stamp of the last step − stamp of step ``warmup``) / steps, so tracing/compilation
and the first steps are excluded. Writes {"variant", "s_per_step", "peak_rss_mb", …} to OUT.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

VARIANTS = ("nondp", "dpmedtf", "dpmedtf-vectorized", "tfp-vectorized", "tfp-dpmodel-registry", "tfp-dpmodel")
N, BATCH, LABELS = 1024, 64, 8
SIZES = {  # image side, filters of the three convolutions
    "small": {"image_size": 32, "filters": (16, 32, 32)},
    "large": {"image_size": 64, "filters": (32, 64, 64)},
}
CLIP, SIGMA, DELTA, LR = 1.0, 1.0, 1e-5, 1e-3


def cnn_layers(tf, image_size: int, filters: tuple[int, int, int]) -> list:
    layers = tf.keras.layers
    return [layers.Input((image_size, image_size, 3)),
            layers.Conv2D(filters[0], 3, activation="relu"),
            layers.GroupNormalization(4),
            layers.Conv2D(filters[1], 3, strides=2, activation="relu"),
            layers.LayerNormalization(),
            layers.Conv2D(filters[2], 3, strides=2),
            layers.GlobalAveragePooling2D(),
            layers.Dense(LABELS)]


class StepClock:
    """Keras callback: perf_counter at every on_train_batch_end; stops training after ``total`` steps."""

    def __init__(self, tf, total: int):
        outer = self

        class _Callback(tf.keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                outer.begin = outer.begin or time.perf_counter()

            def on_train_batch_end(self, batch, logs=None):
                outer.stamps.append(time.perf_counter())
                outer.last_logs = dict(logs or {})
                if len(outer.stamps) >= total:
                    self.model.stop_training = True

        self.begin: float | None = None
        self.stamps: list[float] = []
        self.last_logs: dict = {}
        self.callback = _Callback()


def main() -> None:
    parser = argparse.ArgumentParser(description="one variant of benchmarks/keras_api.py")
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--large", action="store_true", help="64×64 inputs and twice the filters")
    parser.add_argument("--steps", type=int, default=30, help="timed steps after the warm-up")
    parser.add_argument("--warmup", type=int, default=5, help="steps (tracing included) not timed")
    parser.add_argument("--max-physical-batch", type=int, help="make_private(max_physical_batch=...); library default if unset")
    parser.add_argument("--max-rss-mb", type=float, default=12_000,
                        help="give up (exit code 3, the reason in OUT) once resident memory passes this")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    guard_memory(args.max_rss_mb, args.json, args.variant)

    import numpy as np
    import tensorflow as tf

    size = "large" if args.large else "small"
    config = SIZES[size]
    total = args.warmup + args.steps
    epochs = math.ceil(total / (N // BATCH))
    tf.keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.random((N, config["image_size"], config["image_size"], 3), dtype=np.float32)
    y = rng.integers(0, 2, (N, LABELS)).astype(np.float32)
    layers = cnn_layers(tf, config["image_size"], config["filters"])
    clock = StepClock(tf, total)
    extra: dict = {}
    rss_before_fit = None

    if args.variant in ("nondp", "dpmedtf", "dpmedtf-vectorized"):
        model = tf.keras.Sequential(layers, name="user_cnn")
        loss = tf.keras.losses.BinaryCrossentropy(from_logits=True)
        if args.variant == "nondp":
            model.compile(optimizer=tf.keras.optimizers.Adam(LR), loss=loss)
            rss_before_fit = _rss_mb()
            model.fit(x, y, batch_size=BATCH, epochs=epochs, verbose=0, callbacks=[clock.callback])
        else:
            import dpmedtf

            engine = "vectorized" if args.variant == "dpmedtf-vectorized" else "fast"
            options = {} if args.max_physical_batch is None else {"max_physical_batch": args.max_physical_batch}
            model = dpmedtf.make_private(model, dataset_size=N, batch_size=BATCH, clip_norm=CLIP, delta=DELTA,
                                         noise_multiplier=SIGMA, steps=total, accountant="rdp", engine=engine,
                                         **options)
            model.compile(optimizer=tf.keras.optimizers.Adam(LR), loss=loss)
            rss_before_fit = _rss_mb()
            model.fit(x, y, verbose=0, callbacks=[clock.callback])
            epsilon, delta = model.privacy_spent()
            extra.update(engine=engine, steps_taken=model.privacy_ledger().steps, epsilon=epsilon, delta=delta,
                         max_physical_batch=model._dpmedtf_private.step.max_physical_batch)
    elif args.variant == "tfp-vectorized":
        from tensorflow_privacy.privacy.optimizers.dp_optimizer_keras_vectorized import VectorizedDPKerasAdamOptimizer

        model = tf.keras.Sequential(layers, name="user_cnn")
        optimizer = VectorizedDPKerasAdamOptimizer(l2_norm_clip=CLIP, noise_multiplier=SIGMA, num_microbatches=None,
                                                   learning_rate=LR)
        model.compile(optimizer=optimizer, loss=tf.keras.losses.BinaryCrossentropy(
            from_logits=True, reduction=tf.keras.losses.Reduction.NONE))
        rss_before_fit = _rss_mb()
        model.fit(x, y, batch_size=BATCH, epochs=epochs, verbose=0, callbacks=[clock.callback])
    else:  # tfp-dpmodel-registry, tfp-dpmodel
        from tensorflow_privacy.privacy.fast_gradient_clipping import layer_registry
        from tensorflow_privacy.privacy.keras_models.dp_keras_model import DPSequential

        registry = layer_registry.make_default_layer_registry() if args.variant == "tfp-dpmodel-registry" else None
        model = DPSequential(l2_norm_clip=CLIP, noise_multiplier=SIGMA, num_microbatches=None,
                             layer_registry=registry, layers=layers, name="user_cnn")
        extra["fast_path_enabled"] = bool(model._enable_fast_peg_computation)
        if registry is not None and not model._enable_fast_peg_computation:
            unregistered = sorted({type(layer).__name__ for layer in model.layers
                                   if layer.trainable_variables and not registry.is_elem(layer)})
            extra["note"] = ("accepted without an error; its default registry (Dense, Embedding) lacks "
                             f"{', '.join(unregistered)}, so DPModel silently used its per-example "
                             "vectorized_map path instead of fast gradient clipping")
        extra["use_xla"] = True
        model.compile(optimizer=tf.keras.optimizers.Adam(LR), loss=tf.keras.losses.BinaryCrossentropy(from_logits=True))
        rss_before_fit = _rss_mb()
        model.fit(x, y, batch_size=BATCH, epochs=epochs, verbose=0, callbacks=[clock.callback])

    stamps = clock.stamps
    if len(stamps) < total:
        raise RuntimeError(f"{args.variant} trained {len(stamps)} steps, expected {total}")
    timed = stamps[args.warmup - 1:]  # from the end of step `warmup` to the end of the last step
    intervals = [b - a for a, b in zip(timed, timed[1:])]
    result = {"variant": args.variant, "size": size, **config, "filters": list(config["filters"]),
              "dataset_size": N, "batch_size": BATCH, "warmup_steps": args.warmup, "timed_steps": len(intervals),
              "s_per_step": (timed[-1] - timed[0]) / len(intervals),
              "median_step_interval_s": statistics.median(intervals),
              "warmup_s": stamps[args.warmup - 1] - clock.begin,  # the untimed steps, tracing included
              "parameters": int(sum(np.prod(v.shape) for v in model.trainable_variables)),
              "final_loss": {k: float(v) for k, v in clock.last_logs.items()},
              "rss_before_fit_mb": rss_before_fit, "peak_rss_mb": _rss_mb(), **extra}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


def guard_memory(limit_mb: float, out: Path, variant: str) -> None:
    """A thread that ends the process, its reason written to ``out``, once its resident memory passes
    ``limit_mb`` (the machine is shared: a variant that would need tens of GB is stopped, not swapped)."""
    import threading

    def watch():
        while True:
            with open("/proc/self/status") as status:
                rss = next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:"))
            if rss > limit_mb:
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps({"variant": variant, "memory_exceeded_mb": limit_mb,
                                           "error": f"stopped: resident memory passed {limit_mb:.0f} MB "
                                                    f"({rss:.0f} MB) before the timed steps finished"}))
                os._exit(3)
            time.sleep(0.1)

    threading.Thread(target=watch, daemon=True).start()


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    main()
