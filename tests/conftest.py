"""Session-wide: the signal dispositions the signal tests assume.

A test run started in the background or under ``nohup`` inherits SIGINT and/or SIGHUP
*ignored*, and so does every process a test starts; Strato rightly leaves an ignored
signal ignored, so a test that sends Ctrl-C or a hang-up to its child would wait for
nothing. Restore what a process started from a terminal has, whatever started pytest.
"""

from __future__ import annotations

import re
import signal

import pytest


def pytest_configure() -> None:
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)


# Tests that start Ray (a local Ray, a local multi-node cluster, Flower's Ray simulation)
# run one after another on one pytest-xdist worker: two Ray clusters at once on a
# 2-core machine only slow each other down, and a module's cluster checks that it left
# no processes of its own behind. ``--dist loadgroup`` honours the group.
_RAY = re.compile(r"(^|[\[/\-_])ray($|[\]/\-_.])")
_RAY_FILES = ("test_vs_flower.py",)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = item.nodeid.split("::")[0]
        if _RAY.search(item.nodeid) or module.endswith(_RAY_FILES):
            item.add_marker(pytest.mark.xdist_group("ray"))
        elif _shares_a_module_fixture(item):
            # e.g. a reference run or a whole AWS run: made once, on the one worker
            # that runs the module, rather than once on each worker
            item.add_marker(pytest.mark.xdist_group(module))


def _shares_a_module_fixture(item: pytest.Item) -> bool:
    info = getattr(item, "_fixtureinfo", None)  # pytest's own record of what it uses
    defs = getattr(info, "name2fixturedefs", None) or {}
    return any(getattr(d, "scope", None) == "module" for ds in defs.values() for d in ds)
