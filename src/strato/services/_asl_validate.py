"""Validation of a state machine definition (the ASL subset of ``asl``), before any run.

Strict on purpose: a field this subset does not know is an error (a typo such as
``"Nxt"`` would otherwise silently end the machine), and so is a state no path from
``StartAt`` reaches (Step Functions rejects those too). Every message names the state.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

from strato.errors import ConfigError

__all__ = ["LAMBDA_INVOKE", "LAMBDA_INVOKE_WAIT", "SUPPORTED_RESOURCES", "parse_path", "validate"]

LAMBDA_INVOKE = "arn:aws:states:::lambda:invoke"
LAMBDA_INVOKE_WAIT = "arn:aws:states:::lambda:invoke.waitForTaskToken"
SUPPORTED_RESOURCES = frozenset({LAMBDA_INVOKE, LAMBDA_INVOKE_WAIT})

_IO = {"InputPath", "OutputPath"}
_FLOW = {"Next", "End"}
_FIELDS: dict[str, set[str]] = {
    "Task": _IO
    | _FLOW
    | {
        "Resource",
        "Parameters",
        "ResultSelector",
        "ResultPath",
        "TimeoutSeconds",
        "Retry",
        "Catch",
    },
    "Pass": _IO | _FLOW | {"Result", "Parameters", "ResultPath"},
    "Choice": _IO | {"Choices", "Default"},
    "Wait": _IO | _FLOW | {"Seconds", "SecondsPath", "Timestamp", "TimestampPath"},
    "Succeed": set(_IO),
    "Fail": {"Error", "Cause"},
}
_TOP_FIELDS = {"StartAt", "States", "Comment", "TimeoutSeconds", "Version"}
_STRING_OPS = (
    "StringEquals",
    "StringLessThan",
    "StringLessThanEquals",
    "StringGreaterThan",
    "StringGreaterThanEquals",
)
_NUMERIC_OPS = (
    "NumericEquals",
    "NumericLessThan",
    "NumericLessThanEquals",
    "NumericGreaterThan",
    "NumericGreaterThanEquals",
)
_TYPE_OPS = ("IsPresent", "IsNull", "IsString", "IsNumeric", "IsBoolean", "BooleanEquals")
_COMPARATORS: dict[str, str] = {  # comparator -> the kind of value it takes
    **{op: "string" for op in _STRING_OPS},
    **{op: "number" for op in _NUMERIC_OPS},
    **{op: "boolean" for op in _TYPE_OPS},
    **{op + "Path": "path" for op in (*_STRING_OPS, *_NUMERIC_OPS, "BooleanEquals")},
}

# ".a", "['a b']" or "[0]" after the leading "$" (or "$$" for the context object).
_STEP = re.compile(r"\.([^.\[\]'\"]+)|\['([^']*)'\]|\[(\d+)\]")


@functools.lru_cache(maxsize=1024)
def parse_path(path: str) -> tuple[bool, tuple[str | int, ...]]:
    """``(is_context_path, steps)`` of a path such as ``$.a.b[0]`` or ``$$.Task.Token``."""
    if isinstance(path, str) and path.startswith("States."):
        raise ConfigError(f"{path!r}: intrinsic functions are not supported")
    if not isinstance(path, str) or not path.startswith("$"):
        raise ConfigError(f"{path!r} is not a path (paths start with '$', e.g. '$.a.b[0]')")
    is_context = path.startswith("$$")
    rest = path[2:] if is_context else path[1:]
    steps: list[str | int] = []
    pos = 0
    while pos < len(rest):
        match = _STEP.match(rest, pos)
        if match is None:
            raise ConfigError(
                f"{path!r} is not a supported path (use '$', '$.a.b', '$.a[0]', '$$.Task.Token')"
            )
        key, quoted, index = match.groups()
        steps.append(int(index) if index is not None else key if key is not None else quoted)
        pos = match.end()
    return is_context, tuple(steps)


def validate(
    definition: Mapping[str, Any], resources: frozenset[str] = SUPPORTED_RESOURCES
) -> None:
    """Raise ``ConfigError`` naming the state at fault unless ``definition`` is a
    well-formed machine of this subset; ``resources`` lists the Task resources allowed."""
    if not isinstance(definition, Mapping):
        raise ConfigError("a state machine definition must be a JSON object")
    _no_unknown("the definition", definition, _TOP_FIELDS)
    states = definition.get("States")
    if not isinstance(states, Mapping) or not states:
        raise ConfigError("a state machine needs 'States': an object of named states")
    start = definition.get("StartAt")
    if not isinstance(start, str) or start not in states:
        raise ConfigError(f"'StartAt' must name one of the states, not {start!r}")
    if "TimeoutSeconds" in definition:
        _positive_int("the definition", "TimeoutSeconds", definition["TimeoutSeconds"])
    edges: dict[str, list[str]] = {}
    for name, state in states.items():
        edges[name] = _check_state(name, state, states, resources)
    reached, todo = {start}, [start]
    while todo:
        for target in edges[todo.pop()]:
            if target not in reached:
                reached.add(target)
                todo.append(target)
    unreachable = [name for name in states if name not in reached]
    if unreachable:
        raise ConfigError(f"state {unreachable[0]!r} cannot be reached from {start!r}")


def _check_state(
    name: str, state: Any, states: Mapping[str, Any], resources: frozenset[str]
) -> list[str]:
    """Check one state; return the names it can go to."""
    where = f"state {name!r}"
    if not isinstance(state, Mapping):
        raise ConfigError(f"{where} must be a JSON object")
    kind = state.get("Type")
    if kind not in _FIELDS:
        raise ConfigError(
            f"{where}: Type {kind!r} is not supported (use one of {', '.join(_FIELDS)})"
        )
    _no_unknown(where, state, _FIELDS[kind] | {"Type", "Comment"})
    for field in ("InputPath", "OutputPath"):
        if state.get(field) is not None:
            _path(where, field, state[field])
    targets: list[str] = []
    if _FLOW & _FIELDS[kind]:
        has_next, ends = "Next" in state, state.get("End") is True
        if "End" in state and state["End"] is not True:
            raise ConfigError(f"{where}: 'End' must be true when present")
        if has_next == ends:
            raise ConfigError(f"{where} needs exactly one of 'Next' or 'End': true")
        if has_next:
            targets.append(_target(where, "Next", state["Next"], states))
    if "ResultPath" in state and state["ResultPath"] is not None:
        _result_path(where, state["ResultPath"])
    for field in ("Parameters", "ResultSelector"):
        if field in state:
            _template(f"{where}: {field}", state[field])
    if kind == "Task":
        targets += _check_task(where, state, states, resources)
    elif kind == "Choice":
        targets += _check_choice(where, state, states)
    elif kind == "Wait":
        given = [f for f in ("Seconds", "SecondsPath", "Timestamp", "TimestampPath") if f in state]
        if len(given) != 1:
            raise ConfigError(
                f"{where}: a Wait needs exactly one of Seconds, SecondsPath, "
                "Timestamp, TimestampPath"
            )
        if "Seconds" in state:
            value = state["Seconds"]
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{where}: 'Seconds' must be an integer >= 0, not {value!r}")
        for field in ("SecondsPath", "TimestampPath"):
            if field in state:
                _path(where, field, state[field])
        if "Timestamp" in state and not isinstance(state["Timestamp"], str):
            raise ConfigError(f"{where}: 'Timestamp' must be an ISO 8601 string")
    elif kind == "Fail":
        for field in ("Error", "Cause"):
            if field in state and not isinstance(state[field], str):
                raise ConfigError(f"{where}: {field!r} must be a string")
    return targets


def _check_task(
    where: str, state: Mapping[str, Any], states: Mapping[str, Any], resources: frozenset[str]
) -> list[str]:
    resource = state.get("Resource")
    if resource not in resources:
        raise ConfigError(
            f"{where}: Resource {resource!r} is not supported (use one of {sorted(resources)})"
        )
    if resource in SUPPORTED_RESOURCES:
        params = state.get("Parameters")
        if not isinstance(params, Mapping) or not (
            "FunctionName" in params or "FunctionName.$" in params
        ):
            raise ConfigError(f"{where}: a lambda:invoke Task needs Parameters.FunctionName")
    if "TimeoutSeconds" in state:
        _positive_int(where, "TimeoutSeconds", state["TimeoutSeconds"])
    for i, retrier in enumerate(_list(where, "Retry", state.get("Retry", []))):
        at = f"{where}: Retry[{i}]"
        _no_unknown(
            at,
            retrier,
            {
                "ErrorEquals",
                "MaxAttempts",
                "IntervalSeconds",
                "BackoffRate",
                "MaxDelaySeconds",
                "Comment",
            },
        )
        _error_equals(at, retrier, last=i == len(state["Retry"]) - 1)
        if "MaxAttempts" in retrier:
            _int_at_least(at, "MaxAttempts", retrier["MaxAttempts"], 0)
        for field in ("IntervalSeconds", "MaxDelaySeconds"):
            if field in retrier:
                _positive_int(at, field, retrier[field])
        rate = retrier.get("BackoffRate", 2.0)
        if not isinstance(rate, int | float) or isinstance(rate, bool) or rate < 1.0:
            raise ConfigError(f"{at}: 'BackoffRate' must be a number >= 1.0, not {rate!r}")
    targets = []
    for i, catcher in enumerate(_list(where, "Catch", state.get("Catch", []))):
        at = f"{where}: Catch[{i}]"
        _no_unknown(at, catcher, {"ErrorEquals", "Next", "ResultPath", "Comment"})
        _error_equals(at, catcher, last=i == len(state["Catch"]) - 1)
        targets.append(_target(at, "Next", catcher.get("Next"), states))
        if catcher.get("ResultPath") is not None:
            _result_path(at, catcher["ResultPath"])
    return targets


def _check_choice(where: str, state: Mapping[str, Any], states: Mapping[str, Any]) -> list[str]:
    choices = _list(where, "Choices", state.get("Choices"))
    if not choices:
        raise ConfigError(f"{where}: a Choice needs a non-empty 'Choices' list")
    targets = []
    for i, rule in enumerate(choices):
        _rule(f"{where}: Choices[{i}]", rule, top=True)
        targets.append(_target(f"{where}: Choices[{i}]", "Next", rule.get("Next"), states))
    if "Default" in state:
        targets.append(_target(where, "Default", state["Default"], states))
    return targets


def _rule(where: str, rule: Any, top: bool) -> None:
    if not isinstance(rule, Mapping):
        raise ConfigError(f"{where} must be a JSON object")
    if not top and "Next" in rule:
        raise ConfigError(f"{where}: a rule nested in And/Or/Not has no 'Next'")
    if top and "Next" not in rule:
        raise ConfigError(f"{where}: a Choice rule needs 'Next'")
    fields = [k for k in rule if k not in ("Next", "Comment")]
    if fields in (["And"], ["Or"]):
        nested = _list(where, fields[0], rule[fields[0]])
        if not nested:
            raise ConfigError(f"{where}: {fields[0]!r} needs a non-empty list of rules")
        for j, sub in enumerate(nested):
            _rule(f"{where}.{fields[0]}[{j}]", sub, top=False)
        return
    if fields == ["Not"]:
        _rule(f"{where}.Not", rule["Not"], top=False)
        return
    if "Variable" not in rule:
        raise ConfigError(f"{where}: a rule needs 'Variable' (or And/Or/Not)")
    _path(where, "Variable", rule["Variable"])
    ops = [k for k in fields if k != "Variable"]
    if len(ops) != 1 or ops[0] not in _COMPARATORS:
        raise ConfigError(
            f"{where}: a rule needs exactly one comparator of {sorted(_COMPARATORS)}, got {ops}"
        )
    op, kind, value = ops[0], _COMPARATORS[ops[0]], rule[ops[0]]
    if kind == "path":
        _path(where, op, value)
        return
    ok = {
        "string": isinstance(value, str),
        "number": isinstance(value, int | float) and not isinstance(value, bool),
        "boolean": isinstance(value, bool),
    }[kind]
    if not ok:
        raise ConfigError(f"{where}: {op!r} needs a {kind}, not {value!r}")


def _template(where: str, template: Any) -> None:
    if isinstance(template, Mapping):
        for key, value in template.items():
            if key.endswith(".$"):
                _path(where, key, value)
            else:
                _template(where, value)
    elif isinstance(template, list):
        for item in template:
            _template(where, item)


def _path(where: str, field: str, value: Any) -> None:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {field!r} must be a path string, not {value!r}")
    try:
        parse_path(value)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {field!r}: {exc}") from None


def _result_path(where: str, value: Any) -> None:
    _path(where, "ResultPath", value)
    is_context, steps = parse_path(value)
    if is_context or any(isinstance(step, int) for step in steps):
        raise ConfigError(f"{where}: 'ResultPath' must be '$' or '$.a.b' (object keys only)")


def _target(where: str, field: str, name: Any, states: Mapping[str, Any]) -> str:
    if not isinstance(name, str) or name not in states:
        raise ConfigError(f"{where}: {field!r} names {name!r}, which is not a state")
    return name


def _error_equals(where: str, entry: Any, last: bool) -> None:
    names = entry.get("ErrorEquals")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{where}: 'ErrorEquals' must be a non-empty list of error names")
    if "States.ALL" in names and (len(names) > 1 or not last):
        raise ConfigError(f"{where}: 'States.ALL' must be alone and in the last entry")


def _no_unknown(where: str, obj: Any, allowed: set[str]) -> None:
    if not isinstance(obj, Mapping):
        raise ConfigError(f"{where} must be a JSON object")
    for key in obj:
        if key not in allowed:
            known = ", ".join(sorted(allowed))
            raise ConfigError(f"{where}: field {key!r} is not supported here (allowed: {known})")


def _list(where: str, field: str, value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ConfigError(f"{where}: {field!r} must be a list")
    return value


def _positive_int(where: str, field: str, value: Any) -> None:
    _int_at_least(where, field, value, 1)


def _int_at_least(where: str, field: str, value: Any, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{where}: {field!r} must be an integer >= {low}, not {value!r}")
