"""Sensitive attributes: which manifest columns the fairness audit groups by, and how a cell becomes a group.

A categorical column's values are its groups, as written (trimmed). A numeric column is binned by
edges (age's default for radiographs: the paper's bins 0-29, 30-59, 60-69, 70-79, 80+) or by
quantiles of the cohort (age's default for CT: quartiles, labelled with their year ranges). A missing
value is the group ``unknown`` — reported, never dropped — unless the attribute is ``required``; sex
additionally maps its spellings (female/w → F, male → M, other/diverse/x → other) and anything it does
not recognise to ``unknown``. A value that is not a number in a binned column is refused with its line:
that is a typing error, not a missing value.

Intersections are pairs of attributes audited jointly (``sex × age_group``, ``race × sex``); the
paper's pair keeps its historical name ``sex_x_age``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd

from dpmedtf.data import labels as L

UNKNOWN = "unknown"
_MISSING = {"", "nan", "na", "n/a", "none", "null", "unknown", "unk", "?", "-"}
_LEGACY_INTERSECTION_NAMES = {("sex", "age_group"): "sex_x_age"}


@dataclass(frozen=True, kw_only=True)
class Attribute:
    """One sensitive attribute: read from ``column``, reported as ``name``."""

    column: str
    name: str
    bins: tuple[float, ...] | None = None
    quantiles: int | None = None
    required: bool = False

    @property
    def numeric(self) -> bool:
        return self.bins is not None or self.quantiles is not None

    def to_json(self) -> dict:
        return {"column": self.column, "name": self.name, "bins": list(self.bins) if self.bins else None,
                "quantiles": self.quantiles, "required": self.required}


@dataclass(frozen=True, kw_only=True)
class Intersection:
    first: str
    second: str

    @property
    def name(self) -> str:
        return _LEGACY_INTERSECTION_NAMES.get((self.first, self.second), f"{self.first}_x_{self.second}")


@dataclass(frozen=True, kw_only=True)
class FairnessSpec:
    """The attributes and intersections a job audits (``fairness:``); the defaults reproduce the paper's audit."""

    attributes: tuple[Attribute, ...]
    intersections: tuple[Intersection, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """Every grouping the report has rows for: attributes, then intersections."""
        return (*(a.name for a in self.attributes), *(i.name for i in self.intersections))

    @property
    def attribute_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.attributes)

    def to_json(self) -> dict:
        return {"attributes": [a.to_json() for a in self.attributes],
                "intersections": [{"of": [i.first, i.second], "name": i.name} for i in self.intersections]}


def attribute(column: str, *, modality: str = "radiograph", name: str | None = None,
              bins: Sequence[float] | None = None, quantiles: int | None = None, required: bool = False) -> Attribute:
    """An attribute with its defaults filled: age without binning gets the paper's bins (radiographs) or quartiles (CT)."""
    if column == "age" and bins is None and quantiles is None:
        if modality == "radiograph":
            bins = L.AGE_BIN_EDGES
        else:
            quantiles = 4
    binned = bins is not None or quantiles is not None
    return Attribute(column=column, name=name or (f"{column}_group" if binned else column),
                     bins=tuple(float(b) for b in bins) if bins is not None else None, quantiles=quantiles,
                     required=required)


def default_spec(modality: str) -> FairnessSpec:
    return FairnessSpec(attributes=(attribute("sex", modality=modality), attribute("age", modality=modality)),
                        intersections=(Intersection(first="sex", second="age_group"),))


def from_config(fairness, modality: str) -> FairnessSpec:
    """The spec a job's ``fairness:`` section (a ``config.FairnessConfig``, or None) names."""
    if fairness is None:
        return default_spec(modality)
    attributes = tuple(attribute(a.column, modality=modality, name=a.name, bins=a.bins, quantiles=a.quantiles,
                                 required=a.required) for a in fairness.attributes)
    return FairnessSpec(attributes=attributes,
                        intersections=tuple(Intersection(first=a, second=b) for a, b in fairness.intersections))


def parse_sex(value) -> str:
    """F, M, other, or unknown (missing or unrecognised)."""
    return L.parse_sex_or_none(value) or UNKNOWN


def is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip().lower() in _MISSING


def parse_number(attribute_: Attribute, value) -> float:
    """The number in a binned column's cell; NaN when missing; ValueError when it is not a number."""
    if is_missing(value):
        return math.nan
    try:
        number = float(str(value).strip())
    except ValueError:
        raise ValueError(f"{attribute_.column} {value!r} is not a number (leave it empty if unknown)") from None
    if not math.isfinite(number):
        raise ValueError(f"{attribute_.column} {value!r} is not a finite number")
    return number


def groups_of(attribute_: Attribute, values: pd.Series) -> pd.Series:
    """The group of every row: binned for numeric attributes (``values`` parsed numbers, NaN missing),
    the trimmed value otherwise (``values`` strings); ``unknown`` where missing."""
    if attribute_.bins is not None:
        return values.map(lambda v: UNKNOWN if math.isnan(v) else bin_label(attribute_.bins, v))
    if attribute_.quantiles is not None:
        return quantile_groups(values, attribute_.quantiles)
    if attribute_.column == "sex":
        return values.map(parse_sex)
    return values.map(lambda v: UNKNOWN if is_missing(v) else str(v).strip())


def bin_label(edges: Sequence[float], value: float) -> str:
    """'30-59' for integer edges 30 and 60 (the paper's style), '18.5-<25' otherwise; '80+' for the last bin."""
    if value < edges[0]:
        return f"<{edges[0]:g}"
    for low, high in zip(edges, edges[1:]):
        if value < high:
            integral = float(low).is_integer() and float(high).is_integer()
            return f"{low:g}-{high - 1:g}" if integral else f"{low:g}-<{high:g}"
    return f"{edges[-1]:g}+"


def quantile_groups(values: pd.Series, count: int) -> pd.Series:
    """Quantile groups of the known values, labelled 'Q1 30-45' with their ranges; missing → unknown."""
    known = values.dropna().to_numpy(float)
    if known.size == 0:
        return pd.Series([UNKNOWN] * len(values), index=values.index)
    edges = np.quantile(known, np.arange(1, count) / count)
    bounds = [known.min(), *edges, known.max()]
    names = [f"Q{i + 1} {bounds[i]:g}-{bounds[i + 1]:g}" for i in range(count)]
    index = np.searchsorted(edges, np.nan_to_num(values.to_numpy(float)), side="right")
    return pd.Series([UNKNOWN if math.isnan(v) else names[i] for v, i in zip(values.to_numpy(float), index)],
                     index=values.index)


def group_order_key(group: str) -> tuple:
    """Sorts groups as a reader expects: bins by their lower bound, then names; unknown last."""
    if group == UNKNOWN:
        return (2, 0.0, group)
    text = group.split()[-1] if group.startswith("Q") and " " in group else group
    try:
        return (0, float(text.lstrip("<").rstrip("+").split("-")[0]), group)
    except ValueError:
        return (1, 0.0, group)


def with_intersections(frame: pd.DataFrame, intersections: Sequence[Intersection]) -> pd.DataFrame:
    """``frame`` with a column per intersection: 'F × 60-69'."""
    out = frame.copy()
    for intersection in intersections:
        out[intersection.name] = out[intersection.first].astype(str) + " × " + out[intersection.second].astype(str)
    return out
