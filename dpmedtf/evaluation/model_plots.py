"""One model's figures as PNGs, drawn from nothing but the files its evaluation wrote (``layout.EvaluationDir``):

- ROC curve per finding, with the operating point of the validation-chosen threshold on test;
- reliability diagram per finding with its ECE (the fairness report's binning and definition);
- TP/FP/FN/TN at the threshold per finding;
- per subgroup attribute, AUROC and underdiagnosis (FNR) per group with bootstrap CIs, unreliable
  (flagged) groups greyed and hatched with their n.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.patches import Patch
from sklearn.metrics import roc_curve

from dpmedtf.evaluation.bootstrap import Interval
from dpmedtf.evaluation.fairness import calibration_bins, expected_calibration_error, with_attribute_columns
from dpmedtf.evaluation.metrics import observed
# pyplot from plots, which selects the Agg backend before pyplot loads: no display is ever needed.
from dpmedtf.evaluation.plots import COLOURS, error_bars, number, plt, save_figure, stamped
from dpmedtf.evaluation.rate_intervals import mean_rate_intervals, thresholded
from dpmedtf.layout import EvaluationDir

UNRELIABLE = "†"
"""Marks a group the fairness report flags (too few positives or negatives), in figures and in the report."""
GREY = "#b8b8b8"
PANELS_PER_ROW = 4


def draw_model_figures(files: EvaluationDir) -> list[Path]:
    """Every figure of one evaluated model, into its evaluation directory; returns their paths."""
    metrics = json.loads(files.metrics.read_text())
    fairness = json.loads(files.fairness_report.read_text())
    thresholds = json.loads(files.thresholds.read_text())
    test = pd.read_csv(files.predictions)
    findings, synthetic = list(metrics["findings"]), bool(metrics.get("synthetic_data"))
    bootstrap = metrics["bootstrap"]
    attributes = list(dict.fromkeys(r["attribute"] for r in fairness["rows"]))  # in the report's order
    return [roc_curves(test, metrics, files.roc_figure, synthetic),
            reliability_diagrams(test, findings, files.reliability_figure, synthetic),
            confusion_matrices(test, thresholds, files.confusion_figure, synthetic),
            *(subgroup_bars(fairness["rows"], test, thresholds, a, files.subgroup_figure(a), synthetic,
                            bootstrap["redraws"], bootstrap["seed"], grouping=fairness) for a in attributes)]



def _label(finding: str) -> str:
    return finding.replace("_", " ")


def _panels(count: int, size: tuple[float, float] = (2.6, 2.5)):
    """Small multiples, one panel per finding, surplus panels hidden."""
    columns = min(PANELS_PER_ROW, count)
    rows = math.ceil(count / columns)
    # At least a title's width: a binary task (one finding, e.g. the CT tumour label) is a single panel.
    fig, axes = plt.subplots(rows, columns, figsize=(max(6.8, size[0] * columns + 0.4), size[1] * rows + 0.9),
                             squeeze=False)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    return fig, axes.flat[:count]


def roc_curves(test: pd.DataFrame, metrics: dict, out: Path, synthetic: bool) -> Path:
    """Test ROC curve per finding; the dot is the validation threshold's (1 − specificity, sensitivity) on test."""
    fig, ax = plt.subplots(figsize=(8.6, 5.2))
    for colour, (finding, summary) in zip(COLOURS * 3, metrics["findings"].items()):
        y, p = observed(test, finding)
        if len(y) == 0 or y.min() == y.max():  # ROC and AUROC need both classes; say so instead of drawing nothing silently
            ax.plot([], [], color=colour, label=f"{_label(finding)}: not defined (one class in test)")
            continue
        auroc = Interval(number(summary["auroc"]), number(summary["auroc_ci_low"]), number(summary["auroc_ci_high"]))
        false_positive_rate, true_positive_rate, _ = roc_curve(y, p)
        ax.plot(false_positive_rate, true_positive_rate, color=colour, linewidth=1.3,
                label=f"{_label(finding)}: {auroc.estimate:.3f} [{auroc.low:.3f}, {auroc.high:.3f}]")
        sensitivity, specificity = number(summary["sensitivity"]), number(summary["specificity"])
        if math.isfinite(sensitivity) and math.isfinite(specificity):
            ax.plot(1 - specificity, sensitivity, "o", color=colour, markeredgecolor="black", markersize=6)
    ax.plot([0, 1], [0, 1], ":", color="grey", linewidth=0.8, label="chance (AUROC 0.5)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("1 − specificity (false-positive rate)")
    ax.set_ylabel("sensitivity (true-positive rate)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), title_fontsize=7,
              title="test AUROC [95% bootstrap CI]\n● operating point at the\nvalidation-chosen threshold")
    ax.set_title(stamped("ROC curves per finding (test split)", synthetic), fontsize=10)
    return save_figure(fig, out)


def reliability_diagrams(test: pd.DataFrame, findings: list[str], out: Path, synthetic: bool) -> Path:
    """Observed positive rate against mean predicted probability per bin; marker area ∝ images in the bin."""
    fig, axes = _panels(len(findings))
    errors = []
    for ax, colour, finding in zip(axes, COLOURS * 3, findings):
        y, p = observed(test, finding)
        bins = calibration_bins(y, p)
        errors.append(expected_calibration_error(y, p))
        ax.plot([0, 1], [0, 1], ":", color="grey", linewidth=0.8)
        ax.plot(bins.mean_probability, bins.positive_rate, "-", color=colour, linewidth=1)
        ax.scatter(bins.mean_probability, bins.positive_rate, s=12 + 180 * bins.count / bins.count.max(),
                   color=colour, edgecolor="black", linewidth=0.4, zorder=3)
        ax.set_xlim(0, 1)
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{_label(finding)}\nECE {errors[-1]:.3f}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes:
        ax.set_xlabel("mean predicted probability", fontsize=7)
        ax.set_ylabel("observed positive rate", fontsize=7)
    fig.suptitle(stamped(f"Reliability diagrams (test split), mean ECE {np.mean(errors):.3f}\n10 equal-width bins, "
                         "marker area ∝ images in the bin, dotted: perfect calibration", synthetic), fontsize=10)
    return save_figure(fig, out)


def confusion_matrices(test: pd.DataFrame, thresholds: dict[str, float], out: Path, synthetic: bool) -> Path:
    """Counts at the validation-chosen threshold; colour is the share of the true class, so the diagonal's
    shade reads as sensitivity (top) and specificity (bottom)."""
    findings = list(thresholds)
    fig, axes = _panels(len(findings), size=(2.6, 2.6))
    for ax, finding in zip(axes, findings):
        y, p = observed(test, finding)
        y, predicted = y.astype(bool), p >= thresholds[finding]
        counts = np.array([[(y & predicted).sum(), (y & ~predicted).sum()],      # TP FN
                           [(~y & predicted).sum(), (~y & ~predicted).sum()]])   # FP TN
        with np.errstate(invalid="ignore", divide="ignore"):
            share = counts / counts.sum(axis=1, keepdims=True)
        ax.imshow(np.nan_to_num(share), cmap="Blues", vmin=0, vmax=1)
        for (row, column), name in np.ndenumerate(np.array([["TP", "FN"], ["FP", "TN"]])):
            dark = np.nan_to_num(share[row, column]) > 0.6
            ax.text(column, row, f"{name}\n{counts[row, column]}", ha="center", va="center", fontsize=8,
                    color="white" if dark else "black")
        ax.set_xticks([0, 1], ["positive", "negative"], fontsize=7)
        ax.set_yticks([0, 1], ["positive", "negative"], fontsize=7)
        ax.set_xlabel("predicted", fontsize=7)
        ax.set_ylabel("true", fontsize=7)
        sensitivity, specificity = share[0, 0], share[1, 1]
        ax.set_title(f"{_label(finding)} (threshold {thresholds[finding]:.3g})\n"
                     f"sensitivity {sensitivity:.2f} · specificity {specificity:.2f}", fontsize=7.5)
    fig.suptitle(stamped("Test predictions at the validation-chosen (Youden) threshold", synthetic), fontsize=10)
    return save_figure(fig, out)


def subgroup_intervals(rows: list[dict], test: pd.DataFrame, thresholds: dict[str, float], attribute: str,
                       redraws: int, seed: int, grouping=None) -> list[dict]:
    """Per group of ``attribute`` (its "mean" row of the fairness report): the row, its AUROC interval as
    reported, and the FNR interval bootstrapped from the predictions with the evaluation's redraws.
    ``grouping``: the fairness report (or spec) naming the intersections."""
    frame = with_attribute_columns(test, grouping)
    groups = frame[attribute].astype(str).to_numpy()
    out = []
    for row in (r for r in rows if r["attribute"] == attribute and r["finding"] == "mean"):
        members = frame[groups == row["group"]]
        if members.empty:  # a group the CSV spells differently: show the reported FNR, invent no CI
            fnr = Interval(number(row["fnr"]), float("nan"), float("nan"))
        else:
            y, predicted = thresholded(members, thresholds)
            fnr = mean_rate_intervals(y, predicted, redraws, seed)["fnr"]
        out.append({"row": row, "fnr": fnr,
                    "auroc": Interval(number(row["auroc"]), number(row["auroc_ci_low"]), number(row["auroc_ci_high"]))})
    return out


def subgroup_bars(rows: list[dict], test: pd.DataFrame, thresholds: dict[str, float], attribute: str, out: Path,
                  synthetic: bool, redraws: int, seed: int, grouping=None) -> Path:
    """AUROC and underdiagnosis (FNR) per group, mean over findings, with 95% bootstrap CIs."""
    groups = subgroup_intervals(rows, test, thresholds, attribute, redraws, seed, grouping)
    flagged = [bool(g["row"].get("warning")) for g in groups]
    ticks = [f"{g['row']['group']}{UNRELIABLE if f else ''}\nn={g['row']['n']}" for g, f in zip(groups, flagged)]
    fig, axes = plt.subplots(1, 2, figsize=(3.5 + 2 * max(3.0, 0.85 * len(groups)), 4.6))
    at = np.arange(len(groups))
    panels = (("auroc", "AUROC (mean over findings)", 0.5), ("fnr", "underdiagnosis: false-negative rate (FNR)", None))
    for ax, (key, label, chance) in zip(axes, panels):
        intervals = [g[key] for g in groups]
        for x, unreliable, iv in zip(at, flagged, intervals):
            defined = not math.isnan(iv.estimate)
            ax.bar(x, iv.estimate if defined else 0, color=GREY if unreliable else COLOURS[0],
                   hatch="///" if unreliable else None, edgecolor="#666666" if unreliable else COLOURS[0])
            # The value at the bar's foot: a 0.00 bar is otherwise invisible, and whiskers cover the top.
            ax.text(x, 0.015, f"{iv.estimate:.2f}" if defined else "not\ndefined", ha="center", va="bottom",
                    fontsize=7, color="#222222", bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
        error_bars(ax, at, intervals, "black", linewidth=1)
        if chance is not None:
            ax.axhline(chance, color="grey", linestyle=":", linewidth=0.8)
        ax.set_xticks(at, ticks, fontsize=7, rotation=30 if len(groups) > 4 else 0)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(label, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    handles = [Patch(color=COLOURS[0], label="group (95% bootstrap CI)")] if not all(flagged) else []
    if any(flagged):
        handles.append(Patch(facecolor=GREY, hatch="///", edgecolor="#666666",
                             label=f"{UNRELIABLE} too few positives or negatives: unreliable"))
    axes[1].legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle(stamped(f"Subgroups by {attribute.replace('_', ' ')} (test split)", synthetic), fontsize=10)
    return save_figure(fig, out)
