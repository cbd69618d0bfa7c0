"""Where an aggregator's float64 accumulator lives, and how many updates a pass adds.

The engine's checked add (``aggregation.accumulate`` with ``check=True``) of float32
updates mapped from files (as the leaves read them: a blob's page-cache pages) into a
float64 accumulator held either in a ``/dev/shm`` segment (4 KiB pages: the node's
shared memory, which worker processes can map) or in the process's private memory
(``aggregation._inputs.PrivateBuffer``: transparent huge pages where the kernel gives
them, as for aggregators on the node's own threads), one, two or four updates per
pass. Thread CPU time, median of ``--reps``, beside one single-threaded BLAS ``saxpy``
over one update (numpy arrays), timed in the same process::

    python benchmarks/accumulator_memory.py          # 10M floats
    python benchmarks/accumulator_memory.py --quick  # 1M floats, for a smoke test

Prints a table and writes ``benchmarks/results/aggregation/accumulator_memory.json``
(``--json`` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy: one thread, like a leaf

import numpy as np

from strato.aggregation import accumulate
from strato.aggregation._inputs import PrivateBuffer

RESULTS = Path(__file__).resolve().parent / "results" / "aggregation" / "accumulator_memory.json"


def _cpu_ms(fn: Callable[[], Any], reps: int) -> float:
    fn()  # warm: pages touched, kernels loaded
    times = []
    for _ in range(reps):
        start = time.thread_time()
        fn()
        times.append(time.thread_time() - start)
    return 1e3 * float(np.median(times))


def _mapped_updates(n: int, k: int, tmp: Path) -> list[np.ndarray[Any, Any]]:
    """``k`` float32 updates of ``n`` values, each a file mapped read-only."""
    updates = []
    for i in range(k):
        path = tmp / f"update-{i}.bin"
        np.random.default_rng(i).standard_normal(n).astype(np.float32).tofile(path)
        fd = os.open(path, os.O_RDONLY)
        try:
            mapping = mmap.mmap(fd, 0, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                                prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        updates.append(np.frombuffer(mapping, dtype=np.float32))
    return updates


def _shm_accumulator(n: int) -> tuple[np.ndarray[Any, Any], mmap.mmap]:
    name = f"/dev/shm/strato-bench-acc-{os.getpid()}"
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, 8 * n)
        mapping = mmap.mmap(fd, 8 * n, flags=mmap.MAP_SHARED)
    finally:
        os.close(fd)
        os.unlink(name)  # the mapping keeps the memory; nothing is left in /dev/shm
    return np.frombuffer(mapping, dtype=np.float64), mapping


def run(n: int, reps: int) -> dict[str, Any]:
    from scipy.linalg import blas

    with tempfile.TemporaryDirectory(prefix="strato-acc-bench-") as tmp:
        updates = _mapped_updates(n, 4, Path(tmp))
        x, y = np.ones(n, dtype=np.float32), np.zeros(n, dtype=np.float32)
        saxpy = _cpu_ms(lambda: blas.saxpy(x, y, a=0.5), reps)
        shm_acc, shm_map = _shm_accumulator(n)
        private = PrivateBuffer(8 * n)
        private_acc = np.frombuffer(private.buffer, dtype=np.float64)
        rows = []
        for k in (1, 2, 4):
            inputs = [(u, 0.5) for u in updates[:k]]
            row: dict[str, Any] = {"updates_per_pass": k}
            for where, acc in (("shm", shm_acc), ("private", private_acc)):
                ms = _cpu_ms(lambda acc=acc, inputs=inputs: accumulate(acc, inputs, fresh=False,
                                                                        check=True),
                             reps) / k
                row[f"{where}_ms_per_update"] = ms
                row[f"{where}_vs_saxpy"] = ms / saxpy
            rows.append(row)
        del shm_acc, private_acc, updates
        shm_map.close()
        private.release()
    return {"params": n, "reps": reps, "saxpy_ms": saxpy, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1M floats instead of 10M")
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--json", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    n = 1_000_000 if args.quick else 10_000_000
    result = run(n, max(1, args.reps))
    print(f"checked add of float32 updates (mapped files) into a float64 accumulator, "
          f"{n:,} values; saxpy over one update: {result['saxpy_ms']:.2f} ms (thread CPU)")
    print("| updates per pass | /dev/shm ms per update | ÷ saxpy | private ms per update "
          "| ÷ saxpy |")
    print("|---:|---:|---:|---:|---:|")
    for row in result["rows"]:
        print(f"| {row['updates_per_pass']} | {row['shm_ms_per_update']:.2f} "
              f"| {row['shm_vs_saxpy']:.2f} | {row['private_ms_per_update']:.2f} "
              f"| {row['private_vs_saxpy']:.2f} |")
    command = "python benchmarks/accumulator_memory.py" + (" --quick" if args.quick else "")
    if args.json != RESULTS:
        command += f" --json {args.json}"
    result |= {"command": command, "machine": {"nproc": os.cpu_count(),
                                                "python": platform.python_version()},
               "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
