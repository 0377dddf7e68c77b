"""The model card's content, as one machine-readable document (``model_card.json``).

Its sections follow three conventions at once, so that each kind of reader finds what it looks for:
the Hugging Face model card (details, intended and out-of-scope use, training data, training
procedure, evaluation, limitations, licence, citation, contact), the fields of Google's Model Card
Toolkit that apply (``model_details``, ``considerations``, ``quantitative_analysis`` in its shapes),
and the DP reporting items of Ponomareva et al. 2023, "How to DP-fy ML", Sec. 5.3 (``privacy``, from
``dp_reporting``: the unit of privacy, the accounting and what it composes, which parts of training are
DP and which uses of private data are not, hyperparameter tuning, and the DP-SGD parameters).

Every number comes from a record of the run (the training record, the certificate, the evaluation's
metrics and fairness report, a non-private baseline when the run trained one); the Markdown and HTML
cards are renderings of this document (``card_rendering``), so the three never disagree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from dpmedtf.release.dp_reporting import auroc_with_ci, privacy_section, privacy_utility_tradeoff
from dpmedtf.release.layout import FAIRNESS_FILE

SCHEMA_VERSION = "1.0"
SCHEMA_FILE = "model_card.schema.json"
NOT_GIVEN = "not given"
SYNTHETIC_NOTICE = "SYNTHETIC DATA: generated images, not patients; no clinical claim rests on these numbers."

METHOD_CITATION = ("Tayebi Arasteh S, Ziller A, Kuhl C, Makowski M, Nebelung S, Braren R, Rueckert D, Truhn D, "
                   "Kaissis G. Preserving fairness and diagnostic accuracy in private large-scale AI models for "
                   "medical imaging. Commun Med 4, 46 (2024). https://doi.org/10.1038/s43856-024-00462-6")
"""The paper whose method dpmedtf implements: every card cites it, whatever the release managers add."""
REFERENCES = (
    {"title": "Tayebi Arasteh, Ziller et al., Preserving fairness and diagnostic accuracy in private large-scale "
              "AI models for medical imaging, Commun Med 4:46 (2024) — the method",
     "reference": "https://doi.org/10.1038/s43856-024-00462-6"},
    {"title": "Ponomareva et al., How to DP-fy ML: A Practical Guide to Machine Learning with Differential "
              "Privacy (2023) — the DP reporting items of this card (Sec. 5.3)",
     "reference": "https://arxiv.org/abs/2303.00654"},
    {"title": "Mitchell et al., Model Cards for Model Reporting (2019) — the card's structure",
     "reference": "https://arxiv.org/abs/1810.03993"},
)
_SPDX_LIKE = re.compile(r"^[A-Za-z0-9.+-]+$")
_FIGURE_TITLES = {"roc_curves": "ROC curve per label, the validation-chosen threshold marked",
                  "reliability": "Reliability (calibration) diagram per label, with its ECE",
                  "confusion_matrices": "TP/FP/FN/TN counts per label at the threshold"}


@dataclass(frozen=True, kw_only=True)
class CardDetails:
    """What release managers state about a model that no record of the run holds (job section ``release:``)."""

    owners: tuple[str, ...] = ()
    """People or teams answerable for the model."""
    license: str = "unspecified — ask the owners"
    """An SPDX identifier or a sentence."""
    contact: str | None = None
    """Where users report problems; None: the card says so."""
    citation: str | None = None
    """How to cite this model, in addition to the method's paper."""
    limitations: tuple[str, ...] = ()
    """Extra limitation lines, after the card's own."""

    @classmethod
    def from_release_config(cls, settings: Any) -> "CardDetails":
        return cls(owners=tuple(settings.owners or ()), license=settings.license, contact=settings.contact,
                   citation=settings.citation, limitations=tuple(settings.limitations or ()))


@dataclass(frozen=True, kw_only=True)
class CardInputs:
    """Everything the card is built from, each a record the bundle or the run directory holds."""

    title: str
    training: Mapping[str, Any]
    """The training record (``training.json``): its ``config`` (resolved job) and ``plan`` (what ran)."""
    metrics: Mapping[str, Any]
    fairness_report: Mapping[str, Any]
    metadata: Mapping[str, Any]
    certificate: Mapping[str, Any]
    certificate_sha256: str
    intended_use: str
    details: CardDetails = CardDetails()
    selected_from: int = 1
    """How many trained models of the job the released one was chosen from."""
    baseline_metrics: Mapping[str, Any] | None = None
    """The evaluation of the job's non-private model, when its sweep trained one."""
    figures: tuple[str, ...] = ()
    """File names of the evaluation figures inside the bundle."""


def build_model_card(inputs: CardInputs) -> dict[str, Any]:
    """``model_card.json``: every section of the card, from the run's records."""
    certificate, metadata = inputs.certificate, inputs.metadata
    return {
        "schema_version": SCHEMA_VERSION,
        "model_details": _model_details(inputs),
        "intended_use": {
            "primary_uses": [inputs.intended_use] if inputs.intended_use else [],
            "primary_users": _users(metadata),
            "out_of_scope_uses": _out_of_scope(metadata),
        },
        "training_data": _training_data(inputs),
        "training_procedure": _training_procedure(inputs),
        "evaluation": _evaluation(inputs.metrics),
        "subgroup_results": _subgroup_results(inputs.fairness_report),
        "privacy": privacy_section(certificate, inputs.certificate_sha256, inputs.metrics, inputs.selected_from),
        "privacy_utility_tradeoff": privacy_utility_tradeoff(inputs.metrics, inputs.baseline_metrics, certificate),
        "release_policy": {**metadata["release"]["policy"], "outcome": _policy_outcome(metadata["release"]),
                           "violations": list(metadata["release"]["violations"]),
                           "override": metadata["release"]["override"]},
        "considerations": _considerations(inputs),
        "quantitative_analysis": _quantitative_analysis(inputs),
    }


# --- model details -------------------------------------------------------------------------------------

def _architecture_name(metadata: Mapping[str, Any]) -> str:
    if metadata["model"]["architecture"] != "resnet9":
        return metadata["model"]["architecture"]
    return f"GroupNorm ResNet9 ({'2D' if metadata['preprocessing']['modality'] == 'radiograph' else 'ACS-3D'})"


def _licenses(text: str) -> list[dict[str, str]]:
    # The Model Card Toolkit separates SPDX identifiers from free text; a single token is taken as an identifier.
    return [{"identifier": text}] if _SPDX_LIKE.match(text) else [{"custom_text": text}]


def _model_details(inputs: CardInputs) -> dict[str, Any]:
    metadata, certificate, details = inputs.metadata, inputs.certificate, inputs.details
    overview = (f"{_architecture_name(metadata)} with {metadata['model']['parameters']:,} parameters for "
                f"{metadata['task']} ({len(metadata['labels'])} label(s): {', '.join(metadata['labels'])}), "
                f"trained with DP-SGD: (ε = {certificate['epsilon']:.4g}, δ = {certificate['delta']:g})-differential "
                f"privacy per {certificate['unit_of_privacy']}. Method of Tayebi Arasteh, Ziller et al. (2024).")
    citations = [{"style": "text", "citation": METHOD_CITATION}]
    if details.citation:
        citations.insert(0, {"style": "text", "citation": details.citation})
    return {
        "name": inputs.title,
        "overview": overview,
        "version": {"name": metadata["model_version"], "date": metadata["created_at"]},
        "owners": [{"name": owner} for owner in details.owners],
        "licenses": _licenses(details.license),
        "references": [dict(r) for r in REFERENCES],
        "citations": citations,
        "contact": details.contact,
        "task": metadata["task"],
        "architecture": {"name": _architecture_name(metadata), "parameters": metadata["model"]["parameters"],
                         "activation": metadata["model"]["activation"]},
        "input": dict(metadata["input"]),
        "output": dict(metadata["output"]),
        "labels": list(metadata["labels"]),
        "thresholds": dict(metadata["thresholds"]),
        "dpmedtf_version": metadata["dpmedtf_version"],
        "synthetic_data": bool(metadata["synthetic_data"]),
    }


def _users(metadata: Mapping[str, Any]) -> list[str]:
    images = "chest radiographs" if metadata["preprocessing"]["modality"] == "radiograph" else "abdominal CT volumes"
    return [f"radiologists and clinicians reading {images}, as decision support they check",
            "researchers evaluating differentially private diagnostic models"]


def _out_of_scope(metadata: Mapping[str, Any]) -> list[str]:
    uses = ["Stand-alone diagnosis, triage or any decision without a qualified clinician reading the images.",
            "Populations, devices, projections or protocols unlike the training data (children; lateral or portable "
            "radiographs; contrast phases or scanners not represented), which were not evaluated.",
            "Inputs that did not go through exactly the preprocessing of this card (`dpmedtf predict` applies it).",
            "Any conclusion about individual training patients."]
    if metadata["synthetic_data"]:
        uses.insert(0, "Any clinical use: this model was trained and evaluated on SYNTHETIC images.")
    return uses


# --- data and training ---------------------------------------------------------------------------------

def _unit_plural(unit: str) -> str:
    return {"patient": "patients", "example": "training examples"}.get(unit, "images")


def _training_data(inputs: CardInputs) -> dict[str, Any]:
    certificate, metadata = inputs.certificate, inputs.metadata
    unit, n = certificate["unit_of_privacy"], certificate["dataset_size"]
    synthetic = bool(metadata["synthetic_data"])
    return {
        "description": (f"The training split: {n:,} {_unit_plural(unit)}. "
                        + ("A SYNTHETIC cohort generated by dpmedtf (no patients)." if synthetic else
                           "Its composition is in the job's cohort table, kept with the run, not in this bundle.")),
        "split": "train",
        "dataset_size": n,
        "unit": unit,
        "max_images_per_patient": certificate["images_per_patient"]["max_in_training_set"],
        "split_method": "patient-wise: all images of a patient are in one split",
        "synthetic_data": synthetic,
        "labels": list(metadata["labels"]),
        "preprocessing": list(metadata["preprocessing"]["steps"]),
    }


def _training_procedure(inputs: CardInputs) -> dict[str, Any]:
    """The hyperparameters: DP-SGD's from the certificate (what ran), the rest from the training record."""
    certificate = inputs.certificate
    config, plan = inputs.training.get("config", {}), inputs.training.get("plan", {})
    training, model = config.get("training", {}), config.get("model", {})
    per_epoch = plan.get("steps_per_epoch")
    pretrained = model.get("pretrained_weights")
    return {
        "regime": "DP-SGD",
        "optimizer": training.get("optimizer"),
        "learning_rate": training.get("learning_rate"),
        "expected_batch_size": certificate["expected_batch_size"],
        "max_physical_batch": training.get("max_physical_batch"),
        "steps": certificate["steps"],
        "epochs": round(certificate["steps"] / per_epoch, 3) if per_epoch else None,
        "clip_norm": certificate["clip_norm"],
        "example_clip_norm": plan.get("example_clip_norm"),
        "noise_multiplier": certificate["noise_multiplier"],
        "sampling": certificate["sampling"],
        "sampling_rate": certificate["sampling_rate"],
        "clipping_engine": plan.get("clipping"),
        "clipping_engine_description": certificate["clipping"].get("engine"),
        "unit_of_privacy": certificate["unit_of_privacy"],
        "max_images_per_patient_per_step": certificate["images_per_patient"]["max_per_step"],
        "accountant": certificate["accountant"],
        "target_epsilon": plan.get("epsilon_budget"),
        "delta": certificate["delta"],
        "class_weights": training.get("class_weights"),
        "class_count_noise_std": plan.get("class_count_noise_std") if training.get("class_weights") == "dp_counts" else None,
        "augmentation": training.get("augment"),
        "activation": model.get("activation"),
        "group_norm_groups": model.get("groups"),
        "scale_norm": model.get("scale_norm"),
        # The weights' file name says which public model was used; where it lay on the build machine does not.
        "pretrained_weights": re.split(r"[\\/]", str(pretrained))[-1] if pretrained else None,
        "pretrained_on": model.get("pretrained_on"),
    }


# --- evaluation ----------------------------------------------------------------------------------------

def _evaluation(metrics: Mapping[str, Any]) -> dict[str, Any]:
    bootstrap = metrics.get("bootstrap", {})
    mean = metrics["mean"]
    return {
        "data": {"split": metrics.get("split", "test"), "n": metrics["n"],
                 "description": f"The held-out test split ({metrics['n']:,} images, no patient shared with training "
                                "or validation)."},
        "thresholds_chosen_on": metrics.get("thresholds_chosen_on", "validation split (Youden index)"),
        "confidence_intervals": {"method": "bootstrap over the test split", "redraws": bootstrap.get("redraws"),
                                 "interval": bootstrap.get("interval")},
        "metrics": [{"label": name, **auroc_with_ci(f), "threshold": f.get("threshold"), "sensitivity": f.get("sensitivity"),
                     "specificity": f.get("specificity"), "accuracy": f.get("accuracy"),
                     "n_positive": f.get("n_positive")} for name, f in metrics["findings"].items()],
        "mean": {**auroc_with_ci(mean), "sensitivity": mean.get("sensitivity"), "specificity": mean.get("specificity"),
                 "accuracy": mean.get("accuracy")},
    }


def _subgroup_results(report: Mapping[str, Any]) -> dict[str, Any]:
    rows = [{"attribute": r["attribute"], "group": str(r["group"]), "n": r["n"], **auroc_with_ci(r),
             "accuracy": r.get("accuracy"), "statistical_parity_difference": r.get("statistical_parity_difference"),
             "fnr": r.get("fnr"), "fpr": r.get("fpr"), "warning": r.get("warning")}
            for r in report["rows"] if r["finding"] == "mean"]
    return {"averaged_over": "labels (the fairness report's rows with finding 'mean')",
            "statistical_parity_difference": "accuracy of the group − accuracy of everyone else",
            "full_report": FAIRNESS_FILE,
            "rows": rows,
            "unreliable_groups": [f"{r['attribute']} = {r['group']}" for r in rows if r["warning"]]}


def _policy_outcome(release: Mapping[str, Any]) -> str:
    if release["override"]:
        return "released with an explicit override"
    return "meets every rule"


# --- considerations (Model Card Toolkit) ---------------------------------------------------------------

def _limitations(inputs: CardInputs) -> list[str]:
    certificate, metadata = inputs.certificate, inputs.metadata
    unit = certificate["unit_of_privacy"]
    lines = [
        f"AUROC and subgroup numbers come from one test split of {inputs.metrics['n']:,} images; their confidence "
        "intervals are bootstrap intervals over that split and do not cover other sites or populations.",
        f"Differential privacy protects the training {_unit_plural(unit)}; it bounds what the model weights reveal "
        "about any one of them, not what the published evaluation statistics reveal (those used private test data "
        "outside DP, as the certificate lists).",
        "DP training lowers accuracy most for labels and subgroups with few examples; check the subgroup table "
        "before relying on the model for a group.",
    ]
    patient = certificate["patient_level"]
    if unit != "patient":
        lines.append(f"The unit of privacy is one {unit}: a patient with several images is protected only by group "
                     + (f"privacy (ε = {patient['epsilon']:.4g})." if patient.get("epsilon") is not None else
                        "privacy, for which no finite bound is certified."))
    unreliable = [f"{r['attribute']} = {r['group']}" for r in inputs.fairness_report["rows"]
                  if r["finding"] == "mean" and r.get("warning")]
    if unreliable:
        lines.append("Too few positive or negative test examples for reliable numbers in: " + ", ".join(unreliable) + ".")
    if metadata["synthetic_data"]:
        lines.append("Trained and evaluated on SYNTHETIC images: these numbers say nothing about performance on patients.")
    return lines + list(inputs.details.limitations)


def _tradeoff_lines(inputs: CardInputs) -> list[str]:
    tradeoff = privacy_utility_tradeoff(inputs.metrics, inputs.baseline_metrics, inputs.certificate)
    epsilon = inputs.certificate["epsilon"]
    if tradeoff is None:
        first = (f"Privacy against accuracy: this run trained no non-private baseline, so the accuracy given up for "
                 f"ε = {epsilon:.4g} was not measured here (a sweep with privacy.sweep_non_private measures it).")
    else:
        mean = tradeoff["mean_auroc"]
        first = (f"Privacy against accuracy: at ε = {epsilon:.4g} the mean test AUROC is "
                 f"{_fmt(mean['private']['auroc'])} against {_fmt(mean['non_private']['auroc'])} for the non-private "
                 f"model of the same run (difference {_fmt(mean['difference'], signed=True)}).")
    return [first, "A smaller ε protects the training patients more and costs more accuracy; the method paper "
                   "(Tayebi Arasteh, Ziller et al. 2024) found DP training largely did not amplify discrimination by "
                   "age or sex, but this must be checked per model in the subgroup results."]


def _considerations(inputs: CardInputs) -> dict[str, Any]:
    return {
        "users": [{"description": u} for u in _users(inputs.metadata)],
        "use_cases": [{"description": inputs.intended_use}] if inputs.intended_use else [],
        "limitations": [{"description": line} for line in _limitations(inputs)],
        "tradeoffs": [{"description": line} for line in _tradeoff_lines(inputs)],
        "ethical_considerations": [
            {"name": "Privacy of the patients whose images trained the model",
             "mitigation_strategy": "DP-SGD with the certified (ε, δ) above; uses of private data outside DP are listed "
                                    "in the certificate and this card."},
            {"name": "Unequal performance across patient groups (underdiagnosis)",
             "mitigation_strategy": "Subgroup AUROC, parity difference and FNR are published; the release policy "
                                    "limits worst-group AUROC and parity difference, and any override is recorded."},
            {"name": "Automation bias: outputs taken as diagnoses",
             "mitigation_strategy": "Intended only as decision support read by a clinician; stand-alone use is out of "
                                    "scope."},
        ],
    }


def _fmt(value, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


# --- quantitative analysis (Model Card Toolkit's shape of the same numbers) ----------------------------

def _metric(kind: str, value, slice_: str, low=None, high=None) -> dict[str, Any]:
    entry = {"type": kind, "value": value, "slice": slice_}
    if low is not None or high is not None:
        entry["confidence_interval"] = {"lower_bound": low, "upper_bound": high}
    return entry


def _figure_title(name: str) -> str:
    stem = name.rsplit(".", 1)[0]
    if stem.startswith("subgroups_"):
        return f"AUROC and underdiagnosis (FNR) by {stem.removeprefix('subgroups_').replace('_', ' ')}, with CIs"
    return _FIGURE_TITLES.get(stem, stem.replace("_", " "))


def _figure_order(name: str) -> tuple[int, str]:
    """Whole-model figures first, in the order a reader needs them, then the subgroup ones."""
    stem = name.rsplit(".", 1)[0]
    known = list(_FIGURE_TITLES)
    return (known.index(stem) if stem in known else len(known), name)


def _quantitative_analysis(inputs: CardInputs) -> dict[str, Any]:
    metrics = inputs.metrics
    entries = []
    for name, finding in [*metrics["findings"].items(), ("mean", metrics["mean"])]:
        entries.append(_metric("AUROC", finding.get("auroc"), f"test / {name}", finding.get("auroc_ci_low"),
                               finding.get("auroc_ci_high")))
        entries += [_metric(kind, finding.get(kind), f"test / {name}") for kind in ("sensitivity", "specificity")]
    for row in _subgroup_results(inputs.fairness_report)["rows"]:
        slice_ = f"test / {row['attribute']} = {row['group']} / mean"
        entries.append(_metric("AUROC", row["auroc"], slice_, row["auroc_ci_low"], row["auroc_ci_high"]))
        entries += [_metric("statistical parity difference", row["statistical_parity_difference"], slice_),
                    _metric("false negative rate", row["fnr"], slice_)]
    return {"performance_metrics": entries,
            "graphics": {"description": "figures of the model's evaluation, files of this bundle",
                         "collection": [{"name": _figure_title(f), "image": f}
                                        for f in sorted(inputs.figures, key=_figure_order)]}}

