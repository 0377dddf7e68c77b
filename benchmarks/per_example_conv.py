"""Per-example conv kernel gradients, side by side in one run: the per-example loop against the batched contraction.

For each convolution of the paper's ResNet9 (widths 64–512) at the given image size, the fast engine's
instantiated kernel gradients of a batch of B examples are formed both ways, in a ``tf.function``:
- loop: ``norms.per_example_conv_kernel_grads``, TensorFlow's filter-gradient kernel per example (a while loop over views of the batch);
- batched: ``norms.batched_conv_kernel_grads``, the patches Pᵢ (T × D) and output gradients Gᵢ (T × p)
  of all examples contracted in one batched matrix product Pᵢᵀ Gᵢ.
Each is timed as the median of --repeats runs after a warm-up. The "cost model" column says which norm the
fast engine picks for that layer ("ghost" layers never instantiate, so their times matter less).
Usage: python benchmarks/per_example_conv.py [--image-size 128] [--batch-size 8] [--repeats 7]
Writes benchmarks/results/per_example_conv.json and prints a markdown table.

With --norm-costs it measures instead what the cost model (``norms.ghost_is_cheaper``) rests on, at each
--settings px:B: per layer, in interleaved rounds, the non-private step's batched filter gradient, the
instantiated path (per-example kernel gradients as this device forms them, their squared norms and the
weighted sum Σᵢ cᵢGᵢ) and the ghost path (the float64 Gram norms and the batched filter gradient of rows
scaled by cᵢ). Each method's cost minus the non-private one is what it adds to the step; the table says
which the cost model picks and which added less here. Writes benchmarks/results/per_example_norm_costs.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from dpmedtf.models.resnet9 import PAPER_WIDTHS, STAGE_STRIDES  # noqa: E402
from dpmedtf.privacy.clipping.norms import (batched_conv_kernel_grads, batched_is_preferred,  # noqa: E402
                                            conv_cost_prefers_ghost, conv_ghost_squared_norms,
                                            per_example_conv_kernel_grads, squared_norms_of)
from timing import fetched, interleaved_seconds, median_seconds  # noqa: E402  (benchmarks/timing.py, beside this script)


def resnet9_convs(image_size: int, in_channels: int = 3) -> list[tuple[str, int, int, int, int, int]]:
    """(name, input size, kernel, stride, input channels, output channels) of each ResNet9 convolution."""
    convs = [("stem_conv", image_size, 7, 2, in_channels, PAPER_WIDTHS[0])]
    size, channels = image_size // 4, PAPER_WIDTHS[0]  # the stem's stride 2, then its 3×3/2 max pool
    for stage, (width, stride) in enumerate(zip(PAPER_WIDTHS, STAGE_STRIDES), start=1):
        convs.append((f"stage{stage}_conv1", size, 3, stride, channels, width))
        convs.append((f"stage{stage}_conv2", size // stride, 3, 1, width, width))
        if stride != 1 or channels != width:
            convs.append((f"stage{stage}_shortcut_conv", size, 1, stride, channels, width))
        size, channels = size // stride, width
    return convs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "per_example_conv.json")
    parser.add_argument("--norm-costs", action="store_true",
                        help="measure each norm method's added cost against the cost model's choice instead")
    parser.add_argument("--settings", nargs="+", default=["128:32", "256:16", "512:8"],
                        help="with --norm-costs: image size:batch size pairs")
    parser.add_argument("--rounds", type=int, default=15, help="with --norm-costs: interleaved rounds per layer")
    args = parser.parse_args()
    if args.norm_costs:
        norm_costs(args.settings, args.rounds, args.out.with_name("per_example_norm_costs.json"))
        return

    rng = np.random.default_rng(0)
    rows = []
    for name, size, kernel, stride, cin, cout in resnet9_convs(args.image_size):
        inputs = tf.constant(rng.standard_normal((args.batch_size, size, size, cin)), tf.float32)
        kernel_shape, strides = (kernel, kernel, cin, cout), (stride, stride)
        out_size = -(-size // stride)  # 'same' padding, as the ResNet9's
        grads = tf.constant(rng.standard_normal((args.batch_size, out_size, out_size, cout)), tf.float32)
        timed = {}
        for method, function in (("loop", per_example_conv_kernel_grads), ("batched", batched_conv_kernel_grads)):
            graph = tf.function(lambda x, g, f=function: f(x, g, kernel_shape, strides, "same"))
            timed[method] = 1000 * median_seconds(lambda: graph(inputs, grads).numpy(), args.repeats)[0]
        rows.append({"layer": name, "input": [size, size, cin], "kernel": list(kernel_shape), "stride": stride,
                     "positions": out_size * out_size, "patch_size": kernel * kernel * cin,
                     "cost_model": "ghost" if conv_cost_prefers_ghost(grads, kernel_shape, strides) else "instantiate",
                     "loop_ms": timed["loop"], "batched_ms": timed["batched"],
                     "batched_over_loop": timed["batched"] / timed["loop"]})

    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "device": "CPU",
              "gpu_visible": bool(tf.config.list_logical_devices("GPU")), "image_size": args.image_size,
              "batch_size": args.batch_size, "repeats": args.repeats, "dtype": "float32", "layers": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    print(f"B = {args.batch_size}, {args.image_size} px, float32, {result['machine']}; median of {args.repeats}\n")
    print("| layer | input | kernel / stride | T | D | cost model | loop ms | batched ms | batched / loop |")
    print("|---|---|---|---|---|---|---:|---:|---:|")
    for row in rows:
        k = row["kernel"]
        print(f"| {row['layer']} | {'×'.join(map(str, row['input']))} | {k[0]}×{k[1]}, {k[2]}→{k[3]} /{row['stride']} "
              f"| {row['positions']} | {row['patch_size']} | {row['cost_model']} | {row['loop_ms']:.1f} "
              f"| {row['batched_ms']:.1f} | {row['batched_over_loop']:.2f} |")


# Gram matrices above this (B·T² float64 values) are not formed: the cost model never picks them, and
# the stem's at 128 px, B = 32 would take 4 GB.
GRAM_BYTES_LIMIT = 1 << 30


def norm_costs(settings: list[str], rounds: int, out: Path) -> None:
    """Per ResNet9 convolution at each setting: ms added to the non-private filter gradient by each norm method."""
    rng = np.random.default_rng(0)
    rows = []
    for image_size, batch_size in (map(int, setting.split(":")) for setting in settings):
        for name, size, kernel, stride, cin, cout in resnet9_convs(image_size):
            inputs = tf.constant(rng.standard_normal((batch_size, size, size, cin)), tf.float32)
            kernel_shape, strides = (kernel, kernel, cin, cout), (stride, stride)
            out_size = -(-size // stride)
            grads = tf.constant(rng.standard_normal((batch_size, out_size, out_size, cout)), tf.float32)
            weights = tf.constant(rng.random(batch_size), tf.float32)
            kernel_grads = (batched_conv_kernel_grads if batched_is_preferred(grads, kernel_shape)
                            else per_example_conv_kernel_grads)

            def filter_gradient(output_grads):
                return tf.raw_ops.Conv2DBackpropFilter(input=inputs, filter_sizes=tf.constant(kernel_shape),
                                                       out_backprop=output_grads, strides=[1, *strides, 1],
                                                       padding="SAME")

            def instantiate():
                per_example = kernel_grads(inputs, grads, kernel_shape, strides, "same")
                return squared_norms_of(per_example), tf.tensordot(weights, per_example, axes=1)

            def ghost():
                return (conv_ghost_squared_norms(inputs, grads, (kernel, kernel), strides, "same"),
                        filter_gradient(grads * weights[:, None, None, None]))

            methods = {"nonprivate": lambda: filter_gradient(grads), "instantiate": instantiate}
            if batch_size * out_size ** 4 * 8 <= GRAM_BYTES_LIMIT:
                methods["ghost"] = ghost
            times = interleaved_seconds({method: (lambda graph=tf.function(fn): fetched(graph()))
                                         for method, fn in methods.items()}, rounds, shuffle_seed=1)
            ms = {method: 1000 * statistics.median(runs) for method, runs in times.items()}
            added = {method: ms[method] - ms["nonprivate"] for method in ms if method != "nonprivate"}
            picked = "ghost" if conv_cost_prefers_ghost(grads, kernel_shape, strides) else "instantiate"
            cheaper = min(added, key=added.get)
            rows.append({"image_size": image_size, "batch_size": batch_size, "layer": name,
                         "kernel": list(kernel_shape), "stride": stride, "positions": out_size * out_size,
                         "nonprivate_ms": ms["nonprivate"], "instantiate_added_ms": added["instantiate"],
                         "ghost_added_ms": added.get("ghost"), "cost_model": picked,
                         "measured_cheaper": cheaper if "ghost" in added else "instantiate (ghost not formed)"})
            print(json.dumps(rows[-1]), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} cores", "rounds": rounds,
                               "dtype": "float32", "layers": rows}, indent=2) + "\n")
    print(f"\nms added to the non-private filter gradient, medians of {rounds} interleaved rounds\n")
    print("| px, B | layer | T | kernel / stride | non-private ms | instantiate adds | ghost adds | cost model | cheaper here |")
    print("|---|---|---:|---|---:|---:|---:|---|---|")
    for row in rows:
        k = row["kernel"]
        ghost_added = "—" if row["ghost_added_ms"] is None else f"{row['ghost_added_ms']:.1f}"
        print(f"| {row['image_size']}, {row['batch_size']} | {row['layer']} | {row['positions']} "
              f"| {k[0]}×{k[1]}, {k[2]}→{k[3]} /{row['stride']} | {row['nonprivate_ms']:.1f} "
              f"| {row['instantiate_added_ms']:.1f} | {ghost_added} | {row['cost_model']} | {row['measured_cheaper']} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
