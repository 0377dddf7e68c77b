"""The paper's figures as PNGs (matplotlib, no display needed): utility and fairness against ε, and the
canary audit's bound."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLOURS = plt.get_cmap("tab10").colors


def _dp_and_baseline(members):
    dp = sorted((m for m in members if m.epsilon is not None), key=lambda m: m.epsilon)
    baseline = next((m for m in members if m.epsilon is None), None)
    return dp, baseline


def _finish(ax, title: str, synthetic: bool, epsilons=()):
    ax.set_xscale("log")
    if epsilons:  # label the trained ε values themselves, not powers of ten
        ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(list(epsilons)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FixedFormatter([f"{e:g}" for e in epsilons]))
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("privacy budget ε (log scale)")
    ax.grid(alpha=0.3)
    ax.set_title(title + ("\nSYNTHETIC DATA — no clinical meaning" if synthetic else ""), fontsize=10)


def privacy_utility(members, out: Path, synthetic: bool) -> Path:
    """Mean AUROC, accuracy, sensitivity, specificity vs ε; the non-private values dashed (paper Fig. 2)."""
    dp, baseline = _dp_and_baseline(members)
    eps = [m.epsilon for m in dp]
    fig, ax = plt.subplots(figsize=(7.6, 4.2))
    for colour, key in zip(COLOURS, ("auroc", "accuracy", "sensitivity", "specificity")):
        ax.plot(eps, [m.metrics["mean"][key] for m in dp], "o-", color=colour, label=key)
        if baseline is not None:
            ax.axhline(baseline.metrics["mean"][key], color=colour, linestyle="--", linewidth=1)
    if dp and "auroc_ci_low" in dp[0].metrics["mean"]:
        ax.fill_between(eps, [m.metrics["mean"]["auroc_ci_low"] for m in dp],
                        [m.metrics["mean"]["auroc_ci_high"] for m in dp], color=COLOURS[0], alpha=0.15)
    ax.set_ylabel("mean over findings (test)")
    ax.legend(fontsize=8, title="dashed: non-private", title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    _finish(ax, "Privacy–utility trade-off", synthetic, eps)
    return _save(fig, out)


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
    return _save(fig, out)


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
    axes[1].set_ylabel("statistical parity difference")
    axes[1].axhline(0, color="black", linewidth=0.6)
    for ax, title in zip(axes, (f"AUROC by {attribute}", f"Parity by {attribute}")):
        _finish(ax, title, synthetic, [m.epsilon for m in dp])
    axes[0].legend(fontsize=7)
    return _save(fig, out)


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
    ax.set_title("Canary audit: measured ε lower bound vs certified ε"
                 + ("\nSYNTHETIC DATA — no clinical meaning" if synthetic else ""), fontsize=10)
    return _save(fig, out)


def _save(fig, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
