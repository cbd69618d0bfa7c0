"""The IAM side of the FL template: CloudFormation intrinsics for ARNs, trust policies,
and the functions' least-privilege policy (see ``template``'s module doc)."""

from __future__ import annotations

from typing import Any

from strato.backends.aws._names import bucket_name, physical
from strato.fl import state
from strato.services import FunctionSpec

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


def lambda_policy(prefix: str, functions: list[FunctionSpec]) -> dict[str, Any]:
    bucket = bucket_name(prefix)
    tables = [arn("dynamodb", f"table/{physical('table', prefix, t)}") for t in state.TABLES]
    updates = physical("table", prefix, state.UPDATES)
    topic = arn("sns", physical("topic", prefix, state.TOPIC))
    invoked = [
        arn("lambda", f"function:{physical('function', prefix, name)}")
        for name in ("client", "aggregate")
    ]
    logs = [
        arn("logs", f"log-group:/aws/lambda/{physical('function', prefix, s.name)}:*")
        for s in functions
    ]
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "Models",
                "Effect": "Allow",
                "Action": ["s3:GetObject", "s3:PutObject", "s3:AbortMultipartUpload"],
                "Resource": sub(f"arn:${{AWS::Partition}}:s3:::{bucket}/*"),
            },
            {
                "Sid": "ModelsBucket",  # HeadBucket, and 404 (not 403) for a missing key
                "Effect": "Allow",
                "Action": "s3:ListBucket",
                "Resource": sub(f"arn:${{AWS::Partition}}:s3:::{bucket}"),
            },
            {
                "Sid": "RunState",
                "Effect": "Allow",
                "Action": ["dynamodb:GetItem", "dynamodb:UpdateItem", "dynamodb:Query"],
                "Resource": tables,
            },
            {
                "Sid": "UpdatesStream",  # the aggregator's event source mapping reads it
                "Effect": "Allow",
                "Action": [
                    "dynamodb:DescribeStream",
                    "dynamodb:GetRecords",
                    "dynamodb:GetShardIterator",
                ],
                "Resource": arn("dynamodb", f"table/{updates}/stream/*"),
            },
            {
                "Sid": "ListStreams",  # no resource-level permission for this action
                "Effect": "Allow",
                "Action": "dynamodb:ListStreams",
                "Resource": "*",
            },
            {
                "Sid": "RoundNotices",
                "Effect": "Allow",
                "Action": ["sns:Publish", "sns:ListTagsForResource"],
                "Resource": topic,
            },
            {
                "Sid": "ClientQueues",  # simulated clients read their own queue
                "Effect": "Allow",
                "Action": ["sqs:GetQueueUrl", "sqs:ReceiveMessage", "sqs:DeleteMessage"],
                "Resource": arn("sqs", physical("queue", prefix, state.client_queue("*"))),
            },
            {
                "Sid": "InvokeClientsAndAggregator",
                "Effect": "Allow",
                "Action": ["lambda:InvokeFunction", "lambda:GetFunctionConfiguration"],
                "Resource": invoked,
            },
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
        ],
    }
