"""Time noise calibration for the paper's UKA-CXR run (N=153,502, B=128, 150 epochs ≈ 180k steps).

For each accountant and each ε of the paper's grid: wall time of `calibrate_noise_multiplier`,
the σ it returns and ε recomputed at σ. Prints a table and writes benchmarks/results/calibration.json.
Usage: python benchmarks/calibration.py [--repeats R] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

from dpmedtf.privacy.accounting import calibrate_noise_multiplier, steps_for_epochs

N, B, EPOCHS, DELTA = 153_502, 128, 150, 6e-6
EPSILONS = (0.29, 0.54, 1.06, 2.04, 4.71, 7.89)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "calibration.json")
    args = parser.parse_args()

    steps = steps_for_epochs(N, B, EPOCHS)
    rows = []
    print(f"N={N} B={B} epochs={EPOCHS} steps={steps} delta={DELTA}")
    print(f"{'accountant':>10} {'target ε':>9} {'σ':>10} {'ε at σ':>10} {'median s':>9}")
    for accountant in ("rdp", "pld"):
        for target in EPSILONS:
            times = []
            for _ in range(args.repeats if accountant == "rdp" else 1):  # PLD is slow; one run is telling
                start = time.perf_counter()
                cal = calibrate_noise_multiplier(target, DELTA, N, B, steps, accountant)
                times.append(time.perf_counter() - start)
            row = {"accountant": accountant, "target_epsilon": target,
                   "noise_multiplier": cal.accounting.schedule.noise_multiplier,
                   "epsilon_at_sigma": cal.accounting.epsilon, "seconds_median": statistics.median(times),
                   "seconds_all": times}
            rows.append(row)
            print(f"{accountant:>10} {target:>9} {row['noise_multiplier']:>10.5f} {row['epsilon_at_sigma']:>10.5f} "
                  f"{row['seconds_median']:>9.3f}")
    summary = {acc: max(r["seconds_median"] for r in rows if r["accountant"] == acc) for acc in ("rdp", "pld")}
    print("slowest calibration per accountant (s):", json.dumps(summary))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"setting": {"dataset_size": N, "batch_size": B, "epochs": EPOCHS,
                                                "steps": steps, "delta": DELTA},
                                    "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
                                    "rows": rows, "slowest_seconds": summary}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
