"""Asynchronous FL's run state: open versions, clients in flight, who trains next.

The policies (staleness weights, the draw of the next client) are pure, in
``control.asynchronous``; this module keeps their state in the run's Table, so any
function may be cold-started, retried or run twice:

- a version is a round record (``state.ROUNDS``) open to every client
  (``open_to_all``), whose quorum is the buffer size; the aggregator opens version
  r + 1 as it writes r's model, so no client waits for the round loop;
- one job item (``state.JOB``, key ``"async"``) holds the clients in flight, each with
  the round whose notice it was sent (the model it starts from), how many clients
  were drawn so far, and the open round.

An update's arrival (admitted or refused) frees its client's slot and draws the next
client, once: a redelivered record finds its client no longer in flight and draws
nobody. A client in flight longer than ``max_staleness`` versions is given up (its
update would be refused as stale) and its slot goes to another.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from strato.control.asynchronous import Staleness, next_client
from strato.errors import ConditionFailed
from strato.fl import state
from strato.services import Services

__all__ = ["KEY", "dispatch", "in_flight", "is_async", "open_round", "open_version", "pool",
           "staleness"]

KEY = "async"  # the job item of the run's async state


def is_async(job: dict[str, Any]) -> bool:
    return bool(job["config"].get("mode", "sync") == "async")


def staleness(job: dict[str, Any]) -> Staleness:
    cfg = job["config"]
    return Staleness(str(cfg.get("staleness", "polynomial")),
                     float(cfg.get("staleness_exponent", 0.5)),
                     int(cfg.get("staleness_hinge", 4)), int(cfg.get("max_staleness", 10)))


def _item(svc: Services) -> dict[str, Any]:
    item = svc.table.get(state.JOB, KEY)
    if item is not None:
        return dict(item.value)
    fresh = {"in_flight": {}, "draws": 0, "open": 1}
    try:
        svc.table.put(state.JOB, KEY, fresh, if_absent=True)
    except ConditionFailed:  # made meanwhile
        got = svc.table.get(state.JOB, KEY)
        assert got is not None
        return dict(got.value)
    return fresh


def open_round(svc: Services) -> int:
    """The round (version number + 1) whose buffer takes updates now."""
    return int(_item(svc)["open"])


def in_flight(svc: Services) -> dict[str, int]:
    """Clients training now, each with the round whose notice it was sent."""
    return {str(c): int(r) for c, r in _item(svc)["in_flight"].items()}


def open_version(svc: Services, job: dict[str, Any], r: int) -> None:
    """Open round r's buffer (idempotent): its record, and the job item's open round."""
    cfg = job["config"]
    record = {
        "round": r,
        "status": "open",
        "selected": [],
        "open_to_all": True,  # any client may add to it: the rules check no selection
        "quorum": int(cfg["buffer"]) or int(cfg["clients_per_round"]),
        "model_in": state.model_key(r - 1),
        "opened_at": time.time(),
        "accepted_count": 0,
    }
    with contextlib.suppress(ConditionFailed):
        svc.table.put(state.ROUNDS, state.round_key(r), record, if_absent=True)
    _item(svc)
    state.cas_update(svc.table, state.JOB, KEY,
                     lambda v: {**v, "open": r} if int(v["open"]) < r else None)


def pool(svc: Services, job: dict[str, Any]) -> list[str]:
    """The clients that may be drawn: the simulated ones, or those registered."""
    if bool(job.get("simulate", True)):
        return [str(c) for c in job["clients"]]
    return [i.key for i in svc.table.query(state.CLIENTS)]


def dispatch(svc: Services, job: dict[str, Any], *, pool: list[str],
             done: tuple[str, int] | None = None, accepting: bool = True,
             exclude: frozenset[str] = frozenset(),
             invoke: Callable[..., None] | None = None) -> list[str]:
    """Fill the clients in flight up to ``concurrency``, after ``done`` = (client, the
    round of its notice) arrived (None: a top-up). Each new client gets the open
    round's notice (and, when ``invoke`` is given, a simulated client to read it).
    ``exclude``: clients already in the open buffer; ``accepting`` False (the last
    version is made): nobody is drawn. Returns the clients drawn."""
    cfg = job["config"]
    seed, rounds = int(cfg["seed"]), int(cfg["rounds"])
    limit = int(cfg["concurrency"]) or int(cfg["clients_per_round"])
    oldest = int(cfg.get("max_staleness", 10))
    _item(svc)
    drawn: list[str] = []
    notice_round = 0

    def change(v: dict[str, Any]) -> dict[str, Any] | None:
        nonlocal notice_round
        drawn.clear()
        flying = {str(c): int(r) for c, r in v["in_flight"].items()}
        open_r, draws = int(v["open"]), int(v["draws"])
        if done is not None:
            client, r = done
            if flying.get(client) != r:
                return None  # handled before (a redelivered record), or given up
            del flying[client]
        flying = {c: r for c, r in flying.items() if open_r - r <= oldest}  # give up on the lost
        while accepting and open_r <= rounds and len(flying) < limit:
            pick = next_client(seed, draws, pool, set(flying) | set(exclude))
            if pick is None:
                break
            draws += 1
            flying[pick] = open_r
            drawn.append(pick)
        notice_round = open_r
        if flying == v["in_flight"] and draws == int(v["draws"]):
            return None
        return {**v, "in_flight": flying, "draws": draws}

    state.cas_update(svc.table, state.JOB, KEY, change)
    for client in drawn:
        state.send_notice(svc.bus, notice_round, client)
        if invoke is not None:
            invoke("client", {"client": client})
    return list(drawn)
