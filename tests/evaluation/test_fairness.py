"""Every fairness number recomputed directly with fairlearn and scikit-learn from the predictions."""

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import MetricFrame, equalized_odds_difference, false_negative_rate, false_positive_rate
from sklearn.metrics import accuracy_score, roc_auc_score

from dpmedtf.evaluation.fairness import expected_calibration_error, fairness_rows

FINDINGS = ("cardiomegaly", "congestion")


def predictions(n=600, seed=0):
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"image_id": [f"i{k}" for k in range(n)], "patient_id": [f"p{k // 2}" for k in range(n)],
                          "sex": rng.choice(["F", "M"], n, p=[0.35, 0.65]),
                          "age": rng.integers(18, 95, n)})
    frame["age_group"] = pd.cut(frame["age"], [0, 30, 60, 70, 80, 121], right=False,
                                labels=["0-29", "30-59", "60-69", "70-79", "80+"]).astype(str)
    for k, finding in enumerate(FINDINGS):
        y = (rng.random(n) < (0.4 if k == 0 else 0.06)).astype(int)
        harder = (frame["age"] > 70).to_numpy()  # older patients: weaker signal, as in the synthetic cohort
        frame[f"{finding}_true"] = y
        frame[f"{finding}_prob"] = 1 / (1 + np.exp(-(y * np.where(harder, 0.6, 2.0) + rng.normal(-1, 1, n))))
    return frame


def test_rows_equal_a_direct_fairlearn_and_sklearn_computation():
    frame = predictions()
    thresholds = {"cardiomegaly": 0.45, "congestion": 0.5}
    rows = fairness_rows(frame, thresholds, FINDINGS, attributes=("sex", "age_group"), redraws=200)
    for finding in FINDINGS:
        y, p = frame[f"{finding}_true"].to_numpy(), frame[f"{finding}_prob"].to_numpy()
        predicted = (p >= thresholds[finding]).astype(int)
        for attribute in ("sex", "age_group"):
            groups = frame[attribute]
            direct = MetricFrame(metrics={"acc": accuracy_score, "fnr": false_negative_rate, "fpr": false_positive_rate},
                                 y_true=y, y_pred=predicted, sensitive_features=groups).by_group
            eod = equalized_odds_difference(y, predicted, sensitive_features=groups)
            mine = {r["group"]: r for r in rows if r["attribute"] == attribute and r["finding"] == finding}
            assert set(mine) == set(groups)
            for group, row in mine.items():
                members = (groups == group).to_numpy()
                assert row["n"] == members.sum() and row["prevalence"] == pytest.approx(y[members].mean())
                if 0 < y[members].sum() < members.sum():
                    assert row["auroc"] == pytest.approx(roc_auc_score(y[members], p[members]), abs=1e-12)
                    assert row["auroc_ci_low"] <= row["auroc"] <= row["auroc_ci_high"]
                assert row["accuracy"] == pytest.approx(direct.loc[group, "acc"])
                rest = accuracy_score(y[~members], predicted[~members])
                assert row["statistical_parity_difference"] == pytest.approx(direct.loc[group, "acc"] - rest)
                if y[members].sum():
                    assert row["fnr"] == pytest.approx(direct.loc[group, "fnr"])
                assert row["fpr"] == pytest.approx(direct.loc[group, "fpr"])
                assert row["equalized_odds_difference"] == pytest.approx(eod)
            finite = [r["auroc"] for r in mine.values() if np.isfinite(r["auroc"])]
            assert all(r["worst_group_auroc"] == min(finite) for r in mine.values())


def test_mean_rows_average_the_findings_and_small_groups_are_flagged():
    frame = predictions()
    rows = fairness_rows(frame, {"cardiomegaly": 0.45, "congestion": 0.5}, FINDINGS, attributes=("sex",), redraws=100)
    for group in ("F", "M"):
        per = [r for r in rows if r["group"] == group and r["finding"] in FINDINGS]
        mean = next(r for r in rows if r["group"] == group and r["finding"] == "mean")
        assert mean["accuracy"] == pytest.approx(np.mean([r["accuracy"] for r in per]))
        assert mean["auroc"] == pytest.approx(np.nanmean([r["auroc"] for r in per]))
    sex_age = fairness_rows(frame, {"cardiomegaly": 0.45, "congestion": 0.5}, FINDINGS, attributes=("sex_x_age",),
                            redraws=50)
    assert {r["group"] for r in sex_age} >= {"F × 80+", "M × 30-59"}
    for row in sex_age + rows:
        if row["finding"] != "mean":
            few = min(row["n_positive"], row["n"] - row["n_positive"]) < 10
            assert (row["warning"] is not None) == few, row
    assert any(r["warning"] for r in sex_age if r["finding"] == "congestion")


def test_expected_calibration_error_against_a_direct_computation():
    rng = np.random.default_rng(1)
    p = rng.random(5000)
    y = (rng.random(5000) < p).astype(int)  # perfectly calibrated
    assert expected_calibration_error(y, p) < 0.03
    shifted = np.clip(p * 0.6, 0, 1)  # under-confident by construction
    bins = pd.cut(shifted, np.linspace(0, 1, 11), include_lowest=True, right=False)
    table = pd.DataFrame({"y": y, "p": shifted, "bin": bins}).groupby("bin", observed=True)
    direct = sum(len(g) / len(y) * abs(g["y"].mean() - g["p"].mean()) for _, g in table)
    assert expected_calibration_error(y, shifted) == pytest.approx(direct, rel=1e-9)
    assert direct > 0.15
