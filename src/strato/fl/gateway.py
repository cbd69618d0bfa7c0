"""The HTTP gateway of ``strato serve``: remote clients take part in a run over the network.

Every call carries ``Authorization: Bearer <token>``. A client registers with its own
credential (``strato serve --clients-file``: the client's id is the credential's name)
or with a shared enrolment token (``--token``: the response carries a credential of
the new client's own, shown once); every later call about a client must carry that
client's own credential (``fl.credentials``), so no client can act as another.
Errors are JSON ``{"error": "..."}`` with a 4xx status, and a refused request stores
nothing: an update is checked (layout, finite values) before it is committed.

===========================================  =============================================
``GET  /v1/health``                           liveness (no token): ``{"status": "ok"}``
``POST /v1/clients``                          register (``{"client_id": ...}`` optional):
                                              the client's id, data partition, job config
                                              (and ``token``: its own credential, when
                                              enrolled with a shared token)
``GET  /v1/clients/{id}/notice?wait_s=S``     long-poll: ``{"status": "round", "round",
                                              "receipt", "model", "upload"}``, or
                                              ``"waiting"``, ``"finished"``, ``"closing"``
``GET  /v1/rounds/{r}/model``                 round r's input model (safetensors, streamed)
``PUT  /v1/rounds/{r}/updates/{id}``          the update (safetensors, Content-Length
                                              required; headers ``X-Strato-Receipt``,
                                              ``X-Strato-Num-Examples``, ``-Train-S``,
                                              ``-Metrics`` (JSON)) → 201
===========================================  =============================================

An upload is read straight into its blob's own file (``_upload.receive_into`` into
``BlobStore.open_writer``'s map; a blob store elsewhere gets it through a node
shared-memory buffer), validated there (decodable, the job's layout), committed, and
recorded in the ``updates`` table exactly as the simulated client does, so the
aggregator handles it unchanged: its leaf maps and adds the very pages the gateway
received into. The notice is acknowledged after the record
is written (at-least-once, as in ``SimClient``). Every blocking call to the services
runs in a worker thread, so one slow or failing request never stalls the others.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from strato.codec import decode, header_bytes
from strato.control import round as rules
from strato.errors import CodecError, LayoutError, NotFound, StratoError, disk_full
from strato.fl import buffered, state
from strato.fl import credentials as creds
from strato.fl._upload import (
    HttpError,
    content_length,
    receive_into,
    small_body,
    upload_meta,
)
from strato.fl.client import update_record
from strato.fl.coordinator import register_client
from strato.params import Layout
from strato.services import Services
from strato.services.shm import ShmError, ShmPool

__all__ = ["API", "Gateway", "GatewaySettings", "HttpError", "token_digest"]

API = "/v1"
_log = logging.getLogger("strato.gateway")
_MAX_JSON_BODY = 64 << 10
_SHARED = ""  # the principal of a shared enrolment token: no client of its own


def token_digest(token: str) -> str:
    """What the gateway keeps in memory of a shared token: never the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class GatewaySettings:
    tokens: Sequence[str] = ()  # shared enrolment tokens
    clients_file: Path | None = None  # per-client credentials (fl.credentials)
    max_upload_bytes: int | None = None  # default: the job's encoded model size + 64 KiB
    body_timeout_s: float = 60.0  # a request body stalled this long is refused (400)
    max_wait_s: float = 30.0  # the longest long-poll a client may ask for
    chunk_bytes: int = 1 << 20  # model download chunk
    max_concurrent_uploads: int = 16  # shared-memory buffers in use at once


Handler = Callable[[Request], Awaitable[Response]]


def _json_error(status: int, message: str, *, close: bool = False) -> JSONResponse:
    headers = {"Connection": "close"} if close else {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _endpoint(fn: Handler) -> Handler:
    """Turn every failure of one request into a JSON error for that request alone."""

    async def wrapped(request: Request) -> Response:
        try:
            return await fn(request)
        except HttpError as exc:
            return _json_error(exc.status, exc.message, close=exc.close)
        except ShmError as exc:
            _log.warning("gateway: %s", exc)
            return _json_error(503, f"server out of shared memory: {exc}", close=True)
        except StratoError as exc:  # the services failed us: the client did nothing wrong
            _log.warning("gateway: %s %s: %s", request.method, request.url.path, exc)
            return _json_error(500, str(exc), close=True)
        except Exception as exc:
            if disk_full(exc):  # the node's disk: the client may try again once there is room
                _log.warning("gateway: %s %s: %s", request.method, request.url.path, exc)
                return _json_error(507, "server storage is full: not stored, try again later")
            _log.exception("gateway: %s %s failed", request.method, request.url.path)
            return _json_error(500, f"internal error: {type(exc).__name__}: {exc}", close=True)

    return wrapped


def _first_non_finite(array: np.ndarray) -> str | None:
    """What a float tensor holds that is not finite ("NaN" or "an infinity"), or None.

    One pass at memory bandwidth: a float64 sum of finite float32 values cannot
    overflow, and a NaN or an infinity always reaches it."""
    if array.dtype.kind != "f" or math.isfinite(
        float(np.add.reduce(array.ravel(), dtype=np.float64))
    ):
        return None
    return "NaN" if np.isnan(array).any() else "an infinity"


class Gateway:
    """The gateway's state and request handlers over one run's services."""

    def __init__(self, svc: Services, settings: GatewaySettings) -> None:
        if not settings.tokens and settings.clients_file is None:
            raise StratoError("the gateway needs a clients file or a shared client token")
        item = svc.table.get(state.JOB, "config")
        if item is None:
            raise NotFound("the run has no job record")
        self.svc, self.settings, self.job = svc, settings, item.value
        self.config: dict[str, Any] = self.job["config"]
        self.layout = Layout.from_json(self.job["layout"])
        expected = len(header_bytes(self.layout)) + self.layout.nbytes
        self.max_upload_bytes = settings.max_upload_bytes or expected + (64 << 10)
        self._digests = [token_digest(t) for t in settings.tokens]
        self.clients_file = (
            None if settings.clients_file is None else creds.ClientsFile(settings.clients_file)
        )
        self._verified = creds.TokenCache()
        self._file_generation = -1
        self.pool = ShmPool(max_idle_bytes=4 * self.max_upload_bytes)
        self.closing = threading.Event()  # set on stop: long polls return at once
        self.told_finished: set[str] = set()
        # clients given a round notice that have not uploaded since: on stop, a finished
        # job waits for them, so that they hear "finished" rather than find no server
        self.training: dict[str, int] = {}
        self._finished = False
        self._register_lock = threading.Lock()
        # each round's selection, read once (it never changes): (round, its selection's id)
        self._selections: dict[tuple[int, str], frozenset[str]] = {}
        self._selections_lock = threading.Lock()
        self._in_flight: set[tuple[int, str]] = set()  # (round, client) uploads being read
        self.uploads_ended = 0  # authenticated, size-checked uploads that ended: for tests
        self._upload_slots: asyncio.Semaphore | None = None  # made in the server's loop

    # --- the ASGI app -----------------------------------------------------------------

    def asgi(self) -> Starlette:
        routes = [
            Route(f"{API}/health", _endpoint(self.health), methods=["GET"]),
            Route(f"{API}/clients", _endpoint(self.register), methods=["POST"]),
            Route(f"{API}/clients/{{client}}/notice", _endpoint(self.notice), methods=["GET"]),
            Route(f"{API}/rounds/{{round:int}}/model", _endpoint(self.model), methods=["GET"]),
            Route(
                f"{API}/rounds/{{round:int}}/updates/{{client}}",
                _endpoint(self.upload),
                methods=["PUT"],
            ),
        ]

        async def http_error(request: Request, exc: Exception) -> Response:
            assert isinstance(exc, HTTPException)  # unknown route, wrong method
            return _json_error(exc.status_code, str(exc.detail))

        return Starlette(routes=routes, exception_handlers={HTTPException: http_error})

    @property
    def uploads_in_flight(self) -> int:
        return len(self._in_flight)

    def close(self) -> None:
        self.pool.close()

    # --- authentication ----------------------------------------------------------------

    async def _principal(self, request: Request) -> str:
        """Who is calling: a client's name, or ``_SHARED`` for a shared enrolment token;
        401 when the token is missing, unknown or revoked."""
        scheme, _, raw = request.headers.get("authorization", "").partition(" ")
        token = raw.strip()
        if scheme.lower() != "bearer" or not token:
            raise HttpError(401, "missing bearer token (Authorization: Bearer <token>)")
        digest = token_digest(token)
        # compare_digest against every token: the time taken says nothing about which.
        if any([hmac.compare_digest(digest, d) for d in self._digests]):
            return _SHARED
        parts = creds.split_token(token)
        if parts is None:
            raise HttpError(401, "invalid token")
        name = parts[0]
        if self.clients_file is not None:
            record = self.clients_file.clients().get(name)
            if self.clients_file.generation != self._file_generation:
                self._verified.forget()  # the file changed: a revocation counts at once
                self._file_generation = self.clients_file.generation
            if record is not None and record.get("revoked_at"):
                raise HttpError(401, f"the credential of client {name!r} is revoked")
        if self._verified.get(token) == name:
            return name
        if not await run_in_threadpool(self._verify, token, name):
            raise HttpError(401, "invalid token")
        self._verified.put(token, name)
        return name

    def _verify(self, token: str, name: str) -> bool:
        if self.clients_file is not None and name in self.clients_file.clients():
            return creds.verify_secret(token, self.clients_file.clients()[name])
        item = self.svc.table.get(state.CLIENTS, name)
        stored = None if item is None else item.value.get("credential")
        return isinstance(stored, dict) and creds.verify_secret(token, stored)

    async def _client(self, request: Request) -> str:
        """The path's client, when the caller is that client (its own credential)."""
        caller = await self._principal(request)
        client = str(request.path_params["client"])
        if caller == _SHARED:
            raise HttpError(
                403,
                f"a shared token cannot act for client {client!r}: use the token the "
                "server gave it at registration",
            )
        if caller != client:
            raise HttpError(403, f"this token does not belong to client {client!r}")
        if await run_in_threadpool(self.svc.table.get, state.CLIENTS, client) is None:
            raise HttpError(404, f"client {client!r} is not registered")
        return client

    # --- handlers ----------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "api": API, "finished": self.finished()})

    async def register(self, request: Request) -> Response:
        caller = await self._principal(request)
        try:
            raw = await small_body(request, _MAX_JSON_BODY, self.settings.body_timeout_s)
            body = json.loads(raw or b"{}")
        except ValueError:
            raise HttpError(400, "the registration body is not JSON") from None
        wanted = body.get("client_id") if isinstance(body, dict) else None
        if wanted is not None and (
            not isinstance(wanted, str) or not creds.CLIENT_NAME.fullmatch(wanted)
        ):
            raise HttpError(
                400, "client_id must be 1-64 letters, digits, '.', '_' or '-' (not first)"
            )
        if caller != _SHARED and wanted not in (None, caller):
            raise HttpError(
                403, f"this token is client {caller!r}'s; it cannot register {wanted!r}"
            )
        record, created = await run_in_threadpool(self._register, caller or None, wanted)
        reply = self._registration(record)
        if "token" in record:
            reply["token"] = record["token"]
        return JSONResponse(reply, status_code=201 if created else 200)

    def _register(self, caller: str | None, wanted: str | None) -> tuple[dict[str, Any], bool]:
        """Register ``caller`` (a named client) or, for a shared token, ``wanted`` or a new
        id; returns the record (with ``token``, the client's own credential, shown once,
        for a new enrolment) and whether it is new."""
        with self._register_lock:  # ids and partition indices are handed out one at a time
            table = self.svc.table
            client = caller or wanted
            if client is not None and (item := table.get(state.CLIENTS, client)) is not None:
                if caller is None:
                    raise HttpError(409, f"client id {client!r} is taken")
                self._notify_again(client)
                return {"client": client, **item.value}, False
            if caller is None and client is not None and self._reserved(client):
                raise HttpError(409, f"client id {client!r} is taken")
            registered = table.query(state.CLIENTS)
            partitions = len(self.job["clients"])
            if caller is None and len(registered) >= partitions:
                raise HttpError(
                    403, f"the run takes {partitions} clients and has them all (--clients)"
                )
            known = len(registered)
            n = known
            while client is None or table.get(state.CLIENTS, client) is not None:
                n += 1
                client = f"remote-{n:04d}"
            info: dict[str, Any] = {
                "partition_index": known % partitions,
                "registered_at": time.time(),
            }
            shown: dict[str, str] = {}
            if caller is None:  # a shared enrolment: the client's own credential
                shown["token"] = creds.new_token(client)
                info["credential"] = creds.hash_secret(shown["token"])
            register_client(self.svc, client, info)
            _log.info("gateway: client %s registered", client)
            return {"client": client, **info, **shown}, True

    def _notify_again(self, client: str) -> None:
        """A client registering again (its process restarted) may have lost a notice it
        had received: that notice stays invisible until its visibility timeout, past the
        round's deadline. It gets the notice of each open round it owes an update to
        again; the old one, once visible, is stale and dropped."""
        for item in self.svc.table.query(state.ROUNDS):
            r = int(item.value["round"])
            if item.value.get("status") == "open" and self._refusal(r, client) is None:
                state.send_notice(self.svc.bus, r, client)
                _log.info("gateway: client %s registered again: round %d's notice sent again",
                          client, r)  # fmt: skip

    def _reserved(self, name: str) -> bool:
        return self.clients_file is not None and name in self.clients_file.clients()

    def _registration(self, record: dict[str, Any]) -> dict[str, Any]:
        cfg, client = self.config, record["client"]
        return {
            "client": client,
            "partition_index": record["partition_index"],
            "num_partitions": len(self.job["clients"]),
            "partition_sizes": [self.job["client_examples"][c] for c in self.job["clients"]],
            "partition": cfg["partition"],
            "dirichlet_alpha": cfg["dirichlet_alpha"],
            "seed": cfg["seed"],
            "dataset": self.job["dataset"],
            "config": cfg,
            "layout": self.job["layout"],
            "notice": f"{API}/clients/{client}/notice",
        }

    def finished(self) -> bool:
        """True once the job's last round is evaluated (then for good)."""
        if not self._finished:
            last = state.round_key(int(self.config["rounds"]))
            self._finished = self.svc.table.get(state.METRICS, last) is not None
        return self._finished

    async def notice(self, request: Request) -> Response:
        client = await self._client(request)
        try:
            wait_s = float(request.query_params.get("wait_s", "20"))
        except ValueError:
            raise HttpError(400, "wait_s must be a number of seconds") from None
        deadline = time.monotonic() + min(max(0.0, wait_s), self.settings.max_wait_s)
        while True:
            if await run_in_threadpool(self.finished):
                self.told_finished.add(client)
                self.training.pop(client, None)
                return JSONResponse({"status": "finished"})
            if self.closing.is_set():
                return JSONResponse({"status": "closing"})
            remaining = deadline - time.monotonic()
            # Wait in slices of a second so a finished job or a stop is noticed promptly.
            found = await run_in_threadpool(
                self._next_notice, client, min(1.0, max(0.0, remaining))
            )
            if found is not None:
                return JSONResponse(found)
            if remaining <= 0:
                return JSONResponse({"status": "waiting"})

    def _next_notice(self, client: str, wait_s: float) -> dict[str, Any] | None:
        queue = state.client_queue(client)
        # Invisible to other polls for the round's deadline: the client trains meanwhile.
        visibility = float(self.config["round_deadline_s"])
        for msg in self.svc.bus.receive(queue, 1, wait_s, visibility):
            r = int(json.loads(msg.body)["round"])
            if self._refusal(r, client) is not None:
                self.svc.bus.ack(queue, msg.receipt)  # stale: closed round or already uploaded
                return None
            self.training[client] = r
            return {
                "status": "round",
                "round": r,
                "receipt": msg.receipt,
                "model": f"{API}/rounds/{r}/model",
                "upload": f"{API}/rounds/{r}/updates/{client}",
            }
        return None

    def _refusal(self, r: int, client: str) -> str | None:
        """Why ``client`` may not upload for round ``r`` now (None: it may): the round
        rules' own answer (``control.round.may_upload``), asked before any byte is read."""
        item = self.svc.table.get(state.ROUNDS, state.round_key(r))
        if item is None:
            return rules.may_upload(None, r, client)
        if buffered.is_async(self.job):
            return self._async_refusal(r, client)
        rnd = item.value
        if rnd["status"] != "open" or "model" in rnd:  # its selection need not be read
            view = rules.RoundState.open(r, (), int(rnd["quorum"]))
            return rules.may_upload(dataclasses.replace(view, status="closed"), r, client)
        view = rules.RoundState.open(r, self._selection(r, rnd), int(rnd["quorum"]))
        uploads = self.svc.table.query(state.UPDATES, f"{state.round_key(r)}/{client}/")
        if uploads:
            view = dataclasses.replace(view, admitted={client: uploads[0].key})
        return rules.may_upload(view, r, client)

    def _selection(self, r: int, rnd: dict[str, Any]) -> frozenset[str]:
        """Round r's selected clients: read once per round, not once per upload."""
        key = (r, str(rnd.get("selection", "")))
        found = self._selections.get(key)
        if found is None:
            found = frozenset(state.selected(self.svc.table, r, rnd))
            with self._selections_lock:
                while len(self._selections) >= 4:  # only the last rounds' are asked for
                    self._selections.pop(next(iter(self._selections)))
                self._selections[key] = found
        return found

    def _async_refusal(self, r: int, client: str) -> str | None:
        """Async: an update sent round r's notice goes into the open buffer unless it is
        too stale, its client sent it already, or the last version is made."""
        open_r = buffered.open_round(self.svc)
        last = self.svc.table.get(state.ROUNDS, state.round_key(open_r))
        if last is None or last.value.get("status") != "open":
            return f"late: round {open_r} is already closed"
        if self.svc.table.query(state.UPDATES, f"{state.round_key(r)}/{client}/"):
            return f"duplicate: client {client} already has an update for round {r}"
        return buffered.staleness(self.job).refusal(r, open_r)

    async def model(self, request: Request) -> Response:
        await self._principal(request)
        r = int(request.path_params["round"])
        if (
            r < 1
            or await run_in_threadpool(self.svc.table.get, state.ROUNDS, state.round_key(r)) is None
        ):
            raise HttpError(404, f"round {r} has not started")
        try:
            blob = await run_in_threadpool(self.svc.blobs.get, state.model_key(r - 1))
        except NotFound:
            raise HttpError(404, f"round {r} has no input model") from None
        step = self.settings.chunk_bytes

        async def chunks() -> AsyncIterator[memoryview]:
            for start in range(0, len(blob), step):
                yield blob[start : start + step]

        return StreamingResponse(
            chunks(),
            media_type="application/octet-stream",
            headers={"Content-Length": str(len(blob))},
        )

    async def upload(self, request: Request) -> Response:
        try:
            client = await self._client(request)
        except HttpError as exc:
            exc.close = True  # never drain the body of an upload we will not take
            raise
        r = int(request.path_params["round"])
        length = content_length(request.headers, self.max_upload_bytes)
        meta = upload_meta(request.headers)
        # Refusals from here on leave the connection open: uvicorn drains the unread body
        # (at most max_upload_bytes), so the client reads the answer instead of a reset.
        if (r, client) in self._in_flight:
            raise HttpError(409, f"client {client} is uploading for round {r}")
        # Claimed before the check below: a stored update leaves _in_flight only after
        # its record is written, so a concurrent second upload is always caught.
        self._in_flight.add((r, client))
        try:
            refusal = await run_in_threadpool(self._refusal, r, client)
            if refusal is not None:
                raise HttpError(409, refusal)
            if self._upload_slots is None:
                self._upload_slots = asyncio.Semaphore(self.settings.max_concurrent_uploads)
            async with self._upload_slots:
                record = await self._receive(request, r, client, length, meta)
        finally:
            self._in_flight.discard((r, client))
            if self.training.get(client) == r:
                del self.training[client]
            self.uploads_ended += 1
        return JSONResponse(record, status_code=201)

    async def _receive(
        self, request: Request, r: int, client: str, length: int, meta: dict[str, Any]
    ) -> dict[str, Any]:
        """Read the body into place, check it, store it, record it."""
        nonce = uuid.uuid4().hex[:8]
        key = f"updates/{state.round_key(r)}/{client}-{nonce}"
        open_writer = getattr(self.svc.blobs, "open_writer", None)
        if open_writer is not None:
            # Straight into the blob's own file: these pages are what the aggregator's
            # leaf maps and adds (one copy off the socket, then one read).
            writer = await run_in_threadpool(open_writer, key, length)
            try:
                await receive_into(request.receive, writer.buffer, self.settings.body_timeout_s)
                self._validate(writer.buffer)
                await run_in_threadpool(writer.commit)
            except BaseException:
                writer.abort()
                raise
        else:  # a blob store elsewhere (S3): into node shared memory, then one upload
            lease = await run_in_threadpool(self.pool.lease, length)
            try:
                await receive_into(request.receive, lease.buffer, self.settings.body_timeout_s)
                self._validate(lease.buffer)
                await run_in_threadpool(self.svc.blobs.put, key, lease.buffer)
            finally:
                lease.release()
        return await run_in_threadpool(self._record, r, client, key, nonce, length, meta)

    def _validate(self, buffer: memoryview) -> None:
        try:
            params = decode(buffer, expect=self.layout)
        except LayoutError as exc:
            raise HttpError(422, str(exc)) from None
        except CodecError as exc:
            raise HttpError(400, f"update is not decodable: {exc}") from None
        try:
            for name in params:
                if (bad := _first_non_finite(params[name])) is not None:
                    raise HttpError(422, f"update tensor {name!r} holds {bad}: not stored")
        finally:
            del params  # a view of the lease: it must not outlive it

    def _record(
        self, r: int, client: str, blob: str, nonce: str, nbytes: int, meta: dict[str, Any]
    ) -> dict[str, Any]:
        model = self.svc.blobs.get(state.model_key(r - 1), verify=False)
        record = update_record(
            r,
            client,
            blob,
            num_examples=meta["num_examples"],
            bytes_up=nbytes,
            bytes_down=len(model),
            train_s=meta["train_s"],
            metrics=meta["metrics"],
        )
        key = state.update_key(r, client, nonce)
        self.svc.table.put(state.UPDATES, key, record)
        if meta["receipt"]:
            self.svc.bus.ack(state.client_queue(client), meta["receipt"])
        _log.info("gateway: update %s stored (%d bytes)", key, nbytes)
        return {"key": key, "blob": blob, "bytes": nbytes}
