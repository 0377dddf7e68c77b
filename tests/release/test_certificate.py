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
                    notes={"images_per_patient_max": 3, "synthetic_data": False, "randomness": "secret", **notes})
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
    assert "for a patient with up to 3 images the guarantee is ε = " in certificate["statement"]
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


def independent_epsilon(event_json: dict, delta: float, accountant: str) -> float:
    """ε of a certificate's serialised event by dp_accounting's accountants, parsed here without dpmedtf."""
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    def parse(e):
        name = e["class_name"]
        if name == "GaussianDpEvent":
            return dp_accounting.GaussianDpEvent(e["noise_multiplier"])
        if name == "PoissonSampledDpEvent":
            return dp_accounting.PoissonSampledDpEvent(e["sampling_probability"], parse(e["event"]))
        if name == "SelfComposedDpEvent":
            return dp_accounting.SelfComposedDpEvent(parse(e["event"]), e["count"])
        if name == "ComposedDpEvent":
            return dp_accounting.ComposedDpEvent([parse(x) for x in e["events"]])
        raise AssertionError(name)

    accountant = pld_privacy_accountant.PLDAccountant() if accountant == "pld" else rdp_privacy_accountant.RdpAccountant()
    return accountant.compose(parse(event_json)).get_epsilon(delta)


def test_every_epsilon_of_a_pld_certificate_with_dp_class_counts_is_recomputed_independently():
    from dpmedtf.privacy.class_counts import count_event
    from dpmedtf.privacy.ledger import Release

    counts = Release("class counts", "noisy counts", accounting.dp_event_to_json(count_event(10.0, 8)))
    source = Ledger(dataset_size=2_000, batch_size=64, delta=1e-4, accountant="pld", unit_of_privacy="image",
                    notes={"images_per_patient_max": 2, "synthetic_data": True, "randomness": "secret"})
    source = source.with_release(counts).record(300, 64 / 2_000, 0.9, 1.5)
    certificate = build_certificate(source)
    assert schema_problems(certificate, "privacy_certificate.schema.json") == []
    assert check_consistency(certificate) == []
    assert certificate["accountant"] == "pld"
    assert certificate["epsilon"] == pytest.approx(independent_epsilon(certificate["dp_event"], 1e-4, "pld"), rel=1e-9)
    cross = certificate["epsilon_cross_check"]
    assert cross["accountant"] == "rdp"
    assert cross["epsilon"] == pytest.approx(independent_epsilon(certificate["dp_event"], 1e-4, "rdp"), rel=1e-9)
    assert certificate["epsilon"] < cross["epsilon"]  # PLD is the tighter of the two
    parts = {m["what"]: m for m in certificate["mechanisms"]}
    assert list(parts) == ["class counts", "DP-SGD"]
    for part in parts.values():
        assert part["epsilon_alone"] == pytest.approx(independent_epsilon(part["dp_event"], 1e-4, "pld"), rel=1e-9)
    # Composition costs something but less than the sum of the parts.
    assert parts["DP-SGD"]["epsilon_alone"] < certificate["epsilon"] < sum(p["epsilon_alone"] for p in parts.values())
    patient = certificate["patient_level"]
    assert patient["max_images_per_patient"] == 2 and patient["delta"] == 1e-4
    assert certificate["epsilon"] < patient["epsilon"] == min(patient["by_accountant"].values())
    assert "class counts" in certificate["statement"] and "N is treated as public" in certificate["statement"]
    assert "every intermediate model" in certificate["statement"]


def test_patient_level_epsilon_agrees_with_tensorflow_privacy_group_privacy():
    """tensorflow-privacy's statement computes user-level ε by Vadhan's group-privacy lemma on its RDP
    example-level ε. Ours does the same per accountant and certifies the smaller of the PLD- and RDP-based
    bounds (both are upper bounds at the same δ), so: its RDP-based figure equals tensorflow-privacy's, and
    the certified one is no larger. Differences: tf-privacy counts sensitivity 2C with microbatches (turned
    off here), and it derives steps from epochs (here chosen so both give the same 2,400 steps)."""
    from tensorflow_privacy.privacy.analysis.compute_dp_sgd_privacy_lib import compute_dp_sgd_privacy_statement
    import re

    n, b, sigma, epochs, delta, k = 10_000, 100, 1.1, 24, 1e-5, 3
    source = Ledger(dataset_size=n, batch_size=b, delta=delta, accountant="pld", unit_of_privacy="image",
                    notes={"images_per_patient_max": k, "randomness": "secret"}).record(2_400, b / n, sigma, 1.5)
    patient = build_certificate(source)["patient_level"]
    statement = compute_dp_sgd_privacy_statement(number_of_examples=n, batch_size=b, num_epochs=epochs,
                                                 noise_multiplier=sigma, delta=delta, used_microbatching=False,
                                                 max_examples_per_user=k)
    user_level = statement[statement.index("User-level DP"):]
    tfp = float(re.search(r"Epsilon assuming Poisson sampling \(\*\):\s+([0-9.]+)", user_level).group(1))
    assert patient["by_accountant"]["rdp"] == pytest.approx(tfp, abs=6e-4)  # tf-privacy prints 3 decimals
    assert patient["epsilon"] == min(v for v in patient["by_accountant"].values() if v is not None)
    assert patient["epsilon"] <= tfp + 6e-4


def test_an_experiment_run_certifies_nothing():
    certificate = build_certificate(ledger(randomness="experiment"))
    assert certificate["randomness"]["secret"] is False
    assert certificate["statement"].startswith("NO DIFFERENTIAL PRIVACY GUARANTEE APPLIES")


def test_a_released_bundles_certificate_is_recomputed_by_an_independent_accountant(bundle):
    """The real bundle of the release tests (patient unit, DP class counts, trained for real): its PLD ε,
    the RDP cross-check and each mechanism's ε recomputed from the serialised events by dp_accounting's
    own accountants; the class-count event is the Gaussian the plan's noise implies."""
    import json

    certificate = json.loads((bundle / "privacy_certificate.json").read_text())
    delta = certificate["delta"]
    assert certificate["accountant"] == "pld" and certificate["randomness"]["secret"] is True
    assert certificate["epsilon"] == pytest.approx(independent_epsilon(certificate["dp_event"], delta, "pld"), rel=1e-9)
    assert certificate["epsilon_cross_check"]["epsilon"] == pytest.approx(
        independent_epsilon(certificate["dp_event"], delta, "rdp"), rel=1e-9)
    counts, sgd = certificate["mechanisms"]
    assert counts["what"] == "class counts" and sgd["what"] == "DP-SGD"
    assert counts["dp_event"] == {"class_name": "GaussianDpEvent", "noise_multiplier": pytest.approx(10.0 / math.sqrt(8))}
    for part in (counts, sgd):
        assert part["epsilon_alone"] == pytest.approx(independent_epsilon(part["dp_event"], delta, "pld"), rel=1e-9)
    assert certificate["unit_of_privacy"] == "patient"
    assert certificate["patient_level"]["epsilon"] == certificate["epsilon"]
    assert certificate["epsilon"] <= 8.0
