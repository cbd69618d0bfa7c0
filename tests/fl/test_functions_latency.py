"""A round's aggregation latency: from when it could close to its model."""

from __future__ import annotations

import pytest

from strato.fl.functions import aggregation_latency


def test_a_quorum_close_counts_from_the_last_accepted_upload() -> None:
    rnd = {"closed_by": "quorum", "closed_at": 105.0, "model_ready_at": 105.25}
    accepted = [{"uploaded_at": 100.0}, {"uploaded_at": 105.0}]
    assert aggregation_latency(rnd, accepted) == pytest.approx(0.25)


def test_a_deadline_close_does_not_count_the_wait_for_clients_that_never_came() -> None:
    # the last update came at 100, the deadline closed the round at 160
    rnd = {"closed_by": "deadline", "closed_at": 160.0, "model_ready_at": 160.5}
    assert aggregation_latency(rnd, [{"uploaded_at": 100.0}]) == pytest.approx(0.5)
    assert aggregation_latency(rnd, []) == pytest.approx(0.5)


def test_a_clock_step_never_gives_a_negative_latency() -> None:
    rnd = {"closed_by": "quorum", "closed_at": 99.0, "model_ready_at": 99.0}
    assert aggregation_latency(rnd, [{"uploaded_at": 100.0}]) == 0.0
