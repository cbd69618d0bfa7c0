"""Shared pieces of benchmarks/aggregation.py: the workload, clocks and memory probes.

Every system sees the same workload: ``clients`` updates of ``params`` float32 values,
integer weights (Flower's ``num_examples``) and arrival times drawn once from a
log-normal training-time distribution. To keep the load generator's own memory
flat, update ``i`` is ``bases[i % distinct]`` — ``distinct`` random vectors, drawn
once, outside every timed region. No system can tell or exploit this: each update
is delivered (copied, sent, stored) as a separate buffer, and every system that
stores updates stores ``clients`` separate copies.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

F32 = np.dtype("<f4")


@dataclass(frozen=True)
class Workload:
    params: int
    clients: int
    median_s: float = 1.0  # median client training time: arrivals centre here
    sigma: float = 0.35  # log-normal shape: larger spreads arrivals out
    seed: int = 0
    distinct: int = 4
    layers: int = 62  # Flower ships a model as a list of layers

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def bases(self) -> list[npt.NDArray[np.float32]]:
        rng = np.random.default_rng(self.seed)
        k = min(self.distinct, self.clients)
        return [rng.standard_normal(self.params, dtype=np.float32) for _ in range(k)]

    def weights(self) -> npt.NDArray[np.int64]:
        rng = np.random.default_rng(self.seed + 1)
        return rng.integers(50, 500, size=self.clients).astype(np.int64)

    def schedule(self) -> npt.NDArray[np.float64]:
        """Arrival offsets from the round start, sorted: client i arrives i-th."""
        rng = np.random.default_rng(self.seed + 2)
        times = rng.lognormal(np.log(self.median_s), self.sigma, size=self.clients)
        return np.sort(times)

    def reference(self, bases: list[npt.NDArray[np.float32]]) -> npt.NDArray[np.float64]:
        """The flat weighted mean in float64: the oracle every system must match."""
        w = self.weights().astype(np.float64)
        out = np.zeros(self.params, dtype=np.float64)
        for k, base in enumerate(bases):
            out += w[k :: len(bases)].sum() * base
        return out / w.sum()

    def layer_sizes(self) -> list[int]:
        """A fixed split into layers (a few big weight matrices, small bias vectors)."""
        n = max(1, min(self.layers, self.params))
        big = n // 2 + n % 2
        small = n - big
        bias = min(256, self.params // (4 * max(1, small))) if small else 0
        rest = self.params - bias * small
        sizes = [rest // big + (1 if i < rest % big else 0) for i in range(big)]
        out: list[int] = []
        for i, s in enumerate(sizes):
            out.append(s)
            if i < small:
                out.append(bias)
        return out


def max_rel_error(result: npt.NDArray[Any], reference: npt.NDArray[np.float64]) -> float:
    scale = float(np.abs(reference).max()) or 1.0
    worst = 0.0
    step = 1 << 22  # chunked: no model-sized float64 temporaries
    for s in range(0, reference.size, step):
        diff = np.abs(result[s : s + step].astype(np.float64) - reference[s : s + step])
        worst = max(worst, float(diff.max()))
    return worst / scale


def huge_zeros(shape: tuple[int, ...], dtype: Any) -> npt.NDArray[Any]:
    """A zeroed array on transparent huge pages, touched once. First touch of fresh
    memory is slow here (4 GB: 14 s with 4 KiB pages, 3.6 s with 2 MiB ones); a
    long-running server has long since paid it, so its set-up should not dominate."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = mmap.mmap(-1, max(1, nbytes))
    with contextlib.suppress(AttributeError, OSError):  # THP off: plain pages
        buf.madvise(mmap.MADV_HUGEPAGE)
    out = np.frombuffer(buf, dtype=dtype, count=int(np.prod(shape))).reshape(shape)
    out.fill(0)
    return out


def sleep_until(deadline: float) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def status_kb(field: str, pid: int | str = "self") -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(field.encode() + b":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def reset_peak_rss() -> None:
    """Start VmHWM afresh (Linux ≥ 4.0), so set-up work is not counted as the peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_kb() -> int:
    return status_kb("VmHWM")


def median(values: list[float]) -> float:
    xs = sorted(v for v in values if v is not None)
    if not xs:
        return float("nan")
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else 0.5 * (xs[mid - 1] + xs[mid])


def run_script_child(script: str, kind: str, cfg: dict[str, Any], timeout: float = 3600,
                     env: dict[str, str] | None = None,
                     pids: list[int] | None = None) -> dict[str, Any]:
    """Run ``script --child KIND CFG`` (stdin closed, in the benchmarks directory, with
    ``env`` if given; its pid appended to ``pids``) and return the JSON line it
    ``emit``s last, with ``child_wall_s``."""
    argv = [sys.executable, script, "--child", kind, json.dumps(cfg)]
    started = time.monotonic()
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env,
                          cwd=Path(script).resolve().parent) as proc:
        if pids is not None:
            pids.append(proc.pid)
        try:
            stdout, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} child failed with status {proc.returncode}")
    result: dict[str, Any] = json.loads(stdout.decode().strip().splitlines()[-1])
    result["child_wall_s"] = time.monotonic() - started
    return result


def emit(result: dict[str, Any]) -> None:
    """A child's answer: one JSON line on stdout (logs go to stderr)."""
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


_STARTED = time.monotonic()


def log(message: str) -> None:
    """Progress on stderr, stamped with seconds since this process started."""
    print(f"[{time.monotonic() - _STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


def provenance() -> dict[str, Any]:
    """When and where a result was measured: every results JSON carries these keys
    (with its ``command``), so a figure in the docs can be traced and rerun."""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": {"nproc": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)),
                    "loadavg": list(os.getloadavg()),
                    "mem_available_gib": round(mem_available() / 2**30, 1)},
    }


def write_results(path: Any, record: dict[str, Any]) -> None:
    """A benchmark's results JSON (its directory made if needed, with the date and the
    machine unless the record has them), and say where."""
    for key, value in provenance().items():
        record.setdefault(key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1))
    log(f"wrote {path}")


def print_keys(record: dict[str, Any], keys: tuple[str, ...]) -> None:
    """A two-column table of a results record's headline keys, on stdout."""
    print("| key | value |\n|---|---|")
    for key in keys:
        print(f"| {key} | {record[key]} |")


def mem_available() -> int:
    """MemAvailable from /proc/meminfo, in bytes (0 if unknown)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_count() -> int:
    return len(os.sched_getaffinity(0))


def l3_cache_kib() -> int | None:
    """The last-level cache's size as the kernel reports it (None where it does not):
    whether a warm 10M update and its accumulator (80 MB) fit in it decides whether a
    warm ``saxpy`` reads memory or cache."""
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip()
    except OSError:
        return None
    units = {"K": 1, "M": 1024, "G": 1024 * 1024}
    if text[-1:] in units and text[:-1].isdigit():
        return int(text[:-1]) * units[text[-1]]
    return int(text) // 1024 if text.isdigit() else None




CLK_TCK = os.sysconf("SC_CLK_TCK")


def stat_tail(path: str) -> list[bytes] | None:
    """The fields of a stat file after the command name (field 3, ``state``, first)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return raw[raw.rfind(b")") + 2 :].split()


def cpu_s(stat_path: str) -> float | None:
    """utime + stime of a process (``/proc/P/stat``) or thread (``/proc/P/task/T/stat``)."""
    tail = stat_tail(stat_path)
    if tail is None:
        return None
    return (int(tail[11]) + int(tail[12])) / CLK_TCK  # fields 14 and 15


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:
    _LIBC = None
if _LIBC is not None and not (hasattr(_LIBC, "clock_getcpuclockid")
                              and hasattr(_LIBC, "clock_gettime")):
    _LIBC = None


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system, every thread, exited ones included) of a process,
    to the nanosecond: its CPU-time clock. ``/proc/P/stat`` counts in clock ticks
    (10 ms), coarser than a small round; it is the fallback where the clock is not
    readable. None if the process is gone."""
    if _LIBC is not None:
        clock, ts = ctypes.c_int(), _Timespec()
        if (_LIBC.clock_getcpuclockid(pid, ctypes.byref(clock)) == 0
                and _LIBC.clock_gettime(clock.value, ctypes.byref(ts)) == 0):
            return ts.tv_sec + ts.tv_nsec / 1e9
    return cpu_s(f"/proc/{pid}/stat")


def thread_cpu_s(tid: int) -> float | None:
    """CPU seconds of one of this process's threads, to the nanosecond (its scheduler
    run time, ``/proc/self/task/T/schedstat``); the clock-tick count of its stat file
    where that is not readable. None if the thread is gone."""
    try:
        with open(f"/proc/self/task/{tid}/schedstat", "rb") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, IndexError, ValueError):
        return cpu_s(f"/proc/self/task/{tid}/stat")


def tree_cpu_s() -> float:
    """CPU seconds (user + system) of this process (every thread) and of every live
    process descended from it (e.g. Runtime workers): what a round costs us when
    taken before and after it. A descendant that exits in between loses its share."""
    total, todo, seen = 0.0, [os.getpid()], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += process_cpu_s(pid) or 0.0
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            continue
    return total
