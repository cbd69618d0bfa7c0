"""The HTTP gateway: `strato serve` with remote `strato client`s, and every refused request.

The request-level tests run the gateway in this process over a hand-made job (no
workers, no torch) and talk to it over loopback HTTP, with raw sockets where a
well-behaved HTTP client cannot misbehave on purpose (no Content-Length, a body cut
short). The end-to-end test runs the real CLI: one server and four client processes.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from fltools import cli_env, make_tiny_app, shm_segments, strato, strato_workers
from strato.codec import decode, encode
from strato.fl import coordinator, state
from strato.fl.config import JobConfig
from strato.fl.gateway import Gateway, GatewaySettings
from strato.fl.serve import GatewayServer, listen, load_tokens
from strato.params import Params
from strato.services import Services, embedded

TOKENS = ("token-alpha", "token-beta")
STRATO = (sys.executable, "-m", "strato.cli")
SIM_RECORD_KEYS = {
    "round",
    "client",
    "blob",
    "num_examples",
    "bytes_up",
    "bytes_down",
    "train_s",
    "uploaded_at",
    "metrics",
}


def _model(seed: int, rows: int = 256) -> Params:
    """A ~1 MiB model: uploads span many body chunks."""
    rng = np.random.default_rng(seed)
    return Params.from_arrays(
        {
            "w": rng.standard_normal((rows, 1024)).astype(np.float32),
            "b": rng.standard_normal(1024).astype(np.float32),
        }
    )


@dataclass
class Harness:
    svc: Services
    gateway: Gateway
    server: GatewayServer
    http: httpx.Client
    own: dict[str, str] = field(default_factory=dict)  # client -> its own token

    @property
    def port(self) -> int:
        return self.server.port

    def auth(self, token: str = TOKENS[0]) -> dict[str, str]:
        """Headers with ``token``: a client's name stands for that client's own token."""
        return {"Authorization": f"Bearer {self.own.get(token, token)}"}

    def register(self, token: str = TOKENS[0], client_id: str | None = None) -> str:
        resp = self.http.post(
            "/v1/clients", json={"client_id": client_id}, headers=self.auth(token)
        )
        assert resp.status_code in (200, 201), resp.text
        client = str(resp.json()["client"])
        if "token" in resp.json():
            self.own[client] = resp.json()["token"]
        return client

    def open_round(self, r: int, selected: list[str]) -> None:
        """What start_round does: the round record, then a notice per selected client."""
        record = {
            "round": r,
            "status": "open",
            **state.put_selection(self.svc.table, r, selected),
            "token": "unused",
            "quorum": len(selected),
            "model_in": state.model_key(r - 1),
            "opened_at": time.time(),
            "accepted": {},
        }
        self.svc.table.put(state.ROUNDS, state.round_key(r), record)
        for c in selected:
            state.send_notice(self.svc.bus, r, c)

    def poll(self, client: str, wait_s: float) -> dict[str, Any]:
        resp = self.http.get(
            f"/v1/clients/{client}/notice", params={"wait_s": wait_s}, headers=self.auth(client)
        )
        assert resp.status_code == 200, resp.text
        return dict(resp.json())

    def stored_updates(self) -> tuple[list[str], list[str]]:
        blobs = self.svc.blobs.list("updates/")
        records = [i.key for i in self.svc.table.query(state.UPDATES)]
        return blobs, records


def _job_services(tmp_path: Path) -> Services:
    """A hand-made job (no workers, no torch): three partitions of 100-102 examples."""
    svc = embedded(tmp_path / "services")
    clients = ["0000", "0001", "0002"]
    coordinator.provision(svc, clients)
    cfg = JobConfig(rounds=2, clients=3, clients_per_round=2, round_deadline_s=30)
    initial = _model(0)
    svc.blobs.put(state.model_key(0), encode(initial).payload)
    svc.table.put(state.JOB, "config", {
        "config": cfg.to_dict(), "clients": clients, "quorum_count": cfg.quorum_count,
        "layout": initial.layout.to_json(), "simulate": False, "dataset": "digits",
        "client_examples": {c: 100 + i for i, c in enumerate(clients)},
    })  # fmt: skip
    return svc


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    svc = _job_services(tmp_path)
    gateway = Gateway(svc, GatewaySettings(tokens=TOKENS, body_timeout_s=1.0))
    server = GatewayServer(gateway, listen("127.0.0.1", 0)).start()
    http = httpx.Client(base_url=server.url, timeout=30)
    try:
        yield Harness(svc, gateway, server, http)
    finally:
        http.close()
        server.stop()
        svc.close()
    assert not [s for s in shm_segments() if s.startswith(f"strato-{os.getpid()}-")]


def _raw(port: int, head: str, body: bytes = b"", *, close: bool = False) -> tuple[int, dict]:  # type: ignore[type-arg]
    """Send a hand-made request; returns (status, JSON body), or (0, {}) when the server
    could not answer because we closed the connection (``close``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode() + body)
        if close:
            return 0, {}
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
        header, _, rest = data.partition(b"\r\n\r\n")
        lines = header.decode().split("\r\n")
        status = int(lines[0].split()[1])
        length = next(
            int(ln.split(":")[1]) for ln in lines if ln.lower().startswith("content-length")
        )
        while len(rest) < length:
            rest += sock.recv(65536)
        return status, json.loads(rest[:length])


def _put_head(client: str, r: int, *, length: int | None, token: str) -> str:
    lines = [
        f"PUT /v1/rounds/{r}/updates/{client} HTTP/1.1",
        "Host: test",
        f"Authorization: Bearer {token}",
        "X-Strato-Num-Examples: 100",
    ]
    lines.append(
        f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    )
    return "\r\n".join(lines) + "\r\n\r\n"


def _wait_idle(h: Harness) -> None:
    deadline = time.monotonic() + 10
    while h.gateway.uploads_in_flight and time.monotonic() < deadline:
        time.sleep(0.02)
    assert h.gateway.uploads_in_flight == 0


def test_tokens_from_flags_and_file(tmp_path: Path) -> None:
    f = tmp_path / "tokens"
    f.write_text("# clients\nabc\n\ndef\nabc\n")
    assert load_tokens(["xyz"], str(f)) == ("xyz", "abc", "def")
    from strato.errors import ConfigError

    with pytest.raises(ConfigError, match="clients-file"):
        load_tokens(None, None)
    assert load_tokens(None, None, required=False) == ()
    with pytest.raises(ConfigError, match="tokens file"):
        load_tokens(None, str(tmp_path / "missing"))


def test_register_needs_a_valid_token_and_stores_nothing_without_one(harness: Harness) -> None:
    h = harness
    for headers in ({}, h.auth("wrong"), {"Authorization": "Basic abc"}, h.auth("eve~forged")):
        resp = h.http.post("/v1/clients", json={"client_id": "mallory"}, headers=headers)
        assert resp.status_code == 401 and "token" in resp.json()["error"]
    assert h.svc.table.query(state.CLIENTS) == []

    resp = h.http.post("/v1/clients", json={"client_id": "alice"}, headers=h.auth())
    assert resp.status_code == 201
    reg = resp.json()
    assert reg["client"] == "alice" and reg["num_partitions"] == 3
    assert reg["partition_index"] == 0 and reg["partition_sizes"] == [100, 101, 102]
    # Enrolled with the shared token, alice gets a credential of her own, shown once.
    own = reg["token"]
    assert own.startswith("alice~") and TOKENS[0] not in json.dumps(reg)
    stored = json.dumps([i.value for i in h.svc.table.query(state.CLIENTS)])
    assert own not in stored and own.partition("~")[2] not in stored and "scrypt" in stored
    # The shared token cannot take alice's id again, nor act for her; her own token can.
    again = h.http.post("/v1/clients", json={"client_id": "alice"}, headers=h.auth())
    assert again.status_code == 409
    mine = h.http.post("/v1/clients", json={}, headers={"Authorization": f"Bearer {own}"})
    assert mine.status_code == 200 and mine.json()["client"] == "alice"
    assert "token" not in mine.json()
    as_shared = h.http.get("/v1/clients/alice/notice?wait_s=0", headers=h.auth())
    assert as_shared.status_code == 403 and "registration" in as_shared.json()["error"]
    as_alice = h.http.get(
        "/v1/clients/alice/notice?wait_s=0", headers={"Authorization": f"Bearer {own}"}
    )
    assert as_alice.status_code == 200
    bad_id = h.http.post("/v1/clients", json={"client_id": "../x"}, headers=h.auth())
    assert bad_id.status_code == 400
    huge = h.http.post("/v1/clients", json={"client_id": "x" * 100_000}, headers=h.auth())
    assert huge.status_code == 413
    bob = h.register(TOKENS[1])
    assert bob == "remote-0002"  # the server names a client without an id
    # A client's calls need its own token: bob's cannot act for alice.
    other = h.http.get("/v1/clients/alice/notice?wait_s=0", headers=h.auth(bob))
    assert other.status_code == 403
    forged = h.http.get("/v1/clients/alice/notice?wait_s=0", headers=h.auth("alice~forged"))
    assert forged.status_code == 401
    unknown = h.http.get("/v1/clients/nobody/notice?wait_s=0", headers=h.auth(bob))
    assert unknown.status_code == 403
    # The run takes as many clients as it has partitions: no identities beyond them.
    h.register(TOKENS[1])
    full = h.http.post("/v1/clients", json={}, headers=h.auth(TOKENS[1]))
    assert full.status_code == 403 and "has them all" in full.json()["error"]
    assert len(h.svc.table.query(state.CLIENTS)) == 3
    missing = h.http.get("/v1/no/such/route")
    assert missing.status_code == 404 and "error" in missing.json()


def test_poll_download_and_upload_store_the_update_like_the_sim_client(harness: Harness) -> None:
    h = harness
    alice = h.register(client_id="alice")
    waiting = h.http.get(
        f"/v1/clients/{alice}/notice", params={"wait_s": 0.2}, headers=h.auth(alice)
    )
    assert waiting.json() == {"status": "waiting"}
    h.open_round(1, [alice])
    notice = h.http.get(f"/v1/clients/{alice}/notice", params={"wait_s": 5}, headers=h.auth(alice))
    body = notice.json()
    assert body["status"] == "round" and body["round"] == 1

    with h.http.stream("GET", body["model"], headers=h.auth()) as resp:
        assert resp.status_code == 200
        chunks = list(resp.iter_raw())
    expected = bytes(h.svc.blobs.get(state.model_key(0)))
    assert b"".join(chunks) == expected and len(chunks) >= 1
    assert h.http.get("/v1/rounds/7/model", headers=h.auth()).status_code == 404
    assert h.http.get(body["model"], headers=h.auth("wrong")).status_code == 401

    update = encode(_model(1)).payload
    headers = {
        **h.auth(alice),
        "X-Strato-Receipt": body["receipt"],
        "X-Strato-Num-Examples": "100",
        "X-Strato-Train-S": "1.5",
        "X-Strato-Metrics": json.dumps({"train_loss": 0.25}),
    }
    resp = h.http.put(body["upload"], content=update, headers=headers)
    assert resp.status_code == 201, resp.text
    blobs, records = h.stored_updates()
    assert len(blobs) == 1 and len(records) == 1
    assert bytes(h.svc.blobs.get(blobs[0])) == update
    record = h.svc.table.query(state.UPDATES)[0].value
    assert set(record) == SIM_RECORD_KEYS
    assert record["client"] == alice and record["round"] == 1 and record["num_examples"] == 100
    assert record["bytes_up"] == len(update) and record["bytes_down"] == len(expected)
    assert record["metrics"] == {"train_loss": 0.25}
    # The notice was acknowledged: a later poll finds nothing (not even after its timeout).
    assert h.svc.bus.receive(state.client_queue(alice), 1, 0.0) == []
    # A second upload for the round is refused before its body is read.
    dup = h.http.put(body["upload"], content=update, headers=headers)
    assert dup.status_code == 409 and "already has an update" in dup.json()["error"]
    assert h.stored_updates() == (blobs, records)

    h.svc.table.put(state.METRICS, state.round_key(2), {"round": 2})  # the last round is done
    done = h.http.get(f"/v1/clients/{alice}/notice", params={"wait_s": 5}, headers=h.auth(alice))
    assert done.json() == {"status": "finished"}


def test_a_client_that_registers_again_gets_the_notice_it_had_lost_at_once(
    harness: Harness,
) -> None:
    """A client process that restarts mid-round lost the notice it had received, which
    stays invisible for the round's deadline: registering again sends it anew."""
    h = harness
    alice, bob = h.register(client_id="alice"), h.register(client_id="bob")
    h.open_round(1, [alice])
    first = h.poll(alice, 5)
    assert first["status"] == "round" and first["round"] == 1
    assert h.poll(alice, 0.2) == {"status": "waiting"}  # in flight: the restart lost it
    assert h.register(alice) == alice  # as itself, with its own credential
    again = h.poll(alice, 5)
    assert again["status"] == "round" and again["round"] == 1
    assert again["receipt"] != first["receipt"]
    assert h.register(bob) == bob and h.poll(bob, 0.2) == {"status": "waiting"}  # not selected
    headers = {**h.auth(alice), "X-Strato-Receipt": again["receipt"],
               "X-Strato-Num-Examples": "100"}  # fmt: skip
    resp = h.http.put(again["upload"], content=encode(_model(1)).payload, headers=headers)
    assert resp.status_code == 201, resp.text
    assert h.register(alice) == alice and h.poll(alice, 0.2) == {"status": "waiting"}


def test_bad_uploads_are_refused_store_nothing_and_the_server_keeps_serving(
    harness: Harness,
) -> None:
    h = harness
    alice, bob = h.register(client_id="alice"), h.register(client_id="bob")
    h.open_round(1, [alice])
    good = encode(_model(2)).payload
    path = f"/v1/rounds/1/updates/{alice}"

    # Another client's long poll runs throughout the bad uploads and ends normally.
    polled: dict[str, object] = {}

    def poll() -> None:
        with httpx.Client(base_url=h.server.url, timeout=30) as c:
            resp = c.get(f"/v1/clients/{bob}/notice", params={"wait_s": 4}, headers=h.auth(bob))
            polled["status"], polled["body"] = resp.status_code, resp.json()

    poller = threading.Thread(target=poll)
    poller.start()

    def refused(status: int, resp_status: int, resp_body: dict, what: str) -> None:  # type: ignore[type-arg]
        assert resp_status == status, (what, resp_status, resp_body)
        assert isinstance(resp_body.get("error"), str) and resp_body["error"], what
        _wait_idle(h)
        assert h.stored_updates() == ([], []), what

    # Wrong token: 401 before anything else.
    status, body = _raw(h.port, _put_head(alice, 1, length=len(good), token="nope"), good)
    refused(401, status, body, "bad token")
    status, body = _raw(h.port, _put_head(alice, 1, length=len(good), token=h.own[bob]), good)
    refused(403, status, body, "another client's token")
    mine = h.own[alice]
    examples = {**h.auth(alice), "X-Strato-Num-Examples": "100"}

    def put(length: int | None) -> str:
        return _put_head(alice, 1, length=length, token=mine)

    # Oversized: refused from the header alone, the body is never sent.
    too_big = h.gateway.max_upload_bytes + 1
    status, body = _raw(h.port, put(too_big))
    refused(413, status, body, "oversized")
    assert str(h.gateway.max_upload_bytes) in body["error"]
    # No Content-Length (a chunked body): refused before reading.
    status, body = _raw(h.port, put(None), b"5\r\nhello\r\n0\r\n\r\n")
    refused(411, status, body, "chunked")
    # Truncated, the sender stalls: refused once the body timeout passes.
    status, body = _raw(h.port, put(len(good)), good[: len(good) // 2])
    refused(400, status, body, "stalled")
    assert "truncated" in body["error"]
    # Truncated, the sender hangs up: nobody to answer, but nothing is stored.
    ended = h.gateway.uploads_ended
    _raw(
        h.port, put(len(good)), good[: len(good) // 3], close=True
    )
    deadline = time.monotonic() + 10
    while h.gateway.uploads_ended == ended and time.monotonic() < deadline:
        time.sleep(0.02)
    assert h.gateway.uploads_ended == ended + 1
    _wait_idle(h)
    assert h.stored_updates() == ([], [])
    # Not decodable: the right length of garbage.
    garbage = np.random.default_rng(3).integers(0, 256, len(good), dtype=np.uint8).tobytes()
    resp = h.http.put(path, content=garbage, headers=examples)
    refused(400, resp.status_code, resp.json(), "garbage")
    assert "not decodable" in resp.json()["error"]
    # Wrong layout: a valid safetensors payload of another model.
    other = encode(_model(4, rows=200)).payload
    resp = h.http.put(path, content=other, headers=examples)
    refused(422, resp.status_code, resp.json(), "wrong layout")
    assert "layout" in resp.json()["error"]
    # Well-formed but not finite: refused before anything is stored.
    for bad_value, named in ((np.nan, "NaN"), (np.inf, "an infinity")):
        poisoned = _model(2)
        poisoned["w"][3, 7] = bad_value
        payload = encode(poisoned).payload
        resp = h.http.put(
            path, content=payload, headers={**h.auth(alice), "X-Strato-Num-Examples": "100"}
        )
        refused(422, resp.status_code, resp.json(), named)
        assert f"'w' holds {named}" in resp.json()["error"]
    # Bad metadata, and an update for a round the client is not in.
    resp = h.http.put(path, content=good, headers={**h.auth(alice), "X-Strato-Num-Examples": "0"})
    refused(400, resp.status_code, resp.json(), "no examples")
    nan = {**h.auth(alice), "X-Strato-Num-Examples": "5", "X-Strato-Metrics": '{"loss": NaN}'}
    resp = h.http.put(path, content=good, headers=nan)
    refused(400, resp.status_code, resp.json(), "NaN metric")
    resp = h.http.put(
        f"/v1/rounds/1/updates/{bob}",
        content=good,
        headers={**h.auth(bob), "X-Strato-Num-Examples": "9"},
    )
    refused(409, resp.status_code, resp.json(), "not selected")

    poller.join(30)
    assert polled == {"status": 200, "body": {"status": "waiting"}}
    # Still serving: a good upload after all that is stored.
    resp = h.http.put(path, content=good, headers=examples)
    assert resp.status_code == 201, resp.text
    blobs, records = h.stored_updates()
    assert len(blobs) == 1 and len(records) == 1
    stored = decode(h.svc.blobs.get(blobs[0]))
    assert np.array_equal(stored.flat(), decode(good).flat())


def test_per_client_credentials_from_a_clients_file(tmp_path: Path) -> None:
    from strato.fl.credentials import issue_token, revoke_token

    path = tmp_path / "clients.json"
    alice, bob = issue_token(path, "alice"), issue_token(path, "bob")
    assert path.stat().st_mode & 0o777 == 0o600
    assert alice not in path.read_text() and alice.partition("~")[2] not in path.read_text()
    svc = _job_services(tmp_path)
    gateway = Gateway(svc, GatewaySettings(clients_file=path, body_timeout_s=1.0))
    server = GatewayServer(gateway, listen("127.0.0.1", 0)).start()

    def call(method: str, route: str, token: str, **kw: object) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"}
        return httpx.request(method, f"{server.url}{route}", headers=headers, timeout=30, **kw)  # type: ignore[arg-type]

    try:
        # A credential's name is the client's id: it can register as itself only.
        assert call("POST", "/v1/clients", alice, json={"client_id": "bob"}).status_code == 403
        reg = call("POST", "/v1/clients", alice, json={})
        assert reg.status_code == 201 and reg.json()["client"] == "alice"
        assert "token" not in reg.json()  # it has its own already
        assert call("POST", "/v1/clients", alice, json={}).status_code == 200
        assert call("GET", "/v1/clients/alice/notice?wait_s=0", alice).status_code == 200
        assert call("GET", "/v1/clients/alice/notice?wait_s=0", bob).status_code == 403
        assert call("POST", "/v1/clients", "carol~" + "x" * 43, json={}).status_code == 401
        assert call("POST", "/v1/clients", "alice~" + "x" * 43, json={}).status_code == 401
        # Revoked in the file: refused at its next request, although verified before.
        revoke_token(path, "alice")
        refused = call("GET", "/v1/clients/alice/notice?wait_s=0", alice)
        assert refused.status_code == 401 and "revoked" in refused.json()["error"]
        assert call("POST", "/v1/clients", bob, json={}).status_code == 201
        # A new credential for alice replaces the revoked one.
        alice2 = issue_token(path, "alice")
        assert call("GET", "/v1/clients/alice/notice?wait_s=0", alice2).status_code == 200
        assert call("GET", "/v1/clients/alice/notice?wait_s=0", alice).status_code == 401
        stored = json.dumps([i.value for i in svc.table.query(state.CLIENTS)])
        assert "~" not in stored
    finally:
        server.stop()
        svc.close()


def test_a_registration_body_that_stalls_or_stops_is_refused_quietly(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    h = harness
    head = (
        "POST /v1/clients HTTP/1.1\r\nHost: test\r\n"
        f"Authorization: Bearer {TOKENS[0]}\r\nContent-Type: application/json\r\n"
        "Content-Length: 40\r\n\r\n"
    )
    with caplog.at_level("INFO", logger="strato.gateway"):
        started = time.monotonic()
        status, body = _raw(h.port, head, b'{"client_id": ')  # then nothing (timeout 1 s)
        assert status == 400 and "stalled" in body["error"]
        assert time.monotonic() - started < 10
        _raw(h.port, head, b'{"client_id": ', close=True)  # hangs up mid-body
        time.sleep(0.5)
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL") or r.exc_info]
    assert h.svc.table.query(state.CLIENTS) == []
    assert h.register(client_id="alice") == "alice"  # still serving


def test_a_finished_job_waits_for_a_client_still_training(harness: Harness) -> None:
    h = harness
    alice = h.register(client_id="alice")
    h.open_round(1, [alice])
    notice = h.http.get(f"/v1/clients/{alice}/notice", params={"wait_s": 5}, headers=h.auth(alice))
    assert notice.json()["status"] == "round" and h.gateway.training == {alice: 1}
    h.svc.table.put(state.METRICS, state.round_key(2), {"round": 2})  # the job ends
    stopped = threading.Event()
    stopper = threading.Thread(target=lambda: (h.server.stop(0.2), stopped.set()))
    stopper.start()
    time.sleep(1.0)  # past the grace: the server is still up for the training client
    assert not stopped.is_set()
    late = h.http.put(
        notice.json()["upload"],
        content=encode(_model(1)).payload,
        headers={**h.auth(alice), "X-Strato-Num-Examples": "100"},
    )
    assert late.status_code == 201 and h.gateway.training == {}
    done = h.http.get(f"/v1/clients/{alice}/notice", params={"wait_s": 1}, headers=h.auth(alice))
    assert done.json() == {"status": "finished"}
    stopper.join(30)
    assert stopped.is_set()


def test_the_remote_client_acts_with_the_credential_it_is_given(harness: Harness) -> None:
    from strato.errors import StratoError
    from strato.fl.remote import RemoteClient

    api = RemoteClient(harness.server.url, TOKENS[0], wait_s=0)
    try:
        reg = api.register("carol")
        with pytest.raises(StratoError, match="403"):  # the shared token cannot poll
            api.next_notice("carol", 0)
        api.use_token(reg["token"])
        assert api.next_notice("carol", 0) == {"status": "waiting"}
    finally:
        api.close()


def test_a_remote_client_trains_with_the_threads_it_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch = pytest.importorskip("torch")
    from strato.errors import ConfigError
    from strato.fl.remote import _limit_threads

    before = torch.get_num_threads()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.setenv(var, "64")
    try:
        _limit_threads(1)
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
        with pytest.raises(ConfigError, match="--threads"):
            _limit_threads(0)
    finally:
        torch.set_num_threads(before)


# --- end to end: strato serve + four strato client processes -------------------------

E2E_TOML = """
[job]
rounds = 2
clients = 48
clients_per_round = 4
seed = 1

[round]
round_deadline_s = 600

[train]
epochs = 1
batch_size = 16
lr = 0.05
"""


class _Lines:
    """Collects a process's stdout lines in a thread (so reading never blocks the test)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        assert proc.stdout is not None
        stream = proc.stdout
        self.thread = threading.Thread(target=lambda: self.lines.extend(iter(stream.readline, "")))
        self.thread.start()

    def wait_for(self, prefix: str, proc: subprocess.Popen[str], timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if line.startswith(prefix):
                    return line
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {prefix!r} line; got {self.lines}")


def _self_signed(where: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made for the test (it is its own CA)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "strato test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = where / "cert.pem", where / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


@pytest.mark.slow
def test_serve_with_four_remote_clients_over_https(tmp_path: Path) -> None:
    """The secure set-up: HTTPS with a certificate the test makes, a credential per
    client (strato token issue), tokens given in a file or the environment."""
    app = make_tiny_app(tmp_path)
    (app / "strato.toml").write_text(E2E_TOML)
    out = tmp_path / "out"
    env = cli_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    mnist = os.environ.get("STRATO_DATA_DIR")  # CI passes MNIST; else the bundled digits
    if mnist:
        env["STRATO_DATA_DIR"] = mnist
    cert, key = _self_signed(tmp_path)
    clients_file = tmp_path / "clients.json"
    tokens = {}
    for i in range(4):
        issued = strato("token", "issue", f"edge-{i}", "--clients-file", str(clients_file))
        assert issued.returncode == 0, issued.stderr
        tokens[f"edge-{i}"] = issued.stdout.strip()
        (tmp_path / f"edge-{i}.token").write_text(issued.stdout)
    serve_args = [
        "--out", str(out), "--port", "0", "--clients-file", str(clients_file),
        "--min-clients", "4", "--tls-cert", str(cert), "--tls-key", str(key),
    ]  # fmt: skip
    serve = subprocess.Popen(
        [*STRATO, "serve", str(app), *serve_args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    clients: list[subprocess.Popen[str]] = []
    try:
        lines = _Lines(serve)
        url = lines.wait_for("gateway: serving ", serve, 180).split()[2]
        assert url.startswith("https://127.0.0.1:") and not url.endswith(":0")
        assert out.stat().st_mode & 0o777 == 0o700  # the run's files are its owner's

        # A wrong token is refused and registers nothing; so is a server not verified.
        resp = httpx.post(
            f"{url}/v1/clients", json={}, headers={"Authorization": "Bearer bad"},
            verify=ssl.create_default_context(cafile=str(cert)),
        )
        assert resp.status_code == 401 and resp.json() == {"error": "invalid token"}
        base = ["client", "--server", url, "--ca-file", str(cert)]
        res = strato(*base, "--token", "bad", str(app), env=env)
        assert res.returncode == 2 and "invalid token" in res.stderr
        assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
        unverified = strato("client", "--server", url, "--token", tokens["edge-0"], str(app))
        assert unverified.returncode == 2 and "--ca-file" in unverified.stderr
        assert "Traceback" not in unverified.stderr
        with embedded(out / "services") as svc:
            assert svc.table.query(state.CLIENTS) == []

        for i in range(4):
            # Two clients read their token from a file, two from the environment.
            how = ["--token-file", str(tmp_path / f"edge-{i}.token")] if i % 2 else []
            client_env = env if i % 2 else {**env, "STRATO_TOKEN": tokens[f"edge-{i}"]}
            clients.append(
                subprocess.Popen(
                    [*STRATO, *base, str(app), *how],
                    env=client_env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    stdin=subprocess.DEVNULL,
                    text=True,
                )
            )
        outputs = [c.communicate(timeout=900) for c in clients]
        _, serve_err = serve.communicate(timeout=120)
    finally:
        for p in [serve, *clients]:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert serve.returncode == 0, serve_err
    said = "".join(lines.lines) + serve_err + "".join(o + e for o, e in outputs)
    assert not [t for t in tokens.values() if t.partition("~")[2] in said]  # nothing secret
    for c, (stdout, stderr) in zip(clients, outputs, strict=True):
        assert c.returncode == 0, stderr
        assert "the job is finished" in stdout and "round 2:" in stdout
        assert ("mnist examples" in stdout) == bool(mnist), stdout  # what each trained on
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2
    assert [r["accepted"] for r in summary["per_round"]] == [4, 4]
    assert summary["updates_accepted"] == 8 and summary["updates_rejected"] == 0
    assert summary["bytes_up"] > 0 and summary["bytes_down"] > 0
    assert any(line.startswith("round   2/2") for line in lines.lines)
    with embedded(out / "services") as svc:
        assert sorted(i.key for i in svc.table.query(state.CLIENTS)) == [
            f"edge-{i}" for i in range(4)
        ]
        uploads = svc.table.query(state.UPDATES)
        assert len(uploads) == 8 and {u.value["client"] for u in uploads} == {
            f"edge-{i}" for i in range(4)
        }
    assert strato_workers(out) == []
    assert not [s for s in shm_segments() if s.startswith(f"strato-{serve.pid}-")]


def test_an_upload_the_disk_has_no_room_for_is_answered_507_and_stores_nothing(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = harness
    alice = h.register(client_id="alice")
    h.open_round(1, [alice])
    good = encode(_model(2)).payload
    headers = {**h.auth(alice), "X-Strato-Num-Examples": "100"}
    store = type(h.svc.blobs)
    real = store.open_writer

    def full(self: object, key: str, nbytes: int) -> object:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store, "open_writer", full)
    resp = h.http.put(f"/v1/rounds/1/updates/{alice}", content=good, headers=headers)
    assert resp.status_code == 507 and "storage is full" in resp.json()["error"]
    _wait_idle(h)
    assert h.stored_updates() == ([], [])
    monkeypatch.setattr(store, "open_writer", real)  # room again: the same upload is taken
    resp = h.http.put(f"/v1/rounds/1/updates/{alice}", content=good, headers=headers)
    assert resp.status_code == 201
    assert len(h.stored_updates()[1]) == 1


def test_async_an_upload_goes_to_the_open_buffer_unless_too_stale(harness: Harness) -> None:
    """Async mode: an update sent an older round's notice is taken into the open buffer
    while it is at most max_staleness versions behind; staler ones, second uploads and
    uploads after the last version are refused before a byte is read."""
    from strato.fl import buffered

    h = harness
    item = h.svc.table.get(state.JOB, "config")
    assert item is not None
    job = item.value
    job["config"] |= {"mode": "async", "buffer": 2, "max_staleness": 1, "rounds": 3}
    h.svc.table.put(state.JOB, "config", job)
    h.gateway.job, h.gateway.config = job, job["config"]
    alice = h.register(client_id="alice")
    for r in (1, 2, 3):  # versions 1 and 2 made: round 3's buffer is open
        buffered.open_version(h.svc, job, r)
        if r < 3:
            h.svc.blobs.put(state.model_key(r), encode(_model(0)).payload)
            state.cas_update(h.svc.table, state.ROUNDS, state.round_key(r),
                             lambda v: {**v, "status": "closed"})
    update = encode(_model(2)).payload
    headers = {**h.auth(alice), "X-Strato-Num-Examples": "100"}
    stale = h.http.put(f"/v1/rounds/1/updates/{alice}", content=update, headers=headers)
    assert stale.status_code == 409 and stale.json()["error"].startswith(
        "stale: it started from version 0, 2 versions behind")
    assert h.stored_updates() == ([], [])
    ok = h.http.put(f"/v1/rounds/2/updates/{alice}", content=update, headers=headers)
    assert ok.status_code == 201, ok.text  # one version behind: taken
    again = h.http.put(f"/v1/rounds/2/updates/{alice}", content=update, headers=headers)
    assert again.status_code == 409 and "already has an update" in again.json()["error"]
    state.cas_update(h.svc.table, state.ROUNDS, state.round_key(3),
                     lambda v: {**v, "status": "closed"})  # the last version is made
    late = h.http.put(f"/v1/rounds/3/updates/{alice}", content=update, headers=headers)
    assert late.status_code == 409 and late.json()["error"].startswith("late")
    assert len(h.stored_updates()[1]) == 1


def test_the_malloc_arena_cap_applies_where_glibc_has_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from strato.fl import serve

    assert serve.limit_malloc_arenas() is sys.platform.startswith("linux")  # glibc here
    monkeypatch.setattr(serve.sys, "platform", "darwin")
    assert serve.limit_malloc_arenas() is False
