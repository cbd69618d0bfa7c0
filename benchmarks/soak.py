#!/usr/bin/env python
"""The soak: many rounds of a tiny model with 20 simulated clients; does anything grow?

One ``strato run`` of the round-path benchmark's app (a model of ``--params`` float32
values whose "training" writes a distinct update: the run's own machinery is what is
exercised, round after round) with ``--keep-rounds``. While it runs, every second,
the script samples all of the run's processes (the run and its workers): resident
memory summed over them, open file descriptors summed over them, and the size of
the run's ``services`` directory, each against the rounds done so far.

Keys: ``rss_slope_mb_per_100_rounds`` (a least-squares line through the samples of
the second half of the run, after the warm-up; bound ≤ 2), ``open_fds_growth`` (the
last sample's descriptors minus the first sample's after round 10; bound 0, with the
spread of the samples; as workers come and go one sample differs from another by a few,
so the trend is given too: ``open_fds_slope_per_100_rounds``, a line through the second
half, and the least count among the first and among the last ten samples),
``shm_segments_left`` (segments of the run in /dev/shm after it ended; bound 0),
``services_dir_mb_per_100_rounds`` (the same kind of line through the directory's
size: bounded when old rounds' updates are deleted).

    python benchmarks/soak.py --json benchmarks/results/soak/soak.json   # 1,000 rounds
    python benchmarks/soak.py --rounds 100 --json /tmp/soak.json          # a short one
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from _aggregation_common import print_keys, write_results  # noqa: E402
from _round_path_app import write_app  # noqa: E402


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_processes(run_pid: int) -> list[int]:
    """The run process and its descendants (its workers)."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(proc.name))
    found, todo = [], [run_pid]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def sample(pids: list[int]) -> tuple[float, int]:
    """Resident MB and open descriptors, summed over ``pids``."""
    rss_kb, fds = 0, 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss_kb += int(line.split()[1])
            fds += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue
    return rss_kb / 1024, fds


def dir_mb(path: Path) -> float:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total / 2**20


def rounds_done(metrics: Path) -> int:
    try:
        return metrics.read_text().count("\n")
    except OSError:
        return 0


def slope_per_100(xs: list[float], ys: list[float]) -> float:
    if len(xs) < 2 or max(xs) == min(xs):
        return 0.0
    return float(np.polyfit(np.asarray(xs), np.asarray(ys), 1)[0] * 100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=1000)
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--params", type=int, default=10_000)
    p.add_argument("--keep-rounds", type=int, default=2)
    p.add_argument("--work", default="/tmp/strato-soak")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.rounds < 20 or args.clients < 1 or args.params < 1 or args.keep_rounds < 0:
        p.error("--rounds must be at least 20; --clients, --params positive")
    work = Path(args.work)
    subprocess.run(["rm", "-rf", str(work)], check=True)
    app = write_app(work / "app", params=args.params, clients=args.clients, rounds=args.rounds,
                    concurrency=2, deadline_s=120)  # fmt: skip
    out = work / "out"
    env = {k: v for k, v in os.environ.items() if k != "STRATO_DATA_DIR"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(REPO / "src"))
    before_shm = {s.name for s in Path("/dev/shm").iterdir()}
    log(f"soak: {args.rounds} rounds × {args.clients} clients × {args.params:,} parameters, "
        f"--keep-rounds {args.keep_rounds}")  # fmt: skip
    started = time.monotonic()
    with (work / "run.log").open("wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "strato.cli", "run", str(app), "--out", str(out),
             "--keep-rounds", str(args.keep_rounds)],
            env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    samples: list[dict[str, float]] = []
    seen: set[int] = {proc.pid}
    last_said = 0
    while proc.poll() is None:
        time.sleep(1.0)
        done = rounds_done(out / "metrics.jsonl")
        if done < 1 or proc.poll() is not None:
            continue
        pids = run_processes(proc.pid)
        seen.update(pids)
        rss, fds = sample(pids)
        samples.append({"round": done, "rss_mb": rss, "fds": fds,
                        "services_mb": dir_mb(out / "services"),
                        "t_s": time.monotonic() - started})  # fmt: skip
        if done - last_said >= 100:
            last_said = done
            log(f"  round {done}: rss {rss:.0f} MB over the run's processes, {fds} fds, "
                f"services {samples[-1]['services_mb']:.1f} MB")
    wall = time.monotonic() - started
    if proc.returncode != 0:
        log((work / "run.log").read_text()[-3000:])
        return 1
    time.sleep(0.5)
    new = {s.name for s in Path("/dev/shm").iterdir()} - before_shm
    left = [s for s in new if s.split("-")[:2] in (["strato", str(pid)] for pid in seen)]
    # while rounds run (the last samples see the workers shut down)
    running = [s for s in samples if s["round"] < args.rounds] or samples
    half = [s for s in running if s["round"] >= args.rounds // 2]
    settled = [s for s in running if s["round"] >= 10] or running
    fds = [s["fds"] for s in settled]
    result: dict[str, Any] = {
        "command": "python benchmarks/soak.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "rounds": args.rounds, "clients": args.clients, "params": args.params,
        "keep_rounds": args.keep_rounds, "wall_s": round(wall, 1),
        "rounds_per_s": round(args.rounds / wall, 2),
        "rss_slope_mb_per_100_rounds": round(slope_per_100(
            [s["round"] for s in half], [s["rss_mb"] for s in half]), 3),
        "rss_mb_first_last": [round(settled[0]["rss_mb"], 1), round(running[-1]["rss_mb"], 1)],
        "open_fds_growth": int(fds[-1] - fds[0]),
        "open_fds_min_max": [int(min(fds)), int(max(fds))],
        # workers come and go, so one sample against another moves by a few: the trend
        "open_fds_slope_per_100_rounds": round(slope_per_100(
            [s["round"] for s in half], [s["fds"] for s in half]), 3),
        "open_fds_least_first_last": [int(min(fds[:10])), int(min(fds[-10:]))],
        "shm_segments_left": len(left),
        "services_dir_mb_per_100_rounds": round(slope_per_100(
            [s["round"] for s in half], [s["services_mb"] for s in half]), 3),
        "services_dir_mb_final": round(dir_mb(out / "services"), 2),
        "targets": {"rss_slope_mb_per_100_rounds": "<= 2", "open_fds_growth": "0",
                    "shm_segments_left": "0"},
        "samples": samples,
    }  # fmt: skip
    keys = ("rss_slope_mb_per_100_rounds", "open_fds_growth", "shm_segments_left",
            "services_dir_mb_per_100_rounds", "services_dir_mb_final", "rounds_per_s")
    print_keys(result, keys)
    if args.json:
        write_results(Path(args.json), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
