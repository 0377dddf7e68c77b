"""One model's figures and the self-contained report, on the run of the ``evaluated`` fixture (conftest.py):
a one-model job evaluated through the CLI."""

import base64
import json
import math
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dpmedtf.evaluation.fairness import calibration_bins, expected_calibration_error
from dpmedtf.evaluation.model_plots import UNRELIABLE, subgroup_intervals
from dpmedtf.evaluation.rate_intervals import mean_rate_intervals
from dpmedtf.layout import RunDir

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _evaluation(evaluated):
    work, _ = evaluated
    files = RunDir(work / "run").member().evaluation
    return (files, json.loads(files.metrics.read_text()), json.loads(files.fairness_report.read_text()),
            json.loads(files.thresholds.read_text()), pd.read_csv(files.predictions))


def _expected_figures(files, fairness):
    attributes = dict.fromkeys(r["attribute"] for r in fairness["rows"])  # the report's order
    return [files.roc_figure, files.reliability_figure, files.confusion_figure,
            *(files.subgroup_figure(a) for a in attributes)]


def test_a_one_model_evaluation_draws_each_figure_as_a_real_png(evaluated):
    files, _, fairness, _, _ = _evaluation(evaluated)
    figures = _expected_figures(files, fairness)
    assert {p.name for p in figures} >= {"roc_curves.png", "reliability.png", "confusion_matrices.png",
                                         "subgroups_sex.png", "subgroups_age_group.png", "subgroups_sex_x_age.png"}
    for path in figures:
        assert path.read_bytes()[:8] == PNG_SIGNATURE, path
        with Image.open(path) as image:
            image.load()  # decodes every pixel: a truncated file fails here
            assert image.width >= 600 and image.height >= 300, path
            colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
            assert colours is None or len(colours) > 50, f"{path} looks blank"


def test_the_report_embeds_every_figure_and_states_each_warning_once(evaluated):
    files, _, fairness, _, _ = _evaluation(evaluated)
    page = (files.root.parent / "report.html").read_text()
    embedded = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    # The very bytes of the model's figures, in order, and no image that needs a file or a server.
    assert [base64.b64decode(data) for data in embedded] == [p.read_bytes() for p in _expected_figures(files, fairness)]
    assert "src='" not in re.sub(r"src='data:", "", page)
    assert "evaluation/roc_curves.png" in page  # the caption says where the PNG is

    mean_rows = [r for r in fairness["rows"] if r["finding"] == "mean"]
    flagged = sum(1 for r in mean_rows if r["warning"])
    assert flagged, "the tiny cohort should have groups with too few positives"
    assert page.count("<tr class='unreliable'>") == flagged
    assert page.count(f">{UNRELIABLE}</span>") == flagged + 1  # a mark per flagged row, one in the legend
    assert page.count("greyed: fewer than 10 positives or negatives") == 1
    assert "only 0 positive" not in page and "unreliable for" not in page.replace("title='unreliable for", "")
    assert "accuracy parity difference (group − rest)" in page and "Parity diff." not in page
    assert "underdiagnosis: false-negative rate (FNR)" in page and "expected calibration error (ECE" in page


def test_rate_intervals_recompute_the_reported_means_and_subgroup_fnr(evaluated):
    _, metrics, fairness, thresholds, test = _evaluation(evaluated)
    findings, bootstrap = list(thresholds), metrics["bootstrap"]
    y = test[[f"{f}_true" for f in findings]].to_numpy()
    predicted = np.column_stack([test[f"{f}_prob"].to_numpy() >= thresholds[f] for f in findings])
    rates = mean_rate_intervals(y, predicted, bootstrap["redraws"], bootstrap["seed"])
    for key in ("sensitivity", "specificity", "accuracy"):
        assert rates[key].estimate == pytest.approx(metrics["mean"][key])
        assert 0 <= rates[key].low <= rates[key].high <= 1
    assert rates["fnr"].estimate == pytest.approx(1 - metrics["mean"]["sensitivity"])
    for attribute in dict.fromkeys(r["attribute"] for r in fairness["rows"]):
        groups = subgroup_intervals(fairness["rows"], test, thresholds, attribute, bootstrap["redraws"],
                                    bootstrap["seed"])
        assert [g["row"]["group"] for g in groups] == [r["group"] for r in fairness["rows"]
                                                       if r["attribute"] == attribute and r["finding"] == "mean"]
        for group in groups:
            reported, fnr = group["row"]["fnr"], group["fnr"]
            if reported is None:  # no positives of any finding in the group: no FNR, and none invented
                assert math.isnan(fnr.estimate)
            else:
                assert fnr.estimate == pytest.approx(reported)
                assert 0 <= fnr.low <= fnr.high <= 1


def test_the_reliability_diagram_bins_are_the_ece_bins():
    rng = np.random.default_rng(0)
    p = np.r_[0.0, 1.0, 0.1, rng.random(497)]
    y = (rng.random(500) < p).astype(int)
    bins = calibration_bins(y, p)
    index = np.minimum((p * 10).astype(int), 9)
    used = [b for b in range(10) if (index == b).any()]
    assert bins.count.tolist() == [int((index == b).sum()) for b in used]
    assert bins.positive_rate == pytest.approx([y[index == b].mean() for b in used])
    assert bins.mean_probability == pytest.approx([p[index == b].mean() for b in used])
    direct = sum((index == b).mean() * abs(y[index == b].mean() - p[index == b].mean()) for b in used)
    assert expected_calibration_error(y, p) == pytest.approx(direct, rel=1e-12)
