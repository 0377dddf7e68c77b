"""Privacy accounting for DP-SGD with Poisson sampling, on Google's ``dp_accounting``.

One DP-SGD run is the DpEvent ``SelfComposed(PoissonSampled(q, Gaussian(σ)), steps)``: every step each
record joins the batch independently with probability q = B/N, the clipped gradient sum gets Gaussian
noise of standard deviation σ·C, and the steps compose. Both accountants here consume exactly that
event, and the event itself is returned so the privacy certificate can carry what was accounted.

The neighbouring relation is add-or-remove-one record, the relation under which Poisson sampling's
amplification holds; a "record" is whatever the data path samples (an image, or a patient).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import dp_accounting
from dp_accounting import dp_event as dp_event_module
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from scipy import optimize

from dpmedtf.errors import PrivacyParameterError

Accountant = Literal["rdp", "pld"]
# dp_accounting's PLD default grid. Its discretisation is pessimistic (ε is rounded up, never down), so
# a coarser grid only loosens the bound; the value is fixed here so certificates are recomputable.
PLD_DISCRETIZATION = 1e-4
ACCOUNTANTS: tuple[str, ...] = ("rdp", "pld")
NEIGHBORING_RELATION = "add_or_remove_one"
SAMPLING = "poisson"

# Calibration searches σ in this range. Below 1e-3 the noise is negligible against any clip norm
# (no meaningful privacy); above 1e4 the RDP bound no longer falls, so a target it has not reached
# by then cannot be reached at all.
SIGMA_SEARCH_MIN = 1e-3
SIGMA_SEARCH_MAX = 1e4
DEFAULT_SIGMA_TOLERANCE = 1e-5
# brentq needs finite values; an infinite ε (σ far too small) is simply "far above any target".
_EPSILON_CAP = 1e12


@dataclass(frozen=True)
class DpSgdSchedule:
    """What a DP-SGD run does, in the terms the accountant needs."""

    dataset_size: int
    """N: records the sampler draws from (images, or patients for patient-level privacy)."""
    batch_size: int
    """B: expected logical batch size; with Poisson sampling each step's size varies around it."""
    steps: int
    """Optimizer steps, one Poisson-sampled batch each."""
    noise_multiplier: float
    """σ: standard deviation of the added Gaussian noise divided by the clip norm."""

    def __post_init__(self) -> None:
        check_sampling(self.dataset_size, self.batch_size)
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise PrivacyParameterError(f"steps must be a whole number ≥ 1, got {self.steps!r}")
        if not (isinstance(self.noise_multiplier, (int, float)) and math.isfinite(self.noise_multiplier)
                and self.noise_multiplier > 0):
            raise PrivacyParameterError(
                f"noise multiplier must be a finite number > 0, got {self.noise_multiplier!r}; "
                "σ = 0 means no privacy (train with privacy disabled instead)")

    @property
    def sampling_rate(self) -> float:
        """q = B/N, the per-step inclusion probability of every record."""
        return self.batch_size / self.dataset_size

    @property
    def epochs(self) -> float:
        """Expected passes over the data: steps · q."""
        return self.steps * self.sampling_rate

    def dp_event(self) -> dp_accounting.DpEvent:
        return dp_sgd_event(self.sampling_rate, self.noise_multiplier, self.steps)


@dataclass(frozen=True)
class PrivacyAccounting:
    """ε at δ for a schedule, by one accountant, with the DpEvent that was accounted."""

    schedule: DpSgdSchedule
    delta: float
    epsilon: float
    accountant: str
    details: dict[str, Any] = field(default_factory=dict)
    """Accountant-specific facts (e.g. the optimal RDP order)."""

    def to_json_dict(self) -> dict[str, Any]:
        s = self.schedule
        return {
            "epsilon": self.epsilon,
            "delta": self.delta,
            "noise_multiplier": s.noise_multiplier,
            "sampling_rate": s.sampling_rate,
            "steps": s.steps,
            "epochs": s.epochs,
            "batch_size": s.batch_size,
            "dataset_size": s.dataset_size,
            "accountant": self.accountant,
            "sampling": SAMPLING,
            "neighboring_relation": NEIGHBORING_RELATION,
            **self.details,
            "dp_event": dp_event_to_json(s.dp_event()),
        }


@dataclass(frozen=True)
class NoiseCalibration:
    """The smallest σ whose ε at δ is at most the target, and the evidence that it is."""

    accounting: PrivacyAccounting
    """ε recomputed from scratch at the returned σ (≤ target)."""
    target_epsilon: float
    sigma_tolerance: float
    """The returned σ is within this of the smallest σ that reaches the target."""
    epsilon_below_tolerance: float
    """ε at σ − tolerance: above the target, which shows σ is (within tolerance) the smallest."""

    def to_json_dict(self) -> dict[str, Any]:
        return {
            **self.accounting.to_json_dict(),
            "target_epsilon": self.target_epsilon,
            "calibration": {
                "sigma_tolerance": self.sigma_tolerance,
                "epsilon_at_sigma": self.accounting.epsilon,
                "epsilon_at_sigma_minus_tolerance": self.epsilon_below_tolerance,
            },
        }


def check_sampling(dataset_size: int, batch_size: int) -> None:
    """Refuses sizes for which q = B/N is not a probability of a real sampler."""
    for name, value in (("dataset size", dataset_size), ("batch size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise PrivacyParameterError(f"{name} must be a whole number ≥ 1, got {value!r}")
    if batch_size > dataset_size:
        raise PrivacyParameterError(
            f"batch size {batch_size} exceeds dataset size {dataset_size}: the sampling rate B/N "
            "would be above 1; use a batch size ≤ the number of records")


def check_delta(delta: float, dataset_size: int, allow_large_delta: bool = False) -> None:
    """δ must be a probability, and below 1/N unless the user explicitly accepts the risk."""
    if not (isinstance(delta, (int, float)) and math.isfinite(delta) and 0 < delta < 1):
        raise PrivacyParameterError(f"delta must be a number in (0, 1), got {delta!r}")
    if delta >= 1.0 / dataset_size and not allow_large_delta:
        raise PrivacyParameterError(
            f"delta {delta:g} ≥ 1/N = {1.0 / dataset_size:.3g} (N = {dataset_size}): a mechanism that "
            "publishes one whole random record satisfies such a δ; choose δ < 1/N (the paper uses "
            "6e-6 for 153,502 images) or pass the explicit override if you accept this")


def steps_for_epochs(dataset_size: int, batch_size: int, epochs: float) -> int:
    """ceil(E·N/B): the steps that make E expected passes over N records at batch size B."""
    check_sampling(dataset_size, batch_size)
    if not (isinstance(epochs, (int, float)) and math.isfinite(epochs) and epochs > 0):
        raise PrivacyParameterError(f"epochs must be a number > 0, got {epochs!r}")
    # Round before ceil so that e.g. 150·N/B computed as 179885.00000000003 does not add a step.
    return max(1, math.ceil(round(epochs * dataset_size / batch_size, 9)))


def dp_sgd_event(sampling_rate: float, noise_multiplier: float, steps: int) -> dp_accounting.DpEvent:
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)),
        steps)


def make_accountant(accountant: str) -> dp_accounting.PrivacyAccountant:
    relation = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    if accountant == "rdp":
        return rdp_privacy_accountant.RdpAccountant(neighboring_relation=relation)
    if accountant == "pld":
        return pld_privacy_accountant.PLDAccountant(neighboring_relation=relation,
                                                    value_discretization_interval=PLD_DISCRETIZATION)
    raise PrivacyParameterError(f"unknown accountant {accountant!r}; choose one of {', '.join(ACCOUNTANTS)}")


_EPSILON_CACHE: dict[tuple[str, float, str], tuple[float, dict]] = {}
_EPSILON_CACHE_SIZE = 256


def epsilon_of_event(event: dp_accounting.DpEvent, delta: float, accountant: str) -> tuple[float, dict]:
    """ε at δ of any DpEvent (also used to re-check a certificate's serialised event).

    Remembered per (event, δ, accountant) within a process: a release asks for the same ledger's ε
    several times (certificate, mechanisms, patient level), and one PLD evaluation costs seconds."""
    key = (json.dumps(dp_event_to_json(event), sort_keys=True), float(delta), accountant)
    if key not in _EPSILON_CACHE:
        if len(_EPSILON_CACHE) >= _EPSILON_CACHE_SIZE:
            _EPSILON_CACHE.pop(next(iter(_EPSILON_CACHE)))
        _EPSILON_CACHE[key] = _epsilon_of_event(event, delta, accountant)
    epsilon, details = _EPSILON_CACHE[key]
    return epsilon, dict(details)


MAX_ACCOUNTED_EPSILON = 1000.0
"""Above this (by the cheap RDP bound) PLD is not attempted: its grid grows with the privacy loss until
it takes minutes and gigabytes (σ = 0.01 exhausts memory), for an ε that means no privacy anyway."""


class EpsilonOutOfRangeError(PrivacyParameterError):
    """A schedule so extreme that the accountant cannot evaluate it."""


class EpsilonTooLargeError(EpsilonOutOfRangeError):
    """ε above ``MAX_ACCOUNTED_EPSILON``: far too little noise for any meaningful guarantee."""


def _epsilon_of_event(event: dp_accounting.DpEvent, delta: float, accountant: str) -> tuple[float, dict]:
    try:
        if accountant == "pld":
            _refuse_unresolvable(event, delta)
        acc = make_accountant(accountant).compose(event)
        if accountant == "rdp":
            eps, order = acc.get_epsilon_and_optimal_order(delta)
            return float(eps), {"rdp_optimal_order": float(order)}
        return float(acc.get_epsilon(delta)), {}
    except PrivacyParameterError:
        raise
    except (ArithmeticError, ValueError, TypeError, MemoryError) as exc:  # dp_accounting on extreme inputs
        raise EpsilonOutOfRangeError(
            f"the {accountant} accountant cannot evaluate this schedule at δ = {delta:g} ({type(exc).__name__}: "
            f"{exc}); use a noise multiplier between {SIGMA_SEARCH_MIN:g} and {SIGMA_SEARCH_MAX:g}, a realistic "
            "number of steps and δ well above 1e-100") from None


def _refuse_unresolvable(event: dp_accounting.DpEvent, delta: float) -> None:
    rdp = make_accountant("rdp")
    if not rdp.supports(event):
        return
    bound = rdp.compose(event).get_epsilon(delta)
    if not bound <= MAX_ACCOUNTED_EPSILON:
        raise EpsilonTooLargeError(
            f"ε would exceed {MAX_ACCOUNTED_EPSILON:g} (RDP bound {bound:.4g} at δ = {delta:g}): such a run gives no "
            "meaningful privacy, and the PLD accountant would need minutes and gigabytes to say how little; add "
            "noise (a larger noise multiplier), take fewer steps or a smaller sampling rate, or ask the rdp "
            "accountant for its loose value")


DEFAULT_ACCOUNTANT = "pld"
"""PLD (privacy loss distributions) is tight where RDP's conversion to (ε, δ) is loose: for the same ε it
needs less noise. JAX Privacy defaults to it; Opacus to PRV, its numerical twin. RDP stays selectable."""


def with_prior_releases(event: dp_accounting.DpEvent, prior: dp_accounting.DpEvent | None) -> dp_accounting.DpEvent:
    """``event`` composed after ``prior`` (e.g. DP class counts released before DP-SGD)."""
    return event if prior is None else dp_accounting.ComposedDpEvent([prior, event])


def compute_epsilon(schedule: DpSgdSchedule, delta: float, accountant: str = DEFAULT_ACCOUNTANT,
                    allow_large_delta: bool = False,
                    prior_event: dp_accounting.DpEvent | None = None) -> PrivacyAccounting:
    """ε spent after ``schedule.steps`` steps (and ``prior_event``, if any), at δ."""
    check_delta(delta, schedule.dataset_size, allow_large_delta)
    eps, details = epsilon_of_event(with_prior_releases(schedule.dp_event(), prior_event), delta, accountant)
    if not math.isfinite(eps):
        raise EpsilonOutOfRangeError(
            f"the {accountant} accountant finds no finite ε at δ = {delta:g} for this schedule (σ = "
            f"{schedule.noise_multiplier:g}, q = {schedule.sampling_rate:.4g}, {schedule.steps} steps); choose a "
            "larger δ or add noise")
    return PrivacyAccounting(schedule, float(delta), eps, accountant, details)


def calibrate_noise_multiplier(target_epsilon: float, delta: float, dataset_size: int, batch_size: int,
                               steps: int, accountant: str = DEFAULT_ACCOUNTANT,
                               sigma_tolerance: float = DEFAULT_SIGMA_TOLERANCE,
                               allow_large_delta: bool = False,
                               prior_event: dp_accounting.DpEvent | None = None) -> NoiseCalibration:
    """The smallest σ that keeps ε at δ within ``target_epsilon`` exactly at the last step.

    Brent's method on σ ↦ ε(σ) − target (ε falls as σ grows), then the answer is checked by
    recomputing ε at σ (≤ target) and at σ − tolerance (> target). ``prior_event`` (another DP release
    of the same data, composed before DP-SGD) is part of every ε computed, so the target covers both.
    """
    check_sampling(dataset_size, batch_size)
    check_delta(delta, dataset_size, allow_large_delta)
    if not (isinstance(target_epsilon, (int, float)) and math.isfinite(target_epsilon) and target_epsilon > 0):
        raise PrivacyParameterError(f"target epsilon must be a finite number > 0, got {target_epsilon!r}")
    if not sigma_tolerance > 0:
        raise PrivacyParameterError(f"sigma tolerance must be > 0, got {sigma_tolerance!r}")
    DpSgdSchedule(dataset_size, batch_size, steps, 1.0)  # validates steps

    q = batch_size / dataset_size

    evaluated: dict[float, tuple[float, dict]] = {}  # each ε(σ) once: a PLD evaluation costs seconds

    def accounted(sigma: float) -> tuple[float, dict]:
        if sigma not in evaluated:
            try:
                evaluated[sigma] = epsilon_of_event(with_prior_releases(dp_sgd_event(q, sigma, steps), prior_event),
                                                    delta, accountant)
            except EpsilonTooLargeError:
                evaluated[sigma] = (math.inf, {})  # far too little noise for any target: the search moves on
        return evaluated[sigma]

    def epsilon_at(sigma: float) -> float:
        return accounted(sigma)[0]

    # RDP is cheap and its σ is a close upper estimate of PLD's, so it seeds the PLD search.
    guess, factor = 1.0, 2.0
    if accountant == "pld":
        try:
            rdp = calibrate_noise_multiplier(target_epsilon, delta, dataset_size, batch_size, steps, "rdp",
                                             sigma_tolerance, allow_large_delta=True, prior_event=prior_event)
            guess, factor = rdp.accounting.schedule.noise_multiplier, 1.25
        except PrivacyParameterError:
            pass  # a target RDP cannot certify may still be within PLD's reach: search unseeded
    low, high = _bracket(epsilon_at, target_epsilon, guess, factor, accountant)
    gap = lambda s: min(epsilon_at(s), _EPSILON_CAP) - target_epsilon  # noqa: E731
    sigma = optimize.brentq(gap, low, high, xtol=sigma_tolerance / 4)
    # Brent's root may sit a hair below the true root (ε slightly above target): step up by the tolerance.
    while epsilon_at(sigma) > target_epsilon:
        sigma += sigma_tolerance / 4

    epsilon, details = accounted(sigma)
    accounting = PrivacyAccounting(DpSgdSchedule(dataset_size, batch_size, steps, float(sigma)), float(delta),
                                   epsilon, accountant, details)
    below = epsilon_at(sigma - sigma_tolerance) if sigma - sigma_tolerance > 0 else math.inf
    if not (accounting.epsilon <= target_epsilon < below):
        raise PrivacyParameterError(  # a failed self-check, not a user error: never certify it
            f"noise calibration could not be verified: ε(σ={sigma}) = {accounting.epsilon}, "
            f"ε(σ−{sigma_tolerance}) = {below}, target {target_epsilon}")
    return NoiseCalibration(accounting, float(target_epsilon), sigma_tolerance, below)


def _bracket(epsilon_at: Callable[[float], float], target: float, guess: float, factor: float,
             accountant: str) -> tuple[float, float]:
    """[low, high] with ε(low) > target ≥ ε(high), found by geometric steps of ``factor`` from ``guess``."""
    def too_little_noise(sigma: float) -> bool:
        return epsilon_at(sigma) > target

    if too_little_noise(guess):
        low, high = guess, guess * factor
        while too_little_noise(high):
            if high > SIGMA_SEARCH_MAX:
                raise PrivacyParameterError(
                    f"no noise multiplier reaches ε = {target:g} with the {accountant} accountant: even "
                    f"σ = {SIGMA_SEARCH_MAX:g} gives ε = {epsilon_at(high):.4g}; raise the target ε or δ, "
                    "take fewer steps or a smaller sampling rate"
                    + (", or use the pld accountant (tighter for small ε)" if accountant == "rdp" else ""))
            low, high = high, high * factor
        return low, high
    high, low = guess, guess / factor
    while not too_little_noise(low):
        if low < SIGMA_SEARCH_MIN:
            raise PrivacyParameterError(
                f"ε = {target:g} is reached with negligible noise (σ < {SIGMA_SEARCH_MIN:g}): that target "
                "gives no meaningful privacy; choose a smaller ε")
        high, low = low, low / factor
    return low, high


# --- DpEvent <-> JSON --------------------------------------------------------------------------------
# The certificate stores the accounted event as plain JSON. Reading it back only ever instantiates
# classes from dp_accounting.dp_event: a certificate must not be able to name arbitrary Python code.

def dp_event_to_json(event: dp_accounting.DpEvent) -> dict[str, Any]:
    return _named_tuple_to_json(event.to_named_tuple())


def _named_tuple_to_json(value: Any) -> Any:
    if hasattr(value, "_fields") and hasattr(value, "class_name"):
        out = {"class_name": value.class_name}
        out.update({k: _named_tuple_to_json(getattr(value, k)) for k in value._fields
                    if k not in ("module_name", "class_name")})
        return out
    if isinstance(value, (list, tuple)):
        return [_named_tuple_to_json(v) for v in value]
    return value


def dp_event_from_json(data: dict[str, Any]) -> dp_accounting.DpEvent:
    if not isinstance(data, dict) or "class_name" not in data:
        raise PrivacyParameterError(f"not a serialised DpEvent: {data!r}")
    cls = getattr(dp_event_module, data["class_name"], None)
    if not (isinstance(cls, type) and issubclass(cls, dp_accounting.DpEvent)):
        raise PrivacyParameterError(f"unknown DpEvent class {data['class_name']!r}")
    kwargs = {}
    for key, value in data.items():
        if key == "class_name":
            continue
        if isinstance(value, dict):
            value = dp_event_from_json(value)
        elif isinstance(value, list):
            value = [dp_event_from_json(v) if isinstance(v, dict) else v for v in value]
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise PrivacyParameterError(f"malformed {data['class_name']}: {exc}") from exc
