"""The Workflow on Step Functions: the definition handed over, and ids across machines."""

from __future__ import annotations

import json
from typing import Any

import pytest

from strato.errors import ConfigError, InvalidToken, NotFound
from strato.services import Services, connect

LAMBDA = "arn:aws:states:::lambda:invoke"
PASS = {"StartAt": "P", "States": {"P": {"Type": "Pass", "End": True}}}


def test_function_names_become_lambda_arns_and_nothing_else_changes() -> None:
    pytest.importorskip("boto3")
    from strato.backends.aws._workflow import to_step_functions

    definition = {
        "StartAt": "A",
        "States": {
            "A": {"Type": "Task", "Resource": LAMBDA,
                  "Parameters": {"FunctionName": "agg", "Payload.$": "$"}, "Next": "B"},
            "B": {"Type": "Task", "Resource": LAMBDA + ".waitForTaskToken",
                  "Parameters": {"FunctionName": "arn:aws:lambda:x:1:function:f"}, "Next": "C"},
            "C": {"Type": "Task", "Resource": LAMBDA,
                  "Parameters": {"FunctionName.$": "$.fn"}, "Next": "D"},
            "D": {"Type": "Pass", "Parameters": {"FunctionName": "not-a-task"}, "End": True},
        },
    }  # fmt: skip
    out = to_step_functions(definition, lambda name: f"ARN({name})")
    assert out["States"]["A"]["Parameters"] == {"FunctionName": "ARN(agg)", "Payload.$": "$"}
    assert out["States"]["B"]["Parameters"]["FunctionName"] == "arn:aws:lambda:x:1:function:f"
    assert out["States"]["C"]["Parameters"] == {"FunctionName.$": "$.fn"}
    assert out["States"]["D"] == definition["States"]["D"]
    assert definition["States"]["A"]["Parameters"]["FunctionName"] == "agg"  # not mutated


def test_step_functions_gets_the_mapped_definition(aws: Services, boto: Any) -> None:
    definition = {
        "StartAt": "Go",
        "States": {
            "Go": {
                "Type": "Task",
                "Resource": LAMBDA,
                "Parameters": {"FunctionName": "aggregate", "Payload": {}},
                "End": True,
            }
        },
    }
    aws.workflow.create_state_machine("fl", definition)
    aws.workflow.create_state_machine("fl", definition)  # again: an update, not an error
    prefix = aws.config["prefix"]
    machine = boto.client("stepfunctions").describe_state_machine(
        stateMachineArn=boto.arn("states", f"stateMachine:{prefix}fl")
    )
    handed = json.loads(machine["definition"])
    assert handed["States"]["Go"]["Parameters"]["FunctionName"] == boto.arn(
        "lambda", f"function:{prefix}aggregate"
    )
    assert (
        machine["roleArn"] == boto.client("iam").get_role(RoleName=f"{prefix}states")["Role"]["Arn"]
    )


def test_names_step_functions_cannot_take_are_refused(aws: Services) -> None:
    with pytest.raises(ConfigError, match="A-Z"):
        aws.workflow.create_state_machine("round/1", PASS)


def test_an_execution_id_belongs_to_one_machine(aws: Services) -> None:
    wf = aws.workflow
    wf.create_state_machine("a", PASS)
    wf.create_state_machine("b", PASS)
    assert wf.start("a", {"n": 1}, execution_id="run-1") == "run-1"
    with pytest.raises(ConfigError, match="'a'"):
        wf.start("b", {"n": 1}, execution_id="run-1")
    with connect(aws.config) as other:  # a bundle that never saw the id finds it
        done = other.workflow.wait("run-1", timeout_s=60)
        assert (done.state_machine, done.status, done.output) == ("a", "SUCCEEDED", {"n": 1})
        assert other.workflow.start("a", {"n": 2}, execution_id="run-1") == "run-1"
        with pytest.raises(NotFound):
            other.workflow.describe("run-2")
    odd = wf.start("a", {}, execution_id="round 3/client é")  # not a legal SFN name
    assert wf.wait(odd, timeout_s=60).id == "round 3/client é"


def test_bad_tokens_are_invalid(aws: Services) -> None:
    for token in ("", "not-a-token"):
        with pytest.raises(InvalidToken):
            aws.workflow.send_task_success(token, {})
        with pytest.raises(InvalidToken):
            aws.workflow.send_task_failure(token, "E", "c")
