"""``strato infer``: distributed inference of a Sparse DNN Graph Challenge network.

    strato infer --neurons N --layers L [--inputs K] --workers W|auto
                 --channel bus|blob|auto --partition random|contiguous|hypergraph
                 [--data-dir D] [--save-network DIR] [--categories-out FILE]
                 [--json FILE] [--compare]

The network is generated from ``--seed`` (or read from challenge TSV files with
``--network-dir``), the inputs are MNIST from ``--data-dir`` (or a challenge
``sparse-images`` TSV with ``--images-file``). The run uses the primitives of ``--backend``
under ``--root`` (a temporary directory by default). Bad input is one line on stderr
and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from strato.errors import ConfigError, StratoError

__all__ = ["main_infer"]

DEFAULT_DATA_DIR = os.environ.get("STRATO_MNIST_DIR", "data/mnist")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def _workers(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--workers must be a number or 'auto', got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"--workers must be ≥ 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="strato infer",
        description="Distributed inference of a Sparse DNN Graph Challenge network on "
        "serverless functions (Runtime workers exchanging activations over the Bus or "
        "the BlobStore).",
    )
    p.add_argument("--neurons", type=int, required=True, help="neurons per layer (1024, 4096, …)")
    p.add_argument("--layers", type=int, required=True, help="number of layers")
    p.add_argument("--inputs", type=int, default=60000, help="number of input images")
    p.add_argument("--workers", type=_workers, default=1, help="W, or 'auto'")
    p.add_argument("--channel", choices=["bus", "blob", "auto"], default="bus")
    p.add_argument(
        "--partition", choices=["random", "contiguous", "hypergraph"], default="hypergraph"
    )
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="directory of MNIST IDX files")
    p.add_argument("--network-dir", help="read challenge TSV layers n{N}-l{l}.tsv from here")
    p.add_argument("--images-file", help="read challenge sparse-images TSV instead of MNIST")
    p.add_argument("--save-network", metavar="DIR", help="write layers, biases, inputs as TSV")
    p.add_argument("--categories-out", metavar="FILE", help="write categories (1-based)")
    p.add_argument("--json", metavar="FILE", help="write the run's numbers as JSON")
    p.add_argument("--compare", action="store_true", help="also run python-graphblas")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--launch", choices=["flat", "tree"], default="tree")
    p.add_argument("--branching", type=int, default=2, help="launch tree branching")
    p.add_argument("--group-size", type=int, default=16, help="workers per bus topic")
    p.add_argument("--memory-mb", type=int, default=2048, help="memory per function")
    p.add_argument("--latency-target", type=float, help="seconds, for --workers/--channel auto")
    p.add_argument("--max-workers", type=int, default=8, help="largest W tried by auto")
    p.add_argument("--root", help="directory for the services' files (default: temporary)")
    p.add_argument("--backend", choices=["embedded", "ray"], default="embedded",
                   help="where the workers run (ray: as Ray actors; default: embedded)")
    p.add_argument("--address", help="ray: the cluster to join (default: a local Ray)")
    return p


def main_infer(argv: list[str], import_backend: Callable[[str], None] | None = None) -> int:
    """``strato infer``; ``import_backend(name)`` registers a backend other than the
    embedded one (the command line passes it in: only it imports backends)."""
    try:
        args = build_parser().parse_args(argv)
        _validate(args)
        if args.backend != "embedded":
            if import_backend is None:
                raise ConfigError(f"--backend {args.backend} is not available here")
            import_backend(args.backend)
        return _run(args)
    except StratoError as exc:
        print(f"strato infer: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an output or services path the checks could not foresee
        where = f": {exc.filename}" if exc.filename else ""
        print(f"strato infer: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2


def _validate(args: argparse.Namespace) -> None:
    square = round(args.neurons**0.5) ** 2 == args.neurons
    if (args.neurons < 1024 or args.neurons % 1024 or not square) and args.network_dir is None:
        raise ConfigError(
                f"--neurons must be 1024, 4096, 16384 or 65536 (a square multiple of 1024), "
                f"got {args.neurons}"
            )
    if args.layers < 1:
        raise ConfigError(f"--layers must be ≥ 1, got {args.layers}")
    if args.inputs < 1:
        raise ConfigError(f"--inputs must be ≥ 1, got {args.inputs}")
    if args.branching < 1 or args.group_size < 1 or args.memory_mb < 128:
        raise ConfigError("--branching and --group-size must be ≥ 1, --memory-mb ≥ 128")
    if isinstance(args.workers, int) and args.workers > args.neurons:
        raise ConfigError(f"--workers must be at most --neurons ({args.neurons})")
    if args.address is not None and args.backend != "ray":
        raise ConfigError("--address only applies with --backend ray")
    if args.max_workers < 1:
        raise ConfigError(f"--max-workers must be ≥ 1, got {args.max_workers}")
    if args.latency_target is not None and args.latency_target <= 0:
        raise ConfigError(f"--latency-target must be > 0 seconds, got {args.latency_target}")
    # outputs are checked before the run, not after it
    for flag, value in (("--json", args.json), ("--categories-out", args.categories_out)):
        if value is not None:
            parent = Path(value).resolve().parent
            if Path(value).is_dir() or not parent.is_dir() or not os.access(parent, os.W_OK):
                raise ConfigError(f"{flag} {value}: not a writable file path")
    for flag, value in (("--save-network", args.save_network), ("--root", args.root)):
        if value is not None:
            path = Path(value).resolve()
            target = path if path.exists() else path.parent
            if not target.is_dir() or not os.access(target, os.W_OK):
                raise ConfigError(f"{flag} {value}: not a writable directory")


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from strato.inference import inputs as mnist
    from strato.inference import tsv
    from strato.inference.network import generate_network

    if args.network_dir:
        network = tsv.read_network(args.network_dir, args.neurons, args.layers)
    else:
        network = generate_network(args.neurons, args.layers, seed=args.seed)
    if args.images_file:
        images = tsv.read_images(args.images_file, args.neurons, args.inputs)
    else:
        images = mnist.mnist_inputs(args.neurons, args.inputs, args.data_dir)
    return network, images


def _run(args: argparse.Namespace) -> int:
    from strato.inference import tsv
    from strato.inference.cost import price
    from strato.inference.partition import communication_volume, make_partition
    from strato.inference.planner import choose, predict
    from strato.inference.run import RunOptions, run_distributed
    from strato.services import connect

    network, images = _load(args)
    layers, biases = network.layers, network.biases
    if args.save_network:
        tsv.write_network(args.save_network, network)
        tsv.write_images(Path(args.save_network) / f"sparse-images-{args.neurons}.tsv", images)
    candidates: list[dict[str, object]] = []
    if args.workers == "auto" or args.channel == "auto":
        ws = [args.workers] if args.workers != "auto" else _powers(args.max_workers)
        chs = [args.channel] if args.channel != "auto" else ["bus", "blob"]
        best, considered = choose(
            layers, biases, images, args.partition, ws, chs, args.latency_target,
            args.memory_mb, args.group_size, args.seed,
        )
        candidates = [c.summary() for c in considered]
    else:
        part = make_partition(args.partition, layers, args.workers, args.seed)
        best = predict(layers, biases, images, part, args.channel, args.memory_mb, args.group_size)
    options = RunOptions(
        channel=best.channel,
        branching=args.branching if args.launch == "tree" else 0,
        group_size=args.group_size,
        memory_mb=args.memory_mb,
    )
    with tempfile.TemporaryDirectory(prefix="strato-infer-") as tmp:
        root = args.root or tmp
        config = {"backend": args.backend, "root": str(Path(root).resolve())}
        if args.backend == "ray":
            config["address"] = args.address
        with connect(config) as services:
            result = run_distributed(services, layers, biases, images, best.partition, options)
    measured = result["counts"]
    edges = network.edges
    out: dict[str, Any] = {
        "neurons": args.neurons,
        "layers": len(layers),
        "inputs": images.shape[0],
        "edges": edges,
        "workers": best.workers,
        "channel": best.channel,
        "partition": args.partition,
        "launch": args.launch,
        "categories": int(result["categories"].size),
        "inference_s": result["inference_s"],
        "total_s": result["total_s"],
        "launch_s": result["launch_s"],
        "rate_edges_per_s": images.shape[0] * edges / result["inference_s"],
        "volume_rows": int(communication_volume(layers, best.partition).sum()),
        "bytes_exchanged": int(measured.get("bytes_published", measured.get("bytes_put", 0))),
        "messages": int(measured.get("publish_calls", measured.get("puts", 0))),
        "predicted": best.counts,
        "measured": measured,
        "predicted_cost_usd": best.cost_usd,
        "cost_usd": price(measured),
    }
    if candidates:
        out["candidates"] = candidates
    if args.compare:
        from strato.inference.reference import graphblas_inference

        t0 = time.perf_counter()
        gb_categories = graphblas_inference(layers, biases, images)
        gb_s = time.perf_counter() - t0
        out["graphblas_s"] = gb_s
        out["graphblas_rate_edges_per_s"] = images.shape[0] * edges / gb_s
        out["matches_graphblas"] = bool(np.array_equal(gb_categories, result["categories"]))
    if args.categories_out:
        tsv.write_categories(args.categories_out, result["categories"])
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=float) + "\n")
    _print_summary(out)
    return 0 if out.get("matches_graphblas", True) else 1


def _powers(limit: int) -> list[int]:
    out, w = [], 1
    while w <= limit:
        out.append(w)
        w *= 2
    return out


def _print_summary(out: dict[str, Any]) -> None:
    line = (
        f"{out['neurons']}×{out['layers']}, {out['inputs']} inputs, W={out['workers']} "
        f"{out['channel']}/{out['partition']}: {out['categories']} categories in "
        f"{out['inference_s']:.2f} s ({out['rate_edges_per_s']:.3g} edges/s), "
        f"{out['messages']} messages, {out['bytes_exchanged'] / 1e6:.1f} MB exchanged, "
        f"${out['cost_usd']:.6f}"
    )
    print(line)
    if "graphblas_rate_edges_per_s" in out:
        print(
            f"python-graphblas: {out['graphblas_s']:.2f} s "
            f"({out['graphblas_rate_edges_per_s']:.3g} edges/s), "
            f"categories {'match' if out['matches_graphblas'] else 'DIFFER'}"
        )
