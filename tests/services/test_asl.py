"""The pure ASL subset: validation, paths, Choice rules, Retry and Catch matching."""

from __future__ import annotations

import copy
import datetime as dt
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from strato.errors import ConfigError
from strato.services import asl

LAMBDA = asl.LAMBDA_INVOKE


def machine(**states: Any) -> dict[str, Any]:
    return {"StartAt": next(iter(states)), "States": states}


def task(**extra: Any) -> dict[str, Any]:
    return {"Type": "Task", "Resource": LAMBDA, "Parameters": {"FunctionName": "f"}, **extra}


GOOD = {
    "Comment": "every state type",
    "StartAt": "Prepare",
    "TimeoutSeconds": 60,
    "States": {
        "Prepare": {"Type": "Pass", "Result": {"n": 1}, "ResultPath": "$.prep", "Next": "Work"},
        "Work": task(
            Parameters={"FunctionName": "f", "Payload.$": "$", "Fixed": [{"x.$": "$.prep"}]},
            ResultSelector={"value.$": "$.Payload"},
            ResultPath="$.work",
            TimeoutSeconds=5,
            Retry=[{"ErrorEquals": ["Boom"], "MaxAttempts": 2, "BackoffRate": 1.5}],
            Catch=[{"ErrorEquals": ["States.ALL"], "Next": "Failed", "ResultPath": "$.err"}],
            Next="Callback",
        ),
        "Callback": {
            "Type": "Task",
            "Resource": asl.LAMBDA_INVOKE_WAIT,
            "Parameters": {"FunctionName": "g", "Payload": {"token.$": "$$.Task.Token"}},
            "Next": "Decide",
        },
        "Decide": {
            "Type": "Choice",
            "Choices": [
                {"Variable": "$.n", "NumericGreaterThan": 3, "Next": "Done"},
                {
                    "And": [
                        {"Variable": "$.s", "IsPresent": True},
                        {"Not": {"Variable": "$.s", "StringEquals": "x"}},
                    ],
                    "Next": "Pause",
                },
            ],
            "Default": "Done",
        },
        "Pause": {"Type": "Wait", "Seconds": 1, "Next": "Done"},
        "Done": {"Type": "Succeed"},
        "Failed": {"Type": "Fail", "Error": "Bad", "Cause": "it broke"},
    },
}


def test_a_definition_using_every_feature_is_valid() -> None:
    asl.validate(GOOD)


def broken(change: Any) -> dict[str, Any]:
    definition = copy.deepcopy(GOOD)
    change(definition)
    return definition


S = "States"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.pop("StartAt"), "StartAt"),
        (lambda d: d.update(StartAt="Nowhere"), "Nowhere"),
        (lambda d: d.update(States={}), "States"),
        (lambda d: d[S]["Pause"].update(Type="Parallel"), "'Pause': Type 'Parallel'"),
        (lambda d: d[S]["Pause"].update(Next="Nowhere"), "'Pause': 'Next' names 'Nowhere'"),
        (lambda d: d[S]["Pause"].pop("Next"), "'Pause' needs exactly one of"),
        (lambda d: d[S]["Pause"].update(End=True), "'Pause' needs exactly one of"),
        (lambda d: d[S]["Pause"].update(Nxt="Done"), "'Pause': field 'Nxt'"),
        (lambda d: d[S]["Pause"].update(SecondsPath="$.s"), "'Pause': a Wait needs exactly one"),
        (lambda d: d[S]["Pause"].update(Seconds=-1), "'Pause': 'Seconds'"),
        (lambda d: d[S].update(Orphan={"Type": "Succeed"}), "'Orphan' cannot be reached"),
        (lambda d: d[S]["Work"].update(Resource="arn:aws:states:::sqs:sendMessage"), "'Work'"),
        (lambda d: d[S]["Work"].update(Parameters={"Payload": {}}), "FunctionName"),
        (lambda d: d[S]["Work"].update(InputPath="a.b"), "'Work': 'InputPath'"),
        (lambda d: d[S]["Work"].update(ResultPath="$.a[0]"), "'Work': 'ResultPath'"),
        (lambda d: d[S]["Work"].update(TimeoutSeconds=0), "'Work': 'TimeoutSeconds'"),
        (
            lambda d: d[S]["Work"]["Parameters"].update({"x.$": "States.Format('{}', $.a)"}),
            "intrinsic",
        ),
        (lambda d: d[S]["Work"]["Retry"][0].update(BackoffRate=0.5), "Retry[0]: 'BackoffRate'"),
        (lambda d: d[S]["Work"]["Retry"][0].update(ErrorEquals=[]), "Retry[0]: 'ErrorEquals'"),
        (
            lambda d: d[S]["Work"]["Catch"].append({"ErrorEquals": ["X"], "Next": "Done"}),
            "Catch[0]: 'States.ALL' must be alone and in the last",
        ),
        (lambda d: d[S]["Work"]["Catch"][0].update(Next="Gone"), "Catch[0]: 'Next' names"),
        (lambda d: d[S]["Decide"].update(Choices=[]), "'Decide': a Choice needs"),
        (lambda d: d[S]["Decide"]["Choices"][0].pop("NumericGreaterThan"), "Choices[0]"),
        (lambda d: d[S]["Decide"]["Choices"][0].update(NumericGreaterThan="3"), "needs a number"),
        (lambda d: d[S]["Decide"]["Choices"][1]["And"][0].update(Next="Done"), "nested"),
        (lambda d: d[S]["Decide"].update(Default="Gone"), "'Decide': 'Default' names 'Gone'"),
        (lambda d: d[S]["Failed"].update(Next="Done"), "'Failed': field 'Next'"),
        (lambda d: d.update(TimeoutSeconds=0), "TimeoutSeconds"),
    ],
)
def test_an_invalid_definition_names_what_is_wrong(change: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        asl.validate(broken(change))


def test_validation_accepts_other_resources_when_a_backend_allows_them() -> None:
    sns = "arn:aws:states:::sns:publish.waitForTaskToken"
    definition = machine(Publish={"Type": "Task", "Resource": sns, "End": True})
    with pytest.raises(ConfigError, match="not supported"):
        asl.validate(definition)
    asl.validate(definition, resources=asl.SUPPORTED_RESOURCES | {sns})


# --- paths ---------------------------------------------------------------------------------

DATA = {"a": {"b": [10, {"c": "deep"}]}, "odd key": 1, "n": None}
CONTEXT = {"Task": {"Token": "tok"}, "Execution": {"Id": "e1", "Input": {"x": 1}}}


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("$", DATA),
        ("$.a.b[0]", 10),
        ("$.a.b[1].c", "deep"),
        ("$['odd key']", 1),
        ("$.n", None),
        ("$$.Task.Token", "tok"),
        ("$$.Execution.Input.x", 1),
    ],
)
def test_paths_resolve_into_the_input_and_the_context(path: str, expected: Any) -> None:
    assert asl.resolve(path, DATA, CONTEXT) == expected


@pytest.mark.parametrize("path", ["$.missing", "$.a.b[2]", "$.a.b.c", "$$.State.Name"])
def test_a_path_that_matches_nothing_is_a_runtime_error(path: str) -> None:
    with pytest.raises(asl.StatesError) as info:
        asl.resolve(path, DATA, CONTEXT)
    assert info.value.error == "States.Runtime"
    assert not asl.has_path(path, DATA, CONTEXT)


def test_parameters_fill_dollar_keys_at_every_depth_and_copy_the_values() -> None:
    template = {"FunctionName": "f", "Payload": {"all.$": "$.a", "l": [{"t.$": "$$.Task.Token"}]}}
    out = asl.apply_template(template, DATA, CONTEXT)
    assert out == {"FunctionName": "f", "Payload": {"all": DATA["a"], "l": [{"t": "tok"}]}}
    out["Payload"]["all"]["b"].append("x")
    assert DATA["a"]["b"] == [10, {"c": "deep"}]


def test_result_path_replaces_discards_or_nests_without_touching_the_input() -> None:
    data = {"keep": 1, "x": {"y": 2}}
    assert asl.set_result(data, "r", "$") == "r"
    assert asl.set_result(data, "r", None) is data
    assert asl.set_result(data, "r", "$.x.z.w") == {"keep": 1, "x": {"y": 2, "z": {"w": "r"}}}
    assert data == {"keep": 1, "x": {"y": 2}}
    with pytest.raises(asl.StatesError, match="non-object"):
        asl.set_result(data, "r", "$.keep.z")
    with pytest.raises(asl.StatesError, match="object as input"):
        asl.set_result([1], "r", "$.a")


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=5))
keys = st.text(alphabet="abcxyz_", min_size=1, max_size=4)


@given(
    data=st.dictionaries(keys, st.one_of(json_leaf, st.dictionaries(keys, json_leaf)), max_size=4),
    path=st.lists(keys, min_size=1, max_size=3),
    result=json_leaf,
)
def test_a_result_placed_at_a_path_is_found_there_and_siblings_stay(
    data: dict[str, Any], path: list[str], result: Any
) -> None:
    result_path = "$." + ".".join(path)
    try:
        merged = asl.set_result(data, result, result_path)
    except asl.StatesError:
        # allowed only when the path crosses an existing value that is not an object
        node: Any = data
        for key in path[:-1]:
            node = node.get(key)
            if node is None:
                break  # missing from here on: set_result would have created the objects
            if not isinstance(node, dict):
                return
        pytest.fail("set_result refused a path that crosses only objects")
    assert asl.resolve(result_path, merged) == result
    for key, value in data.items():
        if key != path[0]:
            assert merged[key] == value


def test_state_output_applies_selector_then_result_path_then_output_path() -> None:
    state = {
        "ResultSelector": {"v.$": "$.Payload.value", "fixed": 1},
        "ResultPath": "$.res",
        "OutputPath": "$.res",
    }
    result = {"Payload": {"value": 42}, "StatusCode": 200}
    assert asl.state_output(state, {"in": 1}, result, CONTEXT) == {"v": 42, "fixed": 1}
    assert asl.state_output({"OutputPath": None}, {"in": 1}, result, CONTEXT) == {}


def test_pass_output_uses_result_or_its_shaped_input() -> None:
    state = {"Result": {"r": 1}, "ResultPath": "$.out"}
    assert asl.pass_output(state, {"in": 0}, CONTEXT) == {"in": 0, "out": {"r": 1}}
    state = {"InputPath": "$.a", "Parameters": {"first.$": "$.b[0]", "tok.$": "$$.Task.Token"}}
    assert asl.pass_output(state, DATA, CONTEXT) == {"first": 10, "tok": "tok"}
    assert asl.pass_output({"InputPath": None}, DATA, CONTEXT) == {}


# --- Choice --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "matches"),
    [
        ({"Variable": "$.s", "StringEquals": "go"}, True),
        ({"Variable": "$.s", "StringLessThan": "ha"}, True),
        ({"Variable": "$.s", "StringGreaterThanEquals": "gp"}, False),
        ({"Variable": "$.n", "StringEquals": "3"}, False),  # a type mismatch is false
        ({"Variable": "$.n", "NumericEquals": 3}, True),
        ({"Variable": "$.n", "NumericLessThan": 3}, False),
        ({"Variable": "$.n", "NumericLessThanEquals": 3}, True),
        ({"Variable": "$.n", "NumericGreaterThan": 2.5}, True),
        ({"Variable": "$.n", "NumericGreaterThanEquals": 4}, False),
        ({"Variable": "$.flag", "NumericEquals": 1}, False),  # a boolean is not a number
        ({"Variable": "$.flag", "BooleanEquals": True}, True),
        ({"Variable": "$.n", "BooleanEquals": True}, False),
        ({"Variable": "$.n", "NumericEqualsPath": "$.m"}, True),
        ({"Variable": "$.n", "NumericLessThanPath": "$.m"}, False),
        ({"Variable": "$.nothing", "IsPresent": False}, True),
        ({"Variable": "$.s", "IsPresent": True}, True),
        ({"Variable": "$.none", "IsNull": True}, True),
        ({"Variable": "$.s", "IsString": True}, True),
        ({"Variable": "$.flag", "IsNumeric": True}, False),
        ({"Variable": "$.flag", "IsBoolean": True}, True),
        (
            {
                "And": [
                    {"Variable": "$.n", "NumericEquals": 3},
                    {"Variable": "$.s", "IsString": True},
                ]
            },
            True,
        ),
        (
            {"Or": [{"Variable": "$.n", "NumericEquals": 4}, {"Variable": "$.s", "IsNull": True}]},
            False,
        ),
        ({"Not": {"Variable": "$.n", "NumericEquals": 4}}, True),
    ],
)
def test_choice_rules(rule: dict[str, Any], matches: bool) -> None:
    data = {"s": "go", "n": 3, "m": 3.0, "flag": True, "none": None}
    assert asl.rule_matches(rule, data) is matches


def test_choice_takes_the_first_matching_rule_else_the_default_else_fails() -> None:
    state = {
        "Type": "Choice",
        "Choices": [
            {"Variable": "$.n", "NumericGreaterThan": 10, "Next": "Big"},
            {"Variable": "$.n", "NumericGreaterThan": 5, "Next": "Medium"},
        ],
        "Default": "Small",
    }
    assert asl.choose_next(state, {"n": 11}) == "Big"
    assert asl.choose_next(state, {"n": 6}) == "Medium"
    assert asl.choose_next(state, {"n": 1}) == "Small"
    del state["Default"]
    with pytest.raises(asl.StatesError) as info:
        asl.choose_next(state, {"n": 1})
    assert info.value.error == "States.NoChoiceMatched"
    with pytest.raises(asl.StatesError) as info:
        asl.choose_next(state, {"other": 1})
    assert info.value.error == "States.Runtime"


# --- Retry, Catch, Wait --------------------------------------------------------------------


def test_error_names_match_as_in_step_functions() -> None:
    assert asl.error_matches(["Boom"], "Boom")
    assert not asl.error_matches(["Boom"], "Bang")
    assert asl.error_matches(["States.ALL"], "States.Timeout")
    assert not asl.error_matches(["States.ALL"], "States.Runtime")
    assert asl.error_matches(["States.TaskFailed"], "ValueError")
    assert not asl.error_matches(["States.TaskFailed"], "States.Timeout")
    assert asl.error_matches(["X", "States.Timeout"], "States.Timeout")


def test_only_the_first_matching_retrier_applies_with_its_backoff() -> None:
    retriers = [
        {"ErrorEquals": ["Boom"], "MaxAttempts": 2, "IntervalSeconds": 2, "BackoffRate": 3},
        {"ErrorEquals": ["States.ALL"]},
    ]
    assert asl.find_retrier(retriers, "Boom") == 0
    assert asl.find_retrier(retriers, "Other") == 1
    assert asl.find_retrier(retriers[:1], "Other") is None
    assert asl.retry_delay(retriers[0], 0) == 2
    assert asl.retry_delay(retriers[0], 1) == 6
    assert asl.retry_delay(retriers[0], 2) is None
    assert [asl.retry_delay(retriers[1], k) for k in range(4)] == [1, 2, 4, None]  # defaults
    assert asl.retry_delay({"ErrorEquals": ["X"], "MaxAttempts": 0}, 0) is None
    capped = {"ErrorEquals": ["X"], "IntervalSeconds": 10, "MaxDelaySeconds": 15}
    assert asl.retry_delay(capped, 2) == 15


def test_the_first_matching_catcher_wins() -> None:
    catchers = [
        {"ErrorEquals": ["States.Timeout"], "Next": "Late"},
        {"ErrorEquals": ["States.ALL"], "Next": "Any"},
    ]
    assert asl.find_catcher(catchers, "States.Timeout") == catchers[0]
    assert asl.find_catcher(catchers, "Boom") == catchers[1]
    assert asl.find_catcher(catchers, "States.Runtime") is None


def test_wait_until() -> None:
    assert asl.wait_until({"Seconds": 5}, {}, 100.0) == 105.0
    assert asl.wait_until({"SecondsPath": "$.s"}, {"s": 2.5}, 100.0) == 102.5
    stamp = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    assert asl.wait_until({"Timestamp": "2030-01-02T03:04:05Z"}, {}, 0.0) == stamp.timestamp()
    with pytest.raises(asl.StatesError):
        asl.wait_until({"SecondsPath": "$.s"}, {"s": -1}, 0.0)
    with pytest.raises(asl.StatesError):
        asl.wait_until({"TimestampPath": "$.t"}, {"t": "tomorrow"}, 0.0)
