"""``strato deploy aws``: print, apply or tear down an application's template.

The application states what it runs as ``AppResources`` (the ``strato`` command gets
them from the FL layer). Applying goes through CloudFormation on AWS itself (one
stack, ``<prefix>-<app>``), and through the service APIs against an endpoint URL (moto
and other emulators, whose CloudFormation cannot run the Lambda side): the same
template either way, see ``_apply_apis``. Tearing down removes the stack (or the
resources), the objects in the bucket, and the prefix's queues, which subscribers made
when they subscribed and no stack holds.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from strato.backends.aws._boto import ClientError, Clients, clients_for, error_message
from strato.backends.aws._names import bucket_name
from strato.backends.aws.deploy.template import TemplateOptions, app_template, stack_name
from strato.errors import ConfigError
from strato.services import AppResources

__all__ = [
    "DeployOptions",
    "deploy",
    "deployed_code",
    "destroy",
    "services_config",
    "template_for",
]

Method = Literal["auto", "cloudformation", "apis"]
LOCAL_CREDENTIALS = {"access_key_id": "testing", "secret_access_key": "testing"}


def services_config(
    prefix: str,
    *,
    root: str | os.PathLike[str],
    region: str | None = None,
    endpoint_url: str | None = None,
) -> dict[str, Any]:
    """The Services config of the aws backend for a prefix (and an endpoint). A local
    endpoint gets the emulators' dummy credentials unless the environment has some."""
    config: dict[str, Any] = {"backend": "aws", "root": str(root), "prefix": prefix}
    if region:
        config["region"] = region
    if endpoint_url:
        config["endpoint_url"] = endpoint_url
        host = urllib.parse.urlsplit(endpoint_url).hostname or ""
        if host in ("127.0.0.1", "localhost", "::1") and not os.environ.get("AWS_ACCESS_KEY_ID"):
            config["credentials"] = dict(LOCAL_CREDENTIALS)
            config.setdefault("region", "us-east-1")
    return config


@dataclass
class DeployOptions:
    prefix: str = "strato-"
    region: str | None = None
    endpoint_url: str | None = None
    method: Method = "auto"
    code: str | None = None  # s3://bucket/key of the functions' zip
    image_uri: str | None = None  # or a container image
    root: Path = field(default_factory=lambda: Path(".strato") / "aws")
    # Extra keys for the functions' Services config (a local Lambda root).
    function_services: dict[str, Any] = field(default_factory=dict)

    def config(self) -> dict[str, Any]:
        return services_config(
            self.prefix, root=self.root, region=self.region, endpoint_url=self.endpoint_url
        )

    def resolved_method(self) -> Literal["cloudformation", "apis"]:
        if self.method != "auto":
            return self.method
        return "apis" if self.endpoint_url else "cloudformation"


def template_for(opts: DeployOptions, resources: AppResources) -> dict[str, Any]:
    services = dict(opts.function_services)
    if opts.endpoint_url:
        services["endpoint_url"] = opts.endpoint_url
    return app_template(
        resources,
        TemplateOptions(prefix=opts.prefix, image=bool(opts.image_uri), services=services),
    )


def _parameters(opts: DeployOptions, apis: bool) -> dict[str, str]:
    if opts.code and opts.image_uri:
        raise ConfigError("give --code or --image-uri, not both")
    if opts.image_uri:
        return {"ImageUri": opts.image_uri}
    if opts.code:
        parts = urllib.parse.urlsplit(opts.code)
        if parts.scheme != "s3" or not parts.netloc or not parts.path.strip("/"):
            raise ConfigError(f"--code must be s3://BUCKET/KEY, got {opts.code!r}")
        return {"CodeS3Bucket": parts.netloc, "CodeS3Key": parts.path.lstrip("/")}
    if apis and opts.endpoint_url:
        return {"CodeS3Bucket": "placeholder", "CodeS3Key": "placeholder"}  # emulator: unused
    raise ConfigError(
        "deploying to AWS needs the functions' code: --code s3://BUCKET/KEY (a zip with "
        "strato, the app and their dependencies) or --image-uri URI (see docs/aws.md)"
    )


def deploy(opts: DeployOptions, resources: AppResources) -> dict[str, str]:
    """Apply the template of ``resources``; returns the stack outputs."""
    clients = clients_for(opts.config())
    template = template_for(opts, resources)
    if opts.resolved_method() == "apis":
        from strato.backends.aws.deploy._apply_apis import apply_template

        return apply_template(clients, template, _parameters(opts, apis=True))
    return _deploy_stack(clients, opts, template, stack_name(opts.prefix, resources.name))


def _deploy_stack(
    clients: Clients, opts: DeployOptions, template: dict[str, Any], name: str
) -> dict[str, str]:
    cfn = clients.client("cloudformation")
    parameters = [
        {"ParameterKey": k, "ParameterValue": v} for k, v in _parameters(opts, False).items()
    ]
    request = {
        "StackName": name,
        "TemplateBody": json.dumps(template, separators=(",", ":")),
        "Parameters": parameters,
        "Capabilities": ["CAPABILITY_NAMED_IAM"],
    }
    if _stack(cfn, name) is None:
        cfn.create_stack(**request, Tags=[{"Key": "strato:prefix", "Value": opts.prefix}])
        waiter = "stack_create_complete"
    else:
        try:
            cfn.update_stack(**request)
        except ClientError as exc:
            if "No updates are to be performed" not in error_message(exc):
                raise
            return _outputs(_stack(cfn, name))
        waiter = "stack_update_complete"
    try:
        cfn.get_waiter(waiter).wait(StackName=name, WaiterConfig={"Delay": 10, "MaxAttempts": 180})
    except Exception as exc:  # botocore's WaiterError: say what CloudFormation said
        reasons = [
            f"{e['LogicalResourceId']}: {e.get('ResourceStatusReason', '')}"
            for e in cfn.describe_stack_events(StackName=name)["StackEvents"][:20]
            if str(e.get("ResourceStatus", "")).endswith("FAILED")
        ]
        raise ConfigError(f"stack {name} failed: {'; '.join(reasons) or exc}") from None
    return _outputs(_stack(cfn, name))


def _stack(cfn: Any, name: str) -> dict[str, Any] | None:
    try:
        stacks = cfn.describe_stacks(StackName=name)["Stacks"]
    except ClientError as exc:
        if "does not exist" in error_message(exc):
            return None
        raise
    return dict(stacks[0]) if stacks else None


def _outputs(stack: dict[str, Any] | None) -> dict[str, str]:
    return {o["OutputKey"]: o["OutputValue"] for o in (stack or {}).get("Outputs", [])}


def deployed_code(config: dict[str, Any], app: str) -> dict[str, str]:
    """The functions' code of the prefix's stack of ``app``, as ``lambda_code`` (for a
    run on AWS)."""
    clients = clients_for(config)
    name = stack_name(str(config.get("prefix", "strato-")), app)
    stack = _stack(clients.client("cloudformation"), name)
    if stack is None:
        raise ConfigError(
            f"no stack {name} in {clients.config.region}: deploy it first with "
            f"`strato deploy aws --prefix {config.get('prefix')} --code s3://BUCKET/KEY` "
            "(or --image-uri), see docs/aws.md"
        )
    values = {p["ParameterKey"]: p["ParameterValue"] for p in stack.get("Parameters", [])}
    if "ImageUri" in values:
        return {"ImageUri": values["ImageUri"]}
    return {"S3Bucket": values["CodeS3Bucket"], "S3Key": values["CodeS3Key"]}


def destroy(opts: DeployOptions, resources: AppResources) -> dict[str, Any]:
    """Remove the deployment of ``resources`` on the prefix: what is removed is reported."""
    from strato.backends.aws.deploy._apply_apis import delete_template
    from strato.backends.aws.deploy._teardown import delete_queues, empty_bucket

    clients = clients_for(opts.config())
    objects = empty_bucket(clients, bucket_name(opts.prefix))
    report: dict[str, Any] = {"objects_deleted": objects}
    if opts.resolved_method() == "cloudformation":
        cfn = clients.client("cloudformation")
        name = stack_name(opts.prefix, resources.name)
        if _stack(cfn, name) is not None:
            cfn.delete_stack(StackName=name)
            cfn.get_waiter("stack_delete_complete").wait(
                StackName=name, WaiterConfig={"Delay": 10, "MaxAttempts": 180}
            )
            report["stack_deleted"] = name
    else:
        template = template_for(opts, resources)
        report["resources_deleted"] = delete_template(clients, template)
    # The queues subscribers made: "client-*" is every queue named prefix + "client-".
    report["queues_deleted"] = [
        url
        for pattern in resources.queues
        for url in delete_queues(clients, opts.prefix + pattern.rstrip("*"))
    ]
    return report
