"""Building a release bundle from a trained, evaluated model.

A bundle is a directory: ``model.onnx``, ``privacy_certificate.json``, ``fairness_report.json`` and
``.md``, the model card as ``model_card.md``, ``.html`` and ``.json``, ``metadata.json``,
``signing_key.pub``, ``SHA256SUMS`` and ``model.sig`` (plus, when they exist, ``canary_audit.json`` and
the model's evaluation figures). It is assembled in a staging directory beside the target and renamed
into place only when complete, signed and verified, so a failed release leaves nothing behind and an
existing release is never touched. Nothing in it names a path of the build machine: a bundle is
published, and where the release manager's files lay is neither the consumer's business nor stable.
"""

from __future__ import annotations

import dataclasses
import datetime as _datetime
import hashlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence


from dpmedtf import __version__
from dpmedtf.errors import DpmedtfError, OutputError, OutputExistsError
from dpmedtf.files import json_safe, read_json_object, removed_on_failure, sha256_file
from dpmedtf.layout import ModelDir
from dpmedtf.privacy.ledger import Ledger
from dpmedtf.release import export, onnx_model, preprocess_graph
from dpmedtf.release.certificate import build_certificate, certificate_bytes, software_versions
from dpmedtf.release.card_rendering import auroc_interval_text, model_card_html, model_card_markdown, number_text
from dpmedtf.release.model_card import SCHEMA_FILE as MODEL_CARD_SCHEMA, CardDetails, CardInputs, build_model_card
from dpmedtf.release.policy import DEFAULT_POLICY, ReleasePolicy, Violation, check_policy
from dpmedtf.resources import release_file, schema_problems
from dpmedtf.release.layout import (AUDIT_FILE, BUNDLE_FORMAT, CERTIFICATE_FILE, FAIRNESS_FILE, FAIRNESS_MARKDOWN_FILE,
                                    FIGURE_SUFFIX, METADATA_FILE, MODEL_CARD_FILE, MODEL_CARD_HTML_FILE,
                                    MODEL_CARD_JSON_FILE, MODEL_FILE, PREPROCESS_FILE, PUBLIC_KEY_FILE, SUMS_FILE,
                                    UNSUMMED)
from dpmedtf.release.modality_guard import default_expected_input
from dpmedtf.release.signing import SIGNATURE_FILE, fingerprint, sign_bundle
from dpmedtf.release.verify import verify_bundle


class PolicyViolationError(DpmedtfError):
    def __init__(self, violations: Sequence[Violation], policy: ReleasePolicy):
        self.violations = tuple(violations)
        lines = "\n".join(f"  - {v}" for v in violations)
        super().__init__(f"release refused: {len(violations)} rule(s) of the release policy ({policy.source}) "
                         f"are broken:\n{lines}\nFix the model, or publish anyway with an explicit, recorded "
                         "override (--override-policy REASON).")


@dataclass(frozen=True)
class ReleaseCandidate:
    """A trained and evaluated model with the records that describe it."""

    directory: Path
    model: Any
    """The Keras network (logits out)."""
    ledger: Ledger
    training: dict
    thresholds: dict[str, float]
    metrics: dict
    fairness_report: dict
    figures: tuple[Path, ...] = ()
    """The evaluation's figures (PNG) of this model, if it drew any; the bundle carries them."""

    @property
    def label_names(self) -> list[str]:
        return list(self.thresholds)


def load_candidate(member_dir: str | os.PathLike) -> ReleaseCandidate:
    """Reads what training and evaluation wrote into ``member_dir``; says which step is missing."""
    from dpmedtf.models import load_model

    files = ModelDir(member_dir)
    member_dir = files.root
    needed = {files.model: "train", files.training_record: "train", files.metrics: "evaluate",
              files.thresholds: "evaluate", files.fairness_report: "evaluate"}
    for path, stage in needed.items():
        if not path.exists():
            raise DpmedtfError(f"{path} is missing: run `dpmedtf {stage}` on this job first")
    training = read_json_object(files.training_record, "the training summary")
    if training.get("status") != "finished":
        raise DpmedtfError(f"{member_dir}: training has not finished (status {training.get('status')!r})")
    if not files.ledger.exists():
        raise DpmedtfError(f"{member_dir} holds a model trained without differential privacy (no ledger.json); "
                           "only DP-trained models can be released with a privacy certificate")
    figures = tuple(sorted(files.evaluation.root.glob(f"*{FIGURE_SUFFIX}")))
    return ReleaseCandidate(member_dir, load_model(files.model), Ledger.load(files.ledger), training,
                            read_json_object(files.thresholds, "the evaluation's thresholds"),
                            read_json_object(files.metrics, "the evaluation's metrics"),
                            read_json_object(files.fairness_report, "the fairness report"), figures)


def evaluation_non_dp_uses(selected_from: int = 1, figures: bool = False,
                           non_private_baseline: bool = False) -> tuple[dict, ...]:
    """What evaluating and publishing a model does with private data beyond DP-SGD."""
    published = "AUROC, subgroup and calibration statistics" + (" and figures drawn from the test predictions"
                                                                if figures else "")
    uses = [
        {"what": "decision thresholds", "how": "Youden thresholds chosen on the labels of the validation split",
         "private_data_used": True},
        {"what": "published evaluation", "how": f"{published} of the test split are published in this bundle "
                                                "without noise", "private_data_used": True},
        {"what": "membership-inference audit", "how": "attack AUC/advantage computed from the model's losses on "
                                                      "training and test images, published without noise",
         "private_data_used": True},
        {"what": "hyperparameters", "how": "taken from the job configuration; dpmedtf performed no tuning on the data",
         "private_data_used": False},
    ]
    if non_private_baseline:
        uses.append({"what": "non-private baseline", "how": "the model card publishes the test AUROC of a model trained "
                                                           "on the same training data without DP (the privacy–utility "
                                                           "trade-off)", "private_data_used": True})
    if selected_from > 1:
        uses.append({"what": "model selection", "how": f"this model was chosen from {selected_from} trained models "
                                                       "of one sweep; a choice guided by their evaluation results used "
                                                       "private data", "private_data_used": True})
    return tuple(uses)


def audit_reference(audit_data: bytes) -> dict:
    """The certificate's reference to a canary audit: the file, its hash and its headline numbers."""
    audit = json.loads(audit_data)
    return {"file": AUDIT_FILE, "sha256": hashlib.sha256(audit_data).hexdigest(),
            **{key: audit[key] for key in ("epsilon_lower_bound", "confidence", "delta", "kind", "canaries",
                                           "certified_epsilon")},
            "note": "a measured lower bound from one attack on an audit twin; the certified ε above is unchanged"}


def write_sums(bundle: Path) -> Path:
    """``SHA256SUMS`` in coreutils format over every file except itself and the signature."""
    names = sorted(p.name for p in bundle.iterdir() if p.is_file() and p.name not in UNSUMMED)
    (bundle / SUMS_FILE).write_text("".join(f"{sha256_file(bundle / n)}  {n}\n" for n in names))
    return bundle / SUMS_FILE


def build_bundle(candidate: ReleaseCandidate, out: str | os.PathLike, policy: ReleasePolicy,
                 private_key: str | os.PathLike, public_key: str | os.PathLike | None = None,
                 model_version: str = "1.0.0", intended_use: str = "", selected_from: int = 1,
                 override_reason: str | None = None, job_name: str = "model",
                 audit: str | os.PathLike | None = None, card: CardDetails | None = None,
                 baseline_metrics: Mapping[str, Any] | None = None) -> Path:
    """Exports, certifies, checks policy, writes, signs and verifies; returns the bundle directory.

    ``audit`` (an ``audit.json`` of ``dpmedtf audit`` on this model's mechanism) goes into the bundle, and
    the certificate references it by hash next to its own ε, which the audit never changes. ``card`` holds
    what the release managers state in the model card (owners, licence, contact, citation, limitations);
    ``baseline_metrics``, the evaluation of the job's non-private model, gives the card its privacy–utility
    trade-off."""
    out = Path(out)
    if finish_interrupted_release(out):
        return out
    if out.exists():
        raise OutputExistsError(f"{out} already exists: a release is never overwritten. Choose another --out "
                                "(or a new release.model_version)")
    private_key = Path(private_key)
    public_key = Path(public_key) if public_key else private_key.with_suffix(".pub")
    if not public_key.is_file():
        raise DpmedtfError(f"public key {public_key} not found; give release.public_key (the pair of "
                           f"{private_key}) or create a pair with `dpmedtf keygen`")

    proto = export.to_onnx(candidate.model)
    parity = export.check_parity(candidate.model, proto, candidate.thresholds).to_json_dict()
    uses = evaluation_non_dp_uses(selected_from, bool(candidate.figures),
                                  non_private_baseline=baseline_metrics is not None)
    certificate = _without_build_paths(build_certificate(candidate.ledger, uses))
    audit_data = Path(audit).read_bytes() if audit is not None else None
    if audit_data is not None:
        certificate["empirical_audit"] = audit_reference(audit_data)
    problems = schema_problems(certificate, "privacy_certificate.schema.json") + \
        schema_problems(candidate.fairness_report, "fairness_report.schema.json")
    if problems:  # our own output breaking our own schema is a bug, never something to publish
        raise DpmedtfError("internal error, the release documents break their schemas: " + "; ".join(problems))
    violations = check_policy(policy, certificate, candidate.fairness_report, parity)
    if violations and not override_reason:
        raise PolicyViolationError(violations, policy)

    certificate_data = certificate_bytes(certificate)
    metadata = _metadata(candidate, certificate, certificate_data, parity, policy, violations, override_reason,
                         model_version, public_key, job_name)
    # A radiograph bundle carries its preprocessing as an ONNX graph too, so that any ONNX runtime goes
    # from decoded pixels to the model's input without Python (preprocess_graph.py).
    preprocess_proto = None
    if metadata["preprocessing"]["modality"] == "radiograph":
        image_size = int(metadata["preprocessing"]["image_size"])
        preprocess_proto = preprocess_graph.build_preprocess_graph(image_size)
        metadata["preprocessing"] = {**metadata["preprocessing"], "graph": preprocess_graph.describe(image_size)}
        onnx_model.set_metadata(preprocess_proto, {"dpmedtf_version": metadata["dpmedtf_version"],
                                                   "model_version": metadata["model_version"],
                                                   "image_size": str(image_size)})
    export.set_metadata(proto, _onnx_properties(metadata))
    card_document = json_safe(model_card_document(candidate, metadata, certificate, intended_use, job_name,
                                                  details=card or CardDetails(), selected_from=selected_from,
                                                  baseline_metrics=baseline_metrics))
    problems = schema_problems(card_document, MODEL_CARD_SCHEMA)  # as written: undefined numbers are null
    if problems:
        raise DpmedtfError("internal error, the model card breaks its schema: " + "; ".join(problems))
    card_markdown = model_card_markdown(card_document)

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        workspace = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as exc:
        raise OutputError(f"{out}: cannot create the bundle there ({exc.strerror or exc}); choose another --out") from None
    # The signature names the signed directory, so the bundle is built under its final name inside a
    # private workspace: a temporary name would otherwise be published inside model.sig.
    staging = workspace / out.name
    with removed_on_failure(workspace, lambda exc: f"{out}: writing the bundle failed ({exc.strerror or exc}); nothing "
                                                   "was published. Free disk space or choose another --out, then "
                                                   "release again"):
        staging.mkdir()
        (staging / MODEL_FILE).write_bytes(proto.SerializeToString())
        if preprocess_proto is not None:
            (staging / PREPROCESS_FILE).write_bytes(preprocess_proto.SerializeToString())
        (staging / CERTIFICATE_FILE).write_bytes(certificate_data)
        (staging / FAIRNESS_FILE).write_text(json.dumps(candidate.fairness_report, indent=2) + "\n")
        (staging / FAIRNESS_MARKDOWN_FILE).write_text(fairness_markdown(candidate.fairness_report, job_name))
        (staging / METADATA_FILE).write_text(json.dumps(json_safe(metadata), indent=2) + "\n")
        (staging / MODEL_CARD_JSON_FILE).write_text(json.dumps(card_document, indent=2) + "\n")
        (staging / MODEL_CARD_FILE).write_text(card_markdown, encoding="utf-8")
        (staging / MODEL_CARD_HTML_FILE).write_text(model_card_html(card_markdown, job_name), encoding="utf-8")
        for figure in candidate.figures:
            shutil.copyfile(figure, staging / figure.name)
        shutil.copyfile(public_key, staging / PUBLIC_KEY_FILE)
        if audit_data is not None:
            (staging / AUDIT_FILE).write_bytes(audit_data)
        write_sums(staging)
        # Signed beside the staged bundle, never inside it: a kill at any moment before the signature is
        # moved in leaves nothing that verifies (see finish_interrupted_release).
        pending = sign_bundle(staging, private_key, signature=workspace / PENDING_SIGNATURE)
        report = verify_bundle(staging, public_key, signature=pending)  # what its consumers will run
        if not report.ok:
            raise DpmedtfError("internal error, the new bundle fails verification: " + "; ".join(report.failures))
        staging.chmod(0o755)  # a published bundle is for reading
        os.rename(staging, out)  # fails rather than replace if something created `out` meanwhile
    _move_signature_in(pending, out)
    shutil.rmtree(workspace, ignore_errors=True)  # empty now; the bundle is published either way
    return out


PENDING_SIGNATURE = "signature.pending"
"""In a release's workspace: the new bundle's signature until the bundle has its final name."""


def _workspaces(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.partial-*")) if out.parent.is_dir() else []


def _move_signature_in(pending: Path, out: Path) -> None:
    try:
        os.replace(pending, out / SIGNATURE_FILE)
    except OSError as exc:
        raise OutputError(f"{out}: cannot move the signature into the bundle ({exc.strerror or exc}); the bundle "
                          "is not signed. Free disk space or fix the folder's permissions, then release again "
                          "(it finishes this bundle)") from None


def finish_interrupted_release(out: Path) -> bool:
    """Deals with what a killed release left beside ``out`` before a new release there; True when it
    finished that release's bundle, which is then the release (the same bundle, signed once).

    A release assembles and signs in a workspace ``.<out>.partial-*`` and keeps the signature outside the
    bundle until the bundle has its final name, so a kill leaves either a workspace holding an unsigned
    bundle (removed: nothing there verifies, and the release runs again from the start) or a bundle
    renamed into place whose signature is still in the workspace (moved in here). A run directory has
    one writer at a time (``run_lock``), so no workspace found here belongs to a live release."""
    finished = False
    for workspace in _workspaces(out):
        pending = workspace / PENDING_SIGNATURE
        if pending.is_file() and out.is_dir() and not (out / SIGNATURE_FILE).exists() \
                and not (workspace / out.name).exists():
            _move_signature_in(pending, out)
            print(f"note: finished the release interrupted at {out}: its signature is now in place",
                  file=sys.stderr, flush=True)
            finished = True
        else:
            print(f"note: removed {workspace.name}, left by an interrupted release (it held no published bundle)",
                  file=sys.stderr, flush=True)
        shutil.rmtree(workspace, ignore_errors=True)
    if out.is_dir() and not (out / SIGNATURE_FILE).exists():
        raise DpmedtfError(f"{out} is an unsigned bundle that no interrupted release can finish (its signature "
                           "is gone); remove it and release again")
    return finished


def _without_build_paths(certificate: dict) -> dict:
    """The certificate with public pretrained weights named by their file name: the ledger records where
    they lay on the training machine, which says nothing about which weights they were."""
    weights = certificate["public_pretraining"].get("weights")
    if weights:
        certificate["public_pretraining"]["weights"] = Path(weights).name
    return certificate


def _policy_record(policy: ReleasePolicy) -> dict:
    """Which policy a release was checked against: its name, file name, SHA-256 and rules, not its path."""
    rules = dataclasses.asdict(policy)
    del rules["source"]
    path = Path(policy.source)
    if not path.is_file():  # a ReleasePolicy built in code ("built-in defaults")
        return {"name": path.name, "file": None, "sha256": None, "rules": rules}
    own = path.resolve() == release_file(DEFAULT_POLICY).resolve()
    return {"name": "dpmedtf default policy" if own else path.name, "file": path.name,
            "sha256": sha256_file(path), "rules": rules}


def _expected_input(preprocessing: Mapping[str, Any]) -> dict:
    """What predict's modality guard accepts: the modality's default, with the DICOM Modality codes the
    model was trained on when the job widened them (data.accept_modalities)."""
    expected = default_expected_input(preprocessing["modality"])
    if preprocessing.get("accept_modalities"):
        expected["dicom_modalities"] = list(preprocessing["accept_modalities"])
    return expected


def _metadata(candidate: ReleaseCandidate, certificate: dict, certificate_data: bytes, parity: dict,
              policy: ReleasePolicy, violations: Sequence[Violation], override_reason: str | None,
              model_version: str, public_key: Path, job_name: str) -> dict:
    model = candidate.model
    preprocessing = candidate.training["preprocessing"]
    modality = preprocessing["modality"]
    labels = candidate.label_names
    return {
        "format": "dpmedtf-bundle", "format_version": BUNDLE_FORMAT,
        "name": job_name, "model_version": model_version, "dpmedtf_version": __version__,
        "created_at": _datetime.datetime.now(_datetime.timezone.utc).isoformat(timespec="seconds"),
        "synthetic_data": bool(candidate.training.get("synthetic_data")),
        "task": ("multi-label classification of findings on chest radiographs" if modality == "radiograph"
                 else "binary classification of CT volumes"),
        "input": {"name": onnx_model.INPUT_NAME, "dtype": "float32", "shape": ["batch", *model.input_shape[1:]],
                  "layout": "NHWC" if modality == "radiograph" else "NDHWC", "value_range": [0.0, 1.0]},
        "output": {"name": onnx_model.OUTPUT_NAME, "dtype": "float32", "shape": ["batch", len(labels)],
                   "value_range": [0.0, 1.0], "meaning": "sigmoid probability per label"},
        "labels": labels,
        "thresholds": candidate.thresholds,
        "thresholds_chosen_on": "validation split (Youden index)",
        "preprocessing": preprocessing,
        # What the inputs' headers must say; `dpmedtf predict` refuses others unless told to allow them.
        "expected_input": _expected_input(preprocessing),
        "model": {"architecture": candidate.training["config"]["model"]["architecture"],
                  "parameters": int(model.count_params()),
                  "activation": candidate.training["config"]["model"]["activation"]},
        "export": {"opset": export.OPSET, "parity": parity},
        "privacy": {"epsilon": certificate["epsilon"], "delta": certificate["delta"],
                    "unit_of_privacy": certificate["unit_of_privacy"],
                    "privacy_certificate_sha256": hashlib.sha256(certificate_data).hexdigest()},
        "metrics": {"split": "test", "mean_auroc": candidate.metrics["mean"]["auroc"],
                    "mean_auroc_ci": [candidate.metrics["mean"]["auroc_ci_low"], candidate.metrics["mean"]["auroc_ci_high"]],
                    "auroc": {n: f["auroc"] for n, f in candidate.metrics["findings"].items()}},
        "release": {"policy": _policy_record(policy),
                    "violations": [str(v) for v in violations],
                    "override": ({"reason": override_reason, "by": _user(),
                                  "violations_overridden": [str(v) for v in violations]}
                                 if violations and override_reason else None)},
        "signing": {"public_key_fingerprint": fingerprint(public_key), "public_key_file": PUBLIC_KEY_FILE},
        "software": software_versions(),
    }


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name in a bare container
        return f"uid {os.getuid()}"


def _onnx_properties(metadata: Mapping[str, Any]) -> dict[str, str]:
    privacy = metadata["privacy"]
    return {"dpmedtf_version": metadata["dpmedtf_version"], "model_version": metadata["model_version"],
            "labels": json.dumps(metadata["labels"]), "thresholds": json.dumps(metadata["thresholds"]),
            "epsilon": repr(privacy["epsilon"]), "delta": repr(privacy["delta"]),
            "unit_of_privacy": privacy["unit_of_privacy"],
            "privacy_certificate_sha256": privacy["privacy_certificate_sha256"],
            "synthetic_data": json.dumps(metadata["synthetic_data"])}


# --- documents ---------------------------------------------------------------------------------------

def fairness_markdown(report: Mapping[str, Any], title: str) -> str:
    lines = [f"# Fairness report: {title}", ""]
    if report.get("synthetic_data"):
        lines += [f"> **{report.get('notice') or 'SYNTHETIC DATA'}**", ""]
    groupings = report.get("attributes") or list(dict.fromkeys(r["attribute"] for r in report["rows"]))
    lines += [f"Test split; groups by {', '.join(g.replace('_', ' ') for g in groupings)}. A finding's rows count the "
              f"images where it is observed (n); 'unknown' holds rows whose attribute is missing. "
              f"Findings: {', '.join(report['findings'])}.", "",
              "| Attribute | Group | Finding | n | Positives | AUROC (95% CI) | Accuracy | Parity difference | FNR | FPR | ECE | Note |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        lines.append(f"| {row['attribute']} | {row['group']} | {row['finding']} | {row['n']} | {row.get('n_positive', '')} | "
                     f"{auroc_interval_text(row)} | {number_text(row['accuracy'])} | "
                     f"{number_text(row['statistical_parity_difference'], 3)} | {number_text(row['fnr'])} | "
                     f"{number_text(row['fpr'])} | {number_text(row['ece'])} | {row.get('warning') or ''} |")
    return "\n".join(lines) + "\n"


def model_card_document(candidate: ReleaseCandidate, metadata: Mapping[str, Any], certificate: Mapping[str, Any],
                        intended_use: str, title: str, *, details: CardDetails = CardDetails(), selected_from: int = 1,
                        baseline_metrics: Mapping[str, Any] | None = None) -> dict:
    """``model_card.json`` of this release (see ``model_card.build_model_card``)."""
    return build_model_card(CardInputs(
        title=title, training=candidate.training, metrics=candidate.metrics, fairness_report=candidate.fairness_report,
        metadata=metadata, certificate=certificate,
        certificate_sha256=metadata["privacy"]["privacy_certificate_sha256"], intended_use=intended_use,
        details=details, selected_from=selected_from, baseline_metrics=baseline_metrics,
        figures=tuple(f.name for f in candidate.figures)))


def model_card(candidate: ReleaseCandidate, metadata: Mapping[str, Any], certificate: Mapping[str, Any],
               intended_use: str, title: str, **options) -> str:
    """``model_card.md`` of this release; ``options`` as for ``model_card_document``."""
    return model_card_markdown(model_card_document(candidate, metadata, certificate, intended_use, title, **options))
