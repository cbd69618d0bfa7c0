"""The FL infrastructure on AWS as one CloudFormation template, generated from Python.

``fl_template(options)`` builds it from the very objects the embedded backend runs:
the state machine is ``coordinator.round_loop_definition`` (its ``FunctionName``\\ s
become the Lambda ARNs through ``DefinitionSubstitutions``), the functions are
``coordinator.function_specs`` (handler: ``lambda_entry.handler``, the Strato handler
and spec in the environment, as ``LambdaRuntime.register`` sets them), the tables are
``state.TABLES``, each as ``DynamoTable.create_table`` makes it (with its stream), the
topic is ``state.TOPIC`` with its schema in tags, as ``SnsSqsBus.create_topic`` tags it.
Every name is the one the backend derives from the prefix, so ``strato run --backend
aws`` finds what the stack made.

Resources: the bucket, six tables, the topic, a log group and an async-retry setting
per function, the five functions, the aggregator's event source mapping on the
updates stream (INSERTs only), the state machine, and two roles with least privilege:

- functions (``<prefix>lambda``): get/put the bucket's objects, read/update the six
  tables, read the updates stream (for the event source mapping), publish to the
  topic, receive from the clients' queues, invoke ``client`` and ``aggregate``, call a
  task token back (``Resource: "*"``: a token is not a resource IAM can name), write
  their own log groups;
- the state machine (``<prefix>states``): invoke its three functions.

Client queues are not in the template: a client gets its own queue when it
registers (``coordinator.register_client``).
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
from strato.backends.aws._policies import get_arn, lambda_policy, trust
from strato.backends.aws._runtime import ENTRY_POINT, lambda_environment
from strato.backends.aws._workflow import to_step_functions
from strato.errors import ConfigError
from strato.fl import coordinator, state
from strato.fl.config import JobConfig
from strato.services import FunctionSpec, TopicSchema

__all__ = [
    "LOG_RETENTION_DAYS",
    "TemplateOptions",
    "fl_template",
    "logical_id",
    "stack_name",
]

LOG_RETENTION_DAYS = 14
ESM_BATCH_SIZE = 100
ESM_RETRIES = 10
_SCHEMA_TAG = "strato-schema-"
_TAG_VALUE_MAX = 256


@dataclass(frozen=True)
class TemplateOptions:
    prefix: str = "strato-"
    config: JobConfig = field(default_factory=JobConfig)
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


def stack_name(prefix: str) -> str:
    return f"{prefix.rstrip('-')}-fl"


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


def _function(opts: TemplateOptions, spec: FunctionSpec) -> dict[str, Any]:
    props: dict[str, Any] = {
        "FunctionName": physical("function", opts.prefix, spec.name),
        "Description": f"Strato FL: {spec.handler}",
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


def fl_template(opts: TemplateOptions | None = None) -> dict[str, Any]:
    """The CloudFormation template (a JSON-able dict) of an FL deployment."""
    opts = opts or TemplateOptions()
    prefix, cfg = opts.prefix, opts.config
    specs = coordinator.function_specs(cfg)
    definition = coordinator.round_loop_definition(cfg.round_deadline_s)
    resources: dict[str, Any] = {}

    resources["Bucket"] = {
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
    for table in state.TABLES:
        resources[logical_id(table, "Table")] = {
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
    resources["Topic"] = {
        "Type": "AWS::SNS::Topic",
        "Properties": {
            "TopicName": physical("topic", prefix, state.TOPIC),
            "Tags": _schema_tags(coordinator.notice_schema()),
        },
    }
    resources["LambdaRole"] = {
        "Type": "AWS::IAM::Role",
        "Properties": {
            "RoleName": physical("role", "", f"{prefix}lambda"),
            "Description": "Strato FL functions: this deployment's resources only",
            "AssumeRolePolicyDocument": trust("lambda.amazonaws.com"),
            "Policies": [
                {
                    "PolicyName": "strato-fl-functions",
                    "PolicyDocument": lambda_policy(prefix, specs),
                }
            ],
        },
    }
    machine_functions = _machine_functions(definition)
    resources["StatesRole"] = {
        "Type": "AWS::IAM::Role",
        "Properties": {
            "RoleName": physical("role", "", f"{prefix}states"),
            "Description": "Strato FL round loop: invoke its own functions only",
            "AssumeRolePolicyDocument": trust("states.amazonaws.com"),
            "Policies": [
                {
                    "PolicyName": "strato-fl-round-loop",
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
    for spec in specs:
        function_name = physical("function", prefix, spec.name)
        resources[logical_id(spec.name, "LogGroup")] = {
            "Type": "AWS::Logs::LogGroup",
            "DeletionPolicy": "Delete",
            "UpdateReplacePolicy": "Delete",
            "Properties": {
                "LogGroupName": f"/aws/lambda/{function_name}",
                "RetentionInDays": LOG_RETENTION_DAYS,
            },
        }
        resources[logical_id(spec.name, "Function")] = _function(opts, spec)
        resources[logical_id(spec.name, "AsyncRetries")] = {
            "Type": "AWS::Lambda::EventInvokeConfig",
            "Properties": {
                "FunctionName": {"Ref": logical_id(spec.name, "Function")},
                "Qualifier": "$LATEST",
                "MaximumRetryAttempts": min(2, spec.retries),
            },
        }
    resources["AggregateTrigger"] = {
        "Type": "AWS::Lambda::EventSourceMapping",
        "Properties": {
            "EventSourceArn": {"Fn::GetAtt": [logical_id(state.UPDATES, "Table"), "StreamArn"]},
            "FunctionName": {"Ref": logical_id("aggregate", "Function")},
            "StartingPosition": "TRIM_HORIZON",
            "BatchSize": ESM_BATCH_SIZE,
            "MaximumRetryAttempts": ESM_RETRIES,
            "FilterCriteria": {"Filters": [{"Pattern": json.dumps({"eventName": ["INSERT"]})}]},
        },
    }
    substitutions = {name: f"${{{logical_id(name, 'Arn')}}}" for name in machine_functions}
    resources["RoundLoop"] = {
        "Type": "AWS::StepFunctions::StateMachine",
        "Properties": {
            "StateMachineName": physical("state machine", prefix, coordinator.MACHINE),
            "StateMachineType": "STANDARD",
            "RoleArn": get_arn("StatesRole"),
            "Definition": to_step_functions(definition, substitutions.__getitem__),
            "DefinitionSubstitutions": {
                logical_id(name, "Arn"): get_arn(logical_id(name, "Function"))
                for name in machine_functions
            },
        },
    }

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
        "Description": (
            f"Strato federated learning (prefix {prefix}): rounds on Step Functions, "
            "updates through S3 and DynamoDB Streams, notices on SNS/SQS"
        ),
        "Parameters": parameters,
        "Resources": resources,
        "Outputs": {
            "Prefix": {"Value": prefix},
            "Bucket": {"Value": {"Ref": "Bucket"}},
            "Topic": {"Value": {"Ref": "Topic"}},
            "StateMachine": {"Value": {"Ref": "RoundLoop"}},
            "LambdaRole": {"Value": get_arn("LambdaRole")},
            "StatesRole": {"Value": get_arn("StatesRole")},
        },
    }
