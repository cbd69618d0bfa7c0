"""``strato client``: a client that joins a ``strato serve`` run over HTTP.

It registers with its token, then loops: long-poll for a round notice, stream the
round's model down, train with the app's train function on its own data, stream the
update up (Content-Length known, body sent in slices of the encoded payload), until
the server says the job is finished.

Its data: the client loads the dataset itself (``--data-dir``, ``$STRATO_DATA_DIR``,
else scikit-learn's digits, as the server does) and takes the partition the server
assigned at registration (or ``--partition-index I``), recomputed locally with the
job's partitioner and seed, the very function the server used, so both agree on
the rows without any data crossing the network. The server's dataset name and
partition sizes are checked against the local ones.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from strato.codec import decode, encode
from strato.errors import ConfigError, StratoError
from strato.fl.app import App, DataInfo, Dataset, load_app
from strato.fl.client import LocalTrainer
from strato.params import Layout

__all__ = ["ClientOptions", "RemoteClient", "ServerUnreachable", "check_server_url", "run_client"]

API = "/v1"
_UPLOAD_SLICE = 1 << 20
_FULL_RETRY_S = (2.0, 4.0, 8.0, 16.0)  # waits before sending an update the server had no room for


@dataclass(frozen=True)
class ClientOptions:
    server: str
    token: str
    app_dir: str
    data_dir: str | None = None
    client_id: str | None = None
    rounds_max: int | None = None
    partition_index: int | None = None
    wait_s: float = 20.0  # one long poll
    reconnect_s: float = 30.0  # how long to keep retrying a server that went away
    ca_file: str | None = None  # the CA that signed an https server's certificate
    # torch's threads: one, as a simulated client has, so that several clients on one
    # machine do not fight over its cores (a client alone on a machine may take more)
    threads: int = 1


def check_server_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"bad server URL {url!r}: expected http://HOST:PORT")
    try:
        parts.port  # noqa: B018 -- raises ValueError on a malformed port
    except ValueError:
        raise ConfigError(f"bad server URL {url!r}: the port is not a number") from None
    return url.rstrip("/")


def _error_text(resp: httpx.Response) -> str:
    try:
        return str(resp.json()["error"])
    except (ValueError, KeyError, TypeError):
        return resp.text.strip()[:200] or resp.reason_phrase


class ServerUnreachable(StratoError):
    """The server cannot be reached (down, restarting, or the URL is wrong)."""


class RemoteClient:
    """The gateway's HTTP API, one method per endpoint; failures are one-line StratoErrors."""

    def __init__(
        self, server: str, token: str, *, wait_s: float = 20.0, ca_file: str | None = None
    ) -> None:
        self.server = check_server_url(server)
        verify: ssl.SSLContext | bool = True
        if ca_file is not None:
            try:
                verify = ssl.create_default_context(cafile=ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"cannot load the CA file {ca_file}: {exc}") from None
        self.http = httpx.Client(
            base_url=self.server,
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(60.0, read=wait_s + 60.0),
            verify=verify,
        )

    def use_token(self, token: str) -> None:
        """From now on, act with this token (the client's own, given at registration)."""
        self.http.headers["Authorization"] = f"Bearer {token}"

    def close(self) -> None:
        self.http.close()

    def check(self, resp: httpx.Response, what: str) -> httpx.Response:
        if resp.status_code == 401:
            raise StratoError("invalid token (the server refused it)")
        if resp.status_code >= 400:
            status = resp.status_code
            raise StratoError(f"{what}: the server answered {status}: {_error_text(resp)}")
        return resp

    def _send(self, method: str, path: str, what: str, **kw: Any) -> httpx.Response:
        try:
            return self.check(self.http.request(method, path, **kw), what)
        except httpx.ConnectError as exc:
            if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                raise StratoError(
                    f"the server at {self.server} is not who it claims to be: {exc} "
                    "(give the CA that signed its certificate with --ca-file)"
                ) from None
            raise ServerUnreachable(f"cannot reach the server at {self.server}: {exc}") from None
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"cannot reach the server at {self.server}: {exc}") from None

    def register(self, client_id: str | None) -> dict[str, Any]:
        resp = self._send("POST", f"{API}/clients", "register", json={"client_id": client_id})
        return dict(resp.json())

    def next_notice(self, client: str, wait_s: float) -> dict[str, Any]:
        resp = self._send(
            "GET", f"{API}/clients/{client}/notice", "poll", params={"wait_s": wait_s}
        )
        return dict(resp.json())

    def download(self, path: str) -> bytearray:
        """The model, streamed into one buffer sized from Content-Length up front."""
        try:
            with self.http.stream("GET", path) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    self.check(resp, "model download")
                size = int(resp.headers.get("content-length", "-1"))
                if size < 0:
                    raise StratoError("model download: the server sent no Content-Length")
                buf, offset = bytearray(size), 0
                for chunk in resp.iter_raw():
                    end = offset + len(chunk)
                    if end > size:
                        raise StratoError("model download: more bytes than announced")
                    buf[offset:end] = chunk
                    offset = end
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"model download from {self.server} failed: {exc}") from None
        if offset != size:
            raise StratoError(f"model download truncated: {offset} of {size} bytes")
        return buf

    def upload(self, path: str, payload: bytes, headers: dict[str, str]) -> httpx.Response:
        def body() -> Iterator[bytes]:
            view = memoryview(payload)
            for start in range(0, len(view), _UPLOAD_SLICE):
                yield bytes(view[start : start + _UPLOAD_SLICE])

        # An explicit Content-Length makes httpx stream the iterator as-is (not chunked).
        headers = {**headers, "Content-Length": str(len(payload))}
        try:
            return self.http.put(path, content=body(), headers=headers)
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"upload to {self.server} failed: {exc}") from None


def _local_data(reg: dict[str, Any], opts: ClientOptions) -> Dataset:
    from strato.data import load_dataset, partition

    ds = load_dataset(opts.data_dir)
    if ds.name != reg["dataset"]:
        raise ConfigError(
            f"the server trains on {reg['dataset']} but this client loaded {ds.name} "
            "(give --data-dir or set STRATO_DATA_DIR like the server)"
        )
    count = int(reg["num_partitions"])
    index = int(reg["partition_index"] if opts.partition_index is None else opts.partition_index)
    if not 0 <= index < count:
        raise ConfigError(f"--partition-index must be in [0, {count}), got {index}")
    parts = partition(
        ds.train_y, count, reg["partition"], seed=int(reg["seed"]), alpha=reg["dirichlet_alpha"]
    )
    idx = parts[index]
    if len(idx) != int(reg["partition_sizes"][index]):
        raise ConfigError(
            f"partition {index} holds {len(idx)} examples here but {reg['partition_sizes'][index]}"
            " on the server: the client's dataset differs from the server's"
        )
    info = DataInfo(ds.name, ds.input_shape, int(ds.num_classes))
    return Dataset(ds.train_x[idx], ds.train_y[idx], info)


def _say(text: str) -> None:
    print(text, flush=True)


def _limit_threads(threads: int) -> None:
    """Before the app loads torch, its thread pools' size; after, torch's own setting."""
    if threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {threads}")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)


def run_client(opts: ClientOptions) -> int:
    """Take part in rounds until the job is finished (or ``rounds_max`` rounds trained)."""
    check_server_url(opts.server)
    _limit_threads(opts.threads)
    app = load_app(opts.app_dir)  # a broken app fails here, before the server counts on us
    _limit_threads(opts.threads)
    api = RemoteClient(opts.server, opts.token, wait_s=opts.wait_s, ca_file=opts.ca_file)
    try:
        reg = api.register(opts.client_id)
        client = str(reg["client"])
        if "token" in reg:  # enrolled with a shared token: from now on, act as ourselves
            api.use_token(str(reg.pop("token")))
        data = _local_data(reg, opts)
        index = reg["partition_index"] if opts.partition_index is None else opts.partition_index
        _say(
            f"client {client}: registered with {api.server}; partition {index} "
            f"of {reg['num_partitions']} ({len(data)} {reg['dataset']} examples)"
        )
        trained = _loop(api, app, data, client, reg, opts)
        _say(f"client {client}: done after training {trained} round(s)")
        return 0
    finally:
        api.close()


class _Away:
    """How long the server has been away: it may come back on the same address
    (``strato serve --resume``), so a client waits ``limit_s`` before giving up."""

    def __init__(self, limit_s: float) -> None:
        self.limit_s, self.since = limit_s, 0.0

    def wait(self) -> bool:
        """Sleep a second; False (without sleeping) once it has been away too long."""
        now = time.monotonic()
        self.since = self.since or now
        if now - self.since > self.limit_s:
            return False
        time.sleep(1.0)
        return True

    def back(self) -> None:
        self.since = 0.0


def _loop(
    api: RemoteClient,
    app: App,
    data: Dataset,
    client: str,
    reg: dict[str, Any],
    opts: ClientOptions,
) -> int:
    trainer = LocalTrainer(app, data, client, reg["config"])
    layout = Layout.from_json(reg["layout"])
    trained, away = 0, _Away(opts.reconnect_s)
    while opts.rounds_max is None or trained < opts.rounds_max:
        try:
            notice = api.next_notice(client, opts.wait_s)
        except ServerUnreachable:
            notice = {"status": "unreachable"}
        status = notice.get("status")
        if status in ("closing", "unreachable"):
            # The server stopped or went away; it may be resumed (strato serve --resume)
            # on the same address: wait for it a while before giving up.
            if not away.since:
                _say(f"client {client}: the server "
                     + ("stopped" if status == "closing" else "cannot be reached")
                     + f"; waiting up to {opts.reconnect_s:.0f} s for it to come back")
            if not away.wait():
                raise StratoError("the server stopped before the job finished")
            continue
        away.back()
        if status == "finished":
            _say(f"client {client}: the job is finished")
            break
        if status != "round":
            continue
        try:
            _train_and_upload(api, trainer, layout, client, notice, data, opts.reconnect_s)
        except ServerUnreachable:  # gone longer than we wait: back to polling, which waits
            continue
        trained += 1
    return trained


def _train_and_upload(
    api: RemoteClient,
    trainer: LocalTrainer,
    layout: Layout,
    client: str,
    notice: dict[str, Any],
    data: Dataset,
    reconnect_s: float,
) -> None:
    r = int(notice["round"])
    payload = api.download(str(notice["model"]))
    update, metrics, train_s = trainer.train(r, decode(payload, expect=layout))
    encoded = encode(update)
    headers = {
        "X-Strato-Receipt": str(notice["receipt"]),
        "X-Strato-Num-Examples": str(len(data)),
        "X-Strato-Train-S": f"{train_s:.4f}",
        "X-Strato-Metrics": json.dumps(metrics),
    }
    def send() -> httpx.Response:
        # A server restarting (strato serve --resume) keeps the round and this notice's
        # receipt: the update is sent again once it is back, rather than lost.
        away = _Away(reconnect_s)
        while True:
            try:
                return api.upload(str(notice["upload"]), encoded.payload, headers)
            except ServerUnreachable:
                if not away.wait():
                    raise

    resp = send()
    for wait in _FULL_RETRY_S:  # the server's disk or memory is full: room may come back
        if resp.status_code not in (503, 507):
            break
        _say(f"client {client}: round {r}: the server is full ({_error_text(resp)}); "
             f"sending again in {wait:.0f} s")  # fmt: skip
        time.sleep(wait)
        resp = send()
    if resp.status_code == 409:  # the round closed meanwhile, or a retried upload landed
        _say(f"client {client}: round {r}: update not taken: {_error_text(resp)}")
        return
    api.check(resp, f"round {r} upload")
    shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    _say(
        f"client {client}: round {r}: trained on {len(data)} examples in {train_s:.1f} s, "
        f"sent {encoded.nbytes / 1024:.1f} KB" + (f" ({shown})" if shown else "")
    )
