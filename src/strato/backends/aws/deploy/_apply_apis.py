"""A CloudFormation template applied through the service APIs, for endpoints without
CloudFormation (moto, other emulators): the very template ``--dry-run`` prints.

Only what Strato's template uses is understood: ``Ref``, ``Fn::GetAtt``, ``Fn::Sub``
and the pseudo parameters; the resource types of ``template.fl_template``. Resources
are made in dependency order, each idempotently (an existing one is updated), and
removed in the reverse order. Against an emulator the functions get a placeholder
code package: the emulator runs the locally installed code.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

from strato.backends.aws._boto import ClientError, Clients, error_code
from strato.backends.aws._iam import while_role_propagates
from strato.backends.aws._runtime import _placeholder_zip
from strato.errors import ConfigError

__all__ = ["apply_template", "delete_template", "resolve"]

_REF = re.compile(r"\$\{([^}!][^}]*)\}")
Attrs = dict[str, str]


def _references(value: Any) -> set[str]:
    """The logical ids a template value refers to."""
    found: set[str] = set()
    if isinstance(value, Mapping):
        if "Ref" in value:
            found.add(str(value["Ref"]))
        if "Fn::GetAtt" in value:
            found.add(str(value["Fn::GetAtt"][0]))
        if "Fn::Sub" in value:
            found |= {m.split(".")[0] for m in _REF.findall(str(value["Fn::Sub"]))}
        for item in value.values():
            found |= _references(item)
    elif isinstance(value, list):
        for item in value:
            found |= _references(item)
    return found


def dependency_order(resources: Mapping[str, Any]) -> list[str]:
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise ConfigError(f"the template has a dependency cycle through {name}")
        visiting.add(name)
        body = resources[name]
        needs = _references(body.get("Properties", {})) | set(body.get("DependsOn", []))
        for dep in sorted(needs & set(resources)):
            visit(dep)
        visiting.discard(name)
        order.append(name)

    for name in resources:
        visit(name)
    return order


def resolve(value: Any, lookup: Callable[[str], str]) -> Any:
    """A template value with its intrinsics replaced; ``lookup("X")`` is Ref X, and
    ``lookup("X.Attr")`` is GetAtt X Attr."""
    if isinstance(value, Mapping):
        if set(value) == {"Ref"}:
            return lookup(str(value["Ref"]))
        if set(value) == {"Fn::GetAtt"}:
            logical, attr = value["Fn::GetAtt"]
            return lookup(f"{logical}.{attr}")
        if set(value) == {"Fn::Sub"}:
            text = _REF.sub(lambda m: lookup(m.group(1)), str(value["Fn::Sub"]))
            return text.replace("${!", "${")
        return {k: resolve(v, lookup) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, lookup) for v in value]
    return value


def _settle_function(lam: Any, name: str) -> None:
    deadline = time.monotonic() + 300.0
    while time.monotonic() < deadline:
        config = lam.get_function_configuration(FunctionName=name)
        if (
            config.get("State", "Active") != "Pending"
            and config.get("LastUpdateStatus", "Successful") != "InProgress"
        ):
            return
        time.sleep(1.0)
    raise ConfigError(f"Lambda function {name!r} did not become active in time")


class _Applier:
    def __init__(self, clients: Clients, parameters: Mapping[str, str]) -> None:
        self.clients = clients
        self.emulator = clients.config.endpoint_url is not None
        self.attrs: dict[str, Attrs] = {}
        self.parameters = dict(parameters)

    def lookup(self, name: str) -> str:
        pseudo = {
            "AWS::Partition": self.clients.partition,
            "AWS::Region": self.clients.config.region,
            "AWS::AccountId": self.clients.account_id(),
        }
        if name in pseudo:
            return pseudo[name]
        if name in self.parameters:
            return self.parameters[name]
        logical, _, attr = name.partition(".")
        if logical not in self.attrs:
            raise ConfigError(f"the template refers to {name!r}, which is not made yet")
        return self.attrs[logical][attr or "Ref"]

    # --- one creator per resource type -------------------------------------------------

    def bucket(self, p: dict[str, Any]) -> Attrs:
        s3, name = self.clients.client("s3"), p["BucketName"]
        kwargs: dict[str, Any] = {"Bucket": name}
        if self.clients.config.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.clients.config.region}
        try:
            s3.create_bucket(**kwargs)
        except ClientError as exc:
            if error_code(exc) != "BucketAlreadyOwnedByYou":
                raise
        rules = [
            {"ApplyServerSideEncryptionByDefault": r["ServerSideEncryptionByDefault"]}
            for r in p["BucketEncryption"]["ServerSideEncryptionConfiguration"]
        ]
        s3.put_bucket_encryption(Bucket=name, ServerSideEncryptionConfiguration={"Rules": rules})
        s3.put_public_access_block(
            Bucket=name, PublicAccessBlockConfiguration=p["PublicAccessBlockConfiguration"]
        )
        s3.put_bucket_ownership_controls(Bucket=name, OwnershipControls=p["OwnershipControls"])
        lifecycle = [
            {**{k: v for k, v in r.items() if k != "Id"}, "ID": r["Id"], "Filter": {"Prefix": ""}}
            for r in p["LifecycleConfiguration"]["Rules"]
        ]
        s3.put_bucket_lifecycle_configuration(
            Bucket=name, LifecycleConfiguration={"Rules": lifecycle}
        )
        return {"Ref": name, "Arn": f"arn:{self.clients.partition}:s3:::{name}"}

    def table(self, p: dict[str, Any]) -> Attrs:
        ddb, name = self.clients.client("dynamodb"), p["TableName"]
        try:
            ddb.create_table(
                TableName=name,
                AttributeDefinitions=p["AttributeDefinitions"],
                KeySchema=p["KeySchema"],
                BillingMode=p["BillingMode"],
                StreamSpecification={"StreamEnabled": True, **p["StreamSpecification"]},
            )
        except ClientError as exc:
            if error_code(exc) != "ResourceInUseException":
                raise
        while True:
            description = ddb.describe_table(TableName=name)["Table"]
            if description.get("TableStatus") == "ACTIVE":
                break
            time.sleep(1.0)
        return {
            "Ref": name,
            "Arn": str(description["TableArn"]),
            "StreamArn": str(description.get("LatestStreamArn", "")),
        }

    def topic(self, p: dict[str, Any]) -> Attrs:
        sns = self.clients.client("sns")
        arn = str(sns.create_topic(Name=p["TopicName"])["TopicArn"])
        if p.get("Tags"):
            sns.tag_resource(ResourceArn=arn, Tags=p["Tags"])
        return {"Ref": arn, "TopicArn": arn, "TopicName": p["TopicName"]}

    def role(self, p: dict[str, Any]) -> Attrs:
        iam, name = self.clients.client("iam"), p["RoleName"]
        trust = json.dumps(p["AssumeRolePolicyDocument"])
        try:
            arn = str(iam.get_role(RoleName=name)["Role"]["Arn"])
            iam.update_assume_role_policy(RoleName=name, PolicyDocument=trust)
        except ClientError as exc:
            if error_code(exc) != "NoSuchEntity":
                raise
            arn = str(
                iam.create_role(
                    RoleName=name,
                    AssumeRolePolicyDocument=trust,
                    Description=p.get("Description", ""),
                )["Role"]["Arn"]
            )
        for policy in p.get("Policies", []):
            iam.put_role_policy(
                RoleName=name,
                PolicyName=policy["PolicyName"],
                PolicyDocument=json.dumps(policy["PolicyDocument"]),
            )
        return {"Ref": name, "Arn": arn}

    def log_group(self, p: dict[str, Any]) -> Attrs:
        logs, name = self.clients.client("logs"), p["LogGroupName"]
        try:
            logs.create_log_group(logGroupName=name)
        except ClientError as exc:
            if error_code(exc) != "ResourceAlreadyExistsException":
                raise
        logs.put_retention_policy(logGroupName=name, retentionInDays=p["RetentionInDays"])
        arn = self.clients.arn("logs", f"log-group:{name}:*")
        return {"Ref": name, "Arn": arn}

    def function(self, p: dict[str, Any]) -> Attrs:
        lam, name = self.clients.client("lambda"), p["FunctionName"]
        settings = {
            k: p[k]
            for k in ("FunctionName", "Role", "Timeout", "MemorySize", "Environment",
                      "Description", "Runtime", "Handler", "ImageConfig", "LoggingConfig")
            if k in p
        }  # fmt: skip
        package: dict[str, Any] = {}
        if self.emulator:  # the emulator runs the installed code, as a zip function
            code: dict[str, Any] = {"ZipFile": _placeholder_zip()}
            command = (p.get("ImageConfig") or {}).get("Command") or [""]
            settings.pop("ImageConfig", None)
            settings.setdefault("Runtime", self.clients.config.lambda_runtime)
            settings.setdefault("Handler", str(command[0]))
        else:
            code = dict(p["Code"])
            if "PackageType" in p:
                package["PackageType"] = p["PackageType"]

        def create_or_update() -> None:
            try:
                lam.create_function(**settings, **package, Code=code, Publish=False)
                return
            except ClientError as exc:
                if error_code(exc) != "ResourceConflictException":
                    raise
            _settle_function(lam, name)
            lam.update_function_configuration(**settings)
            _settle_function(lam, name)
            lam.update_function_code(FunctionName=name, **code)

        while_role_propagates(create_or_update)
        _settle_function(lam, name)
        if "ReservedConcurrentExecutions" in p:
            lam.put_function_concurrency(
                FunctionName=name, ReservedConcurrentExecutions=p["ReservedConcurrentExecutions"]
            )
        arn = str(lam.get_function_configuration(FunctionName=name)["FunctionArn"])
        return {"Ref": name, "Arn": arn}

    def invoke_config(self, p: dict[str, Any]) -> Attrs:
        self.clients.client("lambda").put_function_event_invoke_config(
            FunctionName=p["FunctionName"],
            Qualifier=p["Qualifier"],
            MaximumRetryAttempts=p["MaximumRetryAttempts"],
        )
        return {"Ref": f"{p['FunctionName']}:{p['Qualifier']}"}

    def event_source(self, p: dict[str, Any]) -> Attrs:
        lam = self.clients.client("lambda")
        settings = {
            k: p[k] for k in ("BatchSize", "MaximumRetryAttempts", "FilterCriteria") if k in p
        }
        found = lam.list_event_source_mappings(
            EventSourceArn=p["EventSourceArn"], FunctionName=p["FunctionName"]
        ).get("EventSourceMappings", [])
        if found:
            mapping_id = str(found[0]["UUID"])
            lam.update_event_source_mapping(UUID=mapping_id, **settings)
        else:
            mapping_id = str(
                while_role_propagates(
                    lambda: lam.create_event_source_mapping(
                        EventSourceArn=p["EventSourceArn"],
                        FunctionName=p["FunctionName"],
                        StartingPosition=p["StartingPosition"],
                        **settings,
                    )
                )["UUID"]
            )
        return {"Ref": mapping_id}

    def state_machine(self, p: dict[str, Any]) -> Attrs:
        sfn, name = self.clients.client("stepfunctions"), p["StateMachineName"]
        text = json.dumps(p["Definition"])
        for key, value in p.get("DefinitionSubstitutions", {}).items():
            text = text.replace(f"${{{key}}}", str(value))
        arn = self.clients.arn("states", f"stateMachine:{name}")
        try:
            sfn.describe_state_machine(stateMachineArn=arn)
        except ClientError as exc:
            if error_code(exc) != "StateMachineDoesNotExist":
                raise
            while_role_propagates(
                lambda: sfn.create_state_machine(
                    name=name, definition=text, roleArn=p["RoleArn"], type=p["StateMachineType"]
                )
            )
        else:
            sfn.update_state_machine(stateMachineArn=arn, definition=text, roleArn=p["RoleArn"])
        return {"Ref": arn, "Arn": arn, "Name": name}


_CREATORS: dict[str, Callable[[_Applier, dict[str, Any]], Attrs]] = {
    "AWS::S3::Bucket": _Applier.bucket,
    "AWS::DynamoDB::Table": _Applier.table,
    "AWS::SNS::Topic": _Applier.topic,
    "AWS::IAM::Role": _Applier.role,
    "AWS::Logs::LogGroup": _Applier.log_group,
    "AWS::Lambda::Function": _Applier.function,
    "AWS::Lambda::EventInvokeConfig": _Applier.invoke_config,
    "AWS::Lambda::EventSourceMapping": _Applier.event_source,
    "AWS::StepFunctions::StateMachine": _Applier.state_machine,
}


def apply_template(
    clients: Clients, template: Mapping[str, Any], parameters: Mapping[str, str]
) -> dict[str, str]:
    """Make (or update) every resource of the template; returns its resolved Outputs."""
    applier = _Applier(clients, parameters)
    resources = template["Resources"]
    for logical in dependency_order(resources):
        body = resources[logical]
        creator = _CREATORS.get(body["Type"])
        if creator is None:
            raise ConfigError(f"{logical}: resource type {body['Type']} is not supported here")
        properties = resolve(body.get("Properties", {}), applier.lookup)
        applier.attrs[logical] = creator(applier, properties)
    return {
        name: str(resolve(output["Value"], applier.lookup))
        for name, output in template.get("Outputs", {}).items()
    }


def delete_template(clients: Clients, template: Mapping[str, Any]) -> list[str]:
    """Remove what ``apply_template`` made, in reverse dependency order (what is already
    gone is skipped); returns the logical ids of the resources found and removed."""
    from strato.backends.aws.deploy._teardown import delete_resource

    resources = template["Resources"]

    def name_of(ref: str) -> str:  # only names are needed to find what to delete
        if ref.startswith("AWS::"):
            return {"AWS::Partition": clients.partition, "AWS::Region": clients.config.region,
                    "AWS::AccountId": clients.account_id()}[ref]  # fmt: skip
        props = resources.get(ref.split(".")[0], {}).get("Properties", {})
        for key in ("FunctionName", "TableName", "RoleName", "BucketName", "LogGroupName",
                    "TopicName", "StateMachineName"):  # fmt: skip
            if isinstance(props.get(key), str):
                return str(props[key])
        return ""

    removed: list[str] = []
    for logical in reversed(dependency_order(resources)):
        body = resources[logical]
        properties = resolve(body.get("Properties", {}), name_of)
        if delete_resource(clients, body["Type"], properties):
            removed.append(logical)
    return removed
