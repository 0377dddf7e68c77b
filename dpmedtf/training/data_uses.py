"""What a CLI run computes from the private training data besides DP-SGD's steps, and how the ledger says so.

Loss weights come from DP class counts (a Gaussian mechanism, composed into ε), exact counts (a use of
private data outside DP), public prevalences, or nothing. The ledger a DP run starts from records
those, the split, and the facts the certificate repeats (randomness, engine, pretraining, synthetic data).
"""

from __future__ import annotations

import numpy as np

from dpmedtf.config import JobConfig
from dpmedtf.data import label_sets
from dpmedtf.data.cache import PreparedData
from dpmedtf.data.pipeline import split_rows
from dpmedtf.errors import DpmedtfError
from dpmedtf.privacy.class_counts import release_prevalences
from dpmedtf.privacy.engines import get_engine
from dpmedtf.privacy.mechanism import run_notes
from dpmedtf.privacy.ledger import Ledger
from dpmedtf.privacy.randomness import RunSecret
from dpmedtf.training.network import pretraining_of
from dpmedtf.training.losses import inverse_frequency_weights, prior_weights
from dpmedtf.training.plan import TrainingPlan


def class_weights(config: JobConfig, plan: TrainingPlan, labels: np.ndarray, train_frame, secret: RunSecret):
    """(positive, negative) loss weights per label and, for dp_counts, the DP release they come from."""
    weighting = config.training.class_weights
    if weighting == "dp_counts":
        records = train_frame["patient_id"].to_numpy() if plan.unit_of_privacy == "patient" else None
        # Decided by the job's label set, never by the data: which mechanism ran must not depend on it.
        observed_counts = label_sets.from_config(config.labels, config.data.modality).may_ignore
        noise = secret.secure_gaussian("class-counts", 0, [labels.shape[1] * (2 if observed_counts else 1)], 1.0)[0]
        release = release_prevalences(labels, records, plan.class_count_noise_std, noise, observed_counts)
        return (*prior_weights(release.prevalences), release)
    if weighting == "inverse_frequency":
        return (*inverse_frequency_weights(labels), None)
    if weighting == "public_prior":
        if len(config.training.class_prior) != labels.shape[1]:
            raise DpmedtfError(f"training.class_prior has {len(config.training.class_prior)} values for "
                               f"{labels.shape[1]} labels")
        return (*prior_weights(config.training.class_prior), None)
    ones = np.ones(labels.shape[1], np.float32)
    return ones, ones, None


def initial_ledger(config: JobConfig, plan: TrainingPlan, prepared: PreparedData, secret: RunSecret,
                   count_release) -> Ledger:
    pretraining = pretraining_of(config, prepared.cohort.label_set)
    ledger = plan.mechanism.new_ledger(epsilon_budget=plan.epsilon_budget, notes={
        **run_notes(experiment=secret.is_experiment, secure_rng=config.privacy.secure_rng,
                    engine=get_engine(plan.clipping)),
        "max_images_per_patient_per_step": plan.max_images_per_patient if plan.unit_of_privacy == "patient" else None,
        "images_per_patient_max": int(prepared.cohort.frame.loc[split_rows(prepared, "train")]
                                      .groupby("patient_id").size().max()),
        "allow_large_delta": config.privacy.allow_large_delta,
        "pretrained_weights": str(config.model.pretrained_weights) if config.model.pretrained_weights else None,
        "pretrained_on": pretraining.data if pretraining else None,
        "pretrained_label_set": pretraining.label_set if pretraining else None,
        "pretrained_head": pretraining.head if pretraining else None,
        "synthetic_data": prepared.cohort.synthetic,
        # Rows data.skip_bad left out as unreadable: the certificate's data section states them.
        "quarantined_rows": int(len(prepared.quarantine)),
        "quarantined_training_rows": int((prepared.quarantine["split"] == "train").sum())})
    if count_release is not None:
        ledger = ledger.with_release(count_release.ledger_release())
    if prepared.cohort.split_stratified_on_labels:
        ledger = ledger.with_non_dp_use("data split", "patients assigned to train/validation/test by a split stratified "
                                        "on their labels (which patients are trained on depends on the labels)",
                                        private_data_used=True)
    if len(prepared.quarantine):
        # Which files were unreadable is a fact about the private data, published exactly (the count in the
        # certificate, the list on the training machine): outside DP, like N itself, and said so.
        ledger = ledger.with_non_dp_use("quarantined rows", "the number of manifest rows left out as unreadable "
                                        "(data.skip_bad) is published exactly in the certificate's data section",
                                        private_data_used=True)
    if config.training.class_weights == "inverse_frequency":
        ledger = ledger.with_non_dp_use("class weights", "inverse class frequencies counted exactly on the training "
                                        "labels (every example's loss depends on every training label)",
                                        private_data_used=True)
    elif config.training.class_weights == "public_prior":
        ledger = ledger.with_non_dp_use("class weights", f"from public prevalences {list(config.training.class_prior)}",
                                        private_data_used=False)
    return ledger
