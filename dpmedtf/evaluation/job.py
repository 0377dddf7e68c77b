"""Evaluating a job's run directory: every model of it with its figures, then the cross-model report."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from dpmedtf.config import JobConfig
from dpmedtf.errors import DpmedtfError, OutputExistsError
from dpmedtf.evaluation import plots
from dpmedtf.evaluation.canary_audit import read_audit
from dpmedtf.evaluation.evaluate import audited_attributes, evaluate
from dpmedtf.evaluation.model_plots import draw_model_figures
from dpmedtf.evaluation.report import write_report
from dpmedtf.evaluation.sweep import SweepMember, analyse_sweep
from dpmedtf.files import json_safe, write_json_atomic
from dpmedtf.layout import RunDir
from dpmedtf.models import load_model
from dpmedtf.privacy.group import patient_level
from dpmedtf.privacy.ledger import Ledger
from dpmedtf.training.job import prepare_data, sweep_members
from dpmedtf.training.trainer import training_finished


def evaluate_job(job: JobConfig, run: Path, force: bool = False) -> tuple[list[SweepMember], Path]:
    """Evaluates each trained model of the job under ``run`` and writes ``run/report.html``."""
    run_dir = RunDir(run)
    for name, _ in sweep_members(job):  # before the (possibly long) data preparation
        member_dir = run_dir.member(name)
        if not training_finished(member_dir):
            raise DpmedtfError(f"no finished training at {member_dir.root} (no {member_dir.model.name}, or its "
                               f"{member_dir.training_record.name} does not say finished); train the job first "
                               f"(`dpmedtf train`, which resumes an interrupted run), or give the run directory it "
                               "was trained into with --run")
        if member_dir.metrics.exists() and not force:
            raise OutputExistsError(f"{member_dir.evaluation.root} already holds an evaluation; pass --force to "
                                    "replace it")
    prepared = prepare_data(job, run)
    members, model_figures = [], {}
    for name, member in sweep_members(job):
        member_dir = run_dir.member(name)
        # The written files, not the in-memory dict, are what every later reader sees (NaN → null).
        evaluate(load_model(member_dir.model), prepared, member_dir.evaluation, member.evaluation.bootstrap_redraws,
                 member.evaluation.seed)
        # ε as the accountant computes it on what ran (the ledger), never the configured target.
        ledger = Ledger.load(member_dir.ledger) if member_dir.ledger.is_file() else None
        members.append(SweepMember(name or job.name, ledger.epsilon() if ledger else None,
                                   json.loads(member_dir.metrics.read_text()), pd.read_csv(member_dir.predictions),
                                   json.loads(member_dir.fairness_report.read_text()),
                                   patient_level(ledger)["epsilon"] if ledger else None,
                                   ledger.unit_of_privacy if ledger else None))
        model_figures[members[-1].name] = draw_model_figures(member_dir.evaluation)
    synthetic = prepared.cohort.synthetic
    figures, sweep = [], None
    if len(members) > 1:
        names = list(prepared.cohort.label_names)
        train = prepared.cohort.frame[prepared.cohort.frame["split"] == "train"]
        sweep = analyse_sweep(members, names, {n: int(train[n].sum()) for n in names},
                              job.evaluation.bootstrap_redraws, job.evaluation.seed)
        write_json_atomic(run_dir.sweep, json_safe({"synthetic_data": synthetic, **sweep}))
        figures = [plots.privacy_utility(members, run / "privacy_utility.png", synthetic),
                   plots.per_finding_auroc(members, names, run / "auroc_per_finding.png", synthetic),
                   *(plots.subgroups(members, a, run / f"subgroups_{a}.png", synthetic) for a in audited_attributes(prepared)),
                   plots.paired_differences(sweep, run / "auroc_difference_vs_non_private.png", synthetic)]
    audit = read_audit(run)
    report = write_report(run_dir.report, f"dpmedtf evaluation: {job.name}", members, sweep,
                          [f for f in figures if f is not None], synthetic, audit=audit,
                          audit_figure=run_dir.audit.figure if audit else None, model_figures=model_figures)
    return members, report
