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
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from dpmedtf.models.resnet9 import PAPER_WIDTHS, STAGE_STRIDES  # noqa: E402
from dpmedtf.privacy.clipping.norms import (batched_conv_kernel_grads, conv_cost_prefers_ghost,  # noqa: E402
                                            per_example_conv_kernel_grads)
from timing import median_seconds  # noqa: E402  (benchmarks/timing.py, beside this script)


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
    args = parser.parse_args()

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


if __name__ == "__main__":
    main()
