"""Findings, grades and subgroups as the paper defines them.

UKA-CXR grades every finding in five classes. "negative"/"uncertain" (cardiomegaly: "normal"/
"uncertain") count as absent, "mild"/"moderate"/"severe" (cardiomegaly: "borderline"/"enlarged"/
"massively enlarged") as present. Age groups for radiographs are the paper's bins; CT uses quartiles.
"""

from __future__ import annotations

import math

FINDINGS: tuple[str, ...] = (
    "cardiomegaly", "congestion", "pleural_effusion_right", "pleural_effusion_left",
    "pneumonic_infiltrates_right", "pneumonic_infiltrates_left", "atelectasis_right", "atelectasis_left",
)
GRADE_NAMES: tuple[str, ...] = ("negative", "uncertain", "mild", "moderate", "severe")
CARDIOMEGALY_GRADE_NAMES: tuple[str, ...] = ("normal", "uncertain", "borderline", "enlarged", "massively enlarged")
FIRST_POSITIVE_GRADE = 2

# Paper bins [0,30) [30,60) [60,70) [70,80) [80,100); ages of 100 and over join the last group.
AGE_BIN_EDGES: tuple[int, ...] = (0, 30, 60, 70, 80)
SEXES: tuple[str, ...] = ("F", "M")
_SEX_ALIASES = {"f": "F", "female": "F", "w": "F", "woman": "F", "m": "M", "male": "M", "man": "M",
                "o": "other", "other": "other", "x": "other", "d": "other", "diverse": "other", "non-binary": "other",
                "nonbinary": "other", "intersex": "other"}
SPLITS: tuple[str, ...] = ("train", "validation", "test")
_SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "validation", "val": "validation",
                  "valid": "validation", "test": "test"}


def grade_names(finding: str) -> tuple[str, ...]:
    return CARDIOMEGALY_GRADE_NAMES if finding == "cardiomegaly" else GRADE_NAMES


def parse_grade(finding: str, value, names: tuple[str, ...] | None = None) -> int:
    """A grade 0–(len(names) − 1) from its number (3, "3", 3.0, "3.0") or its name (``names``, by default the
    finding's UKA grade names); ValueError (with the allowed values) otherwise."""
    names = names or grade_names(finding)
    highest = len(names) - 1
    if isinstance(value, str):
        text = " ".join(value.strip().lower().replace("_", " ").split())
        if text in names:
            return names.index(text)
        try:
            value = float(text)
        except ValueError:
            value = text
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= highest:
        return value
    raise ValueError(f"unknown grade {value!r} for {finding}; use 0–{highest} or one of: {', '.join(names)}")


def binary_label(grade: int) -> int:
    return int(grade >= FIRST_POSITIVE_GRADE)


def parse_sex_or_none(value) -> str | None:
    """F, M or other from their usual spellings; None when the value is missing or not recognised (the
    fairness audit's group ``unknown``, see ``attributes.parse_sex``)."""
    text = str(value).strip().lower() if value is not None else ""
    return _SEX_ALIASES.get(text)


def parse_split(value) -> str:
    text = str(value).strip().lower()
    if text in _SPLIT_ALIASES:
        return _SPLIT_ALIASES[text]
    raise ValueError(f"unknown split {value!r}; use train, validation or test")


def parse_age(value) -> float:
    try:
        age = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"age {value!r} is not a number") from None
    if not (math.isfinite(age) and 0 <= age <= 120):
        raise ValueError(f"age {value!r} is outside 0–120 years")
    return age
