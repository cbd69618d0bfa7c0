"""Node shared memory: zero-copy hand-off, pooling, refcounts, and a clean /dev/shm."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from strato.errors import StratoError, WorkerCrashed
from strato.services import FunctionSpec
from strato.services._runtime_process import ProcessRuntime
from strato.services.shm import (
    SHM_DIR,
    ShmError,
    ShmPool,
    ShmRef,
    attach,
    size_class,
    sweep_orphans,
)

TESTS_DIR = str(Path(__file__).resolve().parent)  # holds shm_handlers.py


def exists(name: str) -> bool:
    return os.path.exists(os.path.join(SHM_DIR, name))


@pytest.fixture
def pool() -> Iterator[ShmPool]:
    with ShmPool() as p:
        yield p
    assert not any(exists(n) for n in p.segment_names)


@pytest.fixture
def runtime() -> Iterator[ProcessRuntime]:
    rt = ProcessRuntime()
    env = {"PYTHONPATH": TESTS_DIR}
    rt.register(FunctionSpec("digest", "shm_handlers:digest", env=env))
    rt.register(FunctionSpec("attach-and-die", "shm_handlers:attach_and_die", env=env, retries=0))
    rt.register(FunctionSpec("lease-and-wait", "shm_handlers:lease_and_wait", env=env))
    yield rt
    rt.close()


def test_size_classes_cover_requests_with_bounded_slack() -> None:
    previous = 0
    for n in [1, 4096, 65536, 65537, 100_000, 1 << 20, (1 << 20) + 1, 3 << 20, 400 << 20, 10**9]:
        size = size_class(n)
        assert n <= size <= max(65536, int(n * 1.25) + 1)
        assert size % 4096 == 0 and size >= previous
        previous = size


def test_ref_round_trips_and_rejects_foreign_names() -> None:
    ref = ShmRef("strato-123-abcd-7", 16, 1024)
    assert ShmRef.from_dict(ref.to_dict()) == ref
    assert ref.sub(8, 100) == ShmRef("strato-123-abcd-7", 24, 100)
    with pytest.raises(ShmError):
        ref.sub(1000, 100)
    for bad in (
        {"shm": "../../etc/passwd", "offset": 0, "nbytes": 1},
        {"shm": "strato-1-ab-1", "offset": -1, "nbytes": 1},
        {"offset": 0, "nbytes": 1},
    ):
        with pytest.raises(ShmError):
            ShmRef.from_dict(bad)


def test_attach_in_the_owner_aliases_the_lease(pool: ShmPool) -> None:
    with pool.lease(10_000) as lease:
        lease.buffer[:5] = b"hello"
        view = attach(lease.to_dict())
        assert bytes(view[:5]) == b"hello"
        view[5:10] = b"world"
        assert bytes(lease.buffer[:10]) == b"helloworld"
        with pytest.raises(ShmError):
            attach(ShmRef(lease.ref.name, 0, 10**9))  # past the end of the segment
        del view


def test_released_segments_are_reused(pool: ShmPool) -> None:
    first = pool.lease(3 << 20)
    name = first.ref.name
    first.release()
    second = pool.lease((3 << 20) - 100)  # same size class
    assert second.ref.name == name and pool.created == 1
    third = pool.lease(3 << 20)  # the pooled one is taken: a new segment
    assert third.ref.name != name and pool.created == 2
    other_class = pool.lease(10 << 20)
    assert other_class.ref.name not in (name, third.ref.name)
    for lease in (second, third, other_class):
        lease.release()


def test_refcount_returns_the_segment_only_at_zero(pool: ShmPool) -> None:
    lease = pool.lease(1000)
    assert lease.retain() is lease and lease.refcount == 2
    lease.release()
    assert lease.refcount == 1
    lease.buffer[0] = 1  # still ours
    busy = pool.lease(1000)
    assert busy.ref.name != lease.ref.name
    lease.release()
    with pytest.raises(ShmError):
        _ = lease.buffer
    with pytest.raises(ShmError):
        lease.release()
    with pytest.raises(ShmError):
        lease.retain()
    assert pool.lease(1000).ref.name == lease.ref.name  # back in the pool


def test_idle_cap_unlinks_instead_of_pooling() -> None:
    with ShmPool(max_idle_bytes=0) as pool:
        lease = pool.lease(1000)
        name = lease.ref.name
        assert exists(name)
        lease.release()
        assert not exists(name)


def test_close_unlinks_everything_and_refuses_new_leases() -> None:
    pool = ShmPool()
    leased = pool.lease(1 << 20)
    idle = pool.lease(5000)
    idle.release()
    names = pool.segment_names
    assert len(names) == 2 and all(exists(n) for n in names)
    pool.close()
    assert not any(exists(n) for n in names)
    assert pool.segment_names == []
    with pytest.raises(ShmError):
        pool.lease(10)
    with pytest.raises(ShmError):
        attach(leased.ref)  # its owner closed it
    pool.close()  # idempotent


def test_zero_copy_hand_off_to_a_worker(pool: ShmPool, runtime: ProcessRuntime) -> None:
    n = 16 << 20
    data = np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8)
    with pool.lease(n) as inp, pool.lease(n) as out:
        np.frombuffer(inp.buffer, np.uint8)[:] = data
        result = runtime.invoke(
            "digest", {"input": inp.to_dict(), "output": out.to_dict(), "fill": 7}
        )
        assert result["nbytes"] == n
        assert result["sha256"] == hashlib.sha256(data.tobytes()).hexdigest()
        # The worker wrote through its mapping; we see it without any transfer back.
        assert np.all(np.frombuffer(out.buffer, np.uint8) == 7)
        # A second invocation on the warm worker sees new contents in the same segment.
        np.frombuffer(inp.buffer, np.uint8)[:] = 1
        again = runtime.invoke(
            "digest", {"input": inp.to_dict(), "output": out.to_dict(), "fill": 9}
        )
        assert again["pid"] == result["pid"]
        assert again["sha256"] == hashlib.sha256(b"\x01" * n).hexdigest()
        assert np.all(np.frombuffer(out.buffer, np.uint8) == 9)


def wait_for_text(path: Path, timeout_s: float = 30.0) -> str:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} was never written"
        time.sleep(0.02)
    return path.read_text()


def test_a_worker_killed_at_close_leaves_no_segments(
    runtime: ProcessRuntime, tmp_path: Path
) -> None:
    # The worker owns a pool (as the FL aggregator does) and is busy when the runtime
    # closes: it is SIGKILLed and cannot unlink its segments; the runtime does.
    name_file = tmp_path / "name"
    future = runtime.invoke_async("lease-and-wait", {"name_file": str(name_file), "seconds": 60})
    name = wait_for_text(name_file)
    assert exists(name)
    runtime.close()
    with pytest.raises(StratoError):
        future.result(timeout=30)
    assert not exists(name)


def test_worker_crash_neither_leaks_nor_destroys_segments(
    pool: ShmPool, runtime: ProcessRuntime
) -> None:
    lease = pool.lease(1 << 20)
    lease.buffer[0] = 0
    with pytest.raises(WorkerCrashed):
        runtime.invoke("attach-and-die", {"input": lease.to_dict()})
    assert exists(lease.ref.name)  # the owner still has it
    assert lease.buffer[0] == 0xAB  # the dead worker's write landed in shared memory
    name = lease.ref.name
    lease.release()
    pool.close()
    assert not exists(name)


OWNER_SCRIPT = textwrap.dedent(
    """
    import signal, sys, time
    from strato.services.shm import ShmPool
    if sys.argv[1] == "dfl":
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    pool = ShmPool()
    leases = [pool.lease(1 << 20), pool.lease(100)]
    idle = pool.lease(5000)
    idle.release()
    print(" ".join(pool.segment_names), flush=True)
    time.sleep(60)
    """
)


def start_owner(mode: str = "default") -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", OWNER_SCRIPT, mode],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    names = proc.stdout.readline().split()
    assert len(names) == 3 and all(exists(n) for n in names), proc.stderr
    return proc, names


@pytest.mark.parametrize(
    ("signum", "mode"),
    [
        (signal.SIGINT, "default"),  # KeyboardInterrupt, then atexit
        (signal.SIGINT, "dfl"),  # the process would die on the spot: the handler cleans up
        (signal.SIGTERM, "default"),
        (signal.SIGHUP, "default"),
    ],
)
def test_owner_killed_by_a_signal_leaves_nothing(signum: int, mode: str) -> None:
    proc, names = start_owner(mode)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert not [n for n in names if exists(n)], err


# The signal lands inside a lease: the segment's file exists, its pool does not know
# it yet (os.posix_fallocate runs between the two). The hook sends it there, every time.
MID_LEASE_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from strato.services.shm import ShmPool
    signum = int(sys.argv[1])
    if sys.argv[2] == "dfl":
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    pool = ShmPool()
    fallocate = os.posix_fallocate
    def fallocate_then_signal(fd, offset, size):
        fallocate(fd, offset, size)
        print(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")), flush=True)
        os.kill(os.getpid(), signum)
    os.posix_fallocate = fallocate_then_signal
    pool.lease(100)
    """
)

# The main thread cannot take the signal (it blocks it, so the kernel hands it to
# another thread) and sleeps: Python runs the handler only when the main thread gets
# back to Python code. A signal landing just before a blocking call is in the same
# state; this makes that state certain.
BLOCKED_MAIN_SCRIPT = textwrap.dedent(
    """
    import signal, sys, time
    from strato.services.shm import ShmPool
    signum = int(sys.argv[1])
    if sys.argv[2] == "dfl":
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    pool = ShmPool()
    lease = pool.lease(100)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signum})
    print(lease.ref.name, flush=True)
    time.sleep(120)
    """
)

SIGNAL_MODES = [
    (signal.SIGINT, "default"),  # KeyboardInterrupt, then atexit
    (signal.SIGINT, "dfl"),
    (signal.SIGTERM, "default"),
]


def wait_until_asleep(pid: int, timeout_s: float = 30.0) -> None:
    """Wait for the main thread of ``pid`` to block (here: in the script's last sleep)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/task/{pid}/stat", "rb") as f:
            if f.read().rpartition(b")")[2].split()[0] == b"S":
                return
        time.sleep(0.01)
    raise AssertionError(f"the main thread of {pid} never blocked")


def run_owner(script: str, signum: int, mode: str, *, send: bool) -> tuple[int, str, str]:
    """Start an owner script, read the segment name it prints, let it finish (sending
    it ``signum`` if ``send``); return its exit status, the name and its stderr."""
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(int(signum)), mode],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    name = proc.stdout.readline().strip()
    if send:
        wait_until_asleep(proc.pid)
        proc.send_signal(signum)
    try:
        _, err = proc.communicate(timeout=60)  # far below the script's own sleep
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"the owner did not act on the signal: {err}") from None
    return proc.returncode, name, err


@pytest.mark.parametrize(("signum", "mode"), SIGNAL_MODES)
def test_a_signal_in_the_middle_of_a_lease_leaves_nothing(signum: int, mode: str) -> None:
    code, name, err = run_owner(MID_LEASE_SCRIPT, signum, mode, send=False)
    assert name.startswith("strato-"), err
    assert code != 0
    assert not exists(name), err


@pytest.mark.parametrize(("signum", "mode"), SIGNAL_MODES)
def test_a_signal_the_main_thread_cannot_take_yet_is_acted_on(signum: int, mode: str) -> None:
    code, name, err = run_owner(BLOCKED_MAIN_SCRIPT, signum, mode, send=True)
    assert code != 0
    assert not exists(name), err


def test_sweep_removes_the_segments_of_a_sigkilled_owner() -> None:
    proc, names = start_owner()
    proc.kill()
    proc.communicate(timeout=30)
    assert all(exists(n) for n in names)  # SIGKILL leaves no chance to clean up
    assert set(names) <= set(sweep_orphans())
    assert not any(exists(n) for n in names)


def test_a_new_pool_sweeps_orphans_but_not_live_owners(pool: ShmPool) -> None:
    mine = pool.lease(100)
    dead, dead_names = start_owner()
    dead.kill()
    dead.communicate(timeout=30)
    alive, alive_names = start_owner()
    try:
        ShmPool().close()
        assert not any(exists(n) for n in dead_names)
        assert all(exists(n) for n in alive_names)
        assert exists(mine.ref.name)
    finally:
        alive.terminate()
        alive.communicate(timeout=30)
    assert not any(exists(n) for n in alive_names)
    mine.release()


def test_a_hang_up_ignored_by_the_parent_stays_ignored() -> None:
    """Under nohup SIGHUP arrives ignored: the pool must not turn it into a kill."""
    script = textwrap.dedent(
        """
        import os, signal
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        from strato.services.shm import ShmPool
        pool = ShmPool()
        lease = pool.lease(100)
        os.kill(os.getpid(), signal.SIGHUP)
        print(signal.getsignal(signal.SIGHUP) == signal.SIG_IGN, pool.segment_names, flush=True)
        lease.release()
        pool.close()
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("True ['strato-"), proc.stdout
