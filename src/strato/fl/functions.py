"""The FL run's serverless functions, as Runtime handlers ``handler(event, ctx)``.

Each opens the run's services from its environment, keeps what is costly to rebuild
(the app, the data, a model) warm in module state, and is safe to run twice.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import numpy as np

from strato.codec import decode
from strato.errors import ConditionFailed, InvalidToken, NotFound, StratoError
from strato.fl import aggregator, buffered, state
from strato.fl import leaf as leaf_node
from strato.fl.app import App, Dataset, load_app
from strato.fl.client import SimClient
from strato.fl.data import load_job_data
from strato.services import Context, Services, worker_services

__all__ = ["aggregate", "client", "close_round", "evaluate", "leaf", "send_up", "start_round"]

_warm: dict[str, Any] = {}


def _job() -> dict[str, Any]:
    if "job" not in _warm:
        item = worker_services().table.get(state.JOB, "config")
        if item is None:
            raise NotFound("the run has no job record")
        _warm["job"] = item.value
    return _warm["job"]  # type: ignore[no-any-return]


def _app() -> App:
    if "app" not in _warm:
        _warm["app"] = load_app(_job()["app_dir"])
    return _warm["app"]  # type: ignore[no-any-return]


def select_clients(seed: int, r: int, clients: list[str], k: int) -> list[str]:
    rng = np.random.default_rng([seed, r])
    return sorted(str(c) for c in rng.choice(clients, size=k, replace=False))


def start_round(event: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Open round r: select clients, record the token, notify the selected clients."""
    svc, job = worker_services(), _job()
    r, token = int(event["round"]), str(event["token"])
    if buffered.is_async(job):
        return _start_version(svc, job, r, token, ctx)
    cfg = job["config"]
    simulate = bool(job.get("simulate", True))
    existing = svc.table.get(state.ROUNDS, state.round_key(r))
    if existing is None:
        pool = job["clients"] if simulate else [i.key for i in svc.table.query(state.CLIENTS)]
        k = min(int(cfg["clients_per_round"]), len(pool))
        selected = select_clients(int(cfg["seed"]), r, pool, k) if k else []
        drawn = state.put_selection(svc.table, r, selected)
        record = {
            "round": r,
            "status": "open",
            **drawn,
            "token": token,
            "quorum": min(int(job["quorum_count"]), max(1, k)),
            "model_in": state.model_key(r - 1),
            "opened_at": time.time(),
            "accepted_count": 0,
        }
        try:
            svc.table.put(state.ROUNDS, state.round_key(r), record, if_absent=True)
        except ConditionFailed:  # another start of it came first: its selection holds
            existing = svc.table.get(state.ROUNDS, state.round_key(r))
            assert existing is not None
            if existing.value.get("selection") != drawn["selection"]:  # (not our own put)
                with contextlib.suppress(StratoError):  # a leftover, not a failed start
                    state.drop_selection(svc.table, r, drawn)
    if existing is not None:  # a retried start: keep the round, take the new token
        state.cas_update(
            svc.table, state.ROUNDS, state.round_key(r), lambda v: {**v, "token": token}
        )
        selected = state.selected(svc.table, r, existing.value)
    for c in selected:
        state.send_notice(svc.bus, r, c)
    if simulate:
        for c in selected:
            ctx.invoke_async("client", {"client": c})
    ctx.invoke_async("aggregate", {"records": [], "warm_round": r})  # warm before updates land
    return {"round": r, "selected": len(selected)}


def _start_version(svc: Services, job: dict[str, Any], r: int, token: str,
                   ctx: Context) -> dict[str, Any]:
    """Async: the round loop reaches version r, which the aggregator may have opened
    (and even closed) already: record the token, call it back at once if r's model is
    written, and keep the clients in flight at the concurrency (round 1; a resume)."""
    buffered.open_version(svc, job, r)
    state.cas_update(svc.table, state.ROUNDS, state.round_key(r),
                     lambda v: {**v, "token": token} if v.get("token") != token else None)
    item = svc.table.get(state.ROUNDS, state.round_key(r))
    if item is not None and "model" in item.value:  # closed before the loop got here
        with contextlib.suppress(InvalidToken):
            svc.workflow.send_task_success(token, {"round": r, "model": item.value["model"]})
    # the aggregator draws the clients, so its warm worker serialises every draw
    ctx.invoke_async("aggregate", {"records": [], "warm_round": r})
    return {"round": r, "async": True}


def _client_data(client_id: str) -> Dataset:
    cache = _warm.setdefault("data", {})
    if client_id not in cache:
        job = _job()
        cache[client_id] = load_job_data(worker_services(), job, client_id)
    return cache[client_id]  # type: ignore[no-any-return]


def client(event: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """A simulated client: take the next round notice from its queue and train on it."""
    svc, job, cid = worker_services(), _job(), str(event["client"])
    sim = SimClient(svc, cid, _app(), _client_data(cid), job)
    deadline = time.monotonic() + float(event.get("wait_s", 30.0))
    while (remaining := deadline - time.monotonic()) > 0:
        notice = sim.next_notice(wait_s=min(remaining, 5.0), visibility_timeout_s=10.0)
        if notice is None:
            continue
        rnd = svc.table.get(state.ROUNDS, state.round_key(notice.round))
        if rnd is None or (rnd.value["status"] != "open" and not buffered.is_async(job)):
            # a stale notice from a closed round (async: the aggregator weighs staleness)
            svc.bus.ack(sim.queue, notice.receipt)
            continue
        try:
            return sim.train_round(notice)
        except Exception as exc:  # the run reports it (and stops if the disk is full)
            state.record_failure(svc.table, notice.round, cid, exc, "training")
            raise
    return {"client": cid, "trained": False}


def aggregate(event: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Triggered by the updates table's stream: eager, idempotent aggregation (and the
    round's warm-up and deadline close, so one worker serialises everything a round sees)."""
    svc = worker_services()
    try:
        if "warm_round" in event:
            return aggregator.warm_up(svc, int(event["warm_round"]), ctx.invoke_async)
        if "close" in event:
            return aggregator.close_round(svc, int(event["close"]), invoke=ctx.invoke_async)
        return aggregator.admit_batch(svc, list(event.get("records", [])), ctx.invoke_async)
    except Exception as exc:  # told by the run (which stops if the disk is full)
        during = "close" if "close" in event else "warm-up" if "warm_round" in event else "admit"
        state.record_failure(svc.table, _round_of(event), state.AGGREGATOR, exc, during)
        # What this worker holds of the round may be half done: the retry rebuilds it
        # from the table, as a cold worker would.
        with contextlib.suppress(Exception):
            aggregator.reset()
        raise


def _round_of(event: dict[str, Any]) -> int:
    if "warm_round" in event or "close" in event:
        return int(event.get("close", event.get("warm_round", 0)))
    for rec in event.get("records", []):
        new = rec.get("new") or {}
        if "round" in new:
            return int(new["round"])
    return 0


def leaf(event: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """The aggregation engine on one node, for the updates that lie there (a backend
    with several nodes): the root ("aggregate") hands them over and collects partials."""
    return leaf_node.leaf(worker_services(), event)


def send_up(event: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Beside a node's leaf: sends a round's late update lying on this node up to the
    root as it is (or hands it to the leaf when it cannot)."""
    return leaf_node.send_up(worker_services(), event, ctx.invoke_async)


def close_round(event: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """The round deadline passed: have the aggregator close it with the updates admitted
    so far, and return once its model is written."""
    svc, r = worker_services(), int(event["round"])
    asked = time.time()
    ctx.invoke_async("aggregate", {"close": r})
    wait = 0.01
    while ctx.remaining_s() > 1.0:
        item = svc.table.get(state.ROUNDS, state.round_key(r))
        if item is None:
            raise NotFound(f"round {r} does not exist")
        if "model" in item.value:
            accepted = int(item.value.get("accepted_count", 0))
            return {"round": r, "model": item.value["model"], "accepted": accepted}
        failed = state.failures_since(svc.table, r, state.AGGREGATOR, "close", asked)
        if failed:  # no model will come of this close: say why now, not at the timeout
            raise StratoError(f"round {r}: the aggregator could not close it: "
                              f"{failed[-1]['error']}")  # fmt: skip
        time.sleep(wait)
        wait = min(0.5, wait * 2)
    raise TimeoutError(f"round {r}: the aggregator did not close it in time")


def aggregation_latency(rnd: dict[str, Any], accepted: list[dict[str, Any]]) -> float:
    """From the moment the round could close to its model: after the last accepted
    upload for a quorum close; after the deadline itself for a deadline close (the wait
    for clients that never came is not aggregation)."""
    last = max((float(a["uploaded_at"]) for a in accepted), default=float(rnd["closed_at"]))
    if rnd.get("closed_by") == "deadline":
        last = max(last, float(rnd["closed_at"]))
    return max(0.0, float(rnd["model_ready_at"]) - last)


def evaluate(event: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Evaluate round r's global model on the test set and record the round's metrics."""
    from strato.fl.torch import load_params

    svc, job, r = worker_services(), _job(), int(event["round"])
    done = {"round": r, "next_round": r + 1, "done": r >= int(job["config"]["rounds"])}
    existing = svc.table.get(state.METRICS, state.round_key(r))
    if existing is not None:
        return {**done, "metrics": existing.value}
    rnd_item = svc.table.get(state.ROUNDS, state.round_key(r))
    if rnd_item is None or "model" not in rnd_item.value:
        raise NotFound(f"round {r} has no global model to evaluate")
    rnd = rnd_item.value
    test = _client_data("__test__")
    if "model" not in _warm:
        app = _app()
        assert app.model_fn is not None
        _warm["model"] = app.model_fn(test.info)
    load_params(_warm["model"], decode(svc.blobs.get(rnd["model"])))
    evaluate_fn = _app().evaluate_fn
    assert evaluate_fn is not None
    scores = evaluate_fn(_warm["model"], test)
    accepted = [a.value for a in svc.table.query(state.ACCEPTED, state.round_key(r) + "/")]
    uploads = [u.value for u in svc.table.query(state.UPDATES, state.round_key(r) + "/")]
    metrics = {
        "round": r,
        "accuracy": float(scores.get("accuracy", float("nan"))),
        "loss": float(scores.get("loss", float("nan"))),
        "accepted": len(accepted),
        "rejected": len(svc.table.query(state.REJECTIONS, state.round_key(r) + "/")),
        "selected": state.selected_count(rnd),
        "bytes_up": sum(int(u.get("bytes_up", 0)) for u in uploads),
        "bytes_down": sum(int(u.get("bytes_down", 0)) for u in uploads),
        "aggregation_latency_s": aggregation_latency(rnd, accepted),
        "round_s": float(rnd["model_ready_at"]) - float(rnd["opened_at"]),
        "closed_by": rnd.get("closed_by", "quorum"),
        "model_ready_at": float(rnd["model_ready_at"]),  # epoch s: curves against wall time
        # the aggregation tree the autoscaler chose for this round, and its inputs
        "tree": rnd.get("tree", {}),
        "autoscaler": rnd.get("autoscaler", {}),
        # where the close's time went: the leaves' partials reaching the root (several
        # nodes), the root's result (reading the previous model, its adds, the server
        # step, the encoding), the model's write
        "close_parts_s": rnd.get("close_parts_s", {}),
    }
    if buffered.is_async(job):  # how stale the buffer's updates were: {versions: count}
        stale: dict[str, int] = {}
        for a in accepted:
            stale[str(a.get("staleness", 0))] = stale.get(str(a.get("staleness", 0)), 0) + 1
        metrics["staleness"] = dict(sorted(stale.items(), key=lambda kv: int(kv[0])))
    if "nodes" in rnd:  # several nodes: the leaves' placement, landing, predicted bytes
        metrics["nodes"] = rnd["nodes"]
    try:
        svc.table.put(state.METRICS, state.round_key(r), metrics, if_absent=True)
    except ConditionFailed:
        existing = svc.table.get(state.METRICS, state.round_key(r))
        metrics = existing.value if existing else metrics
    return {**done, "metrics": metrics}
