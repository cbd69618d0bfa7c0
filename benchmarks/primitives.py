"""Benchmark of the five primitives' embedded implementations, each beside a plain baseline.

    python benchmarks/primitives.py [--quick] [--json FILE]

Measures, in one run: function invocation overhead (warm and cold, median µs) against
a multiprocessing pool (warm) and a fresh process (cold); bus publish→receive
latency against a multiprocessing queue; blob put/get throughput against plain
file I/O; and the hand-off of a 400 MB buffer to a function through node shared
memory against pickling it over a multiprocessing pipe to a warm receiver, with
the bytes each receiver copied measured as the growth of its peak RSS while it took
and read the buffer (this sees a copy out of a memory map, which /proc/self/io's
``rchar`` does not; a control row has our handler copy the mapped buffer on purpose).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from strato.services import FunctionSpec, embedded
from strato.services.shm import ShmPool

HERE = Path(__file__).resolve().parent
ENV = {"PYTHONPATH": str(HERE)}


def _median_us(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1e6, 1)


def _noop(_: Any = None) -> None:
    return None


def bench_invoke(svc: Any, n_warm: int, n_cold: int) -> dict[str, Any]:
    rt = svc.runtime
    rt.register(FunctionSpec("noop", "_primitives_handlers:noop", env=ENV, keep_alive_s=60))
    rt.invoke("noop", {})
    warm = []
    for _ in range(n_warm):
        t0 = time.perf_counter()
        rt.invoke("noop", {})
        warm.append(time.perf_counter() - t0)
    cold = []
    for i in range(n_cold):
        rt.register(FunctionSpec(f"cold{i}", "_primitives_handlers:noop", env=ENV))
        t0 = time.perf_counter()
        rt.invoke(f"cold{i}", {})
        cold.append(time.perf_counter() - t0)
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        pool.apply(_noop)
        base_warm = []
        for _ in range(n_warm):
            t0 = time.perf_counter()
            pool.apply(_noop)
            base_warm.append(time.perf_counter() - t0)
    base_cold = []
    for _ in range(n_cold):
        t0 = time.perf_counter()
        p = ctx.Process(target=_noop)
        p.start()
        p.join()
        base_cold.append(time.perf_counter() - t0)
    return {
        "warm_us": _median_us(warm),
        "cold_us": _median_us(cold),
        "baseline_pool_apply_warm_us": _median_us(base_warm),
        "baseline_spawn_process_cold_us": _median_us(base_cold),
    }


def _mp_queue_echo(q_in: Any, q_out: Any) -> None:
    while (item := q_in.get()) is not None:
        q_out.put((item, time.perf_counter()))


def bench_bus(svc: Any, n: int) -> dict[str, Any]:
    bus = svc.bus
    bus.create_topic("bench")
    bus.subscribe("bench", "bench-q")
    lat: list[float] = []
    done = threading.Event()

    def consume() -> None:
        got = 0
        while got < n:
            for m in bus.receive("bench-q", 10, wait_s=1.0):
                lat.append(time.perf_counter() - float(m.body))
                bus.ack("bench-q", m.receipt)
                got += 1
        done.set()

    t = threading.Thread(target=consume)
    t.start()
    for _ in range(n):
        bus.publish("bench", repr(time.perf_counter()))
        time.sleep(0.002)
    done.wait(60)
    t.join()
    ctx = mp.get_context("spawn")
    q_in, q_out = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=_mp_queue_echo, args=(q_in, q_out))
    p.start()
    base = []
    for _ in range(n):
        t0 = time.perf_counter()
        q_in.put(t0)
        _, received = q_out.get()
        base.append(received - t0)
    q_in.put(None)
    p.join()
    return {
        "publish_to_receive_us": _median_us(lat),
        "baseline_mp_queue_us": _median_us(base),
        "messages": n,
    }


def bench_blobs(svc: Any, mb: int, reps: int) -> dict[str, Any]:
    data = np.random.default_rng(0).integers(0, 255, mb << 20, dtype=np.uint8)
    blobs = svc.blobs
    put, get, get_noverify, plain_w, plain_r = [], [], [], [], []
    with tempfile.TemporaryDirectory(dir=svc.root) as tmp:
        plain = Path(tmp) / "plain.bin"
        for i in range(reps):
            t0 = time.perf_counter()
            blobs.put(f"bench/{i}", data)
            put.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            view = blobs.get(f"bench/{i}")
            np.frombuffer(view, dtype=np.uint8).sum()  # touch every byte
            get.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            view = blobs.get(f"bench/{i}", verify=False)
            np.frombuffer(view, dtype=np.uint8).sum()
            get_noverify.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with open(plain, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            plain_w.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            np.frombuffer(plain.read_bytes(), dtype=np.uint8).sum()
            plain_r.append(time.perf_counter() - t0)
    gbs = lambda s: round((mb << 20) / statistics.median(s) / 1e9, 2)  # noqa: E731
    return {
        "size_mb": mb,
        "put_gbps": gbs(put),
        "get_verified_gbps": gbs(get),
        "get_unverified_gbps": gbs(get_noverify),
        "baseline_file_write_fsync_gbps": gbs(plain_w),
        "baseline_file_read_gbps": gbs(plain_r),
    }


def _pipe_receiver(conn: Any) -> None:
    """The baseline's warm receiver: takes arrays until None, answering each with its sum,
    the bytes it copied (peak RSS growth, as our handler measures) and the bytes read."""
    from _primitives_handlers import _io, peak_bytes, reset_peak

    while True:
        before, base = _io(), reset_peak()
        arr = conn.recv()  # unpickles from the pipe: the baseline's copy path
        if arr is None:
            return
        total = float(arr.sum(dtype=np.float64))
        grown = peak_bytes() - base
        del arr
        conn.send((total, grown, _io()["rchar"] - before["rchar"]))


def bench_handoff(svc: Any, mb: int, reps: int) -> dict[str, Any]:
    n = (mb << 20) // 4
    arr = np.random.default_rng(1).random(n, dtype=np.float32)
    expected = float(arr.sum(dtype=np.float64))
    rt = svc.runtime
    rt.register(
        FunctionSpec(
            "checksum", "_primitives_handlers:checksum_shm", env=ENV, keep_alive_s=60, timeout_s=120
        )
    )
    ours, attach, copied, pipe_bytes, control = [], [], [], [], []
    with ShmPool() as pool:
        lease = pool.lease(arr.nbytes)
        np.frombuffer(lease.buffer, dtype=np.float32)[:] = arr  # producer writes in place
        rt.invoke("checksum", {"ref": lease.to_dict()})  # warm the worker
        for _ in range(reps):
            t0 = time.perf_counter()
            out = rt.invoke("checksum", {"ref": lease.to_dict()})
            ours.append(time.perf_counter() - t0)
            attach.append(out["attach_s"])
            copied.append(out["bytes_copied"])
            pipe_bytes.append(out["pipe_bytes"])
            assert abs(out["sum"] - expected) <= 1e-6 * abs(expected)
        # the control: the same worker copying the mapped buffer before it reads it
        for _ in range(2):
            out = rt.invoke("checksum", {"ref": lease.to_dict(), "copy": True})
            control.append(out["bytes_copied"])
        lease.release()
    # The baseline on a warm process too: one receiver, started (and sent one array)
    # before the timed repetitions.
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    sys.path.insert(0, str(HERE))  # the spawned receiver imports _primitives_handlers
    p = ctx.Process(target=_pipe_receiver, args=(child,))
    p.start()
    base, base_copied, base_bytes = [], [], []
    try:
        parent.send(arr)
        parent.recv()
        for _ in range(reps):
            t0 = time.perf_counter()
            parent.send(arr)
            total, grown, received = parent.recv()
            base.append(time.perf_counter() - t0)
            base_copied.append(grown)
            base_bytes.append(received)
            assert abs(total - expected) <= 1e-6 * abs(expected)
        parent.send(None)
    finally:
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
    return {
        "size_mb": mb,
        "shm_handoff_ms": round(statistics.median(ours) * 1e3, 2),
        "shm_attach_ms": round(statistics.median(attach) * 1e3, 3),
        "shm_bytes_copied": int(statistics.median(copied)),
        "shm_pipe_bytes": int(statistics.median(pipe_bytes)),
        "control_copying_handler_bytes_copied": int(statistics.median(control)),
        "baseline_pickle_pipe_ms": round(statistics.median(base) * 1e3, 2),
        "baseline_bytes_copied": int(statistics.median(base_copied)),
        "baseline_pipe_bytes": int(statistics.median(base_bytes)),
        "bytes_copied_is": "growth of the receiver's peak RSS (VmHWM after clear_refs) while "
                           "it takes and reads the buffer: sees copies out of memory maps",
        "baseline_is": "one warm spawned receiver, sent one array before the timed reps",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, smaller blobs")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--handoff-mb", type=int, default=400)
    args = ap.parse_args(argv)
    reps = 3 if args.quick else 5
    results: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/primitives.py", *(argv or sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                    "loadavg_at_start": list(os.getloadavg())},
    }
    with tempfile.TemporaryDirectory(prefix="strato-bench-") as root, embedded(root) as svc:
        steps = [
            (
                "invoke",
                lambda: bench_invoke(svc, 50 if args.quick else 200, 3 if args.quick else 5),
            ),
            ("bus", lambda: bench_bus(svc, 50 if args.quick else 200)),
            ("blobs", lambda: bench_blobs(svc, 64 if args.quick else 256, reps)),
            ("shm_handoff", lambda: bench_handoff(svc, args.handoff_mb, reps)),
        ]
        for name, step in steps:
            print(f"measuring {name} ...", file=sys.stderr, flush=True)
            results[name] = step()
    rows = [
        (
            "invoke warm (median µs)",
            results["invoke"]["warm_us"],
            results["invoke"]["baseline_pool_apply_warm_us"],
            "mp.Pool.apply",
        ),
        (
            "invoke cold (median µs)",
            results["invoke"]["cold_us"],
            results["invoke"]["baseline_spawn_process_cold_us"],
            "spawn a Process",
        ),
        (
            "bus publish→receive (median µs)",
            results["bus"]["publish_to_receive_us"],
            results["bus"]["baseline_mp_queue_us"],
            "mp.Queue round trip",
        ),
        (
            "blob put (GB/s)",
            results["blobs"]["put_gbps"],
            results["blobs"]["baseline_file_write_fsync_gbps"],
            "file write + fsync",
        ),
        (
            "blob get, checksum checked (GB/s)",
            results["blobs"]["get_verified_gbps"],
            results["blobs"]["baseline_file_read_gbps"],
            "file read",
        ),
        (
            f"{args.handoff_mb} MB hand-off (ms)",
            results["shm_handoff"]["shm_handoff_ms"],
            results["shm_handoff"]["baseline_pickle_pipe_ms"],
            "pickle over mp.Pipe",
        ),
        (
            f"{args.handoff_mb} MB hand-off: bytes copied",
            results["shm_handoff"]["shm_bytes_copied"],
            results["shm_handoff"]["baseline_bytes_copied"],
            "pickle over mp.Pipe",
        ),
        (
            "  control: our handler copying",
            results["shm_handoff"]["control_copying_handler_bytes_copied"],
            results["shm_handoff"]["baseline_bytes_copied"],
            "(the measure sees it)",
        ),
    ]
    print(f"\n{'measure':<36} {'strato':>14} {'baseline':>14}  baseline is")
    for label, ours, base, what in rows:
        print(f"{label:<36} {ours:>14,} {base:>14,}  {what}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
