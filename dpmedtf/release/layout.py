"""What a release bundle directory contains."""

from __future__ import annotations

from dpmedtf.release.signing import SIGNATURE_FILE

BUNDLE_FORMAT = 1
MODEL_FILE = "model.onnx"
CERTIFICATE_FILE = "privacy_certificate.json"
FAIRNESS_FILE = "fairness_report.json"
METADATA_FILE = "metadata.json"
SUMS_FILE = "SHA256SUMS"
PUBLIC_KEY_FILE = "signing_key.pub"
AUDIT_FILE = "canary_audit.json"
"""Optional: the canary audit of the released model's mechanism, referenced by hash from the certificate."""
REQUIRED_FILES = (MODEL_FILE, CERTIFICATE_FILE, FAIRNESS_FILE, "fairness_report.md", "model_card.md", METADATA_FILE,
                  PUBLIC_KEY_FILE, SUMS_FILE, SIGNATURE_FILE)
UNSUMMED = (SUMS_FILE, SIGNATURE_FILE)
"""SHA256SUMS cannot hash itself; the signature covers SHA256SUMS and is checked by its own means."""

