"""The canary audit as a user meets it: `dpmedtf audit`, the pipeline's audit stage, the report, the bundle.

One tiny pipeline (prepare → train → audit → evaluate → release) runs for real; the bundle then
carries ``canary_audit.json``, its certificate references it by hash without changing ε, and
verification fails when the audit file is swapped for another even if the bundle is re-signed.
"""

import hashlib
import json
import shutil

import pytest
import yaml

from dpmedtf.cli import main
from dpmedtf.release.bundle import write_sums
from dpmedtf.release.certificate import build_certificate
from dpmedtf.release.policy import FairnessRules, PrivacyRules, ReleasePolicy, check_policy
from dpmedtf.release.signing import sign_bundle
from dpmedtf.release.verify import verify_bundle


def run_cli(*args) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    return exit_info.value.code


def write_job(tmp_path, manifest, keys, **sections) -> str:
    lenient = tmp_path / "policy.yaml"  # a 10-step model cannot meet fairness limits; the privacy rules stay
    lenient.write_text(yaml.safe_dump({"privacy": {"max_epsilon": 10.0, "require_secret_randomness": True},
                                       "fairness": {"attributes": []}}))
    job = {"name": "audited", "data": {"manifest": str(manifest), "image_size": 32},
           "privacy": {"target_epsilon": 4.0, "delta": 1e-3, "accountant": "rdp", "unit": "patient"},
           "training": {"steps": 10, "batch_size": 8, "max_physical_batch": 8, "seed": 2},
           "evaluation": {"bootstrap_redraws": 20},
           "audit": {"canaries": 256},
           "release": {"private_key": str(keys / "publisher.pem"), "policy": str(lenient)},
           "pipeline": {"stages": ["prepare", "train", "audit", "evaluate", "release"]}}
    for section, values in sections.items():
        job[section] = {**job.get(section, {}), **values}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def test_pipeline_audit_stage_shows_the_bound_in_the_report_and_the_certificate_references_it(
        tmp_path, cohort_manifest, keys, capsys):
    job = write_job(tmp_path, cohort_manifest, keys)
    run = tmp_path / "run"
    assert run_cli("run", job, "--out", run) == 0
    audit = json.loads((run / "audit" / "audit.json").read_text())
    for key in ("epsilon_lower_bound", "confidence", "delta", "canaries", "kind", "certified_epsilon", "guesses",
                "correct_guesses"):
        assert key in audit
    assert audit["canaries"] == 256 and audit["kind"] == "white-box" and audit["confidence"] == 0.95
    assert 0 <= audit["epsilon_lower_bound"] <= audit["certified_epsilon"]
    assert audit["synthetic_data"] is True and "never released" in audit["privacy_cost_for_release"]
    assert audit["depends_on_training_data"] is False  # white-box scores never touch a training image
    assert (run / "audit" / "audit_bound.png").stat().st_size > 0
    report = (run / "report.html").read_text()
    assert "Canary audit: measured ε lower bound vs certified ε" in report and "audit/audit_bound.png" in report
    assert f"≥ {audit['epsilon_lower_bound']:.3g} (95%, white-box)" in report and "SYNTHETIC" in report
    assert "audit/audit.json" in (run / "index.html").read_text()
    capsys.readouterr()
    assert run_cli("evaluate", job, "--run", run, "--force") == 0  # the CLI shows the bound beside the certificate
    assert f"measured ε ≥ {audit['epsilon_lower_bound']:.3g} (canary audit, 95%)" in capsys.readouterr().out

    bundle = run / "bundle"
    certificate = json.loads((bundle / "privacy_certificate.json").read_text())
    reference = certificate["empirical_audit"]
    assert reference["sha256"] == hashlib.sha256((bundle / "canary_audit.json").read_bytes()).hexdigest()
    assert reference["epsilon_lower_bound"] == audit["epsilon_lower_bound"]
    ledger_epsilon = json.loads((run / "training.json").read_text())["epsilon"]
    assert certificate["epsilon"] == pytest.approx(ledger_epsilon)  # the audit never changes the certified ε
    assert "Canary audit" in (bundle / "model_card.md").read_text()
    assert verify_bundle(bundle, keys / "publisher.pub").ok

    # Another audit file under the same certificate is caught, even when SHA256SUMS and the signature are redone.
    forged = tmp_path / "forged"
    shutil.copytree(bundle, forged)
    (forged / "canary_audit.json").write_text(json.dumps({**audit, "epsilon_lower_bound": 0.0}))
    (forged / "model.sig").unlink()
    write_sums(forged)
    sign_bundle(forged, keys / "publisher.pem")
    report = verify_bundle(forged, keys / "publisher.pub")
    assert not report.ok and any("canary_audit.json" in f for f in report.failures)


def test_dpmedtf_audit_writes_the_bound_and_refuses_what_it_cannot_do(tmp_path, cohort_manifest, keys, capsys):
    job = write_job(tmp_path, cohort_manifest, keys, training={"steps": 4})
    out = tmp_path / "audit"
    assert run_cli("audit", job, "--out", out, "--canaries", "64", "--confidence", "0.9") == 0
    printed = capsys.readouterr().out
    audit = json.loads((out / "audit.json").read_text())
    assert audit["canaries"] == 64 and audit["confidence"] == 0.9 and audit["mechanism"]["steps"] == 4
    assert f"measured ε ≥ {audit['epsilon_lower_bound']:.3g} (90% confidence" in printed
    assert f"certified ε = {audit['certified_epsilon']:.4g}" in printed and "SYNTHETIC" in printed
    assert json.loads((out / "twin_ledger.json").read_text())["steps"] == 4
    # an existing audit is never overwritten silently
    assert run_cli("audit", job, "--out", out) != 0
    assert "already exists" in capsys.readouterr().err
    # nothing to audit without DP; a sweep needs to say which model
    non_private = write_job(tmp_path, cohort_manifest, keys, privacy={"enabled": False, "target_epsilon": None})
    assert run_cli("audit", non_private, "--out", tmp_path / "np") != 0
    assert "privacy.enabled" in capsys.readouterr().err
    sweep = write_job(tmp_path, cohort_manifest, keys, privacy={"epsilon_sweep": [2.0, 4.0], "target_epsilon": None})
    assert run_cli("audit", sweep, "--out", tmp_path / "sw") != 0
    assert "--member" in capsys.readouterr().err
    assert run_cli("audit", sweep, "--out", tmp_path / "sw", "--member", "epsilon-9") != 0
    assert "epsilon-2" in capsys.readouterr().err


def test_an_audit_above_the_certificate_breaks_the_release_policy(released_run):
    from dpmedtf.release.bundle import load_candidate

    candidate = load_candidate(released_run[1])
    certificate = build_certificate(candidate.ledger)
    policy = ReleasePolicy(privacy=PrivacyRules(max_epsilon=100.0), fairness=FairnessRules(attributes=(), check_job_attributes=False))
    parity = {"max_abs_difference": 1e-6, "passed": True}
    certificate["empirical_audit"] = {"epsilon_lower_bound": 0.1, "certified_epsilon": certificate["epsilon"]}
    assert "privacy.audit_within_certificate" not in [v.rule for v in check_policy(
        policy, certificate, candidate.fairness_report, parity)]
    certificate["empirical_audit"] = {"epsilon_lower_bound": certificate["epsilon"] + 1,
                                      "certified_epsilon": certificate["epsilon"]}
    assert "privacy.audit_within_certificate" in [v.rule for v in check_policy(
        policy, certificate, candidate.fairness_report, parity)]


def test_a_black_box_audit_is_not_published_in_the_bundle(tmp_path, capsys):
    from dpmedtf.layout import RunDir
    from dpmedtf.release.job import _audit_of

    run = RunDir(tmp_path)
    run.audit.root.mkdir(parents=True)
    record = {"member": "m", "kind": "black-box", "depends_on_training_data": True}
    run.audit.record.write_text(json.dumps(record))
    assert _audit_of(run, "m") is None  # its scores are a DP release of the training data of their own
    assert "white-box audits only" in capsys.readouterr().err
    run.audit.record.write_text(json.dumps({**record, "kind": "white-box", "depends_on_training_data": False}))
    assert _audit_of(run, "m") == run.audit.record and _audit_of(run, "another model") is None
