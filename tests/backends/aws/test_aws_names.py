"""Logical names to AWS resource names: readable when legal, hashed when not, never shared."""

from __future__ import annotations

import re

import pytest

from strato.backends.aws._names import MAX_LEN, bucket_name, physical
from strato.errors import ConfigError


def test_legal_names_keep_their_readable_form() -> None:
    assert physical("queue", "run1-", "client_7") == "run1-client_7"
    assert physical("topic", "", "global-model-ready") == "global-model-ready"


@pytest.mark.parametrize("kind", sorted(MAX_LEN))
def test_other_names_are_legal_deterministic_and_distinct(kind: str) -> None:
    names = ["round/3", "round.3", "round 3", "é", "x" * 300, "x" * 301]
    out = [physical(kind, "p-", n) for n in names]
    assert out == [physical(kind, "p-", n) for n in names]  # every process finds the same
    assert len(set(out)) == len(names)
    for name in out:
        assert re.fullmatch(r"[A-Za-z0-9_-]+", name), name
        assert name.startswith("p-") and len(name) <= MAX_LEN[kind]


def test_bad_names_and_prefixes_are_refused() -> None:
    with pytest.raises(ValueError):
        physical("queue", "p-", "")
    with pytest.raises(ConfigError, match="prefix"):
        physical("function", "p" * 60, "a/b")


@pytest.mark.parametrize("prefix", ["strato-", "Run_7.", "UPPER", "", "-x-"])
def test_bucket_names_follow_s3_rules(prefix: str) -> None:
    name = bucket_name(prefix)
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]", name), name
    assert name == bucket_name(prefix)
    assert bucket_name("A-") != bucket_name("a-")  # case-folded prefixes still differ
