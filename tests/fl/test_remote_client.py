"""`strato client`'s loop through a server that stops and comes back (strato serve --resume)."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pytest

from strato.codec import encode
from strato.errors import StratoError
from strato.fl import remote
from strato.fl.remote import ClientOptions, ServerUnreachable
from strato.params import Params

MODEL = Params.from_arrays({"w": np.arange(6, dtype=np.float32).reshape(2, 3)})
NOTICE = {"status": "round", "round": 1, "receipt": "r1", "model": "/m", "upload": "/u"}


class _Trainer:
    def __init__(self, *args: Any) -> None:
        pass

    def train(self, r: int, params: Params) -> tuple[Params, dict[str, float], float]:
        return params, {}, 0.0


class _Server:
    """Answers polls and uploads from scripts: a value is returned, an exception raised."""

    def __init__(self, polls: list[Any], uploads: list[Any]) -> None:
        self.polls, self.uploads, self.sent = polls, uploads, []

    def next_notice(self, client: str, wait_s: float) -> dict[str, Any]:
        return self._next(self.polls)

    def download(self, path: str) -> bytearray:
        return bytearray(encode(MODEL).payload)

    def upload(self, path: str, payload: bytes, headers: dict[str, str]) -> httpx.Response:
        self.sent.append(headers["X-Strato-Receipt"])
        return self._next(self.uploads)  # type: ignore[no-any-return]

    def check(self, resp: httpx.Response, what: str) -> httpx.Response:
        assert resp.status_code == 201
        return resp

    @staticmethod
    def _next(script: list[Any]) -> Any:
        answer = script.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def _loop(server: _Server, reconnect_s: float, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(remote, "LocalTrainer", _Trainer)
    monkeypatch.setattr(remote.time, "sleep", lambda s: None)
    opts = ClientOptions(server="http://127.0.0.1:1", token="t", app_dir=".",
                         reconnect_s=reconnect_s)  # fmt: skip
    reg = {"config": {}, "layout": MODEL.layout.to_json()}
    return remote._loop(server, None, [], "edge-0", reg, opts)  # type: ignore[arg-type]


def test_a_client_waits_through_a_server_restart_and_sends_its_update_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    away = ServerUnreachable("down")
    server = _Server(
        polls=[{"status": "closing"}, away, away, NOTICE, {"status": "finished"}],
        uploads=[away, away, httpx.Response(201)],
    )
    assert _loop(server, 30.0, monkeypatch) == 1  # trained the round once
    assert server.sent == ["r1", "r1", "r1"]  # the update was sent until the server took it
    assert server.polls == [] and server.uploads == []


def test_a_client_gives_up_on_a_server_that_stays_away(monkeypatch: pytest.MonkeyPatch) -> None:
    server = _Server(polls=[{"status": "closing"}] * 5, uploads=[])
    with pytest.raises(StratoError, match="the server stopped before the job finished"):
        _loop(server, 0.0, monkeypatch)
