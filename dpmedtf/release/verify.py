"""Verifying a release bundle as its consumer must before trusting it.

Every check runs and every failure is reported (naming the file), so one ``dpmedtf verify`` tells
the whole story: files present, SHA256SUMS exact, signature valid for the given key, certificate,
fairness report and model card (``model_card.json``) valid against dpmedtf's schemas, the certificate's
ε recomputed from its own DP event, metadata, ONNX metadata, model card and certificate agreeing, and
the ONNX model loading and running.

Which key: the publisher's key, obtained apart from the bundle, is what proves who signed. It comes from
``public_key`` (``--public-key``), else ``DPMEDTF_PUBLIC_KEY``, else the user's trust store
(``dpmedtf trust add``; the signature must verify with one trusted key, which the report names). With none
of these, verification fails and says how to give the key. The key shipped inside the bundle proves only
that the bundle is intact as signed (anyone who changes a bundle can re-sign it with their own key and ship
that key), so it is used only when asked for explicitly (``integrity_only=True``, ``--integrity-only``),
and the report then says the signer was NOT verified.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from dpmedtf.errors import DpmedtfError
from dpmedtf.files import sha256_file
from dpmedtf.release.certificate import check_consistency
from dpmedtf.release.layout import (AUDIT_FILE, CERTIFICATE_FILE, FAIRNESS_FILE, METADATA_FILE, MODEL_CARD_JSON_FILE,
                                    MODEL_FILE, PUBLIC_KEY_FILE, REQUIRED_FILES, SUMS_FILE, UNSUMMED)
from dpmedtf.resources import schema_problems
from dpmedtf.release.signing import SIGNATURE_FILE, SigningError, fingerprint, verify_signature
from dpmedtf.release.trust import TRUST_DIR_ENVIRONMENT, TrustedKey, list_keys, trust_dir

PUBLIC_KEY_ENVIRONMENT = "DPMEDTF_PUBLIC_KEY"
# Where the key that checked the signature came from (``Signer.source``, ``--format json``).
SOURCE_PUBLIC_KEY, SOURCE_ENVIRONMENT, SOURCE_TRUST_STORE = "--public-key", "env", "trust store"
SOURCE_BUNDLE = "bundle (integrity only)"
INTEGRITY_ONLY_NOTICE = "integrity only: signer NOT verified"
_SUMS_LINE = re.compile(r"^([0-9a-f]{64}) [ *](.+)$")


class BundleVerificationError(DpmedtfError):
    def __init__(self, report: "VerificationReport"):
        self.report = report
        super().__init__(f"{report.bundle} failed verification:\n" + "\n".join(f"  - {f}" for f in report.failures))


@dataclass(frozen=True)
class Signer:
    """The key the bundle's signature verified with, and why that key was believed."""

    fingerprint: str
    name: str | None
    """The trust store's name for the key, else its file name; None for the bundle's own key."""
    source: str
    """SOURCE_PUBLIC_KEY, SOURCE_ENVIRONMENT, SOURCE_TRUST_STORE or SOURCE_BUNDLE."""

    @property
    def verified(self) -> bool:
        """True when the key came from the consumer, not from the bundle itself."""
        return self.source != SOURCE_BUNDLE

    def describe(self) -> str:
        who = f"{self.name} ({self.fingerprint})" if self.name else self.fingerprint
        return f"{who}, key from {self.source}"

    def to_json_dict(self) -> dict:
        return {"fingerprint": self.fingerprint, "name": self.name, "source": self.source}


@dataclass
class VerificationReport:
    bundle: Path
    passed: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    key_fingerprint: str | None = None
    signer: Signer | None = None
    """Set once the signature verified; with ``integrity_only`` it is the bundle's own key."""
    integrity_only: bool = False
    """The signature was checked only against the key inside the bundle, as asked: the signer is unknown."""
    synthetic_data: bool | None = None

    @property
    def ok(self) -> bool:
        """Every check passed. With ``integrity_only`` that says nothing about who signed: see ``signer_verified``."""
        return not self.failures

    @property
    def signer_verified(self) -> bool:
        return self.ok and self.signer is not None and self.signer.verified

    def to_json_dict(self) -> dict:
        return {"bundle": str(self.bundle), "ok": self.ok, "integrity_only": self.integrity_only,
                "signer": self.signer.to_json_dict() if self.signer else None, "passed": list(self.passed),
                "failures": list(self.failures), "warnings": list(self.warnings), "synthetic_data": self.synthetic_data}

    def check(self, name: str, problems: list[str]) -> bool:
        if problems:
            self.failures.extend(problems)
        else:
            self.passed.append(name)
        return not problems


def verify_bundle(bundle: str | os.PathLike, public_key: str | os.PathLike | None = None, *,
                  trusted_keys: Iterable[TrustedKey | str | os.PathLike] | None = None,
                  integrity_only: bool = False, signature: str | os.PathLike | None = None) -> VerificationReport:
    """Runs every check on ``bundle``; the report lists what passed and every failure.

    The signature is checked with ``public_key``, else ``$DPMEDTF_PUBLIC_KEY``, else the trusted keys
    (``trusted_keys``: TrustedKey objects or key files; None means the user's trust store, see
    ``dpmedtf.release.trust``); without any, the report fails saying how to give the key. ``integrity_only``
    checks against the key inside the bundle instead: the report can then pass (``ok``) with
    ``integrity_only`` set and ``signer_verified`` False. ``signature``: the signature file when it is not
    yet inside the bundle (the release checks its staged bundle so, before the signature is moved in).
    """
    bundle = Path(bundle)
    if integrity_only and public_key:
        raise DpmedtfError("give the publisher's public key or ask for an integrity-only check, not both "
                           "(--public-key and --integrity-only)")
    report = VerificationReport(bundle, integrity_only=integrity_only)
    if not bundle.is_dir():
        report.failures.append(f"{bundle}: not a bundle directory")
        return report
    required = [name for name in REQUIRED_FILES if signature is None or name != SIGNATURE_FILE]
    report.check("all bundle files present",
                 [f"{name}: missing from the bundle" for name in required if not (bundle / name).is_file()])
    report.check("SHA256SUMS matches every file", _sum_problems(bundle))
    _check_signature(bundle, public_key, trusted_keys, integrity_only, report, signature)

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
    if metadata is not None and _mapping(metadata.get("preprocessing")).get("modality") == "radiograph":
        problems = _preprocess_graph_problems(bundle, metadata, report)
        if problems is not None:
            report.check("preprocess.onnx computes the training preprocessing", problems)
    if metadata is not None:
        report.synthetic_data = bool(metadata.get("synthetic_data"))
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


def _check_signature(bundle: Path, public_key, trusted_keys, integrity_only: bool, report: VerificationReport,
                     signature=None) -> None:
    environment = os.environ.get(PUBLIC_KEY_ENVIRONMENT)
    if integrity_only:
        if environment:  # the explicit request wins over the ambient setting, but not silently
            report.warnings.append(f"{PUBLIC_KEY_ENVIRONMENT} is set but an integrity-only check was asked for: "
                                   "the key inside the bundle was used instead")
        _check_with_bundle_key(bundle, report, signature)
        return
    trusted = _trusted(trusted_keys, report)
    if public_key or environment:
        key, source = (public_key, SOURCE_PUBLIC_KEY) if public_key else (environment, SOURCE_ENVIRONMENT)
        if not _signature_valid(bundle, key, signature, report):
            return
        known = next((k for k in trusted if k.fingerprint == report.key_fingerprint), None)
        _signed(report, Signer(report.key_fingerprint, known.name if known else Path(key).name, source))
    elif trusted:
        _check_with_trusted_keys(bundle, trusted, report, signature)
    else:
        claimed = _bundle_key_fingerprint(bundle)
        report.failures.append(
            "signer not verified: no publisher key given. Pass --public-key KEY (the publisher's public key, "
            f"obtained apart from the bundle), set {PUBLIC_KEY_ENVIRONMENT}=KEY, or trust the key once with "
            f"`dpmedtf trust add KEY --name PUBLISHER` (trust store {trust_dir()}, or set {TRUST_DIR_ENVIRONMENT})"
            + (f"; the bundle says it was signed by {claimed}" if claimed else "")
            + ". To check integrity alone against the key inside the bundle, pass --integrity-only")


def _signature_valid(bundle: Path, key, signature, report: VerificationReport) -> bool:
    """Checks the signature with one key, recording its fingerprint, or the failure in the report."""
    try:
        report.key_fingerprint = fingerprint(key)
        verify_signature(bundle, key, signature)
    except SigningError as exc:
        report.failures.append(_short_signature_message(str(exc)))
        return False
    return True


def _signed(report: VerificationReport, signer: Signer) -> None:
    report.signer, report.key_fingerprint = signer, signer.fingerprint
    report.passed.append(f"signature valid: signed by {signer.describe()}")


def _check_with_bundle_key(bundle: Path, report: VerificationReport, signature=None) -> None:
    if not _signature_valid(bundle, bundle / PUBLIC_KEY_FILE, signature, report):
        return
    report.signer = Signer(report.key_fingerprint, None, SOURCE_BUNDLE)
    report.passed.append(f"signature valid for the key inside the bundle ({report.key_fingerprint})")
    report.warnings.append(f"{INTEGRITY_ONLY_NOTICE}: the signature was checked with the bundle's own "
                           f"{PUBLIC_KEY_FILE}, which anyone who changes the bundle can replace along with the "
                           "signature; compare its fingerprint with the one the publisher announced, then pass "
                           "--public-key or `dpmedtf trust add` the publisher's key")


def _trusted(trusted_keys, report: VerificationReport) -> list[TrustedKey]:
    if trusted_keys is None:
        return list_keys()
    keys = []
    for key in trusted_keys:
        if isinstance(key, TrustedKey):
            keys.append(key)
            continue
        try:
            keys.append(TrustedKey(fingerprint(key), Path(key).name, Path(key)))
        except SigningError as exc:
            report.warnings.append(f"trusted key skipped: {exc}")
    return keys


def _check_with_trusted_keys(bundle: Path, trusted: list[TrustedKey], report: VerificationReport,
                             signature=None) -> None:
    """The signature must verify with one trusted key. model-signing compares the key with the signature's
    key hint before hashing any file, so trying a key that did not sign costs nothing; a key that matches
    the hint but fails is the answer (the bundle changed, or the signature is forged) and ends the search."""
    for key in trusted:
        try:
            verify_signature(bundle, key.path, signature)
        except SigningError as exc:
            if "Key mismatch" in str(exc):
                continue
            report.key_fingerprint = key.fingerprint
            report.failures.append(_short_signature_message(str(exc)))
            return
        _signed(report, Signer(key.fingerprint, key.name, SOURCE_TRUST_STORE))
        return
    claimed = _bundle_key_fingerprint(bundle)
    report.failures.append(
        f"signer not verified: the signature verifies with none of the {len(trusted)} key(s) in your trust store"
        + (f"; the bundle says it was signed by {claimed}" if claimed else "")
        + ". If the publisher announced that fingerprint, add their key with `dpmedtf trust add KEY` or pass "
        "--public-key KEY; otherwise do not use this bundle")


def _bundle_key_fingerprint(bundle: Path) -> str | None:
    try:
        return fingerprint(bundle / PUBLIC_KEY_FILE)
    except SigningError:
        return None


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
    expected = metadata.get("expected_input")
    if expected is not None and not (isinstance(expected, dict) and all(
            isinstance(v, int) or (isinstance(v, list) and all(isinstance(i, str) for i in v)) for v in expected.values())):
        problems.append(f"{METADATA_FILE}: expected_input must be an object of lists of names and whole numbers")
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


def _preprocess_graph_problems(bundle: Path, metadata: dict, report: VerificationReport) -> list[str] | None:
    """A radiograph bundle's preprocess.onnx must be the training preprocessing, not merely a valid graph:
    it is run on a small fixed image and must give exactly what dpmedtf's own preprocessing gives.
    None (and a warning) for a bundle older than the graph."""
    import onnx

    from dpmedtf.release import onnx_model, preprocessing
    from dpmedtf.release.layout import PREPROCESS_FILE

    described = _mapping(_mapping(metadata.get("preprocessing")).get("graph"))
    if not described:
        if metadata.get("format_version", 0) >= 3:
            return [f"{METADATA_FILE}: preprocessing.graph is missing; a bundle of format 3 describes its "
                    f"{PREPROCESS_FILE}"]
        report.warnings.append(f"this bundle (format {metadata.get('format_version')}) has no {PREPROCESS_FILE}; "
                               "only dpmedtf can prepare its inputs")
        return None
    path = bundle / str(described.get("file", PREPROCESS_FILE))
    if not path.is_file():
        return [f"{path.name}: named by {METADATA_FILE} but missing from the bundle"]
    try:
        proto = onnx.load(str(path))
        onnx_model.check_graph(proto, (str(described.get("input")),), (str(described.get("output")),))
        size = int(metadata["preprocessing"]["image_size"])
        properties = onnx_model.metadata_of(proto)
        problems = [f"{path.name}: metadata_props[{key!r}] = {properties.get(key)!r}, expected {value!r}"
                    for key, value in (("image_size", str(size)), ("model_version", metadata.get("model_version")))
                    if properties.get(key) != value]
        probe = np.add.outer(np.arange(40, dtype=np.float32) * 37.0, np.arange(36, dtype=np.float32) ** 2) % 4093
        (image,) = onnx_model.session(path.read_bytes()).run([described["output"]], {described["input"]: probe})
    except Exception as exc:  # onnx and onnxruntime raise their own types for a damaged graph
        return [f"{path.name}: not a runnable preprocessing graph ({exc.__class__.__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''})"]
    expected = preprocessing.to_model_input(preprocessing.radiograph_uint8(probe, size))[None]
    if image.shape != expected.shape or not np.array_equal(image, expected):
        problems.append(f"{path.name}: on a test image it does not give dpmedtf's preprocessing (shape {image.shape}, "
                        f"expected {expected.shape})")
    return problems


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
