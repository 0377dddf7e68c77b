"""Membership-inference audit on the SYNTHETIC cohort: a DP model (ε = 8) vs a deliberately overfit
non-private model (no augmentation, high learning rate, many epochs on few images).

Attack AUCs come with their standard error (dpmedtf.privacy.audit.membership, Hanley–McNeil; n members = n non-members).
Writes benchmarks/results/mia_audit.json. Usage: python benchmarks/mia_audit.py [--patients 800] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=800)
    parser.add_argument("--overfit-epochs", type=float, default=60)
    parser.add_argument("--split-fractions", type=float, nargs=3, default=[0.3, 0.1, 0.6],
                        help="train/validation/test: a small training set invites memorisation, a large test set "
                             "(the non-members) makes the attack AUC precise")
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "mia_audit.json")
    args = parser.parse_args()

    from dpmedtf.config import config_from_mapping
    from dpmedtf.data.synthetic import SyntheticCohortSpec, write_synthetic_cohort
    from dpmedtf.evaluation.evaluate import evaluate
    from dpmedtf.models import load_model
    from dpmedtf.training.job import prepare_data
    from dpmedtf.training.trainer import train

    work = args.out_dir or Path(tempfile.mkdtemp(prefix="dpmedtf-mia-"))
    manifest = write_synthetic_cohort(work / "cohort", SyntheticCohortSpec(patients=args.patients, image_size=96,
                                                                           seed=1))["radiograph"]
    data = {"manifest": str(manifest), "image_size": 64, "split_fractions": args.split_fractions}
    runs = {
        "overfit-non-private": {"privacy": {"enabled": False},
                                "training": {"epochs": args.overfit_epochs, "batch_size": 16, "max_physical_batch": 16,
                                             "learning_rate": 1e-3, "augment": False}},
        "dp-epsilon-8": {"privacy": {"target_epsilon": 8.0, "delta": 1e-4},
                         "training": {"epochs": 10, "batch_size": 16, "max_physical_batch": 16}},
    }
    results = {"synthetic_data": True, "patients": args.patients, "split_fractions": args.split_fractions, "runs": {}}
    for name, settings in runs.items():
        config = config_from_mapping({"data": data, **settings})
        prepared = prepare_data(config, work)
        result = train(config, prepared, work / name)
        metrics = evaluate(load_model(result.model_path), prepared, work / name / "evaluation", redraws=200)
        audit = metrics["membership_inference"]["entire_dataset"]
        results["runs"][name] = {"mean_test_auroc": metrics["mean"]["auroc"], **audit,
                                 "epsilon": result.ledger.epsilon() if result.ledger else None}
        print(f"{name}: threshold-attack AUC {audit['threshold_attack']['auc']:.3f} "
              f"± {audit['threshold_attack']['auc_standard_error']:.3f} (advantage "
              f"{audit['threshold_attack']['advantage']:.3f}), trained-attack AUC {audit['trained_attack']['auc']:.3f}, "
              f"test AUROC {metrics['mean']['auroc']:.3f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
