"""The CloudFormation template: cfn-lint accepts what `strato deploy aws --dry-run`
prints, and the template holds the very state machine, functions and tables the FL
layer runs, with least-privilege roles."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fltools import cli_env, strato
from strato.fl import coordinator, state
from strato.fl.config import JobConfig

pytest.importorskip("boto3", reason="the aws backend needs boto3: pip install 'strato[aws]'")


def cfn_lint(path: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "cfn-lint"
    if not exe.exists():
        found = shutil.which("cfn-lint")
        if found is None:
            pytest.skip("cfn-lint is not installed (pip install 'strato[dev]')")
        exe = Path(found)
    return subprocess.run([str(exe), "--", str(path)], capture_output=True, text=True, timeout=300)


def dry_run(tmp_path: Path, *args: str) -> dict[str, Any]:
    res = strato("deploy", "aws", "--dry-run", *args, env=cli_env())
    assert res.returncode == 0, res.stderr
    (tmp_path / "template.json").write_text(res.stdout)
    return dict(json.loads(res.stdout))


@pytest.mark.parametrize(
    "args", [(), ("--image-uri", "123456789012.dkr.ecr.eu-west-1.amazonaws.com/fl:1",
                  "--prefix", "prod-fl-")]
)  # fmt: skip
def test_cfn_lint_accepts_the_dry_run(tmp_path: Path, args: tuple[str, ...]) -> None:
    template = dry_run(tmp_path, *args)
    res = cfn_lint(tmp_path / "template.json")
    assert res.returncode == 0, res.stdout + res.stderr
    # ...and it is a linter that can fail: a broken copy is refused.
    broken = json.loads(json.dumps(template))
    broken["Resources"]["AggregateTrigger"]["Properties"]["StartingPosition"] = "SOMETIMES"
    del broken["Resources"]["StratoFlRoundsStateMachine"]["Properties"]["RoleArn"]
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    assert cfn_lint(tmp_path / "broken.json").returncode != 0


def by_type(template: dict[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {k: v["Properties"] for k, v in template["Resources"].items() if v["Type"] == kind}


def test_the_state_machine_is_the_fl_round_loop_with_lambda_arns(tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "strato.toml").write_text(
        "[round]\nround_deadline_s = 45\n[job]\nclient_concurrency = 3\n"
    )
    template = dry_run(tmp_path, "--app", str(app))
    (machine,) = by_type(template, "AWS::StepFunctions::StateMachine").values()
    subs = machine["DefinitionSubstitutions"]
    text = json.dumps(machine["Definition"])
    for key, value in subs.items():  # ${StartRoundArn} -> the function's logical name
        logical = value["Fn::GetAtt"][0]
        name = template["Resources"][logical]["Properties"]["FunctionName"]
        text = text.replace(f"${{{key}}}", name.removeprefix("strato-"))
    assert json.loads(text) == coordinator.round_loop_definition(45)
    assert machine["Definition"]["States"]["Round"]["TimeoutSeconds"] == 45  # seconds
    functions = by_type(template, "AWS::Lambda::Function")
    specs = {s.name: s for s in coordinator.function_specs(JobConfig(client_concurrency=3))}
    assert {f["Environment"]["Variables"]["STRATO_FUNCTION"] for f in functions.values()} == set(
        specs
    )
    for f in functions.values():
        spec = specs[f["Environment"]["Variables"]["STRATO_FUNCTION"]]
        assert f["Environment"]["Variables"]["STRATO_HANDLER"] == spec.handler
        assert f["Handler"] == "strato.backends.aws.lambda_entry.handler"
        assert f["ReservedConcurrentExecutions"] == spec.max_concurrency
        assert f["Timeout"] >= spec.timeout_s and f["MemorySize"] == spec.memory_mb


def test_tables_streams_topic_and_the_aggregators_trigger(tmp_path: Path) -> None:
    template = dry_run(tmp_path)
    tables = by_type(template, "AWS::DynamoDB::Table")
    assert sorted(t["TableName"] for t in tables.values()) == sorted(
        f"strato-{t}" for t in state.TABLES
    )
    assert all(
        t["StreamSpecification"]["StreamViewType"] == "NEW_AND_OLD_IMAGES" for t in tables.values()
    )
    (trigger,) = by_type(template, "AWS::Lambda::EventSourceMapping").values()
    assert trigger["EventSourceArn"] == {"Fn::GetAtt": ["UpdatesTable", "StreamArn"]}
    assert trigger["FunctionName"] == {"Ref": "AggregateFunction"}
    assert json.loads(trigger["FilterCriteria"]["Filters"][0]["Pattern"]) == {
        "eventName": ["INSERT"]
    }
    (topic,) = by_type(template, "AWS::SNS::Topic").values()
    assert topic["TopicName"] == f"strato-{state.TOPIC}"


def statements(role: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for p in role["Policies"] for s in p["PolicyDocument"]["Statement"]]


def test_roles_have_least_privilege(tmp_path: Path) -> None:
    template = dry_run(tmp_path)
    roles = by_type(template, "AWS::IAM::Role")
    for role in roles.values():
        assert "ManagedPolicyArns" not in role
        for st in statements(role):
            actions = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
            assert st["Effect"] == "Allow"
            assert all("*" not in a for a in actions), st  # no wildcard actions
            if st["Resource"] == "*":  # only where IAM can name no resource
                assert set(actions) <= {
                    "dynamodb:ListStreams", "states:SendTaskSuccess", "states:SendTaskFailure"
                }, st  # fmt: skip
    states_role = statements(roles["StatesRole"])
    assert len(states_role) == 1 and states_role[0]["Action"] == "lambda:InvokeFunction"
    invoked = {r["Fn::GetAtt"][0] for r in states_role[0]["Resource"]}
    assert invoked == {"StartRoundFunction", "CloseRoundFunction", "EvaluateFunction"}
    functions = json.dumps(statements(roles["LambdaRole"]))
    assert "dynamodb:DeleteItem" not in functions and "s3:DeleteObject" not in functions
    assert "sqs:SendMessage" not in functions and "iam:" not in functions


def test_bad_prefixes_are_refused() -> None:
    res = strato("deploy", "aws", "--dry-run", "--prefix", "9 bad")
    assert res.returncode == 2 and "prefix" in res.stderr
