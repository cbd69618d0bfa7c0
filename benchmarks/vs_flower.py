"""The same FL job on Strato and on Flower's own simulation, side by side.

    python benchmarks/vs_flower.py --quick --data-dir ../shared/data/mnist   # 1 run each
    python benchmarks/vs_flower.py --reps 3 --data-dir ../shared/data/mnist  # medians of 3

The job is ``examples/mnist`` as it is: its model, its ``[train]`` settings, its data
partition and seed, 100 clients, 10 per round, 20 rounds, 2 clients training at once
(the example's ``client_concurrency``; Flower gets 2 CPUs and 1 per client). Strato
runs it with ``strato run``; Flower runs it with ``flwr.simulation.run_simulation``
(its Ray backend), a real ``ClientApp`` and ``ServerApp`` and Flower's message-API
``FedAvg`` (``benchmarks/_vs_flower_app.py``), with the same clients chosen in every
round and the same per-client seeds. Both evaluate the global model on the test set
after every round, outside the round's timed span.

Per system: final accuracy, wall time of the whole command, platform overhead per
round (the round's wall time minus its slowest selected client's training time;
median over rounds; round = Strato's round open → new model written, Flower's
``configure_train`` → ``aggregate_train`` done), peak memory of all its processes
(the sum of their PSS, so pages shared between processes count once; sampled every
0.25 s) and bytes each way (Strato: the encoded payloads; Flower: its arrays' bytes).
Keys: ``strato_overhead_s_per_round``, ``flower_overhead_s_per_round``,
``overhead_ratio`` (Flower ÷ Strato), ``accuracy_gap`` (Strato − Flower).
Needs ``pip install 'flwr[simulation]'`` (in the project's ``dev`` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _aggregation_common import write_results

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
APP = ROOT / "examples" / "mnist"
RESULTS = HERE / "results" / "vs_flower"


def log(msg: str) -> None:
    print(msg, flush=True)


# ---- memory of a process tree ---------------------------------------------------------


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                ppid = int(f.read().rpartition(b")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(name))
    return kids


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
            for line in f:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeMemory:
    """Samples the summed PSS of a process and all its descendants; keeps the peak."""

    def __init__(self, root: int, interval_s: float = 0.25) -> None:
        self.root, self.interval_s = root, interval_s
        self.peak_kb, self.peak_processes, self.samples = 0, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree(self) -> list[int]:
        kids, out, todo = _children(), [], [self.root]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo.extend(kids.get(pid, []))
        return out

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            pids = self._tree()
            total = sum(_pss_kb(p) for p in pids)
            self.samples += 1
            if total > self.peak_kb:
                self.peak_kb, self.peak_processes = total, len(pids)

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        return {"peak_pss_mb": round(self.peak_kb / 1024, 1),
                "processes_at_peak": self.peak_processes, "samples": self.samples}


def run_measured(cmd: list[str], timeout_s: float, env: dict[str, str] | None = None,
                 log_path: Path | None = None) -> dict[str, Any]:
    started = time.monotonic()
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
    try:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        memory = TreeMemory(proc.pid)
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            raise SystemExit(f"{cmd[1]} did not finish in {timeout_s:.0f} s") from None
        finally:
            mem = memory.stop()
    finally:
        if log_path:
            out.close()  # type: ignore[union-attr]
    if code != 0:
        tail = log_path.read_text()[-2000:] if log_path else ""
        raise SystemExit(f"{shlex.join(cmd)} failed (exit {code}):\n{tail}")
    return {"wall_s": time.monotonic() - started, **mem}


# ---- the two systems ----------------------------------------------------------------


def job(rounds: int | None, data_dir: str | None) -> dict[str, Any]:
    """The example's job settings, as ``strato run`` reads them for the data it has
    (without MNIST: the job ``[dataset.digits]`` shapes)."""
    sys.path.insert(0, str(ROOT / "src"))
    from strato.data import dataset_name
    from strato.fl.config import load_job_config

    cfg = load_job_config(APP / "strato.toml", dataset_name(data_dir))
    return {"clients": cfg.clients, "clients_per_round": cfg.clients_per_round,
            "rounds": rounds or cfg.rounds, "seed": cfg.seed, "partition": cfg.partition,
            "alpha": cfg.dirichlet_alpha, "train": dict(cfg.train),
            "concurrency": cfg.client_concurrency}


def strato_run(cfg: dict[str, Any], data_dir: str | None, work: Path) -> dict[str, Any]:
    from strato.fl import state
    from strato.services import embedded

    out = work / "strato"
    cmd = [sys.executable, "-m", "strato", "run", str(APP), "--out", str(out),
           "--rounds", str(cfg["rounds"])]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    ran = run_measured(cmd, 1800, log_path=work / "strato.log")
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rounds = []
    with embedded(out / "services") as svc:
        for row in rows:
            prefix = state.round_key(int(row["round"])) + "/"
            trains = [float(i.value["train_s"]) for i in svc.table.query(state.UPDATES, prefix)]
            rounds.append({"round": row["round"], "round_s": row["round_s"],
                           "train_s_max": max(trains), "train_s_sum": sum(trains),
                           "accuracy": row["accuracy"],
                           "updates": len(trains)})
    return {**ran, "final_accuracy": summary["final_accuracy"], "rounds": rounds,
            "bytes_up": summary["bytes_up"], "bytes_down": summary["bytes_down"]}


def flower_run(cfg: dict[str, Any], data_dir: str | None, work: Path) -> dict[str, Any]:
    out = work / "flower.json"
    conf = {**cfg, "app_dir": str(APP), "data_dir": data_dir, "out": str(out)}
    (work / "flower-config.json").write_text(json.dumps(conf))
    cmd = [sys.executable, str(HERE / "_vs_flower_app.py"), str(work / "flower-config.json")]
    ran = run_measured(cmd, 3600, log_path=work / "flower.log",
                       env={"STRATO_VS_FLOWER_CONFIG": str(work / "flower-config.json"),
                            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(HERE)])})
    res = json.loads(out.read_text())
    rounds = res["rounds"]
    return {**ran, "final_accuracy": rounds[-1]["accuracy"], "rounds": rounds,
            "bytes_up": sum(r["bytes_up"] for r in rounds),
            "bytes_down": sum(r["bytes_down"] for r in rounds)}


def overhead(rounds: list[dict[str, Any]]) -> float:
    """Round wall time minus the slowest selected client's training: median over rounds."""
    return statistics.median(r["round_s"] - r["train_s_max"] for r in rounds)


def overhead_beyond_training(rounds: list[dict[str, Any]], concurrency: int) -> float:
    """Round wall time minus the training it must contain when ``concurrency`` clients
    train at once (their summed training time ÷ concurrency): what the platform adds.
    With 10 clients and 2 at a time, ``overhead`` also counts the clients that wait for
    a free slot; this does not."""
    return statistics.median(r["round_s"] - r["train_s_sum"] / concurrency for r in rounds)


# ---- main ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one run of each system")
    ap.add_argument("--reps", type=int, default=None, help="runs of each (default 3; quick 1)")
    ap.add_argument("--rounds", type=int, default=None, help="default: the example's (20)")
    ap.add_argument("--data-dir", default=os.environ.get("STRATO_DATA_DIR") or None,
                    help="MNIST IDX directory (default $STRATO_DATA_DIR, else the digits)")
    ap.add_argument("--json", type=Path, help="default results/vs_flower/{quick,full}.json")
    args = ap.parse_args(argv)
    args.reps = args.reps or (1 if args.quick else 3)
    if args.reps < 1:
        ap.error("--reps must be at least 1")
    if args.json is None:
        args.json = RESULTS / ("quick.json" if args.quick else "full.json")
    return args


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        import flwr
        import ray
    except ImportError as exc:
        raise SystemExit(f"vs_flower needs Flower's simulation: pip install 'flwr[simulation]' "
                         f"({exc})") from None
    cfg = job(args.rounds, args.data_dir)
    started = time.monotonic()
    runs: dict[str, list[dict[str, Any]]] = {"strato": [], "flower": []}
    with tempfile.TemporaryDirectory(prefix="strato-vs-flower-") as tmp:
        for rep in range(args.reps):
            order = ("strato", "flower") if rep % 2 == 0 else ("flower", "strato")
            for system in order:
                work = Path(tmp) / f"{system}-{rep}"
                work.mkdir()
                log(f"run {rep + 1}/{args.reps}: {system} — {cfg['clients']} clients, "
                    f"{cfg['clients_per_round']} per round, {cfg['rounds']} rounds")
                fn = strato_run if system == "strato" else flower_run
                res = fn(cfg, args.data_dir, work)
                res["overhead_s_per_round"] = overhead(res["rounds"])
                res["overhead_beyond_training_s_per_round"] = overhead_beyond_training(
                    res["rounds"], cfg["concurrency"])
                runs[system].append(res)
                log(f"  {system}: accuracy {res['final_accuracy']:.4f}, wall "
                    f"{res['wall_s']:.1f} s, overhead {res['overhead_s_per_round']:.3f} s/round "
                    f"({res['overhead_beyond_training_s_per_round']:.3f} beyond training), "
                    f"peak {res['peak_pss_mb']:.0f} MB over {res['processes_at_peak']} processes")

    def med(system: str, key: str) -> float:
        return float(statistics.median(r[key] for r in runs[system]))

    keys = {
        "strato_overhead_s_per_round": med("strato", "overhead_s_per_round"),
        "flower_overhead_s_per_round": med("flower", "overhead_s_per_round"),
        "strato_overhead_beyond_training_s_per_round": med(
            "strato", "overhead_beyond_training_s_per_round"),
        "flower_overhead_beyond_training_s_per_round": med(
            "flower", "overhead_beyond_training_s_per_round"),
        "strato_final_accuracy": med("strato", "final_accuracy"),
        "flower_final_accuracy": med("flower", "final_accuracy"),
        "strato_wall_s": med("strato", "wall_s"),
        "flower_wall_s": med("flower", "wall_s"),
        "strato_peak_pss_mb": med("strato", "peak_pss_mb"),
        "flower_peak_pss_mb": med("flower", "peak_pss_mb"),
        "strato_bytes_up": med("strato", "bytes_up"),
        "strato_bytes_down": med("strato", "bytes_down"),
        "flower_bytes_up": med("flower", "bytes_up"),
        "flower_bytes_down": med("flower", "bytes_down"),
    }
    keys["overhead_ratio"] = keys["flower_overhead_s_per_round"] / max(
        keys["strato_overhead_s_per_round"], 1e-9)
    keys["accuracy_gap"] = keys["strato_final_accuracy"] - keys["flower_final_accuracy"]
    keys["overhead_beyond_training_ratio"] = keys[
        "flower_overhead_beyond_training_s_per_round"] / max(
        keys["strato_overhead_beyond_training_s_per_round"], 1e-9)
    targets = {"overhead_ratio": {"value": keys["overhead_ratio"], "target": ">= 2",
                                 "met": keys["overhead_ratio"] >= 2},
               "accuracy_gap": {"value": keys["accuracy_gap"], "target": ">= -0.005",
                                "met": keys["accuracy_gap"] >= -0.005}}
    record = {
        **keys, "targets": targets, "reps": args.reps, "job": cfg,
        "data": args.data_dir or "scikit-learn digits (no MNIST directory given)",
        "versions": {"flwr": flwr.__version__, "ray": ray.__version__},
        "runs": runs,
        "command": shlex.join(["python", "benchmarks/vs_flower.py", *raw]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {"nproc": os.cpu_count(), "loadavg_at_end": list(os.getloadavg())},
        "wall_s": time.monotonic() - started,
    }
    lines = ["| system | final accuracy | wall (s) | overhead / round (s) "
             "| beyond training / round (s) | peak PSS (MB) | MB up | MB down |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for system in ("strato", "flower"):
        lines.append(f"| {system} | {keys[f'{system}_final_accuracy']:.4f} "
                     f"| {keys[f'{system}_wall_s']:.1f} "
                     f"| {keys[f'{system}_overhead_s_per_round']:.3f} "
                     f"| {keys[f'{system}_overhead_beyond_training_s_per_round']:.3f} "
                     f"| {keys[f'{system}_peak_pss_mb']:.0f} "
                     f"| {keys[f'{system}_bytes_up'] / 1e6:.1f} "
                     f"| {keys[f'{system}_bytes_down'] / 1e6:.1f} |")
    print("\n".join(lines))
    for name, t in targets.items():
        print(f"{name}: {t['value']:.4f} (target {t['target']}: {'met' if t['met'] else 'MISSED'})")
    write_results(args.json, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
