"""1000 bootstrap redraws of AUROC on 40,000 × 8 predictions (goal: under 10 s on 2 cores).

Writes benchmarks/results/bootstrap.json. Usage: python benchmarks/bootstrap.py [--n 40000] [--labels 8] [--redraws 1000]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from dpmedtf.evaluation.bootstrap import bootstrap_auroc, redraw_weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=40_000)
    parser.add_argument("--labels", type=int, default=8)
    parser.add_argument("--redraws", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bootstrap.json")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    labels = (rng.random((args.n, args.labels)) < np.linspace(0.02, 0.45, args.labels)).astype(np.int8)
    scores = np.round(labels * 0.7 + rng.normal(0, 1, labels.shape), 3).astype(np.float32)  # ties, as real outputs have
    start = time.perf_counter()
    weights = redraw_weights(args.n, args.redraws, seed=0)
    drawn = time.perf_counter() - start
    intervals, mean, _ = bootstrap_auroc(labels, scores, weights=weights)
    total = time.perf_counter() - start
    result = {"n": args.n, "labels": args.labels, "redraws": args.redraws, "seconds_total": total,
              "seconds_drawing_weights": drawn, "mean_auroc": [mean.estimate, mean.low, mean.high]}
    print(json.dumps(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
