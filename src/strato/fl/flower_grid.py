"""``StratoGrid``: Flower's ``Grid`` on Strato's services, for a ServerApp run as is.

``push_messages`` writes each message to the BlobStore (``strato.fl.flower_wire``)
and starts the ``flower_client`` function for its destination node; nothing waits
on a node between rounds. ``pull_messages`` hands back the replies that have come in
(a node whose ClientApp raised, or whose function failed, replies with Flower's
``Error``, as a SuperNode would). A round's replies are counted as they come: bytes
each way, failures, function-seconds, and the evaluate replies' metrics (weighted by
``num-examples``), for the progress lines, ``metrics.jsonl`` and the summary.
"""

from __future__ import annotations

import contextlib
import functools
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from strato.fl.flower_engine import EagerTrain
from strato.fl.flower_wire import (
    FUNCTION,
    MESSAGES,
    REPLIES,
    decode_message,
    encode_message,
    metadata_text,
)
from strato.services import Services

__all__ = ["StratoGrid"]

_ACCURACY = ("accuracy", "acc", "eval_acc", "eval_accuracy", "test_acc", "test_accuracy")
_LOSS = ("loss", "eval_loss", "test_loss")


@dataclass
class _Round:
    number: int
    started: float = field(default_factory=time.monotonic)
    down: int = 0  # bytes of the messages sent
    up: int = 0  # bytes of the replies
    train_ok: int = 0
    failed: int = 0
    evaluated: int = 0
    weight: float = 0.0
    sums: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        return {k: v / self.weight for k, v in self.sums.items()} if self.weight else {}


@dataclass
class _Pending:
    message: Message
    future: Future[Any]
    round: _Round
    reply: Any = None  # (frame size, decoded reply), once it came in (train replies)
    abandoned: bool = False  # the ServerApp stopped waiting for it (its timeout)
    # set once the reply is decoded and with the engine (at once where none takes it)
    settled: threading.Event = field(default_factory=threading.Event)


class StratoGrid(Grid):
    def __init__(self, svc: Services, nodes: list[int], run_id: int, *,
                 rounds: Any = None, say: Callable[[str], None] | None = None,
                 out: Path | None = None, engine: EagerTrain | None = None) -> None:
        self.svc, self.nodes, self.say, self.engine = svc, list(nodes), say, engine
        self.rounds = rounds if isinstance(rounds, int) else None
        self.out = out
        self._run = Run.create_empty(run_id)
        self._pending: dict[str, _Pending] = {}
        self._rounds: dict[int, _Round] = {}  # by number
        self._current: _Round | None = None
        self._batch_opened = False
        self._engine_round = 0  # the round whose train replies the engine takes
        self._last: dict[int, Future[Any]] = {}  # each node's latest message
        self._abandoned: set[str] = set()
        self._told: set[str] = set()  # failure reasons said already
        self._refs: dict[str, int] = {}  # a content blob: messages that still need it
        self._content_of: dict[str, str] = {}  # message id -> its content blob
        self._refs_lock = threading.Lock()  # also taken in the runtime's callbacks
        self._lock = threading.RLock()
        self._reported: list[dict[str, Any]] = []
        self._last_stats = svc.runtime.stats(FUNCTION)

    # -- Flower's Grid ------------------------------------------------------------
    def set_run(self, run: Run) -> None:  # the run is this one, made by Strato
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        contents: dict[int, tuple[str, int]] = {}  # id(RecordDict) -> its blob, its size
        with self._lock:  # Flower's compatibility layer pushes from several threads
            self._batch_opened = False
            for msg in messages:
                if msg.metadata.reply_to_message_id or msg.metadata.delivered_at:
                    raise ValueError(f"not a message to send: {msg.metadata}")
                mid = uuid.uuid4().hex
                msg.metadata.__dict__["_message_id"] = mid
                rnd = self._round(msg)
                future: Future[Any]
                if msg.metadata.dst_node_id not in self.nodes:
                    future = Future()
                    future.set_exception(LookupError(f"no node {msg.metadata.dst_node_id}"))
                else:
                    # Flower's strategies send one RecordDict to every node: its frame
                    # is made and written once, each message's metadata goes apart
                    if id(msg.content) not in contents:
                        data = encode_message(msg, with_metadata=False)
                        key = uuid.uuid4().hex
                        self.svc.blobs.put(MESSAGES + key, data)
                        contents[id(msg.content)] = (key, len(data))
                    key, size = contents[id(msg.content)]
                    rnd.down += size
                    with self._refs_lock:
                        self._refs[key] = self._refs.get(key, 0) + 1
                        self._content_of[mid] = key
                    future = self._invoke(mid, msg.metadata.dst_node_id,
                                          {"content": key, "metadata": metadata_text(msg)})
                self._pending[mid] = pending = _Pending(msg, future, rnd)
                ids.append(mid)
                if self.engine is None or msg.metadata.message_type.split(".")[0] != "train":
                    pending.settled.set()
                    continue
                if self._engine_round != rnd.number:  # the round's first train message
                    self.engine.begin(rnd.number, len(self.nodes))
                    self._engine_round = rnd.number
                # the reply goes to the engine as its function returns
                future.add_done_callback(functools.partial(self._arrived, pending, mid))
        return ids

    def _invoke(self, mid: str, node: int, where: dict[str, str]) -> Future[Any]:
        """Run the node's ClientApp on the message, after the node's earlier messages, as
        a SuperNode does: one at a time, so that each sees the state the last one left.
        A message abandoned while it waits is not run."""
        event = {"message": mid, "node": node, **where}
        before = self._last.get(node)
        if before is None or before.done():
            future = self.svc.runtime.invoke_async(FUNCTION, event)
        else:
            future = Future()

            def start(_before: Future[Any]) -> None:
                if mid in self._abandoned:
                    future.set_exception(TimeoutError("the ServerApp stopped waiting"))
                    return
                try:
                    inner = self.svc.runtime.invoke_async(FUNCTION, event)
                except Exception as exc:  # the runtime is closing
                    future.set_exception(exc)
                    return
                inner.add_done_callback(functools.partial(_settle_with, future))

            before.add_done_callback(start)
        self._last[node] = future
        return future

    def _arrived(self, pending: _Pending, mid: str, _future: Future[Any]) -> None:
        """A train reply came in: decode it once and have the engine add it now."""
        try:
            if pending.future.exception() is not None or pending.abandoned:
                return
            data = self.svc.blobs.get(REPLIES + mid)
            pending.reply = (len(data), decode_message(data))
            assert self.engine is not None
            self.engine.add(str(pending.message.metadata.dst_node_id), data, pending.reply[1])
        except Exception:  # the pull reads it again and reports what is wrong
            pending.reply = None
        finally:
            pending.settled.set()

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [reply for _mid, reply in self._pull(message_ids)]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        ids = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        with self._lock:
            rounds = {self._pending[i].round.number for i in ids}
        while ids:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            with self._lock:
                out = [self._pending[i].future for i in ids]
            if not any(f.done() for f in out):
                wait(out, timeout=left, return_when=FIRST_COMPLETED)
            for mid, reply in self._pull(ids):
                ids.discard(mid)
                replies.append(reply)
        with self._lock:
            self._abandon(ids)  # unanswered at the ServerApp's timeout, as in Flower
            for number in sorted(rounds):
                self._maybe_report(number)
        return replies

    def _abandon(self, ids: Iterable[str],
                 why: str = "no reply before the ServerApp's timeout") -> None:
        """Messages nobody waits for any more: counted as failed; their blobs go once
        their functions return, and their replies reach no engine."""
        for mid in ids:
            pending = self._pending.pop(mid, None)
            if pending is None:
                continue
            pending.abandoned = True
            self._abandoned.add(mid)
            pending.round.failed += 1
            self._tell(pending, why)
            pending.future.add_done_callback(functools.partial(self._forget, mid))

    def _forget(self, mid: str, _future: Future[Any] | None = None) -> None:
        """The message's reply, and its content once no message waits on it, deleted."""
        keys = [REPLIES + mid]
        with self._refs_lock:
            content = self._content_of.pop(mid, None)
            if content is not None:
                self._refs[content] -= 1
                if not self._refs[content]:
                    del self._refs[content]
                    keys.append(MESSAGES + content)
        for key in keys:
            with contextlib.suppress(Exception):
                self.svc.blobs.delete(key)

    def _pull(self, message_ids: Iterable[str]) -> list[tuple[str, Message]]:
        replies = []
        with self._lock:
            for mid in list(message_ids):
                pending = self._pending.get(mid)
                if pending is None or not pending.future.done():
                    continue
                pending.settled.wait()  # the engine has it before the strategy may ask
                del self._pending[mid]
                replies.append((mid, self._reply(mid, pending)))
        return replies

    # -- Strato's side ------------------------------------------------------------
    def _round(self, msg: Message) -> _Round:
        """The round a message belongs to: its ``group_id`` where the ServerApp sets a
        number there, else a batch of train messages opens the next round (Flower's
        strategies send a round's train messages, then its evaluate messages)."""
        group = msg.metadata.group_id
        if group.isdigit():
            number = int(group)
        elif msg.metadata.message_type.split(".")[0] == "train" and not self._batch_opened:
            number = (self._current.number if self._current else 0) + 1
            self._batch_opened = True
        else:
            number = self._current.number if self._current else 1
        if self._current is None or self._current.number != number:
            for earlier in [n for n in self._rounds if n < number]:
                self._maybe_report(earlier, force=True)
            self._current = self._rounds.setdefault(number, _Round(number))
        return self._current

    def _reply(self, mid: str, pending: _Pending) -> Message:
        rnd = pending.round
        try:
            event = pending.future.result()
            if pending.reply is None:
                data = self.svc.blobs.get(REPLIES + mid)
                pending.reply = (len(data), decode_message(data))
            rnd.up += pending.reply[0]
            reply: Message = pending.reply[1]
            if event.get("error"):
                rnd.failed += 1
        except Exception as exc:  # the function failed: the node answers with an Error
            rnd.failed += 1
            reply = Message(Error(ErrorCode.CLIENT_APP_CRASHED, f"{type(exc).__name__}: {exc}"),
                            reply_to=pending.message)
        self._forget(mid)  # the message and its reply: read, not needed any more
        if not reply.metadata.message_id:  # a reply has an id of its own, as in Flower
            reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        if reply.has_error():
            self._tell(pending, str(reply.error.reason))
            return reply
        kind = pending.message.metadata.message_type.split(".")[0]
        if kind == "train":
            rnd.train_ok += 1
        elif kind == "evaluate":
            self._count_metrics(rnd, reply.content)
        return reply

    def _tell(self, pending: _Pending, reason: str) -> None:
        """A node's failure, once per distinct reason: what the user needs to mend it."""
        if self.say is None or reason in self._told:
            return
        self._told.add(reason)
        node = pending.message.metadata.dst_node_id
        where = f"partition {self.nodes.index(node)}" if node in self.nodes else f"node {node}"
        self.say(f"round {pending.round.number}: {where} "
                 f"({pending.message.metadata.message_type}) failed: {reason}")

    @staticmethod
    def _count_metrics(rnd: _Round, content: RecordDict) -> None:
        """An evaluate reply's first MetricRecord, weighted by its ``num-examples`` (as
        Flower's strategies weight them)."""
        rnd.evaluated += 1
        records = list(content.metric_records.values())
        if not records:
            return
        count = records[0].get("num-examples", 1)
        weight = float(count) if isinstance(count, (int, float)) and count > 0 else 1.0
        rnd.weight += weight
        for key, value in records[0].items():
            if key != "num-examples" and isinstance(value, (int, float)):
                rnd.sums[key] = rnd.sums.get(key, 0.0) + weight * float(value)

    def _maybe_report(self, number: int, *, force: bool = False) -> None:
        """A round's line once its evaluate replies are in; a round the ServerApp does
        not evaluate on the nodes gets its line when the next round starts (``force``)."""
        rnd = self._rounds[number]
        if any(p.round is rnd for p in self._pending.values()):
            return
        if number in {r["round"] for r in self._reported}:
            return
        if not rnd.evaluated and not (force and rnd.train_ok):
            return
        stats = self.svc.runtime.stats(FUNCTION)
        billed = stats.billed_s - self._last_stats.billed_s
        cold = stats.cold_starts - self._last_stats.cold_starts
        self._last_stats = stats
        metrics = rnd.metrics()
        row = {"round": number, "accuracy": _first(metrics, _ACCURACY),
               "loss": _first(metrics, _LOSS), "metrics": metrics,
               "train_replies": rnd.train_ok, "evaluate_replies": rnd.evaluated,
               "failed": rnd.failed, "bytes_up": rnd.up, "bytes_down": rnd.down,
               "function_s": round(billed, 3), "cold_starts": cold,
               "wall_s": round(time.monotonic() - rnd.started, 3)}
        self._reported.append(row)
        if self.out is not None:
            with (self.out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
        if self.say is not None:
            self.say(_line(row, self.rounds))

    def drain(self) -> None:
        """At the ServerApp's end: messages it did not pull are abandoned, and every
        round not reported yet gets its line."""
        with self._lock:
            self._abandon(list(self._pending), "the ServerApp ended before its reply")
            for number in sorted(self._rounds):
                self._maybe_report(number, force=True)

    def summary(self, wall_s: float) -> dict[str, Any]:
        rows = sorted(self._reported, key=lambda r: r["round"])
        stats = self.svc.runtime.stats(FUNCTION)
        final = rows[-1]["accuracy"] if rows else None
        engine_rounds = self.engine.engine_rounds if self.engine else 0
        flower_rounds = self.engine.flower_rounds if self.engine else 0
        return {"rounds": len(rows), "final_accuracy": final,
                "bytes_up_total": sum(r["bytes_up"] for r in rows),
                "bytes_down_total": sum(r["bytes_down"] for r in rows),
                "failed_replies": sum(r["failed"] for r in rows),
                "function_s": round(stats.billed_s, 3), "cold_starts": stats.cold_starts,
                "invocations": stats.invocations, "wall_s": round(wall_s, 3),
                "train_batches_averaged_by_engine": engine_rounds,
                "train_batches_averaged_by_flower": flower_rounds,
                "per_round": rows}


def _settle_with(outer: Future[Any], inner: Future[Any]) -> None:
    error = inner.exception()
    if error is not None:
        outer.set_exception(error)
    else:
        outer.set_result(inner.result())


def _first(metrics: dict[str, float], names: tuple[str, ...]) -> float | None:
    for name in names:
        if name in metrics:
            return metrics[name]
    return None


def _line(row: dict[str, Any], rounds: int | None) -> str:
    of = f"/{rounds}" if rounds else ""
    acc = row["accuracy"]
    loss = row["loss"]
    parts = [f"round {row['round']:>3}{of}"]
    if acc is not None:
        parts.append(f"acc {acc:.4f}")
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    parts.append(f"replies {row['train_replies']} train/{row['evaluate_replies']} evaluate"
                 f"/{row['failed']} failed")
    parts.append(f"up {row['bytes_up'] / 1e6:.1f} MB  down {row['bytes_down'] / 1e6:.1f} MB")
    parts.append(f"fn {row['function_s']:.1f} s  cold starts {row['cold_starts']}")
    return "  ".join(parts)
