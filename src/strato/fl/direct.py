"""``strato client --backend aws``: a client that joins a run directly through the
run's services (on AWS: SQS, S3 and DynamoDB), on whichever backend the config names.

No server in between: the client registers (its own SQS queue, subscribed to the
round notices for its name, and a record in the ``clients`` table, so the next
rounds may select it), then long-polls its queue, fetches the round's model from S3,
trains with the app's train function, puts its update in S3 and its metadata in the
``updates`` table, whose stream wakes the aggregator, and acknowledges the notice
(the simulated clients' very code, ``SimClient``). It stops when the job is finished,
after ``rounds_max`` rounds, or when stopped.

Its data: the client loads the dataset itself (``--data-dir``, ``$STRATO_DATA_DIR``,
else scikit-learn's digits) and takes its partition's rows from the job's partition
(``--partition-index``, else the next index in registration order); no data crosses
the network. The credentials it needs are those of the run's queues, bucket and
tables (docs/aws.md lists them).

``wait_for_clients`` is the ``attach`` of a run whose clients join this way: round 1
starts once enough have registered.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from strato.codec import decode
from strato.data import load_dataset
from strato.errors import ConfigError, NotFound
from strato.fl import coordinator, state
from strato.fl.app import DataInfo, Dataset, load_app
from strato.fl.client import SimClient
from strato.services import Services, connect

__all__ = ["DirectClientOptions", "run_direct_client", "wait_for_clients"]

_REGISTRATIONS = "registrations"  # the JOB table's counter of registered clients
# load_app publishes the module before running it: clients in one process (tests,
# simulations) must not load an app at the same time.
_LOAD_LOCK = threading.Lock()


@dataclass(frozen=True)
class DirectClientOptions:
    app_dir: str
    services: dict[str, Any]
    client_id: str | None = None
    data_dir: str | None = None
    rounds_max: int | None = None
    partition_index: int | None = None
    wait_s: float = 10.0  # one long poll of the queue
    join_timeout_s: float = 600.0  # how long to wait for the run to exist
    visibility_timeout_s: float = 300.0  # a notice stays ours while we train
    quiet: bool = False


def _say(opts: DirectClientOptions, text: str) -> None:
    if not opts.quiet:
        print(text, flush=True)


def _job(svc: Services, opts: DirectClientOptions, stop: threading.Event) -> dict[str, Any]:
    deadline = time.monotonic() + opts.join_timeout_s
    while not stop.is_set():
        try:
            item = svc.table.get(state.JOB, "config")
        except NotFound:
            item = None
        if item is not None:
            return item.value
        if time.monotonic() > deadline:
            break
        stop.wait(1.0)
    raise ConfigError(
        f"no run on prefix {svc.config.get('prefix')!r} after {opts.join_timeout_s:.0f} s "
        "(start it with strato run APP_DIR --backend aws --remote-clients N)"
    )


def _next_index(svc: Services, job: dict[str, Any]) -> int:
    from strato.errors import ConditionFailed

    with contextlib.suppress(ConditionFailed):  # another client made the counter first
        svc.table.put(state.JOB, _REGISTRATIONS, {"count": 0}, if_absent=True)
    taken: dict[str, int] = {}

    def take(value: dict[str, Any]) -> dict[str, Any]:
        taken["index"] = int(value["count"])
        return {"count": int(value["count"]) + 1}

    state.cas_update(svc.table, state.JOB, _REGISTRATIONS, take)
    return taken["index"] % len(job["clients"])


def _data(svc: Services, job: dict[str, Any], index: int, data_dir: str | None) -> Dataset:
    ds = load_dataset(data_dir)
    if ds.name != job["dataset"]:
        raise ConfigError(
            f"the run trains on {job['dataset']} but this client loaded {ds.name}: "
            "give the same data (--data-dir or STRATO_DATA_DIR)"
        )
    names = job["clients"]
    if not 0 <= index < len(names):
        raise ConfigError(f"--partition-index must be in 0..{len(names) - 1}, got {index}")
    rows = np.array(decode(svc.blobs.get(job["partition_key"]))[names[index]])
    info = DataInfo(job["dataset"], tuple(job["input_shape"]), int(job["num_classes"]))
    return Dataset(ds.train_x[rows], ds.train_y[rows], info)


class _Finished:
    """Whether the job is over: its last round evaluated, or (asked of the workflow at
    most every ``every_s``) the round loop no longer running."""

    def __init__(self, svc: Services, job: dict[str, Any], every_s: float = 30.0) -> None:
        self.svc, self.last, self.every_s = svc, int(job["config"]["rounds"]), every_s
        self.asked = time.monotonic()

    def __call__(self) -> bool:
        if self.svc.table.get(state.METRICS, state.round_key(self.last)) is not None:
            return True
        if time.monotonic() - self.asked < self.every_s:
            return False
        self.asked = time.monotonic()
        try:
            return self.svc.workflow.describe(coordinator.EXECUTION_ID).status != "RUNNING"
        except NotFound:
            return False  # not started yet


def run_direct_client(
    opts: DirectClientOptions, stop: threading.Event | None = None
) -> dict[str, Any]:
    """Take part in rounds until the job is finished; returns what this client did."""
    stop = stop or threading.Event()
    with _LOAD_LOCK:
        app = load_app(opts.app_dir)  # a broken app fails here, before registering
    with connect(opts.services) as svc:
        job = _job(svc, opts, stop)
        client = opts.client_id or f"c{uuid.uuid4().hex[:8]}"
        index = _next_index(svc, job) if opts.partition_index is None else opts.partition_index
        data = _data(svc, job, index, opts.data_dir)
        coordinator.register_client(
            svc, client, {"partition_index": index, "registered_at": time.time()}
        )
        _say(opts, f"client {client}: registered; partition {index} ({len(data)} examples)")
        sim = SimClient(svc, client, app, data, job)
        finished = _Finished(svc, job)
        trained: list[int] = []
        while not stop.is_set() and (opts.rounds_max is None or len(trained) < opts.rounds_max):
            notice = sim.next_notice(opts.wait_s, opts.visibility_timeout_s)
            if notice is None:
                if finished():
                    break
                continue
            rnd = svc.table.get(state.ROUNDS, state.round_key(notice.round))
            if rnd is None or rnd.value["status"] != "open":
                svc.bus.ack(sim.queue, notice.receipt)  # a closed round's notice
                continue
            result = sim.train_round(notice)
            if "skipped" not in result:
                trained.append(notice.round)
                _say(opts, f"client {client}: round {notice.round} trained and uploaded")
        _say(opts, f"client {client}: done after training {len(trained)} round(s)")
        return {"client": client, "partition_index": index, "rounds": trained}


def wait_for_clients(
    min_clients: int, *, timeout_s: float | None = None, quiet: bool = False, how: str = ""
) -> Callable[[Services], Callable[[], None]]:
    """An ``attach`` that returns once ``min_clients`` clients have registered; ``how``
    tells a waiting user how clients join (the command line)."""

    def attach(svc: Services) -> Callable[[], None]:
        if not quiet:
            print(f"waiting for {min_clients} client(s)" + (f": {how}" if how else ""), flush=True)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while len(svc.table.query(state.CLIENTS)) < min_clients:
            if deadline is not None and time.monotonic() > deadline:
                raise ConfigError(f"fewer than {min_clients} clients registered in {timeout_s} s")
            time.sleep(0.5)
        return lambda: None

    return attach
