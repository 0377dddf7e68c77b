"""DP engines side by side in one run: non-private, fast, tensorflow-privacy vectorized, and Opacus 1.6.

For every setting (image size : batch size), runs one process per engine in turn (so each sees the same
machine load and its own peak memory): benchmarks/dp_step.py for the TensorFlow engines — each also
compiled with XLA (``-xla``: training.jit_compile: true, padded fixed-shape chunks) — and
benchmarks/opacus_step.py (PyTorch 2.13 CPU + Opacus 1.6, in its own virtual environment, created on
first use) for the PyTorch ones. Writes benchmarks/results/dp_engines.json and .md.

The engines the ratios are taken between (non-private, fast, PyTorch non-private, Opacus) run --rounds
times, alternating within each round; a ratio is the median of the per-round ratios and a figure the
median over rounds (pairing the runs of one round cancels the machine's drift, but one process per
engine on a shared 2-core machine still varies by ±15 %). The slow engines run once.

The fast and non-private steps are also timed in one process (benchmarks/dp_step.py --paired-rounds):
built side by side and run one step each per round in a shuffled order, they see the same process state,
and the median of their per-round time ratios (with its quartiles) is the tighter estimate of what DP adds.

  python benchmarks/dp_engines.py [--settings 128:32 256:16 512:8] [--steps 8] [--rounds 3] [--paired-rounds 20]
                                  [--large 128:224]   # also: can the fast engine train B=128 at 224 px?
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

HERE = Path(__file__).parent
TF_ENGINES = ("nondp", "fast", "vectorized", "nondp-xla", "fast-xla")
TORCH_ENGINES = ("torch-nondp", "opacus", "opacus-ghost")
# Run every round; the others (slow, and in no ratio) once.
REPEATED_ENGINES = ("nondp", "fast", "torch-nondp", "opacus")
TORCH_REQUIREMENTS = ("torch==2.13.0+cpu", "opacus==1.6.0", "numpy<2")  # the CPU wheel: no CUDA libraries
# tensorflow-privacy's vectorized engine needs ≈ 10.7 GB at B=32, 128 px and grows linearly with B·H²;
# beyond this many pixels per step it would not fit beside the other processes, so it is not run there.
VECTORIZED_MAX_PIXELS = 32 * 128 * 128


def torch_python(env_dir: Path) -> Path:
    python = env_dir / "bin" / "python"
    if not python.exists():
        print(f"creating {env_dir} with {' '.join(TORCH_REQUIREMENTS)} (once)", flush=True)
        venv.create(env_dir, with_pip=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", *TORCH_REQUIREMENTS], check=True)
    return python


def run_engine(engine: str, batch_size: int, image_size: int, steps: int, out: Path, python_for_torch: Path | None,
               devices: int = 1, paired_rounds: int = 0) -> dict:
    script, python = (("opacus_step.py", python_for_torch) if engine in TORCH_ENGINES
                      else ("dp_step.py", Path(sys.executable)))
    compiled = engine.endswith("-xla")
    command = [str(python), str(HERE / script), "--engine", engine.removesuffix("-xla"), "--batch-size",
               str(batch_size), "--image-size", str(image_size), "--steps", str(steps), "--json", str(out)]
    if compiled:
        command.append("--xla")
    if devices > 1:
        command += ["--devices", str(devices)]
    if paired_rounds:
        command += ["--paired-rounds", str(paired_rounds)]
    completed = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if completed.returncode != 0:
        tail = (completed.stderr or completed.stdout).strip().splitlines()[-1:]
        return {"engine": engine, "batch_size": batch_size, "image_size": image_size, "error": " ".join(tail)}
    return {**json.loads(out.read_text()), "engine": f"{engine}-vs-nondp" if paired_rounds else engine}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=["128:32", "256:16", "512:8"],
                        help="image size:batch size pairs (the issue's 128 px B = 32, 256 px B = 16, 512 px B = 8)")
    parser.add_argument("--engines", nargs="+", default=[*TF_ENGINES, *TORCH_ENGINES],
                        choices=[*TF_ENGINES, *TORCH_ENGINES])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help=f"rounds of {', '.join(REPEATED_ENGINES)}")
    parser.add_argument("--paired-rounds", type=int, default=20,
                        help="rounds of the fast and non-private steps alternating in one process (0: not run)")
    parser.add_argument("--large", help="B:H for one extra fast-engine run (memory at scale), e.g. 128:224")
    parser.add_argument("--torch-venv", type=Path, default=HERE / ".venv-opacus")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "dp_engines.json")
    args = parser.parse_args()
    python_for_torch = torch_python(args.torch_venv) if set(args.engines) & set(TORCH_ENGINES) else None
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for image_size, batch_size in (map(int, setting.split(":")) for setting in args.settings):
            for round_number in range(args.rounds):
                for engine in args.engines:
                    if round_number and engine not in REPEATED_ENGINES:
                        continue
                    if engine == "vectorized" and batch_size * image_size ** 2 > VECTORIZED_MAX_PIXELS:
                        results.append({"engine": engine, "batch_size": batch_size, "image_size": image_size,
                                        "round": 0, "skipped": "memory: grows with B·H², > 20 GB expected here"})
                        continue
                    result = run_engine(engine, batch_size, image_size, args.steps,
                                        Path(tmp) / f"{engine}-{batch_size}-{image_size}.json", python_for_torch)
                    result["round"] = round_number
                    print(json.dumps(result), flush=True)
                    results.append(result)
            if args.paired_rounds and {"nondp", "fast"} <= set(args.engines):
                result = run_engine("fast", batch_size, image_size, args.steps, Path(tmp) / "paired.json",
                                    python_for_torch, paired_rounds=args.paired_rounds)
                print(json.dumps({key: value for key, value in result.items() if key != "seconds"}), flush=True)
                results.append(result)
        large = None
        if args.large:
            batch_size, image_size = (int(v) for v in args.large.split(":"))
            large = run_engine("fast", batch_size, image_size, 2, Path(tmp) / "large.json", python_for_torch)
            print(json.dumps(large), flush=True)
    rows = comparison_rows(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": results, "comparison": rows, "large": large}, indent=2))
    table = markdown_table(rows, large)
    args.out.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


def comparison_rows(results: list[dict]) -> list[dict]:
    runs: dict[tuple, dict[int, dict]] = {}
    for r in results:
        if "samples_per_s" in r:
            runs.setdefault((r["image_size"], r["batch_size"], r["engine"]), {})[r.get("round", 0)] = r
    rows = []
    for image_size, batch_size in sorted({(r["image_size"], r["batch_size"]) for r in results}):
        def per_round(engine):
            return runs.get((image_size, batch_size, engine), {})

        def median_of(engine, field):
            values = [r[field] for r in per_round(engine).values()]
            return statistics.median(values) if values else None

        def paired_ratio(numerator_engine, denominator_engine, field="samples_per_s"):
            """Median over the rounds both ran in of numerator/denominator (one round's runs side by side)."""
            top, bottom = per_round(numerator_engine), per_round(denominator_engine)
            ratios = [top[k][field] / bottom[k][field] for k in top.keys() & bottom.keys()]
            return statistics.median(ratios) if ratios else None

        row = {"image_size": image_size, "batch_size": batch_size}
        for engine in (*TF_ENGINES, *TORCH_ENGINES):
            row[f"{engine}_samples_per_s"] = median_of(engine, "samples_per_s")
            row[f"{engine}_peak_rss_mb"] = median_of(engine, "peak_rss_mb")
            row[f"{engine}_rounds"] = len(per_round(engine))
        row["fast_step_time_vs_nondp"] = paired_ratio("nondp", "fast")  # time ratio = inverse throughput ratio
        one_process = per_round("fast-vs-nondp").get(0, {})
        row["fast_step_time_vs_nondp_one_process"] = one_process.get("step_time_vs_nondp")
        row["fast_step_time_vs_nondp_one_process_quartiles"] = one_process.get("step_time_vs_nondp_quartiles")
        row["one_process_rounds"] = one_process.get("paired_rounds")
        row["fast_memory_vs_nondp"] = paired_ratio("fast", "nondp", "peak_rss_mb")
        row["fast_vs_opacus_throughput"] = paired_ratio("fast", "opacus")
        rows.append(row)
    return rows


def markdown_table(rows: list[dict], large: dict | None) -> str:
    def number(value, digits=1):
        return "–" if value is None else f"{value:.{digits}f}"

    def ratio(value):
        return "–" if value is None else f"{value:.2f}×"

    def quartiles(value):
        return "" if value is None else f" ({value[0]:.2f}–{value[1]:.2f})"

    lines = ["| px | B | non-DP | fast DP | vectorized DP | non-DP XLA | fast DP XLA | Opacus | Opacus ghost "
             "| PyTorch non-DP | fast step time ÷ non-DP, separate processes "
             "| fast step time ÷ non-DP, one process (quartiles) | fast memory ÷ non-DP | fast ÷ Opacus "
             "| memory MB non-DP / fast / vectorized / Opacus |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        memory = " / ".join(number(r[f"{e}_peak_rss_mb"], 0) for e in ("nondp", "fast", "vectorized", "opacus"))
        lines.append(f"| {r['image_size']} | {r['batch_size']} | {number(r['nondp_samples_per_s'])} "
                     f"| {number(r['fast_samples_per_s'])} | {number(r['vectorized_samples_per_s'])} "
                     f"| {number(r['nondp-xla_samples_per_s'])} | {number(r['fast-xla_samples_per_s'])} "
                     f"| {number(r['opacus_samples_per_s'])} | {number(r['opacus-ghost_samples_per_s'])} "
                     f"| {number(r['torch-nondp_samples_per_s'])} | {ratio(r['fast_step_time_vs_nondp'])} "
                     f"| {ratio(r['fast_step_time_vs_nondp_one_process'])}"
                     f"{quartiles(r['fast_step_time_vs_nondp_one_process_quartiles'])} "
                     f"| {ratio(r['fast_memory_vs_nondp'])} | {ratio(r['fast_vs_opacus_throughput'])} | {memory} |")
    text = ("Samples/s of one training step of the 4.9M-parameter GroupNorm ResNet9 (Mish, 8 outputs), CPU, "
            "each engine in its own process, measured in turn in one run; non-DP, fast, Opacus and PyTorch "
            "non-DP are medians of alternating rounds, and the ratios medians of per-round ratios. \"One "
            "process\": the fast and non-private steps built in one process and run one step each per round, in a "
            "shuffled order; the median of the per-round step-time ratios, quartiles in brackets.\n\n" + "\n".join(lines) + "\n")
    if large:
        text += (f"\nFast DP at B = {large['batch_size']}, {large['image_size']} px: "
                 + (f"{large['samples_per_s']:.1f} samples/s, peak memory {large['peak_rss_mb'] / 1024:.1f} GB\n"
                    if "samples_per_s" in large else f"failed: {large.get('error')}\n"))
    return text


if __name__ == "__main__":
    main()
