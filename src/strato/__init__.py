"""Strato: serverless federated learning and serverless distributed inference."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from strato.errors import StratoError

if TYPE_CHECKING:
    from strato.codec import Encoded, decode, encode
    from strato.params import Layout, Params

__all__ = ["Encoded", "Layout", "Params", "StratoError", "decode", "encode"]
__version__ = "0.1.0"

# Loaded on first use: `strato run` records its command before anything heavy is
# imported (numpy alone takes ~0.15 s), so a run stopped at once can be started again.
_LAZY = {"Encoded": "strato.codec", "decode": "strato.codec", "encode": "strato.codec",
         "Layout": "strato.params", "Params": "strato.params"}  # fmt: skip


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'strato' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
