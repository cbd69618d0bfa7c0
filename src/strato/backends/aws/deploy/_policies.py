"""The IAM side of an application's template: CloudFormation intrinsics for ARNs, trust
policies, and the functions' least-privilege policy (see ``template``'s module doc)."""

from __future__ import annotations

from typing import Any

from strato.backends.aws._names import bucket_name, physical
from strato.services import AppResources

__all__ = ["arn", "get_arn", "lambda_policy", "sub", "trust"]


def sub(text: str) -> dict[str, str]:
    return {"Fn::Sub": text}


def arn(service: str, resource: str) -> dict[str, str]:
    return sub(f"arn:${{AWS::Partition}}:{service}:${{AWS::Region}}:${{AWS::AccountId}}:{resource}")


def get_arn(logical: str) -> dict[str, list[str]]:
    return {"Fn::GetAtt": [logical, "Arn"]}


def trust(service: str) -> dict[str, Any]:
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Principal": {"Service": service}, "Action": "sts:AssumeRole"}
        ],
    }


def _one_or_many(values: list[Any]) -> Any:
    return values[0] if len(values) == 1 else values


def lambda_policy(prefix: str, resources: AppResources) -> dict[str, Any]:
    """What the functions of ``resources`` may do: its own resources, nothing else."""
    bucket = bucket_name(prefix)
    tables = [arn("dynamodb", f"table/{physical('table', prefix, t)}") for t in resources.tables]
    streams = [
        arn("dynamodb", f"table/{physical('table', prefix, t)}/stream/*")
        for t in dict.fromkeys(s.table for s in resources.triggers)
    ]
    topics = [arn("sns", physical("topic", prefix, t)) for t in resources.topics]
    queues = [arn("sqs", physical("queue", prefix, q)) for q in resources.queues]
    invoked = [
        arn("lambda", f"function:{physical('function', prefix, name)}")
        for name in resources.invoked
    ]
    logs = [
        arn("logs", f"log-group:/aws/lambda/{physical('function', prefix, s.name)}:*")
        for s in resources.functions
    ]
    statements: list[dict[str, Any]] = [
        {
            "Sid": "Blobs",
            "Effect": "Allow",
            "Action": ["s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload"],
            "Resource": sub(f"arn:${{AWS::Partition}}:s3:::{bucket}/*"),
        },
        {
            "Sid": "BlobsBucket",  # HeadBucket, and 404 (not 403) for a missing key
            "Effect": "Allow",
            "Action": "s3:ListBucket",
            "Resource": sub(f"arn:${{AWS::Partition}}:s3:::{bucket}"),
        },
    ]
    if tables:
        statements.append({
            "Sid": "Tables",
            "Effect": "Allow",
            "Action": ["dynamodb:GetItem", "dynamodb:UpdateItem", "dynamodb:Query"],
            "Resource": tables,
        })  # fmt: skip
    if streams:
        statements += [
            {
                "Sid": "TriggerStreams",  # the event source mappings read them
                "Effect": "Allow",
                "Action": [
                    "dynamodb:DescribeStream",
                    "dynamodb:GetRecords",
                    "dynamodb:GetShardIterator",
                ],
                "Resource": _one_or_many(streams),
            },
            {
                "Sid": "ListStreams",  # no resource-level permission for this action
                "Effect": "Allow",
                "Action": "dynamodb:ListStreams",
                "Resource": "*",
            },
        ]
    if topics:
        statements.append({
            "Sid": "Topics",
            "Effect": "Allow",
            "Action": ["sns:Publish", "sns:ListTagsForResource"],
            "Resource": _one_or_many(topics),
        })  # fmt: skip
    if queues:
        statements.append({
            "Sid": "Queues",  # subscribers' queues the functions read (simulated clients)
            "Effect": "Allow",
            "Action": ["sqs:GetQueueUrl", "sqs:ReceiveMessage", "sqs:DeleteMessage"],
            "Resource": _one_or_many(queues),
        })  # fmt: skip
    if invoked:
        statements.append({
            "Sid": "InvokeFunctions",
            "Effect": "Allow",
            "Action": ["lambda:InvokeFunction", "lambda:GetFunctionConfiguration"],
            "Resource": invoked,
        })  # fmt: skip
    statements += [
        {
            "Sid": "TaskCallbacks",  # a task token is not a resource IAM can name
            "Effect": "Allow",
            "Action": ["states:SendTaskSuccess", "states:SendTaskFailure"],
            "Resource": "*",
        },
        {
            "Sid": "Logs",
            "Effect": "Allow",
            "Action": ["logs:CreateLogStream", "logs:PutLogEvents"],
            "Resource": logs,
        },
    ]
    return {"Version": "2012-10-17", "Statement": statements}
