"""The eager always-on server of benchmarks/round_path.py, and the replay that feeds it.

The server is one warm process (``python _round_path_server.py serve``), started
before the first replayed round and kept running: its float32 accumulator is
allocated and touched once, the aggregation kernel is compiled and warmed, and an
unmeasured warm-up round (a few updates fed back to back, then a model written)
warms the ingest and the model writer. Its BLAS runs on one thread.

Per round, the parent replays the arrival schedule ``strato run`` recorded: update i
is handed to the server (its blob file's path and weight, one JSON line on the
server's stdin) at ``t0 + (uploaded_at_i − uploaded_at_first)``. On each line the
server maps the very blob file our aggregator read (64-byte blob header, then the
safetensors payload: ``strato.services._blobs_local``; mapped read-only with
every page at once (``MAP_POPULATE``, as our aggregator maps it), zero copy,
without the checksum pass a checked blob read adds) and adds it into its accumulator with
the kernel our aggregation engine uses (``strato.aggregation.accumulate``, float32,
one update per call; with ``check=True`` where the kernel has it, the NaN/Inf
validation our leaves ask of it). After the round's last update it scales by 1/Σw (the same
kernel) and writes the model the way our aggregator does: safetensors
(``strato.codec.encode``) into a blob store on the same file system
(``LocalBlobStore.put``: checksum, write, fsync, rename). Its completion is model
written − the moment the last update was handed to it.

Before each replayed round the parent reads the round's blob files once, so they are
in the page cache as they were for our aggregator (which read each right after it
was written).
"""

from __future__ import annotations

import contextlib
import ctypes
import inspect
import json
import mmap
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import numpy as np

from _aggregation_common import log, max_rel_error, sleep_until

HERE = Path(__file__).resolve().parent
BLOB_HEADER = 64  # strato.services._blobs_local: magic, length, checksum, padding
POPULATE = getattr(mmap, "MAP_POPULATE", 0)
ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class MappedBlob:
    """A blob file mapped read-only; ``params`` views its safetensors payload (no copy)."""

    def __init__(self, path: str | Path) -> None:
        from strato.codec import decode

        with open(path, "rb") as f:
            # mapped as our aggregator maps an update (strato.aggregation._inputs): every
            # page in one call, not a page fault per page
            self._map = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED | POPULATE,
                                  prot=mmap.PROT_READ)
        self._view = memoryview(self._map)[BLOB_HEADER:]
        self.params = decode(self._view)

    def flat(self) -> Any:
        return self.params.flat()

    def close(self) -> None:
        del self.params
        try:
            self._view.release()
            self._map.close()
        except BufferError:  # a view is still alive somewhere: the mapping goes with it
            pass


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _hwm_kb() -> int:
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmHWM:"):
                return int(line.split()[1])
    return 0


# ---- the server process ----------------------------------------------------------------


def serve(params: int, out_dir: str) -> None:
    from strato.aggregation import accumulate
    from strato.aggregation._kernels import warm_up
    from strato.codec import encode
    from strato.params import Params
    from strato.services._blobs_local import LocalBlobStore

    try:  # single-threaded BLAS, as in our aggregators (the env says so too)
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=1, user_api="blas")
    except ImportError:
        pass
    store = LocalBlobStore(Path(out_dir))
    # Where the kernel can, it leaves NaN/±Inf updates out in the same pass, as our
    # aggregator's leaves ask it to: the server does the same validation work.
    check = {"check": True} if "check" in inspect.signature(accumulate).parameters else {}
    acc = np.empty(params, dtype=np.float32)
    acc.fill(0.0)  # touched once: a long-running server's memory is warm
    warm_up()
    accumulate(acc, [(acc[::-1].copy(), 1.0)], fresh=True, **check)  # warm at full size
    print(json.dumps({"op": "ready", "pid": os.getpid(), "checks_nonfinite": bool(check)}),
          flush=True)
    stdin = sys.stdin
    while line := stdin.readline():
        msg = json.loads(line)
        if msg["op"] == "stop":
            break
        assert msg["op"] == "begin"
        n, key = int(msg["n"]), str(msg["key"])
        cpu0, total_w, layout = _cpu_s(), 0.0, None
        recv, added = [], []
        for k in range(n):
            item = json.loads(stdin.readline())
            recv.append(time.monotonic())
            blob = MappedBlob(item["path"])
            layout = blob.params.layout
            accumulate(acc, [(blob.flat(), float(item["weight"]))], fresh=k == 0, **check)
            blob.close()
            total_w += float(item["weight"])
            added.append(time.monotonic())
        accumulate(acc, [], fresh=False, scale=1.0 / total_w)
        assert layout is not None
        store.put(key, encode(Params(layout, acc.view(np.uint8)), {"round": key}).payload)
        ready = time.monotonic()
        reply = {"op": "done", "ready": ready, "recv": recv, "added": added,
                 "cpu_s": _cpu_s() - cpu0, "hwm_kb": _hwm_kb(),
                 "model_path": str(Path(out_dir, *key.split("/")))}
        print(json.dumps(reply), flush=True)


# ---- the parent's side -----------------------------------------------------------------


def _mincore() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).mincore
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


_MINCORE = _mincore()


def resident_fraction(path: str) -> float:
    """The fraction of a file's pages in the page cache (mincore); 0.0 when unknown."""
    size = os.path.getsize(path)
    if _MINCORE is None or size == 0:
        return 0.0
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        data = np.frombuffer(mm, dtype=np.uint8)
        vec = np.zeros((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE, dtype=np.uint8)
        rc = _MINCORE(data.ctypes.data, size, vec.ctypes.data)
        del data
        return float((vec & 1).mean()) if rc == 0 else 0.0
    finally:
        mm.close()


def warm_page_cache(paths: list[str]) -> dict[str, float]:
    """Make sure every file is in the page cache, as our aggregator found them (just
    written): files not wholly resident are read once."""
    started = time.monotonic()
    fractions = [resident_fraction(p) for p in paths]
    buf = bytearray(8 << 20)
    for path, frac in zip(paths, fractions, strict=True):
        if frac >= 1.0:
            continue
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return {"resident_before": float(np.mean(fractions)) if fractions else 1.0,
            "seconds": time.monotonic() - started}


def read_model(path: str) -> Any:
    """A model blob's float32 values (a copy; the mapping is closed)."""
    blob = MappedBlob(path)
    try:
        return np.array(blob.flat(), dtype=np.float32)
    finally:
        blob.close()


class EagerServer:
    def __init__(self, params: int, out_dir: Path) -> None:
        env = {**os.environ, **ONE_THREAD}
        argv = [sys.executable, str(Path(__file__)), "serve", str(params), str(out_dir)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env, cwd=HERE, text=True)
        self.out_dir = out_dir
        started = time.monotonic()
        ready = self._read()
        self.pid = int(ready["pid"])
        self.checks_nonfinite = bool(ready.get("checks_nonfinite"))
        self.start_s = time.monotonic() - started

    def _write(self, msg: dict[str, Any]) -> None:
        stdin: IO[str] | None = self.proc.stdin
        assert stdin is not None
        stdin.write(json.dumps(msg) + "\n")
        stdin.flush()

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"eager server exited with status {self.proc.wait()}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def warm_up(self, updates: list[dict[str, Any]]) -> None:
        """An unmeasured round: these updates back to back, then a model written."""
        self._write({"op": "begin", "n": len(updates), "key": "warm-up/model.safetensors"})
        for u in updates:
            self._write({"path": u["path"], "weight": u["weight"]})
        self._read()

    def replay(self, r: int, updates: list[dict[str, Any]]) -> dict[str, Any]:
        """One round on the recorded schedule; returns its timings."""
        updates = sorted(updates, key=lambda u: u["uploaded_at"])
        first = float(updates[0]["uploaded_at"])
        key = f"models/round-{r:05d}.safetensors"
        self._write({"op": "begin", "n": len(updates), "key": key})
        t0 = time.monotonic() + 0.05
        sent = []
        for u in updates:
            sleep_until(t0 + float(u["uploaded_at"]) - first)
            sent.append(time.monotonic())
            self._write({"path": u["path"], "weight": u["weight"]})
        reply = self._read()
        due = [t0 + float(u["uploaded_at"]) - first for u in updates]
        add_s = [b - a for a, b in zip(reply["recv"], reply["added"], strict=True)]
        backlog = max(0.0, reply["added"][-2] - sent[-1]) if len(updates) > 1 else 0.0
        return {
            "round": r,
            "completion_s": reply["ready"] - sent[-1],
            "updates": len(updates),
            "span_s": due[-1] - due[0],
            "max_send_lag_s": max(s - d for s, d in zip(sent, due, strict=True)),
            # the previous update still being added when the last one was handed over
            "backlog_at_last_s": backlog,
            "add_s_median": float(np.median(add_s)),
            "add_s_max": max(add_s),
            "cpu_s": reply["cpu_s"],
            "cpu_s_per_update": reply["cpu_s"] / len(updates),
            "hwm_kb": reply["hwm_kb"],
            "model_path": reply["model_path"],
        }

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            self._write({"op": "stop"})
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def run_server(params: int, rounds: list[dict[str, Any]], out_dir: Path,
               warm_up_updates: int = 8) -> dict[str, Any]:
    """Start the server, warm it up on the first round's first updates, then replay each
    of ``rounds``; checks each model it wrote against the run's own."""
    out_dir.mkdir(parents=True, exist_ok=True)
    server = EagerServer(params, out_dir)
    records = []
    try:
        warm = rounds[0]["updates"][:warm_up_updates]
        warm_page_cache([u["path"] for u in warm])
        server.warm_up(warm)
        for rnd in rounds[1:]:
            cache = warm_page_cache([u["path"] for u in rnd["updates"]])
            rec = server.replay(int(rnd["round"]), rnd["updates"])
            rec["page_cache"] = cache
            if rnd.get("model_path"):
                ours = read_model(rnd["model_path"])
                theirs = read_model(rec["model_path"])
                rec["max_rel_diff_vs_run_model"] = max_rel_error(theirs, ours.astype(np.float64))
                del ours, theirs
            log(f"  eager server round {rec['round']}: completion {rec['completion_s']:.4f}s "
                f"(ours {rnd['completion_s']:.4f}s), {rec['cpu_s_per_update'] * 1e3:.1f} ms "
                f"CPU/update, max rel diff vs run model {rec.get('max_rel_diff_vs_run_model')}")
            records.append(rec)
    finally:
        server.close()
    return {"records": records, "start_s": server.start_s, "pid": server.pid,
            "kernel": "strato.aggregation.accumulate, float32 accumulator, one update per call"
                      + (", check=True (NaN/Inf left out in the same pass, as our leaves do)"
                         if server.checks_nonfinite else ""),
            "warm_up_updates": len(rounds[0]["updates"][:warm_up_updates])}


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(int(sys.argv[2]), sys.argv[3])
    else:
        raise SystemExit(f"unknown command {sys.argv[1]!r}")
