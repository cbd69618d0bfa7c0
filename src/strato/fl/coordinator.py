"""The round loop as a state machine (data), and the setup of a run's resources.

The definition is plain Amazon States Language, so the same dict runs on the
embedded Workflow and on Step Functions::

    Round ──(token called back: quorum in)──▶ Evaluate ──▶ More? ──▶ Next ──▶ Round
      └──(TimeoutSeconds: the round deadline)──▶ Deadline ──▶ Evaluate      └──▶ Done

No process waits idle for updates: ``start_round`` notifies the clients and returns;
the aggregator function, woken by the updates' stream, calls the token back.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from strato.fl import state
from strato.fl.config import JobConfig
from strato.services import FunctionSpec, Services, TopicSchema

__all__ = [
    "EXECUTION_ID",
    "MACHINE",
    "function_specs",
    "notice_schema",
    "provision",
    "register_client",
    "round_loop_definition",
]

MACHINE = "strato-fl-rounds"
EXECUTION_ID = "run"
_RETRY = [{"ErrorEquals": ["States.TaskFailed"], "MaxAttempts": 2, "IntervalSeconds": 1}]


def _invoke(function: str, payload: dict[str, Any], wait: bool = False) -> dict[str, Any]:
    suffix = ".waitForTaskToken" if wait else ""
    return {
        "Type": "Task",
        "Resource": f"arn:aws:states:::lambda:invoke{suffix}",
        "Parameters": {"FunctionName": function, "Payload": payload},
    }


def round_loop_definition(round_deadline_s: float) -> dict[str, Any]:
    return {
        "Comment": "Strato federated learning: one iteration per round",
        "StartAt": "Round",
        "States": {
            "Round": {
                **_invoke("start_round", {"round.$": "$.round", "token.$": "$$.Task.Token"}, True),
                "TimeoutSeconds": max(1, math.ceil(round_deadline_s)),
                "ResultPath": "$.closed",
                "Catch": [
                    {
                        "ErrorEquals": ["States.Timeout"],
                        "ResultPath": "$.timeout",
                        "Next": "Deadline",
                    }
                ],
                "Next": "Evaluate",
            },
            "Deadline": {
                **_invoke("close_round", {"round.$": "$.round"}),
                "ResultPath": "$.closed",
                "Retry": _RETRY,
                "Next": "Evaluate",
            },
            "Evaluate": {
                **_invoke("evaluate", {"round.$": "$.round"}),
                "ResultPath": "$.eval",
                "Retry": _RETRY,
                "Next": "More",
            },
            "More": {
                "Type": "Choice",
                "Choices": [
                    {"Variable": "$.eval.Payload.done", "BooleanEquals": True, "Next": "Done"}
                ],
                "Default": "Next",
            },
            "Next": {
                "Type": "Pass",
                "Parameters": {"round.$": "$.eval.Payload.next_round"},
                "Next": "Round",
            },
            "Done": {"Type": "Succeed"},
        },
    }


def function_specs(cfg: JobConfig) -> list[FunctionSpec]:
    handlers = "strato.fl.functions:"
    single = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    aggregate = FunctionSpec(
        # The node agent of the aggregation engine: one warm instance serialises a
        # round's admissions and its close; the engine's leaves add in parallel.
        "aggregate",
        handlers + "aggregate",
        timeout_s=300,
        max_concurrency=1,
        keep_alive_s=120,
        env={**single, "OPENBLAS_NUM_THREADS": "1", "STRATO_FUNCTION": "aggregate"},
        locality="state",  # it reads every update: where the blobs are
    )
    return [
        FunctionSpec(
            "start_round",
            handlers + "start_round",
            timeout_s=60,
            max_concurrency=1,
            keep_alive_s=120,
        ),
        FunctionSpec(
            "client",
            handlers + "client",
            timeout_s=900,
            max_concurrency=cfg.client_concurrency,
            keep_alive_s=120,
            env=single,
        ),
        aggregate,
        # The engine on each node for the updates lying there (a backend with several
        # nodes keeps a simulated client's update on its node): "aggregate" hands them
        # over and collects the leaves' partials at the close.
        dataclasses.replace(aggregate, name="leaf", handler=handlers + "leaf",
                            env={**aggregate.env, "STRATO_FUNCTION": "leaf"},
                            locality="node"),
        # Beside each node's leaf: a round's late update sent up as it is (its own
        # function, so it never waits behind the leaf's partial of the updates before).
        dataclasses.replace(aggregate, name="send_up", handler=handlers + "send_up",
                            env={**aggregate.env, "STRATO_FUNCTION": "send_up"},
                            locality="node"),
        FunctionSpec(
            "close_round",
            handlers + "close_round",
            timeout_s=300,
            max_concurrency=1,
            keep_alive_s=30,
        ),
        FunctionSpec(
            "evaluate", handlers + "evaluate", timeout_s=600, max_concurrency=1, keep_alive_s=120
        ),
    ]


def notice_schema() -> TopicSchema:
    """The schema of the round-notice topic (also in the AWS template's topic tags)."""
    return TopicSchema(
        required_attributes=("client", "round"),
        json_body_keys=("round", "model_key"),
        max_bytes=4096,
    )


def provision(svc: Services, clients: list[str]) -> None:
    """Tables, the notice topic and one filtered queue per client (idempotent)."""
    create_tables(svc)
    svc.bus.create_topic(state.TOPIC, notice_schema())
    for c in clients:
        svc.bus.subscribe(state.TOPIC, state.client_queue(c), {"client": [c]})


def create_tables(svc: Services) -> None:
    """The run's tables (idempotent: a resumed run made by an older Strato gets the
    tables it lacks)."""
    for name in state.TABLES:  # only the updates' changes are read (they wake the aggregator)
        svc.table.create_table(name, stream=name == state.UPDATES)


def register_client(svc: Services, client: str, info: dict[str, Any] | None = None) -> None:
    """A remote client joins: its own queue, subscribed to its notices (idempotent)."""
    svc.bus.subscribe(state.TOPIC, state.client_queue(client), {"client": [client]})
    svc.table.put(state.CLIENTS, client, {"client": client, **(info or {})})
