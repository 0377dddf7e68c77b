"""Canary audit at a small demo setting: the bound it measures, and what the audit twin costs next to training.

On a SYNTHETIC cohort (160 patients; 32 px, patient unit with up to 3 images, B = 32, 8 epochs,
δ = 1e-4, class weights from DP counts — the 0.1 demo's DP member), for each target ε (8 and 2), in one
process, side by side:
- the job's own training (``dpmedtf train``'s code path), timed;
- the audit twin with m white-box canaries on (a) the configured mechanism, (b) noise ten times smaller
  than the ledger claims, (c) no DP — each timed, each with its ε lower bound at 95% confidence;
- optionally the black-box audit of (a).
The broken variants are built here, as in the tests, by handing the twin another ``GradientStep``.
Writes benchmarks/results/canary_audit.{json,md}. Usage: python benchmarks/canary_audit.py [--canaries 1000]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=160, help="demo cohort size (the demo's own: 160)")
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--black-box", action="store_true", help="also run the black-box audit of (a)")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 2.0],
                        help="target ε of the DP member (the demo's 8, and a smaller one the canaries can refute)")
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args()

    from dpmedtf.config import config_from_mapping
    from dpmedtf.data.synthetic import SyntheticCohortSpec, write_synthetic_cohort
    from dpmedtf.privacy.audit.one_run import audit_scores
    from dpmedtf.privacy.randomness import RunSecret
    from dpmedtf.training.audit_twin import train_audit_twin, twin_plan
    from dpmedtf.training.job import prepare_data
    from dpmedtf.training.step import GradientStep
    from dpmedtf.training.trainer import train

    work = args.out_dir or Path(tempfile.mkdtemp(prefix="dpmedtf-canary-audit-"))
    manifest = write_synthetic_cohort(work / "cohort", SyntheticCohortSpec(patients=args.patients, image_size=64,
                                                                           seed=0))["radiograph"]
    config = config_from_mapping({
        "data": {"manifest": str(manifest), "image_size": 32},
        "privacy": {"target_epsilon": 8.0, "delta": 1e-4, "clip_norm": 1.5, "unit": "patient",
                    "max_images_per_patient": 3},
        "training": {"epochs": 8, "batch_size": 32, "max_physical_batch": 32, "checkpoint_every_steps": 20,
                     "seed": 0}})
    prepared = prepare_data(config, work)

    runs, training_seconds = [], {}
    for target in args.epsilons:
        member = dataclasses.replace(config, privacy=dataclasses.replace(config.privacy, target_epsilon=target))
        plan = twin_plan(member, prepared)
        started = time.monotonic()
        trained = train(member, prepared, work / f"trained-{target:g}")
        training_seconds[target] = time.monotonic() - started
        print(f"ε = {target:g}: training {trained.steps} steps in {training_seconds[target]:.1f} s, certified "
              f"ε = {trained.ledger.epsilon():.3f}", flush=True)
        variants = {
            "configured mechanism": None,
            "noise σ/10 (broken)": GradientStep(mechanism=dataclasses.replace(
                plan.mechanism, noise_multiplier=plan.noise_multiplier / 10), engine=plan.clipping,
                max_physical_batch=member.training.max_physical_batch),
            "no DP (non-private step)": GradientStep(mechanism=None,
                                                     max_physical_batch=member.training.max_physical_batch),
        }
        kinds = [("white-box", name, step) for name, step in variants.items()]
        if args.black_box:
            kinds.append(("black-box", "configured mechanism", None))
        for kind, name, step in kinds:
            started = time.monotonic()
            twin = train_audit_twin(member, prepared, kind=kind, canaries=args.canaries, secret=RunSecret.fresh(),
                                    gradient_step=step, log=lambda _: None)
            seconds = time.monotonic() - started
            bound = audit_scores(twin.scores, twin.included, delta=member.privacy.delta)
            runs.append({"target_epsilon": target, "kind": kind, "mechanism": name,
                         "epsilon_lower_bound": bound.epsilon_lower_bound, "ceiling": bound.ceiling,
                         "certified_epsilon": twin.ledger.epsilon(), "guesses": bound.guesses,
                         "correct_guesses": bound.correct_guesses, "steps": plan.steps,
                         "noise_multiplier": plan.noise_multiplier, "seconds": seconds,
                         "twin_over_training_time": seconds / training_seconds[target]})
            print(f"  {kind} / {name}: ε ≥ {bound.epsilon_lower_bound:.3f} ({bound.correct_guesses}/{bound.guesses} "
                  f"right; ceiling {bound.ceiling:.2f}) vs certified {twin.ledger.epsilon():.3f}; {seconds:.1f} s = "
                  f"{seconds / training_seconds[target]:.2f}× training", flush=True)

    results = {"synthetic_data": True, "setting": "160 synthetic patients, 32 px, patient unit (k = 3), B = 32, 8 epochs, at each target ε",
               "patients": args.patients, "canaries": args.canaries, "confidence": 0.95,
               "delta": config.privacy.delta, "sampling_rate": plan.sampling_rate,
               "unit_of_privacy": plan.unit_of_privacy, "training_seconds": training_seconds, "runs": runs}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "canary_audit.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["# Canary audit at the demo's setting (SYNTHETIC cohort)", "",
             f"{args.canaries} white-box canaries, 95% confidence, δ = {config.privacy.delta:g}, q = "
             f"{plan.sampling_rate:.3f}, unit {plan.unit_of_privacy}. 'ceiling': the bound a perfect attacker would "
             "reach with these canaries.", "",
             "| target ε | kind | mechanism run | measured ε ≥ | ceiling | certified ε | right guesses | "
             "twin time ÷ training |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['target_epsilon']:g} | {r['kind']} | {r['mechanism']} | {r['epsilon_lower_bound']:.3f} | "
              f"{r['ceiling']:.2f} | {r['certified_epsilon']:.3f} | {r['correct_guesses']}/{r['guesses']} | "
              f"{r['twin_over_training_time']:.2f}× |" for r in runs]
    (RESULTS / "canary_audit.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
