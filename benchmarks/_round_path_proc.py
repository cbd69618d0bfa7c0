"""CPU seconds and peak RSS of the aggregation path, read from /proc while a run goes.

The run process (the one calling ``run_job``) samples, every ``interval_s``:

- every process descended from it: its utime + stime (``/proc/<pid>/stat``); for the
  path's processes also VmHWM, VmRSS and its split (``/proc/<pid>/status``) and how many
  update blob files they map at once (``/proc/<pid>/maps``). A Runtime worker is
  recognised by its command line
  (``python -m strato.services._worker FUNCTION HANDLER PARENT_PID``): it is on the
  aggregation path when its function is one of ``AGG_FUNCTIONS`` or starts with one
  of ``AGG_PREFIXES`` (the aggregation engine's ``lifl.<node>.<name>`` functions);
  any process descended from such a worker is on the path too;
- threads of this very process whose Python name starts with one of
  ``THREAD_PREFIXES`` (the stream trigger ``trigger updates->aggregate``; the
  aggregation engine's ``lifl-*`` threads should the round pipeline host them here):
  ``/proc/self/task/<tid>/stat``.

A process or thread that has exited keeps the last value read, so the path's total
is monotonic; what it did after its last sample is lost (workers here live for the
whole run: keep-alive 120 s). Per-round CPU is the total's increase between round
boundaries, linearly interpolated between samples.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from _aggregation_common import process_cpu_s, stat_tail, thread_cpu_s

WORKER_MODULE = b"strato.services._worker"
AGG_FUNCTIONS = ("aggregate", "close_round")
AGG_PREFIXES = ("lifl.",)
THREAD_PREFIXES = ("trigger updates", "lifl-", "strato-invoke-aggregate",
                   "strato-invoke-close_round", "strato-invoke-lifl.")


MEMORY_FIELDS = (b"VmHWM", b"VmRSS", b"RssAnon", b"RssFile", b"RssShmem")


def memory_kb(pid: int) -> dict[str, int]:
    """VmHWM, VmRSS and its split (RssAnon, RssFile, RssShmem) of a process, in KiB."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                name = line.split(b":", 1)[0]
                if name in MEMORY_FIELDS:
                    out[name.decode()] = int(line.split()[1])
    except OSError:
        pass
    return out


def mapped_update_files(pid: int) -> int:
    """How many distinct update blob files (``…/blobs/updates/…``) the process maps now."""
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            return len({line.split(None, 5)[-1] for line in f if b"/blobs/updates/" in line})
    except OSError:
        return 0


def worker_function(pid: int) -> str | None:
    """The Runtime function a worker process serves, or None if it is not a worker."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return None
    if WORKER_MODULE not in argv:
        return None
    i = argv.index(WORKER_MODULE)
    return argv[i + 1].decode() if len(argv) > i + 1 else None


def _command(pid: int) -> str:
    """A short label for a process that is not a Runtime worker: its command line."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        argv = []
    if not argv:
        return "?"
    return " ".join([os.path.basename(argv[0]), *argv[1:]])[:80]


def on_path_function(name: str | None) -> bool:
    return name is not None and (name in AGG_FUNCTIONS or name.startswith(AGG_PREFIXES))


@dataclass
class Entity:
    kind: str  # "process" or "thread"
    ident: int
    label: str  # the worker's function, the process's command line, or the thread's name
    on_path: bool
    worker: bool = False  # a Runtime worker (its label is its function)
    cpu_s: float = 0.0
    hwm_kb: int = 0  # VmHWM: the kernel's own peak
    rss_at_peak: dict[str, int] = field(default_factory=dict)  # the sampled max VmRSS, split
    max_mapped_updates: int = 0  # update blob files mapped at once, at most (sampled)

    def to_dict(self) -> dict[str, Any]:
        out = {"kind": self.kind, "id": self.ident, "label": self.label,
               "on_path": self.on_path, "cpu_s": round(self.cpu_s, 3)}
        if self.kind == "process":
            out.update({"hwm_kb": self.hwm_kb, "sampled_rss_at_peak_kb": self.rss_at_peak,
                        "max_mapped_update_files": self.max_mapped_updates})
        return out


@dataclass
class PathMonitor:
    interval_s: float = 0.1
    entities: dict[tuple[str, int, str], Entity] = field(default_factory=dict)
    # (time.time(), the path's processes' CPU s, the path's threads' CPU s)
    samples: list[tuple[float, float, float]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> PathMonitor:
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="round-path-monitor",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    # ---- one sample ------------------------------------------------------------------

    def _descendants(self) -> dict[int, int]:
        """pid -> ppid of every live process descended from this one."""
        parent: dict[int, int] = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                tail = stat_tail(f"/proc/{name}/stat")
                if tail is not None:
                    parent[int(name)] = int(tail[1])
        me, out = os.getpid(), {}
        for pid in parent:
            p, chain = pid, 0
            while p in parent and p != me and chain < 64:
                p, chain = parent[p], chain + 1
            if p == me and pid != me:
                out[pid] = parent[pid]
        return out

    def sample(self) -> None:
        now = time.time()
        tree = self._descendants()
        labels: dict[int, tuple[str, bool, bool]] = {}

        def label(pid: int) -> tuple[str, bool, bool]:
            """(label, on the path, is a Runtime worker)"""
            if pid not in labels:
                fn = worker_function(pid)
                up = tree.get(pid)
                inherited = up is not None and up in tree and label(up)[1]
                labels[pid] = (fn or _command(pid), on_path_function(fn) or inherited,
                               fn is not None)
            return labels[pid]

        for pid in tree:
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    start = f.read().rsplit(b")", 1)[1].split()[19].decode()  # starttime
            except (OSError, IndexError):
                continue
            name, on_path, worker = label(pid)
            e = self._update(("process", pid, start), name, on_path, process_cpu_s(pid),
                             worker)
            if e is not None and on_path:  # memory: only the path's processes
                mem = memory_kb(pid)
                e.hwm_kb = max(e.hwm_kb, mem.get("VmHWM", 0))
                if mem.get("VmRSS", 0) > e.rss_at_peak.get("VmRSS", -1):
                    e.rss_at_peak = mem
                e.max_mapped_updates = max(e.max_mapped_updates, mapped_update_files(pid))
        for t in threading.enumerate():
            tid = t.native_id
            if tid is None or not t.name.startswith(THREAD_PREFIXES):
                continue
            self._update(("thread", tid, t.name), t.name, True, thread_cpu_s(tid))
        path = [e for e in self.entities.values() if e.on_path]
        self.samples.append((now, sum(e.cpu_s for e in path if e.kind == "process"),
                             sum(e.cpu_s for e in path if e.kind == "thread")))

    def _update(self, key: tuple[str, int, str], label: str, on_path: bool,
                value: float | None, worker: bool = False) -> Entity | None:
        """Record ``value``, the entity's cumulative CPU seconds now (read to the
        nanosecond: 10 ms clock ticks would read a small round's CPU as nothing)."""
        if value is None:
            return None
        e = self.entities.get(key)
        if e is None:
            e = self.entities[key] = Entity(key[0], key[1], label, on_path, worker=worker)
        elif worker and not e.worker:
            # first seen between fork and exec (our own command line then): now it is a
            # Runtime worker. (A worker's label never changes back: an exited, unreaped
            # worker has no command line left.)
            e.label, e.worker, e.on_path = label, True, e.on_path or on_path
        e.cpu_s = max(e.cpu_s, value)
        return e

    # ---- what the samples say --------------------------------------------------------

    def path_cpu_at(self, t: float) -> tuple[float, float]:
        """The path's cumulative CPU seconds at wall time ``t`` (interpolated between
        samples): (its processes', its threads')."""
        s = self.samples
        if not s:
            return 0.0, 0.0
        if t <= s[0][0]:
            return s[0][1], s[0][2]
        for a, b in itertools.pairwise(s):
            if a[0] <= t <= b[0]:
                f = 0.0 if b[0] == a[0] else (t - a[0]) / (b[0] - a[0])
                return a[1] + (b[1] - a[1]) * f, a[2] + (b[2] - a[2]) * f
        return s[-1][1], s[-1][2]

    def path_processes(self) -> list[Entity]:
        return [e for e in self.entities.values() if e.on_path and e.kind == "process"]

    def path_threads(self) -> list[Entity]:
        return [e for e in self.entities.values() if e.on_path and e.kind == "thread"]

    def cpu_by_label(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for e in self.entities.values():
            out[e.label] = round(out.get(e.label, 0.0) + e.cpu_s, 3)
        return out
