"""A round's selection, kept apart from its record (``state.put_selection``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from strato.errors import StratoError
from strato.fl import state
from strato.fl.coordinator import provision
from strato.services import Services, embedded


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[Services]:
    with embedded(tmp_path / "svc") as s:
        provision(s, [])
        yield s


def test_a_large_selection_is_stored_in_bounded_items_and_read_back_in_order(
        svc: Services) -> None:
    clients = [f"client-{i:05d}" for i in range(5000)]
    fields = state.put_selection(svc.table, 7, clients)
    assert fields["selected_count"] == 5000 and "selected" not in fields
    assert state.selected(svc.table, 7, fields) == clients
    items = svc.table.query(state.SELECTION, state.round_key(7) + "/")
    assert len(items) == 3  # 2048 ids an item at most
    assert max(len(str(i.value)) for i in items) < 64 * 1024


def test_a_second_attempt_at_a_selection_does_not_mix_with_the_first(svc: Services) -> None:
    first = state.put_selection(svc.table, 2, ["a", "b"])
    second = state.put_selection(svc.table, 2, ["c"])
    assert state.selected(svc.table, 2, first) == ["a", "b"]
    assert state.selected(svc.table, 2, second) == ["c"]
    assert state.selected(svc.table, 3, state.put_selection(svc.table, 3, [])) == []


def test_a_record_that_holds_its_selection_itself_is_read_as_it_is(svc: Services) -> None:
    record = {"round": 4, "selected": ["x", "y"]}  # a run from before the selection items
    assert state.selected(svc.table, 4, record) == ["x", "y"]
    assert state.selected_count(record) == 2
    with pytest.raises(StratoError, match="round 4's record names no selection"):
        state.selected(svc.table, 4, {"round": 4})  # not a round open to no one


def test_resuming_a_run_made_without_the_selection_table_makes_it(
        tmp_path: Path) -> None:
    from types import SimpleNamespace

    from strato.errors import NotFound
    from strato.fl import run

    with embedded(tmp_path / "old") as old:  # the tables of a run before SELECTION
        for name in state.TABLES:
            if name != state.SELECTION:
                old.table.create_table(name, stream=name == state.UPDATES)
        old.table.put(state.JOB, "config", {"clients": []})
        with pytest.raises(NotFound):
            state.put_selection(old.table, 1, ["a"])
        opts = SimpleNamespace(quiet=True, out=tmp_path / "old")
        assert run._resume_job(old, opts, tmp_path / "run.json") == {"clients": []}  # type: ignore[arg-type]
        fields = state.put_selection(old.table, 1, ["a"])
        assert state.selected(old.table, 1, fields) == ["a"]


def test_a_selection_missing_items_is_an_error_not_a_smaller_round(svc: Services) -> None:
    fields = state.put_selection(svc.table, 5, [f"c{i}" for i in range(3000)])
    last = svc.table.query(state.SELECTION, state.round_key(5) + "/")[-1]
    svc.table.delete(state.SELECTION, last.key)
    with pytest.raises(StratoError, match="holds 2048 clients, its record says 3000"):
        state.selected(svc.table, 5, fields)


class _Ctx:
    def __init__(self) -> None:
        self.invoked: list[tuple[str, dict[str, object]]] = []

    def invoke_async(self, function: str, event: dict[str, object]) -> None:
        self.invoked.append((function, event))


def _start_job(svc: Services, monkeypatch: pytest.MonkeyPatch, *, queues: str,
               registered: str) -> ModuleType:
    """The coordinator's functions on ``svc``, for a job of two clients a round drawn
    from those registered (a queue for each of ``queues``, registered or not)."""
    from strato.fl import functions

    job = {"config": {"clients_per_round": 2, "seed": 0, "rounds": 3}, "quorum_count": 2,
           "simulate": False}
    monkeypatch.setattr(functions, "worker_services", lambda: svc)
    monkeypatch.setitem(functions._warm, "job", job)
    provision(svc, list(queues))
    for c in registered:
        svc.table.put(state.CLIENTS, c, {})
    return functions


def test_a_retried_start_keeps_the_selection_its_notices_went_to(
        svc: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    functions = _start_job(svc, monkeypatch, queues="abcdefg", registered="abc")
    functions.start_round({"round": 1, "token": "t1"}, _Ctx())  # type: ignore[arg-type]
    first = svc.table.get(state.ROUNDS, state.round_key(1))
    assert first is not None and first.value["selected_count"] == 2
    chosen = state.selected(svc.table, 1, first.value)
    for c in ("d", "e", "f", "g"):  # more clients register: a new draw would differ
        svc.table.put(state.CLIENTS, c, {})
    functions.start_round({"round": 1, "token": "t2"}, _Ctx())  # type: ignore[arg-type]
    again = svc.table.get(state.ROUNDS, state.round_key(1))
    assert again is not None and again.value["token"] == "t2"
    assert state.selected(svc.table, 1, again.value) == chosen
    notified = {c: len(svc.bus.receive(state.client_queue(c), 10)) for c in "abcdefg"}
    assert notified == {c: 2 if c in chosen else 0 for c in "abcdefg"}  # each chosen, twice


def test_a_start_that_loses_the_race_removes_its_selection_and_follows_the_winner(
        svc: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    functions = _start_job(svc, monkeypatch, queues="abcd", registered="abcd")
    put_selection = state.put_selection

    def racing(table: object, r: int, clients: list[str]) -> dict[str, object]:
        mine = put_selection(svc.table, r, clients)  # then another start's record lands
        theirs = put_selection(svc.table, r, ["c", "d"])
        svc.table.put(state.ROUNDS, state.round_key(r),
                      {"round": r, "status": "open", "token": "t0", **theirs})
        return mine

    monkeypatch.setattr(state, "put_selection", racing)
    assert functions.start_round({"round": 1, "token": "t1"}, _Ctx()) == {  # type: ignore[arg-type]
        "round": 1, "selected": 2}
    record = svc.table.get(state.ROUNDS, state.round_key(1))
    assert record is not None and record.value["token"] == "t1"
    assert state.selected(svc.table, 1, record.value) == ["c", "d"]
    left = svc.table.query(state.SELECTION, state.round_key(1) + "/")
    assert {i.key.split("/")[-2] for i in left} == {record.value["selection"]}
    notified = {c: len(svc.bus.receive(state.client_queue(c), 10)) for c in "abcd"}
    assert notified == {"a": 0, "b": 0, "c": 1, "d": 1}
