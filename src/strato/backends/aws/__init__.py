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

Importing this package registers the backend with ``strato.services`` under the name
``aws`` (``register_backend``): its five parts, and the run hooks of ``run`` (a run's
resources deployed first, Lambda's event source mappings as the stream triggers,
Lambda's counters as the meter). boto3 loads only when a part is opened.

Three parts: the primitives (the ``_`` modules here, and ``lambda_entry``, the handler
of every deployed function); ``emulator/`` and ``local`` (``LocalAws``: moto plus a
local Lambda front, for tests and local runs); ``deploy/`` (an application's
CloudFormation ``template`` from the ``AppResources`` it states, its IAM policies, and
``strato deploy aws``). Beside them: ``run`` (what a run on this backend adds), ``cli``
(the backend's options of the ``strato`` command), ``usage`` (what a run is billed for).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from strato.services import Backend, register_backend

if TYPE_CHECKING:
    from strato.services import AppResources, Meter, Services, StreamSource, Trigger

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


def _open_run(config: Mapping[str, Any], resources: AppResources) -> Services:
    from strato.backends.aws.run import open_run

    return open_run(config, resources)


def _start_trigger(services: Services, source: StreamSource) -> Trigger:
    from strato.backends.aws.run import start_trigger

    return start_trigger(services, source)


def _meter(services: Services) -> Meter:
    from strato.backends.aws.run import LambdaMeter

    return LambdaMeter(services)


register_backend(
    "aws",
    Backend(
        open_part,
        open_run=_open_run,
        start_trigger=_start_trigger,
        meter=_meter,
        local_workers=False,  # the functions run in Lambda, not in this process's children
    ),
)
