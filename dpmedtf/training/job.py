"""One training job from a config file: manifest → prepared data → training (or an ε sweep)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from dpmedtf.config import JobConfig, resolve
from dpmedtf.data.cache import PreparedData, PreprocessSpec, prepare
from dpmedtf.data import attributes, label_sets
from dpmedtf.data.manifests import Cohort, load_manifest
from dpmedtf.errors import ConfigError
from dpmedtf.layout import RunDir
from dpmedtf.training.distribution import strategy_for
from dpmedtf.training.trainer import TrainingResult, train

NON_PRIVATE_MEMBER = "non-private"
"""The name of the sweep member trained without DP (privacy.sweep_non_private)."""


def prepare_data(config: JobConfig, out_dir: Path, progress=None) -> PreparedData:
    """The job's manifest loaded, checked and preprocessed into the cache (reused when unchanged).

    A multi-worker job joins its cluster first: TensorFlow must not run anything before that.
    """
    strategy_for(config.training)
    data = config.data
    if data.manifest is None:
        raise ConfigError("data.manifest is required to train: give the path of the manifest CSV")
    cohort = load_job_cohort(config)
    spec = PreprocessSpec(data.modality, image_size=data.image_size, volume_shape=data.volume_shape,
                          hu_window=data.hu_window, dicom_decoder=data.dicom_decoder,
                          accept_modalities=data.accept_modalities)
    return prepare(cohort, spec, data.cache_dir or RunDir(out_dir).cache, skip_bad=data.skip_bad, progress=progress)


def load_job_cohort(config: JobConfig) -> Cohort:
    """The job's manifest read with the job's label set (``labels:``) and sensitive attributes (``fairness:``)."""
    data = config.data
    return load_manifest(data.manifest, data.modality, data.split_fractions, data.split_seed,
                         label_set=label_sets.from_config(config.labels, data.modality),
                         fairness=attributes.from_config(config.fairness, data.modality))


def sweep_members(config: JobConfig) -> list[tuple[str, JobConfig]]:
    """(name, config) per run: the config itself, or one run per ε of privacy.epsilon_sweep (plus the
    non-private baseline when asked), all sharing every other setting."""
    sweep = config.privacy.epsilon_sweep
    if not sweep:
        return [("", config)]
    members = []
    for epsilon in sweep:
        privacy = dataclasses.replace(config.privacy, enabled=True, target_epsilon=epsilon, noise_multiplier=None,
                                      epsilon_sweep=None, epsilon_budget=None)
        members.append((f"epsilon-{epsilon:g}", resolve(dataclasses.replace(config, privacy=privacy))))
    if config.privacy.sweep_non_private:
        privacy = dataclasses.replace(config.privacy, enabled=False, target_epsilon=None, noise_multiplier=None,
                                      epsilon_sweep=None, epsilon_budget=None)
        # resolve() gives it the paper's non-private regime (ReLU, NAdam 5e-5, augmentation) except
        # where the job set those explicitly.
        # DP class counts belong to the DP regime; the baseline takes its default (exact counts).
        training = dataclasses.replace(config.training, class_weights=None) \
            if config.training.class_weights == "dp_counts" else config.training
        members.append((NON_PRIVATE_MEMBER, resolve(dataclasses.replace(config, privacy=privacy, training=training))))
    return members


def train_members(config: JobConfig, prepared: PreparedData, out_dir: str | os.PathLike,
                  force: bool = False) -> list[TrainingResult]:
    """Trains the job, or each run of its ε sweep into its own subdirectory."""
    run_dir = RunDir(out_dir)
    return [train(member, prepared, run_dir.member(name).root, force=force)
            for name, member in sweep_members(config)]


def run_training_job(config: JobConfig, out_dir: str | os.PathLike, force: bool = False,
                     progress=None) -> list[TrainingResult]:
    return train_members(config, prepare_data(config, Path(out_dir), progress), out_dir, force)
