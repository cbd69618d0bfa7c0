"""Session-wide: the signal dispositions the signal tests assume.

A test run started in the background or under ``nohup`` inherits SIGINT and/or SIGHUP
*ignored*, and so does every process a test starts; Strato rightly leaves an ignored
signal ignored, so a test that sends Ctrl-C or a hang-up to its child would wait for
nothing. Restore what a process started from a terminal has, whatever started pytest.
"""

from __future__ import annotations

import signal


def pytest_configure() -> None:
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
