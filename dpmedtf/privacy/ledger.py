"""The privacy ledger: what training actually did, step by step, and the ε it has spent.

Every DP step is recorded with its sampling rate q, noise multiplier σ and clip norm C. Runs of
identical steps are stored as one segment (a 180k-step run is a handful of lines, not 180k), which
is still a record of every step: the ledger's DpEvent is the composition of its segments, and ε is
always recomputed from that event, never carried forward. The certificate is built from this file.

Other DP releases of the same training data (the noisy class counts that weight the loss) are
recorded as ``releases`` with their own DpEvent, and the ledger's event composes them with DP-SGD, so
the ε it reports covers everything the model was built from.

The ledger also states what the guarantee is about (unit of privacy, neighbouring relation, N, δ)
and every use of private data outside DP (class weights from exact training labels, thresholds chosen
on validation data, hyperparameters), so the certificate can state them.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import dp_accounting

from dpmedtf.errors import RecordError
from dpmedtf.files import write_json_atomic
from dpmedtf.privacy import accounting

LEDGER_FORMAT = 2
_READABLE_FORMATS = (1, 2)  # format 1 had no ``releases``


@dataclass(frozen=True)
class Segment:
    """``steps`` consecutive DP-SGD steps with the same parameters."""

    steps: int
    sampling_rate: float
    noise_multiplier: float
    clip_norm: float

    def dp_event(self) -> dp_accounting.DpEvent:
        return accounting.dp_sgd_event(self.sampling_rate, self.noise_multiplier, self.steps)


@dataclass(frozen=True)
class Release:
    """A DP release of the training data other than DP-SGD, e.g. noisy class counts (Gaussian mechanism)."""

    what: str
    how: str
    dp_event: dict
    """The release's DpEvent as JSON (``accounting.dp_event_to_json``)."""

    def event(self) -> dp_accounting.DpEvent:
        return accounting.dp_event_from_json(self.dp_event)


@dataclass(frozen=True)
class Ledger:
    dataset_size: int
    """N: records the sampler draws from (images, or patients for patient-level privacy)."""
    batch_size: int
    """Expected logical batch size (records per step)."""
    delta: float
    accountant: str
    unit_of_privacy: str
    """'image' or 'patient': what one record is, i.e. what the guarantee protects."""
    epsilon_budget: float | None = None
    """The run stops (or refuses to start) rather than spend more than this."""
    segments: tuple[Segment, ...] = ()
    releases: tuple[Release, ...] = ()
    """DP releases of the training data besides DP-SGD, composed with it in ``dp_event``."""
    non_dp_uses: tuple[dict, ...] = ()
    """Uses of the private data outside DP-SGD, each {'what', 'how', 'private_data_used'}."""
    notes: dict[str, Any] = field(default_factory=dict)
    """Facts the certificate repeats: images per patient bound, pretraining data, noise RNG, …"""

    @property
    def steps(self) -> int:
        return sum(s.steps for s in self.segments)

    def record(self, steps: int, sampling_rate: float, noise_multiplier: float, clip_norm: float) -> "Ledger":
        """The ledger after ``steps`` more steps with these parameters."""
        if steps <= 0:
            return self
        segment = Segment(steps, sampling_rate, noise_multiplier, clip_norm)
        last = self.segments[-1] if self.segments else None
        if last and (last.sampling_rate, last.noise_multiplier, last.clip_norm) == (sampling_rate, noise_multiplier, clip_norm):
            return replace(self, segments=(*self.segments[:-1], replace(last, steps=last.steps + steps)))
        return replace(self, segments=(*self.segments, segment))

    def dp_sgd_event(self) -> dp_accounting.DpEvent:
        """DP-SGD's steps alone."""
        if not self.segments:
            return dp_accounting.NoOpDpEvent()
        if len(self.segments) == 1:
            return self.segments[0].dp_event()
        return dp_accounting.ComposedDpEvent([s.dp_event() for s in self.segments])

    def dp_event(self) -> dp_accounting.DpEvent:
        """Everything released from the training data: the other releases, then DP-SGD."""
        if not self.releases:
            return self.dp_sgd_event()
        return dp_accounting.ComposedDpEvent([*(r.event() for r in self.releases), self.dp_sgd_event()])

    def with_release(self, release: Release) -> "Ledger":
        return replace(self, releases=(*(r for r in self.releases if r.what != release.what), release))

    def epsilon(self, extra_steps: int = 0, sampling_rate: float | None = None,
                noise_multiplier: float | None = None) -> float:
        """ε spent at δ, optionally after ``extra_steps`` more steps (for budget checks)."""
        ledger = self
        if extra_steps:
            last = self.segments[-1] if self.segments else None
            ledger = self.record(extra_steps, sampling_rate if sampling_rate is not None else last.sampling_rate,
                                 noise_multiplier if noise_multiplier is not None else last.noise_multiplier,
                                 last.clip_norm if last else 0.0)
        if not ledger.segments and not ledger.releases:
            return 0.0
        return accounting.epsilon_of_event(ledger.dp_event(), self.delta, self.accountant)[0]

    def max_steps_within_budget(self, planned_steps: int, sampling_rate: float, noise_multiplier: float) -> int:
        """How many of ``planned_steps`` further steps fit in the budget (all of them if no budget)."""
        if self.epsilon_budget is None or self.epsilon(planned_steps, sampling_rate, noise_multiplier) <= self.epsilon_budget:
            return planned_steps
        low, high = 0, planned_steps  # ε grows with steps: the largest feasible count by bisection
        while low < high:
            middle = (low + high + 1) // 2
            if self.epsilon(middle, sampling_rate, noise_multiplier) <= self.epsilon_budget:
                low = middle
            else:
                high = middle - 1
        return low

    def with_non_dp_use(self, what: str, how: str, private_data_used: bool) -> "Ledger":
        use = {"what": what, "how": how, "private_data_used": private_data_used}
        kept = tuple(u for u in self.non_dp_uses if u["what"] != what)
        return replace(self, non_dp_uses=(*kept, use))

    def to_json_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["segments"] = [asdict(s) for s in self.segments]
        data["releases"] = [asdict(r) for r in self.releases]
        data["non_dp_uses"] = list(self.non_dp_uses)
        data.update({"format": LEDGER_FORMAT, "steps": self.steps, "epsilon": self.epsilon(),
                     "sampling": accounting.SAMPLING, "neighboring_relation": accounting.NEIGHBORING_RELATION,
                     "dp_event": accounting.dp_event_to_json(self.dp_event())})
        return data

    @classmethod
    def from_json_dict(cls, data: dict[str, Any], source: str = "ledger") -> "Ledger":
        if not isinstance(data, dict):
            raise RecordError(f"{source}: a privacy ledger is a JSON object, got {type(data).__name__}")
        if data.get("format") not in _READABLE_FORMATS:
            raise RecordError(f"{source}: unsupported ledger format {data.get('format')!r} (this dpmedtf reads "
                              f"formats {list(_READABLE_FORMATS)}); use the dpmedtf version that wrote it")
        try:
            return cls(dataset_size=data["dataset_size"], batch_size=data["batch_size"], delta=data["delta"],
                       accountant=data["accountant"], unit_of_privacy=data["unit_of_privacy"],
                       epsilon_budget=data.get("epsilon_budget"),
                       segments=tuple(Segment(**s) for s in data["segments"]),
                       releases=tuple(Release(**r) for r in data.get("releases", ())),
                       non_dp_uses=tuple(data.get("non_dp_uses", ())), notes=dict(data.get("notes", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise RecordError(f"{source}: the privacy ledger is incomplete or edited ({type(exc).__name__}: {exc}); "
                              "a ledger must be exactly as training wrote it: restore it or train again") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Atomic: written beside the target and renamed over it, so a crash never leaves half a ledger."""
        return write_json_atomic(path, self.to_json_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Ledger":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RecordError(f"{path}: cannot read the privacy ledger ({type(exc).__name__}: {exc}); restore the "
                              "file as training wrote it, or train again") from None
        return cls.from_json_dict(data, str(path))
