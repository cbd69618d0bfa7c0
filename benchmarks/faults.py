#!/usr/bin/env python
"""The fault campaign: a short deterministic job, one fault per trial, resumed as a user would.

Each trial runs ``strato run`` on a small job (the MNIST example's model on the digits,
3 rounds, 6 clients, 3 a round, seed 1), injects one fault at a random moment of the
run (from its first millisecond to its end: start-up and shut-down included; a moment
the run outlived without the fault taking place is drawn again),
and, when the run did not finish, resumes it with ``strato run --resume OUT`` (up to
three times; a run killed before it could note anything, in its first ~50 ms, is
started again with its first command, as the resume's error then tells the user: the
``restarted`` count). ``--max-moment S`` draws the moments in the first S seconds
only (a campaign on the start-up). The trial passes when

- the final model equals the uninterrupted run's within 1e-6 (``diverged`` otherwise),
- every round accepted the same clients as the uninterrupted run (``lost_updates``: an
  update the reference accepted that the trial did not; ``double_counted``: a round
  whose accepted count exceeds its distinct accepted clients, or more accepted updates
  than the reference),
- nothing of the run is left in ``/dev/shm`` (``shm_leftovers``) and no worker of the
  run outlives it,
- neither the run nor a resume hung (``hung``: still running after 240 s, killed).

The faults (``--kinds``):

=====================  ===============================================================
``run-sigint``         Ctrl-C of the run process
``run-sigterm``        SIGTERM of the run process
``run-sigkill``        SIGKILL of the run process
``all-sigterm``        SIGTERM to the run process and all of its workers at once (as a
                       service manager stops a service)
``aggregator-sigkill`` SIGKILL of the aggregator's worker process (it hosts the node's
                       dispatcher thread: this is also the dispatcher's fault)
``aggregator-sigterm`` SIGTERM of the aggregator's worker process
``client-sigkill``     SIGKILL of a simulated client's worker process
``stream-redelivery``  SIGKILL of the run, then its update stream's checkpoint is lost:
                       on resume every update record is delivered again (twice, and
                       out of order with the new ones)
``bus-redelivery``     SIGKILL of the run, then every notice a client had received is
                       visible again (as after its visibility timeout)
``torn-blob``          the newest update blob on disk is cut to half its size
``disk-full``          the blob store lies on a 64 MB tmpfs of its own, which is filled
                       to the last byte; once the run has stopped (or after 60 s) the
                       filler is deleted, as a user freeing space would, and the run
                       is resumed if it did not finish (needs root, for the mount)
``serve-kill``         SIGINT, SIGTERM or SIGKILL (drawn) of ``strato serve``, whose six
                       clients are ``strato client`` processes, each with a credential
                       of its own; the server is resumed (``strato serve --resume OUT``
                       on the same port) and the clients go on as they are (one that
                       gave up waiting is started again, as a user would); the
                       reference is an uninterrupted ``strato serve`` run
=====================  ===============================================================

Prints a table, writes JSON (``--json``). ``--quick``: 20 trials; the full campaign
is ``--trials 204`` (17 of each kind).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

from _aggregation_common import write_results  # noqa: E402
from strato.codec import decode  # noqa: E402
from strato.errors import NotFound  # noqa: E402
from strato.fl import state  # noqa: E402
from strato.services import embedded  # noqa: E402
from strato.services.triggers import CHECKPOINTS  # noqa: E402

ROUNDS = 3
TOML = f"""
[job]
rounds = {ROUNDS}
clients = 6
clients_per_round = 3
seed = 1
client_concurrency = 2

[round]
round_deadline_s = 60

[train]
epochs = 2
batch_size = 16
lr = 0.05
"""
KINDS = (
    "run-sigint",
    "run-sigterm",
    "run-sigkill",
    "all-sigterm",
    "aggregator-sigkill",
    "aggregator-sigterm",
    "client-sigkill",
    "stream-redelivery",
    "bus-redelivery",
    "torn-blob",
    "disk-full",
    "serve-kill",
)
DISK_MB = 64
FULL_FOR_S = 60.0  # the longest a disk stays full while the run keeps going
RUN_TIMEOUT_S = 240.0
RESUMES = 3


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def make_app(where: Path) -> Path:
    app = where / "app"
    app.mkdir(parents=True, exist_ok=True)
    (app / "app.py").write_text((REPO / "examples" / "mnist" / "app.py").read_text())
    (app / "strato.toml").write_text(TOML)
    return app


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "STRATO_DATA_DIR"}  # the digits
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    return env


def start_run(args: list[str], log_file: Path) -> subprocess.Popen[bytes]:
    """``strato ARGS`` (``run …``, ``serve …``, ``client …``), its output in ``log_file``."""
    with log_file.open("ab") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "strato.cli", *args],
            env=_env(), stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip


def workers(out: Path, function: str | None = None) -> list[int]:
    """Live worker processes of the run in ``out`` (of one function, if named)."""
    pids = []
    root = str(out.resolve()).encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes()
            env = (proc / "environ").read_bytes()
        except OSError:
            continue
        if b"strato.services._worker\0" not in cmd or root not in env:
            continue
        # the worker's command line: -m strato.services._worker NAME HANDLER PARENT
        if function is None or f"_worker\0{function}\0".encode() in cmd:
            pids.append(int(proc.name))
    return pids


def shm_leftovers() -> set[str]:
    """Strato segments in /dev/shm whose owner process has exited."""
    left = set()
    for p in Path("/dev/shm").iterdir():
        parts = p.name.split("-")
        owner = parts[1] if p.name.startswith("strato-") and len(parts) > 1 else ""
        if owner.isdigit() and not Path("/proc", owner).exists():
            left.add(p.name)
    return left


def outcome(out: Path) -> dict[str, Any]:
    """The run's final model, accepted clients per round and accepted-update count."""
    with embedded(out / "services") as svc:
        model = np.array(decode(svc.blobs.get(state.model_key(ROUNDS))).flat(), np.float64)
        accepted: dict[int, list[str]] = {}
        counts: dict[int, int] = {}
        for r in range(1, ROUNDS + 1):
            items = svc.table.query(state.ACCEPTED, state.round_key(r) + "/")
            accepted[r] = sorted(i.value["client"] for i in items)
            rnd = svc.table.get(state.ROUNDS, state.round_key(r))
            counts[r] = int(rnd.value.get("accepted_count", -1)) if rnd else -1
    summary = json.loads((out / "summary.json").read_text())
    return {"model": model, "accepted": accepted, "counts": counts,
            "updates_accepted": int(summary["updates_accepted"])}  # fmt: skip


def _wait(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def _victim(out: Path, function: str, until: float) -> int | None:
    """A worker of ``function`` (waiting for one to be alive, up to ``until``)."""
    while time.monotonic() < until:
        found = workers(out, function)
        if found:
            return random.choice(found)
        time.sleep(0.01)
    return None


def _lose_checkpoint(out: Path) -> None:
    with embedded(out / "services") as svc:
        try:
            items = svc.table.query(CHECKPOINTS)
        except NotFound:  # killed before its trigger made the table: nothing to lose
            return
        for item in items:
            svc.table.delete(CHECKPOINTS, item.key)


def _redeliver_notices(out: Path) -> int:
    """Every notice received but not acknowledged becomes visible again."""
    db = out / "services" / "bus.sqlite"
    if not db.exists():
        return 0
    with sqlite3.connect(db, timeout=30) as conn:
        try:
            cur = conn.execute(
                "UPDATE messages SET visible_at = 0 WHERE receipt IS NOT NULL AND visible_at > ?",
                (time.time(),),
            )
        except sqlite3.OperationalError:  # killed before the bus made its table
            return 0
        return int(cur.rowcount)


def _tear_newest_update(out: Path) -> str | None:
    blobs = out / "services" / "blobs" / "updates"
    files = [p for p in blobs.rglob("*") if p.is_file() and not p.name.startswith(".")]
    if not files:
        return None
    newest = max(files, key=lambda p: p.stat().st_mtime_ns)
    size = newest.stat().st_size
    with newest.open("r+b") as f:
        f.truncate(size // 2)
    return newest.name


def inject(kind: str, proc: subprocess.Popen[bytes], out: Path, moment: float) -> str:
    """Inject the fault at ``moment`` seconds after the run's start; returns what was done."""
    start = time.monotonic()
    while time.monotonic() - start < moment and proc.poll() is None:
        time.sleep(0.005)
    if proc.poll() is not None and kind.startswith(("aggregator", "client", "torn")):
        return "the run had ended"
    if kind.startswith("run-") or kind in ("stream-redelivery", "bus-redelivery", "serve-kill"):
        sig = {"run-sigint": signal.SIGINT, "run-sigterm": signal.SIGTERM}.get(
            kind, signal.SIGKILL
        )
        if kind == "serve-kill":
            sig = random.choice((signal.SIGINT, signal.SIGTERM, signal.SIGKILL))
        if proc.poll() is not None:
            return "the run had ended"
        proc.send_signal(sig)
        return f"signal {sig.name} to " + ("strato serve" if kind == "serve-kill" else "the run")
    if kind == "all-sigterm":  # as a service manager stops a run: every process at once
        if proc.poll() is not None:
            return "the run had ended"
        pids = [proc.pid, *workers(out)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        return f"signal SIGTERM to the run and its {len(pids) - 1} worker(s) at once"
    if kind.startswith(("aggregator", "client")):
        function = "aggregate" if kind.startswith("aggregator") else "client"
        pid = _victim(out, function, time.monotonic() + 10)
        if pid is None:
            return f"no {function} worker alive"
        sig = signal.SIGTERM if kind.endswith("sigterm") else signal.SIGKILL
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return f"the {function} worker had exited"
        return f"signal {sig.name} to a {function} worker"
    if kind == "torn-blob":
        torn = _tear_newest_update(out)
        return f"tore update blob {torn}" if torn else "no update blob yet"
    if kind == "disk-full":
        if proc.poll() is not None:
            return "the run had ended"
        filled = _fill(out)
        _wait(proc, FULL_FOR_S)
        (_blob_disk(out) / FILLER).unlink()
        return f"filled the blob store's disk ({filled / 2**20:.1f} MB) until the run " + (
            "stopped" if proc.poll() is not None else f"had run {FULL_FOR_S:.0f} s more"
        )
    raise ValueError(kind)


FILLER = "filler"


def _blob_disk(out: Path) -> Path:
    return out / "services" / "blobs"


def _mount_small_disk(out: Path) -> None:
    disk = _blob_disk(out)
    disk.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m", "tmpfs", str(disk)],
                   check=True, capture_output=True)  # fmt: skip


def _unmount(where: Path) -> None:
    disk = _blob_disk(where / "out")
    if os.path.ismount(disk):
        subprocess.run(["umount", "-l", str(disk)], check=False, capture_output=True)


def _fill(out: Path) -> int:
    """Write a file until its disk has no byte left; returns how many bytes it took."""
    written = 0
    chunk = bytes(1 << 20)
    with (_blob_disk(out) / FILLER).open("wb", buffering=0) as f:
        while True:
            try:
                written += f.write(chunk)
            except OSError:
                break
        while True:  # the last partial chunk, down to single bytes
            try:
                if not f.write(b"\0" * 512):
                    break
                written += 512
            except OSError:
                try:
                    written += f.write(b"\0")
                except OSError:
                    break
    return written


CLIENTS = 6  # the job's clients; a serve trial runs each as a `strato client`
CLIENT_RESTARTS = 5


class Serving:
    """A `strato serve` trial's set-up: a credential per client, a port per trial."""

    def __init__(self, work: Path) -> None:
        self.dir = _mk(work / "serving")
        self.clients_file = self.dir / "clients.json"
        self.clients_file.unlink(missing_ok=True)
        for i in range(CLIENTS):
            issued = subprocess.run(
                [sys.executable, "-m", "strato.cli", "token", "issue", f"edge-{i}",
                 "--clients-file", str(self.clients_file)],
                env=_env(), capture_output=True, text=True, check=True,
            )  # fmt: skip
            token = self.dir / f"edge-{i}.token"
            token.write_text(issued.stdout)
            token.chmod(0o600)
        self.port = 0

    def new_port(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]

    def where(self) -> list[str]:
        return ["--port", str(self.port), "--clients-file", str(self.clients_file)]

    def first(self, app: Path, out: Path) -> list[str]:
        return ["serve", str(app), "--out", str(out), *self.where(),
                "--min-clients", str(CLIENTS)]  # fmt: skip

    def client(self, app: Path, i: int) -> list[str]:
        return ["client", str(app), "--server", f"http://127.0.0.1:{self.port}",
                "--token-file", str(self.dir / f"edge-{i}.token"),
                "--partition-index", str(i)]  # fmt: skip


class Clients:
    """The serve trial's remote clients, tended as a user would: a client that gave up
    (the server was away longer than it retries) is started again, until the job ends."""

    def __init__(self, serving: Serving, app: Path, out: Path, log_file: Path) -> None:
        self.serving, self.app, self.out, self.log_file = serving, app, out, log_file
        self.procs = [start_run(serving.client(app, i), log_file) for i in range(CLIENTS)]
        self.restarts = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._tend, daemon=True)
        self.thread.start()

    def _tend(self) -> None:
        while not self.done.wait(0.5):
            if (self.out / "summary.json").exists():
                return
            for i, proc in enumerate(self.procs):
                code = proc.poll()
                if code not in (None, 0) and self.restarts < CLIENT_RESTARTS * CLIENTS:
                    self.restarts += 1
                    self.procs[i] = start_run(self.serving.client(self.app, i), self.log_file)

    def stop(self, timeout: float) -> int:
        """Wait for the clients to hear the job finished; returns how many had to be killed."""
        self.done.set()
        self.thread.join()
        deadline = time.monotonic() + timeout
        killed = 0
        for proc in self.procs:
            if _wait(proc, max(0.0, deadline - time.monotonic())) is None:
                proc.kill()
                proc.wait()
                killed += 1
        return killed


def _finish(proc: subprocess.Popen[bytes]) -> bool:
    """Wait for ``proc`` up to the run timeout; True when it hung (and was killed)."""
    if _wait(proc, RUN_TIMEOUT_S) is not None:
        return False
    proc.kill()
    proc.wait()
    return True


def trial(app: Path, where: Path, kind: str | None, moment: float,
          serving: Serving | None = None) -> dict[str, Any]:
    """One run with the fault ``kind`` at ``moment`` (None: the uninterrupted reference),
    resumed until it finishes; with ``serving``, a `strato serve` run and its clients."""
    out = where / "out"
    log_file = where / "run.log"
    if kind == "disk-full":
        _mount_small_disk(out)
    if serving is not None:
        serving.new_port()
        first = serving.first(app, out)
        resume = ["serve", "--resume", str(out), *serving.where()]
    else:
        first = ["run", str(app), "--out", str(out)]
        resume = ["run", "--resume", str(out)]
    dead_before = shm_leftovers()
    proc = start_run(first, log_file)
    clients = None if serving is None else Clients(serving, app, out, where / "clients.log")
    injected = "nothing" if kind is None else inject(kind, proc, out, moment)
    code = _wait(proc, RUN_TIMEOUT_S)
    hung = code is None
    if hung:
        proc.kill()
        proc.wait()
    resumes, restarted, shm_stopped = 0, False, 0
    while not (out / "summary.json").exists() and resumes < RESUMES:
        deadline = time.monotonic() + 30
        while workers(out) and time.monotonic() < deadline:  # the killed run's workers go
            time.sleep(0.05)
        if resumes == 0:  # what the stopped run left before any later process swept it
            shm_stopped = len(shm_leftovers() - dead_before)
        if kind == "stream-redelivery" and resumes == 0 and (out / "services").exists():
            _lose_checkpoint(out)
        if kind == "bus-redelivery" and resumes == 0:
            injected += f"; {_redeliver_notices(out)} notice(s) visible again"
        resumes += 1
        seen = log_file.stat().st_size
        hung |= _finish(start_run(resume, log_file))
        said = log_file.read_bytes()[seen:].decode(errors="replace")
        if "nothing of it was started" in said and not restarted:
            # Killed before it could note anything (its first ~50 ms): the product says
            # to start it again with the first command, as a user then does.
            restarted = True
            hung |= _finish(start_run(first, log_file))
    record: dict[str, Any] = {"kind": kind, "moment_s": round(moment, 3), "injected": injected,
                              "exit": code, "resumes": resumes, "restarted": restarted,
                              "hung": hung, "shm_left_by_stopped_run": shm_stopped}  # fmt: skip
    if clients is not None:
        record["clients_killed"] = clients.stop(60.0)
        record["client_restarts"] = clients.restarts
    deadline = time.monotonic() + 30
    while workers(out) and time.monotonic() < deadline:
        time.sleep(0.05)
    record["workers_left"] = len(workers(out))
    if not (out / "summary.json").exists():
        record["finished"] = False
        tail = log_file.read_text(errors="replace").strip().splitlines()[-3:]
        record["error"] = " | ".join(tail)
        return record
    record["finished"] = True
    got = outcome(out)
    record["got"] = got
    return record


def judge(record: dict[str, Any], ref: dict[str, Any], shm_before: set[str]) -> dict[str, Any]:
    got = record.pop("got", None)
    lost = double = 0
    diverged = True
    if got is not None:
        for r, clients in ref["accepted"].items():
            lost += len(set(clients) - set(got["accepted"][r]))
            double += max(0, got["counts"][r] - len(got["accepted"][r]))
        double += max(0, got["updates_accepted"] - ref["updates_accepted"])
        diff = float(np.abs(got["model"] - ref["model"]).max())
        record["max_abs_diff"] = diff
        diverged = not diff <= 1e-6
    shm = sorted(shm_leftovers() - shm_before)
    record.update(lost_updates=lost, double_counted=double, diverged=diverged,
                  shm_leftovers=len(shm))  # fmt: skip
    if shm:  # named, so that a leftover can be traced to the process that made it
        record["shm_names"] = shm[:20]
    record["fault_injected"] = not record["injected"].startswith(("the run had ended", "no "))
    record["passed"] = bool(
        got is not None and not lost and not double and not diverged and not shm
        and not record["workers_left"] and not record["hung"]
    )
    return record


def _harness_failure(kind: str, moment: float, exc: Exception, where: Path) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while workers(where / "out") and time.monotonic() < deadline:
        time.sleep(0.05)
    return {"kind": kind, "moment_s": round(moment, 3), "injected": "harness error",
            "error": f"harness: {type(exc).__name__}: {exc}", "exit": None, "resumes": 0,
            "hung": False, "finished": False, "workers_left": len(workers(where / "out")),
            "lost_updates": 0, "double_counted": 0, "diverged": True, "shm_leftovers": 0,
            "fault_injected": True, "passed": False}  # fmt: skip


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    def totals(rs: list[dict[str, Any]]) -> dict[str, int]:
        return {
            "trials": len(rs),
            "passed": sum(r["passed"] for r in rs),
            "lost_updates": sum(r["lost_updates"] for r in rs),
            "double_counted": sum(r["double_counted"] for r in rs),
            "diverged": sum(r["diverged"] for r in rs),
            "shm_leftovers": sum(r["shm_leftovers"] for r in rs),
            "unfinished": sum(not r["finished"] for r in rs),
            # a run (or a resume) that neither finished nor stopped within its time:
            # killed, and the trial fails even if a later resume put it right
            "hung": sum(r["hung"] for r in rs),
            # killed before it noted anything: started again with its first command,
            # as the resume's error says to
            "restarted": sum(r.get("restarted", False) for r in rs),
            # trials whose five drawn moments all missed (the run had ended, or had no
            # worker or blob of the kind yet): they passed, but nothing was injected
            "without_fault": sum(not r["fault_injected"] for r in rs),
            "workers_left": sum(r["workers_left"] for r in rs),
            # segments a stopped run left in /dev/shm until its resume swept them (not a
            # failure: the resume cleans up; a run never resumed would leave them)
            "shm_left_by_stopped_run": sum(r.get("shm_left_by_stopped_run", 0) for r in rs),
        }

    kinds = sorted({r["kind"] for r in records})
    return {**totals(records),
            "per_kind": {k: totals([r for r in records if r["kind"] == k]) for k in kinds}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=200)
    p.add_argument("--quick", action="store_true", help="20 trials")
    p.add_argument("--kinds", default=",".join(KINDS), help="comma-separated fault kinds")
    p.add_argument("--seed", type=int, default=0, help="the campaign's random seed")
    p.add_argument("--max-moment", type=float,
                   help="draw the fault's moment in [0, S] s instead of the whole run "
                   "(a campaign on the start-up alone)")  # fmt: skip
    p.add_argument("--work", default="/tmp/strato-faults", help="scratch directory")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    # A shell's background job starts with SIGINT ignored, and its children inherit
    # that: the processes we start must get Ctrl-C as a user's would.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    trials = 20 if args.quick else args.trials
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    bad = sorted(set(kinds) - set(KINDS))
    if bad or trials < 1:
        p.error(f"unknown kind(s) {', '.join(bad)}" if bad else "--trials must be at least 1")
    if "disk-full" in kinds and os.geteuid() != 0:
        if args.kinds != ",".join(KINDS):
            p.error("the disk-full kind mounts a small tmpfs: run the campaign as root")
        kinds.remove("disk-full")
        log("not root: the disk-full kind (which mounts a small tmpfs) is left out")
    random.seed(args.seed)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    app = make_app(work)

    serving = Serving(work) if "serve-kill" in kinds else None
    refs: dict[str, dict[str, Any]] = {}
    walls: dict[str, float] = {}
    for how in ("run", "serve") if serving is not None else ("run",):
        log(f"reference: one uninterrupted `strato {how}`")
        ref_dir = work / f"reference-{how}"
        _clean(ref_dir)
        started = time.monotonic()
        done = trial(app, _mk(ref_dir), None, 0.0, serving if how == "serve" else None)
        walls[how] = time.monotonic() - started
        if not done["finished"] or done["exit"] != 0 or done["hung"]:
            log((ref_dir / "run.log").read_text())
            return 1
        refs[how] = done["got"]
        log(f"reference: {walls[how]:.1f} s, {refs[how]['updates_accepted']} updates accepted")

    records = []
    shm_before = shm_leftovers()
    for i in range(trials):
        kind = kinds[i % len(kinds)]
        where = work / f"trial-{i:04d}"
        t0 = time.monotonic()
        how = "serve" if kind == "serve-kill" else "run"
        wall = walls[how]
        for _draw in range(5):  # a moment past the run's end injects nothing: draw again
            moment = random.uniform(0.0, min(wall, args.max_moment or wall))
            _clean(where)
            _mk(where)
            try:
                done = trial(app, where, kind, moment, serving if how == "serve" else None)
                record = judge(done, refs[how], shm_before)
            except Exception as exc:  # the campaign's own failure: this trial fails, not all
                record = _harness_failure(kind, moment, exc, where)
            if record["fault_injected"]:
                break
        record["trial"], record["wall_s"] = i, round(time.monotonic() - t0, 1)
        records.append(record)
        verdict = "pass" if record["passed"] else "FAIL"
        log(f"trial {i + 1}/{trials} {kind:<19} at {moment:5.2f} s: {verdict} "
            f"({record['injected']}; resumes {record['resumes']}"
            + (f"; {record.get('error', '')}" if not record["finished"] else "")
            + f"; lost {record['lost_updates']}, double {record['double_counted']}, "
            f"diverged {record['diverged']}, shm {record['shm_leftovers']})")  # fmt: skip
        if record["passed"]:
            _clean(where)  # keep the failures to look at
        if args.json and i + 1 < trials:  # a campaign stopped early keeps what it found
            write_results(Path(args.json), result_of(records, trials, args, walls, argv))
    result = result_of(records, trials, args, walls, argv)
    print(table(result))
    if args.json:
        write_results(Path(args.json), result)
    return 0


def result_of(records: list[dict[str, Any]], planned: int, args: argparse.Namespace,
              walls: dict[str, float], argv: list[str] | None) -> dict[str, Any]:
    return {
        "command": "python benchmarks/faults.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "seed": args.seed,
        "max_moment_s": args.max_moment,
        "reference_wall_s": round(walls["run"], 2),
        "reference_wall_s_serve": round(walls["serve"], 2) if "serve" in walls else None,
        "trials_planned": planned,
        "complete": len(records) == planned,
        **summarise(records),
        "records": records,
    }


def table(result: dict[str, Any]) -> str:
    cols = ("trials", "passed", "lost_updates", "double_counted", "diverged", "shm_leftovers",
            "unfinished", "hung", "without_fault")  # fmt: skip
    lines = ["| fault | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for kind, row in result["per_kind"].items():
        lines.append(f"| {kind} | " + " | ".join(str(row[c]) for c in cols) + " |")
    lines.append("| **all** | " + " | ".join(str(result[c]) for c in cols) + " |")
    return "\n".join(lines)


def _mk(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _clean(path: Path) -> None:
    import shutil

    _unmount(path)
    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
