"""The paper's figures of a sweep as PNGs (matplotlib, no display needed): utility and fairness against ε,
the paired DP-vs-non-private AUROC differences, and the canary audit's bound. Also the house style every
figure shares (the SYNTHETIC stamp, saving); one model's own figures are in ``model_plots``."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import matplotlib.ticker
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dpmedtf.evaluation.bootstrap import Interval  # noqa: E402
from dpmedtf.evaluation.rate_intervals import mean_rate_intervals, thresholded  # noqa: E402

COLOURS = plt.get_cmap("tab10").colors
SYNTHETIC_STAMP = "SYNTHETIC DATA — no clinical meaning"
SIGNIFICANCE = 0.05


def stamped(title: str, synthetic: bool) -> str:
    """``title``, with the SYNTHETIC stamp under it when the data is generated: a figure copied out of the
    report must still say so."""
    return title + (f"\n{SYNTHETIC_STAMP}" if synthetic else "")


def number(value) -> float:
    """A JSON number for plotting: null (what json_safe wrote for NaN) becomes NaN."""
    return float("nan") if value is None else float(value)


def error_bars(ax, positions, intervals: list[Interval], colour, horizontal: bool = False, **style) -> None:
    """CI whiskers where a CI exists; none (rather than a zero-length one) where it does not."""
    keep = [i for i, iv in enumerate(intervals) if math.isfinite(iv.low) and math.isfinite(iv.high)]
    if not keep:
        return
    centre = np.array([intervals[i].estimate for i in keep])
    spread = np.array([[centre[k] - intervals[i].low for k, i in enumerate(keep)],
                       [intervals[i].high - centre[k] for k, i in enumerate(keep)]]).clip(min=0)
    at = np.asarray(positions, float)[keep]
    if horizontal:
        ax.errorbar(centre, at, xerr=spread, fmt="none", ecolor=colour, capsize=3, **style)
    else:
        ax.errorbar(at, centre, yerr=spread, fmt="none", ecolor=colour, capsize=3, **style)


def _dp_and_baseline(members):
    dp = sorted((m for m in members if m.epsilon is not None), key=lambda m: m.epsilon)
    baseline = next((m for m in members if m.epsilon is None), None)
    return dp, baseline


def _finish(ax, title: str, synthetic: bool, epsilons=()):
    ax.set_xscale("log")
    if epsilons:  # label the trained ε values themselves, not powers of ten
        ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(list(epsilons)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FixedFormatter([f"{e:.3g}" for e in epsilons]))
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("privacy budget ε (log scale)")
    ax.grid(alpha=0.3)
    ax.set_title(stamped(title, synthetic), fontsize=10)


UTILITY = (("auroc", "AUROC"), ("sensitivity", "sensitivity"), ("specificity", "specificity"),
           ("accuracy", "accuracy"))


def utility_intervals(member) -> dict[str, Interval]:
    """A model's mean-over-findings test AUROC (its CI from metrics.json) and its sensitivity, specificity and
    accuracy at the validation thresholds, with CIs from the evaluation's own bootstrap redraws."""
    metrics = member.metrics
    y, predicted = thresholded(member.predictions, {f: m["threshold"] for f, m in metrics["findings"].items()})
    rates = mean_rate_intervals(y, predicted, metrics["bootstrap"]["redraws"], metrics["bootstrap"]["seed"])
    mean = metrics["mean"]
    return {"auroc": Interval(number(mean["auroc"]), number(mean.get("auroc_ci_low")), number(mean.get("auroc_ci_high"))),
            **rates}


def privacy_utility(members, out: Path, synthetic: bool) -> Path:
    """Mean AUROC, sensitivity, specificity and accuracy vs ε with 95% bootstrap CIs; the non-private model
    dashed, its CI a band (paper Fig. 2)."""
    dp, baseline = _dp_and_baseline(members)
    eps = [m.epsilon for m in dp]
    intervals = {m.name: utility_intervals(m) for m in members}
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.6))
    for ax, colour, (key, label) in zip(axes.flat, COLOURS, UTILITY):
        points = [intervals[m.name][key] for m in dp]
        ax.plot(eps, [p.estimate for p in points], "o-", color=colour, label="DP-SGD, 95% CI")
        error_bars(ax, eps, points, colour)
        if baseline is not None:
            base = intervals[baseline.name][key]
            ax.axhline(base.estimate, color=colour, linestyle="--", linewidth=1, label="non-private")
            if math.isfinite(base.low) and math.isfinite(base.high):
                ax.axhspan(base.low, base.high, color=colour, alpha=0.12, label="non-private 95% CI")
        ax.set_ylabel(f"mean {label} over findings")
        ax.legend(fontsize=7)
        _finish(ax, f"{label} (test split)", False, eps)
    fig.suptitle(stamped("Privacy–utility trade-off", synthetic), fontsize=11)
    return save_figure(fig, out)


def per_finding_auroc(members, findings, out: Path, synthetic: bool) -> Path:
    """Each finding's AUROC vs ε, non-private dashed (paper Fig. 3)."""
    dp, baseline = _dp_and_baseline(members)
    fig, ax = plt.subplots(figsize=(8.4, 4.6))
    for colour, finding in zip(COLOURS * 2, findings):
        ax.plot([m.epsilon for m in dp], [m.metrics["findings"][finding]["auroc"] for m in dp], "o-", color=colour,
                label=finding.replace("_", " "))
        if baseline is not None:
            ax.axhline(baseline.metrics["findings"][finding]["auroc"], color=colour, linestyle="--", linewidth=0.8)
    ax.set_ylabel("test AUROC")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), title="dashed: non-private", title_fontsize=7)
    _finish(ax, "AUROC per finding", synthetic, [m.epsilon for m in dp])
    return save_figure(fig, out)


def subgroups(members, attribute: str, out: Path, synthetic: bool) -> Path:
    """Mean-over-findings AUROC and statistical parity difference per group vs ε (paper Figs. 4–5)."""
    dp, baseline = _dp_and_baseline(members)

    def rows(member):
        return {r["group"]: r for r in member.fairness["rows"] if r["attribute"] == attribute and r["finding"] == "mean"}

    groups = sorted(rows(dp[0] if dp else baseline))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for colour, group in zip(COLOURS * 3, groups):
        for ax, key in zip(axes, ("auroc", "statistical_parity_difference")):
            ax.plot([m.epsilon for m in dp], [rows(m).get(group, {}).get(key) for m in dp], "o-", color=colour, label=group)
            if baseline is not None and rows(baseline).get(group, {}).get(key) is not None:
                ax.axhline(rows(baseline)[group][key], color=colour, linestyle="--", linewidth=0.8)
    axes[0].set_ylabel("test AUROC (mean over findings)")
    axes[1].set_ylabel("accuracy parity difference (group − rest)")
    axes[1].axhline(0, color="black", linewidth=0.6)
    for ax, title in zip(axes, (f"AUROC by {attribute}", f"Accuracy parity by {attribute}")):
        _finish(ax, title, synthetic, [m.epsilon for m in dp])
    axes[0].legend(fontsize=7)
    return save_figure(fig, out)


def audit_bound(by_guesses, certified_epsilon: float, confidence: float, kind: str, out: Path,
                synthetic: bool) -> Path:
    """The canary audit's ε lower bound for each number of guesses, under the certified ε (a line)."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    guesses = [o["guesses"] for o in by_guesses]
    ax.plot(guesses, [o["epsilon_lower_bound"] for o in by_guesses], "o-", color=COLOURS[0],
            label=f"measured lower bound ({confidence:.0%} confidence, {kind})")
    ax.axhline(certified_epsilon, color=COLOURS[3], linestyle="--", label=f"certified ε = {certified_epsilon:.3g}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("guesses (half 'included', half 'excluded'; log scale)")
    ax.set_ylabel("ε")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(stamped("Canary audit: measured ε lower bound vs certified ε", synthetic), fontsize=10)
    return save_figure(fig, out)


def paired_differences(sweep: dict, out: Path, synthetic: bool) -> Path | None:
    """Per finding, each DP model's AUROC minus the non-private model's on the same test images, with the
    paired-bootstrap 95% CI and DeLong's p (``sweep.analyse_sweep``); None when there is no non-private model."""
    compared = [m for m in sweep["models"] if m.get("versus_non_private")]
    if not compared:
        return None
    findings = list(sweep["findings"])
    fig, ax = plt.subplots(figsize=(8.8, 1.6 + 0.5 * len(findings) * max(1, len(compared)) ** 0.5))
    width = 0.6 / len(compared)  # the models of one finding share its row, side by side
    for k, (colour, model) in enumerate(zip(COLOURS, compared)):
        rows, intervals, p_values = [], [], []
        for i, finding in enumerate(findings):
            test = model["versus_non_private"].get(finding)
            if test is None:  # fewer than two positives or negatives: no test was run, say so in its row
                ax.annotate("not tested (< 2 positives or negatives)", (0, i - 0.3 + width * (k + 0.5)),
                            xytext=(4, 0), textcoords="offset points", fontsize=6.5, va="center", color=colour)
                continue
            rows.append(i - 0.3 + width * (k + 0.5))
            intervals.append(Interval(number(test["auroc_difference"]), number(test["ci_low"]), number(test["ci_high"])))
            p_values.append(number(test["p_delong"]))
        significant = np.array(p_values) < SIGNIFICANCE
        centre = np.array([iv.estimate for iv in intervals])
        ax.scatter(centre, rows, color=colour, zorder=3, label=f"ε = {model['epsilon']:.3g}",
                   facecolors=[colour if s else "white" for s in significant])
        error_bars(ax, rows, intervals, colour, horizontal=True)
        for row, iv, p in zip(rows, intervals, p_values):
            right = iv.high if math.isfinite(iv.high) else iv.estimate
            ax.annotate(f"p = {p:.2g}", (right, row), xytext=(4, 0), textcoords="offset points", fontsize=6.5,
                        va="center", color=colour)
    ax.axvline(0, color="black", linewidth=0.7)
    ax.margins(x=0.15)  # room for the p-value labels right of the whiskers
    ax.set_yticks(range(len(findings)), [f.replace("_", " ") for f in findings], fontsize=8)
    ax.set_ylim(len(findings) - 0.5, -0.5)
    ax.set_xlabel("test AUROC difference, DP − non-private (95% paired-bootstrap CI)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1),
              title=f"filled: DeLong p < {SIGNIFICANCE:g}", title_fontsize=7)
    ax.set_title(stamped("Paired DP vs non-private AUROC per finding", synthetic), fontsize=10)
    return save_figure(fig, out)


def save_figure(fig, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
