"""The client SDK: wait for a round notice, fetch the model, train, upload the update.

A client owns one queue subscribed to the ``global-model-ready`` topic. Each notice
names a round and the model's blob key; the client trains on its own data and
uploads its update and then its metadata record, whose arrival in the table's
stream is what wakes the aggregator. The notice is acknowledged only after the
upload, so a client that dies mid-round gets the notice again (at-least-once); a
second upload for the same round is refused by the aggregator as a duplicate.

Under Complement Sparsification (``--strategy cs``) a client fetches, from round 2
on, the sparse model (``fl.strategies.download_key``) instead of the dense blob and
uploads only its complement and biases (``strategy.complement.encode_upload``); the
byte counts in its update record are those payloads' lengths. The run's CS options
choose the formats (``strategy.complement_wire``): with ``bits`` < 32 the download is
quantized (also in round 1) and the upload is a quantized delta against what the
client decoded, or its quantized complement; stochastic rounding is seeded from
(run seed, round, client).
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from strato.codec import decode, encode
from strato.control.asynchronous import speed_factor
from strato.fl import state
from strato.fl.app import App, Dataset, TrainContext
from strato.fl.strategies import complement_options, download_key, is_complement, wire_seed
from strato.params import Params
from strato.services import Services
from strato.strategy.complement import decode_download

__all__ = ["LocalTrainer", "RoundNotice", "SimClient", "client_seed", "update_record"]


@dataclass(frozen=True)
class RoundNotice:
    round: int
    model_key: str
    receipt: str


def client_seed(seed: int, round_: int, client: str) -> int:
    digest = hashlib.sha256(f"{seed}/{round_}/{client}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


class LocalTrainer:
    """Trains the app's model on one client's data, starting from a received global model.

    Shared by the simulated client and the remote one (``strato client``), so both
    train with the same seed, config and FedProx anchor.
    """

    def __init__(self, app: App, data: Dataset, client: str, config: dict[str, Any]) -> None:
        self.app, self.data, self.client, self.config = app, data, client, config
        self._model: Any = None

    def train(self, round_: int, params: Params) -> tuple[Params, dict[str, float], float]:
        """(the trained parameters, the app's metrics, training seconds)."""
        from strato.fl.torch import load_params, model_params

        if self._model is None:
            assert self.app.model_fn is not None
            self._model = self.app.model_fn(self.data.info)
        load_params(self._model, params)
        cfg = self.config
        mu = float(cfg.get("strategy_options", {}).get("mu", 0.0))
        ctx = TrainContext(
            round=round_,
            client=self.client,
            seed=client_seed(int(cfg["seed"]), round_, self.client),
            config=dict(cfg.get("train", {})),
            global_model=copy.deepcopy(self._model) if mu > 0 else None,
            proximal_mu=mu,
        )
        started = time.perf_counter()
        assert self.app.train_fn is not None
        metrics = self.app.train_fn(self._model, self.data, ctx) or {}
        train_s = time.perf_counter() - started
        return model_params(self._model), {k: float(v) for k, v in metrics.items()}, train_s


def update_record(
    round_: int,
    client: str,
    blob: str,
    *,
    num_examples: int,
    bytes_up: int,
    bytes_down: int,
    train_s: float,
    metrics: dict[str, float],
) -> dict[str, Any]:
    """The ``updates`` table record whose arrival wakes the aggregator."""
    return {
        "round": round_,
        "client": client,
        "blob": blob,
        "num_examples": num_examples,
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
        "train_s": round(train_s, 4),
        "uploaded_at": time.time(),
        "metrics": {k: float(v) for k, v in metrics.items()},
    }


class SimClient:
    """A client that talks to the services directly (simulation and the gateway's side)."""

    def __init__(self, svc: Services, client: str, app: App, data: Dataset, job: dict[str, Any]):
        self.svc, self.client, self.app, self.data, self.job = svc, client, app, data, job
        self.queue = state.client_queue(client)
        self.trainer = LocalTrainer(app, data, client, job["config"])
        cfg = job["config"]
        # CS: the run's wire formats, the same every round
        self.wire = (complement_options(cfg["strategy_options"], cfg["strategy"]).wire
                     if is_complement(cfg["strategy"]) else None)

    def next_notice(self, wait_s: float, visibility_timeout_s: float = 30.0) -> RoundNotice | None:
        for msg in self.svc.bus.receive(self.queue, 1, wait_s, visibility_timeout_s):
            body = json.loads(msg.body)
            return RoundNotice(int(body["round"]), str(body["model_key"]), msg.receipt)
        return None

    def already_uploaded(self, r: int) -> bool:
        return bool(self.svc.table.query(state.UPDATES, f"{state.round_key(r)}/{self.client}/"))

    def train_round(self, notice: RoundNotice) -> dict[str, Any]:
        """Train on the notice's model, upload the update, then acknowledge the notice."""
        if self.already_uploaded(notice.round):
            self.svc.bus.ack(self.queue, notice.receipt)
            return {"round": notice.round, "skipped": "already uploaded"}
        wire, first = self.wire, notice.round == 1
        if wire is not None and wire.fetches_download(first):
            # CS: the coded download (the sparse model after round 1)
            payload = self.svc.blobs.get(download_key(notice.model_key))
            received = decode_download(payload)
        else:
            payload = self.svc.blobs.get(notice.model_key)
            received = decode(payload)
        update, metrics, train_s = self.trainer.train(notice.round, received)
        cfg = self.job["config"]
        if cfg.get("speed"):  # simulated heterogeneity: a slow client takes longer
            time.sleep(train_s * speed_factor(str(cfg["speed"]), int(cfg["seed"]), self.client))
        if wire is None:
            encoded = encode(update)
        else:  # CS: the complement, or a delta against what this client decoded
            seed = wire_seed(int(self.job["config"]["seed"]), notice.round, self.client)
            encoded = wire.encode_upload(received, update, first, seed)
        nonce = uuid.uuid4().hex[:8]
        blob = self.svc.blobs.put(
            f"updates/{state.round_key(notice.round)}/{self.client}-{nonce}", encoded.payload
        )
        record = update_record(
            notice.round,
            self.client,
            blob,
            num_examples=len(self.data),
            bytes_up=encoded.nbytes,
            bytes_down=len(payload),
            train_s=train_s,
            metrics=metrics,
        )
        self.svc.table.put(
            state.UPDATES, state.update_key(notice.round, self.client, nonce), record
        )
        self.svc.bus.ack(self.queue, notice.receipt)
        return record
