"""Distributed DP-SGD throughput: the trainer's step on 1 vs R replicas (MirroredStrategy), side by side.

For each image size and engine, runs benchmarks/dp_step.py once per replica count, each in its own
process: the same logical batch B per step, cut into B/R per replica, noise added once (replica 0).
The machine is shared and noisy, so this is repeated ``--rounds`` times, the replica counts taking
turns in alternating order; the table gives the median throughput and the median (and range) of the
per-round ratios, each ratio from two runs made back to back.
Without GPUs the replicas are logical CPU devices splitting the same cores, so on this machine the
figure is the cost of distributing (all-reduce, per-replica tracing), not a speed-up; on R GPUs the same
command measures the real one. Writes benchmarks/results/distributed.json and .md.

  python benchmarks/distributed.py [--devices 1 2] [--engines nondp fast] [--batch-size 32]
                                   [--image-sizes 64 128] [--steps 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
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
    parser.add_argument("--rounds", type=int, default=3, help="repetitions, the replica counts alternating in order")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "distributed.json")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            for image_size in args.image_sizes:
                for engine in args.engines:
                    # Alternate which count goes first, so a drift in machine load favours neither.
                    order = args.devices if round_index % 2 == 0 else args.devices[::-1]
                    for devices in order:
                        result = run_engine(engine, args.batch_size, image_size, args.steps,
                                            Path(tmp) / f"{engine}-{image_size}-{devices}.json", None, devices)
                        result = {**result, "devices": devices, "round": round_index}
                        print(json.dumps(result), flush=True)
                        results.append(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    table = table_markdown(results, args.devices)
    args.out.with_suffix(".md").write_text(table + "\n")
    print(table)


def table_markdown(results: list[dict], device_counts: list[int]) -> str:
    """Median samples/s per replica count, and the median [min–max] over rounds of each count's
    throughput relative to one replica in the same round."""
    kinds = sorted({r.get("device_kind") for r in results if r.get("devices", 1) > 1 and "device_kind" in r} - {None})
    rounds = len({r.get("round", 0) for r in results})
    header = (["px", "B", "engine"] + [f"{d} replica{'s' if d > 1 else ''} (samples/s)" for d in device_counts]
              + [f"{d} ÷ 1" for d in device_counts if d > 1])
    lines = [f"Replicas: {', '.join(kinds) or 'one device'}. Median of {rounds} round{'s' if rounds > 1 else ''}; "
             "ratio: median [min–max] of the per-round ratios.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    keys = sorted({(r["image_size"], r["batch_size"], r["engine"]) for r in results})
    for image_size, batch_size, engine in keys:
        runs = [r for r in results if (r["image_size"], r["batch_size"], r["engine"]) == (image_size, batch_size, engine)]
        speeds = {d: {r.get("round", 0): r["samples_per_s"] for r in runs if r.get("devices", 1) == d and "samples_per_s" in r}
                  for d in device_counts}
        errors = {d: next((r["error"] for r in runs if r.get("devices", 1) == d and "error" in r), "–") for d in device_counts}
        cells = [f"{statistics.median(speeds[d].values()):.1f}" if speeds[d] else errors[d] for d in device_counts]
        ratios = [ratio_cell([speeds[d][k] / speeds[1][k] for k in speeds[d] if k in speeds[1]])
                  for d in device_counts if d > 1]
        lines.append("| " + " | ".join([str(image_size), str(batch_size), engine, *cells, *ratios]) + " |")
    return "\n".join(lines)


def ratio_cell(per_round: list[float]) -> str:
    """Median [min–max] of one replica count's per-round throughput ratios."""
    if not per_round:
        return "–"
    return f"{statistics.median(per_round):.2f}× [{min(per_round):.2f}–{max(per_round):.2f}]"


if __name__ == "__main__":
    main()
