"""What a federated learning run on the aws backend adds to ``strato run``.

``open_run_services`` opens the run's Services on AWS. Against an endpoint URL it
first applies the FL template through the service APIs (idempotent: the same
resources ``strato deploy aws`` makes); on AWS itself the stack must be deployed,
and the functions' code is read from it. A prefix holds one run: starting a new run
on a prefix that already holds one is refused (resume it, or use another prefix).

``CloudTrigger`` stands where the embedded backend starts its ``StreamTrigger``: on
AWS, Lambda's event source mapping on the updates stream wakes the aggregator (the
template makes it; against Strato's local AWS its front runs it), so there is nothing
to poll here. It checks the mapping is there, and when it stops it writes
``aws-usage.json`` into the run directory: the billable requests the run made, from
the local front's counters (when the endpoint keeps them) and the state machine's
history, priced at list prices (``usage``).

``LambdaAccounting`` gives the run's function counters (invocations, billed seconds,
GB-seconds, cold starts) as Lambda counts them, whoever invoked the functions (Step
Functions, the event source mapping, other functions): from the local front when the
endpoint keeps counts; on AWS itself, only what this process invoked (Lambda's own
totals are in CloudWatch and Cost Explorer).

``wait_for_clients`` is the ``attach`` of a run whose clients join with ``strato
client --backend aws``: round 1 starts once enough have registered.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from strato.backends.aws._boto import clients_for
from strato.backends.aws._names import physical
from strato.errors import ConfigError, NotFound
from strato.fl import coordinator, state
from strato.services import RuntimeStats, Services, connect

if TYPE_CHECKING:
    from strato.fl.run import RunOptions

__all__ = ["CloudTrigger", "LambdaAccounting", "open_run_services", "wait_for_clients"]

USAGE_FILE = "aws-usage.json"


def open_run_services(opts: RunOptions) -> Services:
    from strato.backends.aws.deploy import DeployOptions, deploy, deployed_code, services_config

    assert opts.services is not None
    config = dict(opts.services)
    config.setdefault("root", str(opts.out / "services"))
    if config.get("endpoint_url") and "credentials" not in config:
        local = services_config(
            str(config.get("prefix", "strato-")),
            root=config["root"],
            endpoint_url=config["endpoint_url"],
        )
        config.update({k: v for k, v in local.items() if k not in config})
    prefix = str(config.get("prefix", "strato-"))
    if config.get("endpoint_url"):
        extra = {k: config[k] for k in ("lambda_root",) if k in config}
        deploy(
            DeployOptions(
                prefix=prefix,
                region=config.get("region"),
                endpoint_url=config["endpoint_url"],
                method="apis",
                root=Path(config["root"]),
                function_services=extra,
            ),
            opts.config,
        )
    elif "lambda_code" not in config:
        config["lambda_code"] = deployed_code(config)
    svc = connect(config)
    if not opts.resume:
        try:
            existing = svc.table.get(state.JOB, "config")
        except NotFound:
            existing = None
        if existing is not None:
            svc.close()
            raise ConfigError(
                f"the AWS prefix {prefix!r} already holds a run "
                f"(of {existing.value.get('app_dir')}): resume it with --resume OUT, "
                "choose another --prefix, or tear it down with "
                f"`strato deploy aws --delete --prefix {prefix}`"
            )
    return svc


class LambdaAccounting:
    """The run's function counters since this was made (see the module doc)."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc
        self.prefix = str(svc.config.get("prefix", "strato-"))
        self.endpoint = svc.config.get("endpoint_url")
        self.base = self._totals()

    def _totals(self) -> RuntimeStats | None:
        from strato.backends.aws.usage import fetch_front_usage

        usage = fetch_front_usage(self.endpoint) if self.endpoint else None
        if usage is None:
            return None
        total = RuntimeStats()
        for name, counts in usage.get("lambda", {}).items():
            if name.startswith(self.prefix):
                total.invocations += int(counts.get("invocations", 0))
                total.cold_starts += int(counts.get("cold_starts", 0))
                total.billed_s += float(counts.get("billed_ms", 0)) / 1000
                total.gb_s += float(counts.get("gb_s", 0.0))
        return total

    def stats(self) -> RuntimeStats:
        now = self._totals() if self.base is not None else None
        if now is None or self.base is None:
            return self.svc.runtime.stats()
        return RuntimeStats(
            invocations=now.invocations - self.base.invocations,
            cold_starts=now.cold_starts - self.base.cold_starts,
            billed_s=now.billed_s - self.base.billed_s,
            gb_s=now.gb_s - self.base.gb_s,
        )


class CloudTrigger:
    """The updates stream's trigger on AWS: Lambda's event source mapping (see the doc)."""

    def __init__(self, svc: Services, out: Path) -> None:
        self.svc, self.out = svc, out
        self.clients = clients_for(svc.config)
        self.endpoint = self.clients.config.endpoint_url
        self.before: dict[str, Any] | None = None
        self.started = time.time()

    def start(self) -> CloudTrigger:
        from strato.backends.aws.usage import fetch_front_usage

        prefix = self.clients.config.prefix
        function = physical("function", prefix, "aggregate")
        table = self.clients.client("dynamodb").describe_table(
            TableName=physical("table", prefix, state.UPDATES)
        )["Table"]
        mappings = self.clients.client("lambda").list_event_source_mappings(
            EventSourceArn=table["LatestStreamArn"], FunctionName=function
        )["EventSourceMappings"]
        if not mappings:
            raise ConfigError(
                f"no event source mapping from the updates stream to {function}: "
                "redeploy with `strato deploy aws`"
            )
        if self.endpoint:
            self.before = fetch_front_usage(self.endpoint)
        return self

    def stop(self) -> None:
        try:
            self._write_usage()
        except Exception as exc:  # accounting must not turn a finished run into a failure
            print(f"strato: could not write {USAGE_FILE}: {exc}", file=sys.stderr)

    def _write_usage(self) -> None:
        from strato.backends.aws.usage import (
            bill,
            counters,
            fetch_front_usage,
            state_transitions,
            subtract,
        )

        prefix = self.clients.config.prefix
        machine = physical("state machine", prefix, coordinator.MACHINE)
        execution = physical("execution", "", coordinator.EXECUTION_ID)
        arn = self.clients.arn("states", f"execution:{machine}:{execution}")
        sfn = self.clients.client("stepfunctions")
        rounds = len(self.svc.table.query(state.METRICS))
        report: dict[str, Any] = {"rounds": rounds, "execution": arn}
        quantities: dict[str, float] = {}
        after = fetch_front_usage(self.endpoint) if self.endpoint else None
        if after is not None and self.before is not None:
            delta = subtract(after, self.before)
            quantities = counters(delta, prefix)
            report["measured_by"] = "the local front's counters (this segment of the run)"
            report["requests"] = {k: v for k, v in sorted(delta["requests"].items()) if v}
            report["functions"] = {
                name: counts for name, counts in sorted(delta.get("lambda", {}).items())
                if name.startswith(prefix) and counts.get("invocations")
            }  # fmt: skip
        else:
            report["measured_by"] = "Step Functions history only (the rest: AWS Cost Explorer)"
        quantities["sfn_transitions"] = float(state_transitions(sfn, arn))
        cost = bill(quantities)
        report["quantities"] = quantities
        report["usd"] = cost
        if rounds:
            report["usd_per_round"] = cost["total"] / rounds
        (self.out / USAGE_FILE).write_text(json.dumps(report, indent=2))


def wait_for_clients(
    min_clients: int, *, timeout_s: float | None = None, quiet: bool = False
) -> Callable[[Services], Callable[[], None]]:
    """An ``attach`` that returns once ``min_clients`` clients have registered."""

    def attach(svc: Services) -> Callable[[], None]:
        prefix = svc.config.get("prefix", "strato-")
        if not quiet:
            print(
                f"waiting for {min_clients} client(s): strato client APP_DIR --backend aws "
                f"--prefix {prefix}" + (f" --endpoint-url {svc.config['endpoint_url']}"
                                        if svc.config.get("endpoint_url") else ""),
                flush=True,
            )  # fmt: skip
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while len(svc.table.query(state.CLIENTS)) < min_clients:
            if deadline is not None and time.monotonic() > deadline:
                raise ConfigError(f"fewer than {min_clients} clients registered in {timeout_s} s")
            time.sleep(0.5)
        return lambda: None

    return attach
