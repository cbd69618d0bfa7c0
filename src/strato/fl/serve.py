"""``strato serve``: a run whose clients are remote, with the HTTP gateway inside it.

The gateway (uvicorn serving ``Gateway.asgi()``) runs in a thread of the run
process, started through ``RunOptions.attach`` once the run's services are set up
and *before* the round loop starts: ``attach`` returns only when ``min_clients``
clients have registered, so round 1 always has clients to select from (rounds
select among the registered clients; one who registers later joins later rounds).

On stop, a finished job keeps the gateway up for a short grace period until every
registered client has heard "finished" from its long poll, so clients exit cleanly
instead of finding the server gone.
"""

from __future__ import annotations

import ctypes
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from strato.errors import ConfigError, StratoError
from strato.fl import state
from strato.fl.gateway import Gateway, GatewaySettings
from strato.services import Services

__all__ = ["GatewayServer", "ServeOptions", "gateway_attach", "listen", "load_tokens"]


@dataclass(frozen=True)
class ServeOptions:
    tokens: tuple[str, ...]  # shared enrolment tokens (may be empty with a clients file)
    sock: socket.socket  # from listen(host, port)
    clients_file: Path | None = None  # per-client credentials (strato token issue)
    tls: tuple[str, str] | None = None  # (certificate file, key file): serve HTTPS
    min_clients: int = 1
    max_upload_bytes: int | None = None
    body_timeout_s: float = 60.0
    finish_grace_s: float = 10.0


def load_tokens(
    tokens: list[str] | None, tokens_file: str | None, *, required: bool = True
) -> tuple[str, ...]:
    """Tokens from ``--token`` and from a file (one per line, ``#`` comments)."""
    found = [t.strip() for t in tokens or []]
    if tokens_file is not None:
        try:
            text = Path(tokens_file).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read tokens file {tokens_file}: {exc.strerror}") from None
        found += [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    if not found and required:
        raise ConfigError(
            "give the clients' credentials (--clients-file F, made with `strato token issue "
            "NAME --clients-file F`) or a shared enrolment token (--token T, --tokens-file F)"
        )
    for t in found:
        if not t or not t.isascii() or not t.isprintable() or " " in t:
            raise ConfigError("a token must be printable ASCII without spaces")
    return tuple(dict.fromkeys(found))


_M_ARENA_MAX = -8  # glibc's mallopt parameter


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas for this process (True when it could).

    glibc gives each thread that allocates under contention an arena of its own, up to
    8 per core, and keeps them: under the fuzz benchmark the gateway's threads made the
    server grow by 245 MB before it levelled off, and by 100 MB with two arenas
    (``docs/reliability.md``). Call before the threads start."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_ARENA_MAX, arenas))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt): nothing to cap
        return False


def listen(host: str, port: int) -> socket.socket:
    """The gateway's listening socket, bound before anything else is set up (a port in
    use fails at once; port 0 picks a free one whose number is then known)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=512)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


class GatewayServer:
    """uvicorn serving a gateway in a background thread, on an already bound socket."""

    def __init__(
        self, gateway: Gateway, sock: socket.socket, tls: tuple[str, str] | None = None
    ) -> None:
        import uvicorn

        self.sock = sock
        self.gateway = gateway
        self.tls = tls
        host, port = sock.getsockname()[:2]
        self.host, self.port = str(host), int(port)
        cert, key = tls or (None, None)
        for what, path in (("certificate", cert), ("key", key)):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"no TLS {what} file at {path}")
        config = uvicorn.Config(
            gateway.asgi(),
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
            ssl_certfile=cert,
            ssl_keyfile=key,
        )
        if tls is not None:
            try:
                config.load()  # a certificate that does not load fails here, by name
            except (OSError, ValueError) as exc:
                raise ConfigError(
                    f"cannot load the TLS certificate {cert} and key {key}: {exc}"
                ) from None
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, name="gateway", daemon=True
        )

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def start(self, timeout_s: float = 30.0) -> GatewayServer:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise StratoError(f"the gateway did not start on {self.url}")
            time.sleep(0.01)
        return self

    def stop(self, grace_s: float = 0.0) -> None:
        """Stop serving; with a grace period, first let clients hear that the job finished.

        A client still training a round when the job ends is waited for up to the round
        deadline (its upload is refused, then its poll hears "finished"), so it ends
        cleanly instead of finding the server gone."""
        gateway = self.gateway
        now = time.monotonic()
        deadline = now + grace_s
        training_deadline = now + max(grace_s, float(gateway.config["round_deadline_s"]))
        if grace_s > 0 and gateway.finished():
            registered = {i.key for i in gateway.svc.table.query(state.CLIENTS)}
            while not registered <= set(gateway.told_finished):
                now = time.monotonic()
                if now > training_deadline or (now > deadline and not gateway.training):
                    break
                time.sleep(0.05)
        gateway.closing.set()
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()
        gateway.close()


def wait_for_clients(svc: Services, count: int, say: Callable[[str], None]) -> None:
    seen = -1
    while True:
        have = len(svc.table.query(state.CLIENTS))
        if have >= count:
            say(f"gateway: {have} client(s) registered; starting")
            return
        if have != seen:
            say(f"gateway: waiting for {count - have} more client(s) to register ({have} so far)")
            seen = have
        time.sleep(0.2)


def gateway_attach(opts: ServeOptions) -> Callable[[Services], Callable[[], None]]:
    """The ``RunOptions.attach`` of ``strato serve``: start the gateway, wait for clients."""

    def say(text: str) -> None:
        print(text, flush=True)

    def attach(svc: Services) -> Callable[[], None]:
        settings = GatewaySettings(
            tokens=opts.tokens,
            clients_file=opts.clients_file,
            max_upload_bytes=opts.max_upload_bytes,
            body_timeout_s=opts.body_timeout_s,
        )
        gateway = Gateway(svc, settings)
        try:
            server = GatewayServer(gateway, opts.sock, opts.tls).start()
        except BaseException:
            gateway.close()
            raise
        how = "--token-file FILE" if opts.clients_file else "--token-file FILE (shared token)"
        ca = " --ca-file CA.pem" if opts.tls else ""
        say(
            f"gateway: serving {server.url} (clients join with: "
            f"strato client --server {server.url} {how}{ca} APP_DIR)"
        )
        try:
            wait_for_clients(svc, opts.min_clients, say)
        except BaseException:  # Ctrl-C while waiting: the gateway goes with the run
            server.stop()
            raise
        return lambda: server.stop(opts.finish_grace_s)

    return attach
