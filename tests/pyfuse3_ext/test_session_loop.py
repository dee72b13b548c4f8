"""pyfuse3's session-loop promises, through real requests (stock and patched alike).

The session-loop patch (patches/pyfuse3/0002-*) reads requests from a
non-blocking fd and runs handlers inline until one suspends; these tests hold
it to what ``pyfuse3.main(min_tasks, max_tasks)`` promised before: a handler
that awaits does not hold up other requests (interrupted or not), at most
*max_tasks* handlers run at once, and an unmount, ``terminate()`` and an
escaping exception end the loop. loopfs.py is the filesystem; its statvfs
reports how many handlers are suspended.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import hellofs
import pyfuse3
import pytest

LOOPFS = Path(__file__).with_name("loopfs.py")
TIMEOUT = 15.0

pytestmark = pytest.mark.fuse


class Loop:
    """A loopfs daemon mounted at *mountpoint*."""

    def __init__(self, tmp: Path, *args: str) -> None:
        self.mountpoint = tmp / "mnt"
        self.mountpoint.mkdir(parents=True)
        self.log_path = tmp / "loopfs.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, str(LOOPFS), str(self.mountpoint), *args],
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + TIMEOUT
        while not os.path.ismount(self.mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"loopfs did not mount:\n{self.log()}")
            time.sleep(0.01)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def statvfs(self) -> tuple[int, int]:
        """(handlers suspended now, most ever suspended at once)."""
        st = os.statvfs(self.mountpoint)
        return st.f_files, st.f_ffree

    def wait_suspended(self, n: int) -> None:
        deadline = time.monotonic() + TIMEOUT
        while self.statvfs()[0] != n:
            assert time.monotonic() < deadline, f"never {n} handlers suspended: {self.statvfs()}"
            time.sleep(0.005)

    def wait_exit(self) -> int:
        try:
            return self.proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"loopfs did not exit:\n{self.log()}")

    def stop(self) -> None:
        subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def loop_factory(tmp_path: Path) -> Iterator[type[Loop]]:
    mounts: list[Loop] = []

    class Tracked(Loop):
        def __init__(self, *args: str) -> None:
            super().__init__(tmp_path / f"m{len(mounts)}", *args)
            mounts.append(self)

    yield Tracked
    for m in mounts:
        m.stop()


def _readers(mnt: Loop, n: int) -> tuple[list[threading.Thread], dict[int, bytes | BaseException]]:
    """*n* threads, each reading its own file (its handler suspends until released)."""
    results: dict[int, bytes | BaseException] = {}

    def read(i: int) -> None:
        try:
            results[i] = (mnt.mountpoint / f"w{i}").read_bytes()
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    return threads, results


def _join(threads: list[threading.Thread]) -> None:
    for t in threads:
        t.join(TIMEOUT)
        assert not t.is_alive(), "a read did not return"


def _expected(i: int) -> bytes:
    return b"data of %d\n" % (pyfuse3.ROOT_INODE + 1 + i)


def test_suspended_handlers_do_not_hold_up_others_and_unmount_ends_main(loop_factory: type[Loop]) -> None:
    mnt = loop_factory("--min-tasks", "2", "--max-tasks", "8")
    threads, results = _readers(mnt, 5)
    mnt.wait_suspended(5)

    # With five handlers suspended, parallel requests are still served, back to back.
    seen: list[tuple[int, int]] = []

    def burst() -> None:
        seen.extend(mnt.statvfs() for _ in range(300))

    bursts = [threading.Thread(target=burst) for _ in range(4)]
    for t in bursts:
        t.start()
    _join(bursts)
    assert set(seen) == {(5, 5)}

    # An interrupted read (the kernel sends INTERRUPT, pyfuse3 lets the handler finish)
    # neither ends its handler nor stops the loop. The signal is delivered once the
    # read returns, so the handler stays installed until then.
    old = signal.signal(signal.SIGUSR1, lambda *_: None)
    try:
        assert threads[0].ident is not None
        signal.pthread_kill(threads[0].ident, signal.SIGUSR1)
        time.sleep(0.05)
        assert mnt.statvfs()[0] == 5
        assert not os.path.exists(mnt.mountpoint / "release")  # wakes every suspended read
        _join(threads)
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert results == {i: _expected(i) for i in range(5)}
    assert mnt.statvfs() == (0, 5)

    # Idle tasks are parked now; an unmount ends main() all the same.
    subprocess.run(["fusermount3", "-u", str(mnt.mountpoint)], check=True, timeout=TIMEOUT)
    assert mnt.wait_exit() == 0, mnt.log()
    assert "exiting cleanly" in mnt.log()


def test_max_tasks_bounds_suspended_handlers_and_terminate_ends_main(loop_factory: type[Loop]) -> None:
    mnt = loop_factory("--min-tasks", "1", "--max-tasks", "3", "--wait", "0.3")
    start = time.monotonic()
    threads, results = _readers(mnt, 5)
    _join(threads)
    elapsed = time.monotonic() - start
    assert results == {i: _expected(i) for i in range(5)}
    assert mnt.statvfs() == (0, 3), "at most, and up to, max_tasks handlers at once"
    assert elapsed >= 0.55, f"5 reads of 0.3 s, 3 at a time, took {elapsed:.2f} s"

    mnt.proc.send_signal(signal.SIGTERM)  # loopfs calls pyfuse3.terminate()
    assert mnt.wait_exit() == 0, mnt.log()
    assert not os.path.ismount(mnt.mountpoint)
    assert "main returned" in mnt.log()


@pytest.mark.parametrize("name", ["crash", "crash-later"])
def test_escaping_exception_ends_main(loop_factory: type[Loop], name: str) -> None:
    """Not FUSEError, raised inline or after suspending: main() raises it, as pyfuse3 documents."""
    mnt = loop_factory()
    outcome: list[BaseException | None] = []

    def lookup() -> None:
        try:
            os.stat(mnt.mountpoint / name)
            outcome.append(None)
        except OSError as exc:
            outcome.append(exc)

    t = threading.Thread(target=lookup, daemon=True)
    t.start()
    assert mnt.wait_exit() != 0
    t.join(TIMEOUT)
    assert outcome and isinstance(outcome[0], OSError), outcome
    assert "RuntimeError: loopfs: crash requested" in mnt.log()


def test_patched_build_has_fast_session_loop() -> None:
    if not hellofs.has_extensions():
        pytest.skip(f"pyfuse3 {pyfuse3.__version__} is the stock build")
    assert getattr(pyfuse3, "FAST_SESSION_LOOP", 0) >= 1
