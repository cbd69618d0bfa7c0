"""The round rules (``control.round``): one pure state machine for every caller."""

from __future__ import annotations

import math

import pytest

from strato.control import round as rules
from strato.control.round import Admit, Arrival, Close, Deadline, Invalid, Refuse, Seen, step


def _open(quorum: int = 2) -> rules.RoundState:
    return rules.RoundState.open(3, ["a", "b", "c"], quorum)


def test_admits_until_the_quorum_then_closes_and_refuses_late_updates() -> None:
    s, actions = step(_open(), Arrival("a", "k-a", 10))
    assert actions == (Admit("a", "k-a", 10.0),) and s.is_open
    s, actions = step(s, Arrival("b", "k-b", 5.5))
    assert actions == (Admit("b", "k-b", 5.5), Close("quorum"))
    assert not s.is_open and s.closed_by == "quorum"
    s2, actions = step(s, Arrival("c", "k-c", 1))
    assert s2 == s and len(actions) == 1 and isinstance(actions[0], Refuse)
    assert actions[0].reason.startswith("late")


def test_the_same_record_twice_is_seen_once_and_a_second_update_is_a_duplicate() -> None:
    s, _ = step(_open(3), Arrival("a", "k-a", 10))
    again, actions = step(s, Arrival("a", "k-a", 10))
    assert again == s and actions == (Seen("a", "k-a"),)
    _, actions = step(s, Arrival("a", "k-a2", 10))
    assert isinstance(actions[0], Refuse) and "duplicate" in actions[0].reason


@pytest.mark.parametrize("weight", [0, -1, math.nan, math.inf, "10", None, True])
def test_a_bad_weight_is_refused_with_a_reason(weight: object) -> None:
    s, actions = step(_open(), Arrival("a", "k", weight))
    assert s == _open() and isinstance(actions[0], Refuse)
    assert "num_examples" in actions[0].reason


def test_unselected_clients_are_refused() -> None:
    _, actions = step(_open(), Arrival("zz", "k", 1))
    assert isinstance(actions[0], Refuse) and "not selected" in actions[0].reason


def test_deadline_closes_an_open_round_once() -> None:
    s, actions = step(_open(), Deadline())
    assert actions == (Close("deadline"),) and s.closed_by == "deadline"
    assert step(s, Deadline()) == (s, ())


def test_an_invalid_update_leaves_the_admitted_set_and_its_client_may_send_again() -> None:
    s, _ = step(_open(3), Arrival("a", "k-a", 10))
    s, actions = step(s, Invalid("a", "NaN"))
    assert actions == (Refuse("a", "k-a", "NaN"),) and s.admitted == {}
    assert rules.may_upload(s, 3, "a") is None
    s, actions = step(s, Arrival("a", "k-a2", 10))
    assert actions == (Admit("a", "k-a2", 10.0),)
    assert step(s, Invalid("b", "NaN")) == (s, ())  # not admitted: nothing to take back


def test_may_upload_gives_the_gateways_reasons() -> None:
    assert rules.may_upload(None, 9, "a") == "round 9 does not exist"
    s, _ = step(_open(3), Arrival("a", "k", 1))
    assert "duplicate" in (rules.may_upload(s, 3, "a") or "")
    assert "not selected" in (rules.may_upload(s, 3, "x") or "")
    closed, _ = step(s, Deadline())
    assert "late" in (rules.may_upload(closed, 3, "b") or "")
    assert rules.may_upload(s, 3, "b") is None
