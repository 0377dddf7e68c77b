"""The whole path on other labels and attributes, through `dpmedtf run` as a user runs it: non-private
pretraining on a SYNTHETIC CheXpert-convention cohort (uncertain and blank entries), then DP fine-tuning on
the UKA-convention cohort from its body with a new head, evaluated by site, race and race × sex, released;
fairlearn's MetricFrame recomputes the new attributes' rows from predictions.csv."""

import json

import numpy as np
import pandas as pd
import yaml
from fairlearn.metrics import MetricFrame, false_negative_rate
from sklearn.metrics import accuracy_score
from typer.testing import CliRunner

from dpmedtf.cli import app
from dpmedtf.data import labels as L
from dpmedtf.data.synthetic import SyntheticCohortSpec, write_synthetic_cohort

POLICY = {  # the default policy, but a 2-epoch model on 40 synthetic patients is held to no fairness limit
    "fairness": {"attributes": ["sex", "age_group"], "min_group_size": 100000}}


def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_chexpert_pretraining_then_dp_finetuning_on_uka_labels_audited_by_site_and_race(tmp_path, keys):
    chexpert = write_synthetic_cohort(tmp_path / "public", SyntheticCohortSpec(
        patients=24, image_size=40, seed=5, convention="chexpert"))["radiograph"]
    raw = pd.read_csv(chexpert, dtype=str, keep_default_na=False)
    assert (raw["Edema"] == "-1.0").any() or (raw == "-1.0").any().any()  # uncertain entries are in the data
    pretrain = tmp_path / "pretrain.yaml"
    pretrain.write_text(yaml.safe_dump({
        "name": "pretrain-chexpert", "data": {"manifest": str(chexpert), "image_size": 32},
        "labels": "chexpert", "privacy": {"enabled": False},
        "training": {"steps": 3, "batch_size": 8, "max_physical_batch": 8},
        "pipeline": {"stages": ["prepare", "train"]}}))
    run("run", pretrain, "--out", tmp_path / "runs" / "pretrain")
    body = tmp_path / "runs" / "pretrain" / "model.keras"
    assert body.is_file()

    uka = write_synthetic_cohort(tmp_path / "private", SyntheticCohortSpec(patients=40, image_size=48, seed=11))
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(POLICY))
    finetune = tmp_path / "finetune.yaml"
    finetune.write_text(yaml.safe_dump({
        "name": "finetune-uka", "data": {"manifest": str(uka["radiograph"]), "image_size": 32},
        "model": {"pretrained_weights": str(body), "pretrained_on": "synthetic CheXpert-convention cohort (public)"},
        "privacy": {"target_epsilon": 8.0, "delta": 1e-3, "unit": "patient"},
        "training": {"epochs": 2, "batch_size": 16, "max_physical_batch": 16},
        "evaluation": {"bootstrap_redraws": 30},
        "fairness": {"attributes": ["sex", "age", "site", {"column": "race", "required": True}],
                     "intersections": [["sex", "age_group"], ["race", "sex"]]},
        "release": {"private_key": str(keys / "publisher.pem"), "policy": str(tmp_path / "policy.yaml")}}))
    out = tmp_path / "runs" / "finetune"
    run("run", finetune, "--out", out)

    bundle = out / "bundle"
    certificate = json.loads((bundle / "privacy_certificate.json").read_text())
    pretraining = certificate["public_pretraining"]
    assert pretraining["label_set"]["name"] == "chexpert" and len(pretraining["label_set"]["findings"]) == 14
    assert pretraining["head"] == "new" and "CheXpert" in pretraining["data"]
    metadata = json.loads((bundle / "metadata.json").read_text())
    assert metadata["labels"] == list(L.FINDINGS)
    assert "labels: chexpert, 14 findings; head: new" in (bundle / "model_card.md").read_text()

    report = json.loads((bundle / "fairness_report.json").read_text())
    assert {"sex", "age_group", "site", "race", "sex_x_age", "race_x_sex"} <= {r["attribute"] for r in report["rows"]}
    predictions = pd.read_csv(next(out.rglob("predictions.csv")))
    written = pd.read_csv(next(out.rglob("predictions.csv")), dtype=str, keep_default_na=False)
    assert set(written[[f"{f}_true" for f in L.FINDINGS]].stack()) <= {"0", "1"}  # labels stay integers in the CSV
    assert {"site", "race"} <= set(written.columns)
    thresholds = json.loads(next(out.rglob("thresholds.json")).read_text())
    frame = predictions.assign(race_x_sex=predictions["race"].astype(str) + " × " + predictions["sex"].astype(str))
    for attribute in ("site", "race_x_sex"):
        for finding in ("cardiomegaly", "atelectasis_left"):
            y = frame[f"{finding}_true"].to_numpy(int)
            predicted = (frame[f"{finding}_prob"].to_numpy() >= thresholds[finding]).astype(int)
            recomputed = MetricFrame(metrics={"accuracy": accuracy_score, "fnr": false_negative_rate}, y_true=y,
                                     y_pred=predicted, sensitive_features=frame[attribute]).by_group
            rows = {r["group"]: r for r in report["rows"] if r["attribute"] == attribute and r["finding"] == finding}
            assert set(rows) == set(recomputed.index.astype(str))
            for group, metrics in recomputed.iterrows():
                row = rows[str(group)]
                assert row["n"] == int((frame[attribute] == group).sum())
                assert np.isclose(row["accuracy"], metrics["accuracy"])
                if row["fnr"] is not None and np.isfinite(row["fnr"]):
                    assert np.isclose(row["fnr"], metrics["fnr"])
