"""The DP reporting items of a release (Ponomareva et al. 2023, "How to DP-fy ML", Sec. 5.3) for its model card.

What a reader needs to judge a DP claim: the DP setting (unit of privacy, neighbouring relation, what
is protected), the accounting (accountant, ε, δ, and the composition of every DP release of the
training data), which parts of training are DP and which uses of private data are not, how the
hyperparameters were chosen, DP-SGD's noise, clipping, sampling and steps, the empirical checks that
ran (membership inference, canary audit), and what privacy cost in accuracy against the run's
non-private model. All of it comes from the certificate and the evaluation's records.
"""

from __future__ import annotations

from typing import Any, Mapping

from dpmedtf.release.layout import CERTIFICATE_FILE


def auroc_with_ci(row: Mapping[str, Any]) -> dict[str, Any]:
    """AUROC and its bootstrap interval, as the card states them everywhere."""
    return {"auroc": row.get("auroc"), "auroc_ci_low": row.get("auroc_ci_low"), "auroc_ci_high": row.get("auroc_ci_high")}


def privacy_section(certificate: Mapping[str, Any], certificate_sha256: str, metrics: Mapping[str, Any],
                    selected_from: int = 1) -> dict[str, Any]:
    """The card's ``privacy``: every DP reporting item of Ponomareva et al. 2023, Sec. 5.3, from the certificate."""
    secret = certificate["randomness"]["secret"]
    dp_parts = [m["what"] for m in certificate["mechanisms"]]
    uses = [dict(u) for u in certificate["non_dp_uses_of_private_data"]]
    return {
        "dp_setting": {
            "guarantee": ("(ε, δ)-differential privacy" if secret else
                          "NONE: a reproducible experiment (privacy.noise_seed); the figures describe the mechanism only"),
            "unit_of_privacy": certificate["unit_of_privacy"],
            "neighbouring_relation": dict(certificate["neighbouring_relation"]),
            "patient_level": dict(certificate["patient_level"]),
            "protects": "the trained weights and every intermediate model of training",
            "secret_randomness": secret,
        },
        "accounting": {
            "accountant": certificate["accountant"],
            "epsilon": certificate["epsilon"],
            "delta": certificate["delta"],
            "one_over_n": certificate["delta_vs_dataset_size"]["one_over_n"],
            "cross_check": dict(certificate["epsilon_cross_check"]),
            "composition": [{"what": m["what"], "how": m["how"], "epsilon_alone": m["epsilon_alone"]}
                            for m in certificate["mechanisms"]],
            "composition_note": ("ε is the composition of every DP release of the training data listed here "
                                 f"({', '.join(dp_parts)}), computed from the serialised DP event in "
                                 f"{CERTIFICATE_FILE}; the dataset size N is treated as public."),
        },
        "dp_training": {
            "dp_parts": dp_parts,
            "noise_multiplier": certificate["noise_multiplier"],
            "clip_norm": certificate["clip_norm"],
            "sampling": certificate["sampling"],
            "sampling_rate": certificate["sampling_rate"],
            "expected_batch_size": certificate["expected_batch_size"],
            "steps": certificate["steps"],
            "dataset_size": certificate["dataset_size"],
        },
        "non_dp_uses_of_private_data": uses,
        "hyperparameter_tuning": _tuning(selected_from),
        "public_pretraining": dict(certificate["public_pretraining"]),
        "statement": certificate["statement"],
        "certificate": {"file": CERTIFICATE_FILE, "sha256": certificate_sha256},
        "membership_inference": _membership_inference(metrics),
        "canary_audit": dict(certificate["empirical_audit"]) if certificate.get("empirical_audit") else None,
    }


def _tuning(selected_from: int) -> dict[str, Any]:
    statement = ("dpmedtf tuned no hyperparameter on the data: every value came from the job configuration. Whether "
                 "its author chose them by looking at results on this data is not recorded; if so, that choice used "
                 "private data outside DP and is not covered by ε.")
    if selected_from > 1:
        statement += (f" This model was chosen from {selected_from} trained models of one sweep; a choice guided by "
                      "their evaluation results used private data outside DP.")
    return {"tuned_by_dpmedtf": False, "models_selected_from": selected_from, "statement": statement}


def _membership_inference(metrics: Mapping[str, Any]) -> dict[str, Any] | None:
    result = metrics.get("membership_inference")
    if not isinstance(result, Mapping) or not isinstance(result.get("entire_dataset"), Mapping):
        return None
    return {"members": result.get("members"), "non_members": result.get("non_members"),
            **result["entire_dataset"],
            "meaning": "AUC 0.5 and advantage 0 mean chance (the attack cannot tell training images from test images "
                       "by the model's loss); higher values mean it can. An empirical check of one attack, not a proof "
                       "of privacy."}


def privacy_utility_tradeoff(metrics: Mapping[str, Any], baseline: Mapping[str, Any] | None,
                             certificate: Mapping[str, Any]) -> dict[str, Any] | None:
    """The model's test AUROC against the run's non-private model (None without one)."""
    if not baseline:
        return None

    def difference(private, public):
        return None if private is None or public is None else private - public

    private_mean, public_mean = metrics["mean"], baseline["mean"]
    return {
        "baseline": "non-private",
        "baseline_description": "the same job trained without DP in the same run (the paper's non-private regime), "
                                "evaluated on the same test split",
        "epsilon": certificate["epsilon"],
        "mean_auroc": {"private": auroc_with_ci(private_mean), "non_private": auroc_with_ci(public_mean),
                       "difference": difference(private_mean.get("auroc"), public_mean.get("auroc"))},
        "per_label": [{"label": name, "private_auroc": finding.get("auroc"),
                       "non_private_auroc": baseline["findings"].get(name, {}).get("auroc"),
                       "difference": difference(finding.get("auroc"), baseline["findings"].get(name, {}).get("auroc"))}
                      for name, finding in metrics["findings"].items()],
    }
