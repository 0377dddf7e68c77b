"""The privacy certificate: what the released model's DP guarantee is, built only from the training ledger.

Nothing here is re-typed from a config: ε is recomputed from the ledger's composed DpEvent, and every
DP-SGD parameter comes from the ledger's segments. The certificate also states what the guarantee is
*not* about — every use of the private data outside DP-SGD — so that a reader never mistakes ε for
the whole story. ``check_consistency`` is the verifier's half: it recomputes ε from the certificate's
own serialised event and cross-checks the event against the stated parameters.
"""

from __future__ import annotations

import datetime as _datetime
import json
import math
import platform
from importlib import metadata
from typing import Any, Mapping

from dpmedtf.errors import DpmedtfError
from dpmedtf.privacy import accounting
from dpmedtf.privacy.group import patient_level
from dpmedtf.privacy.ledger import Ledger

SCHEMA_VERSION = "1.1"
EPSILON_RELATIVE_TOLERANCE = 1e-6
SOFTWARE = ("dpmedtf", "tensorflow", "tensorflow-privacy", "dp-accounting", "tf2onnx", "onnx", "onnxruntime",
            "fairlearn", "numpy")

RELATION_TEXT = {
    "image": "datasets that differ by adding or removing one image",
    "example": "datasets that differ by adding or removing one training example",
    "patient": "datasets that differ by adding or removing all images of one patient",
}


class CertificateError(DpmedtfError):
    """A certificate that cannot be issued, or whose numbers do not hold together."""


def software_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in SOFTWARE:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def build_certificate(ledger: Ledger, extra_non_dp_uses: tuple[dict, ...] = ()) -> dict[str, Any]:
    """The certificate for a model whose training is recorded in ``ledger``.

    ``extra_non_dp_uses`` are uses of private data after training (thresholds chosen on validation
    data, metrics published from the test split, model selection), in the ledger's {what, how,
    private_data_used} form.
    """
    if not ledger.segments:
        raise CertificateError("the ledger records no DP-SGD step: there is no privacy guarantee to certify")
    parameters = {(s.sampling_rate, s.noise_multiplier, s.clip_norm) for s in ledger.segments}
    if len(parameters) != 1:
        # Training refuses to resume with other settings, so this is a ledger edited by hand.
        raise CertificateError(f"the ledger mixes {len(parameters)} DP-SGD settings; a certificate describes one")
    ((sampling_rate, noise_multiplier, clip_norm),) = parameters
    event = ledger.dp_event()
    epsilon, details = accounting.epsilon_of_event(event, ledger.delta, ledger.accountant)
    other = "rdp" if ledger.accountant == "pld" else "pld"
    notes = dict(ledger.notes)
    one_over_n = 1.0 / ledger.dataset_size
    unit = ledger.unit_of_privacy
    uses = [*ledger.non_dp_uses, *extra_non_dp_uses]
    certificate = {
        "schema_version": SCHEMA_VERSION,
        "epsilon": epsilon,
        "delta": ledger.delta,
        "accountant": ledger.accountant,
        "accountant_details": details,
        "unit_of_privacy": unit,
        "neighbouring_relation": {"name": accounting.NEIGHBORING_RELATION, "description": RELATION_TEXT[unit]},
        "sampling": accounting.SAMPLING,
        "sampling_rate": sampling_rate,
        "expected_batch_size": ledger.batch_size,
        "noise_multiplier": noise_multiplier,
        "clip_norm": clip_norm,
        "steps": ledger.steps,
        "dataset_size": ledger.dataset_size,
        "epsilon_budget": ledger.epsilon_budget,
        "dp_event": accounting.dp_event_to_json(event),
        "epsilon_cross_check": {"accountant": other,
                                "epsilon": accounting.epsilon_of_event(event, ledger.delta, other)[0]},
        "mechanisms": _mechanisms(ledger),
        "patient_level": patient_level(ledger),
        "randomness": {"secret": notes.get("randomness") == "secret", "source": notes.get("randomness_source"),
                       "sampling": notes.get("sampling_rng"), "noise": notes.get("noise_rng")},
        "scope": {
            "all_intermediate_models": "ε covers the whole sequence of models training produced (every checkpoint), "
                                       "not only the released one",
            "dataset_size": f"N = {ledger.dataset_size:,} is treated as public (the sampling rate q = B/N is published)",
        },
        "delta_vs_dataset_size": {"one_over_n": one_over_n, "delta_below_one_over_n": ledger.delta < one_over_n,
                                  "large_delta_explicitly_allowed": bool(notes.get("allow_large_delta"))},
        "images_per_patient": {"max_in_training_set": notes.get("images_per_patient_max"),
                               "max_per_step": notes.get("max_images_per_patient_per_step")},
        "non_dp_uses_of_private_data": uses,
        "public_pretraining": {"weights": notes.get("pretrained_weights"), "data": notes.get("pretrained_on"),
                               # The body's label set (its findings) and whether the head was carried or new.
                               "label_set": notes.get("pretrained_label_set"), "head": notes.get("pretrained_head")},
        "noise": {"generator": notes.get("noise_rng"), "normalisation": notes.get("normalisation"),
                  "added": notes.get("noise_added")},
        "clipping": {"engine": notes.get("clipping_engine")},
        "synthetic_data": bool(notes.get("synthetic_data")),
        "data": _data_section(notes, ledger.dataset_size),
        "software": software_versions(),
        "issued_at": _datetime.datetime.now(_datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    certificate["statement"] = plain_statement(certificate)
    return certificate


def _data_section(notes: Mapping[str, Any], dataset_size: int) -> dict[str, Any]:
    """What the training data were, beyond N: the manifest rows data.skip_bad quarantined as unreadable
    (null when the ledger predates recording them)."""
    quarantined, in_training = notes.get("quarantined_rows"), notes.get("quarantined_training_rows")
    if quarantined is None:
        statement = "Whether data.skip_bad left manifest rows out was not recorded in the training ledger."
    elif quarantined == 0:
        statement = "Every manifest row was read; none was quarantined."
    else:
        statement = (f"{quarantined} manifest row(s) were quarantined as unreadable (data.skip_bad) and left out, "
                     f"{in_training} of them from the training split; N = {dataset_size:,} counts only the records "
                     "trained on.")
    return {"quarantined_rows": quarantined, "quarantined_training_rows": in_training, "statement": statement}


def _mechanisms(ledger: Ledger) -> list[dict[str, Any]]:
    """Each DP release of the training data with its own event and ε alone (the headline ε composes them)."""
    parts = [{"what": r.what, "how": r.how, "dp_event": r.dp_event,
              "epsilon_alone": accounting.epsilon_of_event(r.event(), ledger.delta, ledger.accountant)[0]}
             for r in ledger.releases]
    sgd = ledger.dp_sgd_event()
    parts.append({"what": "DP-SGD", "how": "Poisson-sampled, clipped, Gaussian-noised gradient steps",
                  "dp_event": accounting.dp_event_to_json(sgd),
                  "epsilon_alone": accounting.epsilon_of_event(sgd, ledger.delta, ledger.accountant)[0]})
    return parts


def plain_statement(certificate: Mapping[str, Any]) -> str:
    unit = certificate["unit_of_privacy"]
    who = {"patient": "patient (all of that patient's images)", "example": "training example"}.get(unit, "image")
    n = certificate["dataset_size"]
    if not certificate["randomness"]["secret"]:
        return ("NO DIFFERENTIAL PRIVACY GUARANTEE APPLIES: this was a reproducible experiment whose batch sampling "
                "and noise were fixed by privacy.noise_seed, a value in the job file; anyone holding it can "
                "reproduce every random draw of the mechanism. The ε figures below describe the mechanism's "
                "parameters only. Do not release this model as private."
                + (" The training data were SYNTHETIC (generated images, not patients)." if certificate["synthetic_data"] else ""))
    private_uses = [u["what"] for u in certificate["non_dp_uses_of_private_data"] if u["private_data_used"]]
    releases = [m["what"] for m in certificate["mechanisms"] if m["what"] != "DP-SGD"]
    text = (f"This model was trained with differentially private SGD (DP-SGD) on {n:,} "
            f"{ {'patient': 'patients', 'example': 'training examples'}.get(unit, 'images')}"
            + (f" (and a DP release of its {', '.join(releases)}, included in ε)" if releases else "") + ". "
            + ("Apart from the uses of private data listed at the end, for" if private_uses else "For")
            + f" any single {who}, whether or not it was in the training data changes the probability of any "
            f"set of trained models (every intermediate model included) by at most a factor of "
            f"e^ε = {math.exp(certificate['epsilon']):.4g} (ε = {certificate['epsilon']:.4g}), except with "
            f"probability δ = {certificate['delta']:g}. Each of the {certificate['steps']:,} steps drew a Poisson "
            f"sample of the training set (rate {certificate['sampling_rate']:.4g}) from a secret random key, "
            f"clipped every example's gradient to norm {certificate['clip_norm']:g} and added Gaussian noise of "
            f"standard deviation {certificate['noise_multiplier']:.5g} × {certificate['clip_norm']:g}; ε was "
            f"computed by the {certificate['accountant'].upper()} accountant of dp_accounting "
            f"({certificate['epsilon_cross_check']['accountant'].upper()} gives "
            f"{certificate['epsilon_cross_check']['epsilon']:.4g}). The dataset size N is treated as public.")
    patient = certificate["patient_level"]
    if unit == "image" and (patient.get("max_images_per_patient") or 1) > 1:
        level = (f"ε = {patient['epsilon']:.4g} at δ = {patient['delta']:g} (group privacy)"
                 if patient["epsilon"] is not None else "not bounded by group privacy at this δ")
        text += (f" The unit of privacy is one image; for a patient with up to {patient['max_images_per_patient']} "
                 f"images the guarantee is {level}.")
    elif unit == "example" and patient.get("max_images_per_patient") is None:
        text += (" The unit of privacy is one training example; how many examples one person contributed was not "
                 "stated, so no guarantee for a person with several examples is certified.")
    elif unit == "example" and patient["max_images_per_patient"] > 1:
        level = (f"ε = {patient['epsilon']:.4g} at δ = {patient['delta']:g} (group privacy)"
                 if patient["epsilon"] is not None else "not bounded by group privacy at this δ")
        text += (f" The unit of privacy is one training example; for a person with up to "
                 f"{patient['max_images_per_patient']} examples the guarantee is {level}.")
    elif unit == "patient":
        text += (" Each sampled patient's whole contribution to a step was clipped to norm "
                 f"{certificate['clip_norm']:g} (each of up to {certificate['images_per_patient']['max_per_step']} "
                 f"images to {certificate['clip_norm']:g}/{certificate['images_per_patient']['max_per_step']}).")
    if not certificate["delta_vs_dataset_size"]["delta_below_one_over_n"]:
        text += (" WARNING: δ is not below 1/N, so the guarantee permits revealing a whole record; this was "
                 "accepted explicitly.")
    if private_uses:
        text += (" Not covered by ε, because they used private data outside DP: "
                 + "; ".join(private_uses) + ".")
    if certificate["synthetic_data"]:
        text += " The training data were SYNTHETIC (generated images, not patients)."
    return text


def check_consistency(certificate: Mapping[str, Any]) -> list[str]:
    """Problems with a certificate's internal arithmetic (empty when it holds together)."""
    try:
        return _consistency_problems(certificate)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, ZeroDivisionError) as exc:
        # Only a certificate that breaks its schema in ways the schema does not pin down gets here.
        return [f"certificate is malformed ({type(exc).__name__}: {exc})"]


def _consistency_problems(certificate: Mapping[str, Any]) -> list[str]:
    problems = []
    try:
        event = accounting.dp_event_from_json(certificate["dp_event"])
        epsilon, _ = accounting.epsilon_of_event(event, certificate["delta"], certificate["accountant"])
    except Exception as exc:  # a malformed event is a failed check, reported with its cause
        return [f"dp_event cannot be accounted: {exc}"]
    stated = certificate["epsilon"]
    if not math.isclose(epsilon, stated, rel_tol=EPSILON_RELATIVE_TOLERANCE):
        problems.append(f"epsilon {stated!r} does not match {epsilon!r} recomputed from dp_event "
                        f"({certificate['accountant']}, δ = {certificate['delta']!r})")
    described = _uniform_dp_sgd(_without_releases(certificate))
    if described is None:
        problems.append("dp_event is not a Poisson-sampled Gaussian DP-SGD composition")
    else:
        rate, sigma, steps = described
        for key, value in (("sampling_rate", rate), ("noise_multiplier", sigma), ("steps", steps)):
            if not math.isclose(certificate[key], value, rel_tol=1e-12):
                problems.append(f"{key} {certificate[key]!r} differs from the dp_event's {value!r}")
    expected_rate = certificate["expected_batch_size"] / certificate["dataset_size"]
    if not math.isclose(certificate["sampling_rate"], expected_rate, rel_tol=1e-9):
        problems.append(f"sampling_rate {certificate['sampling_rate']!r} is not expected_batch_size / dataset_size "
                        f"= {expected_rate!r}")
    below = certificate["delta"] < 1.0 / certificate["dataset_size"]
    if certificate["delta_vs_dataset_size"]["delta_below_one_over_n"] != below:
        problems.append("delta_vs_dataset_size.delta_below_one_over_n contradicts delta and dataset_size")
    return problems


def _without_releases(certificate: Mapping[str, Any]) -> Mapping[str, Any]:
    """The DP-SGD part of the certified event: the event minus the other releases the certificate lists."""
    event = certificate["dp_event"]
    releases = [m["dp_event"] for m in certificate.get("mechanisms", ()) if m["what"] != "DP-SGD"]
    if not releases:
        return event
    if event.get("class_name") != "ComposedDpEvent" or event["events"][:len(releases)] != releases:
        return {}
    rest = event["events"][len(releases):]
    return rest[0] if len(rest) == 1 else {"class_name": "ComposedDpEvent", "events": rest}


def _uniform_dp_sgd(event: Mapping[str, Any]) -> tuple[float, float, int] | None:
    """(q, σ, steps) of SelfComposed(PoissonSampled(q, Gaussian(σ)), steps), or of Composed segments alike."""
    def one(e):
        count = 1
        if e.get("class_name") == "SelfComposedDpEvent":
            count, e = e["count"], e["event"]
        if e.get("class_name") != "PoissonSampledDpEvent" or e["event"].get("class_name") != "GaussianDpEvent":
            return None
        return e["sampling_probability"], e["event"]["noise_multiplier"], count

    if event.get("class_name") == "ComposedDpEvent":
        parts = [one(e) for e in event["events"]]
        if not parts or None in parts or len({p[:2] for p in parts}) != 1:
            return None
        return parts[0][0], parts[0][1], sum(p[2] for p in parts)
    return one(event)


def certificate_bytes(certificate: Mapping[str, Any]) -> bytes:
    return (json.dumps(certificate, indent=2, sort_keys=False) + "\n").encode()
