"""The FL round loop on Step Functions: a round whose quorum never comes in is closed at
its deadline, given in seconds (the public sample applied its seconds as minutes)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from strato.fl import coordinator
from strato.services import FunctionSpec, Services

HERE = str(Path(__file__).resolve().parent)


def test_a_round_without_its_quorum_closes_at_its_deadline_in_seconds(
    aws: Services, boto: Any
) -> None:
    for name in ("start_round", "close_round", "evaluate"):
        aws.runtime.register(
            FunctionSpec(name, f"aws_handlers:stub_{name}", env={"PYTHONPATH": HERE})
        )
    aws.workflow.create_state_machine(coordinator.MACHINE, coordinator.round_loop_definition(2))
    started = time.monotonic()
    aws.workflow.start(coordinator.MACHINE, {"round": 1}, "run")
    done = aws.workflow.wait("run", timeout_s=120)
    elapsed = time.monotonic() - started
    assert done.status == "SUCCEEDED", (done.error, done.cause)
    assert 2 * 2 <= elapsed < 60  # two rounds of 2 s each, not 2 minutes each
    prefix = aws.config["prefix"]
    arn = boto.arn("states", f"execution:{prefix}{coordinator.MACHINE}:run")
    events = boto.client("stepfunctions").get_execution_history(executionArn=arn)["events"]
    entered = [
        e["stateEnteredEventDetails"]["name"]
        for e in sorted(events, key=lambda e: int(e["id"]))
        if str(e["type"]).endswith("StateEntered")
    ]
    by_deadline = ["Round", "Deadline", "Evaluate", "More"]
    assert entered == [*by_deadline, "Next", *by_deadline, "Done"]
