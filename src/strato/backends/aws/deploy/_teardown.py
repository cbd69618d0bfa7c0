"""Removing a deployment's resources through the service APIs (what is gone is skipped).

Used for a deployment made without CloudFormation, and for what no stack holds: the
queues subscribers made when they subscribed, and the objects in the bucket (a bucket
must be empty before it can be deleted, by CloudFormation too).
"""

from __future__ import annotations

import time
from typing import Any

from strato.backends.aws._boto import ClientError, Clients, error_code, http_status

__all__ = ["delete_queues", "delete_resource", "empty_bucket"]

_GONE = {
    "NoSuchEntity",
    "NoSuchBucket",
    "ResourceNotFoundException",
    "NotFound",
    "StateMachineDoesNotExist",
    "AWS.SimpleQueueService.NonExistentQueue",
    "QueueDoesNotExist",
}


def _gone(exc: BaseException) -> bool:
    return error_code(exc) in _GONE or http_status(exc) == 404


def empty_bucket(clients: Clients, bucket: str) -> int:
    """Delete every object (and abandoned multipart upload) in the bucket; returns how
    many objects were deleted (0 for a bucket that does not exist)."""
    s3 = clients.client("s3")
    deleted = 0
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            for i in range(0, len(keys), 1000):
                s3.delete_objects(Bucket=bucket, Delete={"Objects": keys[i : i + 1000]})
            deleted += len(keys)
        uploads = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        for upload in uploads:
            s3.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
    except ClientError as exc:
        if not _gone(exc):
            raise
    return deleted


def delete_queues(clients: Clients, prefix: str) -> list[str]:
    """The SQS queues whose names start with ``prefix`` (subscribers' queues: not in any
    stack), deleted."""
    sqs = clients.client("sqs")
    urls = sqs.list_queues(QueueNamePrefix=prefix).get("QueueUrls", [])
    for url in urls:
        try:
            sqs.delete_queue(QueueUrl=url)
        except ClientError as exc:
            if not _gone(exc):
                raise
    return [str(u) for u in urls]


class _NotThereError(Exception):
    """The resource to delete does not exist."""


def _role(clients: Clients, name: str) -> None:
    iam = clients.client("iam")
    for policy in iam.list_role_policies(RoleName=name).get("PolicyNames", []):
        iam.delete_role_policy(RoleName=name, PolicyName=policy)
    for attached in iam.list_attached_role_policies(RoleName=name).get("AttachedPolicies", []):
        iam.detach_role_policy(RoleName=name, PolicyArn=attached["PolicyArn"])
    iam.delete_role(RoleName=name)


def _event_sources(clients: Clients, function: str) -> None:
    lam = clients.client("lambda")
    found = lam.list_event_source_mappings(FunctionName=function).get("EventSourceMappings", [])
    if not found:
        raise _NotThereError
    for mapping in found:
        lam.delete_event_source_mapping(UUID=mapping["UUID"])


def _state_machine(clients: Clients, name: str) -> None:
    sfn = clients.client("stepfunctions")
    arn = clients.arn("states", f"stateMachine:{name}")
    sfn.describe_state_machine(stateMachineArn=arn)
    sfn.delete_state_machine(stateMachineArn=arn)


def _table(clients: Clients, name: str) -> None:
    ddb = clients.client("dynamodb")
    ddb.delete_table(TableName=name)
    deadline = time.monotonic() + 120.0
    while time.monotonic() < deadline:
        try:
            ddb.describe_table(TableName=name)
        except ClientError as exc:
            if _gone(exc):
                return
            raise
        time.sleep(1.0)


def _bucket(clients: Clients, name: str) -> None:
    clients.client("s3").head_bucket(Bucket=name)
    empty_bucket(clients, name)
    clients.client("s3").delete_bucket(Bucket=name)


def _topic(clients: Clients, name: str) -> None:
    sns = clients.client("sns")
    arn = clients.arn("sns", name)
    sns.get_topic_attributes(TopicArn=arn)
    sns.delete_topic(TopicArn=arn)


def delete_resource(clients: Clients, kind: str, p: dict[str, Any]) -> bool:
    """Delete one template resource; False when it did not exist."""
    lam = clients.client("lambda")
    actions: dict[str, Any] = {
        "AWS::Lambda::EventSourceMapping": lambda: _event_sources(clients, p["FunctionName"]),
        "AWS::StepFunctions::StateMachine": lambda: _state_machine(clients, p["StateMachineName"]),
        "AWS::Lambda::EventInvokeConfig": lambda: lam.delete_function_event_invoke_config(
            FunctionName=p["FunctionName"], Qualifier=p["Qualifier"]
        ),
        "AWS::Lambda::Function": lambda: lam.delete_function(FunctionName=p["FunctionName"]),
        "AWS::Logs::LogGroup": lambda: clients.client("logs").delete_log_group(
            logGroupName=p["LogGroupName"]
        ),
        "AWS::IAM::Role": lambda: _role(clients, p["RoleName"]),
        "AWS::SNS::Topic": lambda: _topic(clients, p["TopicName"]),
        "AWS::DynamoDB::Table": lambda: _table(clients, p["TableName"]),
        "AWS::S3::Bucket": lambda: _bucket(clients, p["BucketName"]),
    }
    try:
        actions[kind]()
    except _NotThereError:
        return False
    except ClientError as exc:
        if _gone(exc):
            return False
        raise
    return True
