"""The numbers every part of a CLI training run agrees on, resolved once from the job and the data.

N, expected batch B, q = B/N, steps, σ and C are computed here and handed unchanged to the sampler,
the step and the ledger (through ``TrainingPlan.mechanism``). ``training.json`` records the plan.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from dpmedtf.config import JobConfig
from dpmedtf.data.cache import PreparedData
from dpmedtf.data.pipeline import split_rows
from dpmedtf.data.sampling import PatientPoissonSampler, PoissonSampler, ShuffledBatches
from dpmedtf.errors import DpmedtfError
from dpmedtf.privacy import accounting
from dpmedtf.privacy.class_counts import count_event
from dpmedtf.privacy.ledger import Ledger
from dpmedtf.privacy.mechanism import DpSgdMechanism


class BudgetExceededError(DpmedtfError):
    """The planned training would spend more ε than its budget."""


@dataclass(frozen=True)
class TrainingPlan:
    """The resolved numbers every part of a run agrees on."""

    dp: bool
    dataset_size: int
    """N: training records the sampler draws from (images, or patients)."""
    batch_size: int
    """Expected logical batch size B (records per step)."""
    steps: int
    """Total planned optimizer steps."""
    steps_per_epoch: float
    """N/B: an epoch is one expected pass over the data (epoch e ends at step round((e+1)·N/B))."""
    noise_multiplier: float | None
    clip_norm: float | None
    example_clip_norm: float | None
    """Clip norm per image: C, or C/k when a patient contributes up to k images per step."""
    max_images_per_patient: int
    unit_of_privacy: str
    delta: float | None
    accountant: str | None
    epsilon_budget: float | None
    planned_epsilon: float | None
    clipping: str | None = None
    """Per-example clipping engine with DP (a name in ``privacy.engines``)."""
    class_count_noise_std: float | None = None
    """With DP class counts: the noise on each count; their event is composed before DP-SGD's."""
    num_labels: int = 1
    allow_large_delta: bool = False

    @property
    def prior_event(self):
        """DP releases of the training data made before DP-SGD (the class counts), or None."""
        return count_event(self.class_count_noise_std, self.num_labels) if self.class_count_noise_std else None

    @property
    def sampling_rate(self) -> float:
        return self.batch_size / self.dataset_size

    @property
    def mechanism(self) -> DpSgdMechanism | None:
        """The DP-SGD mechanism of this plan (None without DP)."""
        if not self.dp:
            return None
        return DpSgdMechanism(dataset_size=self.dataset_size, expected_batch_size=self.batch_size,
                              clip_norm=self.clip_norm, noise_multiplier=self.noise_multiplier, delta=self.delta,
                              accountant=self.accountant, unit=self.unit_of_privacy,
                              max_examples_per_record=self.max_images_per_patient,
                              allow_large_delta=self.allow_large_delta, prior_event=self.prior_event)


def plan_training(config: JobConfig, prepared: PreparedData) -> TrainingPlan:
    """N, B, steps and (for DP) σ calibrated so that the target ε is reached exactly at the last step."""
    train = prepared.cohort.frame.loc[split_rows(prepared, "train")]
    privacy, training = config.privacy, config.training
    num_labels = prepared.cohort.labels(train.iloc[:1]).shape[1]
    patient_unit = privacy.enabled and privacy.unit == "patient"
    dataset_size = train["patient_id"].nunique() if patient_unit else len(train)
    batch_size = training.batch_size
    if batch_size > dataset_size:
        raise DpmedtfError(f"training.batch_size {batch_size} exceeds the {dataset_size} training "
                           f"{'patients' if patient_unit else 'images'}; lower it")
    steps = training.steps or accounting.steps_for_epochs(dataset_size, batch_size, training.epochs)
    steps_per_epoch = dataset_size / batch_size
    if not privacy.enabled:
        return TrainingPlan(False, dataset_size, batch_size, steps, steps_per_epoch, None, None, None, 1,
                            "none", None, None, None, None, num_labels=num_labels)
    count_noise = training.class_count_noise_std if training.class_weights == "dp_counts" else None
    k = privacy.max_images_per_patient if patient_unit else 1
    settings = dict(dataset_size=dataset_size, expected_batch_size=batch_size, clip_norm=privacy.clip_norm,
                    delta=privacy.delta, accountant=privacy.accountant, unit=privacy.unit, max_examples_per_record=k,
                    allow_large_delta=privacy.allow_large_delta,
                    prior_event=count_event(count_noise, num_labels) if count_noise else None)
    if privacy.target_epsilon is not None:
        # σ as the float32 graph applies it (σ·C rounded up): plan, ledger and certificate carry that σ.
        mechanism = DpSgdMechanism.calibrated(target_epsilon=privacy.target_epsilon, steps=steps, **settings)
        budget = privacy.epsilon_budget if privacy.epsilon_budget is not None else privacy.target_epsilon
    else:
        mechanism = DpSgdMechanism.with_noise(noise_multiplier=privacy.noise_multiplier, **settings)
        budget = privacy.epsilon_budget
    return TrainingPlan(True, dataset_size, batch_size, steps, steps_per_epoch, float(mechanism.noise_multiplier),
                        privacy.clip_norm, mechanism.example_clip_norm, k, privacy.unit, privacy.delta,
                        privacy.accountant, budget, mechanism.epsilon(steps), training.clipping, count_noise,
                        num_labels, privacy.allow_large_delta)


def stop_step_within_budget(config: JobConfig, plan: TrainingPlan, ledger: Ledger | None, start_step: int) -> int:
    """The plan's last step, or the last one within the ε budget (``training.stop_at_budget``)."""
    if not plan.dp or plan.epsilon_budget is None:
        return plan.steps
    fits = ledger.max_steps_within_budget(plan.steps - start_step, plan.sampling_rate, plan.noise_multiplier)
    if fits == plan.steps - start_step:
        return plan.steps
    message = (f"the plan's {plan.steps} steps would spend ε = {plan.planned_epsilon:.4g} > budget "
               f"{plan.epsilon_budget:g}; only {start_step + fits} steps fit")
    if not config.training.stop_at_budget:
        raise BudgetExceededError(message + ". Lower epochs/steps, raise noise, or set training.stop_at_budget: true "
                                  "to stop there")
    print(f"note: {message}; training stops at step {start_step + fits}", file=sys.stderr)
    return start_step + fits


def sampler_for(config: JobConfig, plan: TrainingPlan, prepared: PreparedData, secret):
    """Poisson sampling over images or patients from the run's secret with DP; seeded shuffling without."""
    if not plan.dp:
        return ShuffledBatches(plan.dataset_size, plan.batch_size, plan.steps, config.training.seed)
    if plan.unit_of_privacy == "patient":
        patients = tuple(prepared.cohort.frame.loc[split_rows(prepared, "train"), "patient_id"])
        return PatientPoissonSampler(patients, plan.batch_size, plan.steps, secret, plan.max_images_per_patient)
    return PoissonSampler(plan.dataset_size, plan.batch_size, plan.steps, secret)


def plan_summary(plan: TrainingPlan, start_step: int, stop_step: int, prepared: PreparedData, strategy) -> str:
    """The line a run prints before its first step."""
    text = (f"{'DP-SGD' if plan.dp else 'non-private training'}: N = {plan.dataset_size} "
            f"{'patients' if plan.unit_of_privacy == 'patient' else 'images'}, B = {plan.batch_size} "
            f"(q = {plan.sampling_rate:.4g}), steps {start_step}→{stop_step} of {plan.steps}")
    if plan.dp:
        text += (f", σ = {plan.noise_multiplier:.5g}, C = {plan.clip_norm:g}, planned ε = {plan.planned_epsilon:.4g} "
                 f"at δ = {plan.delta:g} ({plan.accountant})")
    if strategy.num_replicas_in_sync > 1:
        text += f", on {strategy.num_replicas_in_sync} replicas ({type(strategy).__name__})"
    return text + (" — on SYNTHETIC data" if prepared.cohort.synthetic else "")
