"""``dpmedtf audit``: a measured ε lower bound for a job's DP model, next to the ε its accountant certifies.

Composes the audit twin (``training.audit_twin``: the job's training again, with m canaries included by
secret coins) and the one-run estimator (``privacy.audit.one_run``), and writes ``audit.json``, the
twin's ledger and a figure (``layout.AuditDir``). The twin is never released, so the audit costs the
released model no privacy; the audit itself is a measurement of the mechanism, not of the released
weights.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dpmedtf.config import JobConfig
from dpmedtf.errors import ConfigError, OutputExistsError
from dpmedtf.files import write_json_atomic
from dpmedtf.layout import AuditDir, RunDir
from dpmedtf.privacy.audit.canaries import DEFAULT_CANARIES, DEFAULT_KIND
from dpmedtf.privacy.audit.one_run import DEFAULT_CONFIDENCE, OneRunBound, audit_scores
from dpmedtf.privacy.randomness import RunSecret

AUDIT_SCHEMA_VERSION = 1
METHOD = ("one-run canary audit: Steinke, Nasr & Jagielski, 'Privacy auditing with one (1) training run', "
          "NeurIPS 2023 (Theorem 5.2, with a Bonferroni correction over the numbers of guesses tried)")
MEANING = ("A lower bound on the ε of the job's DP-SGD mechanism, measured by one attack on one twin training run: "
           "with the stated confidence, no (ε, δ)-DP mechanism with a smaller ε would let this attacker guess as well "
           "as it did. It is evidence against a certificate (a bound above the certified ε means the implementation "
           "does less than it claims), never a proof of privacy: a weak attack gives a low bound whatever the truth.")
PRIVACY_COST = {
    "white-box": "none: the audit twin, the only model trained with canaries, is never released, and white-box scores "
                 "are the canaries' own coordinates of the noised updates, which no training image touches, so this "
                 "file does not depend on the training data",
    "black-box": "none for the released model (the audit twin is never released); but black-box scores come from the "
                 "twin's weights, which are (ε, δ)-DP with respect to the training records with the certified_epsilon "
                 "above, so publishing this file is a second DP release of the training data; release bundles "
                 "therefore carry white-box audits only",
}


@dataclass(frozen=True)
class AuditResult:
    directory: AuditDir
    record: dict


def audited_member(config: JobConfig, member: str | None) -> tuple[str, JobConfig]:
    """(name, config) of the DP model to audit: the job itself, or one member of its ε sweep."""
    from dpmedtf.training.job import sweep_members

    members = dict(sweep_members(config))
    if len(members) == 1 and member is None:
        return next(iter(members.items()))
    name = member or config.release.member
    private = [n for n, c in members.items() if c.privacy.enabled]
    if name is None:
        raise ConfigError(f"the job trains several models ({', '.join(members)}): say which to audit with --member "
                          "(or set release.member)")
    if name not in members:
        raise ConfigError(f"--member {name!r} is not a model of this job; its DP models are {', '.join(private)}")
    return name, members[name]


def audit_record(bound: OneRunBound, twin, *, member: str, synthetic: bool) -> dict:
    """``audit.json`` from the twin's scores' bound and what the twin's mechanism claims."""
    plan = twin.plan
    return {
        "schema_version": AUDIT_SCHEMA_VERSION,
        "kind": twin.kind,
        "epsilon_lower_bound": bound.epsilon_lower_bound,
        "confidence": bound.confidence,
        "delta": bound.delta,
        "certified_epsilon": twin.ledger.epsilon(),
        "canaries": bound.canaries,
        "canaries_included": bound.canaries_included,
        "guesses": bound.guesses,
        "correct_guesses": bound.correct_guesses,
        "by_guesses": [{"guesses": o.guesses, "correct_guesses": o.correct_guesses,
                        "epsilon_lower_bound": o.epsilon_lower_bound} for o in bound.by_guesses],
        "significance_per_guess_count": bound.significance_per_guess_count,
        "epsilon_lower_bound_ceiling": bound.ceiling,
        "can_refute_certificate": bound.ceiling > twin.ledger.epsilon(),
        "canary_samples": twin.canary_samples,
        "member": member,
        "mechanism": {"sampling_rate": plan.sampling_rate, "noise_multiplier": plan.noise_multiplier,
                      "clip_norm": plan.clip_norm, "steps": twin.steps, "unit_of_privacy": plan.unit_of_privacy,
                      "accountant": plan.accountant, "clipping_engine": plan.clipping,
                      "dataset_size": plan.dataset_size},
        "randomness": twin.ledger.notes.get("randomness"),
        "synthetic_data": bool(synthetic),
        "method": METHOD,
        "meaning": MEANING,
        "privacy_cost_for_release": PRIVACY_COST[twin.kind],
        "depends_on_training_data": twin.kind != "white-box",
    }


def run_canary_audit(config: JobConfig, out_dir: str | os.PathLike, *, audit_dir: str | os.PathLike | None = None,
                     member: str | None = None, kind: str = DEFAULT_KIND, canaries: int = DEFAULT_CANARIES,
                     confidence: float = DEFAULT_CONFIDENCE, force: bool = False, progress=None,
                     log=None) -> AuditResult:
    """Audits the job's DP model: data prepared under ``out_dir``, results in ``audit_dir`` (default ``out_dir``)."""
    from dpmedtf.evaluation.plots import audit_bound
    from dpmedtf.training.audit_twin import train_audit_twin
    from dpmedtf.training.job import prepare_data

    if not isinstance(canaries, int) or canaries < 2:
        raise ConfigError(f"--canaries must be a whole number ≥ 2, got {canaries!r} (a real audit uses about 1000)")
    if not 0 < confidence < 1:
        raise ConfigError(f"--confidence must be between 0 and 1 (e.g. 0.95), got {confidence!r}")
    target = AuditDir(audit_dir if audit_dir is not None else out_dir)
    if target.record.exists() and not force:
        raise OutputExistsError(f"{target.record} already exists: pass --force to audit again, or use another --out")
    name, job = audited_member(config, member)
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    started = time.monotonic()
    prepared = prepare_data(job, Path(out_dir), progress)
    secret = (RunSecret.from_experiment_seed(job.privacy.noise_seed) if job.privacy.noise_seed is not None
              else RunSecret.fresh())  # held in memory only: the twin is never resumed or released
    log(f"audit: training the twin of {name or job.name} with {canaries} {kind} canaries")
    twin = train_audit_twin(job, prepared, kind=kind, canaries=canaries, secret=secret, log=log)
    bound = audit_scores(twin.scores, twin.included, delta=job.privacy.delta, confidence=confidence)
    record = {**audit_record(bound, twin, member=name or job.name, synthetic=prepared.cohort.synthetic),
              "seconds": round(time.monotonic() - started, 1)}  # the whole audit: data, twin and scoring
    target.root.mkdir(parents=True, exist_ok=True)
    twin.ledger.save(target.twin_ledger)
    audit_bound(record["by_guesses"], record["certified_epsilon"], confidence, kind, target.figure,
                prepared.cohort.synthetic)
    write_json_atomic(target.record, record)  # last: its presence means the audit finished
    return AuditResult(target, record)


def read_audit(run_dir: str | os.PathLike) -> dict | None:
    """The pipeline's audit record of a run directory, if its audit stage ran."""
    from dpmedtf.files import read_json_object

    path = RunDir(run_dir).audit.record
    return read_json_object(path, "the canary audit record") if path.is_file() else None
