"""What an application's run on the aws backend adds to its five primitives: the
backend's ``open_run``, ``start_trigger`` and ``meter`` hooks (``strato.services.Backend``).

``open_run`` opens a run's Services on AWS. Against an endpoint URL it first applies
the application's template through the service APIs (idempotent: the same resources
``strato deploy aws`` makes); on AWS itself the stack must be deployed, and the
functions' code is read from it.

``EventSourceTrigger`` stands where the embedded backend starts a ``StreamTrigger``: on
AWS, Lambda's event source mapping on the table's stream invokes the function (the
template makes it; against Strato's local AWS its front runs it), so there is nothing
to poll here. It checks that the mapping is there.

``LambdaMeter`` gives the run's function counters (invocations, billed seconds,
GB-seconds, cold starts) as Lambda counts them, whoever invoked the functions (Step
Functions, the event source mapping, other functions): from the local front when the
endpoint keeps counts; on AWS itself, only what this process invoked (Lambda's own
totals are in CloudWatch and Cost Explorer). Its ``usage`` is the billable requests
made since it was made, from the local front's counters (when the endpoint keeps them)
and the state machine's history, priced at list prices (``usage``).

Nothing here knows which application runs: its tables, functions and state machine
come in as ``AppResources`` and names.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from strato.backends.aws._boto import clients_for
from strato.backends.aws._names import physical
from strato.errors import ConfigError
from strato.services import AppResources, RuntimeStats, Services, StreamSource, connect

__all__ = ["EventSourceTrigger", "LambdaMeter", "open_run"]


def open_run(config: Mapping[str, Any], resources: AppResources) -> Services:
    """The run's Services on AWS, once the resources ``resources`` lists exist."""
    from strato.backends.aws.deploy import DeployOptions, deploy, deployed_code, services_config

    config = dict(config)
    if "root" not in config:
        raise ConfigError("every backend needs a local 'root' directory for its run files")
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
            resources,
        )
    elif "lambda_code" not in config:
        config["lambda_code"] = deployed_code(config, resources.name)
    return connect(config)


class LambdaMeter:
    """The run's function counters and bill since this was made (see the module doc)."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc
        self.clients = clients_for(svc.config)
        self.prefix = self.clients.config.prefix
        self.endpoint = self.clients.config.endpoint_url
        self.before = self._front_usage()
        self.base = self._totals(self.before)

    def _front_usage(self) -> dict[str, Any] | None:
        from strato.backends.aws.usage import fetch_front_usage

        return fetch_front_usage(self.endpoint) if self.endpoint else None

    def _totals(self, usage: Mapping[str, Any] | None) -> RuntimeStats | None:
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
        now = self._totals(self._front_usage()) if self.base is not None else None
        if now is None or self.base is None:
            return self.svc.runtime.stats()
        return RuntimeStats(
            invocations=now.invocations - self.base.invocations,
            cold_starts=now.cold_starts - self.base.cold_starts,
            billed_s=now.billed_s - self.base.billed_s,
            gb_s=now.gb_s - self.base.gb_s,
        )

    def usage(self, machine: str, execution: str) -> dict[str, Any]:
        """The billable requests since this meter was made and their price; the state
        transitions of the workflow execution ``machine``/``execution`` count too."""
        from strato.backends.aws.usage import bill, counters, state_transitions, subtract

        machine_name = physical("state machine", self.prefix, machine)
        execution_name = physical("execution", "", execution)
        arn = self.clients.arn("states", f"execution:{machine_name}:{execution_name}")
        report: dict[str, Any] = {"execution": arn}
        quantities: dict[str, float] = {}
        after = self._front_usage()
        if after is not None and self.before is not None:
            delta = subtract(after, self.before)
            quantities = counters(delta, self.prefix)
            report["measured_by"] = "the local front's counters (this segment of the run)"
            report["requests"] = {k: v for k, v in sorted(delta["requests"].items()) if v}
            report["functions"] = {
                name: counts for name, counts in sorted(delta.get("lambda", {}).items())
                if name.startswith(self.prefix) and counts.get("invocations")
            }  # fmt: skip
        else:
            report["measured_by"] = "Step Functions history only (the rest: AWS Cost Explorer)"
        sfn = self.clients.client("stepfunctions")
        quantities["sfn_transitions"] = float(state_transitions(sfn, arn))
        report["quantities"] = quantities
        report["usd"] = bill(quantities)
        return report


class EventSourceTrigger:
    """A stream source on AWS: Lambda's event source mapping (see the module doc)."""

    def __init__(self, svc: Services, source: StreamSource) -> None:
        self.svc, self.source = svc, source
        self.clients = clients_for(svc.config)

    def start(self) -> EventSourceTrigger:
        prefix = self.clients.config.prefix
        function = physical("function", prefix, self.source.function)
        table = self.clients.client("dynamodb").describe_table(
            TableName=physical("table", prefix, self.source.table)
        )["Table"]
        mappings = self.clients.client("lambda").list_event_source_mappings(
            EventSourceArn=table["LatestStreamArn"], FunctionName=function
        )["EventSourceMappings"]
        if not mappings:
            raise ConfigError(
                f"no event source mapping from the {self.source.table} stream to {function}: "
                "redeploy with `strato deploy aws`"
            )
        return self

    def stop(self) -> None:
        """Nothing runs here: the mapping stays with the deployment."""


def start_trigger(svc: Services, source: StreamSource) -> EventSourceTrigger:
    return EventSourceTrigger(svc, source).start()
