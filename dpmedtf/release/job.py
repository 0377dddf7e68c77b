"""Releasing a job's trained and evaluated model: which model, which keys, which policy."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from dpmedtf.config import JobConfig
from dpmedtf.errors import ConfigError
from dpmedtf.release.bundle import build_bundle, load_candidate
from dpmedtf.release.policy import load_policy


def release_job(job: JobConfig, run: str | os.PathLike, out: str | os.PathLike | None = None,
                override_reason: str | None = None) -> Path:
    """Builds ``out`` (default ``<run>/bundle``) from the job's model in ``run``."""
    from dpmedtf.training.job import sweep_members

    run = Path(run)
    settings = job.release
    members = dict(sweep_members(job))
    if len(members) > 1:
        if settings.member is None or settings.member not in members:
            raise ConfigError(f"release.member must name the sweep model to release, one of {sorted(members)}"
                              + (f"; got {settings.member!r}" if settings.member else ""))
        member_dir = run / settings.member
    else:
        member_dir = run
    if settings.private_key is None:
        raise ConfigError("release.private_key is required: the P-256 key (PEM) that signs the bundle; "
                          "create one with `dpmedtf keygen`")
    return build_bundle(load_candidate(member_dir), Path(out) if out else run / "bundle", load_policy(settings.policy),
                        settings.private_key, settings.public_key, model_version=settings.model_version,
                        intended_use=settings.intended_use, selected_from=len(members),
                        override_reason=override_reason, job_name=job.name)


def with_release_overrides(job: JobConfig, **overrides) -> JobConfig:
    """The job with command-line release settings (those not None) in place of its YAML values."""
    given = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(job, release=dataclasses.replace(job.release, **given)) if given else job
