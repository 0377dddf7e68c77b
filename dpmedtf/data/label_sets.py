"""Label sets: which findings a job learns, which manifest column holds each, and how a value becomes a label.

A label is 1.0 (present), 0.0 (absent) or NaN (not observed: an ``ignore`` policy applied). NaN travels
with the labels through the cache, the input pipeline and the loss, so an ignored entry needs no second
array: the loss, the class counts and every metric test ``isnan`` and leave the entry out.

Three rules read a manifest value:
- ``graded``: a grade 0–4 or its name (UKA-CXR's five classes); grades from ``first_positive_grade``
  count as present; the grade named "uncertain" follows the ``uncertain`` policy (the paper: absent);
- ``binary``: 1/0, yes/no, true/false, positive/negative;
- ``chexpert``: 1 positive, 0 negative, −1 uncertain, blank not mentioned (CheXpert, MIMIC-CXR-JPG).
Policies: ``uncertain: ones | zeros | ignore`` and ``blank: zeros | ignore | error`` (``error``, the
default of graded and binary findings, refuses a blank cell as before: a hospital's missing grade is a
data error unless the job says otherwise).

Presets (a registry: ``register_preset``): ``uka-cxr`` (the paper's eight graded findings, the
radiograph default), ``chexpert`` (the 14 CheXpert observations under their CheXpert column names;
uncertain ignored, blank negative, as the CheXpert paper's U-Ignore baseline) and ``binary`` (one 0/1
column ``label``, the CT default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Literal

from dpmedtf.data import labels as L

Rule = Literal["graded", "binary", "chexpert"]
UncertainPolicy = Literal["ones", "zeros", "ignore"]
BlankPolicy = Literal["zeros", "ignore", "error"]
RULES: tuple[str, ...] = ("graded", "binary", "chexpert")

# The CheXpert labeller's 14 observations, in the column order of CheXpert's train.csv.
CHEXPERT_COLUMNS: tuple[str, ...] = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other", "Fracture",
    "Support Devices")
_TRUE = {"1", "1.0", "yes", "y", "true", "t", "positive", "pos", "present"}
_FALSE = {"0", "0.0", "no", "n", "false", "f", "negative", "neg", "absent"}
_UNCERTAIN = {"-1", "-1.0", "uncertain"}
_BLANK = {"", "nan", "na", "n/a", "none", "null"}
_POLICY_VALUE = {"ones": 1.0, "zeros": 0.0, "ignore": math.nan}


def snake_case(column: str) -> str:
    return "_".join(column.strip().lower().replace("-", " ").split())


@dataclass(frozen=True, kw_only=True)
class Finding:
    """One output of the model: its name, the manifest column it is read from and the rule that reads it."""

    name: str
    column: str
    rule: Rule
    uncertain: UncertainPolicy = "zeros"
    blank: BlankPolicy = "error"
    first_positive_grade: int = L.FIRST_POSITIVE_GRADE
    grade_names: tuple[str, ...] = L.GRADE_NAMES

    def parse(self, value: Any) -> float:
        """1.0, 0.0 or NaN (ignored) from a manifest cell; ValueError naming the allowed values otherwise."""
        text = "" if value is None else " ".join(str(value).strip().lower().replace("_", " ").split())
        if text in _BLANK:
            if self.blank == "error":
                raise ValueError(f"{self.column} is empty; give a value, or set labels.blank (zeros or ignore) in the job")
            return _POLICY_VALUE[self.blank]
        if self.rule == "graded":
            grade = L.parse_grade(self.column, text, self.grade_names)
            if grade == 1 and self.grade_names[1] == "uncertain" and self.first_positive_grade > 1:
                return _POLICY_VALUE[self.uncertain]
            return float(grade >= self.first_positive_grade)
        number = _number(text)
        if self.rule == "chexpert" and (text in _UNCERTAIN or number == -1):
            return _POLICY_VALUE[self.uncertain]
        if text in _TRUE or number == 1:
            return 1.0
        if text in _FALSE or number == 0:
            return 0.0
        if self.rule == "chexpert":
            raise ValueError(f"unknown label {value!r} for {self.column}; use 1, 0, -1 (uncertain) or leave it blank")
        raise ValueError(f"unknown label {value!r}; use 0 or 1 (or yes/no, true/false) for {self.column}")

    @property
    def may_ignore(self) -> bool:
        return "ignore" in (self.uncertain, self.blank)

    def to_json(self) -> dict:
        return {"name": self.name, "column": self.column, "rule": self.rule, "uncertain": self.uncertain,
                "blank": self.blank, **({"first_positive_grade": self.first_positive_grade,
                                         "grade_names": list(self.grade_names)} if self.rule == "graded" else {})}


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


@dataclass(frozen=True, kw_only=True)
class LabelSet:
    """The findings of a job, in output order; ``name`` is the preset's, or 'custom'."""

    name: str
    findings: tuple[Finding, ...] = field(default_factory=tuple)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.findings)

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(f.column for f in self.findings)

    @property
    def may_ignore(self) -> bool:
        """Whether some entry may be unobserved (NaN): the class counts then count observed entries too."""
        return any(f.may_ignore for f in self.findings)

    def to_json(self) -> dict:
        return {"name": self.name, "findings": [f.to_json() for f in self.findings]}


_PRESETS: dict[str, Callable[[], LabelSet]] = {}


def register_preset(name: str) -> Callable[[Callable[[], LabelSet]], Callable[[], LabelSet]]:
    """Registers a label-set preset under ``name`` (selectable as ``labels: {preset: name}``)."""
    def register(build: Callable[[], LabelSet]) -> Callable[[], LabelSet]:
        _PRESETS[name] = build
        return build
    return register


def preset_names() -> tuple[str, ...]:
    return tuple(_PRESETS)


def preset(name: str) -> LabelSet:
    if name not in _PRESETS:
        raise ValueError(f"unknown label preset {name!r}; use one of {', '.join(_PRESETS)}")
    return _PRESETS[name]()


@register_preset("uka-cxr")
def _uka_cxr() -> LabelSet:
    return LabelSet(name="uka-cxr", findings=tuple(
        Finding(name=f, column=f, rule="graded", grade_names=L.grade_names(f)) for f in L.FINDINGS))


@register_preset("chexpert")
def _chexpert() -> LabelSet:
    return LabelSet(name="chexpert", findings=tuple(
        Finding(name=snake_case(c), column=c, rule="chexpert", uncertain="ignore", blank="zeros")
        for c in CHEXPERT_COLUMNS))


@register_preset("binary")
def _binary() -> LabelSet:
    return LabelSet(name="binary", findings=(Finding(name="label", column="label", rule="binary"),))


def default_preset(modality: str) -> str:
    return "uka-cxr" if modality == "radiograph" else "binary"


def with_policies(label_set: LabelSet, uncertain: str | None = None, blank: str | None = None) -> LabelSet:
    """The label set with a set-wide uncertain and/or blank policy."""
    changes = {k: v for k, v in (("uncertain", uncertain), ("blank", blank)) if v is not None}
    return replace(label_set, findings=tuple(replace(f, **changes) for f in label_set.findings)) if changes else label_set


def from_config(labels, modality: str) -> LabelSet:
    """The label set a job's ``labels:`` section (a ``config.LabelsConfig``, or None) names for ``modality``."""
    if labels is None:
        return preset(default_preset(modality))
    if labels.findings:
        findings = []
        for item in labels.findings:
            kwargs: dict[str, Any] = {"name": item.name, "column": item.column or item.name, "rule": item.rule,
                                      "first_positive_grade": item.first_positive_grade}
            if item.grade_names is not None:
                kwargs["grade_names"] = tuple(" ".join(n.lower().replace("_", " ").split()) for n in item.grade_names)
            if item.rule == "chexpert":
                kwargs.update(uncertain="ignore", blank="zeros")
            for policy in ("uncertain", "blank"):
                chosen = getattr(item, policy) or getattr(labels, policy)
                if chosen is not None:
                    kwargs[policy] = chosen
            findings.append(Finding(**kwargs))
        return LabelSet(name="custom", findings=tuple(findings))
    return with_policies(preset(labels.preset or default_preset(modality)), labels.uncertain, labels.blank)
