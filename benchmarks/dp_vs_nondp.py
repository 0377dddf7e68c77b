"""DP-SGD (tensorflow-privacy vectorized) vs non-private samples/s, side by side in one run.

Runs benchmarks/dp_step.py for every (batch size, engine), interleaving engines so both see the same
machine load, each in its own process; writes benchmarks/results/dp_vs_nondp.json and prints a table.
Usage: python benchmarks/dp_vs_nondp.py [--batch-sizes 16 32] [--image-size 64] [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "dp_vs_nondp.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for batch_size in args.batch_sizes:
            pair = {}
            for engine in ("nondp", "vectorized"):
                out = Path(tmp) / f"{engine}-{batch_size}.json"
                subprocess.run([sys.executable, str(HERE / "dp_step.py"), "--engine", engine, "--batch-size",
                                str(batch_size), "--image-size", str(args.image_size), "--steps", str(args.steps),
                                "--json", str(out)], check=True)
                pair[engine] = json.loads(out.read_text())
            rows.append({"batch_size": batch_size, "image_size": args.image_size,
                         "nondp_samples_per_s": pair["nondp"]["samples_per_s"],
                         "dp_samples_per_s": pair["vectorized"]["samples_per_s"],
                         "dp_slower_by": pair["nondp"]["samples_per_s"] / pair["vectorized"]["samples_per_s"],
                         "nondp_peak_rss_mb": pair["nondp"]["peak_rss_mb"],
                         "dp_peak_rss_mb": pair["vectorized"]["peak_rss_mb"]})
    print(f"{'B':>4} {'px':>4} {'non-DP/s':>9} {'DP/s':>7} {'slower':>7} {'non-DP MB':>10} {'DP MB':>7}")
    for r in rows:
        print(f"{r['batch_size']:>4} {r['image_size']:>4} {r['nondp_samples_per_s']:>9.1f} {r['dp_samples_per_s']:>7.1f} "
              f"{r['dp_slower_by']:>6.1f}x {r['nondp_peak_rss_mb']:>10.0f} {r['dp_peak_rss_mb']:>7.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"engine": "tensorflow-privacy vectorized (tape.jacobian)", "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
