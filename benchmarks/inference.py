"""FSD-Inference benchmark: correctness matrix, rates, volumes, predicted vs measured ops.

    .venv/bin/python benchmarks/inference.py --neurons 1024 --layers 120 --inputs 60000 \\
        --workers 1 2 4 8 --channels bus blob --partitions random contiguous hypergraph \\
        --compare --out bench-1024.json
    .venv/bin/python benchmarks/inference.py --neurons 4096 --layers 120 --volumes-only
    .venv/bin/python benchmarks/inference.py --neurons 1024 --layers 6 --inputs 200 --launch 8
    .venv/bin/python benchmarks/inference.py --table bench-1024.json   # markdown table

Every distributed run is checked against the scipy oracle (``equal`` column).
Prints one line per run and writes everything to ``--out`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from strato.inference.cost import price, profile_sizes
from strato.inference.inputs import mnist_inputs
from strato.inference.kernel import run_local
from strato.inference.network import generate_network, random_network
from strato.inference.partition import communication_volume, make_partition
from strato.inference.planner import estimate
from strato.inference.reference import graphblas_inference, reference_inference
from strato.inference.run import RunOptions, run_distributed
from strato.services import embedded

COMPARED = (
    "invocations", "publish_calls", "publish_chunks", "bytes_published", "receive_calls",
    "receive_chunks", "deletes", "puts", "gets", "lists", "bytes_put", "notice_publishes",
    "notice_receives", "notice_deletes",
)


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
    return out


class RssMonitor:
    """Peak resident memory of this process and every descendant (the workers), sampled
    every 0.2 s: the peak of the sum, and the largest single process."""

    def __init__(self) -> None:
        self.peak_total = self.peak_single = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> RssMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            sizes = [_rss_mb(p) for p in _descendants(os.getpid())]
            self.peak_total = max(self.peak_total, sum(sizes))
            self.peak_single = max(self.peak_single, max(sizes, default=0.0))
            self._stop.wait(0.2)

    def summary(self) -> dict[str, float]:
        return {"peak_rss_total_mb": round(self.peak_total, 1),
                "peak_rss_largest_mb": round(self.peak_single, 1)}


def _timed(fn: Any, *args: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--neurons", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=120)
    ap.add_argument("--inputs", type=int, default=60000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--channels", nargs="+", default=["bus", "blob"])
    ap.add_argument("--partitions", nargs="+", default=["random", "contiguous", "hypergraph"])
    ap.add_argument("--data-dir", default="/work/shared/data/mnist")
    ap.add_argument("--compare", action="store_true",
                    help="time our kernel and python-graphblas in this process, both on one "
                         "thread (a worker's), GraphBLAS's layer loop alone")
    ap.add_argument("--network", choices=("generated", "random"), default="generated",
                    help="the seeded RadiX-Net-like generator (twin rows: 64 distinct rows "
                         "per layer at N=1024), or random 32-per-neuron layers (no twins)")
    ap.add_argument("--bias", type=float,
                    help="every layer's bias (default: the challenge's for the size; the "
                         "random network needs a weaker one, e.g. -0.15 at 1024, or every "
                         "image dies and the workload is trivial)")
    ap.add_argument("--volumes-only", action="store_true")
    ap.add_argument("--launch", type=int, default=0, help="W for the flat-vs-tree launch test")
    ap.add_argument("--out", default="bench-inference.json")
    ap.add_argument("--table", metavar="JSON", help="print a results file as a markdown table")
    args = ap.parse_args()
    if args.table:
        from report import inference_runs_table

        print(inference_runs_table(json.loads(Path(args.table).read_text())))
        return

    make = generate_network if args.network == "generated" else random_network
    net = make(args.neurons, args.layers, seed=0, bias=args.bias)
    edges = net.edges
    results: dict[str, Any] = {"neurons": args.neurons, "layers": args.layers, "edges": edges,
                               "network": args.network, "bias": net.biases[0],
                               "command": " ".join(["python", *sys.argv]),
                               "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                               "machine": {"cpus": os.cpu_count(),
                                           "loadavg_at_start": list(os.getloadavg())}}
    if args.volumes_only:
        vols, part_s = {}, {}
        for method in args.partitions:
            for w in args.workers:
                part, secs = _timed(make_partition, method, net.layers, w)
                vols[f"{method}/{w}"] = int(communication_volume(net.layers, part).sum())
                part_s[f"{method}/{w}"] = secs
                print(f"volume {method:10s} W={w}: {vols[f'{method}/{w}']:>10d} rows "
                      f"(partitioned in {secs:.1f} s)")
        results["volumes"], results["partition_s"] = vols, part_s
        _write(args.out, results)
        return

    y = mnist_inputs(args.neurons, args.inputs, args.data_dir)
    rate = args.inputs * edges
    ref, ref_s = _timed(reference_inference, net, y)
    results.update(inputs=args.inputs, categories=int(ref.size), scipy_s=ref_s,
                   scipy_rate=rate / ref_s)
    print(f"{args.neurons}×{args.layers}, {args.inputs} inputs: {ref.size} categories; "
          f"scipy reference {ref_s:.1f} s ({rate / ref_s:.3g} edges/s)")
    if args.compare:
        loc, loc_s = _timed(run_local, net.layers, net.biases, y)
        # One thread, as each of our workers has; timed: the layers' loop alone (the
        # conversion of the layers to GraphBLAS matrices is reported apart).
        timings: dict[str, float] = {}
        gb = graphblas_inference(net.layers, net.biases, y, threads=1, timings=timings)
        gb_s = timings["loop_s"]
        results.update(kernel_s=loc_s, kernel_rate=rate / loc_s, graphblas_s=gb_s,
                       graphblas_rate=rate / gb_s, graphblas_threads=1,
                       graphblas_convert_s=timings["convert_s"],
                       kernel_equal=bool(np.array_equal(loc, ref)),
                       graphblas_equal=bool(np.array_equal(gb, ref)))
        print(f"worker kernel in-process {loc_s:.1f} s ({rate / loc_s:.3g}); "
              f"python-graphblas, 1 thread, loop only {gb_s:.1f} s ({rate / gb_s:.3g}; "
              f"+{timings['convert_s']:.1f} s converting); equal: "
              f"{results['kernel_equal']}, {results['graphblas_equal']}")

    runs = []
    with tempfile.TemporaryDirectory(prefix="strato-bench-") as root, embedded(root) as svc:
        if args.launch:
            results["launch"] = _launch_test(svc, net, y[:200], args.launch)
        for method in args.partitions:
            for w in args.workers:
                if w == 1 and method != args.partitions[0]:
                    continue  # W = 1 has no partition to speak of
                part, part_s = _timed(make_partition, method, net.layers, w)
                volume = int(communication_volume(net.layers, part).sum())
                (profile,), profile_s = _timed(profile_sizes, net.layers, net.biases, y, [part])
                for ch in args.channels:
                    pred = estimate(profile, part, ch, 2048, 16)
                    with RssMonitor() as rss:
                        res = run_distributed(svc, net.layers, net.biases, y, part,
                                              RunOptions(channel=ch))
                    meas = res["counts"]
                    pc = pred.counts
                    ratios = {k: round(meas.get(k, 0) / pc[k], 3) for k in COMPARED if pc.get(k)}
                    row = {
                        "partition": method, "workers": w, "channel": ch,
                        "equal": bool(np.array_equal(res["categories"], ref)),
                        "inference_s": res["inference_s"], "total_s": res["total_s"],
                        "rate": rate / res["inference_s"], "volume_rows": volume,
                        "bytes": int(meas.get("bytes_published", 0) + meas.get("bytes_put", 0)),
                        "messages": int(meas.get("publish_calls", 0) + meas.get("puts", 0)
                                        + meas.get("notice_publishes", 0)),
                        "partition_s": part_s, "profile_s": profile_s,
                        "compute_s": res["compute_s"], "exchange_s": res["exchange_s"],
                        "predicted": pc, "measured": meas,
                        "measured_over_predicted": ratios,
                        "worst_ratio": max((abs(v - 1) for v in ratios.values()), default=0.0),
                        "predicted_s": pred.seconds, "cost_usd": price(meas),
                        "predicted_cost_usd": pred.cost_usd, **rss.summary(),
                    }
                    runs.append(row)
                    print(f"{method:10s} W={w} {ch:4s} equal={row['equal']} "
                          f"{res['inference_s']:6.2f} s {row['rate']:.3g} edges/s "
                          f"vol={volume} {row['bytes'] / 1e6:.1f} MB {row['messages']} msgs "
                          f"${row['cost_usd']:.6f} worst |meas/pred-1|={row['worst_ratio']:.3f} "
                          f"rss={row['peak_rss_total_mb']:.0f} MB meas/pred={ratios}", flush=True)
                    _write(args.out, {**results, "runs": runs})
    results["runs"] = runs
    _write(args.out, results)


def _launch_test(svc: Any, net: Any, y: Any, workers: int) -> dict[str, Any]:
    """Launch time flat vs tree (b = 2, 4), cold (fresh function) and warm (repeat)."""
    out = {}
    part = make_partition("contiguous", net.layers, workers)
    for label, b in (("flat", 0), ("tree-b2", 2), ("tree-b4", 4)):
        name = f"strato-infer-launch-{label}"
        opts = RunOptions(channel="bus", branching=b, function=name)
        cold = run_distributed(svc, net.layers, net.biases, y, part, opts)
        warm = run_distributed(svc, net.layers, net.biases, y, part, opts)
        out[label] = {"cold_launch_s": cold["launch_s"], "warm_launch_s": warm["launch_s"]}
        print(f"launch W={workers} {label}: cold {cold['launch_s']:.2f} s, "
              f"warm {warm['launch_s']:.3f} s", flush=True)
    return out


def _write(path: str, doc: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(doc, f, indent=1, default=float)


if __name__ == "__main__":
    main()
