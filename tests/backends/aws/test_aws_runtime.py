"""The Runtime on Lambda: the handler contract of ``lambda_entry``, what ``register``
puts in Lambda, how a call's REPORT becomes stats, and the invocation path end to end
through the local Lambda stand-in (moto stores functions but cannot run them)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from strato.errors import ConfigError, FunctionError, StratoError
from strato.services import FunctionSpec, Services, connect

HERE = str(Path(__file__).resolve().parent)


def spec(name: str, handler: str, **settings: Any) -> FunctionSpec:
    return FunctionSpec(name, f"aws_handlers:{handler}", env={"PYTHONPATH": HERE}, **settings)


class FakeLambdaContext:
    function_name = "prefix-fn"
    aws_request_id = "req-1"

    def get_remaining_time_in_millis(self) -> int:
        return 2500


@pytest.fixture
def entry(monkeypatch: pytest.MonkeyPatch) -> Any:
    pytest.importorskip("boto3")
    from strato.backends.aws import lambda_entry

    monkeypatch.setattr(lambda_entry, "_warm", False)
    monkeypatch.setattr(lambda_entry, "_handlers", {})
    monkeypatch.syspath_prepend(HERE)
    monkeypatch.setenv("STRATO_FUNCTION", "fn")
    return lambda_entry


def test_entry_calls_the_strato_handler_with_a_strato_context(
    entry: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STRATO_HANDLER", "aws_handlers:describe")
    first = entry.handler({"x": 1}, FakeLambdaContext())
    second = entry.handler({"x": 2}, FakeLambdaContext())
    assert (first["event"], first["cold_start"]) == ({"x": 1}, True)
    assert (second["cold_start"], second["calls"]) == (False, first["calls"] + 1)  # same module
    assert (first["function_name"], first["invocation_id"]) == ("fn", "req-1")
    assert first["remaining_s"] == 2.5


def test_entry_refuses_shared_memory_and_sends_events_through_its_runtime(
    entry: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STRATO_HANDLER", "aws_handlers:attach")
    with pytest.raises(ConfigError, match="BlobStore"):
        entry.handler({}, FakeLambdaContext())
    sent: list[tuple[str, Any]] = []

    class Runtime:
        def invoke_event(self, name: str, event: Any) -> None:
            sent.append((name, event))

    class Bundle:
        runtime = Runtime()

    monkeypatch.setattr(entry, "_services", Bundle())
    monkeypatch.setenv("STRATO_HANDLER", "aws_handlers:fire")
    entry.handler({"target": "leaf"}, FakeLambdaContext())
    assert sent == [("leaf", {"from": "fn"})]
    monkeypatch.setenv("STRATO_HANDLER", "no_colon")
    with pytest.raises(ConfigError, match="STRATO_HANDLER"):
        entry.handler({}, FakeLambdaContext())


def test_register_puts_the_spec_into_lambda(aws: Services, boto: Any) -> None:
    from strato.backends.aws._runtime import ENTRY_POINT

    aws.runtime.register(
        spec("shape", "describe", timeout_s=2.5, memory_mb=512, max_concurrency=3, retries=1)
    )
    name = f"{aws.config['prefix']}shape"
    lam = boto.client("lambda")
    config = lam.get_function_configuration(FunctionName=name)
    assert (config["Handler"], config["Timeout"], config["MemorySize"]) == (ENTRY_POINT, 3, 512)
    variables = config["Environment"]["Variables"]
    assert variables["STRATO_HANDLER"] == "aws_handlers:describe"
    assert variables["STRATO_FUNCTION"] == "shape"
    assert variables["PYTHONPATH"] == HERE
    services = json.loads(variables["STRATO_SERVICES"])
    assert "credentials" not in services  # Lambda has a role, not our keys
    assert services["prefix"] == aws.config["prefix"]
    assert services["root"] == aws.config["lambda_root"]  # Lambda's own, not the caller's
    assert json.loads(variables["STRATO_SPEC"])["timeout_s"] == 2.5
    assert lam.get_function_concurrency(FunctionName=name)["ReservedConcurrentExecutions"] == 3
    role = boto.client("iam").get_role(RoleName=f"{aws.config['prefix']}lambda")["Role"]
    assert config["Role"] == role["Arn"]
    aws.runtime.register(spec("shape", "describe", timeout_s=9))  # update in place
    assert lam.get_function_configuration(FunctionName=name)["Timeout"] == 9


def test_registering_on_aws_itself_needs_a_code_package(aws_config: dict[str, Any]) -> None:
    from strato.backends.aws._boto import AwsConfig, Clients
    from strato.backends.aws._runtime import LambdaRuntime

    config = {k: v for k, v in aws_config.items() if k != "endpoint_url"}
    runtime = LambdaRuntime(Clients(AwsConfig.from_services(config)))
    with pytest.raises(ConfigError, match="lambda_code"):
        runtime.register(spec("f", "describe"))
    runtime.close()


def test_the_invocation_path_end_to_end(aws: Services, boto: Any) -> None:
    runtime = aws.runtime
    runtime.register(spec("describe", "describe", memory_mb=256))
    out = runtime.invoke("describe", {"x": 1})
    assert out["event"] == {"x": 1} and out["function_name"] == "describe"
    assert out["lambda_function"] == f"{aws.config['prefix']}describe"
    assert json.loads(out["services"])["endpoint_url"] == aws.config["endpoint_url"]
    again = runtime.invoke("describe", {"x": 2})
    assert (out["cold_start"], again["cold_start"]) == (True, False)
    stats = runtime.stats("describe")
    assert (stats.invocations, stats.cold_starts, stats.errors) == (2, 1, 0)
    assert stats.gb_s == pytest.approx(stats.billed_s * 256 / 1024)
    # What Lambda itself answers, seen with plain boto3:
    reply = boto.client("lambda").invoke(
        FunctionName=f"{aws.config['prefix']}describe", Payload=b"{}", LogType="Tail"
    )
    log = base64.b64decode(reply["LogResult"]).decode()
    assert "REPORT RequestId:" in log and "Billed Duration:" in log and "Memory Size: 256 MB" in log
    assert "Init Duration" not in log  # warm


def test_errors_keep_their_lambda_error_type(aws: Services) -> None:
    from strato.backends.aws._runtime import LambdaFunctionError

    runtime = aws.runtime
    runtime.register(spec("boom", "boom"))
    runtime.register(spec("not-json", "not_json"))
    with pytest.raises(FunctionError, match="KeyError") as caught:
        runtime.invoke("boom", {"missing": "weights"})
    error = caught.value
    assert isinstance(error, LambdaFunctionError)
    assert error.error_type == "KeyError" and "weights" in error.error_message
    with pytest.raises(FunctionError, match=r"Runtime\.MarshalError"):
        runtime.invoke("not-json", {})
    with pytest.raises(StratoError, match="not JSON"):
        runtime.invoke("boom", {"x": object()})
    assert runtime.stats().errors == 2


def test_stats_come_from_the_report_line() -> None:
    pytest.importorskip("boto3")
    from strato.backends.aws._runtime import LambdaRuntime
    from strato.services import RuntimeStats

    stats = RuntimeStats()
    report = (
        "START RequestId: r Version: $LATEST\nEND RequestId: r\n"
        "REPORT RequestId: r\tDuration: 1203.41 ms\tBilled Duration: 1204 ms\t"
        "Memory Size: 2048 MB\tMax Memory Used: 88 MB\tInit Duration: 231.07 ms\t\n"
    )
    runtime = object.__new__(LambdaRuntime)
    runtime._lock = __import__("threading").Lock()
    runtime._account(stats, {"LogResult": base64.b64encode(report.encode()).decode()})
    runtime._account(stats, {"LogResult": base64.b64encode(report.replace("Init", "X").encode())})
    assert stats.billed_s == pytest.approx(2.408)
    assert stats.gb_s == pytest.approx(4.816)
    assert stats.cold_starts == 1


def test_a_container_image_runs_the_entry_point_as_its_command(
    aws_config: dict[str, Any], boto: Any
) -> None:
    uri = "123456789012.dkr.ecr.us-east-1.amazonaws.com/strato-fl:1"
    with connect({**aws_config, "lambda_code": {"ImageUri": uri}}) as svc:
        svc.runtime.register(spec("img", "describe"))
        svc.runtime.register(spec("img", "describe", timeout_s=7))  # an update, in place
    got = boto.client("lambda").get_function(FunctionName=f"{aws_config['prefix']}img")
    assert got["Configuration"]["PackageType"] == "Image"
    assert got["Configuration"]["Timeout"] == 7
    assert got["Code"]["ImageUri"] == uri
    command = got["Configuration"]["ImageConfigResponse"]["ImageConfig"]["Command"]
    assert command == ["strato.backends.aws.lambda_entry.handler"]
