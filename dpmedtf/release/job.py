"""Releasing a job's trained and evaluated model: which model, which keys, which policy."""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

from dpmedtf.config import JobConfig
from dpmedtf.errors import ConfigError
from dpmedtf.evaluation.canary_audit import read_audit
from dpmedtf.files import read_json_object
from dpmedtf.layout import RunDir
from dpmedtf.release.bundle import build_bundle, load_candidate
from dpmedtf.release.model_card import CardDetails
from dpmedtf.release.policy import load_policy
from dpmedtf.training.job import NON_PRIVATE_MEMBER  # the card's privacy–utility baseline

def release_member(job: JobConfig) -> tuple[str, JobConfig]:
    """(name, config) of the model a job releases: its only model, or ``release.member`` of a sweep.

    The name is "" for a job without a sweep; the model lives in ``<run>/<name>``, as training puts it.
    """
    from dpmedtf.training.job import sweep_members

    members = sweep_members(job)
    if len(members) == 1:
        return members[0]
    names = [name for name, _ in members]
    if job.release.member not in names:
        raise ConfigError(f"release.member must name the sweep model to release, one of {names}"
                          + (f"; got {job.release.member!r}" if job.release.member else ""))
    return job.release.member, dict(members)[job.release.member]


def release_job(job: JobConfig, run: str | os.PathLike, out: str | os.PathLike | None = None,
                override_reason: str | None = None) -> Path:
    """Builds ``out`` (default ``<run>/bundle``) from the job's model in ``run``."""
    from dpmedtf.training.job import sweep_members

    run = Path(run)
    settings = job.release
    name, _ = release_member(job)
    if settings.private_key is None:
        raise ConfigError("release.private_key is required: the P-256 key (PEM) that signs the bundle; "
                          "create one with `dpmedtf keygen`")
    run_dir = RunDir(run)
    audit = _audit_of(run_dir, name or job.name)
    return build_bundle(load_candidate(run_dir.member(name).root), Path(out) if out else run_dir.bundle,
                        load_policy(settings.policy), settings.private_key, settings.public_key,
                        model_version=settings.model_version, intended_use=settings.intended_use,
                        selected_from=len(sweep_members(job)), override_reason=override_reason, job_name=job.name,
                        audit=audit, card=CardDetails.from_release_config(settings),
                        baseline_metrics=_non_private_baseline(run_dir, name))


def _non_private_baseline(run_dir: RunDir, released: str) -> dict | None:
    """The evaluation of the run's non-private model, when its sweep trained and evaluated one."""
    if released == NON_PRIVATE_MEMBER:
        return None
    path = run_dir.member(NON_PRIVATE_MEMBER).metrics
    return read_json_object(path, "the non-private model's metrics") if path.is_file() else None


def _audit_of(run_dir: RunDir, member: str) -> Path | None:
    """The run's canary audit when it audited the released model's mechanism (else None)."""
    audit = read_audit(run_dir.root)
    if audit is None or audit.get("member") != member:
        return None
    path = run_dir.audit.record
    if audit.get("depends_on_training_data", True):
        # A black-box audit's scores are a DP release of the training data in their own right: publishing them
        # would add to the certified ε, which a referenced audit must never change.
        print(f"note: {path} is a {audit.get('kind')} audit, whose result depends on the training data; the bundle "
              "carries white-box audits only (run `dpmedtf audit --kind white-box`)", file=sys.stderr)
        return None
    return path


def with_release_overrides(job: JobConfig, **overrides) -> JobConfig:
    """The job with command-line release settings (those not None) in place of its YAML values."""
    given = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(job, release=dataclasses.replace(job.release, **given)) if given else job
