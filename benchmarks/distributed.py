"""Distributed DP-SGD throughput: the trainer's step on 1 vs R replicas (MirroredStrategy), side by side.

For each image size and engine, runs benchmarks/dp_step.py once per replica count, in turn, each in its
own process: the same logical batch B per step, cut into B/R per replica, noise added once (replica 0).
Without GPUs the replicas are logical CPU devices splitting the same cores, so on this machine the
figure is the cost of distributing (all-reduce, per-replica tracing), not a speed-up; on R GPUs the same
command measures the real one. Writes benchmarks/results/distributed.json and .md.

  python benchmarks/distributed.py [--devices 1 2] [--engines nondp fast] [--batch-size 32]
                                   [--image-sizes 64 128] [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from dp_engines import HERE, TF_ENGINES, run_engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--engines", nargs="+", default=["nondp", "fast"], choices=TF_ENGINES)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "distributed.json")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for image_size in args.image_sizes:
            for engine in args.engines:
                for devices in args.devices:
                    result = run_engine(engine, args.batch_size, image_size, args.steps,
                                        Path(tmp) / f"{engine}-{image_size}-{devices}.json", None, devices)
                    print(json.dumps(result), flush=True)
                    results.append(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    table = table_markdown(results, args.devices)
    args.out.with_suffix(".md").write_text(table + "\n")
    print(table)


def table_markdown(results: list[dict], device_counts: list[int]) -> str:
    """samples/s per replica count, and each count's throughput relative to one replica."""
    kinds = sorted({r.get("device_kind") for r in results if r.get("devices", 1) > 1 and "device_kind" in r} - {None})
    header = (["px", "B", "engine"] + [f"{d} replica{'s' if d > 1 else ''} (samples/s)" for d in device_counts]
              + [f"{d} ÷ 1" for d in device_counts if d > 1])
    lines = [f"Replicas: {', '.join(kinds) or 'one device'}.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    keys = sorted({(r["image_size"], r["batch_size"], r["engine"]) for r in results})
    for image_size, batch_size, engine in keys:
        by_devices = {r.get("devices", 1): r for r in results
                      if (r["image_size"], r["batch_size"], r["engine"]) == (image_size, batch_size, engine)}
        speed = {d: by_devices[d].get("samples_per_s") for d in device_counts if d in by_devices}
        cells = [f"{speed[d]:.1f}" if speed.get(d) else by_devices.get(d, {}).get("error", "–") for d in device_counts]
        ratios = [f"{speed[d] / speed[1]:.2f}×" if speed.get(d) and speed.get(1) else "–"
                  for d in device_counts if d > 1]
        lines.append("| " + " | ".join([str(image_size), str(batch_size), engine, *cells, *ratios]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
