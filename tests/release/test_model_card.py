"""The model card of a real bundle: complete, machine-readable, rendered for browsers, free of build paths.

Everything reads the session's bundle (released through `release_job` from a job whose `release:`
section sets every release-manager field); one test trains a real non-private model to check the
privacy–utility trade-off against it.
"""

import base64
import hashlib
import json
import os
import shutil
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import onnx
import pytest
import yaml

import dpmedtf
from dpmedtf.config import load_config
from dpmedtf.evaluation.job import evaluate_job
from dpmedtf.layout import RunDir
from dpmedtf.release.bundle import load_candidate, model_card_document, write_sums
from dpmedtf.release.card_rendering import model_card_markdown
from dpmedtf.release.job import NON_PRIVATE_MEMBER, _non_private_baseline
from dpmedtf.release.layout import (FIGURE_SUFFIX, MODEL_CARD_FILE, MODEL_CARD_HTML_FILE, MODEL_CARD_JSON_FILE,
                                    MODEL_FILE)
from dpmedtf.release.model_card import METHOD_CITATION, CardDetails
from dpmedtf.release.signing import SIGNATURE_FILE, sign_bundle
from dpmedtf.release.verify import verify_bundle
from dpmedtf.resources import release_file, schema_problems
from dpmedtf.runner import write_summary_page
from dpmedtf.training.job import run_training_job

SECTIONS = ("schema_version", "model_details", "intended_use", "training_data", "training_procedure", "evaluation",
            "subgroup_results", "privacy", "privacy_utility_tradeoff", "release_policy", "considerations",
            "quantitative_analysis")
HEADINGS = ("Model details", "Intended use", "Out-of-scope use", "Training data",
            "Training procedure and hyperparameters", "Evaluation data and metrics", "Subgroup results", "Privacy",
            "Privacy–utility trade-off", "Release policy", "Limitations and risks", "Licence", "Citation", "Contact",
            "References")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_model_card_json_matches_its_schema_and_holds_every_section_from_the_records(bundle, released_run):
    job_path, run = released_run
    card = read_json(bundle / MODEL_CARD_JSON_FILE)
    certificate = read_json(bundle / "privacy_certificate.json")
    training, metrics = read_json(run / "training.json"), read_json(run / "evaluation" / "metrics.json")
    assert schema_problems(card, "model_card.schema.json") == []
    assert list(card) == list(SECTIONS)

    details = card["model_details"]
    assert details["name"] == "tiny-release" and details["version"]["name"] == "1.0.0"
    assert details["architecture"]["parameters"] == 4_909_896 and details["synthetic_data"] is True
    assert METHOD_CITATION in [c["citation"] for c in details["citations"]]
    assert "https://doi.org/10.1038/s43856-024-00462-6" in [r["reference"] for r in details["references"]]

    procedure, plan, config = card["training_procedure"], training["plan"], training["config"]["training"]
    assert (procedure["optimizer"], procedure["learning_rate"]) == (config["optimizer"], config["learning_rate"])
    for key in ("expected_batch_size", "steps", "clip_norm", "noise_multiplier", "sampling", "sampling_rate",
                "unit_of_privacy", "accountant", "delta"):
        assert procedure[key] == certificate[key], key
    assert procedure["epochs"] == pytest.approx(certificate["steps"] / plan["steps_per_epoch"], abs=1e-3)
    assert procedure["clipping_engine"] == plan["clipping"]

    assert card["training_data"]["dataset_size"] == certificate["dataset_size"]
    assert [m["label"] for m in card["evaluation"]["metrics"]] == list(metrics["findings"])
    assert card["evaluation"]["mean"]["auroc"] == metrics["mean"]["auroc"]
    fairness = read_json(bundle / "fairness_report.json")
    assert len(card["subgroup_results"]["rows"]) == sum(r["finding"] == "mean" for r in fairness["rows"])

    # Ponomareva et al. 2023, Sec. 5.3: setting, accounting, DP and non-DP parts, tuning, DP-SGD parameters.
    privacy = card["privacy"]
    assert privacy["dp_setting"]["unit_of_privacy"] == certificate["unit_of_privacy"] == "patient"
    accounting = privacy["accounting"]
    assert (accounting["epsilon"], accounting["delta"], accounting["accountant"]) == \
        (certificate["epsilon"], certificate["delta"], certificate["accountant"])
    assert [m["what"] for m in accounting["composition"]] == [m["what"] for m in certificate["mechanisms"]]
    assert privacy["non_dp_uses_of_private_data"] == certificate["non_dp_uses_of_private_data"]
    assert privacy["hyperparameter_tuning"]["models_selected_from"] == 1
    assert privacy["dp_training"]["noise_multiplier"] == certificate["noise_multiplier"]
    assert privacy["certificate"]["sha256"] == hashlib.sha256((bundle / "privacy_certificate.json").read_bytes()).hexdigest()
    attack = privacy["membership_inference"]
    assert attack["threshold_attack"] == metrics["membership_inference"]["entire_dataset"]["threshold_attack"]
    assert privacy["canary_audit"] is None  # this run has no audit (test_audit_release covers one)
    assert card["privacy_utility_tradeoff"] is None  # and no non-private model

    policy = card["release_policy"]
    assert policy["name"] == "dpmedtf default policy" and policy["file"] == "policy.yaml"
    assert policy["sha256"] == hashlib.sha256(release_file("policy.yaml").read_bytes()).hexdigest()
    # The fixture overrides the policy; whether a rule was broken depends on the (secretly random) training.
    assert policy["outcome"] == ("released with an explicit override" if policy["violations"] else "meets every rule")
    assert policy["violations"] == read_json(bundle / "metadata.json")["release"]["violations"]
    assert policy["rules"]["privacy"]["max_epsilon"] == 10.0

    considerations = card["considerations"]
    for key in ("users", "use_cases", "limitations", "tradeoffs", "ethical_considerations"):
        assert considerations[key], key
    figures = sorted(p.name for p in (run / "evaluation").glob(f"*{FIGURE_SUFFIX}"))
    graphics = card["quantitative_analysis"]["graphics"]["collection"]
    assert sorted(g["image"] for g in graphics) == figures
    assert all((bundle / name).read_bytes() == (run / "evaluation" / name).read_bytes() for name in figures)

    markdown = (bundle / MODEL_CARD_FILE).read_text()
    headings = [line[3:] for line in markdown.splitlines() if line.startswith("## ")]
    assert headings == list(HEADINGS)
    assert "${" not in markdown and METHOD_CITATION in markdown


def test_release_manager_fields_of_the_job_appear_in_every_form_of_the_card(bundle, released_run):
    settings = load_config(released_run[0]).release
    card = read_json(bundle / MODEL_CARD_JSON_FILE)
    details = card["model_details"]
    assert [o["name"] for o in details["owners"]] == list(settings.owners)
    assert details["licenses"] == [{"identifier": settings.license}]
    assert details["contact"] == settings.contact
    assert [c["citation"] for c in details["citations"]] == [settings.citation, METHOD_CITATION]
    assert card["considerations"]["limitations"][-1]["description"] == settings.limitations[-1]
    for name in (MODEL_CARD_FILE, MODEL_CARD_HTML_FILE):
        text = (bundle / name).read_text()
        for value in (*settings.owners, settings.license, settings.contact, settings.citation, *settings.limitations):
            assert value in text, (name, value)


def test_without_release_manager_fields_the_card_says_what_is_missing(bundle, released_run):
    candidate = load_candidate(released_run[1])
    metadata, certificate = read_json(bundle / "metadata.json"), read_json(bundle / "privacy_certificate.json")
    card = model_card_document(candidate, metadata, certificate, "research only", "defaults")
    assert schema_problems(json.loads(json.dumps(card)), "model_card.schema.json") == []
    assert card["model_details"]["owners"] == [] and card["model_details"]["contact"] is None
    assert card["model_details"]["licenses"] == [{"custom_text": "unspecified — ask the owners"}]
    assert [c["citation"] for c in card["model_details"]["citations"]] == [METHOD_CITATION]
    markdown = model_card_markdown(card)
    assert "| Owners | not given |" in markdown and "| Contact | not given |" in markdown


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.images, self.headings, self._heading, self.text = [], [], [], None, []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        if tag in ("h1", "h2"):
            self._heading = []

    def handle_endtag(self, tag):
        if tag in ("h1", "h2") and self._heading is not None:
            self.headings.append("".join(self._heading))
            self._heading = None

    def handle_data(self, data):
        self.text.append(data)
        if self._heading is not None:
            self._heading.append(data)


def test_the_card_renders_to_a_standalone_html_page(bundle):
    page_text = (bundle / MODEL_CARD_HTML_FILE).read_text()
    markdown = (bundle / MODEL_CARD_FILE).read_text()
    assert page_text.startswith("<!doctype html>") and '<meta charset="utf-8">' in page_text
    page = _Page()
    page.feed(page_text)
    assert page.headings == ["Model card: tiny-release", *HEADINGS]
    # every Markdown table became an HTML table, and no Markdown syntax is left for the reader
    assert page.tags.count("table") == markdown.count("\n|---|") and page.tags.count("table") >= 5
    text = "".join(page.text)
    assert "|---|" not in text and "**" not in text and "SYNTHETIC DATA" in text
    assert page.tags.count("blockquote") >= 1  # the synthetic-data banner
    card = read_json(bundle / MODEL_CARD_JSON_FILE)
    figures = [g["image"] for g in card["quantitative_analysis"]["graphics"]["collection"]]
    assert page.images == figures and all((bundle / name).is_file() for name in figures)


def test_the_summary_page_links_the_html_card(tmp_path, released_run):
    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / MODEL_CARD_HTML_FILE).write_text("<!doctype html>")
    page = write_summary_page(tmp_path, load_config(released_run[0]), [], synthetic=True).read_text()
    assert f'href="bundle/{MODEL_CARD_HTML_FILE}"' in page and "model_card.md" not in page


def _published_bytes(bundle: Path, name: str) -> bytes:
    """What a file of the bundle says, for a search: the ONNX model without its weights (random bytes
    could spell anything), the signature with its base64 payload decoded."""
    data = (bundle / name).read_bytes()
    if name == MODEL_FILE:
        proto = onnx.load_from_string(data)
        for tensor in proto.graph.initializer:
            tensor.ClearField("raw_data")
            tensor.ClearField("float_data")
        return proto.SerializeToString()
    if name == SIGNATURE_FILE:
        return data + base64.b64decode(json.loads(data)["dsseEnvelope"]["payload"])
    return data


def test_no_file_of_the_bundle_names_a_path_of_the_build_machine(bundle, released_run, keys, tmp_path_factory):
    job_path, run = released_run
    paths = {run, run.resolve(), job_path.parent, release_file("policy.yaml"), release_file("policy.yaml").parent,
             Path(dpmedtf.__file__).resolve().parents[1], Path.home(), Path(tempfile.gettempdir()),
             tmp_path_factory.getbasetemp(), keys, Path(os.getcwd())}
    needles = {str(p) for p in paths if len(str(p)) > 4}  # "/" or "/tmp" alone would match by chance
    needles |= {str(p) + os.sep for p in paths if len(str(p) + os.sep) > 4}
    found = {(f.name, n) for f in sorted(bundle.iterdir()) for n in needles
             if n.encode() in _published_bytes(bundle, f.name)}
    assert found == set()
    statement = json.loads(base64.b64decode(read_json(bundle / SIGNATURE_FILE)["dsseEnvelope"]["payload"]))
    assert [s["name"] for s in statement["subject"]] == [bundle.name]  # not the staging directory's name
    metadata = read_json(bundle / "metadata.json")
    assert metadata["release"]["policy"]["file"] == "policy.yaml"


def _resign(bundle: Path, keys: Path) -> None:
    (bundle / SIGNATURE_FILE).unlink()
    write_sums(bundle)
    sign_bundle(bundle, keys / "publisher.pem")


def test_verify_rejects_a_re_signed_bundle_whose_card_breaks_its_schema_or_the_certificate(bundle_copy, keys, tmp_path):
    card = read_json(bundle_copy / MODEL_CARD_JSON_FILE)
    broken = {k: v for k, v in card.items() if k != "privacy"}
    broken["model_details"] = {**card["model_details"], "citations": [{"citation": "someone else's paper"}]}
    (bundle_copy / MODEL_CARD_JSON_FILE).write_text(json.dumps(broken))
    _resign(bundle_copy, keys)
    report = verify_bundle(bundle_copy, keys / "publisher.pub")
    assert not report.ok and "model card matches its schema" not in report.passed
    failures = [f for f in report.failures if f.startswith(MODEL_CARD_JSON_FILE)]
    assert any("'privacy' is a required property" in f for f in failures), report.failures
    assert any("citations" in f for f in failures), report.failures  # the method's paper must stay cited

    # Well-formed but claiming another ε than the certificate: what people read must be what is certified.
    claimed = tmp_path / "claimed"
    shutil.copytree(bundle_copy, claimed)
    card["privacy"]["accounting"]["epsilon"] = card["privacy"]["accounting"]["epsilon"] / 10
    (claimed / MODEL_CARD_JSON_FILE).write_text(json.dumps(card))
    _resign(claimed, keys)
    report = verify_bundle(claimed, keys / "publisher.pub")
    assert "model card matches its schema" in report.passed
    assert any(f.startswith(f"{MODEL_CARD_JSON_FILE}: privacy epsilon") for f in report.failures), report.failures


def test_the_card_weighs_privacy_against_the_runs_non_private_model(bundle, released_run, tmp_path):
    """A sweep's non-private model (trained here for real) gives the card its privacy–utility trade-off."""
    job = yaml.safe_load(released_run[0].read_text())
    job.update(privacy={"enabled": False}, training={"epochs": 1, "batch_size": 16, "max_physical_batch": 16, "seed": 3})
    (tmp_path / "non-private.yaml").write_text(yaml.safe_dump(job))
    baseline_job = load_config(tmp_path / "non-private.yaml")
    run = RunDir(tmp_path / "run")
    run_training_job(baseline_job, run.member(NON_PRIVATE_MEMBER).root)
    evaluate_job(baseline_job, run.member(NON_PRIVATE_MEMBER).root)

    baseline = _non_private_baseline(run, "epsilon-8")
    assert baseline == read_json(run.member(NON_PRIVATE_MEMBER).metrics)
    assert _non_private_baseline(run, NON_PRIVATE_MEMBER) is None  # no trade-off of the baseline against itself
    candidate = load_candidate(released_run[1])
    card = model_card_document(candidate, read_json(bundle / "metadata.json"),
                               read_json(bundle / "privacy_certificate.json"), "research only", "sweep",
                               details=CardDetails(), selected_from=2, baseline_metrics=baseline)
    assert schema_problems(json.loads(json.dumps(card)), "model_card.schema.json") == []
    tradeoff = card["privacy_utility_tradeoff"]
    dp_mean, np_mean = candidate.metrics["mean"]["auroc"], baseline["mean"]["auroc"]
    assert tradeoff["mean_auroc"]["non_private"]["auroc"] == np_mean
    assert tradeoff["mean_auroc"]["difference"] == pytest.approx(dp_mean - np_mean)
    assert [r["label"] for r in tradeoff["per_label"]] == list(candidate.metrics["findings"])
    assert "chosen from 2 trained models" in card["privacy"]["hyperparameter_tuning"]["statement"]
    markdown = model_card_markdown(card)
    assert "| Label | DP AUROC | Non-private AUROC | Difference |" in markdown
    assert f"{np_mean:.3f}" in markdown.split("## Privacy–utility trade-off")[1]


def test_public_pretrained_weights_are_named_by_their_file_not_where_they_lay(released_run):
    from dpmedtf.privacy.ledger import Ledger
    from dpmedtf.release.bundle import _without_build_paths
    from dpmedtf.release.certificate import build_certificate

    certificate = build_certificate(Ledger.load(released_run[1] / "ledger.json"))
    certificate["public_pretraining"]["weights"] = str(released_run[1] / "public" / "chexpert_resnet9.keras")
    assert _without_build_paths(certificate)["public_pretraining"]["weights"] == "chexpert_resnet9.keras"


def test_publishing_the_non_private_baselines_auroc_is_listed_as_a_use_outside_dp():
    from dpmedtf.release.bundle import evaluation_non_dp_uses

    # a model trained on the same data without DP: its published AUROC is a statistic of the training data
    listed = {u["what"]: u for u in evaluation_non_dp_uses(2, True, non_private_baseline=True)}
    assert listed["non-private baseline"]["private_data_used"] is True
    assert "non-private baseline" not in {u["what"] for u in evaluation_non_dp_uses(2, True)}
