"""Table conformance: every backend must pass these unchanged (only the Protocol is used)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from other_process import PRELUDE

from strato.errors import ConditionFailed, NotFound, StratoError
from strato.services import Change, Services, connect


@pytest.fixture
def services(part_services: Services) -> Services:
    """Every backend, and Ray's parts through the state host (conftest)."""
    return part_services


# Compare-and-set increments each of the two racing processes makes.
RACE_INCREMENTS = 150


def _child(services: Services, script: str, *args: str) -> subprocess.Popen[str]:
    """Run ``script`` in a fresh interpreter with ``svc`` bound to the same backend."""
    return subprocess.Popen(
        [sys.executable, "-c", PRELUDE + script, json.dumps(services.config), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 60.0) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return out


def _read_all(services: Services, table: str, after: str | None = None) -> list[Change]:
    changes: list[Change] = []
    while page := services.table.read_stream(table, after=after, limit=7):
        changes.extend(page)
        after = page[-1].cursor
    return changes


def test_put_get_and_versions(services: Services) -> None:
    t = services.table
    t.create_table("runs")
    t.create_table("runs")  # idempotent
    assert t.get("runs", "r1") is None
    assert t.put("runs", "r1", {"state": "new", "nested": {"a": [1, 2.5, None, "é"]}}) == 1
    item = t.get("runs", "r1")
    assert item is not None
    assert (item.key, item.version) == ("r1", 1)
    assert item.value == {"state": "new", "nested": {"a": [1, 2.5, None, "é"]}}
    assert t.put("runs", "r1", {"state": "running"}) == 2
    again = t.get("runs", "r1", consistent=True)
    assert again is not None
    assert again.value == {"state": "running"}  # a put replaces the whole item
    assert again.version == 2


def test_tables_are_separate(services: Services) -> None:
    t = services.table
    t.create_table("a")
    t.create_table("b")
    t.put("a", "k", {"in": "a"})
    assert t.get("b", "k") is None
    assert t.query("b") == []
    assert t.read_stream("b") == []


def test_if_absent_is_compare_and_set(services: Services) -> None:
    t = services.table
    t.create_table("locks")
    assert t.put("locks", "leader", {"owner": "p1"}, if_absent=True) == 1
    with pytest.raises(ConditionFailed, match="leader"):
        t.put("locks", "leader", {"owner": "p2"}, if_absent=True)
    item = t.get("locks", "leader")
    assert item is not None
    assert item.value == {"owner": "p1"}
    assert item.version == 1


def test_if_version_is_compare_and_set(services: Services) -> None:
    t = services.table
    t.create_table("c")
    with pytest.raises(ConditionFailed, match="k"):
        t.put("c", "k", {"n": 0}, if_version=1)  # absent item has no version
    v1 = t.put("c", "k", {"n": 1})
    v2 = t.put("c", "k", {"n": 2}, if_version=v1)
    assert v2 == v1 + 1
    with pytest.raises(ConditionFailed, match="version"):
        t.put("c", "k", {"n": 99}, if_version=v1)  # stale
    item = t.get("c", "k")
    assert item is not None
    assert item.value == {"n": 2}
    assert item.version == v2
    # Refused writes leave no trace in the stream.
    assert [c.kind for c in t.read_stream("c")] == ["INSERT", "MODIFY"]


def test_delete(services: Services) -> None:
    t = services.table
    t.create_table("d")
    t.delete("d", "never-there")  # a no-op
    v = t.put("d", "k", {"x": 1})
    with pytest.raises(ConditionFailed):
        t.delete("d", "k", if_version=v + 1)
    assert t.get("d", "k") is not None
    t.delete("d", "k", if_version=v)
    assert t.get("d", "k") is None
    with pytest.raises(ConditionFailed):
        t.delete("d", "k", if_version=v)
    t.put("d", "k2", {"x": 2})
    t.delete("d", "k2")
    assert t.query("d") == []
    # A re-created item starts again at version 1.
    assert t.put("d", "k", {"x": 3}, if_absent=True) == 1
    assert [c.kind for c in t.read_stream("d")] == [
        "INSERT",
        "REMOVE",
        "INSERT",
        "REMOVE",
        "INSERT",
    ]


def test_query_by_prefix_in_key_order(services: Services) -> None:
    t = services.table
    t.create_table("q")
    keys = ["r2/c1", "r1/c2", "r1/c10", "r1/c1", "r1", "r10/c1", "r1%x", "r1_y", "s", "r0"]
    for k in keys:
        t.put("q", k, {"k": k})
    assert [i.key for i in t.query("q", "r1/")] == ["r1/c1", "r1/c10", "r1/c2"]
    # '%' and '_' are ordinary characters, not wildcards.
    assert [i.key for i in t.query("q", "r1%")] == ["r1%x"]
    assert [i.key for i in t.query("q", "r1_")] == ["r1_y"]
    assert [i.key for i in t.query("q", "r1")] == sorted(k for k in keys if k.startswith("r1"))
    assert [i.key for i in t.query("q")] == sorted(keys)
    assert t.query("q", "zzz") == []
    assert all(i.value == {"k": i.key} and i.version == 1 for i in t.query("q"))


def test_unknown_table_is_not_found(services: Services) -> None:
    t = services.table
    with pytest.raises(NotFound, match="ghost"):
        t.get("ghost", "k")
    with pytest.raises(NotFound, match="ghost"):
        t.put("ghost", "k", {})
    with pytest.raises(NotFound, match="ghost"):
        t.query("ghost")
    with pytest.raises(NotFound, match="ghost"):
        t.delete("ghost", "k")
    with pytest.raises(NotFound, match="ghost"):
        t.read_stream("ghost")


def test_stream_records_every_write_in_order_with_images(services: Services) -> None:
    t = services.table
    t.create_table("s")
    t.put("s", "a", {"v": 1})
    t.put("s", "b", {"v": 10})
    t.put("s", "a", {"v": 2})
    t.delete("s", "b")
    changes = t.read_stream("s")
    assert [(c.kind, c.key, c.old, c.new) for c in changes] == [
        ("INSERT", "a", None, {"v": 1}),
        ("INSERT", "b", None, {"v": 10}),
        ("MODIFY", "a", {"v": 1}, {"v": 2}),
        ("REMOVE", "b", {"v": 10}, None),
    ]
    assert all(c.table == "s" for c in changes)
    assert len({c.cursor for c in changes}) == 4
    assert t.read_stream("s", after=changes[-1].cursor) == []


def test_a_table_made_without_a_stream_keeps_items_and_leaves_no_records(
    services: Services,
) -> None:
    t = services.table
    t.create_table("quiet", stream=False)
    t.create_table("loud")
    t.create_table("quiet")  # idempotent: still without a stream
    t.put("quiet", "a", {"v": 1})
    t.put("loud", "a", {"v": 2})
    t.put("quiet", "a", {"v": 3})
    t.delete("quiet", "a")
    t.put("quiet", "b", {"v": 4})
    assert [i.key for i in t.query("quiet")] == ["b"]
    assert [(c.table, c.key, c.new) for c in t.read_stream("loud")] == [("loud", "a", {"v": 2})]
    with pytest.raises(StratoError):
        t.read_stream("quiet")


def test_stream_resumes_from_a_checkpoint(services: Services) -> None:
    t = services.table
    t.create_table("s")
    for n in range(5):
        t.put("s", f"k{n}", {"n": n})
    first = t.read_stream("s", limit=3)
    assert [c.key for c in first] == ["k0", "k1", "k2"]
    checkpoint = first[-1].cursor
    for n in range(5, 8):
        t.put("s", f"k{n}", {"n": n})
    rest = _read_all(services, "s", after=checkpoint)
    assert [c.key for c in rest] == [f"k{n}" for n in range(3, 8)]
    # Reading from the same checkpoint again gives the same changes (it is a log).
    assert [c.cursor for c in _read_all(services, "s", after=checkpoint)] == [
        c.cursor for c in rest
    ]
    assert [c.key for c in _read_all(services, "s")] == [f"k{n}" for n in range(8)]


def test_a_trimmed_stream_starts_after_the_trim_and_reads_on_from_its_cursors(
    services: Services, request: pytest.FixtureRequest
) -> None:
    t = services.table
    t.create_table("s")
    for n in range(5):
        t.put("s", f"k{n}", {"n": n})
    changes = t.read_stream("s")
    t.trim_stream("s", changes[2].cursor)
    assert [c.key for c in t.read_stream("s", after=changes[2].cursor)] == ["k3", "k4"]
    left = [c.key for c in _read_all(services, "s")]
    if request.node.callspec.params["part_services"] == "aws":
        assert left == [f"k{n}" for n in range(5)]  # DynamoDB Streams expire by themselves
    else:
        assert left == ["k3", "k4"]
    t.put("s", "k5", {"n": 5})
    assert [c.key for c in t.read_stream("s", after=changes[4].cursor)] == ["k5"]


def test_items_and_stream_survive_a_restart(services: Services) -> None:
    t = services.table
    t.create_table("keep")
    t.put("keep", "a", {"v": 1})
    t.put("keep", "a", {"v": 2})
    [first, _] = t.read_stream("keep")
    services.close()
    with connect(services.config) as again:
        item = again.table.get("keep", "a")
        assert item is not None
        assert (item.value, item.version) == ({"v": 2}, 2)
        [rest] = again.table.read_stream("keep", after=first.cursor)
        assert (rest.kind, rest.old, rest.new) == ("MODIFY", {"v": 1}, {"v": 2})
        assert again.table.put("keep", "a", {"v": 3}, if_version=2) == 3


def test_stream_is_visible_across_processes(services: Services) -> None:
    t = services.table
    t.create_table("x")
    t.put("x", "local", {"by": "parent"})
    [mine] = t.read_stream("x")
    script = (
        "t = svc.table\n"
        "t.put('x', 'remote', {'by': 'child'})\n"
        "t.delete('x', 'local')\n"
        "print(json.dumps([c.kind for c in t.read_stream('x')]))\n"
        "svc.close()\n"
    )
    out = _finish(_child(services, script))
    assert json.loads(out) == ["INSERT", "INSERT", "REMOVE"]  # the child saw our write
    rest = t.read_stream("x", after=mine.cursor)
    assert [(c.kind, c.key) for c in rest] == [("INSERT", "remote"), ("REMOVE", "local")]
    assert rest[1].old == {"by": "parent"}


def test_conditional_put_race_between_two_processes(services: Services) -> None:
    t = services.table
    t.create_table("counters")
    t.put("counters", "c", {"n": 0})
    script = (
        "from strato.errors import ConditionFailed\n"
        "t = svc.table\n"
        "t.get('counters', 'c')\n"  # connection open before the start signal
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"
        "conflicts = 0\n"
        "for _ in range(int(sys.argv[2])):\n"
        "    while True:\n"
        "        item = t.get('counters', 'c')\n"
        "        try:\n"
        "            t.put('counters', 'c', {'n': item.value['n'] + 1}, if_version=item.version)\n"
        "            break\n"
        "        except ConditionFailed:\n"
        "            conflicts += 1\n"
        "print(conflicts)\n"
        "svc.close()\n"
    )
    procs = [_child(services, script, str(RACE_INCREMENTS)) for _ in range(2)]
    try:
        for p in procs:
            assert p.stdout is not None
            assert p.stdout.readline().strip() == "ready"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        outs = [_finish(p) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    item = t.get("counters", "c")
    assert item is not None
    conflicts = [int(out) for out in outs]  # how hard the two fought, for the message
    assert item.value == {"n": 2 * RACE_INCREMENTS}, f"conflicts per process: {conflicts}"
    assert item.version == 2 * RACE_INCREMENTS + 1
    # Every successful CAS is one MODIFY that added exactly one: no lost update.
    changes = _read_all(services, "counters")
    assert len(changes) == 2 * RACE_INCREMENTS + 1
    for change in changes[1:]:
        assert change.kind == "MODIFY"
        assert change.old is not None and change.new is not None
        assert change.new["n"] == change.old["n"] + 1


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="the doorbell is a Linux abstract socket")
def test_a_stream_listener_on_this_machine_is_woken_by_each_commit(
        local_services: Services) -> None:
    """A stream trigger here sleeps until a commit rings: one made here, and on Ray one
    the state host makes for a process of another node."""
    table = local_services.table
    table.create_table("rung")
    listener = table.listen_stream("rung")  # type: ignore[attr-defined]
    assert listener is not None
    writers: list[Callable[..., Any]] = [table.put, table.put]
    client = None
    if local_services.config.get("backend") == "ray":
        from strato.backends.ray._cluster import state_client

        client = state_client(local_services.config)
        writers[1] = lambda *args: client.call("table", "put", *args)
    try:
        for n, write in enumerate(writers):
            timer = threading.Timer(0.2, write, ("rung", f"k{n}", {"n": n}))
            started = time.monotonic()
            timer.start()
            listener.wait(60.0)  # returns at once on a ring, else after a minute
            woke = time.monotonic() - started
            timer.join()
            assert woke < 10.0, f"commit {n} did not ring (woke after {woke:.1f} s)"
        listener.wait(0.0)  # (drains any ring left)
        started = time.monotonic()
        listener.wait(0.3)  # no commit: it sleeps the whole timeout
        assert time.monotonic() - started >= 0.25
    finally:
        listener.close()
        if client is not None:
            client.release()
