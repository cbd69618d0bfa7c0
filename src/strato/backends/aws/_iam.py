"""IAM roles for the Lambda functions and state machines this backend creates.

Used only when the config names no role (``lambda_role_arn`` / ``states_role_arn``):
a role per prefix and service, whose inline policy reaches only resources whose names
start with the prefix. A deployment with its own template passes its roles instead.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from strato.backends.aws._boto import ClientError, Clients, error_code, error_message
from strato.backends.aws._names import bucket_name, physical

__all__ = ["lambda_role", "states_role", "while_role_propagates"]

T = TypeVar("T")
_LOCK = threading.Lock()
_BASIC_LOGS = "arn:{partition}:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole"


_PROPAGATION_S = 30.0
_NOT_YET = ("cannot be assumed", "not authorized to assume", "unable to assume")


def while_role_propagates(action: Callable[[], T]) -> T:
    """Run ``action``, again while AWS says a role cannot be assumed yet: a role IAM
    has just created takes a few seconds to reach Lambda and Step Functions."""
    deadline = time.monotonic() + _PROPAGATION_S
    while True:
        try:
            return action()
        except ClientError as exc:
            message = error_message(exc).lower()
            if not any(s in message for s in _NOT_YET) or time.monotonic() > deadline:
                raise
            time.sleep(2.0)


def _ensure_role(
    clients: Clients, name: str, principal: str, policy: dict[str, Any], managed: list[str]
) -> str:
    iam = clients.client("iam")
    with _LOCK:
        try:
            return str(iam.get_role(RoleName=name)["Role"]["Arn"])
        except ClientError as exc:
            if error_code(exc) != "NoSuchEntity":
                raise
        trust = {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"Service": principal},
                    "Action": "sts:AssumeRole",
                }
            ],
        }
        try:
            arn = str(
                iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust))["Role"][
                    "Arn"
                ]
            )
        except ClientError as exc:
            if error_code(exc) != "EntityAlreadyExists":
                raise
            return str(iam.get_role(RoleName=name)["Role"]["Arn"])
        iam.put_role_policy(
            RoleName=name, PolicyName="strato-prefix-access", PolicyDocument=json.dumps(policy)
        )
        for policy_arn in managed:
            try:
                iam.attach_role_policy(RoleName=name, PolicyArn=policy_arn)
            except ClientError as exc:
                if error_code(exc) != "NoSuchEntity":  # emulators may lack managed policies
                    raise
        return arn


def _prefixed(clients: Clients, service: str, resource: str) -> str:
    return clients.arn(service, resource)


def lambda_role(clients: Clients) -> str:
    """The role Strato functions run as: their own prefix's topics, queues, tables,
    streams, bucket, functions and task callbacks, and CloudWatch logs."""
    config = clients.config
    if config.lambda_role_arn:
        return config.lambda_role_arn
    prefix = config.prefix
    bucket = config.bucket or bucket_name(prefix)
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": ["sns:Publish", "sns:ListTagsForResource"],
                "Resource": _prefixed(clients, "sns", f"{prefix}*"),
            },
            {
                "Effect": "Allow",
                "Action": [
                    "sqs:ReceiveMessage",
                    "sqs:DeleteMessage",
                    "sqs:GetQueueUrl",
                    "sqs:GetQueueAttributes",
                    "sqs:ChangeMessageVisibility",
                ],
                "Resource": _prefixed(clients, "sqs", f"{prefix}*"),
            },
            {
                "Effect": "Allow",
                "Action": [
                    "dynamodb:GetItem",
                    "dynamodb:PutItem",
                    "dynamodb:UpdateItem",
                    "dynamodb:DeleteItem",
                    "dynamodb:Query",
                    "dynamodb:DescribeTable",
                    "dynamodb:DescribeStream",
                    "dynamodb:GetShardIterator",
                    "dynamodb:GetRecords",
                ],
                "Resource": [
                    _prefixed(clients, "dynamodb", f"table/{prefix}*"),
                    _prefixed(clients, "dynamodb", f"table/{prefix}*/stream/*"),
                ],
            },
            {
                "Effect": "Allow",
                "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:ListBucket"],
                "Resource": [
                    f"arn:{clients.partition}:s3:::{bucket}",
                    f"arn:{clients.partition}:s3:::{bucket}/*",
                ],
            },
            {
                "Effect": "Allow",
                "Action": ["lambda:InvokeFunction", "lambda:GetFunctionConfiguration"],
                "Resource": _prefixed(clients, "lambda", f"function:{prefix}*"),
            },
            {
                "Effect": "Allow",
                "Action": [
                    "states:SendTaskSuccess",
                    "states:SendTaskFailure",
                    "states:SendTaskHeartbeat",
                ],
                "Resource": "*",  # task tokens are not resources IAM can name
            },
        ],
    }
    name = physical("role", "", f"{prefix}lambda")
    return _ensure_role(
        clients,
        name,
        "lambda.amazonaws.com",
        policy,
        [_BASIC_LOGS.format(partition=clients.partition)],
    )


def states_role(clients: Clients) -> str:
    """The role state machines run as: invoke this prefix's functions, nothing else."""
    config = clients.config
    if config.states_role_arn:
        return config.states_role_arn
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": "lambda:InvokeFunction",
                "Resource": [
                    _prefixed(clients, "lambda", f"function:{config.prefix}*"),
                    _prefixed(clients, "lambda", f"function:{config.prefix}*:*"),
                ],
            }
        ],
    }
    name = physical("role", "", f"{config.prefix}states")
    return _ensure_role(clients, name, "states.amazonaws.com", policy, [])
