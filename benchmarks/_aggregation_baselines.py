"""The baselines of benchmarks/aggregation.py, each run in its own child process.

- flower: Flower's own server path. Each update is serialized the way Flower ships it
  (``ndarrays_to_parameters``: one ``np.save`` payload per layer, in a ``FitRes``);
  once all are in, ``FedAvg.aggregate_fit`` runs (decode + aggregate + serialize the
  new model). Its default is ``inplace=True`` (decode one result at a time, add in
  place); the older ``inplace=False`` path (decode all, then ``aggregate``) is timed
  too when memory allows. Flower's gRPC receive during the round is not simulated
  (that favours Flower).
- serverful: an always-on aggregator process; updates arrive over a local TCP socket
  into a preallocated (warm) stacked buffer; after the last one, one BLAS ``w @ S``
  on all its cores. It reserves its cores for the whole round.
- eager-server: the best always-on design: the same process and socket, but each
  update is received into one warm buffer and added at once into a warm accumulator
  with Strato's own kernel (``strato.aggregation.accumulate``, the strato system's
  accumulator precision); after the last, the scale. It reserves its cores too.
- naive-serverless: one freshly started Runtime function per update (never reused)
  that reads the update from the blob store and adds it into a global sum kept in
  the blob store (read-modify-write under a file lock). The blob store lives in a
  tmpfs directory (removed afterwards): faster than disk, which favours the baseline.
- floor: ``w @ S`` on the updates already stacked in one array, 1 BLAS thread and all:
  timed inside the serverful server, on the very array it received them into.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from _aggregation_common import (
    F32,
    Workload,
    huge_zeros,
    log,
    max_rel_error,
    median,
    mem_available,
    peak_rss_kb,
    reset_peak_rss,
    sleep_until,
)

HERE = Path(__file__).resolve().parent
FRAME = struct.Struct("<IdQ")  # client index, weight, payload bytes
ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# ---- flower ----------------------------------------------------------------------------


def run_flower(cfg: dict[str, Any]) -> dict[str, Any]:
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import FedAvg

    wl = Workload(**cfg["workload"])
    reps = int(cfg.get("reps", 3))
    bases, weights = wl.bases(), wl.weights()
    reference = wl.reference(bases)
    source_kb = (sum(b.nbytes for b in bases) + reference.nbytes) // 1024
    cuts = np.cumsum([0, *wl.layer_sizes()])
    reset_peak_rss()
    results = []
    for i in range(wl.clients):
        base = bases[i % len(bases)]
        layers = [base[cuts[j] : cuts[j + 1]] for j in range(len(cuts) - 1)]
        fit = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(layers), int(weights[i]), {})
        results.append((None, fit))
    payload = wl.clients * wl.params * 4
    variants = {"inplace": FedAvg()}
    if cfg.get("legacy", True) and 3 * payload < 0.6 * mem_available():
        variants["decode_all_then_aggregate"] = FedAvg(inplace=False)
    out: dict[str, Any] = {"variants": {}}
    for name, strategy in variants.items():
        times = []
        for rep in range(-1, reps):  # one warm-up call: a long-running server is warm
            started = time.perf_counter()
            params, _ = strategy.aggregate_fit(2, results, [])  # type: ignore[arg-type]
            elapsed = time.perf_counter() - started
            if rep >= 0:
                times.append(elapsed)
            assert params is not None
            error = max_rel_error(np.concatenate(parameters_to_ndarrays(params)), reference)
            log(f"  flower[{name}] rep {rep}: {elapsed:.3f}s (error {error:.1e})")
        out["variants"][name] = {"latency_s": times, "max_rel_error": error}
    out["peak_rss_kb"] = peak_rss_kb() - source_kb
    # received payloads, decoded copies (+ weighted copies for the legacy path)
    return out


# ---- serverful -------------------------------------------------------------------------


def _recv_into(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("client went away")
        got += n


FLOOR = 0xFFFFFFFF  # a frame asking the server to time the floor


def _check_size(nbytes: int, params: int) -> None:
    if nbytes != params * 4:
        raise ConnectionError(f"update of {nbytes} bytes, expected {params * 4}")


def _send_round(conn: socket.socket, first: float, last: float, ready: float,
                result: Any) -> None:
    """A round's timings (and the server's peak RSS), then the model itself."""
    reply = json.dumps(
        {"first": first, "last": last, "ready": ready, "hwm_kb": peak_rss_kb()}
    ).encode()
    conn.sendall(struct.pack("<I", len(reply)) + reply)
    conn.sendall(memoryview(result).cast("B"))


def _time_floor(stacked: Any, weights: Any, result: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    """The floor: ``w @ S`` on the very updates the server holds stacked, 1 BLAS thread
    and all of them, timed in the server process (no second copy of the updates)."""
    from threadpoolctl import threadpool_limits

    w = (weights / weights.sum()).astype(F32)
    out: dict[str, Any] = {}
    for threads in sorted({1, int(cfg.get("cores", 2))}):
        times = []
        with threadpool_limits(limits=threads, user_api="blas"):
            for rep in range(-1, int(cfg.get("reps", 3))):
                started = time.perf_counter()
                np.matmul(w, stacked, out=result)
                if rep >= 0:
                    times.append(time.perf_counter() - started)
        out[f"threads_{threads}"] = times
    return out


def serve_eager(cfg: dict[str, Any], server: socket.socket) -> None:
    """The eager always-on server: adds each update as it lands, with our kernel."""
    from strato.aggregation import accumulate

    wl = Workload(**cfg["workload"])
    acc_dtype = np.float64 if cfg.get("acc_dtype") == "F64" else F32
    conn, _ = server.accept()
    buf = huge_zeros((1, wl.params), F32)[0]  # the receive buffer, warm
    acc = huge_zeros((1, wl.params), acc_dtype)[0]  # the accumulator, warm
    result = np.empty(wl.params, dtype=F32)
    head = bytearray(FRAME.size)
    with conn:
        while True:
            try:
                _recv_into(conn, memoryview(head))
            except ConnectionError:
                return
            first = time.monotonic()
            total = 0.0
            for k in range(wl.clients):
                if k:
                    _recv_into(conn, memoryview(head))
                _, w, nbytes = FRAME.unpack(head)
                _check_size(nbytes, wl.params)
                _recv_into(conn, memoryview(buf).cast("B"))
                last = time.monotonic()
                accumulate(acc, [(buf, w)], fresh=k == 0)
                total += w
            accumulate(acc, [], fresh=False, scale=1.0 / total, out=result)
            ready = time.monotonic()
            _send_round(conn, first, last, ready, result)


def serve(cfg: dict[str, Any]) -> None:
    """The always-on server: receives whole rounds, aggregates after the last update
    (or, with ``eager``, as each lands: ``serve_eager``)."""
    wl = Workload(**cfg["workload"])
    server = socket.create_server(("127.0.0.1", 0))
    print(server.getsockname()[1], flush=True)
    if cfg.get("eager"):
        serve_eager(cfg, server)
        return
    conn, _ = server.accept()
    stacked = huge_zeros((wl.clients, wl.params), F32)  # allocated and touched once
    result = np.empty(wl.params, dtype=F32)
    weights = np.zeros(wl.clients, dtype=np.float64)
    head = bytearray(FRAME.size)
    with conn:
        while True:
            try:
                _recv_into(conn, memoryview(head))
            except ConnectionError:
                return
            if FRAME.unpack(head)[0] == FLOOR:  # after the rounds: time w @ S on S itself
                reply = json.dumps(_time_floor(stacked, weights, result, cfg)).encode()
                conn.sendall(struct.pack("<I", len(reply)) + reply)
                continue
            first = time.monotonic()
            for k in range(wl.clients):
                if k:
                    _recv_into(conn, memoryview(head))
                i, w, nbytes = FRAME.unpack(head)
                _check_size(nbytes, wl.params)
                weights[i] = w
                _recv_into(conn, memoryview(stacked[i]).cast("B"))
            last = time.monotonic()
            np.matmul((weights / weights.sum()).astype(F32), stacked, out=result)
            ready = time.monotonic()
            _send_round(conn, first, last, ready, result)


def run_serverful(cfg: dict[str, Any]) -> dict[str, Any]:
    wl = Workload(**cfg["workload"])
    reps = int(cfg.get("reps", 3))
    cores = int(cfg.get("cores", 2))
    bases, weights, schedule = wl.bases(), wl.weights(), wl.schedule()
    reference = wl.reference(bases)
    argv = [sys.executable, str(Path(__file__)), "serve", json.dumps(cfg)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, cwd=HERE)
    records = []
    worst = 0.0
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        result = np.empty(wl.params, dtype=F32)
        hwm = 0
        for rep in range(-1, reps):
            t0 = time.monotonic() + 0.02
            for i in range(wl.clients):
                sleep_until(t0 + schedule[i])
                base = bases[i % len(bases)]
                sock.sendall(FRAME.pack(i, float(weights[i]), base.nbytes))
                sock.sendall(memoryview(base).cast("B"))
            size = bytearray(4)
            _recv_into(sock, memoryview(size))
            reply_bytes = bytearray(struct.unpack("<I", size)[0])
            _recv_into(sock, memoryview(reply_bytes))
            reply = json.loads(reply_bytes)
            _recv_into(sock, memoryview(result).cast("B"))
            worst = max(worst, max_rel_error(result, reference))
            hwm = max(hwm, int(reply["hwm_kb"]))
            # From the moment the last update is wholly at the server (or due, if it
            # was received early): its own network receive is not charged to it.
            due = t0 + float(schedule[-1])
            completion = reply["ready"] - max(due, reply["last"])
            log(f"  {'eager server' if cfg.get('eager') else 'serverful'} rep {rep}: "
                f"completion={completion:.4f}s")
            if rep >= 0:
                records.append(
                    {
                        "completion_s": completion,
                        "total_s": reply["ready"] - t0,
                        "reserved_core_s": (reply["ready"] - t0) * cores,
                        "last_received_s": reply["last"] - due,
                    }
                )
        floor: dict[str, Any] = {}
        worst_floor = 0.0
        if not cfg.get("eager"):  # the floor is timed on the lazy server's stacked updates
            sock.sendall(FRAME.pack(FLOOR, 0.0, 0))
            _recv_into(sock, memoryview(size))
            reply_bytes = bytearray(struct.unpack("<I", size)[0])
            _recv_into(sock, memoryview(reply_bytes))
            floor = json.loads(reply_bytes)
            worst_floor = max_rel_error(result, reference)
            for key, times in floor.items():
                log(f"  floor[{key}]: {median(times):.4f}s")
        sock.close()
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out: dict[str, Any] = {"records": records, "max_rel_error": worst, "peak_rss_kb": hwm}
    if floor:
        out["floor"] = {**floor, "max_rel_error": worst_floor}
    return out


# ---- naive serverless ------------------------------------------------------------------


def run_naive(cfg: dict[str, Any]) -> dict[str, Any]:
    from strato.services import FunctionSpec, embedded

    wl = Workload(**cfg["workload"])
    reps = int(cfg.get("reps", 1))
    concurrency = int(cfg.get("concurrency", 2 * int(cfg.get("cores", 2))))
    bases, weights, schedule = wl.bases(), wl.weights(), wl.schedule()
    reference = wl.reference(bases)
    root = Path(tempfile.mkdtemp(prefix="strato-bench-naive-", dir="/dev/shm"))
    records = []
    worst = 0.0
    fn_rss = 0
    try:
        with embedded(root) as svc:
            for i in range(wl.clients):  # the clients' uploads, before the round
                svc.blobs.put(f"u/{i}", bases[i % len(bases)])
            runtime = svc.runtime
            env = {"PYTHONPATH": str(HERE), **ONE_THREAD}
            for rep in range(reps):
                for key in ("sum", "meta", "global"):
                    svc.blobs.delete(key)
                before = runtime.stats()
                arrivals: queue.SimpleQueue[int | None] = queue.SimpleQueue()
                replies: list[dict[str, Any]] = []
                lock = threading.Lock()

                def dispatch(
                    rep: int = rep,
                    arrivals: queue.SimpleQueue[int | None] = arrivals,
                    replies: list[dict[str, Any]] = replies,
                    lock: threading.Lock = lock,
                ) -> None:
                    while (i := arrivals.get()) is not None:
                        name = f"naive.{rep}.{i}"  # a new function each time: never warm
                        runtime.register(FunctionSpec(
                            name, "_aggregation_naive:add", keep_alive_s=0.0,
                            max_concurrency=1, retries=0, env=env, timeout_s=600,
                        ))
                        event = {"key": f"u/{i}", "weight": float(weights[i]),
                                 "clients": wl.clients, "lock": str(root / "sum.lock")}
                        reply = runtime.invoke(name, event)
                        with lock:
                            replies.append(reply)

                threads = [threading.Thread(target=dispatch) for _ in range(concurrency)]
                for t in threads:
                    t.start()
                t0 = time.monotonic() + 0.02
                for i in range(wl.clients):
                    sleep_until(t0 + schedule[i])
                    arrivals.put(i)
                last = t0 + float(schedule[-1])
                for _ in threads:
                    arrivals.put(None)
                for t in threads:
                    t.join()
                after = runtime.stats()
                ready = max(r["t"] for r in replies if r["done"])
                fn_rss = max(fn_rss, *(r["hwm_kb"] for r in replies))
                glob = np.frombuffer(svc.blobs.get("global", verify=False), dtype=F32)
                worst = max(worst, max_rel_error(glob, reference))
                records.append({
                    "completion_s": ready - last,
                    "total_s": ready - t0,
                    # Lambda bills the init phase of a cold start too (since 2025)
                    "billed_s": (after.billed_s - before.billed_s
                                 + after.init_s - before.init_s),
                    "init_s": after.init_s - before.init_s,
                    "cold_starts": after.cold_starts - before.cold_starts,
                    "invocations": after.invocations - before.invocations,
                })
                log(f"  naive rep {rep}: completion={ready - last:.3f}s "
                    f"billed={records[-1]['billed_s']:.2f}s (init {records[-1]['init_s']:.2f}s)")
                del glob
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "records": records,
        "max_rel_error": worst,
        "peak_rss_kb": fn_rss * concurrency,  # concurrent functions, each this big
        "function_peak_rss_kb": fn_rss,
    }


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(json.loads(sys.argv[2]))
    else:
        raise SystemExit(f"unknown command {sys.argv[1]!r}")
    os._exit(0)
