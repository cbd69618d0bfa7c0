"""Where a run keeps its state: table names, keys and compare-and-set updates.

Everything a run knows lives in the Table and the BlobStore, never only in a
process: that is what lets any function be cold-started, retried or run twice, and
a killed coordinator be resumed.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from strato.errors import ConditionFailed, NotFound, StratoError, disk_full
from strato.services.bus import Bus
from strato.services.table import Item, Table

__all__ = [
    "ACCEPTED",
    "AGGREGATOR",
    "CLIENTS",
    "FAILURES",
    "JOB",
    "METRICS",
    "REJECTIONS",
    "ROUNDS",
    "SELECTION",
    "TOPIC",
    "UPDATES",
    "accepted_key",
    "cas_update",
    "client_queue",
    "drop_selection",
    "failures_since",
    "model_key",
    "put_selection",
    "record_failure",
    "round_key",
    "selected",
    "selected_count",
    "update_key",
]

JOB = "job"  # "config": the job, app and data description
ROUNDS = "rounds"  # one record per round: token, status, counters, tree (a few hundred bytes)
SELECTION = "selection"  # each round's selected clients, written once as the round opens
UPDATES = "updates"  # one record per uploaded update: its stream triggers aggregation
ACCEPTED = "accepted"  # one item per admitted update ("round/client"): what the model sums
REJECTIONS = "rejections"  # one record per refused update, with the reason
METRICS = "metrics"  # one record per evaluated round: the checkpoint
CLIENTS = "clients"  # remote clients registered through the gateway
FAILURES = "failures"  # one record per failed simulated client: the run reports each
TOPIC = "global-model-ready"
TABLES = (JOB, ROUNDS, SELECTION, UPDATES, ACCEPTED, REJECTIONS, METRICS, CLIENTS, FAILURES)
SELECTION_CHUNK = 2048  # client ids per selection item: far under DynamoDB's 400 KB an item


def round_key(r: int) -> str:
    return f"{r:05d}"


def update_key(r: int, client: str, nonce: str) -> str:
    return f"{r:05d}/{client}/{nonce}"


def accepted_key(r: int, client: str) -> str:
    return f"{r:05d}/{client}"


def model_key(r: int) -> str:
    """The global model after round ``r`` (round 0: the initial model)."""
    return f"models/round-{r:05d}.safetensors"


def client_queue(client: str) -> str:
    return f"client-{client}"


def put_selection(table: Table, r: int, clients: list[str]) -> dict[str, Any]:
    """Store round ``r``'s selection apart from its record, before the record names it:
    the record stays a few hundred bytes however many clients a round selects, so the
    counter each admitted update moves costs the same at 10 clients as at 10,000. The
    ids go in items of ``SELECTION_CHUNK`` under this attempt's own prefix: a retried
    start that drew another selection (registered clients come and go) never mixes
    with the one the record names. Returns the record's fields that name it."""
    attempt = uuid.uuid4().hex[:12]
    chunks = [clients[i : i + SELECTION_CHUNK] for i in range(0, len(clients), SELECTION_CHUNK)]
    for k, chunk in enumerate(chunks):
        table.put(SELECTION, f"{_selection_prefix(r, attempt)}{k:05d}", {"clients": chunk})
    return {"selection": attempt, "selected_count": len(clients)}


def _selection_prefix(r: int, attempt: str) -> str:
    return f"{round_key(r)}/{attempt}/"


def drop_selection(table: Table, r: int, fields: dict[str, Any]) -> None:
    """Remove the items ``put_selection`` wrote (``fields``: what it returned) when
    no record came to name them: a start that lost the race to another start of the
    same round."""
    for item in table.query(SELECTION, _selection_prefix(r, fields["selection"])):
        table.delete(SELECTION, item.key)


def selected(table: Table, r: int, record: dict[str, Any]) -> list[str]:
    """Round ``r``'s selected clients, as its record names them (a record that holds
    them itself, as a run before the selection had items of its own wrote, or an
    asynchronous round's, open to all: those)."""
    attempt = record.get("selection")
    if attempt is None:
        if "selected" in record:
            return [str(c) for c in record["selected"]]
        raise StratoError(f"round {r}'s record names no selection")
    items = table.query(SELECTION, _selection_prefix(r, attempt))
    found = [str(c) for item in items for c in item.value["clients"]]
    if len(found) != selected_count(record):
        raise StratoError(f"round {r}'s selection holds {len(found)} clients, its record "
                          f"says {selected_count(record)}")
    return found


def selected_count(record: dict[str, Any]) -> int:
    """How many clients a round record's round selected."""
    if "selected_count" in record:
        return int(record["selected_count"])
    return len(record.get("selected", ()))


def send_notice(bus: Bus, r: int, client: str) -> None:
    """Tell ``client`` that round ``r``'s model is ready (on the global-model-ready topic)."""
    notice = json.dumps({"round": r, "model_key": model_key(r - 1)})
    bus.publish(TOPIC, notice, {"client": client, "round": str(r)})


def cas_update(
    table: Table,
    name: str,
    key: str,
    change: Callable[[dict[str, Any]], dict[str, Any] | None],
    *,
    attempts: int = 100,
) -> dict[str, Any] | None:
    """Apply ``change`` to an item with compare-and-set, retrying on conflicts.

    ``change`` gets a copy of the current value and returns the new value, or None
    to leave the item as it is. Returns what was written (or None).
    """
    for attempt in range(attempts):
        item: Item | None = table.get(name, key)
        if item is None:
            raise NotFound(f"no {name} record {key!r}")
        new = change(dict(item.value))
        if new is None:
            return None
        try:
            table.put(name, key, new, if_version=item.version)
            return new
        except ConditionFailed:
            time.sleep(0.001 * (attempt + 1))
    raise ConditionFailed(f"{name} record {key!r} kept changing under {attempts} attempts")


AGGREGATOR = "aggregator"  # who failed, in a FAILURES record, when not a client


def record_failure(table: Table, r: int, who: str, exc: BaseException, during: str = "") -> None:
    """Note that a simulated client (``who``: its id) or the aggregator (``AGGREGATOR``)
    failed in round ``r``: the run that drives them says so, and stops when the cause
    is a full disk. Best effort: the table may lie on the very disk that is full."""
    text = " ".join(str(exc).split())
    value = {"round": r, "who": who, "during": during, "error": f"{type(exc).__name__}: {text}",
             "disk_full": disk_full(exc), "at": time.time()}  # fmt: skip
    with contextlib.suppress(OSError, StratoError):
        table.put(FAILURES, f"{round_key(r)}/{who}/{uuid.uuid4().hex[:8]}", value)


def failures_since(
    table: Table, r: int, who: str, during: str, since: float
) -> list[dict[str, Any]]:
    """``who``'s failures ``during`` one kind of work in round ``r`` recorded at or after
    ``since`` (epoch seconds)."""
    items = table.query(FAILURES, f"{round_key(r)}/{who}/")
    return [
        i.value for i in items if i.value.get("during") == during and float(i.value["at"]) >= since
    ]
