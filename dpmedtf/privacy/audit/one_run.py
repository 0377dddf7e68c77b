"""The one-run canary estimator: an attacker's guesses about random canaries → a lower bound on ε.

Steinke, Nasr & Jagielski, "Privacy auditing with one (1) training run" (NeurIPS 2023), Theorem 5.2.
m canaries are each included in training with probability ½ by an independent secret coin. After
training the attacker scores every canary, guesses "included" for the r/2 highest scores and "excluded"
for the r/2 lowest, and abstains on the rest. If training is (ε, δ)-DP, the number W of correct guesses
among the r satisfies

    P[W ≥ v] ≤ P[Binomial(r, p) ≥ v] + 2mδ · max_{1≤i≤v} P[v − i ≤ Binomial(r, p) < v] / i,
    p = e^ε / (1 + e^ε)  (the accuracy of ε-DP randomised response).

A v that is improbable under that bound rejects "(ε, δ)-DP"; the largest ε rejected at level
1 − confidence is the lower bound. Several guess counts r are tried (a doubling grid), each tested at
(1 − confidence) / (number of r tried) — Bonferroni — so the best of them holds at the stated confidence,
not only for an r picked in hindsight. Ties in the scores are broken by canary index, which the coins do
not influence, so the guesses depend on the scores alone as the theorem requires.

This module knows nothing of training: it takes scores and the coins, and is tested against
simulated mechanisms whose ε is known in closed form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize, special, stats

DEFAULT_CONFIDENCE = 0.95
_EPSILON_CEILING = 200.0
"""No finite number of guesses rejects ε beyond this (p reaches 1 long before): the search stops here."""


def p_value(canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """Bound on P[≥ ``correct`` right out of ``guesses``] for an (ε, δ)-DP training run with ``canaries``."""
    if not 0 <= correct <= guesses <= canaries:
        raise ValueError(f"need 0 ≤ correct ({correct}) ≤ guesses ({guesses}) ≤ canaries ({canaries})")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need ε ≥ 0 and 0 ≤ δ ≤ 1, got ε={epsilon}, δ={delta}")
    if correct == 0:
        return 1.0
    p = special.expit(epsilon)
    tail = stats.binom.sf(correct - 1, guesses, p)  # P[Bin ≥ v]
    if delta == 0:
        return float(min(tail, 1.0))
    shifts = np.arange(1, correct + 1)
    below = stats.binom.sf(correct - shifts - 1, guesses, p) - tail  # P[v − i ≤ Bin < v]
    return float(min(tail + 2 * canaries * delta * np.max(below / shifts), 1.0))


def epsilon_lower_bound_for(canaries: int, guesses: int, correct: int, delta: float, significance: float) -> float:
    """The largest ε that ``correct`` right out of ``guesses`` rejects at ``significance`` (0 if none)."""
    if not 0 < significance < 1:
        raise ValueError(f"significance must be in (0, 1), got {significance}")

    def rejected_by(epsilon: float) -> float:  # > 0 while (ε, δ)-DP is still rejected
        return significance - p_value(canaries, guesses, correct, epsilon, delta)

    if rejected_by(0.0) <= 0:
        return 0.0
    low, high = 0.0, 1.0
    while rejected_by(high) > 0:
        low, high = high, 2 * high
        if high > _EPSILON_CEILING:
            return _EPSILON_CEILING
    return float(optimize.brentq(rejected_by, low, high, xtol=1e-6))


def guess_counts(canaries: int) -> tuple[int, ...]:
    """r = 2, 4, 8, … up to m, and m itself: the numbers of guesses tried (half "in", half "out")."""
    if canaries < 2:
        raise ValueError(f"an audit needs at least 2 canaries, got {canaries}")
    counts = [2 ** j for j in range(1, int(math.log2(canaries)) + 1)]
    even_all = canaries - canaries % 2
    return tuple(sorted(set(counts) | {even_all}))


@dataclass(frozen=True, kw_only=True)
class GuessOutcome:
    guesses: int
    correct_guesses: int
    epsilon_lower_bound: float


@dataclass(frozen=True, kw_only=True)
class OneRunBound:
    """The audit's result: the best bound over the guess counts tried, and each of them."""

    epsilon_lower_bound: float
    confidence: float
    delta: float
    canaries: int
    canaries_included: int
    guesses: int
    """Guesses (r) behind the reported bound."""
    correct_guesses: int
    significance_per_guess_count: float
    by_guesses: tuple[GuessOutcome, ...]
    ceiling: float
    """The bound a perfect attacker (every guess right) would reach with these canaries: no ε above it can be
    refuted by this audit, so a certified ε above the ceiling is one this audit cannot falsify."""


def correct_guesses(scores: np.ndarray, included: np.ndarray, guesses: int) -> int:
    """Right guesses when the ``guesses``/2 highest scores are called included and as many lowest excluded."""
    order = np.argsort(-np.asarray(scores, float), kind="stable")  # highest first, ties by canary index
    half = guesses // 2
    inside, outside = order[:half], order[len(order) - (guesses - half):]
    return int(included[inside].sum() + (~included[outside]).sum())


def audit_scores(scores, included, *, delta: float, confidence: float = DEFAULT_CONFIDENCE,
                 counts: tuple[int, ...] | None = None) -> OneRunBound:
    """The ε lower bound at ``confidence`` from canary ``scores`` (higher = more likely included)."""
    scores = np.asarray(scores, float)
    included = np.asarray(included, bool)
    if scores.shape != included.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and inclusion coins {included.shape} must be equal-length vectors")
    if not np.all(np.isfinite(scores)):
        raise ValueError("canary scores must be finite")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    m = len(scores)
    counts = counts or guess_counts(m)
    significance = (1 - confidence) / len(counts)
    outcomes = []
    for r in counts:
        v = correct_guesses(scores, included, r)
        outcomes.append(GuessOutcome(guesses=r, correct_guesses=v,
                                     epsilon_lower_bound=epsilon_lower_bound_for(m, r, v, delta, significance)))
    best = max(outcomes, key=lambda o: (o.epsilon_lower_bound, o.guesses))
    ceiling = max(epsilon_lower_bound_for(m, r, r, delta, significance) for r in counts)
    return OneRunBound(epsilon_lower_bound=best.epsilon_lower_bound, confidence=confidence, delta=delta, canaries=m,
                       canaries_included=int(included.sum()), guesses=best.guesses,
                       correct_guesses=best.correct_guesses, significance_per_guess_count=significance,
                       by_guesses=tuple(outcomes), ceiling=ceiling)
