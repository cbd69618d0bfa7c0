"""What each benchmarked method puts on the wire, both ways, and how it aggregates.

Every method works through real payloads: the server encodes one download blob per
round (every selected client fetches it), each client decodes it, trains, encodes
its upload, and the server decodes the uploads. Byte counts are ``len(payload)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from strato import codec
from strato.params import Params
from strato.strategy.complement import (
    ComplementConfig,
    ComplementServer,
    decode_download,
    encode_download,
    encode_upload,
)
from strato.strategy.topk import TopKCompressor, apply_sparse_updates
from strato.wire import MAGIC, WireFormat, decode_values, encode_params, encode_values

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


@dataclass(frozen=True)
class Formats:
    """Wire formats of a CS run. The faithful CS uses the defaults (float32, no zstd)."""

    first_down: WireFormat | None = None  # None: dense safetensors
    first_up: WireFormat | None = None  # None: dense safetensors weights; else a coded delta
    down: WireFormat = field(default_factory=lambda: WireFormat(mask="bitmap"))
    up: WireFormat = field(default_factory=lambda: WireFormat(mask="shared"))


class Complement:
    """Complement Sparsification; ``Formats`` and ``kept_rate`` turn it into the combined mode."""

    def __init__(self, initial: Params, seed: int, sparsity: float = 0.5, eta: float = 1.5,
                 formats: Formats | None = None, kept_rate: float | None = None) -> None:
        self.seed = seed
        self.formats = formats or Formats()
        self.server = ComplementServer(initial, ComplementConfig(sparsity, eta, kept_rate))
        self.base = initial.copy()  # the exact model behind this round's download

    def download(self, rnd: int) -> bytes:
        f, server = self.formats, self.server
        if server.keep is None and f.first_down is None:
            payload = codec.encode(server.model).payload
        elif server.keep is None:
            payload = encode_params(server.model, None, f.first_down, _seed(self.seed, rnd)).payload
            # The server adopts exactly what its clients decode, so the first round's
            # deltas apply to the model they were computed from.
            server.model = decode_values(payload).to_params()
        else:
            payload = encode_download(server.model, f.down, _seed(self.seed, rnd)).payload
        self.base = server.model.copy()
        return payload

    def receive(self, payload: bytes) -> Received:
        return Received(decode_download(payload), sparse=self.server.keep is not None)

    def upload(self, client: int, rnd: int, got: Received, trained: Params) -> bytes:
        f, layout = self.formats, trained.layout
        seed = _seed(self.seed, rnd, client)
        first = not got.sparse
        if first and f.first_up is None:
            return codec.encode(trained).payload
        if first or self.server.config.kept_rate is not None:
            # a dense delta against what this client decoded
            fmt = f.first_up if first else f.up
            delta = trained.flat() - got.params.flat()
            return encode_values(layout, delta, None, fmt, seed).payload
        # faithful CS: the trained kernel values where the received model is zero, and biases
        return encode_upload(got.params, trained, f.up, seed).payload

    def aggregate(self, rnd: int, uploads: list[tuple[bytes, int]]) -> None:
        server, layout = self.server, self.server.model.layout
        rows = []
        for payload, n in uploads:
            if payload[:4] != MAGIC:
                values = codec.decode(payload, expect=layout).flat().copy()
            else:
                d = decode_values(payload, shared_mask=server.upload_mask(), expect=layout)
                values = d.values if d.mask is not None else self.base.flat() + d.values
            rows.append((values, float(n)))
        server.aggregate(rows)

    def model(self) -> Params:
        return self.server.model


def combined(initial: Params, seed: int, sparsity: float = 0.5, eta: float = 1.5,
             down: int = 4, up: int = 4, first: int = 8, zstd: int = 19,
             kept: float = 1.0) -> Complement:
    """The combined mode (docs/sparsity.md): CS's sparse download and η-regrowth, plus
    kept-weight updates (``kept`` = their rate; 0 = faithful CS uploads), per-layer
    4-bit quantization both ways, an implicit download mask, and zstd."""
    level = zstd or None
    return Complement(initial, seed, sparsity, eta, Formats(
        first_down=WireFormat(bits=first, zstd_level=level),
        first_up=WireFormat(bits=first, zstd_level=level),
        down=WireFormat(bits=down, mask="implicit", zstd_level=level) if down < 32
        else WireFormat(mask="bitmap", zstd_level=level),
        up=WireFormat(bits=up, mask="shared", zstd_level=level),
    ), kept_rate=kept or None)


Method = FedAvg | Complement

METHODS: dict[str, Callable[..., Method]] = {
    "fedavg": FedAvg,
    "topk": TopK,
    "cs50": lambda p, s, **kw: Complement(p, s, sparsity=0.5, **kw),
    "cs70": lambda p, s, **kw: Complement(p, s, sparsity=0.7, **kw),
    "cs90": lambda p, s, **kw: Complement(p, s, sparsity=0.9, **kw),
    "combined": combined,
}


def make_method(spec: str, initial: Params, seed: int, eta: float | None = None) -> Method:
    """``name`` or ``name:key=value,...`` (numbers only), e.g. ``combined:down=8,sparsity=0.7``.

    ``eta`` is the default aggregation rate of the CS-based methods (a spec may override it).
    """
    name, _, rest = spec.partition(":")
    if name not in METHODS:
        raise SystemExit(f"unknown method {name!r} (known: {', '.join(METHODS)})")
    kwargs: dict[str, float | int] = {}
    if eta is not None and (name.startswith("cs") or name == "combined"):
        kwargs["eta"] = eta
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        kwargs[key] = float(value) if "." in value else int(value)
    return METHODS[name](initial, seed, **kwargs)
