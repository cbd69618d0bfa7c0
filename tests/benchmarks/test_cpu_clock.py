"""The benchmarks' CPU accounting resolves work far below a clock tick (10 ms): a
small round must cost more than nothing, and a child's CPU is counted."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from _aggregation_common import process_cpu_s, tree_cpu_s


def _spin(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_two_milliseconds_of_work_register() -> None:
    before = process_cpu_s(os.getpid())
    _spin(0.002)
    after = process_cpu_s(os.getpid())
    assert before is not None and after is not None
    assert 0.002 <= after - before < 0.5


def test_a_child_is_counted_and_a_gone_process_is_none() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\nend = time.process_time() + 0.2\n"
         "while time.process_time() < end: pass\nsys.stdout.write('x'); sys.stdout.flush()\n"
         "sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None and child.stdout.read(1) == b"x"
        child_s = process_cpu_s(child.pid)
        assert child_s is not None and child_s >= 0.2
        own_s = process_cpu_s(os.getpid())
        assert own_s is not None and tree_cpu_s() >= child_s + own_s
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=30)
    assert process_cpu_s(child.pid) is None
