"""The rules of a round, as one pure state machine: state and event in, state and actions out.

Every place that decides about an update calls ``step``: the aggregator (for every
update record of the stream), the gateway (before it reads an upload's body: a
refused upload stores nothing) and the AWS aggregation Lambda (which runs the
aggregator). Nothing here does I/O or reads a clock: times come in with the events.

::

    state = RoundState.open(r, selected=[...], quorum=8)
    state, actions = step(state, Arrival("0007", key="00003/0007/ab12", weight=120.0))
    # actions: (Admit(...),) or (Refuse(..., reason),) or (Seen(...),);
    #          and Close("quorum") once the quorum is in

=================  ===========================================================
event              outcome
=================  ===========================================================
``Arrival``        ``Admit``; ``Seen`` (the very same record again: at-least-once
                   delivery); ``Refuse`` with a reason (round closed: "late",
                   not selected, a second update, a bad weight); ``Close("quorum")``
                   after the admission that completes the quorum
``Deadline``       ``Close("deadline")`` if still open, else nothing
``Invalid``        an admitted update turned out bad (a leaf found NaN/Inf):
                   it leaves the admitted set; ``Refuse`` with the reason
=================  ===========================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

__all__ = [
    "Admit",
    "Arrival",
    "Close",
    "Deadline",
    "Invalid",
    "Refuse",
    "RoundState",
    "Seen",
    "may_upload",
    "positive_weight",
    "step",
]

OPEN, CLOSED = "open", "closed"


@dataclass(frozen=True)
class RoundState:
    round: int
    status: str
    selected: frozenset[str]
    quorum: int
    # client -> the key of its admitted update record (kept by the aggregator, which
    # stores one item per admitted update; the round record itself holds a count)
    admitted: dict[str, str] = field(default_factory=dict)
    closed_by: str | None = None
    # an async buffer: any client may add to it, once (no selection)
    open_to_all: bool = False

    @classmethod
    def open(cls, r: int, selected: Any, quorum: int, open_to_all: bool = False) -> RoundState:
        chosen = selected if isinstance(selected, frozenset) else frozenset(
            str(c) for c in selected)
        return cls(r, OPEN, chosen, max(1, int(quorum)),
                   open_to_all=open_to_all)

    @property
    def is_open(self) -> bool:
        return self.status == OPEN


@dataclass(frozen=True)
class Arrival:
    client: str
    key: str  # the update record's key: the same key twice is one delivery seen twice
    weight: Any  # num_examples as the client sent it (checked here)


@dataclass(frozen=True)
class Deadline:
    pass


@dataclass(frozen=True)
class Invalid:
    client: str
    reason: str


@dataclass(frozen=True)
class Admit:
    client: str
    key: str
    weight: float


@dataclass(frozen=True)
class Seen:
    client: str
    key: str


@dataclass(frozen=True)
class Refuse:
    client: str
    key: str
    reason: str


@dataclass(frozen=True)
class Close:
    cause: str  # "quorum" or "deadline"


Action = Admit | Seen | Refuse | Close
Event = Arrival | Deadline | Invalid


def positive_weight(value: Any) -> float | None:
    """``value`` as a weight (a finite positive number), or None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    w = float(value)
    return w if math.isfinite(w) and w > 0 else None


def may_upload(state: RoundState | None, r: int, client: str) -> str | None:
    """Why ``client`` may not send an update for round ``r`` now (None: it may).
    The gateway asks this before it reads an upload's body."""
    if state is None:
        return f"round {r} does not exist"
    if not state.is_open:
        return f"late: round {r} is already closed"
    if client not in state.selected and not state.open_to_all:
        return f"client {client} was not selected for round {r}"
    if client in state.admitted:
        return f"duplicate: client {client} already has an update in round {r}"
    return None


def step(state: RoundState, event: Event) -> tuple[RoundState, tuple[Action, ...]]:
    """The round's next state and what to do, for one event."""
    if isinstance(event, Deadline):
        if not state.is_open:
            return state, ()
        return replace(state, status=CLOSED, closed_by="deadline"), (Close("deadline"),)
    if isinstance(event, Invalid):
        if event.client not in state.admitted:
            return state, ()
        admitted = {c: k for c, k in state.admitted.items() if c != event.client}
        key = state.admitted[event.client]
        return replace(state, admitted=admitted), (Refuse(event.client, key, event.reason),)
    client, key = event.client, event.key
    if state.admitted.get(client) == key:
        return state, (Seen(client, key),)
    refusal = may_upload(state, state.round, client)
    weight = positive_weight(event.weight)
    if refusal is None and weight is None:
        refusal = f"num_examples must be a positive number, got {event.weight!r}"
    if refusal is not None:
        return state, (Refuse(client, key, refusal),)
    assert weight is not None
    admitted = {**state.admitted, client: key}
    actions: tuple[Action, ...] = (Admit(client, key, weight),)
    new = replace(state, admitted=admitted)
    if len(admitted) >= state.quorum:
        new = replace(new, status=CLOSED, closed_by="quorum")
        actions += (Close("quorum"),)
    return new, actions
