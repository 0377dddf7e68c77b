"""Utility of DP-SGD vs non-private training on the SYNTHETIC cohort (not patients; no clinical claim).

Trains the paper's ResNet9 at 64 px twice with shared settings (DP at ε = 8, δ = 1e-4; and the non-private
baseline with the paper's non-DP regime), then reports mean test AUROC over the eight findings computed with
scikit-learn. Writes benchmarks/results/synthetic_utility.json.
Usage: python benchmarks/synthetic_utility.py [--patients 250] [--epochs 10] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=250)
    parser.add_argument("--epochs", type=float, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--out-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "synthetic_utility.json")
    args = parser.parse_args()

    import numpy as np
    import tensorflow as tf
    from sklearn.metrics import roc_auc_score

    from dpmedtf.config import config_from_mapping
    from dpmedtf.data.pipeline import evaluation_dataset, split_rows
    from dpmedtf.data.synthetic import SyntheticCohortSpec, write_synthetic_cohort
    from dpmedtf.training.job import prepare_data
    from dpmedtf.training.trainer import train

    work = args.out_dir or Path(tempfile.mkdtemp(prefix="dpmedtf-utility-"))
    manifest = write_synthetic_cohort(work / "cohort", SyntheticCohortSpec(patients=args.patients, image_size=128,
                                                                           seed=0))["radiograph"]
    results = {"synthetic_data": True, "image_size": 64, "patients": args.patients, "runs": {}}
    shared = {"data": {"manifest": str(manifest), "image_size": 64},
              "training": {"epochs": args.epochs, "batch_size": args.batch_size, "max_physical_batch": args.batch_size}}
    for name, privacy in (("non-private", {"enabled": False}),
                          (f"dp-epsilon-{args.epsilon:g}", {"target_epsilon": args.epsilon, "delta": 1e-4})):
        config = config_from_mapping({**shared, "privacy": privacy})
        prepared = prepare_data(config, work)
        started = time.monotonic()
        result = train(config, prepared, work / name)
        seconds = time.monotonic() - started
        model = tf.keras.models.load_model(result.model_path, compile=False)
        probabilities, labels = [], []
        for images, batch_labels in evaluation_dataset(prepared, "test", batch_size=64):
            probabilities.append(tf.sigmoid(model(images, training=False)).numpy())
            labels.append(batch_labels.numpy())
        probabilities, labels = np.concatenate(probabilities), np.concatenate(labels)
        aurocs = [roc_auc_score(labels[:, j], probabilities[:, j]) for j in range(labels.shape[1])
                  if 0 < labels[:, j].sum() < len(labels)]
        results["runs"][name] = {"mean_test_auroc": float(np.mean(aurocs)), "per_finding_auroc": aurocs,
                                 "test_images": int(len(labels)), "train_images": int(len(split_rows(prepared, "train"))),
                                 "steps": result.steps, "seconds": seconds,
                                 "epsilon": result.ledger.epsilon() if result.ledger else None,
                                 "noise_multiplier": result.plan.noise_multiplier}
        print(f"{name}: mean test AUROC {np.mean(aurocs):.3f} over {len(aurocs)} findings, {result.steps} steps, "
              f"{seconds:.0f} s" + (f", ε = {result.ledger.epsilon():.3f}" if result.ledger else ""), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
