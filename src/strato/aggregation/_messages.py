"""What the data plane passes around: descriptors, inputs, and per-aggregator stats."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from strato.services.shm import ShmRef

__all__ = ["AggregatorStats", "Arrived", "Input"]


@dataclass(frozen=True)
class Arrived:
    """The descriptor of an update that landed in this node's shared memory. It is all
    the dispatcher routes on (~100 bytes as JSON); the update itself never moves."""

    round: int
    client: str
    ref: ShmRef
    weight: float
    at: float  # when it began to arrive (time.monotonic()): the client started sending
    landed: float  # when it was wholly in shared memory

    def to_json(self) -> bytes:
        return json.dumps(
            {"round": self.round, "client": self.client, **self.ref.to_dict(),
             "weight": self.weight, "at": self.at, "landed": self.landed},
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Arrived:
        d = json.loads(raw)
        return cls(int(d["round"]), str(d["client"]), ShmRef.from_dict(d), float(d["weight"]),
                   float(d["at"]), float(d["landed"]))


@dataclass
class Input:
    """Something to add: where it lies in this node's memory, and its coefficient."""

    ref: dict[str, Any]  # ShmRef (or file ref) fields plus "dtype"
    coef: float
    weight: float
    updates: int
    release: Callable[[], None] | None = None
    client: str = ""  # an update's client ("" for a partial)


@dataclass
class AggregatorStats:
    name: str
    node: str
    level: int
    invocations: int = 0
    inputs: int = 0
    updates: int = 0
    busy_s: float = 0.0  # time in the kernel
    wall_s: float = 0.0  # submit to reply, as seen by the dispatcher
    peak_rss_kb: int = 0
    pid: int = 0
    batches: list[int] = field(default_factory=list)
    overheads: list[float] = field(default_factory=list)  # wall - busy, per invocation
