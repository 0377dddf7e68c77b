"""Patient-level ε from record-level DP: group privacy for a patient with up to k images.

When the sampler draws images, one patient with k images in the training set differs from the
dataset without them by k add-or-remove-one steps. If the mechanism is (ε, δ)-DP per image, chaining
those k steps (Vadhan 2017, "The complexity of differential privacy", Lemma 2.2, in the tighter form
of the penultimate line of its proof) makes it (k·ε, δ·(e^{kε} − 1)/(e^ε − 1))-DP per patient.

Every image-level (ε, δ) pair on the accountant's curve gives such a patient-level pair, so we search
the curve for the image δ whose patient δ equals the requested one; the patient ε is then k times the
image ε there. This is tensorflow-privacy's approach for DP-SGD, applied here to any DpEvent with
dpmedtf's accountants (PLD by default), and the returned pair is checked to keep the requested δ.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable

import dp_accounting
from scipy import optimize

from dpmedtf.errors import PrivacyParameterError
from dpmedtf.privacy.accounting import ACCOUNTANTS, make_accountant

LEMMA = "Vadhan 2017 Lemma 2.2"
# The search for the image δ stops here: below it an image δ is no longer a usable float, so a
# patient bound that needs a smaller one is reported as infinite.
_SMALLEST_EXAMPLE_LOG_DELTA = math.log(1e-300)
# Brent's tolerance on log(image δ). 1e-10 moves the image ε (hence the patient ε) far less than any
# printed digit, and costs few more accountant queries than a coarser one.
_LOG_DELTA_TOLERANCE = 1e-10
# Steps of the careful search below the first infinite example ε before it gives up (reporting ε = ∞).
_CAREFUL_STEPS = 60


@dataclass(frozen=True)
class GroupPrivacy:
    """A group-level (ε, δ) guarantee derived from the record-level guarantee of one DpEvent."""

    epsilon: float
    """ε for the group (patient): k · example_epsilon; math.inf when no finite bound exists."""
    delta: float
    """The requested group δ."""
    group_size: int
    """k: the most records (images) one group (patient) has in the dataset."""
    example_epsilon: float
    """ε per record at example_delta, from the accountant."""
    example_delta: float
    """The record δ the search settled on (for k = 1 the requested δ; for an infinite bound the last tried)."""
    achieved_delta: float
    """Group δ the lemma gives at ``epsilon``: example_delta · (e^{kε} − 1)/(e^ε − 1), never above ``delta``
    (for k = 1, and for an infinite ε, which holds at any δ, it is ``delta``)."""
    method: str
    """The bound used, in a few words, for certificates and reports."""
    accountant: str
    """The accountant that produced example_epsilon ("pld" or "rdp")."""


def patient_level(ledger) -> dict:
    """The guarantee for all images of one patient, from a training ledger: the certified ε itself when
    the unit of privacy is the patient, else group privacy over the most images one patient has in the
    training split. Group privacy needs the image-level ε at a tiny δ, where PLD's discretised tail gives
    up (∞) while RDP still bounds it; both are valid upper bounds, so the smaller one is stated."""
    notes = ledger.notes
    event = ledger.dp_event()
    if ledger.unit_of_privacy == "patient":
        k = notes.get("max_images_per_patient_per_step") or 1
        return {"epsilon": ledger.epsilon(), "delta": ledger.delta,
                "max_images_per_patient": notes.get("images_per_patient_max"),
                "method": f"the unit of privacy is the patient: a sampled patient contributes at most {k} image(s) "
                          f"to a step, each clipped to C/{k}, so the patient's whole contribution to a step is "
                          "clipped to C"}
    if notes.get("images_per_patient_max") is None:  # e.g. make_private without max_examples_per_person
        return {"epsilon": None, "delta": ledger.delta, "max_images_per_patient": None,
                "method": "not bounded: how many training examples one person contributes was not stated"}
    k = int(notes["images_per_patient_max"])
    bounds = [group_epsilon(event, ledger.delta, k, accountant) for accountant in ("pld", "rdp")]
    group = min(bounds, key=lambda g: g.epsilon)
    return {"epsilon": group.epsilon if math.isfinite(group.epsilon) else None,  # None: no finite bound exists
            "delta": group.delta, "max_images_per_patient": k, "method": group.method,
            "by_accountant": {g.accountant: g.epsilon if math.isfinite(g.epsilon) else None for g in bounds}}


def group_epsilon(event: dp_accounting.DpEvent, delta: float, group_size: int,
                  accountant: str = "pld") -> GroupPrivacy:
    """ε at δ for groups of up to ``group_size`` records, under add-or-remove-one-record accounting of ``event``."""
    _check_arguments(event, delta, group_size, accountant)
    example_epsilon_at = _example_epsilon_curve(event, accountant)
    k = int(group_size)

    if k == 1:
        eps = example_epsilon_at(delta)
        return GroupPrivacy(eps, delta, 1, eps, delta, delta,
                            f"{accountant} example-level ε (a group of one record needs no group privacy)",
                            accountant)

    target_log_delta = math.log(delta)

    def log_group_delta(log_example_delta: float) -> float:
        return log_example_delta + _log_group_delta_factor(example_epsilon_at(math.exp(log_example_delta)), k)

    def gap(log_example_delta: float) -> float:
        return log_group_delta(log_example_delta) - target_log_delta

    def group_delta(log_example_delta: float) -> float:
        return math.exp(log_group_delta(log_example_delta))

    def no_finite_bound(log_example_delta: float, why: str) -> GroupPrivacy:
        example_delta = math.exp(log_example_delta)
        return GroupPrivacy(math.inf, delta, k, example_epsilon_at(example_delta), example_delta, delta,
                            f"{LEMMA} on {accountant} example-level ε: no finite bound ({why})", accountant)

    # The factor (e^{kε} − 1)/(e^ε − 1) is ≥ k, so the example δ must lie below the group δ: the search
    # starts there and walks down.
    low, high, why = _bracket(gap, target_log_delta)
    if why is not None:
        return no_finite_bound(high, why)

    root, result = optimize.brentq(gap, low, high, xtol=_LOG_DELTA_TOLERANCE, full_output=True)
    if not result.converged:
        raise PrivacyParameterError(f"group privacy: the search for the example δ did not converge ({result.flag})")
    # Brent's answer may sit a hair on the high side of the root (group δ slightly above the target):
    # step toward smaller example δ, never past the bracket's low end, whose group δ is below target.
    step = _LOG_DELTA_TOLERANCE
    while group_delta(root) > delta and root > low:
        root = max(low, root - step)
        step *= 2
    achieved = group_delta(root)
    if not achieved <= delta:
        raise PrivacyParameterError(  # a failed self-check, not a user error: never report this ε
            f"group privacy could not be verified: example δ = {math.exp(root):g} gives group δ "
            f"{achieved:g} > requested {delta:g}")
    example_delta = math.exp(root)
    example_eps = example_epsilon_at(example_delta)
    return GroupPrivacy(k * example_eps, delta, k, example_eps, example_delta, achieved,
                        f"{LEMMA} on {accountant} example-level ε", accountant)


def _bracket(gap: Callable[[float], float], high: float) -> tuple[float, float, str | None]:
    """Log example δs (low, high) with gap(low) ≤ 0 < gap(high), searching down from ``high``.

    Example ε never falls as example δ falls, so for x' < x: gap(x') ≥ gap(x) − (x − x'). A positive
    gap(x) thus rules out every root in (x − gap(x), x]; a non-positive one admits all of [x, x − gap(x)].
    Returns (low, high, None), or (nan, x, why) when no example δ keeps the group δ (checked down to e^x).
    """
    if not math.isfinite(gap(high)):
        return math.nan, high, "the example ε is infinite already at example δ = group δ"
    while True:
        # A decade past what the bound above rules out, as tensorflow-privacy steps.
        low = high - gap(high) - math.log(10)
        if low < _SMALLEST_EXAMPLE_LOG_DELTA:
            return math.nan, low, "the group δ stays above the target for every example δ ≥ 1e-300"
        if gap(low) <= 0:
            break
        if not math.isfinite(gap(low)):
            # The accountant's ε is infinite at e^low (PLD: below the tail mass it rounds up to ε = ∞),
            # and the decade step may have jumped over a root: go down in steps that skip none.
            return _careful_bracket(gap, high)
        high = low
    raised = low - gap(low)
    if raised < high and gap(raised) <= 0:
        low = raised
    return low, high, None


def _careful_bracket(gap: Callable[[float], float], x: float) -> tuple[float, float, str | None]:
    """Like ``_bracket`` from x (gap(x) finite > 0), when example ε is infinite somewhere below x.

    Steps x → x − gap(x) skip no root; they only end (at an infinite ε, below which every ε is infinite)
    when there is none, since each is at least the least gap. Near a root they slow down without
    crossing it, so each step also probes further ahead, a little further every time.
    """
    for attempt in range(_CAREFUL_STEPS):
        probe = x - 2 ** (attempt + 1) * gap(x)
        if probe >= _SMALLEST_EXAMPLE_LOG_DELTA and gap(probe) <= 0:
            return probe, x, None
        step = x - gap(x)
        if gap(step) <= 0:
            return step, x, None
        if not math.isfinite(gap(step)):
            return math.nan, step, ("the example ε is infinite below this example δ, "
                                    "and above it the group δ stays over the target")
        x = step
    return math.nan, x, f"no example δ keeping the group δ found in {_CAREFUL_STEPS} careful steps"


def _check_arguments(event: dp_accounting.DpEvent, delta: float, group_size: int, accountant: str) -> None:
    if not isinstance(event, dp_accounting.DpEvent):
        raise PrivacyParameterError(f"group privacy needs a dp_accounting DpEvent, got {type(event).__name__}")
    if not (isinstance(delta, (int, float)) and not isinstance(delta, bool) and math.isfinite(delta)
            and 0 < delta < 1):
        raise PrivacyParameterError(f"delta must be a number in (0, 1), got {delta!r}")
    if not isinstance(group_size, numbers.Integral) or isinstance(group_size, bool) or group_size < 1:
        raise PrivacyParameterError(
            f"group size must be a whole number ≥ 1 (the most images one patient has), got {group_size!r}")
    if accountant not in ACCOUNTANTS:
        raise PrivacyParameterError(f"unknown accountant {accountant!r}; choose one of {', '.join(ACCOUNTANTS)}")
    if not make_accountant(accountant).supports(event):
        raise PrivacyParameterError(
            f"the {accountant} accountant cannot account for {event!r}; "
            f"use the other accountant ({', '.join(a for a in ACCOUNTANTS if a != accountant)}) or a supported event")


def _example_epsilon_curve(event: dp_accounting.DpEvent, accountant: str) -> Callable[[float], float]:
    """δ ↦ record-level ε of ``event``, equal to ``accounting.epsilon_of_event(event, δ, accountant)[0]``.

    The search asks for ε at a few dozen δ. Composing the event is the expensive part (about 1.4 s
    for the paper's 180k-step PLD), querying the composed accountant is not (≤ 0.05 s), so the event
    is composed once here with the same accountant ``epsilon_of_event`` builds, and each answer is
    cached.
    """
    composed = make_accountant(accountant).compose(event)
    cache: dict[float, float] = {}

    def epsilon_at(example_delta: float) -> float:
        if example_delta not in cache:
            if accountant == "rdp":  # the call epsilon_of_event makes for RDP
                eps = composed.get_epsilon_and_optimal_order(example_delta)[0]
            else:
                eps = composed.get_epsilon(example_delta)
            cache[example_delta] = float(eps)
        return cache[example_delta]

    return epsilon_at


def _log_group_delta_factor(example_epsilon: float, k: int) -> float:
    """log((e^{kε} − 1)/(e^ε − 1)) = log(1 + e^ε + … + e^{(k−1)ε}), stable for small and large ε."""
    if math.isinf(example_epsilon):
        return math.inf
    if example_epsilon <= 0:
        return math.log(k)
    return _log_expm1(k * example_epsilon) - _log_expm1(example_epsilon)


def _log_expm1(x: float) -> float:
    """log(e^x − 1) for x > 0, without overflow for large x or cancellation for small x."""
    return x + math.log(-math.expm1(-x))
