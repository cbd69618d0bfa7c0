"""The pure part of the Amazon States Language subset the Workflow primitive runs.

Everything here is a function of its arguments (no I/O, no clock): the embedded
interpreter calls it for every transition, and the AWS backend calls ``validate`` on
the very definition it hands to Step Functions, so a machine that passes here is one
both backends run the same way.

Supported: states ``Task`` (see ``SUPPORTED_RESOURCES``), ``Choice``, ``Pass``,
``Wait``, ``Succeed``, ``Fail``; ``InputPath``, ``Parameters`` (keys ending in ``.$``
take a path), ``ResultSelector``, ``ResultPath``, ``OutputPath``; ``Retry`` and
``Catch``; a top-level ``TimeoutSeconds``. Paths are a JSONPath subset: ``$``,
``$.a.b[0]``, ``$['a b']``, and ``$$.…`` for the context object (``$$.Task.Token``,
``$$.Execution.Id``, ``$$.Execution.Input``, ``$$.State.Name``, …). Run-time data
errors raise ``StatesError`` carrying the ASL error name (``States.Runtime``, …).
"""

from __future__ import annotations

import copy
import datetime as dt
import re
from collections.abc import Mapping, Sequence
from typing import Any

from strato.services._asl_validate import (
    LAMBDA_INVOKE,
    LAMBDA_INVOKE_WAIT,
    SUPPORTED_RESOURCES,
    parse_path,
    validate,
)

__all__ = [
    "LAMBDA_INVOKE",
    "LAMBDA_INVOKE_WAIT",
    "SUPPORTED_RESOURCES",
    "StatesError",
    "apply_template",
    "choose_next",
    "effective_input",
    "error_matches",
    "filter_input",
    "filter_output",
    "find_catcher",
    "find_retrier",
    "has_path",
    "parse_path",
    "pass_output",
    "resolve",
    "retry_delay",
    "rule_matches",
    "set_result",
    "state_output",
    "validate",
    "wait_until",
]

RUNTIME = "States.Runtime"
NO_CHOICE = "States.NoChoiceMatched"
_MISSING = object()


class StatesError(Exception):
    """A run-time error of a state, named as Step Functions names it (``States.Timeout``)."""

    def __init__(self, error: str, cause: str = "") -> None:
        super().__init__(f"{error}: {cause}" if cause else error)
        self.error = error
        self.cause = cause


# --- paths -----------------------------------------------------------------------------


def _lookup(path: str, data: Any, context: Mapping[str, Any] | None) -> Any:
    is_context, steps = parse_path(path)
    if is_context:
        if context is None:
            return _MISSING
        node: Any = context
    else:
        node = data
    for step in steps:
        if isinstance(step, int):
            if not isinstance(node, list) or step >= len(node):
                return _MISSING
        elif not isinstance(node, Mapping) or step not in node:
            return _MISSING
        node = node[step]
    return node


def resolve(path: str, data: Any, context: Mapping[str, Any] | None = None) -> Any:
    """The value at ``path`` in ``data`` (or in ``context`` for ``$$`` paths)."""
    value = _lookup(path, data, context)
    if value is _MISSING:
        raise StatesError(RUNTIME, f"the path {path!r} matches nothing in the state's input")
    return value


def has_path(path: str, data: Any, context: Mapping[str, Any] | None = None) -> bool:
    return _lookup(path, data, context) is not _MISSING


def apply_template(template: Any, data: Any, context: Mapping[str, Any] | None = None) -> Any:
    """A ``Parameters``/``ResultSelector`` template filled in from ``data`` and ``context``."""
    if isinstance(template, Mapping):
        out: dict[str, Any] = {}
        for key, value in template.items():
            if key.endswith(".$"):
                out[key[:-2]] = copy.deepcopy(resolve(value, data, context))
            else:
                out[key] = apply_template(value, data, context)
        return out
    if isinstance(template, list):
        return [apply_template(item, data, context) for item in template]
    return copy.deepcopy(template)


def set_result(data: Any, result: Any, result_path: str | None) -> Any:
    """``ResultPath``: the result replaces the input (``$``), is dropped (``None``), or is
    put into a copy of the input at ``$.a.b`` (creating the objects on the way)."""
    if result_path is None:
        return data
    keys = [str(step) for step in parse_path(result_path)[1]]  # validate(): keys only
    if not keys:
        return result
    if not isinstance(data, Mapping):
        raise StatesError(RUNTIME, f"ResultPath {result_path!r} needs an object as input")
    root = dict(data)
    node = root
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = {}
        elif not isinstance(child, Mapping):
            raise StatesError(RUNTIME, f"ResultPath {result_path!r} crosses a non-object value")
        copied = dict(child)  # copy the spine: the input itself is never mutated
        node[key] = copied
        node = copied
    node[keys[-1]] = result
    return root


def _select(path_field: str, state: Mapping[str, Any], data: Any) -> Any:
    # InputPath/OutputPath: absent means "$", null means an empty object.
    if path_field not in state:
        return data
    path = state[path_field]
    return {} if path is None else resolve(path, data)


def effective_input(state: Mapping[str, Any], data: Any, context: Mapping[str, Any]) -> Any:
    """What a Task (or Pass) works on: ``InputPath``, then ``Parameters``."""
    selected = _select("InputPath", state, data)
    if "Parameters" in state:
        return apply_template(state["Parameters"], selected, context)
    return selected


def state_output(
    state: Mapping[str, Any], data: Any, result: Any, context: Mapping[str, Any]
) -> Any:
    """A state's output from its raw input and its result: ``ResultSelector``,
    ``ResultPath`` (default ``$``), then ``OutputPath``."""
    if "ResultSelector" in state:
        result = apply_template(state["ResultSelector"], result, context)
    merged = set_result(data, result, state.get("ResultPath", "$"))
    return _select("OutputPath", state, merged)


def pass_output(state: Mapping[str, Any], data: Any, context: Mapping[str, Any]) -> Any:
    """A Pass state's output: its ``Result`` (or its effective input) placed by paths."""
    result = copy.deepcopy(state["Result"]) if "Result" in state else None
    if "Result" not in state:
        result = effective_input(state, data, context)
    return state_output(state, data, result, context)


def filter_input(state: Mapping[str, Any], data: Any) -> Any:
    """``InputPath`` alone: what a Choice state's rules look at."""
    return _select("InputPath", state, data)


def filter_output(state: Mapping[str, Any], data: Any) -> Any:
    """Choice, Wait and Succeed states: ``InputPath`` then ``OutputPath``, no result."""
    return _select("OutputPath", state, _select("InputPath", state, data))


# --- Choice ----------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _compare(op: str, value: Any, expected: Any) -> bool:
    if op == "IsPresent":
        raise AssertionError("IsPresent is handled by the caller")
    if op == "IsNull":
        return (value is None) is expected
    if op == "IsString":
        return isinstance(value, str) is expected
    if op == "IsNumeric":
        return _is_number(value) is expected
    if op == "IsBoolean":
        return isinstance(value, bool) is expected
    if op == "BooleanEquals":
        return isinstance(value, bool) and value is expected
    if op.startswith("String"):
        if not isinstance(value, str) or not isinstance(expected, str):
            return False
        kind = op[len("String") :]
    else:  # Numeric…: a type mismatch is "false", as in Step Functions
        if not _is_number(value) or not _is_number(expected):
            return False
        kind = op[len("Numeric") :]
    return bool(
        {
            "Equals": value == expected,
            "LessThan": value < expected,
            "LessThanEquals": value <= expected,
            "GreaterThan": value > expected,
            "GreaterThanEquals": value >= expected,
        }[kind]
    )


def rule_matches(rule: Mapping[str, Any], data: Any) -> bool:
    """One (possibly compound) Choice rule against the state's input."""
    if "And" in rule:
        return all(rule_matches(r, data) for r in rule["And"])
    if "Or" in rule:
        return any(rule_matches(r, data) for r in rule["Or"])
    if "Not" in rule:
        return not rule_matches(rule["Not"], data)
    variable = rule["Variable"]
    op = next(k for k in rule if k not in ("Variable", "Next", "Comment"))
    expected = rule[op]
    if op == "IsPresent":
        return has_path(variable, data) is expected
    value = resolve(variable, data)
    if op.endswith("Path"):
        op, expected = op[: -len("Path")], resolve(expected, data)
    return _compare(op, value, expected)


def choose_next(state: Mapping[str, Any], data: Any) -> str:
    """The name of the state a Choice goes to, given its (InputPath-filtered) input."""
    for rule in state["Choices"]:
        if rule_matches(rule, data):
            return str(rule["Next"])
    if "Default" in state:
        return str(state["Default"])
    raise StatesError(NO_CHOICE, "no Choice rule matched and there is no Default")


# --- Wait ------------------------------------------------------------------------------


def wait_until(state: Mapping[str, Any], data: Any, now: float) -> float:
    """The wall-clock time (seconds since the epoch) a Wait state ends, entered at ``now``."""
    if "Seconds" in state:
        return now + float(state["Seconds"])
    if "SecondsPath" in state:
        seconds = resolve(state["SecondsPath"], data)
        if not _is_number(seconds) or seconds < 0:
            raise StatesError(RUNTIME, f"SecondsPath gave {seconds!r}, not seconds >= 0")
        return now + float(seconds)
    stamp = state["Timestamp"] if "Timestamp" in state else resolve(state["TimestampPath"], data)
    return _timestamp(stamp)


def _timestamp(stamp: Any) -> float:
    if isinstance(stamp, str):
        try:
            parsed = dt.datetime.fromisoformat(re.sub(r"Z$", "+00:00", stamp))
        except ValueError:
            parsed = None
        if parsed is not None and parsed.tzinfo is not None:
            return parsed.timestamp()
    raise StatesError(RUNTIME, f"{stamp!r} is not an ISO 8601 timestamp with a time zone")


# --- Retry and Catch -------------------------------------------------------------------


def error_matches(names: Sequence[str], error: str) -> bool:
    """Whether an ``ErrorEquals`` list catches ``error``. ``States.ALL`` matches every
    error but ``States.Runtime``; ``States.TaskFailed`` every one but ``States.Timeout``
    (and ``States.Runtime``), as in Step Functions."""
    for name in names:
        if name == error:
            return True
        if name == "States.ALL" and error != RUNTIME:
            return True
        if name == "States.TaskFailed" and error not in (RUNTIME, "States.Timeout"):
            return True
    return False


def find_retrier(retriers: Sequence[Mapping[str, Any]], error: str) -> int | None:
    """The index of the first retrier whose ``ErrorEquals`` matches (only that one
    applies: when its attempts run out, the Catchers are next, not later retriers)."""
    for i, retrier in enumerate(retriers):
        if error_matches(retrier["ErrorEquals"], error):
            return i
    return None


def retry_delay(retrier: Mapping[str, Any], attempts_done: int) -> float | None:
    """Seconds before the next attempt, or None when ``MaxAttempts`` are used up."""
    if attempts_done >= int(retrier.get("MaxAttempts", 3)):
        return None
    delay = (
        float(retrier.get("IntervalSeconds", 1))
        * float(retrier.get("BackoffRate", 2.0)) ** attempts_done
    )
    if "MaxDelaySeconds" in retrier:
        delay = min(delay, float(retrier["MaxDelaySeconds"]))
    return delay


def find_catcher(catchers: Sequence[Mapping[str, Any]], error: str) -> Mapping[str, Any] | None:
    for catcher in catchers:
        if error_matches(catcher["ErrorEquals"], error):
            return catcher
    return None
