"""Bus conformance: every backend must pass these unchanged (only the Protocol is used)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
from other_process import PRELUDE

from strato.errors import NotFound, PayloadTooLarge, SchemaError
from strato.services import Services, TopicSchema, connect


@pytest.fixture
def services(part_services: Services) -> Services:
    """Every backend, and Ray's parts through the state host (conftest)."""
    return part_services


# A long-poll that "returns early" must return well before this; generous on purpose
# because the test machine is shared.
LONG_WAIT_S = 20.0


def _child(services: Services, script: str, *args: str) -> subprocess.Popen[str]:
    """Run ``script`` in a fresh interpreter with ``svc`` bound to the same backend."""
    return subprocess.Popen(
        [sys.executable, "-c", PRELUDE + script, json.dumps(services.config), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 60.0) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return out


def _drain(services: Services, queue: str) -> list[str]:
    """Receive and ack everything visible in ``queue``; the bodies, sorted."""
    bodies = []
    while batch := services.bus.receive(queue, max_messages=10, visibility_timeout_s=30):
        for msg in batch:
            bodies.append(msg.body.decode())
            services.bus.ack(queue, msg.receipt)
    return sorted(bodies)


def test_publish_receive_ack_roundtrip(services: Services) -> None:
    bus = services.bus
    bus.create_topic("jobs")
    bus.subscribe("jobs", "worker")
    mid = bus.publish("jobs", '{"n": 1}', {"kind": "train"})
    [msg] = bus.receive("worker", wait_s=1)
    assert msg.id == mid
    assert msg.body == b'{"n": 1}'  # a str body travels as UTF-8
    assert msg.json() == {"n": 1}
    assert msg.attributes == {"kind": "train"}
    assert msg.receive_count == 1
    bus.ack("worker", msg.receipt)
    bus.ack("worker", msg.receipt)  # idempotent
    assert bus.receive("worker") == []
    bus.publish("jobs", b"\x00\xffraw")
    [raw] = bus.receive("worker")
    assert raw.body == b"\x00\xffraw"
    assert raw.attributes == {}


def test_fan_out_honours_filters(services: Services) -> None:
    bus = services.bus
    bus.create_topic("rounds")
    bus.subscribe("rounds", "everything")
    bus.subscribe("rounds", "even", {"parity": ["even"]})
    bus.subscribe("rounds", "even-models", {"parity": ["even", "never"], "kind": ["model"]})
    for n in range(6):
        parity = "even" if n % 2 == 0 else "odd"
        bus.publish("rounds", f"m{n}", {"parity": parity, "kind": "model" if n < 3 else "x"})
    bus.publish("rounds", "no-attrs")
    assert _drain(services, "everything") == ["m0", "m1", "m2", "m3", "m4", "m5", "no-attrs"]
    assert _drain(services, "even") == ["m0", "m2", "m4"]
    assert _drain(services, "even-models") == ["m0", "m2"]


def test_fan_out_gives_each_queue_its_own_copy(services: Services) -> None:
    bus = services.bus
    bus.create_topic("t")
    bus.subscribe("t", "a")
    bus.subscribe("t", "b")
    mid = bus.publish("t", "once")
    [in_a] = bus.receive("a")
    bus.ack("a", in_a.receipt)
    [in_b] = bus.receive("b")  # acking in one queue leaves the other's copy alone
    assert in_a.id == in_b.id == mid


def test_filter_value_given_as_a_bare_string_means_that_value(services: Services) -> None:
    bus = services.bus
    bus.create_topic("t")
    bus.subscribe("t", "q", {"parity": "even"})  # a str is a Sequence[str]: easy to get wrong
    bus.publish("t", "yes", {"parity": "even"})
    bus.publish("t", "no", {"parity": "e"})  # would match set("even") character-wise
    assert _drain(services, "q") == ["yes"]


def test_unsubscribe_stops_delivery_but_keeps_queued_messages(services: Services) -> None:
    bus = services.bus
    bus.create_topic("t")
    bus.subscribe("t", "q")
    bus.publish("t", "before")
    bus.unsubscribe("t", "q")
    bus.publish("t", "after")
    assert _drain(services, "q") == ["before"]


def test_receive_batches_without_duplicates(services: Services) -> None:
    bus = services.bus
    bus.create_topic("t")
    bus.subscribe("t", "q")
    for n in range(5):
        bus.publish("t", str(n))
    first = bus.receive("q", max_messages=3)
    second = bus.receive("q", max_messages=3)
    assert len(first) == 3
    assert len(second) == 2
    assert sorted(m.body.decode() for m in first + second) == ["0", "1", "2", "3", "4"]
    assert len({m.receipt for m in first + second}) == 5


def test_competing_consumers_each_get_a_message_once(services: Services) -> None:
    bus = services.bus
    bus.create_topic("t")
    bus.subscribe("t", "q")
    for n in range(40):
        bus.publish("t", str(n))
    got: list[str] = []
    lock = threading.Lock()

    def consume() -> None:
        while batch := bus.receive("q", max_messages=3, visibility_timeout_s=60):
            with lock:
                got.extend(m.body.decode() for m in batch)

    threads = [threading.Thread(target=consume) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(got, key=int) == [str(n) for n in range(40)]


def test_unacked_message_reappears_after_visibility_timeout(services: Services) -> None:
    bus = services.bus
    bus.create_topic("t")
    bus.subscribe("t", "q")
    mid = bus.publish("t", "again")
    [first] = bus.receive("q", visibility_timeout_s=0.5)
    assert bus.receive("q") == []  # invisible while in flight
    [second] = bus.receive("q", wait_s=LONG_WAIT_S, visibility_timeout_s=0.3)
    assert second.id == mid
    assert second.receive_count == 2
    assert second.receipt != first.receipt
    bus.ack("q", first.receipt)  # stale: must not delete the redelivered message
    [third] = bus.receive("q", wait_s=LONG_WAIT_S, visibility_timeout_s=30)
    assert third.id == mid
    assert third.receive_count == 3
    bus.ack("q", third.receipt)
    assert bus.receive("q", wait_s=0.2) == []


def test_ack_deletes_for_good(services: Services) -> None:
    bus = services.bus
    bus.create_topic("t")
    bus.subscribe("t", "q")
    bus.publish("t", "x")
    [msg] = bus.receive("q", visibility_timeout_s=0.2)
    bus.ack("q", msg.receipt)
    assert bus.receive("q", wait_s=0.6) == []  # past the visibility timeout: still gone


def test_long_poll_returns_early_on_publish_from_another_thread(services: Services) -> None:
    bus = services.bus
    bus.create_topic("t")
    bus.subscribe("t", "q")
    timer = threading.Timer(0.3, bus.publish, args=("t", "wake"))
    start = time.monotonic()
    timer.start()
    try:
        got = bus.receive("q", wait_s=LONG_WAIT_S)
    finally:
        timer.join()
    assert [m.body for m in got] == [b"wake"]
    assert time.monotonic() - start < LONG_WAIT_S / 2


def test_long_poll_waits_when_nothing_arrives(services: Services) -> None:
    services.bus.create_topic("t")
    services.bus.subscribe("t", "q")
    start = time.monotonic()
    assert services.bus.receive("q", wait_s=0.4) == []
    assert time.monotonic() - start >= 0.35


def test_long_poll_sees_publish_from_another_process(services: Services) -> None:
    bus = services.bus
    bus.create_topic("t")
    bus.subscribe("t", "q")
    proc = _child(services, "import time; time.sleep(0.3); svc.bus.publish('t', 'remote')")
    try:
        got = bus.receive("q", wait_s=LONG_WAIT_S)
    finally:
        _finish(proc)
    assert [m.body for m in got] == [b"remote"]


def test_queued_and_in_flight_messages_survive_a_restart(services: Services) -> None:
    bus = services.bus
    bus.create_topic("t", TopicSchema(required_attributes=("round",)))
    bus.subscribe("t", "q", {"round": ["1"]})
    bus.publish("t", "queued", {"round": "1"})
    bus.publish("t", "in-flight", {"round": "1"})
    [taken] = bus.receive("q", visibility_timeout_s=1.0)
    services.close()

    with connect(services.config) as again:
        # The message taken before the restart comes back once its timeout runs out.
        got = sorted(m.body.decode() for m in again.bus.receive("q", max_messages=10))
        assert got == sorted({"queued", "in-flight"} - {taken.body.decode()})
        [back] = again.bus.receive("q", wait_s=LONG_WAIT_S)
        assert back.id == taken.id
        assert back.receive_count == 2
        # Topic, schema and filter survived as well.
        with pytest.raises(SchemaError):
            again.bus.publish("t", "no round")
        again.bus.publish("t", "filtered out", {"round": "2"})
        assert again.bus.receive("q", max_messages=10) == []


def test_schema_rejects_bad_messages(services: Services) -> None:
    bus = services.bus
    schema = TopicSchema(required_attributes=("round",), json_body_keys=("key",), max_bytes=200)
    bus.create_topic("updates", schema)
    bus.subscribe("updates", "q")
    with pytest.raises(SchemaError, match="round"):
        bus.publish("updates", '{"key": "k"}')
    with pytest.raises(SchemaError, match="JSON"):
        bus.publish("updates", "not json", {"round": "1"})
    with pytest.raises(SchemaError, match="JSON"):
        bus.publish("updates", "[1, 2]", {"round": "1"})
    with pytest.raises(SchemaError, match="key"):
        bus.publish("updates", '{"other": 1}', {"round": "1"})
    with pytest.raises(PayloadTooLarge, match="200"):
        bus.publish("updates", json.dumps({"key": "x" * 300}), {"round": "1"})
    with pytest.raises(SchemaError):
        bus.publish("updates", '{"key": "k"}', {"round": 1})  # type: ignore[dict-item]  # on purpose
    assert bus.receive("q") == []  # nothing refused was delivered
    bus.publish("updates", '{"key": "k"}', {"round": "1"})
    [ok] = bus.receive("q")
    assert ok.json() == {"key": "k"}


def test_topic_without_schema_keeps_the_default_size_limit(services: Services) -> None:
    services.bus.create_topic("t")
    with pytest.raises(PayloadTooLarge):
        services.bus.publish("t", b"x" * (TopicSchema().max_bytes + 1))


def test_create_topic_is_idempotent_and_a_new_schema_replaces_the_old(services: Services) -> None:
    bus = services.bus
    bus.create_topic("t", TopicSchema(required_attributes=("a",)))
    bus.create_topic("t")  # no schema given: the existing one stays
    bus.subscribe("t", "q")
    with pytest.raises(SchemaError):
        bus.publish("t", "x")
    bus.create_topic("t", TopicSchema(required_attributes=("b",)))
    bus.publish("t", "x", {"b": "1"})
    with pytest.raises(SchemaError):
        bus.publish("t", "x", {"a": "1"})


def test_unknown_topic_and_queue_are_not_found(services: Services) -> None:
    bus = services.bus
    with pytest.raises(NotFound, match="nope"):
        bus.publish("nope", "x")
    with pytest.raises(NotFound, match="nope"):
        bus.subscribe("nope", "q")
    with pytest.raises(NotFound, match="missing"):
        bus.receive("missing")
    with pytest.raises(NotFound, match="missing"):
        bus.receive("missing", wait_s=0.1)


def test_delete_queue_removes_messages_and_subscription(services: Services) -> None:
    bus = services.bus
    bus.create_topic("t")
    bus.subscribe("t", "q")
    bus.subscribe("t", "other")
    bus.publish("t", "x")
    bus.delete_queue("q")
    with pytest.raises(NotFound):
        bus.receive("q")
    bus.publish("t", "y")  # must not fail nor resurrect the deleted queue
    with pytest.raises(NotFound):
        bus.receive("q")
    bus.subscribe("t", "q")  # a new queue of the same name starts empty
    assert bus.receive("q") == []
    assert _drain(services, "other") == ["x", "y"]
