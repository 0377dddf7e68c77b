"""The ledger records every step and recomputes ε from what it recorded."""

import json

import dp_accounting
import pytest

from dpmedtf.privacy import accounting as acc
from dpmedtf.privacy.ledger import Ledger, Segment


def empty(budget=None):
    return Ledger(dataset_size=1000, batch_size=10, delta=1e-5, accountant="rdp", unit_of_privacy="image",
                  epsilon_budget=budget)


def test_identical_steps_merge_and_epsilon_matches_the_accountant():
    ledger = empty().record(30, 0.01, 1.1, 1.5).record(20, 0.01, 1.1, 1.5)
    assert ledger.segments == (Segment(50, 0.01, 1.1, 1.5),) and ledger.steps == 50
    assert ledger.epsilon() == acc.compute_epsilon(acc.DpSgdSchedule(1000, 10, 50, 1.1), 1e-5, "rdp").epsilon


def test_changed_parameters_start_a_segment_and_compose():
    ledger = empty().record(30, 0.01, 1.1, 1.5).record(20, 0.01, 2.0, 1.5)
    assert len(ledger.segments) == 2
    composed = dp_accounting.ComposedDpEvent([acc.dp_sgd_event(0.01, 1.1, 30), acc.dp_sgd_event(0.01, 2.0, 20)])
    assert ledger.epsilon() == acc.epsilon_of_event(composed, 1e-5, "rdp")[0]
    assert ledger.epsilon() > empty().record(30, 0.01, 1.1, 1.5).epsilon()


def test_round_trip_through_json(tmp_path):
    ledger = (empty(budget=3.0).record(40, 0.01, 1.1, 1.5)
              .with_non_dp_use("class weights", "counted on training labels", private_data_used=True))
    path = ledger.save(tmp_path / "ledger.json")
    data = json.loads(path.read_text())
    assert data["epsilon"] == ledger.epsilon() and data["steps"] == 40
    assert acc.epsilon_of_event(acc.dp_event_from_json(data["dp_event"]), 1e-5, "rdp")[0] == ledger.epsilon()
    assert Ledger.load(path) == ledger
    assert not list(tmp_path.glob(".ledger.json.*"))  # the temporary file was renamed, not left behind


def test_budget_bisection_finds_the_last_step_that_fits():
    ledger = empty(budget=1.0)
    fits = ledger.max_steps_within_budget(10_000, 0.01, 1.1)
    assert 0 < fits < 10_000
    assert ledger.epsilon(fits, 0.01, 1.1) <= 1.0 < ledger.epsilon(fits + 1, 0.01, 1.1)
    assert empty().max_steps_within_budget(10_000, 0.01, 1.1) == 10_000  # no budget, no limit
