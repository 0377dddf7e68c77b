"""Evaluate a trained model: predictions, thresholds chosen on validation, test metrics with bootstrap CIs,
and the subgroup fairness report — the files DESIGN.md names, written atomically into one directory.

Thresholds are Youden thresholds on the *validation* split and are applied unchanged to test; choosing
them uses private validation labels outside DP, which the files state.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import tensorflow as tf

from dpmedtf.data.cache import PreparedData
from dpmedtf.data.pipeline import evaluation_dataset, split_rows
from dpmedtf.evaluation.bootstrap import bootstrap_auroc, redraw_weights
from dpmedtf.evaluation.fairness import fairness_rows
from dpmedtf.evaluation.metrics import binary_rates, observed, observed_rows, youden_threshold
from dpmedtf.files import json_safe, write_json_atomic
from dpmedtf.layout import EvaluationDir
from dpmedtf.privacy.audit.membership import membership_inference_audit, per_label_losses

SYNTHETIC_NOTICE = "SYNTHETIC DATA: generated images, not patients; no clinical claim rests on these numbers."


def predict(model: tf.keras.Model, prepared: PreparedData, split: str, batch_size: int = 32) -> pd.DataFrame:
    """One row per image of ``split``: identity, subgroup columns, and per label ``_true`` and ``_prob``."""
    rows = split_rows(prepared, split)
    frame = prepared.cohort.frame.loc[rows]
    channels = int(model.input_shape[-1]) if prepared.spec.modality == "volume" else 1
    probabilities, labels = [], []
    for images, batch_labels in evaluation_dataset(prepared, split, batch_size, volume_channels=channels):
        probabilities.append(tf.sigmoid(model(images, training=False)).numpy())
        labels.append(batch_labels.numpy())
    probabilities, labels = np.concatenate(probabilities), np.concatenate(labels)
    out = pd.DataFrame({"image_id": [Path(p).name for p in frame["path"]], "patient_id": frame["patient_id"].to_numpy(),
                        "sex": frame["sex"].to_numpy(), "age": frame["age"].to_numpy(),
                        "age_group": frame["age_group"].to_numpy()})
    for name in audited_attributes(prepared):  # the job's other attributes (site, race, …), so anyone can regroup
        if name not in out.columns:
            out[name] = frame[name].to_numpy()
    for j, name in enumerate(prepared.cohort.label_names):
        # 1, 0, or empty where the label is not observed (an ignore policy): nullable integers in the CSV.
        out[f"{name}_true"] = pd.Series(labels[:, j], index=out.index).astype("Int64")
        out[f"{name}_prob"] = probabilities[:, j]
    return out


def audited_attributes(prepared: PreparedData) -> tuple[str, ...]:
    return prepared.cohort.fairness.attribute_names



def evaluate(model: tf.keras.Model, prepared: PreparedData, out_dir: str | os.PathLike, redraws: int = 1000,
             seed: int = 0) -> dict:
    """Writes predictions.csv, predictions_validation.csv, thresholds.json, metrics.json, fairness_report.json."""
    files = EvaluationDir(out_dir)
    files.root.mkdir(parents=True, exist_ok=True)
    names = prepared.cohort.label_names
    validation, test = predict(model, prepared, "validation"), predict(model, prepared, "test")
    thresholds = {name: youden_threshold(*observed(validation, name)) for name in names}
    not_evaluable = single_class_findings(validation, test, names)
    for name, reasons in not_evaluable.items():
        print(f"warning: {name}: {'; '.join(reasons.values())}", file=sys.stderr, flush=True)

    y = test[[f"{n}_true" for n in names]].to_numpy(float, na_value=np.nan)  # NaN: not observed
    p = test[[f"{n}_prob" for n in names]].to_numpy()
    intervals, mean, _ = bootstrap_auroc(y, p, weights=redraw_weights(len(test), redraws, seed))
    findings = {}
    for j, name in enumerate(names):
        y_observed, p_observed = observed(test, name)
        rates = binary_rates(y_observed, p_observed >= thresholds[name])
        findings[name] = {"auroc": intervals[j].estimate, "auroc_ci_low": intervals[j].low,
                          "auroc_ci_high": intervals[j].high, "threshold": thresholds[name],
                          "sensitivity": rates.sensitivity, "specificity": rates.specificity,
                          "accuracy": rates.accuracy, "n": int(len(y_observed)), "n_positive": int(y_observed.sum())}
    averaged = {key: float(np.nanmean([findings[n][key] for n in names]))
                for key in ("sensitivity", "specificity", "accuracy")}
    provenance = {"synthetic_data": prepared.cohort.synthetic,
                  "notice": SYNTHETIC_NOTICE if prepared.cohort.synthetic else None,
                  "thresholds_chosen_on": "validation split (Youden index); private labels used outside DP"}
    metrics = {**provenance, "split": "test", "n": len(test),
               "bootstrap": {"redraws": redraws, "seed": seed, "interval": "percentile 95%"},
               "mean": {"auroc": mean.estimate, "auroc_ci_low": mean.low, "auroc_ci_high": mean.high, **averaged,
                        "auroc_over": [n for n in names if "test" not in not_evaluable.get(n, {})]},
               "findings": findings, "not_evaluable": not_evaluable}
    metrics["membership_inference"] = _audit(model, prepared, test, names, seed)
    spec = prepared.cohort.fairness
    report = {**provenance, "split": "test", "findings": list(names),
              "label_set": prepared.cohort.label_set.to_json(), "grouping": spec.to_json(),
              "attributes": list(spec.names),
              "rows": json_safe(fairness_rows(test, thresholds, names, spec, redraws=redraws, seed=seed))}

    test.to_csv(files.predictions, index=False)
    validation.to_csv(files.validation_predictions, index=False)
    write_json_atomic(files.thresholds, thresholds)
    write_json_atomic(files.metrics, json_safe(metrics))
    write_json_atomic(files.fairness_report, report)
    return metrics


def single_class_findings(validation: pd.DataFrame, test: pd.DataFrame, names) -> dict[str, dict[str, str]]:
    """Per finding, the splits on which it holds a single class, and what that does to the results.

    On validation the Youden threshold is undefined (it falls back to 0.5); on test the AUROC is
    undefined, so the finding is left out of the mean AUROC, which ``mean.auroc_over`` lists."""
    consequence = {"validation": "its threshold falls back to 0.5", "test": "its AUROC is undefined and left out of the mean"}
    found: dict[str, dict[str, str]] = {}
    for split, frame in (("validation", validation), ("test", test)):
        for name in names:
            values = frame[f"{name}_true"].to_numpy(float, na_value=np.nan)[observed_rows(frame, name)]
            if len(values) and values.min() != values.max():
                continue
            holds = ("no images" if not len(frame) else "no image where it is observed" if not len(values)
                     else "only positives" if values.min() == 1 else "only negatives")
            found.setdefault(name, {})[split] = f"the {split} split holds {holds} ({len(values)} image(s)): {consequence[split]}"
    return found


def _audit(model, prepared: PreparedData, test: pd.DataFrame, names, seed: int) -> dict:
    """Membership inference: training images (members) against test images (non-members)."""
    train = predict(model, prepared, "train")

    def losses(frame):
        return per_label_losses(frame[[f"{n}_true" for n in names]].to_numpy(), frame[[f"{n}_prob" for n in names]].to_numpy())

    groups = ("sex", "age_group")
    result = membership_inference_audit(losses(train), losses(test), {g: train[g].astype(str).to_numpy() for g in groups},
                                        {g: test[g].astype(str).to_numpy() for g in groups}, seed)
    return {"members": "training split", "non_members": "test split", **result}
