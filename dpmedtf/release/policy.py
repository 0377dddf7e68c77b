"""The release policy (`release/policy.yaml`): the rules a model must meet before it is published.

Release managers own the YAML; this module only reads it strictly (unknown keys are errors, so a typo
cannot silently switch a rule off) and checks a candidate release against it, returning every broken
rule rather than the first.
"""

from __future__ import annotations

import math
import os
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from dpmedtf.errors import ConfigError
from dpmedtf.resources import release_file

DEFAULT_POLICY = "policy.yaml"


@dataclass(frozen=True)
class PrivacyRules:
    max_epsilon: float = 10.0
    max_patient_epsilon: float | None = 10.0
    """Limit on the certificate's patient-level ε (group privacy when the unit is the image); None: no limit."""
    require_delta_below_one_over_n: bool = True
    allowed_accountants: tuple[str, ...] = ("rdp", "pld")
    require_secret_randomness: bool = True
    """Refuse runs whose sampling and noise came from a published seed (privacy.noise_seed)."""
    forbidden_non_dp_uses: tuple[str, ...] = ("class weights",)
    """Uses of private training data outside DP that break the policy (exact class counts weight the loss)."""


@dataclass(frozen=True)
class ExportRules:
    max_parity_difference: float = 1e-4


@dataclass(frozen=True)
class FairnessRules:
    attributes: tuple[str, ...] = ("sex", "age_group")
    """Attributes every release must have been audited by (checked on the report's "mean" rows)."""
    check_job_attributes: bool = True
    """Also hold every attribute the job itself audits (its ``fairness.attributes``: site, race, …) to the limits."""
    min_group_size: int = 10
    min_worst_group_auroc: float | None = 0.55
    max_abs_statistical_parity_difference: float | None = 0.15


@dataclass(frozen=True)
class ReleasePolicy:
    privacy: PrivacyRules = field(default_factory=PrivacyRules)
    export: ExportRules = field(default_factory=ExportRules)
    fairness: FairnessRules = field(default_factory=FairnessRules)
    source: str = "built-in defaults"


@dataclass(frozen=True)
class Violation:
    rule: str
    detail: str

    def __str__(self) -> str:
        return f"{self.rule}: {self.detail}"


def load_policy(path: str | os.PathLike | None = None) -> ReleasePolicy:
    """The policy at ``path``, or dpmedtf's own `release/policy.yaml`."""
    path = Path(path) if path is not None else release_file(DEFAULT_POLICY)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read release policy {path} (release.policy, --policy): {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a release policy is a mapping with sections privacy, export, fairness")
    sections = {"privacy": PrivacyRules, "export": ExportRules, "fairness": FairnessRules}
    unknown = set(data) - set(sections)
    if unknown:
        raise ConfigError(f"{path}: unknown policy section(s) {sorted(unknown)}; allowed: {sorted(sections)}")
    parsed = {}
    for name, cls in sections.items():
        section = data.get(name) or {}
        allowed = {f.name for f in fields(cls)}
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: {name} must be a mapping of rules ({', '.join(sorted(allowed))}), "
                              f"got {section!r}")
        if set(section) - allowed:
            raise ConfigError(f"{path}: {name} has unknown rule(s) {sorted(map(str, set(section) - allowed))}; "
                              f"allowed: {sorted(allowed)}")
        hints = typing.get_type_hints(cls)
        parsed[name] = cls(**{k: _rule_value(path, f"{name}.{k}", v, hints[k]) for k, v in section.items()})
    return ReleasePolicy(**parsed, source=str(path))


def _rule_value(path: Path, key: str, value: Any, hint: Any) -> Any:
    """``value`` checked against the rule's type: a mistyped limit must not silently disable the rule."""
    optional = type(None) in typing.get_args(hint)
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint) if optional else hint
    if value is None and optional:
        return None
    if base is bool:
        ok = isinstance(value, bool)
        wanted = "true or false"
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        wanted = "a whole number"
    elif base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        wanted = "a finite number"
    else:  # tuple[str, ...]
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        wanted = "a list of names"
        value = tuple(value) if ok else value
    if not ok:
        raise ConfigError(f"{path}: {key} must be {wanted}{' or null' if optional else ''}, got {value!r}")
    return float(value) if base is float else value


def check_policy(policy: ReleasePolicy, certificate: Mapping[str, Any], fairness_report: Mapping[str, Any],
                 parity: Mapping[str, Any]) -> list[Violation]:
    violations = []
    rules = policy.privacy
    audit = certificate.get("empirical_audit")
    if audit and audit["epsilon_lower_bound"] > audit["certified_epsilon"]:
        violations.append(Violation("privacy.audit_within_certificate",
                                    f"the canary audit measured ε ≥ {audit['epsilon_lower_bound']:.4g}, above the "
                                    f"{audit['certified_epsilon']:.4g} its mechanism certifies: the implementation "
                                    "does less than the certificate claims"))
    if certificate["epsilon"] > rules.max_epsilon:
        violations.append(Violation("privacy.max_epsilon",
                                    f"ε = {certificate['epsilon']:.4g} exceeds the limit {rules.max_epsilon:g}"))
    if rules.require_delta_below_one_over_n and not certificate["delta"] < 1.0 / certificate["dataset_size"]:
        violations.append(Violation("privacy.require_delta_below_one_over_n",
                                    f"δ = {certificate['delta']:g} ≥ 1/N = {1.0 / certificate['dataset_size']:.3g} "
                                    f"(N = {certificate['dataset_size']})"))
    patient = certificate["patient_level"]
    if rules.max_patient_epsilon is not None and (patient["epsilon"] is None or patient["epsilon"] > rules.max_patient_epsilon):
        shown = "unbounded" if patient["epsilon"] is None else f"{patient['epsilon']:.4g}"
        violations.append(Violation("privacy.max_patient_epsilon",
                                    f"patient-level ε = {shown} (up to {patient['max_images_per_patient']} images per "
                                    f"patient) exceeds the limit {rules.max_patient_epsilon:g}; train with "
                                    "privacy.unit: patient, or with more noise"))
    if rules.require_secret_randomness and not certificate["randomness"]["secret"]:
        violations.append(Violation("privacy.require_secret_randomness",
                                    "sampling and noise were fixed by privacy.noise_seed (a reproducible experiment): "
                                    "anyone with the job file can reproduce them, so no DP guarantee applies; "
                                    "train again without noise_seed"))
    for use in certificate["non_dp_uses_of_private_data"]:
        if use["private_data_used"] and use["what"] in rules.forbidden_non_dp_uses:
            fix = "; use training.class_weights: dp_counts" if use["what"] == "class weights" else ""
            violations.append(Violation("privacy.forbidden_non_dp_uses",
                                        f"{use['what']}: {use['how']} — not covered by ε{fix}"))
    if certificate["accountant"] not in rules.allowed_accountants:
        violations.append(Violation("privacy.allowed_accountants",
                                    f"accountant {certificate['accountant']!r} is not one of {list(rules.allowed_accountants)}"))
    if not parity["max_abs_difference"] <= policy.export.max_parity_difference or not parity["passed"]:
        violations.append(Violation("export.max_parity_difference",
                                    f"ONNX differs from Keras by {parity['max_abs_difference']:.3g} (limit "
                                    f"{policy.export.max_parity_difference:g}) or changes a thresholded label"))
    violations.extend(_fairness_violations(policy.fairness, fairness_report))
    return violations


def _fairness_violations(rules: FairnessRules, report: Mapping[str, Any]) -> list[Violation]:
    violations = []
    named_by_job = [a["name"] for a in (report.get("grouping") or {}).get("attributes", [])]
    checked = list(dict.fromkeys([*rules.attributes, *(named_by_job if rules.check_job_attributes else [])]))
    for attribute in checked:
        rows = [r for r in report["rows"] if r["attribute"] == attribute and r["finding"] == "mean"]
        if not rows:
            violations.append(Violation("fairness.attributes", f"the fairness report has no rows for {attribute!r}"))
            continue
        held = [r for r in rows if r["n"] >= rules.min_group_size]
        if rules.min_worst_group_auroc is not None:
            scored = [r for r in held if r["auroc"] is not None and math.isfinite(r["auroc"])]
            if scored:
                worst = min(scored, key=lambda r: r["auroc"])
                if worst["auroc"] < rules.min_worst_group_auroc:
                    violations.append(Violation(
                        "fairness.min_worst_group_auroc",
                        f"{attribute} = {worst['group']} (n = {worst['n']}) has mean AUROC {worst['auroc']:.3f} "
                        f"< {rules.min_worst_group_auroc:g}"))
        if rules.max_abs_statistical_parity_difference is not None:
            for row in held:
                spd = row["statistical_parity_difference"]
                if spd is not None and abs(spd) > rules.max_abs_statistical_parity_difference:
                    violations.append(Violation(
                        "fairness.max_abs_statistical_parity_difference",
                        f"{attribute} = {row['group']} (n = {row['n']}) has statistical parity difference "
                        f"{spd:+.3f}; limit ±{rules.max_abs_statistical_parity_difference:g}"))
    return violations
