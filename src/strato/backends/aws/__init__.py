"""The five primitives on AWS, with boto3 (install the ``aws`` extra).

===========  ===============================================  =================
primitive    AWS services                                     module
===========  ===============================================  =================
Bus          SNS topic per topic, SQS queue per subscriber    ``_bus``
BlobStore    S3 (one bucket; multipart, sha256-checked)        ``_blobs``
Table        DynamoDB table per table + DynamoDB Streams       ``_table``
Runtime      Lambda (entry point ``lambda_entry.handler``)     ``_runtime``
Workflow     Step Functions (the embedded backend's ASL)       ``_workflow``
===========  ===============================================  =================

A Services config for this backend (plain JSON, so it travels to Lambda too)::

    {"backend": "aws", "root": "<local dir>",
     "region": "eu-west-1",             # else AWS_REGION / AWS_DEFAULT_REGION / us-east-1
     "prefix": "strato-",               # starts every resource name this backend makes
     "endpoint_url": "http://...",      # optional: any AWS-compatible endpoint (moto, …)
     "bucket": "...",                   # optional: else derived from the prefix
     "credentials": {"access_key_id": ..., "secret_access_key": ...},  # emulators only;
                                        # on AWS leave it out: boto3's usual chain applies
     "lambda_code": {"S3Bucket": ..., "S3Key": ...},  # the functions' code package
     "lambda_root": "/tmp/strato",      # the root the functions' own Services use
     "lambda_role_arn": ..., "states_role_arn": ...}  # else roles are made per prefix

``strato.backends.aws.local`` runs moto plus a local Lambda stand-in for tests and
local runs. Federated learning on AWS (docs/aws.md): ``template`` (the CloudFormation
template), ``deploy`` (``strato deploy aws``), ``fl`` (what ``strato run --backend aws``
adds), ``client`` (``strato client --backend aws``), ``usage`` (what a run is billed for).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from strato.services import Services

__all__ = ["open_part"]


def open_part(name: str, services: Services) -> Any:
    """The ``name`` primitive of ``services`` on AWS (called by ``Services``)."""
    from strato.backends.aws._boto import clients_for

    clients = clients_for(services.config)
    if name == "bus":
        from strato.backends.aws._bus import SnsSqsBus

        return SnsSqsBus(clients)
    if name == "blobs":
        from strato.backends.aws._blobs import S3BlobStore

        return S3BlobStore(clients)
    if name == "table":
        from strato.backends.aws._table import DynamoTable

        return DynamoTable(clients)
    if name == "runtime":
        from strato.backends.aws._runtime import LambdaRuntime

        return LambdaRuntime(clients)
    if name == "workflow":
        from strato.backends.aws._workflow import StepFunctionsWorkflow

        return StepFunctionsWorkflow(clients)
    raise ValueError(f"unknown part {name!r} (bus, blobs, table, runtime, workflow)")
