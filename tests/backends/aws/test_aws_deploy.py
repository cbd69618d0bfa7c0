"""`strato deploy aws` against an endpoint without CloudFormation: the template's own
resources, made through the service APIs, then torn down with nothing left."""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from strato.fl.config import JobConfig
from strato.fl.run import app_resources
from strato.services import connect

RESOURCES = app_resources(JobConfig())


@pytest.fixture
def deployed(local_aws: Any, tmp_path: Path) -> Any:
    from strato.backends.aws.deploy import DeployOptions, deploy, destroy, template_for

    opts = DeployOptions(
        prefix=f"d{uuid.uuid4().hex[:8]}-", endpoint_url=local_aws.endpoint_url,
        root=tmp_path / "services",
    )  # fmt: skip
    outputs = deploy(opts, RESOURCES)
    yield opts, template_for(opts, RESOURCES), outputs
    destroy(opts, RESOURCES)


def test_the_apis_make_what_the_template_says(deployed: Any) -> None:
    from strato.backends.aws._boto import clients_for
    from strato.backends.aws.deploy._apply_apis import resolve

    opts, template, outputs = deployed
    clients = clients_for(opts.config())
    lam, iam = clients.client("lambda"), clients.client("iam")
    resources = template["Resources"]
    functions = {
        logical: lam.get_function_configuration(FunctionName=r["Properties"]["FunctionName"])
        for logical, r in resources.items()
        if r["Type"] == "AWS::Lambda::Function"
    }

    def lookup(name: str) -> str:
        pseudo = {"AWS::Partition": "aws", "AWS::Region": clients.config.region,
                  "AWS::AccountId": clients.account_id()}  # fmt: skip
        if name in pseudo:
            return pseudo[name]
        logical = name.partition(".")[0]
        if logical in functions:
            return str(functions[logical]["FunctionArn"])
        if logical not in resources:
            return "placeholder"  # the code parameters: unused against an emulator
        return str(resources[logical]["Properties"].get("TableName", ""))

    for logical, r in resources.items():
        props = resolve(r["Properties"], lookup)
        if r["Type"] == "AWS::IAM::Role":
            for policy in props["Policies"]:
                got = iam.get_role_policy(
                    RoleName=props["RoleName"], PolicyName=policy["PolicyName"]
                )
                assert got["PolicyDocument"] == policy["PolicyDocument"], logical
        elif r["Type"] == "AWS::Lambda::Function":
            got = functions[logical]
            assert got["Role"] == outputs["LambdaRole"]
            for key in ("Timeout", "MemorySize", "Handler", "Runtime"):
                assert got[key] == props[key], (logical, key)
            env = got["Environment"]["Variables"]
            assert env["STRATO_HANDLER"] == props["Environment"]["Variables"]["STRATO_HANDLER"]
            assert json.loads(env["STRATO_SERVICES"])["endpoint_url"] == opts.endpoint_url
            reserved = lam.get_function_concurrency(FunctionName=props["FunctionName"])
            assert reserved["ReservedConcurrentExecutions"] == props["ReservedConcurrentExecutions"]
        elif r["Type"] == "AWS::DynamoDB::Table":
            got = clients.client("dynamodb").describe_table(TableName=props["TableName"])["Table"]
            assert got["StreamSpecification"] == {
                "StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"
            }  # fmt: skip
        elif r["Type"] == "AWS::StepFunctions::StateMachine":
            got = clients.client("stepfunctions").describe_state_machine(
                stateMachineArn=outputs[logical]
            )
            assert got["roleArn"] == outputs["StatesRole"]
            text = json.dumps(props["Definition"])
            for key, value in props["DefinitionSubstitutions"].items():
                text = text.replace(f"${{{key}}}", value)
            assert json.loads(got["definition"]) == json.loads(text)
        elif r["Type"] == "AWS::Lambda::EventSourceMapping":
            (mapping,) = lam.list_event_source_mappings(
                FunctionName=functions["AggregateFunction"]["FunctionArn"]
            )["EventSourceMappings"]
            source = mapping["EventSourceArn"]
            assert "/stream/" in source and f":table/{opts.prefix}updates/" in source
            assert mapping["FilterCriteria"] == props["FilterCriteria"]
        elif r["Type"] == "AWS::SNS::Topic":
            tags = clients.client("sns").list_tags_for_resource(ResourceArn=outputs[logical])
            assert {t["Key"]: t["Value"] for t in tags["Tags"]} == {
                t["Key"]: t["Value"] for t in props["Tags"]
            }
            schema = tags["Tags"]  # the tags are the schema the bus reads back
            assert any(t["Key"] == "strato-schema-n" for t in schema)
            base64.b64decode("".join(t["Value"] for t in schema if t["Key"] == "strato-schema-0"))


def test_deploying_again_changes_nothing_and_the_backend_uses_it(deployed: Any) -> None:
    from strato.backends.aws.deploy import deploy
    from strato.fl import coordinator, state

    opts, _, outputs = deployed
    assert deploy(opts, RESOURCES) == outputs
    with connect(opts.config()) as svc:  # the primitives find the deployed resources
        coordinator.provision(svc, ["0000"])
        svc.bus.publish(state.TOPIC, json.dumps({"round": 1, "model_key": "m"}),
                        {"client": "0000", "round": "1"})  # fmt: skip
        (msg,) = svc.bus.receive(state.client_queue("0000"), wait_s=5)
        assert json.loads(msg.body)["round"] == 1


def test_teardown_leaves_nothing_of_the_prefix(local_aws: Any, tmp_path: Path) -> None:
    from strato.backends.aws._boto import clients_for
    from strato.cli import main
    from strato.fl import coordinator

    prefix = f"t{uuid.uuid4().hex[:8]}-"
    where = ["--endpoint-url", local_aws.endpoint_url, "--prefix", prefix]
    assert main(["deploy", "aws", *where]) == 0
    config = local_aws.config(tmp_path / "s", prefix)
    with connect(config) as svc:
        coordinator.register_client(svc, "late-joiner")  # a queue no stack holds
        svc.blobs.put("models/round-00001.safetensors", b"x")
    assert main(["deploy", "aws", "--delete", *where]) == 0
    clients = clients_for(config)
    leftovers = {
        "tables": [t for t in clients.client("dynamodb").list_tables()["TableNames"]
                   if t.startswith(prefix)],
        "functions": [f["FunctionName"] for f in clients.client("lambda").list_functions()[
            "Functions"] if f["FunctionName"].startswith(prefix)],
        "queues": clients.client("sqs").list_queues(QueueNamePrefix=prefix).get("QueueUrls", []),
        "topics": [t["TopicArn"] for t in clients.client("sns").list_topics()["Topics"]
                   if f":{prefix}" in t["TopicArn"]],
        "roles": [r["RoleName"] for r in clients.client("iam").list_roles()["Roles"]
                  if r["RoleName"].startswith(prefix)],
        "buckets": [b["Name"] for b in clients.client("s3").list_buckets()["Buckets"]
                    if b["Name"].startswith(prefix)],
        "machines": [m["name"] for m in clients.client("stepfunctions").list_state_machines()[
            "stateMachines"] if m["name"].startswith(prefix)],
        "mappings": [m for m in clients.client("lambda").list_event_source_mappings()[
            "EventSourceMappings"] if f":function:{prefix}" in m["FunctionArn"]],
    }  # fmt: skip
    assert all(not v for v in leftovers.values()), leftovers
