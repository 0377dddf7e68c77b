"""`dpmedtf evaluate` on a trained tiny model (the ``evaluated`` fixture of conftest.py): the contract files,
recomputed from predictions.csv."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from dpmedtf.data import labels as L
from dpmedtf.data.synthetic import SyntheticCohortSpec, write_synthetic_cohort
from dpmedtf.evaluation.metrics import youden_threshold

DPMEDTF = str(Path(sys.executable).with_name("dpmedtf"))


def test_contract_files_and_values_recompute_from_the_predictions(evaluated):
    work, result = evaluated
    out = work / "run" / "evaluation"
    assert "mean test AUROC" in result.stdout and "SYNTHETIC DATA" in result.stdout
    predictions = pd.read_csv(out / "predictions.csv")
    for column in ("image_id", "patient_id", "sex", "age", "age_group",
                   *(f"{f}_{kind}" for f in L.FINDINGS for kind in ("true", "prob"))):
        assert column in predictions.columns
    validation = pd.read_csv(out / "predictions_validation.csv")
    thresholds = json.loads((out / "thresholds.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["synthetic_data"] is True and "SYNTHETIC" in metrics["notice"]
    for finding in L.FINDINGS:
        # Thresholds come from validation, never from test.
        assert thresholds[finding] == pytest.approx(youden_threshold(validation[f"{finding}_true"], validation[f"{finding}_prob"]))
        y, p = predictions[f"{finding}_true"], predictions[f"{finding}_prob"]
        if 0 < y.sum() < len(y):
            assert metrics["findings"][finding]["auroc"] == pytest.approx(roc_auc_score(y, p), abs=1e-9)
        # A finding with one class on a split is said to be so, and the mean says which findings it covers.
        one_class = {split: frame[f"{finding}_true"].nunique() < 2 for split, frame in
                     (("validation", validation), ("test", predictions))}
        stated = metrics["not_evaluable"].get(finding, {})
        assert {split for split, single in one_class.items() if single} == set(stated)
        assert (finding in metrics["mean"]["auroc_over"]) == (not one_class["test"])
        for split in stated:
            assert f"warning: {finding}: " in result.stderr and f"the {split} split holds only" in stated[split]
    report = json.loads((out / "fairness_report.json").read_text())
    assert report["synthetic_data"] is True
    keys = {"attribute", "group", "finding", "n", "auroc", "auroc_ci_low", "auroc_ci_high", "accuracy",
            "statistical_parity_difference", "fnr", "fpr", "ece"}
    assert all(keys <= set(row) for row in report["rows"])
    assert {r["attribute"] for r in report["rows"]} == {"sex", "age_group", "sex_x_age"}
    mean_sex = [r for r in report["rows"] if r["attribute"] == "sex" and r["finding"] == "mean"]
    assert sum(r["n"] for r in mean_sex) == len(predictions)
    # Every per-group number recomputed from the written files with fairlearn and scikit-learn.
    from fairlearn.metrics import MetricFrame, equalized_odds_difference, false_negative_rate, false_positive_rate
    from sklearn.metrics import accuracy_score
    for finding in L.FINDINGS:
        y = predictions[f"{finding}_true"].to_numpy()
        p = predictions[f"{finding}_prob"].to_numpy()
        predicted = (p >= thresholds[finding]).astype(int)
        for attribute in ("sex", "age_group"):
            groups = predictions[attribute].astype(str)
            frame = MetricFrame(metrics={"acc": accuracy_score, "fnr": false_negative_rate, "fpr": false_positive_rate},
                                y_true=y, y_pred=predicted, sensitive_features=groups).by_group
            eod = equalized_odds_difference(y, predicted, sensitive_features=groups)
            for row in (r for r in report["rows"] if r["attribute"] == attribute and r["finding"] == finding):
                members = (groups == row["group"]).to_numpy()
                assert row["n"] == members.sum()
                assert row["accuracy"] == pytest.approx(frame.loc[row["group"], "acc"])
                assert row["statistical_parity_difference"] == pytest.approx(
                    frame.loc[row["group"], "acc"] - accuracy_score(y[~members], predicted[~members]))
                assert row["equalized_odds_difference"] == pytest.approx(eod)
                if y[members].sum():
                    assert row["fnr"] == pytest.approx(frame.loc[row["group"], "fnr"])
                if (1 - y[members]).sum():
                    assert row["fpr"] == pytest.approx(frame.loc[row["group"], "fpr"])
                if 0 < y[members].sum() < members.sum():
                    assert row["auroc"] == pytest.approx(roc_auc_score(y[members], p[members]), abs=1e-9)


def test_evaluation_is_not_overwritten_silently(evaluated):
    work, _ = evaluated
    again = subprocess.run([DPMEDTF, "evaluate", str(work / "job.yaml"), "--run", str(work / "run")],
                           capture_output=True, text=True, timeout=900)
    assert again.returncode != 0 and "already holds an evaluation" in again.stderr


def test_sweep_evaluation_writes_the_cross_epsilon_analysis_plots_and_report(tmp_path):
    manifest = write_synthetic_cohort(tmp_path / "cohort", SyntheticCohortSpec(patients=40, image_size=48, seed=4))["radiograph"]
    job = tmp_path / "sweep.yaml"
    job.write_text(yaml.safe_dump({"name": "sweep", "data": {"manifest": str(manifest), "image_size": 32},
                                   "privacy": {"epsilon_sweep": [2.0, 8.0], "sweep_non_private": True, "delta": 1e-3,
                                               "accountant": "rdp"},
                                   "training": {"steps": 2, "batch_size": 8, "max_physical_batch": 8},
                                   "evaluation": {"bootstrap_redraws": 100}}))
    run = tmp_path / "run"
    for command in (["train", str(job), "--out", str(run)], ["evaluate", str(job), "--run", str(run)]):
        result = subprocess.run([DPMEDTF, *command], capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr
    assert f"report: {run / 'report.html'}" in result.stdout
    sweep = json.loads((run / "sweep.json").read_text())
    # ε as accounted on what ran (the ledger), not the configured targets: at most the target, and close to it.
    epsilons = [m["epsilon"] for m in sweep["models"]]
    assert epsilons[2] is None and epsilons[:2] == pytest.approx([2.0, 8.0], rel=1e-3) and sweep["synthetic_data"] is True
    assert epsilons[0] <= 2.0 and epsilons[1] <= 8.0
    dp = sweep["models"][0]
    assert set(dp["versus_non_private"]) == set(L.FINDINGS)
    metrics = {name: json.loads((run / name / "evaluation" / "metrics.json").read_text())
               for name in ("epsilon-2", "non-private")}
    for finding, comparison in dp["versus_non_private"].items():
        if comparison is not None:
            assert comparison["auroc_difference"] == pytest.approx(
                metrics["epsilon-2"]["findings"][finding]["auroc"] - metrics["non-private"]["findings"][finding]["auroc"])
            assert 0 <= comparison["p_delong"] <= 1
    for png in ("privacy_utility.png", "auroc_per_finding.png", "subgroups_sex.png", "subgroups_age_group.png",
                "auroc_difference_vs_non_private.png", *(f"{name}/evaluation/roc_curves.png" for name in metrics)):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (run / "report.html").read_text()
    assert "SYNTHETIC DATA" in page and "privacy_utility.png" in page and "membership-inference attack AUC" in page
    assert "auroc_difference_vs_non_private.png" in page and "epsilon-2/evaluation/roc_curves.png" in page
    # The paired tests, one row per (DP model, finding), each with its difference, CI and both p-values as in sweep.json.
    assert "<th>DeLong p</th>" in page
    for finding, comparison in dp["versus_non_private"].items():
        if comparison is not None:
            assert (f"<td>epsilon-2</td><td>{finding.replace('_', ' ')}</td><td>{comparison['auroc_difference']:.3f}</td>"
                    f"<td>[{comparison['ci_low']:.3f}, {comparison['ci_high']:.3f}]</td>") in page
    r = dp["auroc_vs_positives"]
    if r["r"] is not None:
        assert f"{r['r']:.2f} (p " in page


def test_a_finding_with_one_class_on_a_split_is_named_with_its_consequence():
    from dpmedtf.evaluation.evaluate import single_class_findings

    validation = pd.DataFrame({"a_true": [0, 0, 0], "b_true": [0, 1, 1]})
    test = pd.DataFrame({"a_true": [0, 1], "b_true": [1, 1]})
    found = single_class_findings(validation, test, ["a", "b"])
    assert found == {"a": {"validation": "the validation split holds only negatives (3 image(s)): its threshold falls "
                                         "back to 0.5"},
                     "b": {"test": "the test split holds only positives (2 image(s)): its AUROC is undefined and "
                                   "left out of the mean"}}
