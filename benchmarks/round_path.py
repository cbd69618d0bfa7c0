"""Round-path benchmark: the real ``strato run`` round path, side by side with an eager
always-on server fed the very same updates on the very same arrival schedule.

    python benchmarks/round_path.py --quick    # 100 clients × 10M, 2 rounds; RSS runs of 1 round
    python benchmarks/round_path.py            # 5 rounds; RSS runs of 2 rounds
    (both run the sharded median when strato.aggregation.sharded exists; --no-sharded skips it)

Writes ``benchmarks/results/round_path/quick.json`` (``--quick``) or ``full.json``
(``--json PATH`` to choose); run directories go to a temp dir deleted afterwards
(``--out DIR`` to choose, ``--keep`` to keep them).

1. **Our round path.** A child process calls ``strato.fl.run.run_job`` (the whole
   embedded pipeline: workflow, bus, table, runtime workers, stream trigger,
   aggregator) on an app whose 100 clients upload pre-generated float32 updates of
   exactly P = 10M parameters instead of training (``_round_path_app``); every client
   in every round, quorum all. Round 1 is a warm-up (cold starts); medians are over
   the rounds after it. ``completion_s`` is the run's own ``aggregation_latency_s``
   (``fl/functions.py`` ``evaluate``): the round record's ``model_ready_at`` (set once
   the new model's blob is written) − the last accepted update's ``uploaded_at``.
2. **Eager always-on server** (``_round_path_server``): one warm process, started
   before the replayed rounds; each recorded update's blob file is handed to it at its
   recorded arrival time; it maps the file and adds it at once with
   ``strato.aggregation.accumulate`` (float32, one update per call, 1 BLAS thread),
   then writes the model like our aggregator does. Completion: model written − last
   update handed over. ``completion_ratio_vs_eager_server`` = its completion ÷ ours.
3. **CPU per update** (``_round_path_proc``): CPU seconds of the aggregation path per
   accepted update (the aggregator's worker processes and their descendants, and the
   stream trigger thread of the run process), per round, ÷ one single-threaded BLAS
   ``saxpy`` over one update timed in the run process right after the run. The last
   round's window ends 1 s after its model is written; the run's teardown is reported
   apart and counted in ``cpu_per_update_ratio_whole_run``.
4. **Peak RSS** of the aggregation path's processes (VmHWM) at 1000 clients × 1M
   ÷ at 100 clients × 1M. These two runs and the sharded median run at the same time,
   after the timed parts: they measure memory, not time.
5. **Sharded median** (``_round_path_sharded``): null while ``strato.aggregation.sharded``
   does not exist.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _aggregation_common import (
    cpu_count,
    emit,
    l3_cache_kib,
    log,
    median,
    mem_available,
    run_script_child,
    write_results,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "round_path"
M = 1_000_000
TARGETS = {  # key: (comparison, bound)
    "completion_ratio_vs_eager_server": (">=", 0.8),
    "cpu_per_update_ratio": ("<=", 2.0),
    "peak_rss_ratio_1000_vs_100": ("<=", 1.3),
}


# ---- children ---------------------------------------------------------------------------


def child_main(kind: str, cfg: dict[str, Any]) -> None:
    if kind == "run":
        from _round_path_run import run
    elif kind == "sharded":
        from _round_path_sharded import run
    else:
        raise SystemExit(f"unknown child {kind!r}")
    emit(run(cfg))


def run_child(kind: str, cfg: dict[str, Any], timeout: float = 3600) -> dict[str, Any]:
    return run_script_child(str(Path(__file__)), kind, cfg, timeout)


# ---- plan, disk ---------------------------------------------------------------------------


def plan(args: argparse.Namespace) -> dict[str, Any]:
    if args.smoke:  # the test suite's: seconds, no RSS runs, no sharded part
        main = {"params": 10_000, "clients": 4, "rounds": 2, "concurrency": 1}
        rss = None
    else:
        main = {"params": 10 * M, "clients": 100, "rounds": 2 if args.quick else 5}
        rss = {"params": M, "clients": [100, 1000], "rounds": 1 if args.quick else 2}
    if args.rounds:
        main["rounds"] = args.rounds
    main.setdefault("concurrency", args.concurrency)  # --smoke: one client worker to start
    main["accumulator"] = args.accumulator
    return {"main": main, "rss": rss, "sharded": not (args.smoke or args.no_sharded)}


def disk_needed(params: int, clients: int, rounds: int) -> int:
    """Bytes a run directory grows to: every update blob, every model (ours and the
    server's), the databases; with a margin."""
    blob = 4 * params + 512
    return int(1.1 * (rounds * clients * blob + (2 * rounds + 2) * blob)) + (256 << 20)


def check_disk(where: Path, need: int) -> dict[str, Any]:
    free = shutil.disk_usage(where).free
    if free < need:
        raise SystemExit(f"not enough disk under {where}: {free / 2**30:.1f} GiB free, "
                         f"this run needs ~{need / 2**30:.1f} GiB")
    return {"path": str(where), "free_gib": round(free / 2**30, 1),
            "needed_gib": round(need / 2**30, 1)}


def remove(path: Path, keep: bool) -> None:
    if not keep:
        shutil.rmtree(path, ignore_errors=True)


# ---- the parts ------------------------------------------------------------------------


def main_run(args: argparse.Namespace, cfg: dict[str, Any], base: Path) -> dict[str, Any]:
    from _round_path_server import run_server

    where = base / "main"
    log(f"strato run — {cfg['clients']} clients × {cfg['params']:,} params, {cfg['rounds']} rounds")
    t0 = time.monotonic()
    res = run_child("run", {**cfg, "dir": str(where), "interval_s": args.interval})
    t1 = time.monotonic()
    rounds = res["rounds"]
    warm = 1 if len(rounds) > 1 else 0
    for r in rounds:
        log(f"  round {r['round']}{' (warm-up)' if r['round'] <= warm else ''}: completion "
            f"{r['completion_s']:.4f}s, {r['accepted']} updates over "
            f"{r['last_upload_at'] - r['first_upload_at']:.1f}s, path CPU "
            f"{r['path_cpu_s_per_update'] * 1e3:.1f} ms/update")
    log(f"eager always-on server — replaying rounds {[r['round'] for r in rounds[warm:]]}")
    server = run_server(cfg["params"], [rounds[0], *rounds[warm:]], where / "eager-server")
    remove(where, args.keep)
    for r in rounds:
        r.pop("updates")  # the replay's input: thousands of lines nobody reads
    return {"run": res, "server": server, "warmup_rounds": warm,
            "wall_s": {"strato_run": t1 - t0, "eager_server_replay": time.monotonic() - t1}}


def rss_run(args: argparse.Namespace, cfg: dict[str, Any], clients: int,
            base: Path) -> dict[str, Any]:
    where = base / f"rss-{clients}"
    log(f"peak RSS — {clients} clients × {cfg['params']:,} params, {cfg['rounds']} round(s)")
    t0 = time.monotonic()
    res = run_child("run", {"params": cfg["params"], "clients": clients,
                            "rounds": cfg["rounds"], "concurrency": args.concurrency,
                            "dir": str(where), "interval_s": args.interval,
                            "references": False})
    remove(where, args.keep)
    for r in res["rounds"]:
        r.pop("updates")
    path = res["path"]
    log(f"  {clients} clients: aggregation path peak RSS {path['peak_rss_kb'] / 1024:.0f} MB "
        f"over {len(path['processes'])} process(es)")
    return {
        "peak_rss_kb": path["peak_rss_kb"],
        "processes": path["processes"],
        "rounds": res["rounds"],
        "completion_s": [r["completion_s"] for r in res["rounds"]],
        "wall_s": time.monotonic() - t0,
        "cpu_s_by_label": res["cpu_s_by_label"],
    }


def memory_parts(args: argparse.Namespace, cfg: dict[str, Any] | None, sharded: bool,
                 base: Path) -> tuple[dict[str, Any] | None, dict[str, Any], float]:
    """The peak-RSS runs and the sharded median, at once: they measure memory, which
    does not depend on sharing the CPU (the timed parts ran alone before them)."""
    from concurrent.futures import ThreadPoolExecutor

    if cfg is not None:
        for clients in cfg["clients"]:
            check_disk(base, disk_needed(cfg["params"], clients, cfg["rounds"]))
    with ThreadPoolExecutor(max_workers=3) as pool:
        t0 = time.monotonic()
        rss_futures = ({str(c): pool.submit(rss_run, args, cfg, c, base) for c in cfg["clients"]}
                       if cfg is not None else {})

        def timed_sharded() -> tuple[dict[str, Any], float]:
            return sharded_part(args, sharded), time.monotonic() - t0

        sharded_future = pool.submit(timed_sharded)
        rss = {k: f.result() for k, f in rss_futures.items()} if cfg is not None else None
        sharded_res, sharded_wall = sharded_future.result()
    return rss, sharded_res, sharded_wall


def sharded_part(args: argparse.Namespace, wanted: bool) -> dict[str, Any]:
    from _round_path_sharded import memory_needed, probe

    found = probe()
    if not found["available"]:
        return {"value": None, "note": found["note"]}
    if not wanted:
        return {"value": None, "signature": found.get("signature"),
                "note": "strato.aggregation.sharded exists; the sharded part is left out of "
                        "--smoke and --no-sharded runs"}
    cfg = {"clients": 64, "params": 25 * M, "function_memory_mb": 1024}
    try:
        need = memory_needed(cfg["clients"], cfg["params"], cfg["function_memory_mb"])
    except Exception as exc:  # the module is young: report, do not guess
        return {"value": None, "note": f"sharded: could not size the round: {exc}"}
    if 1.2 * need > mem_available():
        return {"value": None, "note": f"sharded: needs ~{need / 2**30:.1f} GiB, "
                                       f"{mem_available() / 2**30:.1f} GiB available now"}
    log("sharded median — 64 clients × 25M float32, function_memory_mb=1024")
    try:
        return {**run_child("sharded", cfg, timeout=1800), "signature": found.get("signature")}
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        return {"value": None, "note": f"sharded: the round failed: {exc} (see stderr)",
                "signature": found.get("signature")}


def source_state(label: str | None) -> dict[str, Any]:
    """Which code was measured: where ``strato`` is imported from and, when that is this
    checkout's ``src/``, its HEAD and the uncommitted changes under ``src/``."""
    import importlib.util

    spec = importlib.util.find_spec("strato")
    where = Path(spec.origin).resolve().parent.parent if spec and spec.origin else None
    out: dict[str, Any] = {"strato_imported_from": str(where), "label": label}
    if where != (HERE.parent / "src").resolve():
        out["note"] = "strato is not this checkout's src/: see label"
        return out

    def git(*argv: str) -> str:
        try:
            return subprocess.run(["git", *argv], cwd=HERE.parent, capture_output=True,
                                  text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    changed = git("status", "--porcelain", "--", "src").splitlines()
    out.update({"head": git("rev-parse", "HEAD"), "head_subject": git("log", "-1", "--format=%s"),
                "uncommitted_src_files": len(changed), "uncommitted_src": changed})
    return out


# ---- the headline keys, table ----------------------------------------------------------


def headline(main: dict[str, Any], rss: dict[str, Any] | None,
             sharded: dict[str, Any]) -> dict[str, Any]:
    run, server, warm = main["run"], main["server"], main["warmup_rounds"]
    measured = run["rounds"][warm:]
    ours = [r["completion_s"] for r in measured]
    theirs = [r["completion_s"] for r in server["records"]]
    saxpy = run["saxpy"]["cpu_s"]
    per_update = [r["path_cpu_s_per_update"] for r in measured]
    completion, completion_server = median(ours), median(theirs)
    out: dict[str, Any] = {
        "completion_s": completion,
        "completion_s_per_round": ours,
        "completion_s_warmup_round": run["rounds"][0]["completion_s"] if warm else None,
        "completion_s_eager_server": completion_server,
        "completion_s_eager_server_per_round": theirs,
        "completion_ratio_vs_eager_server": completion_server / completion if completion else None,
        "cpu_per_update_ratio": median(per_update) / saxpy if saxpy else None,
        "cpu_per_update_s": median(per_update),
        "cpu_per_update_s_per_round": per_update,
        "cpu_per_update_s_eager_server": median([r["cpu_s_per_update"]
                                                 for r in server["records"]]),
        # the same ratio for the eager server's process (map + add + model write): context
        "cpu_per_update_ratio_eager_server": (
            median([r["cpu_s_per_update"] for r in server["records"]]) / saxpy
            if saxpy else None),
        "saxpy_one_update_s": saxpy,
        # context: the same saxpy with its buffers evicted from every cache first
        # (time_saxpy cold), and the path's CPU per update ÷ that
        "saxpy_one_update_cold_s": run.get("saxpy_cold", {}).get("cpu_s"),
        "cpu_per_update_ratio_vs_cold_saxpy": (
            median(per_update) / run["saxpy_cold"]["cpu_s"]
            if run.get("saxpy_cold", {}).get("cpu_s") else None),
        # context: an unchecked float64 ``acc += w·x`` over one update ÷ the saxpy, the
        # floor of the float64 accumulator's add alone (one update per pass)
        "float64_add_ratio": (run["float64_add"]["cpu_s"] / saxpy
                              if saxpy and "float64_add" in run else None),
        # context: every CPU second of the path over the whole run (warm-up round and
        # teardown included) per accepted update, ÷ the saxpy
        "cpu_per_update_ratio_whole_run": (
            (sum(r["path_cpu_s"] for r in run["rounds"])
             + run["after_last_round"]["processes_s"] + run["after_last_round"]["threads_s"])
            / max(1, sum(r["accepted"] for r in run["rounds"])) / saxpy if saxpy else None),
        "peak_rss_ratio_1000_vs_100": None,
        "sharded_median_peak_mb": sharded.get("value"),
    }
    if rss is not None:
        small, large = rss["100"]["peak_rss_kb"], rss["1000"]["peak_rss_kb"]
        out["peak_rss_ratio_1000_vs_100"] = large / small if small else None
    return out


def targets(keys: dict[str, Any], sharded: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, (op, bound) in TARGETS.items():
        value = keys[key]
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        out[key] = {"target": f"{op} {bound}", "value": value, "met": met}
    value = sharded.get("value")
    equal = sharded.get("equals_np_median_on_samples")
    out["sharded_median_peak_mb"] = {
        "target": "<= 1024 (function_memory_mb) and equal to np.median on sampled ranges",
        "value": value,
        "met": None if value is None else bool(value <= 1024 and equal),
    }
    return out


def fmt(value: Any, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def table(out: dict[str, Any]) -> str:
    run, ran = out["details"]["run"], out["ran"]
    server = {r["round"]: r for r in out["details"]["server"]["records"]}
    lines = [
        f"round_path — strato run, {ran['clients']} clients × {ran['params']:,} params, "
        f"{ran['rounds']} rounds (warm-up: {ran['warmup_rounds'] or 'none'})",
        "",
        "| round | ours completion (s) | eager server (s) | server ÷ ours | path CPU/update (ms) "
        "| of which trigger thread (ms) | server CPU/update (ms) | arrivals span (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in run["rounds"]:
        s = server.get(r["round"])
        warm = " (warm-up)" if r["round"] in ran["warmup_rounds"] else ""
        span = r["last_upload_at"] - r["first_upload_at"]
        lines.append(
            f"| {r['round']}{warm} | {r['completion_s']:.4f} "
            f"| {fmt(s and s['completion_s'], '.4f')} "
            f"| {fmt(s and s['completion_s'] / r['completion_s'], '.3f')} "
            f"| {r['path_cpu_s_per_update'] * 1e3:.1f} "
            f"| {r['path_cpu_s_threads'] / max(1, r['accepted']) * 1e3:.1f} "
            f"| {fmt(s and s['cpu_s_per_update'] * 1e3, '.1f')} | {span:.1f} |"
        )
    lines += ["", "| key | value | target | met |", "|---|---:|---|---|"]
    for key, t in out["targets"].items():
        met = {True: "yes", False: "NO", None: "n/a"}[t["met"]]
        lines.append(f"| `{key}` | {fmt(t['value'])} | {t['target']} | {met} |")
    lines.append(f"| `completion_s` (median) | {fmt(out['completion_s'], '.4f')} | | |")
    lines.append(f"| `completion_s_eager_server` (median) "
                 f"| {fmt(out['completion_s_eager_server'], '.4f')} | | |")
    lines.append(f"| CPU per update ÷ saxpy, eager server (context) "
                 f"| {fmt(out['cpu_per_update_ratio_eager_server'])} | | |")
    lines.append(f"| unchecked float64 add of one update ÷ saxpy (context: the add's floor) "
                 f"| {fmt(out['float64_add_ratio'])} | | |")
    lines.append(f"| saxpy over one update (s, 1 thread) "
                 f"| {fmt(out['saxpy_one_update_s'], '.5f')} | | |")
    lines.append(f"| the same saxpy, caches flushed first (s; context) "
                 f"| {fmt(out.get('saxpy_one_update_cold_s'), '.5f')} | | |")
    lines.append(f"| CPU per update ÷ that cold saxpy (context) "
                 f"| {fmt(out.get('cpu_per_update_ratio_vs_cold_saxpy'))} | | |")
    return "\n".join(lines)


# ---- main -----------------------------------------------------------------------------


CPU_ACCOUNTING = (
    "CPU seconds (utime+stime from /proc) of the aggregation path per accepted update, per "
    "round (round boundaries: successive rounds' opened_at; the last round ends 1 s after its "
    "model is written: the run's teardown after that is in details.run.after_last_round and in "
    "cpu_per_update_ratio_whole_run), median over measured rounds, ÷ one single-threaded "
    "BLAS saxpy over one update "
    "(thread CPU time, median of 9, warm buffers, in the run process right after the run). "
    "Counted: every Runtime worker process whose function is 'aggregate' or 'close_round' or "
    "starts with 'lifl.' (and any process descended from one), plus the run process's threads "
    "named 'trigger updates…' (the stream trigger), 'lifl-…', 'strato-invoke-aggregate…', "
    "'strato-invoke-close_round…' or 'strato-invoke-lifl.…' (sampled every interval_s; a "
    "short-lived invoke thread that starts and ends between two samples is missed: the "
    "trigger invokes the aggregator synchronously from its own thread, so only the async "
    "warm-up call of each round runs on such a thread). Not counted: the clients' own work "
    "(encode, blob write, table put), the workflow driver and evaluate. 'processes' and "
    "'threads' below list exactly what was counted."
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 rounds; RSS runs of 1 round")
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path, help="default results/round_path/{quick,full}.json")
    ap.add_argument("--out", type=Path, help="run directories here (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the run directories")
    ap.add_argument("--rounds", type=int, help="rounds of the main run (default 2 quick, 5)")
    ap.add_argument("--concurrency", type=int, default=2,
                    help="simulated clients uploading at once (the job's client_concurrency)")
    ap.add_argument("--interval", type=float, default=0.1, help="/proc sampling interval (s)")
    ap.add_argument("--accumulator", choices=("float64", "float32"), default="float64",
                    help="the aggregators' sums ([aggregation] accumulator; the job default "
                         "is float64)")
    ap.add_argument("--label", help="what code this measures (stored under 'source')")
    ap.add_argument("--no-sharded", action="store_true",
                    help="leave out the sharded median (64 × 25M), ~40 s")
    ap.add_argument("--child", nargs=2, metavar=("KIND", "CONFIG"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.json is None and not args.child:
        name = "smoke.json" if args.smoke else ("quick.json" if args.quick else "full.json")
        args.json = RESULTS / name
    return args


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.child:
        child_main(args.child[0], json.loads(args.child[1]))
        return 0
    started = time.monotonic()
    machine = {"nproc": os.cpu_count(), "cpus_usable": cpu_count(),
               "loadavg_at_start": list(os.getloadavg()), "l3_cache_kib": l3_cache_kib(),
               "mem_available_gib_at_start": round(mem_available() / 2**30, 1)}
    runs = plan(args)
    source = source_state(args.label)
    temp = args.out is None
    base = Path(tempfile.mkdtemp(prefix="strato-round-path-")) if temp else args.out
    base.mkdir(parents=True, exist_ok=True)
    m = runs["main"]
    try:
        disk = check_disk(base, disk_needed(m["params"], m["clients"], m["rounds"]))
        log(f"load average {machine['loadavg_at_start']}; disk {disk}")
        main_res = main_run(args, m, base)
        rss, sharded, sharded_wall = memory_parts(args, runs["rss"], runs["sharded"], base)
    finally:
        if temp and not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    keys = headline(main_res, rss, sharded)
    run = main_res["run"]
    warm = main_res["warmup_rounds"]
    notes: dict[str, str] = {
        "eager_server": "replayed after the run, round by round, on the recorded schedule; "
                        "the clients' load that our aggregator shared the machine with during "
                        "the run is not replayed. Float32 accumulator (as specified), maps each "
                        "blob without a sha256 pass. Its model is checked against the run's "
                        "(details.server.records[].max_rel_diff_vs_run_model).",
        "warm_up": "round 1 of the run is a warm-up (cold starts of every function) and is "
                   "left out of every median; the RSS runs' peaks include their first round",
        "memory_parts": "the two peak-RSS runs and the sharded median run at the same time, "
                        "after the timed parts (they measure memory, not time)",
    }
    if rss is None:
        notes["peak_rss_ratio_1000_vs_100"] = "skipped in --smoke"
    if sharded.get("value") is None:
        notes["sharded_median_peak_mb"] = sharded.get("note", "not measured")
    out: dict[str, Any] = {
        **keys,
        "cpu_accounting": {
            "what": CPU_ACCOUNTING,
            "processes": run["path"]["processes"],
            "threads": run["path"]["threads"],
            "cpu_s_by_label_whole_run": run["cpu_s_by_label"],
            "saxpy": run["saxpy"],
            "saxpy_cold": run.get("saxpy_cold"),
            "float64_add": run.get("float64_add"),
        },
        "targets": targets(keys, sharded),
        "notes": notes,
        "ran": {
            "params": m["params"], "clients": m["clients"], "clients_per_round": m["clients"],
            "quorum": "all", "rounds": m["rounds"], "client_concurrency": m["concurrency"],
            "accumulator": m["accumulator"],
            "warmup_rounds": list(range(1, warm + 1)),
            "measured_rounds": [r["round"] for r in run["rounds"][warm:]],
            "mode": "smoke" if args.smoke else ("quick" if args.quick else "full"),
            "pipeline": "strato.fl.run.run_job (embedded backend) in a child process",
            "eager_server": "replay of the recorded uploaded_at schedule of the measured rounds; "
                            f"warm-up: {main_res['server']['warm_up_updates']} updates of round 1 "
                            "back to back, not timed",
            "rss_runs": None if runs["rss"] is None else runs["rss"],
            "disk": disk,
        },
        "peak_rss_kb": rss,
        "sharded_median": sharded,
        "details": {"run": run, "server": main_res["server"]},
        "source": source,
        "command": shlex.join(["python", "benchmarks/round_path.py", *raw]),
        "machine": machine,
        "wall_s": time.monotonic() - started,
        "wall_s_by_part": {
            **main_res["wall_s"],
            **{f"rss_{k}_clients": v["wall_s"] for k, v in (rss or {}).items()},
            "sharded": sharded_wall,
        },
    }
    text = table(out)
    print(text)
    parts = ", ".join(f"{k} {v:.0f}s" for k, v in out["wall_s_by_part"].items())
    print(f"wall {out['wall_s']:.0f}s ({parts}); load average at start "
          f"{[round(x, 2) for x in machine['loadavg_at_start']]}")
    write_results(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
