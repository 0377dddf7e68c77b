"""One training job from a config file: manifest → prepared data → training (or an ε sweep)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from dpmedtf.config import JobConfig, resolve
from dpmedtf.data.cache import PreparedData, PreprocessSpec, prepare
from dpmedtf.data.manifests import load_manifest
from dpmedtf.errors import ConfigError
from dpmedtf.training.trainer import TrainingResult, train


def prepare_data(config: JobConfig, out_dir: Path, progress=None) -> PreparedData:
    data = config.data
    if data.manifest is None:
        raise ConfigError("data.manifest is required to train: give the path of the manifest CSV")
    cohort = load_manifest(data.manifest, data.modality, data.split_fractions, data.split_seed)
    spec = PreprocessSpec(data.modality, image_size=data.image_size, volume_shape=data.volume_shape,
                          hu_window=data.hu_window, dicom_decoder=data.dicom_decoder)
    return prepare(cohort, spec, data.cache_dir or out_dir / "cache", skip_bad=data.skip_bad, progress=progress)


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
        members.append(("non-private", resolve(dataclasses.replace(config, privacy=privacy, training=training))))
    return members


def run_training_job(config: JobConfig, out_dir: str | os.PathLike, force: bool = False,
                     progress=None) -> list[TrainingResult]:
    out_dir = Path(out_dir)
    prepared = prepare_data(config, out_dir, progress)
    return [train(member, prepared, out_dir / name if name else out_dir, force=force)
            for name, member in sweep_members(config)]
