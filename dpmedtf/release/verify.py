"""Verifying a release bundle as its consumer must before trusting it.

Every check runs and every failure is reported (naming the file), so one ``dpmedtf verify`` tells
the whole story: files present, SHA256SUMS exact, signature valid for the given key, certificate,
fairness report and model card (``model_card.json``) valid against dpmedtf's schemas, the certificate's
ε recomputed from its own DP event, metadata, ONNX metadata, model card and certificate agreeing, and
the ONNX model loading and running.

Which key: ``--public-key`` (or ``DPMEDTF_PUBLIC_KEY``) is the publisher's key the consumer obtained
separately, and proves who signed. Without one, the key shipped inside the bundle is used; that proves
the bundle is intact as signed, but anyone can sign with their own key, so the report says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dpmedtf.errors import DpmedtfError
from dpmedtf.files import sha256_file
from dpmedtf.release.certificate import check_consistency
from dpmedtf.release.layout import (AUDIT_FILE, CERTIFICATE_FILE, FAIRNESS_FILE, METADATA_FILE, MODEL_CARD_JSON_FILE,
                                    MODEL_FILE, PUBLIC_KEY_FILE, REQUIRED_FILES, SUMS_FILE, UNSUMMED)
from dpmedtf.resources import schema_problems
from dpmedtf.release.signing import SigningError, fingerprint, verify_signature

PUBLIC_KEY_ENVIRONMENT = "DPMEDTF_PUBLIC_KEY"
_SUMS_LINE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")


class BundleVerificationError(DpmedtfError):
    def __init__(self, report: "VerificationReport"):
        self.report = report
        super().__init__(f"{report.bundle} failed verification:\n" + "\n".join(f"  - {f}" for f in report.failures))


@dataclass
class VerificationReport:
    bundle: Path
    passed: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    key_fingerprint: str | None = None

    @property
    def ok(self) -> bool:
        return not self.failures

    def check(self, name: str, problems: list[str]) -> bool:
        if problems:
            self.failures.extend(problems)
        else:
            self.passed.append(name)
        return not problems


def verify_bundle(bundle: str | os.PathLike, public_key: str | os.PathLike | None = None) -> VerificationReport:
    bundle = Path(bundle)
    report = VerificationReport(bundle)
    if not bundle.is_dir():
        report.failures.append(f"{bundle}: not a bundle directory")
        return report
    report.check("all bundle files present",
                 [f"{name}: missing from the bundle" for name in REQUIRED_FILES if not (bundle / name).is_file()])
    report.check("SHA256SUMS matches every file", _sum_problems(bundle))
    _check_signature(bundle, public_key, report)

    documents = {}
    for name in (CERTIFICATE_FILE, FAIRNESS_FILE, METADATA_FILE, MODEL_CARD_JSON_FILE):
        try:
            document = json.loads((bundle / name).read_bytes())  # JSON is UTF-8 whatever the consumer's locale
        except (OSError, ValueError) as exc:
            report.failures.append(f"{name}: not readable JSON ({exc.__class__.__name__}: {exc})")
            continue
        if isinstance(document, dict):
            documents[name] = document
        else:
            report.failures.append(f"{name}: must be a JSON object, got {type(document).__name__}")
    certificate, metadata = documents.get(CERTIFICATE_FILE), documents.get(METADATA_FILE)
    if certificate is not None and report.check(
            "privacy certificate matches its schema",
            [f"{CERTIFICATE_FILE}: {p}" for p in schema_problems(certificate, "privacy_certificate.schema.json")]):
        report.check("certificate ε recomputed from its DP event",
                     [f"{CERTIFICATE_FILE}: {p}" for p in check_consistency(certificate)])
    if certificate is not None and isinstance(certificate.get("empirical_audit"), dict):
        report.check("canary audit matches the certificate's reference", _audit_problems(bundle, certificate))
    if FAIRNESS_FILE in documents:
        report.check("fairness report matches its schema",
                     [f"{FAIRNESS_FILE}: {p}" for p in schema_problems(documents[FAIRNESS_FILE], "fairness_report.schema.json")])
    if metadata is not None and certificate is not None:
        report.check("metadata agrees with the certificate", _metadata_problems(bundle, metadata, certificate))
    card = documents.get(MODEL_CARD_JSON_FILE)
    if card is not None and report.check(
            "model card matches its schema",
            [f"{MODEL_CARD_JSON_FILE}: {p}" for p in schema_problems(card, "model_card.schema.json")]):
        report.check("model card agrees with the certificate and metadata", _card_problems(card, certificate, metadata))
    if metadata is not None:
        report.check("ONNX model loads, matches its metadata and runs", _model_problems(bundle, metadata))
    if metadata is not None and metadata.get("synthetic_data"):
        report.warnings.append("this model was trained on SYNTHETIC data; it makes no clinical claim")
    return report


def _card_problems(card: dict, certificate: dict | None, metadata: dict | None) -> list[str]:
    """A card is what people read: its privacy and version must be the certified ones, not merely well-formed."""
    problems = []
    accounting, setting = card["privacy"]["accounting"], card["privacy"]["dp_setting"]
    if certificate is not None:
        stated = {"epsilon": accounting["epsilon"], "delta": accounting["delta"], "accountant": accounting["accountant"],
                  "unit_of_privacy": setting["unit_of_privacy"]}
        problems += [f"{MODEL_CARD_JSON_FILE}: privacy {key} = {value!r} but the certificate says {certificate.get(key)!r}"
                     for key, value in stated.items() if value != certificate.get(key)]
    if metadata is not None and card["model_details"]["version"]["name"] != metadata.get("model_version"):
        problems.append(f"{MODEL_CARD_JSON_FILE}: model version {card['model_details']['version']['name']!r} differs "
                        f"from {METADATA_FILE} ({metadata.get('model_version')!r})")
    return problems


def _audit_problems(bundle: Path, certificate: dict) -> list[str]:
    reference = certificate["empirical_audit"]
    path = bundle / AUDIT_FILE
    if not path.is_file():
        return [f"{AUDIT_FILE}: referenced by the certificate but missing from the bundle"]
    if hashlib.sha256(path.read_bytes()).hexdigest() != reference.get("sha256"):
        return [f"{AUDIT_FILE}: its SHA-256 differs from the certificate's empirical_audit.sha256"]
    return []


def _sum_problems(bundle: Path) -> list[str]:
    sums = bundle / SUMS_FILE
    if not sums.is_file():
        return []  # reported as missing already
    listed, problems = {}, []
    for number, line in enumerate(sums.read_text(errors="replace").splitlines(), 1):
        match = _SUMS_LINE.match(line)
        if not match:
            problems.append(f"{SUMS_FILE}: line {number} is not '<sha256>  <file name>'")
            continue
        listed[match.group(2)] = match.group(1)
    for name, digest in sorted(listed.items()):
        path = bundle / name
        if "/" in name or name in UNSUMMED:
            problems.append(f"{SUMS_FILE}: unexpected entry {name!r}")
        elif not path.is_file():
            problems.append(f"{name}: listed in {SUMS_FILE} but missing")
        elif _digest(path) != digest:
            problems.append(f"{name}: SHA-256 differs from {SUMS_FILE} (the file changed after release, "
                            "or cannot be read)")
    for path in sorted(bundle.iterdir()):
        if path.name not in listed and path.name not in UNSUMMED:
            problems.append(f"{path.name}: not listed in {SUMS_FILE} (added after release)")
    return problems


def _digest(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except OSError:  # unreadable (permissions): it cannot be the file that was released
        return None


def _check_signature(bundle: Path, public_key, report: VerificationReport) -> None:
    chosen = public_key or os.environ.get(PUBLIC_KEY_ENVIRONMENT)
    if chosen is None:
        chosen = bundle / PUBLIC_KEY_FILE
        report.warnings.append(f"no --public-key given: the signature was checked with the key inside the bundle "
                               f"({PUBLIC_KEY_FILE}), which proves integrity but not who signed; compare the "
                               "fingerprint above with the publisher's, or pass --public-key")
    try:
        report.key_fingerprint = fingerprint(chosen)
        verify_signature(bundle, chosen)
    except SigningError as exc:
        report.failures.append(_short_signature_message(str(exc)))
        return
    report.passed.append(f"signature valid for key {report.key_fingerprint}")


def _short_signature_message(message: str) -> str:
    # model-signing prints raw digest bytes (quoted either way, escaped inside a list's repr); the file
    # names are what a person needs.
    changed = re.findall(r"Hash mismatch for \\?'([^'\\]+)\\?'", message)
    if changed and "Signature mismatch:" in message:
        head = message.split("Signature mismatch:")[0].rstrip(": ")
        return f"{head}: files changed since signing: {', '.join(changed)}"
    message = re.sub(r": Expected 'Digest\(.*?\)', Actual 'Digest\(.*?\)'", " (content changed)", message)
    return message.replace("Hash mismatch for", "file changed since signing:")


def _mapping(value) -> dict:
    return value if isinstance(value, dict) else {}


def _metadata_problems(bundle: Path, metadata: dict, certificate: dict) -> list[str]:
    problems = _preprocessing_problems(metadata)
    privacy = _mapping(metadata.get("privacy"))
    for key in ("epsilon", "delta", "unit_of_privacy"):
        if privacy.get(key) != certificate.get(key):
            problems.append(f"{METADATA_FILE}: privacy.{key} = {privacy.get(key)!r} but the certificate says "
                            f"{certificate.get(key)!r}")
    if (bundle / CERTIFICATE_FILE).is_file():
        if privacy.get("privacy_certificate_sha256") != sha256_file(bundle / CERTIFICATE_FILE):
            problems.append(f"{METADATA_FILE}: privacy_certificate_sha256 does not match {CERTIFICATE_FILE}")
    labels, thresholds = metadata.get("labels"), metadata.get("thresholds")
    if not labels or not isinstance(labels, list) or not isinstance(thresholds, dict) or list(thresholds) != labels:
        problems.append(f"{METADATA_FILE}: thresholds must give one value per label, in label order")
    return problems


def _preprocessing_problems(metadata: dict) -> list[str]:
    """What ``predict`` needs to preprocess inputs as in training must be there and make sense."""
    spec, shape = _mapping(metadata.get("preprocessing")), _mapping(metadata.get("input")).get("shape")

    def whole(value, low=1):
        return isinstance(value, int) and not isinstance(value, bool) and value >= low

    usable = isinstance(shape, list) and len(shape) in (4, 5) and all(whole(v) for v in shape[1:])
    if spec.get("modality") == "radiograph":
        usable = usable and whole(spec.get("image_size"), 32)
    elif spec.get("modality") == "volume":
        window = spec.get("hu_window")
        usable = (usable and isinstance(spec.get("volume_shape_hwd"), list) and len(spec["volume_shape_hwd"]) == 3
                  and all(whole(v) for v in spec["volume_shape_hwd"]) and isinstance(window, list) and len(window) == 2
                  and all(isinstance(v, (int, float)) for v in window) and window[0] < window[1])
    else:
        usable = False
    return [] if usable else [f"{METADATA_FILE}: preprocessing or input.shape is missing or malformed; inputs cannot "
                              "be prepared as in training"]


def _model_problems(bundle: Path, metadata: dict) -> list[str]:
    import onnx

    from dpmedtf.release import onnx_model

    path = bundle / MODEL_FILE
    if not path.is_file():
        return []
    try:
        proto = onnx.load(str(path))
        onnx_model.check_graph(proto)
    except Exception as exc:  # a corrupt protobuf raises DecodeError, a broken graph ExportError
        return [f"{MODEL_FILE}: not a valid ONNX model ({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"]
    problems = []
    properties = onnx_model.metadata_of(proto)
    privacy = _mapping(metadata.get("privacy"))
    expected = {"model_version": metadata.get("model_version"), "labels": json.dumps(metadata.get("labels")),
                "thresholds": json.dumps(metadata.get("thresholds")),
                "privacy_certificate_sha256": privacy.get("privacy_certificate_sha256"),
                "unit_of_privacy": privacy.get("unit_of_privacy")}
    for key, value in expected.items():
        if properties.get(key) != value:
            problems.append(f"{MODEL_FILE}: metadata_props[{key!r}] = {properties.get(key)!r} differs from "
                            f"{METADATA_FILE} ({value!r})")
    for key in ("epsilon", "delta"):
        try:
            if float(properties.get(key)) != metadata["privacy"][key]:
                problems.append(f"{MODEL_FILE}: metadata_props[{key!r}] differs from {METADATA_FILE}")
        except (TypeError, ValueError, KeyError):
            problems.append(f"{MODEL_FILE}: metadata_props[{key!r}] missing or not a number")
    try:
        shape = [int(s) for s in metadata["input"]["shape"][1:]]
        runtime = onnx_model.session(path.read_bytes())
        (output,) = runtime.run([onnx_model.OUTPUT_NAME], {onnx_model.INPUT_NAME: np.zeros((2, *shape), np.float32)})
    except Exception as exc:  # onnxruntime raises its own exception types
        return problems + [f"{MODEL_FILE}: onnxruntime cannot run it ({str(exc).splitlines()[0]})"]
    labels = metadata.get("labels")
    if not isinstance(labels, list) or output.shape != (2, len(labels)) or not np.all((output >= 0) & (output <= 1)):
        problems.append(f"{MODEL_FILE}: output of shape {output.shape} is not one probability per label")
    return problems
