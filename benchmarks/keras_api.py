"""dpmedtf's Keras API (make_private + fit) against tensorflow-privacy's Keras DP paths and plain Keras.

The same user CNN (Conv2D → GroupNormalization → Conv2D/2 → LayerNormalization → Conv2D/2 → global pool →
Dense(8) logits, BinaryCrossentropy(from_logits=True)), random float32 data N = 1024, batch 64, trained
with ``model.fit`` by each variant in its own process (benchmarks/keras_api_worker.py, so each peak RSS is
its own). Variants run interleaved (A B C … A B C …) for --repeats rounds so they see the same machine
load; the figures are medians over rounds, and the ratios are medians of the per-round (paired) ratios.

  python benchmarks/keras_api.py [--large] [--repeats 3] [--steps 30] [--warmup 5] [--variants ...]

Writes the size's entry ("small", or "large" with --large: 64×64 inputs, twice the filters) of
benchmarks/results/keras_api.json (other sizes already there are kept) and benchmarks/results/keras_api.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from keras_api_worker import BATCH, CLIP, DELTA, LR, N, SIGMA, SIZES, VARIANTS  # noqa: E402

TFP_VARIANTS = ("tfp-vectorized", "tfp-dpmodel-registry", "tfp-dpmodel")
DESCRIPTIONS = {
    "nondp": "Keras compile(Adam) + fit(batch_size=64), no DP",
    "dpmedtf": "dpmedtf.make_private(engine='fast') + compile(Adam) + fit (Poisson batches, E[B] = 64)",
    "dpmedtf-vectorized": "dpmedtf.make_private(engine='vectorized') + compile(Adam) + fit",
    "tfp-vectorized": "tensorflow-privacy VectorizedDPKerasAdamOptimizer (per example), Reduction.NONE loss, fit",
    "tfp-dpmodel-registry": "tensorflow-privacy DPSequential(layer_registry=make_default_layer_registry()), use_xla=True",
    "tfp-dpmodel": "tensorflow-privacy DPSequential without a registry (per-example vectorized_map), use_xla=True",
}


def run_variant(variant: str, args, out: Path) -> dict:
    command = [sys.executable, str(HERE / "keras_api_worker.py"), "--variant", variant, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--json", str(out)]
    if args.large:
        command.append("--large")
    command += ["--max-rss-mb", str(args.max_rss_mb)]
    if args.max_physical_batch and variant.startswith("dpmedtf"):
        command += ["--max-physical-batch", str(args.max_physical_batch)]
    start = time.perf_counter()
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout,
                                   env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONFAULTHANDLER": "1"})
    except subprocess.TimeoutExpired:
        return {"variant": variant, "error": f"timed out after {args.timeout} s", "wall_s": args.timeout}
    wall = time.perf_counter() - start
    if completed.returncode == 3 and out.exists():  # the worker's memory guard
        return {**json.loads(out.read_text()), "returncode": 3, "wall_s": wall}
    if completed.returncode != 0 or not out.exists():
        return {"variant": variant, "error": failure(completed), "returncode": completed.returncode, "wall_s": wall}
    result = json.loads(out.read_text())
    out.unlink()
    return {**result, "wall_s": wall}


def failure(completed: subprocess.CompletedProcess) -> str:
    """One line: the exception (last line), or for a crash the signal, the C library's message and the
    innermost Python frames outside site-packages (from the worker's faulthandler dump)."""
    lines = [line for line in (completed.stderr or completed.stdout or "").splitlines() if line.strip()]
    if completed.returncode >= 0:
        return lines[-1].strip() if lines else f"exit code {completed.returncode}"
    try:
        name = signal.Signals(-completed.returncode).name
    except ValueError:
        name = f"signal {-completed.returncode}"
    crash = next((i for i, line in enumerate(lines) if line.startswith("Fatal Python error")), len(lines))
    message = [line.strip() for line in lines[max(0, crash - 1):crash] if "WARNING" not in line]
    # faulthandler dumps every Python thread; the frames wanted are the main thread's (the one at <module>).
    blocks, block = [], []
    for line in lines[crash:]:
        if line.startswith(("Thread 0x", "Current thread 0x")):
            blocks.append(block := [])
        elif line.startswith("  File"):
            block.append(line.strip())
    main_thread = next((b for b in blocks if b and b[-1].endswith("in <module>")), [])
    frames = [frame for frame in main_thread if "site-packages" not in frame and "/lib/python3" not in frame]
    return f"crashed ({name}): " + " | ".join(message + frames[:2])


def summarise(runs: list[dict], variants: list[str]) -> list[dict]:
    """Per variant: median s/step and RSS, and the medians of per-round ratios to nondp and to dpmedtf."""
    by_round: dict[int, dict[str, dict]] = {}
    for run in runs:
        by_round.setdefault(run["round"], {})[run["variant"]] = run

    def paired(variant: str, reference: str) -> float | None:
        ratios = [r[variant]["s_per_step"] / r[reference]["s_per_step"] for r in by_round.values()
                  if "s_per_step" in r.get(variant, {}) and "s_per_step" in r.get(reference, {})]
        return statistics.median(ratios) if ratios else None

    rows = []
    for variant in variants:
        ok = [r for r in runs if r["variant"] == variant and "s_per_step" in r]
        failed = [r for r in runs if r["variant"] == variant and "error" in r]
        skipped = [r for r in failed if "skipped" in r]
        row = {"variant": variant, "description": DESCRIPTIONS[variant], "runs_ok": len(ok),
               "runs_failed": len(failed) - len(skipped), "runs_skipped": len(skipped),
               "s_per_step": statistics.median(r["s_per_step"] for r in ok) if ok else None,
               "s_per_step_min_max": [min(r["s_per_step"] for r in ok), max(r["s_per_step"] for r in ok)] if ok else None,
               "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in ok) if ok else None,
               "rss_before_fit_mb": statistics.median(r["rss_before_fit_mb"] for r in ok) if ok else None,
               "ratio_to_nondp": paired(variant, "nondp"),
               "ratio_to_dpmedtf": paired(variant, "dpmedtf"),
               "errors": sorted({r["error"] for r in failed})}
        for key in ("fast_path_enabled", "note", "engine", "max_physical_batch"):
            values = {json.dumps(r.get(key)) for r in ok if key in r}
            if len(values) == 1:
                row[key] = json.loads(values.pop())
        rows.append(row)
    return rows


def table(rows: list[dict], size: str, config: dict, args) -> str:
    def number(value, digits=3):
        return "–" if value is None else f"{value:.{digits}f}"

    def ratio(value):
        return "–" if value is None else f"{value:.2f}×"

    lines = [f"Keras API, {size}: {config['image_size']}×{config['image_size']}×3, filters {config['filters']}, "
             f"N = {N}, B = {BATCH}; s/step = steady state over {args.steps} steps after {args.warmup} warm-up "
             f"steps; medians of {args.repeats} interleaved rounds (ratios: medians of per-round ratios).", "",
             "| variant | s/step (min–max) | ÷ nondp | ÷ dpmedtf | peak RSS MB | runs ok/failed/skipped |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        spread = ("" if r["s_per_step_min_max"] is None
                  else f" ({number(r['s_per_step_min_max'][0])}–{number(r['s_per_step_min_max'][1])})")
        lines.append(f"| {r['variant']} | {number(r['s_per_step'])}{spread} | {ratio(r['ratio_to_nondp'])} "
                     f"| {ratio(r['ratio_to_dpmedtf']) if r['variant'] != 'dpmedtf' else '1.00×'} "
                     f"| {number(r['peak_rss_mb'], 0)} | {r['runs_ok']}/{r['runs_failed']}/{r['runs_skipped']} |")
    notes = [f"- {r['variant']}: {r['note']}" for r in rows if r.get("note")]
    notes += [f"- {r['variant']} failed: {error}" for r in rows for error in r["errors"]]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def machine() -> dict:
    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "tensorflow": version("tensorflow") or version("tensorflow-cpu"), "keras": version("keras"),
            "tensorflow_privacy": version("tensorflow-privacy"), "dpmedtf": version("dpmedtf"),
            "load_average_at_start": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true", help="64×64 inputs and twice the filters")
    # dpmedtf-vectorized is refused on this CNN (LayerNormalization: TensorFlow 2.15's pfor corrupts memory on
    # its per-example Jacobian); it stays selectable for models without it.
    parser.add_argument("--variants", nargs="+", default=[v for v in VARIANTS if v != "dpmedtf-vectorized"],
                        choices=VARIANTS)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds over all variants")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps (tracing included) per run")
    parser.add_argument("--max-physical-batch", type=int, help="passed to make_private; its default if unset")
    parser.add_argument("--max-rss-mb", type=float, default=12_000,
                        help="a worker passing this resident memory is stopped; the variant is not rerun")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per worker run")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "keras_api.json")
    args = parser.parse_args()
    for required in ("nondp", "dpmedtf"):
        if required not in args.variants:
            args.variants.insert(0 if required == "nondp" else 1, required)
    size = "large" if args.large else "small"
    config = {**SIZES[size], "filters": list(SIZES[size]["filters"])}
    started = datetime.datetime.now(datetime.timezone.utc)
    host = machine()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.repeats):
            for variant in args.variants:
                over = next((r for r in runs if r["variant"] == variant and "memory_exceeded_mb" in r), None)
                if over:
                    runs.append({"round": round_, "variant": variant, "skipped": "over the memory limit in round "
                                 f"{over['round']}", "error": over["error"]})
                    continue
                result = {"round": round_, **run_variant(variant, args, Path(tmp) / f"{variant}.json")}
                print(json.dumps({k: result.get(k) for k in ("round", "variant", "s_per_step", "peak_rss_mb",
                                                              "wall_s", "error") if k in result}), flush=True)
                runs.append(result)
    rows = summarise(runs, args.variants)
    text = table(rows, size, config, args)
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results.setdefault("sizes", {})[size] = {
        "date": started.isoformat(timespec="seconds"), "machine": host,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {**config, "dataset_size": N, "batch_size": BATCH, "clip_norm": CLIP, "noise_multiplier": SIGMA,
                     "delta": DELTA, "learning_rate": LR, "steps": args.steps, "warmup": args.warmup,
                     "repeats": args.repeats, "max_physical_batch": args.max_physical_batch,
                     "max_rss_mb": args.max_rss_mb},
        "summary": rows, "runs": runs, "table": text}
    results["description"] = __doc__.split("\n\n")[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    markdown = "\n".join(results["sizes"][s]["table"] for s in ("small", "large") if s in results["sizes"])
    args.out.with_suffix(".md").write_text(markdown)
    print(text)
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
