"""What a release bundle directory contains."""

from __future__ import annotations

from dpmedtf.release.signing import SIGNATURE_FILE

BUNDLE_FORMAT = 3
"""2: the model card also as ``model_card.html`` and ``model_card.json``; ``metadata.json``'s
``release.policy`` names the policy by name, file name, SHA-256 and rules instead of its path.
3: radiograph bundles carry ``preprocess.onnx``; ``metadata.json`` has ``expected_input`` (the modality guard)."""
MODEL_FILE = "model.onnx"
PREPROCESS_FILE = "preprocess.onnx"
"""Radiograph bundles only: decoded pixels (H, W) → the model's input, as an ONNX graph
(``preprocess_graph.py``); ``metadata.json``'s ``preprocessing.graph`` names its file, input and output."""
CERTIFICATE_FILE = "privacy_certificate.json"
FAIRNESS_FILE = "fairness_report.json"
FAIRNESS_MARKDOWN_FILE = "fairness_report.md"
METADATA_FILE = "metadata.json"
MODEL_CARD_FILE = "model_card.md"
MODEL_CARD_HTML_FILE = "model_card.html"
"""The same card as the Markdown, for a browser (the run's summary page links it)."""
MODEL_CARD_JSON_FILE = "model_card.json"
"""The card's content, machine-readable; schema ``release/model_card.schema.json``."""
SUMS_FILE = "SHA256SUMS"
PUBLIC_KEY_FILE = "signing_key.pub"
AUDIT_FILE = "canary_audit.json"
"""Optional: the canary audit of the released model's mechanism, referenced by hash from the certificate."""
FIGURE_SUFFIX = ".png"
"""Optional: the model's evaluation figures, copied under their evaluation file names and shown by the card."""
REQUIRED_FILES = (MODEL_FILE, CERTIFICATE_FILE, FAIRNESS_FILE, FAIRNESS_MARKDOWN_FILE, MODEL_CARD_FILE,
                  MODEL_CARD_HTML_FILE, MODEL_CARD_JSON_FILE, METADATA_FILE, PUBLIC_KEY_FILE, SUMS_FILE, SIGNATURE_FILE)
UNSUMMED = (SUMS_FILE, SIGNATURE_FILE)
"""SHA256SUMS cannot hash itself; the signature covers SHA256SUMS and is checked by its own means."""
