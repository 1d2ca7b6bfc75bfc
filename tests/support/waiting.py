"""Waiting for a condition instead of sleeping (STYLE §7), and the lifecycle of the
processes tests start.

A test that waits for something polls it here (`wait_for`, or `wait_until` in trio code;
`read_until` for bytes arriving on an open file; `pread_is_stale` as the poll of a replaced
blob's handle), so a timeout fails with what was awaited. A `sleep` left in a test lets time
pass on purpose (a commit_interval that must elapse, a period in which nothing may happen,
a writer's pace) and says so. Servers and daemons are started with `wait_started` and ended
by PID (`stop_started`, `stop_pid`), never by name.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import inspect
import os
import signal
import subprocess
import time
from collections.abc import Callable
from typing import BinaryIO

import trio


def wait_for(predicate: Callable[[], object], timeout: float,
             what: str | Callable[[], str] = "condition", interval: float = 0.02) -> object:
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds.

    `what` names the condition in the failure; a callable is asked at the failure, so the
    message can say how far things got.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            said = what() if callable(what) else what
            raise AssertionError(f"{said} not met within {timeout}s")
        time.sleep(interval)


async def wait_until(predicate: Callable[[], object], timeout: float,
                     what: str | Callable[[], str] = "condition",
                     interval: float = 0.01) -> object:
    """`wait_for` for trio tests: the predicate may be async (return an awaitable), the polls
    sleep on trio's clock, and a predicate that hangs is cut off at `timeout` too."""
    with trio.move_on_after(timeout):
        while True:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return value
            await trio.sleep(interval)
    said = what() if callable(what) else what
    raise AssertionError(f"{said} not met within {timeout}s")


def pread_is_stale(fd: int, size: int, off: int) -> bool:
    """A poll of a handle whose blob was replaced: True once a pread fails with ESTALE,
    False while it still reads; any other error fails the test."""
    try:
        os.pread(fd, size, off)
    except OSError as exc:
        assert exc.errno == errno.ESTALE, exc
        return True
    return False


def read_until(f: BinaryIO, want: int, timeout: float) -> bytes:
    """Read `want` more bytes from the open file `f` as they arrive (like tail -f); fail on
    any read error (ESTALE, ...) or if they do not all come within `timeout` seconds."""
    got = bytearray()

    def more() -> bool:
        try:
            chunk = f.read(want - len(got))
        except OSError as exc:
            raise AssertionError(f"the open handle failed after {len(got)} new bytes: "
                                 f"{errno.errorcode.get(exc.errno or 0, exc)}") from None
        got.extend(chunk or b"")
        return len(got) >= want

    wait_for(more, timeout, lambda: f"{want} new bytes (only {len(got)} came)", interval=0.1)
    return bytes(got)


def http_answers(port: int, path: str = "/") -> bool:
    """Whether a server on 127.0.0.1:`port` answers a GET of `path` (below 500): a poll
    for `wait_started`."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", path)
        return conn.getresponse().status < 500
    except OSError:
        return False
    finally:
        conn.close()


def wait_started(proc: subprocess.Popen[bytes], ready: Callable[[], object], what: str,
                 timeout: float, log: Callable[[], str]) -> None:
    """Wait until a child process we started answers; fail with its log if it exits first
    or does not answer within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer within {timeout}s:\n{log()}")
        time.sleep(0.02)


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for its parent to reap it does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def stop_pid(pid: int, timeout: float = 30.0) -> None:
    """End a process we started, by PID: SIGTERM, then SIGKILL after `timeout` seconds;
    reap it if it is our child."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        if not alive(pid):
            break
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def stop_started(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """End a child process we started: SIGTERM, then SIGKILL after `timeout` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
