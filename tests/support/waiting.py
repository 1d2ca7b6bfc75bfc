"""Waiting for a condition instead of sleeping (STYLE §7)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable


def wait_for(predicate: Callable[[], object], timeout: float, what: str = "condition",
             interval: float = 0.02) -> object:
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        time.sleep(interval)


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


def stop_started(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """End a child process we started: SIGTERM, then SIGKILL after `timeout` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
