"""An application's infrastructure on AWS as one CloudFormation template, generated
from Python.

``app_template(resources, options)`` builds it from the very objects the embedded
backend runs, which the application states as ``AppResources``: each state machine is
its ASL definition (its ``FunctionName``\\ s become the Lambda ARNs through
``DefinitionSubstitutions``), the functions are its ``FunctionSpec``\\ s (handler:
``lambda_entry.handler``, the Strato handler and spec in the environment, as
``LambdaRuntime.register`` sets them), each table is made as ``DynamoTable.create_table``
makes it (with its stream), each topic has its schema in tags, as
``SnsSqsBus.create_topic`` tags it, and each stream source is an event source mapping
(INSERTs only when that is all it takes). Every name is the one the backend derives
from the prefix, so a run on the aws backend finds what the stack made.

Resources: the bucket, the tables, the topics, a log group and an async-retry setting
per function, the functions, an event source mapping per stream source, the state
machines, and two roles with least privilege:

- functions (``<prefix>lambda``): get/put the bucket's objects, read/update the
  tables, read the streams of the stream sources, publish to the topics, receive from
  the queues named by ``resources.queues``, invoke ``resources.invoked``, call a task
  token back (``Resource: "*"``: a token is not a resource IAM can name), write their
  own log groups;
- the state machines (``<prefix>states``): invoke their own functions.

Queues are not in the template: a subscriber's queue is made when it subscribes.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from strato.backends.aws._names import bucket_name, physical
from strato.backends.aws._runtime import ENTRY_POINT, lambda_environment
from strato.backends.aws._workflow import to_step_functions
from strato.backends.aws.deploy._policies import get_arn, lambda_policy, trust
from strato.errors import ConfigError
from strato.services import AppResources, FunctionSpec, StreamSource, TopicSchema

__all__ = [
    "LOG_RETENTION_DAYS",
    "TemplateOptions",
    "app_template",
    "logical_id",
    "stack_name",
]

LOG_RETENTION_DAYS = 14
ESM_RETRIES = 10
_SCHEMA_TAG = "strato-schema-"
_TAG_VALUE_MAX = 256


@dataclass(frozen=True)
class TemplateOptions:
    prefix: str = "strato-"
    # The functions' code: a container image (its URI as a parameter) or a zip in S3
    # (bucket and key as parameters).
    image: bool = False
    lambda_runtime: str = "python3.12"
    # Extra keys for the functions' Services config (a local endpoint's URL and root).
    services: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]{0,23}", self.prefix):
            raise ConfigError(
                f"prefix {self.prefix!r}: start with a letter, then letters, digits and '-' "
                "(at most 24 characters; it names the stack and the bucket too)"
            )


def stack_name(prefix: str, app: str) -> str:
    """The stack of the application ``app`` (``AppResources.name``) on a prefix."""
    return f"{prefix.rstrip('-')}-{app}"


def logical_id(name: str, kind: str) -> str:
    """``updates`` + ``Table`` → ``UpdatesTable``; ``start_round`` → ``StartRoundFunction``."""
    return "".join(part.capitalize() for part in re.split(r"[^A-Za-z0-9]+", name)) + kind


def _schema_tags(schema: TopicSchema) -> list[dict[str, str]]:
    """The tags ``SnsSqsBus.create_topic`` stores a schema in."""
    encoded = base64.b64encode(json.dumps(schema.to_dict()).encode()).decode("ascii")
    chunks = [encoded[i : i + _TAG_VALUE_MAX] for i in range(0, len(encoded), _TAG_VALUE_MAX)]
    tags = [{"Key": f"{_SCHEMA_TAG}n", "Value": str(len(chunks))}]
    return tags + [{"Key": f"{_SCHEMA_TAG}{i}", "Value": c} for i, c in enumerate(chunks)]


def _function_env(opts: TemplateOptions, spec: FunctionSpec) -> dict[str, str]:
    services = {"backend": "aws", "prefix": opts.prefix, "lambda_root": "/tmp/strato"}
    services.update({k: v for k, v in opts.services.items() if k != "credentials"})
    services["root"] = services["lambda_root"]
    # The region comes from Lambda's own AWS_REGION, so the template is region-free.
    services.pop("region", None)
    return lambda_environment(services, spec)


def _machine_functions(definition: Mapping[str, Any]) -> list[str]:
    names: list[str] = []
    for st in definition["States"].values():
        name = st.get("Parameters", {}).get("FunctionName")
        if st.get("Type") == "Task" and isinstance(name, str) and name not in names:
            names.append(name)
    return names


def _function(opts: TemplateOptions, app: str, spec: FunctionSpec) -> dict[str, Any]:
    props: dict[str, Any] = {
        "FunctionName": physical("function", opts.prefix, spec.name),
        "Description": f"Strato {app}: {spec.handler}",
        "Role": get_arn("LambdaRole"),
        "Timeout": max(1, math.ceil(spec.timeout_s)),
        "MemorySize": spec.memory_mb,
        "ReservedConcurrentExecutions": spec.max_concurrency,
        "Environment": {"Variables": _function_env(opts, spec)},
        "LoggingConfig": {"LogGroup": {"Ref": logical_id(spec.name, "LogGroup")}},
    }
    if opts.image:
        props |= {
            "PackageType": "Image",
            "Code": {"ImageUri": {"Ref": "ImageUri"}},
            "ImageConfig": {"Command": [ENTRY_POINT]},
        }
    else:
        props |= {
            "Runtime": opts.lambda_runtime,
            "Handler": ENTRY_POINT,
            "Code": {"S3Bucket": {"Ref": "CodeS3Bucket"}, "S3Key": {"Ref": "CodeS3Key"}},
        }
    return {"Type": "AWS::Lambda::Function", "Properties": props}


def _bucket(prefix: str) -> dict[str, Any]:
    return {
        "Type": "AWS::S3::Bucket",
        "DeletionPolicy": "Delete",
        "UpdateReplacePolicy": "Delete",
        "Properties": {
            "BucketName": bucket_name(prefix),
            "BucketEncryption": {
                "ServerSideEncryptionConfiguration": [
                    {"ServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}}
                ]
            },
            "PublicAccessBlockConfiguration": {
                "BlockPublicAcls": True,
                "BlockPublicPolicy": True,
                "IgnorePublicAcls": True,
                "RestrictPublicBuckets": True,
            },
            "OwnershipControls": {"Rules": [{"ObjectOwnership": "BucketOwnerEnforced"}]},
            "LifecycleConfiguration": {
                "Rules": [
                    {
                        "Id": "abort-abandoned-uploads",
                        "Status": "Enabled",
                        "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
                    }
                ]
            },
        },
    }


def _table(prefix: str, table: str) -> dict[str, Any]:
    return {
        "Type": "AWS::DynamoDB::Table",
        "DeletionPolicy": "Delete",
        "UpdateReplacePolicy": "Delete",
        "Properties": {
            "TableName": physical("table", prefix, table),
            "AttributeDefinitions": [
                {"AttributeName": "pk", "AttributeType": "S"},
                {"AttributeName": "key", "AttributeType": "S"},
            ],
            "KeySchema": [
                {"AttributeName": "pk", "KeyType": "HASH"},
                {"AttributeName": "key", "KeyType": "RANGE"},
            ],
            "BillingMode": "PAY_PER_REQUEST",
            "StreamSpecification": {"StreamViewType": "NEW_AND_OLD_IMAGES"},
        },
    }


def _states_role(prefix: str, app: str, machine_functions: list[str]) -> dict[str, Any]:
    return {
        "Type": "AWS::IAM::Role",
        "Properties": {
            "RoleName": physical("role", "", f"{prefix}states"),
            "Description": f"Strato {app} state machines: invoke their own functions only",
            "AssumeRolePolicyDocument": trust("states.amazonaws.com"),
            "Policies": [
                {
                    "PolicyName": f"strato-{app}-state-machines",
                    "PolicyDocument": {
                        "Version": "2012-10-17",
                        "Statement": [
                            {
                                "Effect": "Allow",
                                "Action": "lambda:InvokeFunction",
                                "Resource": [
                                    get_arn(logical_id(name, "Function"))
                                    for name in machine_functions
                                ],
                            }
                        ],
                    },
                }
            ],
        },
    }


def _function_resources(
    opts: TemplateOptions, app: str, spec: FunctionSpec
) -> dict[str, dict[str, Any]]:
    function_name = physical("function", opts.prefix, spec.name)
    return {
        logical_id(spec.name, "LogGroup"): {
            "Type": "AWS::Logs::LogGroup",
            "DeletionPolicy": "Delete",
            "UpdateReplacePolicy": "Delete",
            "Properties": {
                "LogGroupName": f"/aws/lambda/{function_name}",
                "RetentionInDays": LOG_RETENTION_DAYS,
            },
        },
        logical_id(spec.name, "Function"): _function(opts, app, spec),
        logical_id(spec.name, "AsyncRetries"): {
            "Type": "AWS::Lambda::EventInvokeConfig",
            "Properties": {
                "FunctionName": {"Ref": logical_id(spec.name, "Function")},
                "Qualifier": "$LATEST",
                "MaximumRetryAttempts": min(2, spec.retries),
            },
        },
    }


def _event_source(source: StreamSource) -> dict[str, Any]:
    props: dict[str, Any] = {
        "EventSourceArn": {"Fn::GetAtt": [logical_id(source.table, "Table"), "StreamArn"]},
        "FunctionName": {"Ref": logical_id(source.function, "Function")},
        "StartingPosition": "TRIM_HORIZON",
        "BatchSize": source.batch_size,
        "MaximumRetryAttempts": ESM_RETRIES,
    }
    if set(source.kinds) != {"INSERT", "MODIFY", "REMOVE"}:
        pattern = {"eventName": sorted(source.kinds)}
        props["FilterCriteria"] = {"Filters": [{"Pattern": json.dumps(pattern)}]}
    return {"Type": "AWS::Lambda::EventSourceMapping", "Properties": props}


def _state_machine(prefix: str, name: str, definition: Mapping[str, Any]) -> dict[str, Any]:
    functions = _machine_functions(definition)
    substitutions = {f: f"${{{logical_id(f, 'Arn')}}}" for f in functions}
    return {
        "Type": "AWS::StepFunctions::StateMachine",
        "Properties": {
            "StateMachineName": physical("state machine", prefix, name),
            "StateMachineType": "STANDARD",
            "RoleArn": get_arn("StatesRole"),
            "Definition": to_step_functions(definition, substitutions.__getitem__),
            "DefinitionSubstitutions": {
                logical_id(f, "Arn"): get_arn(logical_id(f, "Function")) for f in functions
            },
        },
    }


def _check(resources: AppResources) -> None:
    functions = {spec.name for spec in resources.functions}
    wanted = [s.function for s in resources.triggers] + list(resources.invoked)
    for definition in resources.state_machines.values():
        wanted += _machine_functions(definition)
    missing = sorted(set(wanted) - functions)
    if missing:
        raise ConfigError(f"{resources.name}: no FunctionSpec for {', '.join(missing)}")
    by_function = [s.function for s in resources.triggers]
    if len(set(by_function)) != len(by_function):
        raise ConfigError(f"{resources.name}: at most one stream source per function")
    if not re.fullmatch(r"[a-z][a-z0-9-]{0,15}", resources.name):
        raise ConfigError(f"application name {resources.name!r}: a-z, 0-9 and '-', at most 16")


def app_template(resources: AppResources, opts: TemplateOptions | None = None) -> dict[str, Any]:
    """The CloudFormation template (a JSON-able dict) of an application's deployment."""
    opts = opts or TemplateOptions()
    _check(resources)
    prefix, app = opts.prefix, resources.name
    out: dict[str, Any] = {"Prefix": {"Value": prefix}, "Bucket": {"Value": {"Ref": "Bucket"}}}
    res: dict[str, Any] = {"Bucket": _bucket(prefix)}
    for table in resources.tables:
        res[logical_id(table, "Table")] = _table(prefix, table)
    for topic, schema in resources.topics.items():
        logical = logical_id(topic, "Topic")
        res[logical] = {
            "Type": "AWS::SNS::Topic",
            "Properties": {
                "TopicName": physical("topic", prefix, topic),
                "Tags": _schema_tags(schema),
            },
        }
        out[logical] = {"Value": {"Ref": logical}}
    res["LambdaRole"] = {
        "Type": "AWS::IAM::Role",
        "Properties": {
            "RoleName": physical("role", "", f"{prefix}lambda"),
            "Description": f"Strato {app} functions: this deployment's resources only",
            "AssumeRolePolicyDocument": trust("lambda.amazonaws.com"),
            "Policies": [
                {
                    "PolicyName": f"strato-{app}-functions",
                    "PolicyDocument": lambda_policy(prefix, resources),
                }
            ],
        },
    }
    machine_functions: list[str] = []
    for definition in resources.state_machines.values():
        machine_functions += [
            f for f in _machine_functions(definition) if f not in machine_functions
        ]
    if resources.state_machines:
        res["StatesRole"] = _states_role(prefix, app, machine_functions)
    for spec in resources.functions:
        res |= _function_resources(opts, app, spec)
    for source in resources.triggers:
        res[logical_id(source.function, "Trigger")] = _event_source(source)
    for name, definition in resources.state_machines.items():
        logical = logical_id(name, "StateMachine")
        res[logical] = _state_machine(prefix, name, definition)
        out[logical] = {"Value": {"Ref": logical}}
    out["LambdaRole"] = {"Value": get_arn("LambdaRole")}
    if resources.state_machines:
        out["StatesRole"] = {"Value": get_arn("StatesRole")}

    parameters: dict[str, Any]
    if opts.image:
        parameters = {
            "ImageUri": {
                "Type": "String",
                "Description": "ECR image with strato, the app and its dependencies",
            }
        }
    else:
        parameters = {
            "CodeS3Bucket": {"Type": "String", "Description": "S3 bucket of the code zip"},
            "CodeS3Key": {"Type": "String", "Description": "S3 key of the code zip"},
        }
    return {
        "AWSTemplateFormatVersion": "2010-09-09",
        "Description": f"{resources.description} (prefix {prefix})",
        "Parameters": parameters,
        "Resources": res,
        "Outputs": out,
    }
