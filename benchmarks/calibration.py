"""Time noise calibration for the paper's UKA-CXR run (N=153,502, B=128, 150 epochs ≈ 180k steps).

For each accountant and each ε of the paper's grid: wall time of `calibrate_noise_multiplier`,
the σ it returns and ε recomputed at σ. Prints a table and writes benchmarks/results/calibration.json.
With --paper-grid it adds, per grid ε: σ_PLD/σ_RDP from those calibrations, and the patient-level ε
(group privacy, `dpmedtf.privacy.group.group_epsilon`) for patients with k images at the PLD σ, under
both accountants, with the wall time of each call; plus the same call's time on a demo-sized run.
Usage: python benchmarks/calibration.py [--repeats R] [--out PATH] [--paper-grid] [--group-sizes K ...]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path

from dpmedtf.privacy.accounting import calibrate_noise_multiplier, dp_sgd_event, steps_for_epochs
from dpmedtf.privacy.group import group_epsilon

N, B, EPOCHS, DELTA = 153_502, 128, 150, 6e-6
EPSILONS = (0.29, 0.54, 1.06, 2.04, 4.71, 7.89)
# A demo-sized run (image-level ε ≈ 8), to time group_epsilon where composition is cheap.
DEMO_N, DEMO_B, DEMO_EPOCHS, DEMO_SIGMA, DEMO_DELTA = 300, 32, 30, 1.1, 1e-3
# A group_epsilon call slower than this is not repeated for the remaining grid points.
GROUP_CALL_LIMIT_SECONDS = 120.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "calibration.json")
    parser.add_argument("--paper-grid", action="store_true",
                        help="also σ_PLD/σ_RDP and patient-level ε per grid point (about two more minutes)")
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[2, 3])
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
    result = {"setting": {"dataset_size": N, "batch_size": B, "epochs": EPOCHS, "steps": steps, "delta": DELTA},
              "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version()},
              "rows": rows, "slowest_seconds": summary}
    if args.paper_grid:
        result["paper_grid"] = paper_grid(rows, steps, args.group_sizes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


def timed_group_epsilon(event, delta: float, k: int, accountant: str) -> dict:
    start = time.perf_counter()
    g = group_epsilon(event, delta, k, accountant)
    seconds = time.perf_counter() - start
    return {"accountant": accountant, "group_size": k, "epsilon": _json_number(g.epsilon),
            "example_epsilon": _json_number(g.example_epsilon), "example_delta": g.example_delta,
            "achieved_delta": g.achieved_delta, "method": g.method, "seconds": seconds}


def paper_grid(rows: list[dict], steps: int, group_sizes: list[int]) -> dict:
    """σ_PLD vs σ_RDP per grid ε (from the calibrations above), and patient-level ε at σ_PLD."""
    sigma = {(r["accountant"], r["target_epsilon"]): r for r in rows}
    calibration, group = [], []
    skip_reason: dict[str, str] = {}
    for target in EPSILONS:
        pld, rdp = sigma["pld", target], sigma["rdp", target]
        calibration.append({"target_epsilon": target, "sigma_pld": pld["noise_multiplier"],
                            "sigma_rdp": rdp["noise_multiplier"],
                            "sigma_ratio_pld_over_rdp": pld["noise_multiplier"] / rdp["noise_multiplier"],
                            "seconds_pld": pld["seconds_median"], "seconds_rdp_median": rdp["seconds_median"]})
        event = dp_sgd_event(B / N, pld["noise_multiplier"], steps)
        for k in [1, *group_sizes]:  # k = 1: the image-level ε at σ_PLD under each accountant
            for accountant in ("pld", "rdp"):
                if accountant in skip_reason:
                    group.append({"target_epsilon": target, "accountant": accountant, "group_size": k,
                                  "skipped": skip_reason[accountant]})
                    continue
                entry = {"target_epsilon": target, "sigma": pld["noise_multiplier"],
                         **timed_group_epsilon(event, DELTA, k, accountant)}
                group.append(entry)
                if entry["seconds"] > GROUP_CALL_LIMIT_SECONDS:
                    skip_reason[accountant] = (f"one call took {entry['seconds']:.0f} s "
                                               f"(> {GROUP_CALL_LIMIT_SECONDS:.0f} s); not repeated")

    demo_steps = steps_for_epochs(DEMO_N, DEMO_B, DEMO_EPOCHS)
    demo_event = dp_sgd_event(DEMO_B / DEMO_N, DEMO_SIGMA, demo_steps)
    demo = [timed_group_epsilon(demo_event, DEMO_DELTA, k, accountant)
            for k in [1, *group_sizes] for accountant in ("pld", "rdp")]

    print(f"\nσ calibrated for each target ε (δ={DELTA}, steps={steps}, q={B}/{N})")
    print(f"{'target ε':>9} {'σ PLD':>9} {'σ RDP':>9} {'PLD/RDP':>8} {'PLD s':>7} {'RDP s':>7}")
    for c in calibration:
        print(f"{c['target_epsilon']:>9} {c['sigma_pld']:>9.5f} {c['sigma_rdp']:>9.5f} "
              f"{c['sigma_ratio_pld_over_rdp']:>8.4f} {c['seconds_pld']:>7.2f} {c['seconds_rdp_median']:>7.2f}")
    print(f"\npatient-level ε (group privacy, Vadhan 2017 Lemma 2.2) at σ_PLD, δ={DELTA}; "
          "k = images per patient (k = 1: image-level)")
    print(f"{'target ε':>9} {'k':>2} {'ε PLD':>10} {'s':>6} {'ε RDP':>10} {'s':>6}")
    by_key = {(g["target_epsilon"], g["group_size"], g["accountant"]): g for g in group}
    for target in EPSILONS:
        for k in [1, *group_sizes]:
            cells = []
            for accountant in ("pld", "rdp"):
                g = by_key[target, k, accountant]
                cells.append(("skipped", "") if "skipped" in g else (_fmt(g["epsilon"]), f"{g['seconds']:.2f}"))
            print(f"{target:>9} {k:>2} {cells[0][0]:>10} {cells[0][1]:>6} {cells[1][0]:>10} {cells[1][1]:>6}")
    for accountant, reason in skip_reason.items():
        print(f"note: {accountant} group calls skipped after a slow one: {reason}")
    print(f"\ndemo-sized run (N={DEMO_N}, B={DEMO_B}, {DEMO_EPOCHS} epochs = {demo_steps} steps, "
          f"σ={DEMO_SIGMA}, δ={DEMO_DELTA}): one group_epsilon call")
    for d in demo:
        print(f"  k={d['group_size']} {d['accountant']}: ε={_fmt(d['epsilon'])} in {d['seconds']:.2f} s")
    return {"setting": {"group_sizes": group_sizes, "sigma": "calibrated under PLD for the target ε"},
            "calibration": calibration, "group_epsilon": group,
            "demo": {"dataset_size": DEMO_N, "batch_size": DEMO_B, "epochs": DEMO_EPOCHS, "steps": demo_steps,
                     "noise_multiplier": DEMO_SIGMA, "delta": DEMO_DELTA, "calls": demo},
            "group_call_limit_seconds": GROUP_CALL_LIMIT_SECONDS}


def _json_number(value: float) -> float | str:
    return value if math.isfinite(value) else "inf"  # JSON has no infinity


def _fmt(value: float | str) -> str:
    return value if isinstance(value, str) else f"{value:.4f}"


if __name__ == "__main__":
    main()
