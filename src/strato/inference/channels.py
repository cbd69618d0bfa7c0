"""The two exchange channels between inference workers, with exact operation counts.

Both move, after every layer but the last, one block per (source, target) pair,
possibly empty (an explicit "nothing for you"), so a receiver always knows when a
layer is complete without timeouts.

- ``BusChannel`` (pub/sub, the SNS + SQS design): one topic per group of workers;
  worker ``q``'s queue is subscribed to its group's topic with the filter
  ``target ∈ {q, "all", "all-but-s" for every other member s}``. A source whose blocks
  for a whole group fit in one message (under the size limit) sends them *batched* as
  one message addressed ``all-but-<source>`` (or ``all``); otherwise each target's
  block goes alone, split into parts under the limit. Receives take one message per
  call (so the number of receive calls is the number of messages: predictable).
- ``BlobChannel`` (object storage, the S3 design): one key per
  layer/target/source, written only when the block is non-empty. After its PUTs a
  source publishes one small *notice* per worker group ("source s finished layer
  l", on the same group topics and filtered queues as the bus channel: the role S3
  event notifications to SQS play on AWS). A receiver long-polls its queue until
  every other source's notice is in, then LISTs its prefix once, GETs what it
  lists (a missing key is an empty block) and deletes it (free on S3).
  FSD-Inference polled with LIST instead; that made the number of LISTs (the
  dearest S3 request after PUT) depend on timing: 3–5× the minimum measured here,
  unpredictable. Now every count is fixed by the partition.

Counts follow AWS billing units: publish calls and 64 KB publish chunks, bytes,
queue deliveries, receive calls (+ 64 KB chunks received), empty receives, deletes;
PUT, LIST, GET, bytes put; notices published, received (empty receives apart) and
deleted.
"""

from __future__ import annotations

import struct
import time
from collections import Counter
from collections.abc import Iterable

from strato.errors import CodecError, StratoError
from strato.services import BlobStore, Bus

__all__ = [
    "CHUNK",
    "BlobChannel",
    "BusChannel",
    "bus_filter",
    "bus_groups",
    "chunks",
    "notice_groups",
    "plan_bus_messages",
]

CHUNK = 64 * 1024  # SNS/SQS bill each 64 KB of a payload as one request
MESSAGE_LIMIT = 256 * 1024 - 1024  # SNS's 256 KB, less room for attributes
_FRAME = struct.Struct("<4sIIH")  # magic, layer, source, sections
_SECTION = struct.Struct("<IIII")  # target, part, parts, bytes
_MAGIC = b"SDX1"
_NOTICE = struct.Struct("<4sII")  # magic, layer, source
_NOTICE_MAGIC = b"SDN1"
NOTICE_BYTES = _NOTICE.size


def chunks(nbytes: int) -> int:
    return max(1, -(-nbytes // CHUNK))


def bus_groups(workers: int, group_size: int) -> list[list[int]]:
    return [list(range(s, min(s + group_size, workers))) for s in range(0, workers, group_size)]


def bus_filter(worker: int, group: list[int]) -> dict[str, list[str]]:
    return {"target": [str(worker), "all", *(f"all-but-{s}" for s in group if s != worker)]}


def notice_groups(source: int, groups: list[list[int]]) -> list[tuple[int, str]]:
    """(group, target attribute) of the notices a source publishes after each layer:
    one per group holding another worker."""
    out = []
    for gi, group in enumerate(groups):
        if any(q != source for q in group):
            out.append((gi, f"all-but-{source}" if source in group else "all"))
    return out


Section = tuple[int, int, int, int]  # target, part, parts, bytes


def plan_bus_messages(
    source: int, sizes: dict[int, int], groups: list[list[int]], limit: int = MESSAGE_LIMIT
) -> list[tuple[int, str, list[Section], int]]:
    """The messages a source publishes for blocks of ``sizes`` (target → bytes):
    (group, target attribute, sections, body bytes). Shared by the channel and the
    cost model, so that predictions count exactly the messages the channel sends."""
    out: list[tuple[int, str, list[Section], int]] = []
    for gi, group in enumerate(groups):
        targets = [q for q in group if q != source and q in sizes]
        if not targets:
            continue
        batched = _FRAME.size + sum(_SECTION.size + sizes[q] for q in targets)
        if batched <= limit:
            attr = f"all-but-{source}" if source in group else "all"
            out.append((gi, attr, [(q, 0, 1, sizes[q]) for q in targets], batched))
            continue
        room = limit - _FRAME.size - _SECTION.size
        for q in targets:
            parts = max(1, -(-sizes[q] // room))
            for k in range(parts):
                n = min(room, sizes[q] - k * room)
                out.append((gi, str(q), [(q, k, parts, n)], _FRAME.size + _SECTION.size + n))
    return out


class BusChannel:
    def __init__(
        self,
        bus: Bus,
        run: str,
        worker: int,
        workers: int,
        group_size: int,
        limit: int = MESSAGE_LIMIT,
    ) -> None:
        self.bus, self.run, self.worker, self.limit = bus, run, worker, limit
        self.groups = bus_groups(workers, group_size)
        self.queue = queue_name(run, worker)
        self.counts: Counter[str] = Counter()
        self._parts: dict[tuple[int, int], dict[int, bytes]] = {}
        self._expect: dict[tuple[int, int], int] = {}

    def send(self, layer: int, blocks: dict[int, bytes]) -> None:
        sizes = {q: len(b) for q, b in blocks.items()}
        room = self.limit - _FRAME.size - _SECTION.size
        for gi, attr, sections, nbytes in plan_bus_messages(
            self.worker, sizes, self.groups, self.limit
        ):
            pieces = [_FRAME.pack(_MAGIC, layer, self.worker, len(sections))]
            for q, part, parts, n in sections:
                pieces.append(_SECTION.pack(q, part, parts, n))
                pieces.append(blocks[q][part * room : part * room + n])
            body = b"".join(pieces)
            if len(body) != nbytes:
                raise AssertionError("message size differs from its plan")
            self.bus.publish(topic_name(self.run, gi), body, {"target": attr})
            self.counts["publish_calls"] += 1
            self.counts["publish_chunks"] += chunks(len(body))
            self.counts["bytes_published"] += len(body)

    def receive(self, layer: int, sources: Iterable[int], timeout_s: float) -> dict[int, bytes]:
        wanted = [s for s in sources if s != self.worker]
        deadline = time.monotonic() + timeout_s
        while not all(self._complete(layer, s) for s in wanted):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StratoError(
                    f"worker {self.worker}: layer {layer + 1} exchange timed out on the bus"
                )
            got = self.bus.receive(self.queue, max_messages=1, wait_s=min(20.0, remaining))
            self.counts["receive_calls"] += 1
            if not got:
                self.counts["empty_receives"] += 1
            for m in got:
                self.counts["messages_received"] += 1
                self.counts["receive_chunks"] += chunks(len(m.body))
                self.counts["bytes_received"] += len(m.body)
                self._take(m.body)
                self.bus.ack(self.queue, m.receipt)
                self.counts["deletes"] += 1
        out = {}
        for s in wanted:
            parts = self._parts.pop((layer, s))
            self._expect.pop((layer, s))
            out[s] = b"".join(parts[k] for k in range(len(parts)))
        return out

    def _complete(self, layer: int, source: int) -> bool:
        key = (layer, source)
        return key in self._expect and len(self._parts[key]) == self._expect[key]

    def _take(self, body: bytes) -> None:
        magic, layer, source, nsec = _FRAME.unpack_from(body, 0)
        if magic != _MAGIC:
            raise CodecError("a message on the inference bus is not an activation frame")
        off = _FRAME.size
        for _ in range(nsec):
            target, part, parts, n = _SECTION.unpack_from(body, off)
            off += _SECTION.size
            if target == self.worker:  # batched messages carry other targets' blocks too
                key = (layer, source)
                self._expect[key] = parts
                self._parts.setdefault(key, {})[part] = body[off : off + n]  # dedupes
            off += n


def topic_name(run: str, group: int) -> str:
    return f"inf-{run}-g{group}"


def queue_name(run: str, worker: int) -> str:
    return f"inf-{run}-w{worker}"


class BlobChannel:
    def __init__(
        self, blobs: BlobStore, bus: Bus, run: str, worker: int, workers: int, group_size: int
    ) -> None:
        self.blobs, self.bus, self.run, self.worker = blobs, bus, run, worker
        self.groups = bus_groups(workers, group_size)
        self.queue = queue_name(run, worker)
        self.counts: Counter[str] = Counter()
        self._done: dict[int, set[int]] = {}  # layer → sources whose notice arrived

    def key(self, layer: int, target: int, source: int) -> str:
        return f"inf/{self.run}/x/{layer}/{target}/{source}"

    def send(self, layer: int, blocks: dict[int, bytes]) -> None:
        for q, block in blocks.items():
            if not block:
                continue  # the notice says "finished": no key means nothing for q
            self.blobs.put(self.key(layer, q, self.worker), block)
            self.counts["puts"] += 1
            self.counts["bytes_put"] += len(block)
        body = _NOTICE.pack(_NOTICE_MAGIC, layer, self.worker)
        for gi, attr in notice_groups(self.worker, self.groups):
            self.bus.publish(topic_name(self.run, gi), body, {"target": attr})
            self.counts["notice_publishes"] += 1
            self.counts["notice_bytes"] += len(body)

    def receive(self, layer: int, sources: Iterable[int], timeout_s: float) -> dict[int, bytes]:
        wanted = {s for s in sources if s != self.worker}
        if not wanted:
            return {}
        deadline = time.monotonic() + timeout_s
        while not wanted <= self._done.get(layer, set()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StratoError(
                    f"worker {self.worker}: layer {layer + 1} exchange timed out in blobs"
                )
            got = self.bus.receive(self.queue, max_messages=1, wait_s=min(20.0, remaining))
            if not got:
                self.counts["notice_empty_receives"] += 1
            for m in got:
                self.counts["notice_receives"] += 1
                magic, done_layer, source = _NOTICE.unpack_from(m.body, 0)
                if magic != _NOTICE_MAGIC or len(m.body) != _NOTICE.size:
                    raise CodecError("a message on the inference bus is not a layer notice")
                self._done.setdefault(done_layer, set()).add(source)  # a redelivery dedupes
                self.bus.ack(self.queue, m.receipt)
                self.counts["notice_deletes"] += 1
        self._done.pop(layer)
        listed = self.blobs.list(f"inf/{self.run}/x/{layer}/{self.worker}/")
        self.counts["lists"] += 1
        out = {s: b"" for s in wanted}
        for key in listed:
            s = int(key.rsplit("/", 1)[1])
            if s in wanted:
                data = self.blobs.get(key)
                out[s] = bytes(data)
                self.counts["gets"] += 1
                self.counts["bytes_got"] += len(data)
                self.blobs.delete(key)  # read once; S3 DELETE is free, storage is not
                self.counts["object_deletes"] += 1
        return out
