"""Per-client credentials for ``strato serve``: issued, revoked, stored only as salted hashes.

A credential is a token ``NAME~SECRET``: ``NAME`` is the client it belongs to (the
gateway finds its record by name, so checking one costs one hash, not one per
client), ``SECRET`` 32 random bytes. What is stored of it is a salted scrypt hash,
never the token; a stolen store gives no token, and a guessed secret is 256 bits away.

Two places hold credentials:

- a **clients file** (``strato token issue NAME --clients-file F``; ``strato serve
  --clients-file F``): one credential per named client, made before the run; the
  gateway rereads the file when it changes, so ``strato token revoke NAME`` refuses that
  client at its next request;
- the run's **clients table**: with a shared enrolment token (``strato serve --token``),
  each registration gets its own credential, returned once; every later call of that
  client must carry it, so one holder of the shared token cannot act as another client.

A verified token is remembered in memory (keyed by a keyed hash of the token, so the
memory holds no token either) until the file changes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from strato.errors import ConfigError

__all__ = [
    "CLIENT_NAME",
    "ClientsFile",
    "TokenCache",
    "hash_secret",
    "issue_token",
    "new_token",
    "revoke_token",
    "split_token",
    "verify_secret",
]

CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_SEP = "~"  # neither in a client name nor in token_urlsafe's alphabet
# scrypt's cost: ~16 MiB and ~40 ms per check on these machines; a verified token is
# then cached, so a client pays it once per server, not per request.
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}


def new_token(name: str) -> str:
    if not CLIENT_NAME.fullmatch(name):
        raise ConfigError(
            f"bad client name {name!r}: 1-64 letters, digits, '.', '_' or '-' (not first)"
        )
    return f"{name}{_SEP}{secrets.token_urlsafe(32)}"


def split_token(token: str) -> tuple[str, str] | None:
    """``(name, secret)`` of a per-client token; None for anything else."""
    name, sep, secret = token.partition(_SEP)
    if not sep or not secret or not CLIENT_NAME.fullmatch(name):
        return None
    return name, secret


def hash_secret(token: str) -> dict[str, str]:
    """What is stored of a token: a random salt and the scrypt hash of the token."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(token.encode(), salt=salt, dklen=32, **_SCRYPT)
    return {"salt": salt.hex(), "scrypt": digest.hex()}


def verify_secret(token: str, stored: Mapping[str, Any]) -> bool:
    try:
        salt = bytes.fromhex(str(stored["salt"]))
        want = bytes.fromhex(str(stored["scrypt"]))
    except (KeyError, ValueError):
        return False
    got = hashlib.scrypt(token.encode(), salt=salt, dklen=32, **_SCRYPT)
    return hmac.compare_digest(got, want)


# --- the clients file -------------------------------------------------------------------


def _read(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {"version": 1, "clients": {}}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the clients file {path}: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("clients"), dict):
        raise ConfigError(f"{path} is not a clients file (strato token issue NAME writes one)")
    return doc


def _write(path: Path, doc: dict[str, Any]) -> None:
    """Atomically, readable by its owner only (it holds hashes, and who may join)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def issue_token(path: Path, name: str) -> str:
    """A new credential for ``name`` (replacing any earlier one): the token, shown once."""
    token = new_token(name)
    doc = _read(path)
    doc["clients"][name] = {**hash_secret(token), "issued_at": time.time()}
    _write(path, doc)
    return token


def revoke_token(path: Path, name: str) -> None:
    doc = _read(path)
    if name not in doc["clients"]:
        raise ConfigError(f"{path} has no client {name!r}")
    doc["clients"][name]["revoked_at"] = time.time()
    _write(path, doc)


@dataclass
class _Snapshot:
    stamp: tuple[int, int, int]
    clients: dict[str, Any]


class ClientsFile:
    """The clients file as the gateway sees it: reread whenever it changes on disk."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(
                f"no clients file at {self.path} (make one with: strato token issue NAME "
                f"--clients-file {self.path})"
            )
        self._lock = threading.Lock()
        self._snap = _Snapshot((-1, -1, -1), {})
        self.generation = 0  # bumped on every reread: cached verifications are dropped
        self.clients()

    def _stamp(self) -> tuple[int, int, int]:
        st = os.stat(self.path)
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def clients(self) -> dict[str, Any]:
        """The named clients and their records, as the file is now."""
        with self._lock:
            try:
                stamp = self._stamp()
            except OSError:
                stamp = (-1, -1, -1)
            if stamp != self._snap.stamp:
                clients = _read(self.path)["clients"] if stamp[0] >= 0 else {}
                self._snap = _Snapshot(stamp, clients)
                self.generation += 1
            return self._snap.clients

    def names(self) -> list[str]:
        return sorted(n for n, rec in self.clients().items() if not rec.get("revoked_at"))


class TokenCache:
    """Tokens already verified, by a keyed hash of the token (no token kept in memory)."""

    def __init__(self, limit: int = 100_000) -> None:
        self._key = secrets.token_bytes(32)
        self._known: dict[bytes, str] = {}
        self._limit = limit
        self._lock = threading.Lock()

    def _id(self, token: str) -> bytes:
        return hmac.new(self._key, token.encode(), "sha256").digest()

    def get(self, token: str) -> str | None:
        with self._lock:
            return self._known.get(self._id(token))

    def put(self, token: str, name: str) -> None:
        with self._lock:
            if len(self._known) >= self._limit:
                self._known.clear()
            self._known[self._id(token)] = name

    def forget(self, name: str | None = None) -> None:
        """Drop every cached verification (or those of ``name``)."""
        with self._lock:
            if name is None:
                self._known.clear()
            else:
                self._known = {k: v for k, v in self._known.items() if v != name}
