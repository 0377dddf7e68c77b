"""The certificate comes from the ledger alone, passes its schema, and its arithmetic is checkable."""

import copy
import math

import pytest

from dpmedtf.privacy import accounting
from dpmedtf.privacy.ledger import Ledger
from dpmedtf.release.certificate import CertificateError, build_certificate, check_consistency
from dpmedtf.resources import schema_problems


def ledger(delta=1e-5, unit="image", steps=(400,), **notes) -> Ledger:
    result = Ledger(dataset_size=10_000, batch_size=100, delta=delta, accountant="rdp", unit_of_privacy=unit,
                    notes={"images_per_patient_max": 3, "synthetic_data": False, **notes})
    for count in steps:
        result = result.record(count, 100 / 10_000, 1.1, 1.5)
    return result.with_non_dp_use("class weights", "inverse class frequencies", private_data_used=True)


def test_certificate_states_what_the_ledger_recorded():
    source = ledger(steps=(150, 250), clipping_engine="dpmedtf fast clipping",  # resumed: two sessions, one schedule
                    noise_added="once per step to the global clipped sum")
    certificate = build_certificate(source, ({"what": "decision thresholds", "how": "validation",
                                              "private_data_used": True},))
    assert schema_problems(certificate, "privacy_certificate.schema.json") == []
    expected = accounting.compute_epsilon(accounting.DpSgdSchedule(10_000, 100, 400, 1.1), 1e-5, "rdp").epsilon
    assert math.isclose(certificate["epsilon"], expected, rel_tol=1e-9)
    assert (certificate["steps"], certificate["sampling_rate"], certificate["noise_multiplier"],
            certificate["clip_norm"], certificate["dataset_size"]) == (400, 0.01, 1.1, 1.5, 10_000)
    assert certificate["sampling"] == "poisson" and certificate["unit_of_privacy"] == "image"
    assert certificate["delta_vs_dataset_size"] == {"one_over_n": 1e-4, "delta_below_one_over_n": True,
                                                   "large_delta_explicitly_allowed": False}
    assert [u["what"] for u in certificate["non_dp_uses_of_private_data"]] == ["class weights", "decision thresholds"]
    assert "class weights; decision thresholds" in certificate["statement"]
    assert "group privacy over 3 images" in certificate["statement"]
    assert certificate["clipping"] == {"engine": "dpmedtf fast clipping"}
    assert certificate["noise"]["added"] == "once per step to the global clipped sum"
    assert check_consistency(certificate) == []


def test_patient_level_certificate_says_so():
    certificate = build_certificate(ledger(unit="patient", max_images_per_patient_per_step=2))
    assert certificate["neighbouring_relation"]["description"].endswith("all images of one patient")
    assert certificate["images_per_patient"]["max_per_step"] == 2
    assert "single patient" in certificate["statement"]


def test_large_delta_is_flagged_in_the_certificate():
    certificate = build_certificate(ledger(delta=1e-3, allow_large_delta=True))
    assert certificate["delta_vs_dataset_size"]["delta_below_one_over_n"] is False
    assert certificate["delta_vs_dataset_size"]["large_delta_explicitly_allowed"] is True
    assert "WARNING" in certificate["statement"]


@pytest.mark.parametrize("field, value, message", [
    ("epsilon", 0.5, "does not match"),
    ("noise_multiplier", 2.0, "noise_multiplier"),
    ("steps", 10, "steps"),
    ("dataset_size", 20_000, "sampling_rate"),
])
def test_consistency_check_catches_an_edited_number(field, value, message):
    certificate = build_certificate(ledger())
    edited = copy.deepcopy(certificate)
    edited[field] = value
    assert any(message in problem for problem in check_consistency(edited))


def test_consistency_check_catches_an_edited_event():
    certificate = build_certificate(ledger())
    certificate["dp_event"]["event"]["event"]["noise_multiplier"] = 5.0  # stronger noise → smaller ε
    problems = check_consistency(certificate)
    assert any("does not match" in p for p in problems) and any("noise_multiplier" in p for p in problems)


def test_no_certificate_without_dp_steps():
    empty = Ledger(10_000, 100, 1e-5, "rdp", "image")
    with pytest.raises(CertificateError, match="no DP-SGD step"):
        build_certificate(empty)


def test_schema_rejects_a_certificate_missing_a_contract_key():
    certificate = build_certificate(ledger())
    del certificate["dp_event"]
    assert any("dp_event" in p for p in schema_problems(certificate, "privacy_certificate.schema.json"))
