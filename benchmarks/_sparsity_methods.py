"""What each benchmarked method puts on the wire, both ways, and how it aggregates.

Every method works through real payloads: the server encodes one download blob per
round (every selected client fetches it), each client decodes it, trains, encodes
its upload, and the server decodes the uploads. Byte counts are ``len(payload)``.
``client_model(rnd)`` is the model the clients decode from the download that follows
round ``rnd``: accuracy is scored on it, not on the server's float32 record.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from _complement_server import ComplementServer
from _topk import TopKCompressor, apply_sparse_updates
from strato import codec
from strato.codec import WireFormat, decode_values, encode_params, encode_values
from strato.params import Params
from strato.strategy.complement import ComplementConfig, decode_download
from strato.strategy.complement_wire import ComplementWire

Mask = npt.NDArray[np.bool_]


@dataclass
class Received:
    """What a client holds after decoding the download."""

    params: Params
    sparse: bool = False  # CS: the download was the pruned model (not the dense round 1)


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


def _weighted_mean(rows: list[tuple[npt.NDArray[np.float32], int]]) -> npt.NDArray[np.float32]:
    total = np.zeros(rows[0][0].size, np.float64)
    for values, n in rows:
        total += n * values.astype(np.float64)
    return (total / sum(n for _, n in rows)).astype(np.float32)


class FedAvg:
    """Dense float32 safetensors both ways; example-weighted mean."""

    def __init__(self, initial: Params, seed: int) -> None:
        self.global_model = initial.copy()

    def download(self, rnd: int) -> bytes:
        return codec.encode(self.global_model).payload

    def receive(self, payload: bytes) -> Received:
        return Received(codec.decode(payload).copy())

    def upload(self, client: int, rnd: int, got: Received, trained: Params) -> bytes:
        return codec.encode(trained).payload

    def aggregate(self, rnd: int, uploads: list[tuple[bytes, int]]) -> None:
        rows = [(codec.decode(p, expect=self.global_model.layout).flat(), n) for p, n in uploads]
        self.global_model.flat()[:] = _weighted_mean(rows)

    def model(self) -> Params:
        return self.global_model

    def client_model(self, rnd: int) -> Params:
        return self.global_model  # the dense download is lossless


class QuantizedFedAvg(FedAvg):
    """FedAvg with per-layer ``bits``-bit quantization (stochastic rounding) and zstd
    both ways, through the same codec as the combined mode: the download is the
    quantized global model, the upload the quantized delta against what the client
    decoded; the server adds the mean delta to that decoded model (its float32 record
    keeps no error the clients do not see)."""

    def __init__(self, initial: Params, seed: int, bits: int = 4, zstd: int = 19) -> None:
        super().__init__(initial, seed)
        self.seed, self.fmt = seed, WireFormat(bits=bits, zstd_level=zstd or None)
        self.base = initial.copy()

    def _encode_model(self, rnd: int) -> bytes:
        return encode_params(self.global_model, None, self.fmt, _seed(self.seed, rnd)).payload

    def download(self, rnd: int) -> bytes:
        payload = self._encode_model(rnd)
        self.base = self.receive(payload).params  # the server adopts what clients decode
        return payload

    def receive(self, payload: bytes) -> Received:
        return Received(decode_values(payload, expect=self.global_model.layout).to_params())

    def upload(self, client: int, rnd: int, got: Received, trained: Params) -> bytes:
        delta = trained.flat("F32") - got.params.flat("F32")
        return encode_values(trained.layout, delta, None, self.fmt,
                             _seed(self.seed, rnd, client)).payload

    def aggregate(self, rnd: int, uploads: list[tuple[bytes, int]]) -> None:
        rows = [(decode_values(p, expect=self.global_model.layout).values, n) for p, n in uploads]
        self.global_model.flat()[:] = self.base.flat("F32") + _weighted_mean(rows)

    def client_model(self, rnd: int) -> Params:
        return self.receive(self._encode_model(rnd + 1)).params


class TopK(FedAvg):
    """Dense download; upload the top-k of (update + residual) with a bitmap."""

    def __init__(self, initial: Params, seed: int, density: float = 0.1) -> None:
        super().__init__(initial, seed)
        self.density = density
        self.clients: dict[int, TopKCompressor] = {}

    def upload(self, client: int, rnd: int, got: Received, trained: Params) -> bytes:
        comp = self.clients.setdefault(client, TopKCompressor(trained.layout, self.density))
        mask, values = comp.compress(trained.flat() - got.params.flat())
        return encode_values(trained.layout, values, mask, WireFormat(mask="bitmap")).payload

    def aggregate(self, rnd: int, uploads: list[tuple[bytes, int]]) -> None:
        rows = []
        for payload, n in uploads:
            d = decode_values(payload, expect=self.global_model.layout)
            assert d.mask is not None
            rows.append((d.mask, d.values, float(n)))
        self.global_model = apply_sparse_updates(self.global_model, rows)


class Complement:
    """Complement Sparsification; a ``ComplementWire`` and ``kept_rate`` turn it into the
    combined mode. The wire formats and their encode/decode are the library's, the same
    code ``strato run --strategy cs`` uses."""

    def __init__(self, initial: Params, seed: int, sparsity: float = 0.5, eta: float = 1.5,
                 wire: ComplementWire | None = None, kept_rate: float | None = None) -> None:
        self.seed = seed
        self.wire = wire or ComplementWire()
        self.server = ComplementServer(initial, ComplementConfig(sparsity, eta, kept_rate))
        self.base = initial.copy()  # the exact model behind this round's download

    def download(self, rnd: int) -> bytes:
        server, seed = self.server, _seed(self.seed, rnd)
        first = server.keep is None
        if first and self.wire.lossy_first:
            # The server adopts exactly what its clients decode, so the first round's
            # deltas apply to the model they were computed from.
            server.model, payload = self.wire.adopt(server.model, seed)
        else:
            payload = self.wire.encode_download(server.model, first, seed).payload
        self.base = server.model.copy()
        return payload

    def receive(self, payload: bytes) -> Received:
        return Received(decode_download(payload), sparse=self.server.keep is not None)

    def upload(self, client: int, rnd: int, got: Received, trained: Params) -> bytes:
        seed = _seed(self.seed, rnd, client)
        return self.wire.encode_upload(got.params, trained, not got.sparse, seed).payload

    def aggregate(self, rnd: int, uploads: list[tuple[bytes, int]]) -> None:
        server = self.server
        first, mask = server.keep is None, server.upload_mask()
        rows = []
        for payload, n in uploads:
            values = self.wire.decode_upload(payload, self.base, first)  # full length
            rows.append((values if mask is None else values[mask], float(n)))
        server.aggregate(rows)

    def model(self) -> Params:
        return self.server.model

    def client_model(self, rnd: int) -> Params:
        first = self.server.keep is None  # no round has aggregated yet
        payload = self.wire.encode_download(self.server.model, first, _seed(self.seed, rnd + 1))
        return decode_download(payload.payload)


def combined(initial: Params, seed: int, sparsity: float = 0.5, eta: float = 1.5,
             down: int = 4, up: int = 4, first: int = 8, zstd: int = 19,
             kept: float = 1.0) -> Complement:
    """The combined mode (docs/sparsity.md): CS's sparse download and η-regrowth, plus
    kept-weight updates (``kept`` = their rate; 0 = faithful CS uploads), per-layer
    4-bit quantization both ways, an implicit download mask, and zstd."""
    level = zstd or None
    return Complement(initial, seed, sparsity, eta, ComplementWire(
        first_down=WireFormat(bits=first, zstd_level=level),
        first_up=WireFormat(bits=first, zstd_level=level),
        down=WireFormat(bits=down, mask="implicit", zstd_level=level) if down < 32
        else WireFormat(mask="bitmap", zstd_level=level),
        up=WireFormat(bits=up, mask="shared", zstd_level=level),
        deltas=bool(kept),
    ), kept_rate=kept or None)


Method = FedAvg | QuantizedFedAvg | Complement

METHODS: dict[str, Callable[..., Method]] = {
    "fedavg": FedAvg,
    "fedavg_q8": lambda p, s, **kw: QuantizedFedAvg(p, s, **{"bits": 8, **kw}),
    "fedavg_q4": lambda p, s, **kw: QuantizedFedAvg(p, s, **{"bits": 4, **kw}),
    "topk": TopK,
    "cs50": lambda p, s, **kw: Complement(p, s, sparsity=0.5, **kw),
    "cs70": lambda p, s, **kw: Complement(p, s, sparsity=0.7, **kw),
    "cs90": lambda p, s, **kw: Complement(p, s, sparsity=0.9, **kw),
    "combined": combined,
}


def make_method(spec: str, initial: Params, seed: int, eta: float | None = None) -> Method:
    """``name`` or ``name:key=value,...`` (numbers only), e.g. ``combined:down=8,sparsity=0.7``.

    ``eta`` is the aggregation rate of the faithful CS methods (``cs50`` ...; a spec may
    override it). The combined mode keeps its own default, 1.5, unless its spec sets one.
    """
    name, _, rest = spec.partition(":")
    if name not in METHODS:
        raise SystemExit(f"unknown method {name!r} (known: {', '.join(METHODS)})")
    kwargs: dict[str, float | int] = {}
    if eta is not None and name.startswith("cs"):
        kwargs["eta"] = eta
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        kwargs[key] = float(value) if "." in value else int(value)
    return METHODS[name](initial, seed, **kwargs)
