"""A Ray cluster of several nodes on this machine, for tests, benchmarks and trying out.

Each node is a raylet of its own, with its own object store and its own CPUs, as on
separate machines; only the network between them is this machine's loopback::

    python -m strato.backends.ray.local --nodes 3 --cpus 1
    # prints the address; in another shell:
    strato run examples/mnist --backend ray --address ADDRESS

``LocalCluster`` is the same in code (a context manager; ``remove_node`` takes a worker
node away, as a machine that dies). Built on ``ray.cluster_utils.Cluster``.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Any

__all__ = ["LocalCluster", "main"]


class LocalCluster:
    """``nodes`` Ray nodes on this machine (the first is the head), ``cpus`` CPUs each."""

    def __init__(self, nodes: int = 3, cpus: float = 1, object_store_mb: int = 256) -> None:
        if nodes < 1 or cpus <= 0:
            raise ValueError(f"a cluster needs ≥ 1 node and > 0 CPUs, got {nodes}, {cpus}")
        os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        from ray.cluster_utils import Cluster

        self._cpus, self._store = cpus, object_store_mb * 1024 * 1024
        self._cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": cpus, "object_store_memory": self._store, "include_dashboard": False})
        self.workers: list[Any] = []
        # every node's id, the removed ones' too (``node_dir`` names a node by its id)
        head: Any = self._cluster.head_node
        self.node_ids: set[str] = {str(head.node_id)}
        for _ in range(nodes - 1):
            self.add_node()
        self._cluster.wait_for_nodes()

    @property
    def address(self) -> str:
        return str(self._cluster.address)

    def processes(self) -> dict[int, str]:
        """The processes of the nodes now in the cluster (GCS, raylets, ...): pid -> kind."""
        found: dict[int, str] = {}
        nodes = [self._cluster.head_node, *self._cluster.worker_nodes]
        for node in nodes:
            for kind, infos in (getattr(node, "all_processes", None) or {}).items():
                for info in infos:
                    proc = getattr(info, "process", None)
                    if proc is not None and getattr(proc, "pid", None):
                        found[int(proc.pid)] = str(kind)
        return found

    def worker_pids(self) -> set[int]:
        """Every worker process the cluster has started, running or gone, by pid (from
        the workers' log files, which all nodes here write to one directory)."""
        head: Any = self._cluster.head_node
        logs = Path(head.get_logs_dir_path())
        found = (re.fullmatch(r"python-core-worker-[0-9a-f]+_(\d+)\.log", f.name)
                 for f in logs.iterdir()) if logs.is_dir() else ()
        return {int(m.group(1)) for m in found if m}

    def add_node(self) -> Any:
        """A worker node more, like the others."""
        node = self._cluster.add_node(num_cpus=self._cpus, object_store_memory=self._store)
        self.workers.append(node)
        self.node_ids.add(str(node.node_id))
        return node

    def remove_node(self, node: Any) -> None:
        """Take a worker node away at once (its raylet and workers are killed)."""
        self._cluster.remove_node(node, allow_graceful=False)  # type: ignore[no-untyped-call]
        self.workers.remove(node)

    def shutdown(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        self._cluster.shutdown()  # type: ignore[no-untyped-call]

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m strato.backends.ray.local",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=3, help="Ray nodes, the head included")
    p.add_argument("--cpus", type=float, default=1, help="CPUs of each node")
    args = p.parse_args(argv)
    try:
        cluster = LocalCluster(args.nodes, args.cpus)
    except (ValueError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(cluster.address, flush=True)
    print(f"{args.nodes} nodes × {args.cpus:g} CPUs; Ctrl-C stops them", file=sys.stderr)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
