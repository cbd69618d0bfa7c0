"""The local front of an AWS emulator: ``python -m strato.backends.aws.emulator._front``.

An HTTP server on 127.0.0.1 that every client (and moto's own Step Functions, through
``MOTO_PORT``) talks to instead of moto. It passes each request through to moto,
except where moto falls short of what AWS guarantees:

- Lambda ``Invoke`` runs the function locally (``_local_lambda``): moto needs Docker.
- DynamoDB writes are serialised: moto evaluates a ConditionExpression and then
  writes without a lock, so two racing compare-and-sets could both succeed.
- SQS ReceiveMessage is serialised, and a long poll is served as short polls, every
  ``POLL_S`` at first and less often the longer the queue stays empty (up to
  ``POLL_MAX_S``, so idle consumers do not keep moto busy): moto marks messages
  received without a lock, so two consumers could get the same message; serialising a
  blocking long poll would stall everyone.
  DeleteMessage and ChangeMessageVisibility take the same lock.
- A task token takes one callback: Step Functions answers a second SendTaskSuccess or
  SendTaskFailure with TaskDoesNotExist, moto's SendTaskFailure accepts it while the
  finished execution is still in its store. The front remembers completed tokens.
- Event source mappings of DynamoDB streams are kept and run here (``_local_esm``):
  moto would run them only in Docker, inside the very write that made the record.

Nothing else is changed; requests and replies pass byte for byte. The front also
counts every request by service and operation (``_usage``) and every Lambda
invocation with its GB-seconds: ``GET /strato-api/usage`` returns the totals so far,
what a run's cost is computed from (``strato.backends.aws.usage``).
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import signal
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from strato.backends.aws.emulator._local_esm import LocalEventSources
from strato.backends.aws.emulator._local_lambda import LocalLambda, Reply
from strato.backends.aws.emulator._usage import RequestCounter

__all__ = ["Front", "main"]

POLL_S = 0.02
POLL_MAX_S = 0.2
_INVOKE_PATH = re.compile(r"^/2015-03-31/functions/(?P<name>[^/]+)/invocations$")
_ESM_PATH = re.compile(r"^/2015-03-31/event-source-mappings(/[^/]*)?/?$")
USAGE_PATH = "/strato-api/usage"
_REGION = re.compile(r"Credential=[^/]+/\d{8}/(?P<region>[^/]+)/")
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "expect",
    "content-length",
}
_DYNAMODB_WRITES = {
    "DynamoDB_20120810.PutItem",
    "DynamoDB_20120810.UpdateItem",
    "DynamoDB_20120810.DeleteItem",
    "DynamoDB_20120810.BatchWriteItem",
    "DynamoDB_20120810.TransactWriteItems",
}
_SFN_CALLBACKS = {"AWSStepFunctions.SendTaskSuccess", "AWSStepFunctions.SendTaskFailure"}
_SQS_RECEIVE = "AmazonSQS.ReceiveMessage"
_SQS_SERIAL = {
    "AmazonSQS.DeleteMessage",
    "AmazonSQS.DeleteMessageBatch",
    "AmazonSQS.ChangeMessageVisibility",
    "AmazonSQS.ChangeMessageVisibilityBatch",
}


class Front(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], moto_url: str, lambdas: LocalLambda) -> None:
        super().__init__(address, _Handler)
        parsed = urllib.parse.urlsplit(moto_url)
        self.moto_host = parsed.hostname or "127.0.0.1"
        self.moto_port = parsed.port or 80
        self.lambdas = lambdas
        self.event_sources = LocalEventSources(moto_url, lambdas)
        self.counter = RequestCounter()
        self.dynamodb_lock = threading.Lock()
        self.sqs_lock = threading.Lock()
        self.callback_lock = threading.Lock()
        self.completed_tokens: set[str] = set()
        self.local = threading.local()

    def connection(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self.local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(self.moto_host, self.moto_port, timeout=120)
            self.local.conn = conn
        return conn

    def forward(self, method: str, path: str, headers: list[tuple[str, str]], body: bytes) -> Reply:
        """Pass one request to moto and return its reply (one retry on a stale socket)."""
        for attempt in (1, 2):
            conn = self.connection()
            try:
                conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
                for name, value in headers:
                    if name.lower() not in _HOP_BY_HOP:
                        conn.putheader(name, value)
                conn.putheader("Content-Length", str(len(body)))
                conn.endheaders(body)
                response = conn.getresponse()
                data = response.read()
                out = {
                    k: v
                    for k, v in response.getheaders()
                    if k.lower() not in _HOP_BY_HOP and k.lower() not in ("server", "date")
                }
                if method == "HEAD":
                    length = response.getheader("Content-Length")
                    if length is not None:
                        out["Content-Length"] = length
                return Reply(response.status, out, data)
            except (ConnectionError, http.client.HTTPException, OSError):
                conn.close()
                self.local.conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: without TCP_NODELAY, Nagle's algorithm
    # and the client's delayed ACK add ~40 ms to every reply.
    disable_nagle_algorithm = True
    server: Front

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request would drown the log

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        body = self._body()
        headers = list(self.headers.items())
        target = self.headers.get("X-Amz-Target", "")
        try:
            reply = self._route(target, headers, body)
            if not self.path.startswith(("/moto-api", "/strato-api")):
                self.server.counter.count(
                    self.command, self.path, dict(headers), body, len(reply.body)
                )
        except Exception as exc:  # the front must answer, whatever broke
            message = f"local front: {type(exc).__name__}: {exc}"
            reply = Reply(
                500,
                {"Content-Type": "application/json", "x-amzn-ErrorType": "ServiceException"},
                json.dumps({"message": message, "__type": "ServiceException"}).encode(),
            )
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            if name.lower() != "content-length":
                self.send_header(name, value)
        length = reply.headers.get("Content-Length") if self.command == "HEAD" else None
        self.send_header("Content-Length", length or str(len(reply.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(reply.body)

    def _route(self, target: str, headers: list[tuple[str, str]], body: bytes) -> Reply:
        front = self.server
        url = urllib.parse.urlsplit(self.path)
        match = _INVOKE_PATH.match(url.path)
        region = _REGION.search(self.headers.get("Authorization", ""))
        if url.path == USAGE_PATH and self.command == "GET":
            usage = {**front.counter.snapshot(), "lambda": front.lambdas.usage()}
            return Reply(200, {"Content-Type": "application/json"}, json.dumps(usage).encode())
        if _ESM_PATH.match(url.path):
            where = region.group("region") if region else "us-east-1"
            handled = front.event_sources.handle(self.command, url.path, url.query, body, where)
            if handled is not None:
                return handled
        if self.command == "POST" and match is not None:
            return front.lambdas.invoke(
                region.group("region") if region else "us-east-1",
                urllib.parse.unquote(match.group("name")),
                body,
                self.headers.get("X-Amz-Invocation-Type", "RequestResponse"),
                self.headers.get("X-Amz-Log-Type", "None"),
            )
        if target in _DYNAMODB_WRITES:
            with front.dynamodb_lock:
                return front.forward(self.command, self.path, headers, body)
        if target in _SQS_SERIAL:
            with front.sqs_lock:
                return front.forward(self.command, self.path, headers, body)
        if target == _SQS_RECEIVE:
            return self._receive(headers, body)
        if target in _SFN_CALLBACKS:
            return self._callback(headers, body)
        return front.forward(self.command, self.path, headers, body)

    def _receive(self, headers: list[tuple[str, str]], body: bytes) -> Reply:
        front = self.server
        request = json.loads(body or b"{}")
        deadline = time.monotonic() + float(request.get("WaitTimeSeconds") or 0)
        short = json.dumps({**request, "WaitTimeSeconds": 0}).encode()
        pause = POLL_S
        while True:
            with front.sqs_lock:
                reply = front.forward(self.command, self.path, headers, short)
            if reply.status != 200 or time.monotonic() >= deadline:
                return reply
            if json.loads(reply.body or b"{}").get("Messages"):
                return reply
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(POLL_MAX_S, pause * 1.5)

    def _callback(self, headers: list[tuple[str, str]], body: bytes) -> Reply:
        front = self.server
        token = str(json.loads(body or b"{}").get("taskToken", ""))
        with front.callback_lock:
            if token in front.completed_tokens:
                message = "Task does not exist anymore"
                return Reply(
                    400,
                    {"Content-Type": "application/x-amz-json-1.0"},
                    json.dumps({"__type": "TaskDoesNotExist", "message": message}).encode(),
                )
            reply = front.forward(self.command, self.path, headers, body)
            if reply.status == 200:
                front.completed_tokens.add(token)
            return reply

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _handle


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--moto", required=True, help="URL of the moto server behind")
    parser.add_argument("--keep-alive", type=float, default=30.0)
    args = parser.parse_args(argv)
    lambdas = LocalLambda(args.moto, keep_alive_s=args.keep_alive)
    server = Front(("127.0.0.1", args.port), args.moto, lambdas)

    def stop(signum: int, frame: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"front listening on http://127.0.0.1:{args.port}", file=sys.stderr, flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.event_sources.close()
        lambdas.close()
        server.server_close()


if __name__ == "__main__":
    main()
