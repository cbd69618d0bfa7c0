"""The aggregator function: admits updates as they arrive and closes rounds.

Invoked with batches of the ``updates`` table's stream records. Each update is
checked (round open, client selected, not a duplicate, decodable, right layout,
finite values, positive weight), admitted into the round record with a
compare-and-set, and added at once into a warm accumulator (eager aggregation).
When the round's quorum is in, the first invocation to flip the round to
``closed`` computes the new global model, writes it, and calls back the workflow's
task token. Every step is idempotent: stream records may arrive twice, a cold
worker rebuilds its accumulator from the admitted updates' blobs, and a round
whose closer died is finished by the deadline path (``close_round``).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import numpy as np
import numpy.typing as npt

from strato.codec import decode
from strato.errors import CodecError, ConditionFailed, InvalidToken, LayoutError, NotFound
from strato.fl import state
from strato.fl.strategies import RoundAggregator, download_key
from strato.params import Layout, Params
from strato.services import Services
from strato.strategy import all_finite

__all__ = ["admit_batch", "close_round", "warm_up"]

# Warm state of this worker: the accumulator of the round being aggregated. It is an
# optimisation only; the round record and the blobs are the truth.
_warm: dict[str, Any] = {}


def _job(svc: Services) -> dict[str, Any]:
    if "job" not in _warm:
        item = svc.table.get(state.JOB, "config")
        if item is None:
            raise NotFound("the run has no job record")
        _warm["job"] = item.value
        _warm["layout"] = Layout.from_json(item.value["layout"])
    return _warm["job"]  # type: ignore[no-any-return]


def _reject(svc: Services, meta: dict[str, Any], key: str, reason: str) -> None:
    # A ConditionFailed means this very update was rejected before (a redelivered record).
    with contextlib.suppress(ConditionFailed):
        svc.table.put(state.REJECTIONS, key, {**meta, "reason": reason}, if_absent=True)


def _load_update(
    svc: Services, blob: str, layout: Layout, agg: RoundAggregator
) -> tuple[Params | None, str]:
    def previous() -> Params:  # the round's input model (CS decodes its uploads against it)
        return decode(svc.blobs.get(state.model_key(agg.round - 1)), expect=layout)

    try:
        params = agg.decode_update(svc.blobs.get(blob), previous)
    except NotFound:
        return None, "update blob is missing"
    except LayoutError as exc:
        return None, str(exc)
    except CodecError as exc:
        return None, f"not decodable: {exc}"
    if not all_finite(params.flat()):
        return None, "update holds NaN or Inf values"
    return params, ""


def _round_aggregator(job: dict[str, Any], r: int) -> RoundAggregator:
    agg = _warm.get("agg")
    if not isinstance(agg, RoundAggregator) or agg.round != r:
        cfg = job["config"]
        layout: Layout = _warm["layout"]
        if isinstance(agg, RoundAggregator):
            agg.reset(r)  # reuse the warm buffers for the next round
        else:
            agg = RoundAggregator(cfg["strategy"], cfg["strategy_options"], layout, r,
                                  seed=int(cfg.get("seed", 0)))
        _warm["agg"] = agg
    return agg


def warm_up(svc: Services, r: int) -> dict[str, int]:
    """Load the job and size round r's accumulator before its first update arrives."""
    _round_aggregator(_job(svc), r)
    return {"accepted": 0, "rejected": 0, "ignored": 0}


def admit_batch(svc: Services, records: list[dict[str, Any]]) -> dict[str, int]:
    """Handle stream records of the updates table; returns counts for this batch."""
    job = _job(svc)
    layout: Layout = _warm["layout"]
    counts = {"accepted": 0, "rejected": 0, "ignored": 0}
    touched: set[int] = set()
    for rec in records:
        meta = rec.get("new")
        if rec.get("kind") != "INSERT" or rec.get("table") != state.UPDATES or not meta:
            counts["ignored"] += 1
            continue
        key, r, client = rec["key"], int(meta.get("round", -1)), str(meta.get("client", ""))
        verdict = _admit_one(svc, job, layout, key, r, client, meta)
        if verdict == "":
            counts["accepted"] += 1
            touched.add(r)
        elif verdict == "seen":
            counts["ignored"] += 1
            touched.add(r)
        else:
            _reject(svc, meta, key, verdict)
            counts["rejected"] += 1
    for r in sorted(touched):
        item = svc.table.get(state.ROUNDS, state.round_key(r))
        rnd = item.value if item else None
        if rnd and rnd["status"] == "open" and len(rnd["accepted"]) >= int(rnd["quorum"]):
            close_round(svc, r)
    return counts


def _admit_one(
    svc: Services,
    job: dict[str, Any],
    layout: Layout,
    key: str,
    r: int,
    client: str,
    meta: dict[str, Any],
) -> str:
    """'' when admitted, 'seen' for a redelivered record, else the rejection reason."""
    item = svc.table.get(state.ROUNDS, state.round_key(r))
    if item is None:
        return f"round {r} does not exist"
    rnd = item.value
    if rnd["accepted"].get(client, {}).get("key") == key:
        return "seen"
    if rnd["status"] != "open":
        return f"late: round {r} is already closed"
    if client not in rnd["selected"]:
        return f"client {client} was not selected for round {r}"
    if client in rnd["accepted"]:
        return f"duplicate: client {client} already has an update in round {r}"
    weight = meta.get("num_examples")
    if not isinstance(weight, int | float) or not weight > 0:
        return f"num_examples must be a positive number, got {weight!r}"
    params, reason = _load_update(svc, str(meta.get("blob", "")), layout, _round_aggregator(job, r))
    if params is None:
        return reason
    entry = {
        "key": key,
        "blob": meta["blob"],
        "weight": float(weight),
        "bytes_up": int(meta.get("bytes_up", 0)),
        "bytes_down": int(meta.get("bytes_down", 0)),
        "uploaded_at": float(meta.get("uploaded_at", time.time())),
    }

    def add(value: dict[str, Any]) -> dict[str, Any] | None:
        if value["status"] != "open" or client in value["accepted"]:
            return None
        value["accepted"] = {**value["accepted"], client: entry}
        return value

    if state.cas_update(svc.table, state.ROUNDS, state.round_key(r), add) is None:
        again = svc.table.get(state.ROUNDS, state.round_key(r))
        if again is not None and again.value["accepted"].get(client, {}).get("key") == key:
            return "seen"
        return f"late: round {r} closed while the update was checked"
    _round_aggregator(job, r).add(client, params.flat(), float(weight))
    return ""


def close_round(svc: Services, r: int) -> dict[str, Any]:
    """Close round ``r`` (if still open), write its global model, call back its token."""
    job = _job(svc)
    key = state.round_key(r)

    def freeze(value: dict[str, Any]) -> dict[str, Any] | None:
        if value["status"] != "open":
            return None
        return {**value, "status": "closed", "closed_at": time.time()}

    state.cas_update(svc.table, state.ROUNDS, key, freeze)
    item = svc.table.get(state.ROUNDS, key)
    assert item is not None
    rnd = item.value
    if "model" not in rnd:
        rnd = _write_model(svc, job, r, rnd)
    # InvalidToken: the round was already called back (or timed out into the deadline path).
    with contextlib.suppress(InvalidToken):
        svc.workflow.send_task_success(rnd["token"], {"round": r, "model": rnd["model"]})
    return {"round": r, "model": rnd["model"], "accepted": len(rnd["accepted"])}


def _write_model(svc: Services, job: dict[str, Any], r: int, rnd: dict[str, Any]) -> dict[str, Any]:
    layout: Layout = _warm["layout"]
    previous = decode(svc.blobs.get(state.model_key(r - 1)), expect=layout)
    accepted: dict[str, dict[str, Any]] = rnd["accepted"]
    agg = _round_aggregator(job, r)
    if agg.clients != set(accepted):  # cold worker or another closer: rebuild from blobs
        agg.reset(r)
        for client, entry in sorted(accepted.items()):
            params, reason = _load_update(svc, entry["blob"], layout, agg)
            if params is None:
                raise CodecError(f"admitted update {entry['key']} became unreadable: {reason}")
            agg.add(client, params.flat(), entry["weight"])
    strategy_state = _load_strategy_state(svc, r - 1)
    new_flat, new_state = agg.finish(previous.flat(), strategy_state)
    out = Params(layout, np.ascontiguousarray(new_flat, dtype=np.float32).view(np.uint8))
    from strato.codec import encode

    download = agg.download_payload(out)  # CS: the sparse model the clients fetch
    if download is not None:
        svc.blobs.put(download_key(state.model_key(r)), download)
    svc.blobs.put(state.model_key(r), encode(out, {"round": str(r)}).payload)
    if new_state:
        svc.blobs.put(_strategy_key(r), encode(Params.from_arrays(new_state)).payload)

    def done(value: dict[str, Any]) -> dict[str, Any] | None:
        if "model" in value:
            return None
        return {**value, "model": state.model_key(r), "model_ready_at": time.time()}

    state.cas_update(svc.table, state.ROUNDS, state.round_key(r), done)
    item = svc.table.get(state.ROUNDS, state.round_key(r))
    assert item is not None
    return item.value


def _strategy_key(r: int) -> str:
    return f"strategy/round-{r:05d}.safetensors"


def _load_strategy_state(svc: Services, r: int) -> dict[str, npt.NDArray[Any]]:
    try:
        return {k: np.array(v) for k, v in decode(svc.blobs.get(_strategy_key(r))).arrays().items()}
    except NotFound:
        return {}
