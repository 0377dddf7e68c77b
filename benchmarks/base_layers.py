"""dpmedtf's GroupNorm and Mish against Keras' GroupNormalization and Activation("mish"), in one run.

- The non-private training step's forward + backward (``GradientStep`` without a mechanism: the loss
  gradient of every weight) of the paper's full-width ResNet9 (4,909,896 weights, 8 outputs, Mish),
  built twice by ``build_resnet9``: ``fast_layers=False`` (Keras' layers, as models were saved before)
  and the default (dpmedtf's), with the same weights.
- The model's inference forward (``training=False``, in a graph), as evaluation and export run it.
- The layers alone at the stem's and at stage 2's activation shape: forward + backward (gradients of
  the input and of γ, β; ``training=True``) and the forward alone (``training=False``), plus the fast DP
  engine's GroupNormalization rule (``group_norm_layer_computation``: it recomputes the forward itself,
  then the per-example γ/β norms), which a DP step runs in place of either layer, against GroupNorm's
  forward + backward.

Each round times every case's variants back to back (interleaved, so a slow spell of the shared
machine hits both), after a warm-up call each; the medians are reported with their ratio.
Usage: python benchmarks/base_layers.py [--rounds 15] [--sizes 128:8,256:4]
Writes benchmarks/results/base_layers.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from dpmedtf.models import GroupNorm, Mish, build_resnet9  # noqa: E402
from dpmedtf.models.resnet9 import GROUPNORM_EPSILON  # noqa: E402
from dpmedtf.privacy.clipping.rules import group_norm_layer_computation  # noqa: E402
from dpmedtf.training.losses import weighted_bce_per_example  # noqa: E402
from dpmedtf.training.step import GradientStep  # noqa: E402
from timing import fetched, interleaved_seconds  # noqa: E402  (benchmarks/timing.py, beside this script)

OUTPUTS = 8
GROUPS = 32


def training_step(model: tf.keras.Model, batch_size: int):
    """The trainer's non-private step (one chunk): Σ of the loss gradients of every trainable weight."""
    step = GradientStep(mechanism=None, max_physical_batch=batch_size)
    ones = tf.ones(OUTPUTS)

    def loss(targets, logits):
        return weighted_bce_per_example(targets, logits, ones, ones)

    @tf.function
    def run(images, targets):
        sums, loss_sum, _ = step.clipped_sums(model, images, targets, loss)
        return sums, loss_sum

    return run


def inference(model: tf.keras.Model):
    """The model's forward as evaluation and export run it (``training=False``, in a graph)."""
    return tf.function(lambda images: model(images, training=False))


def layer_case(layer: tf.keras.layers.Layer, x: tf.Tensor, backward: bool):
    """The layer's forward (and with ``backward`` the gradients of Σ y·w w.r.t. input and weights)."""
    weights = tf.constant(np.random.default_rng(1).standard_normal(x.shape).astype(np.float32))

    @tf.function
    def run():
        if not backward:
            return layer(x, training=False)
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x, training=True) * weights)
        return tape.gradient(loss, [x, *layer.trainable_variables])

    return run


def dp_rule_case(layer: tf.keras.layers.Layer, x: tf.Tensor):
    """What the fast engine runs for a GroupNorm layer: the rule's forward, the gradient of its watched
    output (here of Σ y·w) back to the input, and the per-example γ/β gradients' squared norms."""
    weights = tf.constant(np.random.default_rng(1).standard_normal(x.shape).astype(np.float32))

    @tf.function
    def run():
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(x)
            base, outputs, norms = group_norm_layer_computation(layer, (x,), {}, tape)
            loss = tf.reduce_sum(outputs * weights)
        input_grads, base_grads = tape.gradient(loss, [x, base])
        return input_grads, norms.squared_norms64(base_grads)

    return run


def built(layer_class, shape, **kwargs):
    layer = layer_class(**kwargs)
    layer.build(shape)
    rng = np.random.default_rng(2)
    layer.set_weights([rng.standard_normal(w.shape).astype(np.float32) for w in layer.weights])  # random γ, β
    return layer


def cases(sizes: list[tuple[int, int]]) -> list[dict]:
    """[{name, shape, variants: {label: zero-argument function}}], the baseline (Keras') first, then dpmedtf's."""
    out = []
    rng = np.random.default_rng(0)
    for image_size, batch_size in sizes:
        tf.keras.utils.set_random_seed(0)
        keras_model = build_resnet9((image_size, image_size, 3), OUTPUTS, fast_layers=False)
        fast_model = build_resnet9((image_size, image_size, 3), OUTPUTS)
        fast_model.set_weights(keras_model.get_weights())
        images = tf.constant(rng.random((batch_size, image_size, image_size, 3), dtype=np.float32))
        targets = tf.constant(rng.integers(0, 2, (batch_size, OUTPUTS)).astype(np.float32))
        steps = {"keras": training_step(keras_model, batch_size), "dpmedtf": training_step(fast_model, batch_size)}
        shape = [batch_size, image_size, image_size, 3]
        out.append({"name": "ResNet9 non-private step, forward + backward", "shape": shape,
                    "variants": {k: (lambda step=step, x=images, y=targets: step(x, y)) for k, step in steps.items()}})
        predicts = {"keras": inference(keras_model), "dpmedtf": inference(fast_model)}
        out.append({"name": "ResNet9 inference forward", "shape": shape,
                    "variants": {k: (lambda predict=predict, x=images: predict(x)) for k, predict in predicts.items()}})
    image_size, batch_size = sizes[0]
    # The stem's activations (after the stride-2 conv) and stage 2's, at the first size.
    shapes = [(batch_size, image_size // 2, image_size // 2, 64), (batch_size, image_size // 8, image_size // 8, 128)]
    for shape in shapes:
        x = tf.constant((rng.standard_normal(shape) * 2 + 0.5).astype(np.float32))
        gn = {"keras": built(tf.keras.layers.GroupNormalization, shape, groups=GROUPS, epsilon=GROUPNORM_EPSILON),
              "dpmedtf": built(GroupNorm, shape, groups=GROUPS, epsilon=GROUPNORM_EPSILON)}
        gn["dpmedtf"].set_weights(gn["keras"].get_weights())
        act = {"keras": tf.keras.layers.Activation("mish"), "dpmedtf": Mish()}
        for backward in (True, False):
            what = "forward + backward" if backward else "forward"
            out.append({"name": f"GroupNorm(32) {what}", "shape": list(shape),
                        "variants": {k: layer_case(layer, x, backward) for k, layer in gn.items()}})
            out.append({"name": f"Mish {what}", "shape": list(shape),
                        "variants": {k: layer_case(layer, x, backward) for k, layer in act.items()}})
        # The DP rule recomputes the forward itself (for either class): it is compared with GroupNorm's.
        out.append({"name": "GroupNorm in the fast DP engine: its rule (forward, backward, γ/β norms) vs GroupNorm "
                            "forward + backward", "shape": list(shape),
                    "variants": {"dp_rule": dp_rule_case(gn["keras"], x),
                                 "dpmedtf": layer_case(gn["dpmedtf"], x, True)}})
    return out


def run_all(all_cases: list[dict], rounds: int) -> list[dict]:
    functions = {(id(case), label): (lambda function=function: fetched(function()))
                 for case in all_cases for label, function in case["variants"].items()}
    times = interleaved_seconds(functions, rounds)
    results = []
    for case in all_cases:
        runs = {label: times[id(case), label] for label in case["variants"]}
        medians = {label: statistics.median(t) * 1e3 for label, t in runs.items()}
        baseline = next(iter(medians))
        results.append({"name": case["name"], "shape": case["shape"], "median_ms": medians, "baseline": baseline,
                        "baseline_over_dpmedtf": medians[baseline] / medians["dpmedtf"],
                        "runs_ms": {label: [round(v * 1e3, 3) for v in t] for label, t in runs.items()}})
    return results


def table(results: list[dict]) -> str:
    lines = ["| case | shape | Keras (ms) | dpmedtf (ms) | Keras / dpmedtf |", "|---|---|---:|---:|---:|"]
    for r in results:
        m, baseline = r["median_ms"], r["baseline"]
        left = f"{m[baseline]:.1f}" + ("" if baseline == "keras" else f" ({baseline})")
        lines.append(f"| {r['name']} | {'×'.join(map(str, r['shape']))} | {left} | {m['dpmedtf']:.1f} | "
                     f"{r['baseline_over_dpmedtf']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--sizes", default="128:8,256:4", help="image_size:batch_size pairs for the ResNet9 step")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "base_layers.json")
    args = parser.parse_args()
    sizes = [tuple(int(v) for v in pair.split(":")) for pair in args.sizes.split(",")]
    start = time.perf_counter()
    results = run_all(cases(sizes), args.rounds)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "tensorflow": tf.__version__,
              "rounds": args.rounds, "statistic": "median of interleaved rounds", "results": results,
              "seconds_total": round(time.perf_counter() - start, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(table(results))
    print(f"\n{args.rounds} interleaved rounds, medians; {result['seconds_total']} s; wrote {args.out}")


if __name__ == "__main__":
    main()
