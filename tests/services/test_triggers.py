"""The embedded stream trigger: at-least-once delivery in order, and a doorbell that lets
an idle trigger sleep instead of polling."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from strato.services import Services, embedded
from strato.services._doorbell import Doorbell, Listener
from strato.services.triggers import StreamTrigger

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the doorbell is a Linux abstract socket")


class Recorder:
    """A runtime that records what it is invoked with (optionally failing once)."""

    def __init__(self, fail_first: bool = False) -> None:
        self.events: list[dict[str, Any]] = []
        self.fail_first = fail_first
        self.arrived = threading.Event()

    def invoke(self, name: str, event: Mapping[str, Any]) -> Any:
        if self.fail_first:
            self.fail_first = False
            from strato.errors import StratoError

            raise StratoError("the function failed")
        self.events.append(dict(event))
        self.arrived.set()
        return None

    def keys(self) -> list[str]:
        return [r["key"] for e in self.events for r in e["records"]]


class CountingTable:
    """The embedded table, counting the stream reads a trigger makes."""

    def __init__(self, table: Any) -> None:
        self._table, self.reads = table, 0

    def read_stream(self, *args: Any, **kwargs: Any) -> Any:
        self.reads += 1
        return self._table.read_stream(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._table, name)


@pytest.fixture
def svc(tmp_path: Path) -> Iterator[Services]:
    with embedded(tmp_path / "svc") as s:
        s.table.create_table("t")
        yield s


def _wait(cond: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_records_arrive_in_order_and_a_failed_batch_is_delivered_again(svc: Services) -> None:
    for i in range(5):
        svc.table.put("t", f"k{i}", {"i": i})
    runtime = Recorder(fail_first=True)
    trigger = StreamTrigger(svc.table, "t", runtime, "f", batch_size=2,
                            on_error=lambda exc: None)
    trigger.start()
    try:
        assert _wait(lambda: len(runtime.keys()) == 5)
    finally:
        trigger.stop()
    assert runtime.keys() == [f"k{i}" for i in range(5)]
    assert [len(e["records"]) for e in runtime.events] == [2, 2, 1]
    # the checkpoint moved only past delivered batches: a new trigger sends nothing again
    again = Recorder()
    StreamTrigger(svc.table, "t", again, "f").poll_once()
    assert again.events == []


def test_a_trigger_that_retains_n_records_trims_the_stream_behind_its_checkpoint(
    svc: Services,
) -> None:
    runtime = Recorder()
    trigger = StreamTrigger(svc.table, "t", runtime, "f", batch_size=2, retain=3)
    left = []
    for i in range(20):
        svc.table.put("t", f"k{i}", {"i": i})
        if i % 2:
            assert trigger.poll_once() == 2
            left.append(len(svc.table.read_stream("t", limit=1000)))
    assert runtime.keys() == [f"k{i}" for i in range(20)]  # every record delivered once
    # once more than 2 x 3 gathered, trimmed to the whole batches that keep 3 or more
    assert left == [2, 4, 6, *[4, 6] * 3, 4], left
    assert [c.key for c in svc.table.read_stream("t", limit=1000)] == ["k16", "k17", "k18", "k19"]
    # without retain, the whole stream stays
    StreamTrigger(svc.table, "t", Recorder(), "g").poll_once()
    assert len(svc.table.read_stream("t", limit=1000)) == left[-1]


@linux_only
def test_an_idle_trigger_does_not_poll_and_a_write_from_another_process_wakes_it(
    svc: Services, tmp_path: Path
) -> None:
    table = CountingTable(svc.table)
    runtime = Recorder()
    # idle_s is long: only a ring can bring the record in time
    trigger = StreamTrigger(table, "t", runtime, "f", poll_s=0.001, idle_s=60.0).start()
    try:
        assert _wait(lambda: table.reads >= 1)
        time.sleep(0.2)
        idle_reads = table.reads
        time.sleep(0.5)
        assert table.reads == idle_reads, "an idle trigger read the stream"
        code = (
            "from pathlib import Path\n"
            "from strato.services import embedded\n"
            f"with embedded(Path({str(tmp_path / 'svc')!r})) as s:\n"
            "    s.table.put('t', 'from-child', {'x': 1})\n"
        )
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
        assert runtime.arrived.wait(10), "the ring from the other process did not wake it"
        assert runtime.keys() == ["from-child"]
    finally:
        started = time.monotonic()
        trigger.stop()
    assert time.monotonic() - started < 5, "stop() waited for the idle timeout"


@linux_only
def test_one_listener_per_table_and_rings_without_one_are_harmless(tmp_path: Path) -> None:
    bell = Doorbell(str(tmp_path / "db"))
    bell.ring("t")  # nobody listens: refused quietly
    first = bell.listen("t")
    assert isinstance(first, Listener)
    assert bell.listen("t") is None  # taken: a second trigger would poll
    other = bell.listen("u")
    assert isinstance(other, Listener)
    for _ in range(1000):  # more than the queue holds: the excess is dropped, not raised
        bell.ring("t")
    started = time.monotonic()
    first.wait(5.0)  # rings are queued: returns at once and drains them all
    first.wait(0.05)  # drained: now it waits its timeout
    assert time.monotonic() - started < 1.0
    first.close()
    other.close()
    again = bell.listen("t")  # closed listeners free their name
    assert again is not None
    again.close()
    bell.close()
