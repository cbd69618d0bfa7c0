"""``strato run``: set up a run, drive its round loop, report, and resume after a kill.

The run directory OUT holds everything: ``services/`` (the embedded backend's
table, bus and blobs), ``run.json`` (what to resume), ``metrics.jsonl`` (a line per
finished round), ``summary.json`` and ``curves.png``. This process drives the
workflow and hosts the stream trigger and the runtime's workers; it holds no
round state of its own, so a SIGKILL loses nothing that a resume cannot redo.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from strato.codec import encode
from strato.control.asynchronous import STALE
from strato.errors import ConfigError, NotFound, StratoError
from strato.fl import buffered, coordinator, report, state
from strato.fl.app import load_app
from strato.fl.config import JobConfig
from strato.fl.data import prepare_job_data
from strato.fl.strategies import download_key, initial_download
from strato.services import (
    AppResources,
    Execution,
    Meter,
    RuntimeStats,
    Services,
    StreamSource,
    Trigger,
    open_run,
)

__all__ = ["RunOptions", "app_resources", "run_job"]


@dataclass
class RunOptions:
    app_dir: Path
    out: Path
    config: JobConfig
    data_dir: str | None = None
    resume: bool = False
    quiet: bool = False
    # False: clients are remote (the gateway); rounds select among registered clients.
    simulate: bool = True
    # Called with the run's services once they are set up; returns a function that stops
    # what it started (the HTTP gateway of `strato serve` runs this way).
    attach: Callable[[Services], Callable[[], None]] | None = None
    # The Services config of the backend to run on (e.g. {"backend": "aws", "prefix": ...,
    # "endpoint_url": ...}); None: the embedded backend in OUT/services.
    services: dict[str, Any] | None = None
    # One line for the user when strato.toml shaped the job for its data ([dataset.NAME]).
    shape_note: str | None = None


# The updates stream wakes the aggregator: INSERTs only (an update is written once).
_AGGREGATE_SOURCE = StreamSource(state.UPDATES, "aggregate", kinds=("INSERT",))


def app_resources(cfg: JobConfig) -> AppResources:
    """What an FL run uses of the services, as plain data: a backend that provisions
    ahead of time (AWS: ``strato deploy aws``, or ``strato run`` against an endpoint)
    deploys it."""
    return AppResources(
        name="fl",
        description="Strato federated learning: rounds on Step Functions, updates through "
        "S3 and DynamoDB Streams, notices on SNS/SQS",
        tables=state.TABLES,
        topics={state.TOPIC: coordinator.notice_schema()},
        functions=tuple(coordinator.function_specs(cfg)),
        state_machines={
            coordinator.MACHINE: coordinator.round_loop_definition(cfg.round_deadline_s)
        },
        triggers=(_AGGREGATE_SOURCE,),
        queues=(state.client_queue("*"),),  # simulated clients read their own queue
        invoked=("client", "aggregate", "leaf", "send_up"),
        # a simulated client's update: it can train again if the node holding it goes
        node_local_blobs=("updates/",),
        # a leaf's partial of such updates, read once by the root: its updates go to a
        # leaf again if it is lost
        handoff_blobs=("partials/",),
    )


def _open_services(opts: RunOptions) -> Services:
    """The run's services: embedded in OUT, or the backend ``opts.services`` names (on a
    resume, the one run.json recorded), with the run's resources in place."""
    if opts.services is None and opts.resume:
        opts.services = json.loads((opts.out / "run.json").read_text()).get("services")
    config = dict(opts.services or {"backend": "embedded"})
    config.setdefault("root", str((opts.out / "services").resolve()))
    svc = open_run(config, app_resources(opts.config))
    if not opts.resume:
        try:
            existing = svc.table.get(state.JOB, "config")
        except NotFound:  # a table not made yet: no run there
            existing = None
        if existing is not None:
            svc.close()
            where = ", ".join(f"{k} {config[k]}" for k in ("backend", "prefix") if k in config)
            raise ConfigError(
                f"the services ({where}) already hold a run of {existing.value.get('app_dir')}: "
                "resume it with --resume OUT, or start this run on other services "
                "(another --prefix, or after `strato deploy ... --delete`)"
            )
    return svc


def _start_trigger(svc: Services, opts: RunOptions) -> Trigger:
    """What wakes the aggregator on the updates stream: the backend's (a poller here,
    or the cloud's own event source mapping)."""
    keep = opts.config.keep_rounds
    if keep <= 0:
        return svc.start_trigger(_AGGREGATE_SOURCE)
    # --keep-rounds K: the stream keeps about K rounds of update records behind the
    # aggregator's checkpoint, and no more (older rounds are summed up in their metrics).
    retain = max(100, keep * opts.config.clients_per_round)
    return svc.start_trigger(dataclasses.replace(_AGGREGATE_SOURCE, retain=retain))


def _write_usage(svc: Services, opts: RunOptions, meter: Meter) -> None:
    """``<backend>-usage.json``: what the backend bills for this segment of the run,
    where it bills something (AWS)."""
    try:
        usage = meter.usage(coordinator.MACHINE, coordinator.EXECUTION_ID)
        if usage is None:
            return
        rounds = len(svc.table.query(state.METRICS))
        usage = {"rounds": rounds, **usage}
        if rounds and "usd" in usage:
            usage["usd_per_round"] = usage["usd"]["total"] / rounds
        (opts.out / f"{svc.backend}-usage.json").write_text(json.dumps(usage, indent=2))
    except Exception as exc:  # accounting must not turn a finished run into a failure
        print(f"strato: could not write {svc.backend}-usage.json: {exc}", file=sys.stderr)


def _say(opts: RunOptions, text: str) -> None:
    if not opts.quiet:
        print(text, flush=True)


def _setup(svc: Services, opts: RunOptions) -> dict[str, Any]:
    """Create the run's resources, data partition and initial model; returns the job."""
    from strato.fl.torch import model_params

    cfg = opts.config
    app = load_app(opts.app_dir)
    clients = [f"{i:04d}" for i in range(cfg.clients)]
    coordinator.provision(svc, clients)
    data = prepare_job_data(svc, cfg, opts.data_dir)
    assert app.model_fn is not None
    import torch

    torch.manual_seed(cfg.seed)
    initial = model_params(app.model_fn(data.info))
    # CS with a quantized round 1: the run starts from the model its clients decode.
    initial, download = initial_download(cfg.strategy, cfg.strategy_options, cfg.seed, initial)
    if download is not None:
        svc.blobs.put(download_key(state.model_key(0)), download)
    svc.blobs.put(state.model_key(0), encode(initial, {"round": "0"}).payload)
    job = {
        "config": cfg.to_dict(),
        "app_dir": str(opts.app_dir.resolve()),
        "clients": clients,
        "quorum_count": cfg.quorum_count,
        "layout": initial.layout.to_json(),
        "simulate": opts.simulate,
        **data.job_fields,
    }
    svc.table.put(state.JOB, "config", job)
    return job


def _register(svc: Services, job: dict[str, Any]) -> None:
    cfg = JobConfig.from_dict(job["config"])
    for spec in coordinator.function_specs(cfg):
        svc.runtime.register(spec)
    svc.workflow.create_state_machine(
        coordinator.MACHINE, coordinator.round_loop_definition(cfg.round_deadline_s)
    )


def _resume_job(svc: Services, opts: RunOptions, run_file: Path) -> dict[str, Any]:
    try:
        item = svc.table.get(state.JOB, "config")
    except NotFound:  # killed before its tables were made
        item = None
    if item is not None:
        _say(opts, f"resuming {opts.out}")
        coordinator.create_tables(svc)  # those a run made by an older Strato lacks
        return item.value
    # Killed during its set-up (the job record is the set-up's last write): do it again,
    # with the settings the run started with. Every step of the set-up is idempotent.
    recorded = json.loads(run_file.read_text())
    if "config" not in recorded:
        raise ConfigError(f"{opts.out} holds no run to resume")
    opts.config = JobConfig.from_dict(recorded["config"])
    opts.data_dir = recorded.get("data_dir")
    opts.simulate = bool(recorded.get("simulate", True))
    _say(opts, f"resuming {opts.out}: it was stopped during its set-up; setting it up again")
    return _setup(svc, opts)


def _relaunch_missing_clients(svc: Services, job: dict[str, Any]) -> None:
    """After a resume, restart the simulated clients of the open round that had not
    uploaded (their workers died with the killed run; their notices are still queued)."""
    if buffered.is_async(job):  # the clients in flight: their notices are still queued
        for c in buffered.in_flight(svc):
            svc.runtime.invoke_async("client", {"client": c, "wait_s": 60.0})
        return
    rounds = svc.table.query(state.ROUNDS)
    if not rounds or rounds[-1].value["status"] != "open":
        return
    rnd = rounds[-1].value
    done = {
        u.value["client"] for u in svc.table.query(state.UPDATES, state.round_key(rnd["round"]))
    }
    for c in state.selected(svc.table, int(rnd["round"]), rnd):
        if c not in done:
            svc.runtime.invoke_async("client", {"client": c, "wait_s": 60.0})


class _Failures:
    """Failures of simulated clients and of the aggregator, each told once (a round
    closes at its deadline without a failed client); one caused by a full disk stops
    the run, which ``--resume`` continues once there is room: the update or the close
    is made again, so nothing is lost."""

    def __init__(self, svc: Services, out: Path, command: str) -> None:
        self.svc, self.out, self.command = svc, out, command
        self.seen = {item.key for item in svc.table.query(state.FAILURES)}  # earlier segments
        self.next_check = 0.0

    def new(self) -> list[str]:
        if time.monotonic() < self.next_check:
            return []
        self.next_check = time.monotonic() + 1.0
        lines = []
        for item in self.svc.table.query(state.FAILURES):
            if item.key in self.seen:
                continue
            self.seen.add(item.key)
            f = item.value
            who = "the aggregator" if f["who"] == state.AGGREGATOR else f"client {f['who']}"
            where = f"{who} in round {f['round']}"
            if f.get("disk_full"):
                raise StratoError(
                    f"the disk is full: {where} failed with {f['error']}; "
                    f"free some space, then continue with: {self.command} --resume {self.out}"
                )
            lines.append(f"{where} failed: {f['error']}")
        return lines


class _Accounting:
    """Cost counters that survive a resume: earlier segments' totals live in OUT."""

    def __init__(self, out: Path, svc: Services) -> None:
        self.path = out / "accounting.json"
        self.svc = svc
        self.before = json.loads(self.path.read_text()) if self.path.exists() else {}
        self._saved: dict[str, float] = {}
        self.last_cold = 0
        # What the backend counts of the functions (on AWS: what Lambda ran, whoever
        # invoked it; embedded: this process's runtime).
        self._stats: Callable[[], RuntimeStats] = svc.meter().stats

    def totals(self) -> dict[str, float]:
        s = self._stats()
        prev = self.before
        return {
            "function_seconds": prev.get("function_seconds", 0.0) + s.billed_s,
            "gb_seconds": prev.get("gb_seconds", 0.0) + s.gb_s,
            "cold_starts": prev.get("cold_starts", 0) + s.cold_starts,
            "invocations": prev.get("invocations", 0) + s.invocations,
        }

    def invocations_this_segment(self) -> int:
        return self._stats().invocations

    def cold_since_last(self) -> int:
        cold = self._stats().cold_starts
        delta, self.last_cold = cold - self.last_cold, cold
        return delta

    def save(self) -> None:
        """Atomically (a kill mid-write must not leave a torn file for the resume)."""
        totals = self.totals()
        if totals != self._saved:
            _write_atomic(self.path, json.dumps(totals))
            self._saved = totals


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_job(opts: RunOptions) -> dict[str, Any]:
    opts.out.mkdir(parents=True, exist_ok=True)
    run_file = opts.out / "run.json"
    if opts.resume and not run_file.exists():
        raise ConfigError(f"{opts.out} holds no run to resume (no run.json)")
    if not opts.resume and run_file.exists():
        raise ConfigError(
            f"{opts.out} already holds a run: resume it with --resume {opts.out} "
            "or choose another --out"
        )
    started = time.time()
    if not opts.resume:
        # Written first: a run killed at any moment, even during its set-up, resumes.
        _write_atomic(
            run_file,
            json.dumps({
                "execution": coordinator.EXECUTION_ID,
                "app_dir": str(opts.app_dir.resolve()),
                "started": started,
                # the backend, to resume on (credentials stay out of the file)
                "services": {
                    k: v for k, v in (opts.services or {}).items() if k != "credentials"
                } or None,
                # what the set-up needs, should it have to be done again
                "config": opts.config.to_dict(),
                "data_dir": opts.data_dir,
                "simulate": opts.simulate,
            }),
        )  # fmt: skip
    svc = _open_services(opts)
    trigger: Trigger | None = None
    meter: Meter | None = None
    detach: Callable[[], None] | None = None
    try:
        if opts.resume:
            job = _resume_job(svc, opts, run_file)
            opts.config = JobConfig.from_dict(job["config"])
        else:
            job = _setup(svc, opts)
        _say(opts, f"data: {job['dataset_note']}")
        if opts.shape_note:
            _say(opts, opts.shape_note)
        _register(svc, job)
        if opts.attach is not None:
            # Before the round loop starts: `strato serve` waits here for its first clients.
            detach = opts.attach(svc)
        svc.workflow.start(coordinator.MACHINE, {"round": 1}, coordinator.EXECUTION_ID)
        meter = svc.meter()
        trigger = _start_trigger(svc, opts)
        # (Where functions run in the cloud, simulated clients did not die with this process.)
        if opts.resume and job.get("simulate", True) and svc.local_workers:
            _relaunch_missing_clients(svc, job)
        return _drive(svc, opts, job, started)
    finally:
        if detach is not None:
            detach()
        if trigger is not None:
            trigger.stop()
        if meter is not None:
            _write_usage(svc, opts, meter)
        svc.close()


def _drive(svc: Services, opts: RunOptions, job: dict[str, Any], started: float) -> dict[str, Any]:
    cfg = opts.config
    metrics_path = opts.out / "metrics.jsonl"
    rows = {r["round"]: r for r in report.read_jsonl(metrics_path)}
    accounting = _Accounting(opts.out, svc)
    progress = report.Progress(cfg.rounds)
    progress.update(len(rows))
    outcome: dict[str, Execution | BaseException] = {}

    def drive() -> None:
        try:
            outcome["execution"] = svc.workflow.wait(coordinator.EXECUTION_ID)
        except BaseException as exc:  # reported by the main thread
            outcome["error"] = exc

    failures = _Failures(svc, opts.out,
                         "strato serve" if opts.attach is not None else "strato run")
    driver = threading.Thread(target=drive, name="workflow driver", daemon=True)
    driver.start()
    while True:
        finished = not driver.is_alive()
        for line in failures.new():
            progress.clear()
            _say(opts, line)
            progress.update(len(rows))
        for item in svc.table.query(state.METRICS):
            m = item.value
            if m["round"] in rows:
                continue
            row = {
                **m,
                "cold_starts": accounting.cold_since_last(),
                "function_seconds": round(accounting.totals()["function_seconds"], 3),
            }
            rows[m["round"]] = row
            report.append_jsonl(metrics_path, row)
            accounting.save()
            progress.clear()
            _say(opts, report.round_line(row, cfg.rounds))
            progress.update(len(rows))
        if finished:
            break
        # Counted work is saved as it happens: a kill loses at most this slice of it.
        accounting.save()
        driver.join(0.2)
    progress.clear()
    if "error" in outcome:
        err = outcome["error"]
        raise err if isinstance(err, StratoError) else StratoError(f"round loop failed: {err}")
    execution = outcome["execution"]
    assert isinstance(execution, Execution)
    if execution.status != "SUCCEEDED":
        raise StratoError(f"round loop {execution.status}: {execution.error}: {execution.cause}")
    return _finish(svc, opts, [rows[k] for k in sorted(rows)], accounting, started)


def _async_summary(svc: Services, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """An async run's versions, how stale their updates were, and how many were refused
    as too stale."""
    histogram: dict[str, int] = {}
    for row in rows:
        for s, n in row.get("staleness", {}).items():
            histogram[s] = histogram.get(s, 0) + int(n)
    stale = [i for i in svc.table.query(state.REJECTIONS)
             if str(i.value.get("reason", "")).startswith(STALE)]
    return {"mode": "async", "versions": len(rows),
            "staleness_histogram": dict(sorted(histogram.items(), key=lambda kv: int(kv[0]))),
            "updates_refused_stale": len(stale)}


def _finish(
    svc: Services,
    opts: RunOptions,
    rows: list[dict[str, Any]],
    accounting: _Accounting,
    started: float,
) -> dict[str, Any]:
    totals = accounting.totals()
    accounting.save()
    first = json.loads((opts.out / "run.json").read_text())["started"]
    last = rows[-1] if rows else {}
    summary = {
        "rounds": len(rows),
        "final_accuracy": last.get("accuracy"),
        "final_loss": last.get("loss"),
        "wall_s": round(time.time() - first, 3),
        "wall_s_this_segment": round(time.time() - started, 3),
        "bytes_up": sum(r["bytes_up"] for r in rows),
        "bytes_down": sum(r["bytes_down"] for r in rows),
        "function_seconds": round(totals["function_seconds"], 3),
        "gb_seconds": round(totals["gb_seconds"], 3),
        "invocations": totals["invocations"],
        "invocations_this_segment": accounting.invocations_this_segment(),
        "cold_starts": totals["cold_starts"],
        "updates_accepted": sum(r["accepted"] for r in rows),
        "updates_rejected": len(svc.table.query(state.REJECTIONS)),
        "rejection_reasons": sorted({i.value["reason"] for i in svc.table.query(state.REJECTIONS)}),
        "config": opts.config.to_dict(),
        "per_round": rows,
    }
    if opts.config.mode == "async":
        summary.update(_async_summary(svc, rows))
    where = getattr(svc.runtime, "placement", None)  # a backend with nodes says where
    if callable(where):
        try:
            summary["placement"] = where()
        except Exception as exc:  # a report must not fail a finished run
            summary["placement"] = {"error": str(exc)}
    (opts.out / "summary.json").write_text(json.dumps(summary, indent=2))
    curves = report.write_curves(opts.out / "curves.png", rows, started=first)
    _say(
        opts,
        f"done: {summary['rounds']} {'versions' if summary.get('mode') == 'async' else 'rounds'}"
        f", final accuracy {summary['final_accuracy']:.4f}, "
        f"{summary['wall_s']:.1f} s; wrote {opts.out}/summary.json, metrics.jsonl"
        + (", curves.png" if curves else " (matplotlib missing: no curves.png)"),
    )
    sys.stdout.flush()
    return summary
