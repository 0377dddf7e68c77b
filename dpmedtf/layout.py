"""Where everything of a run directory lives (as ``release/layout.py`` says it for bundles).

A job's run directory (``dpmedtf run/train --out DIR``) holds the prepared-data cache, the stage
records, the report and the bundle, and one model directory per trained model: DIR itself for a single
job, DIR/<member> for each run of an ε sweep (``epsilon-2``, ``non-private``, …). Modules ask these
classes for paths instead of spelling file names, so the layout is written down once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, init=False)
class _Directory:
    """A directory whose files the subclass names; built from any path-like, compared by its root."""

    root: Path

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", Path(root))


@dataclass(frozen=True, init=False)
class ModelDir(_Directory):
    """One trained model: its training outputs, checkpoints and evaluation."""

    @property
    def model(self) -> Path:
        return self.root / "model.keras"

    @property
    def staged_model(self) -> Path:
        """Where the final model is written before it is renamed to ``model`` (Keras needs the suffix)."""
        return self.root / ".partial-model.keras"

    @property
    def ledger(self) -> Path:
        """The privacy ledger of a DP run (absent for a non-private one)."""
        return self.root / "ledger.json"

    @property
    def training_record(self) -> Path:
        """training.json: config, plan, status ("running"/"finished"), steps, ε."""
        return self.root / "training.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def privacy_tensorboard(self) -> Path:
        """ε spent per epoch, beside Keras' own TensorBoard logs."""
        return self.tensorboard / "privacy"

    @property
    def training_outputs(self) -> tuple[Path, ...]:
        """What a finished or interrupted training leaves; ``--force`` removes exactly these."""
        return (self.model, self.staged_model, self.ledger, self.training_record, self.checkpoints, self.tensorboard)

    @property
    def evaluation(self) -> "EvaluationDir":
        return EvaluationDir(self.root / "evaluation")

    @property
    def predictions(self) -> Path:
        return self.evaluation.predictions

    @property
    def thresholds(self) -> Path:
        return self.evaluation.thresholds

    @property
    def metrics(self) -> Path:
        return self.evaluation.metrics

    @property
    def fairness_report(self) -> Path:
        return self.evaluation.fairness_report


@dataclass(frozen=True, init=False)
class EvaluationDir(_Directory):
    """What ``dpmedtf evaluate`` writes for one model (the evaluation contract of DESIGN.md)."""

    def __fspath__(self) -> str:  # usable wherever a directory path is
        return str(self.root)

    def __str__(self) -> str:
        return str(self.root)

    @property
    def predictions(self) -> Path:
        """One row per test image: identity, subgroups, per finding ``_true`` and ``_prob``."""
        return self.root / "predictions.csv"

    @property
    def validation_predictions(self) -> Path:
        return self.root / "predictions_validation.csv"

    @property
    def thresholds(self) -> Path:
        """Finding → threshold chosen on the validation split."""
        return self.root / "thresholds.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def fairness_report(self) -> Path:
        return self.root / "fairness_report.json"

    @property
    def roc_figure(self) -> Path:
        """ROC curve per finding, the operating point at the validation threshold marked."""
        return self.root / "roc_curves.png"

    @property
    def reliability_figure(self) -> Path:
        """Reliability (calibration) diagram per finding, with its ECE."""
        return self.root / "reliability.png"

    @property
    def confusion_figure(self) -> Path:
        """TP/FP/FN/TN counts per finding at the validation threshold."""
        return self.root / "confusion_matrices.png"

    def subgroup_figure(self, attribute: str) -> Path:
        """AUROC and underdiagnosis (FNR) per group of ``attribute``, with bootstrap CIs."""
        return self.root / f"subgroups_{attribute}.png"


@dataclass(frozen=True, init=False)
class AuditDir(_Directory):
    """What ``dpmedtf audit`` writes: the canary audit's result, its figure and the twin's ledger."""

    @property
    def record(self) -> Path:
        """``audit.json``: the ε lower bound, its confidence and δ, the canaries, the guesses, the certified ε."""
        return self.root / "audit.json"

    @property
    def figure(self) -> Path:
        """The bound against the number of guesses, with the certified ε as a line."""
        return self.root / "audit_bound.png"

    @property
    def twin_ledger(self) -> Path:
        """What the job's mechanism claims for the twin's steps (the ``certified_epsilon`` of the record)."""
        return self.root / "twin_ledger.json"


@dataclass(frozen=True, init=False)
class RunDir(_Directory):
    """A job's run directory."""

    def member(self, name: str = "") -> ModelDir:
        """The model directory of sweep member ``name`` ("" for a job that trains one model)."""
        return ModelDir(self.root / name if name else self.root)

    @property
    def cache(self) -> Path:
        """Preprocessed images (unless the job sets data.cache_dir)."""
        return self.root / "cache"

    @property
    def stage_records(self) -> Path:
        return self.root / "stages"

    @property
    def writer_lock(self) -> Path:
        """Names the one process writing this directory (``dpmedtf.run_lock``); absent when none is."""
        return self.root / "writer.lock"

    @property
    def bundle(self) -> Path:
        return self.root / "bundle"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def sweep(self) -> Path:
        return self.root / "sweep.json"

    @property
    def summary_page(self) -> Path:
        return self.root / "index.html"

    @property
    def audit(self) -> AuditDir:
        """The canary audit of the job's DP model (the pipeline's audit stage)."""
        return AuditDir(self.root / "audit")
