"""Start `blobfs mount` in the foreground in a subprocess, and always take it down again.

Every daemon's log is checked (`check_daemon_log`): a traceback, a fatal error or an ERROR
line the test did not declare (`expect_errors` patterns) fails the test. `mounted` checks
when its block ends; the autouse fixture in tests/fuse/conftest.py checks again after the
test, for the daemons whose block ended with an exception or that are still to be seen.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.envs import StoreEnv
from tests.support.waiting import wait_started

MOUNT_TIMEOUT = 30.0


#: Lines that fail a test unless declared: a log record at ERROR or above, anything
#: Python prints for an uncaught exception or a fatal signal.
_BAD_LINE = re.compile(r" (ERROR|CRITICAL) |^<[0-3]>|Fatal Python error")
_TRACEBACK = "Traceback (most recent call last)"
#: Every daemon `mounted` started in this process, for the conftest fixture to check.
STARTED: list[Mount] = []


def check_daemon_log(text: str, expect_errors: Sequence[str] = (), what: str = "blobfs") -> None:
    """Fail on a traceback, a fatal error, or an ERROR line none of `expect_errors` (regular
    expressions, searched in the line) matches. A bug's traceback is never expected."""
    def expected(line: str) -> bool:
        return any(re.search(p, line) for p in expect_errors)

    bad = [line for line in text.splitlines()
           if _TRACEBACK in line or (_BAD_LINE.search(line) and not expected(line))]
    if bad:
        raise AssertionError(
            f"the {what} daemon logged {len(bad)} unexpected error line(s), first: {bad[0]!r}"
            f"\n--- log tail ---\n{text[-4000:]}")


@dataclass
class Mount:
    path: Path
    proc: subprocess.Popen[bytes]
    cache_dir: Path
    log_path: Path
    #: Regular expressions for the ERROR lines this test provokes on purpose.
    expect_errors: list[str] = field(default_factory=list)
    checked: bool = False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def expect(self, *patterns: str) -> None:
        """Declare ERROR lines this test provokes from now on."""
        self.expect_errors.extend(patterns)

    def check_log(self) -> None:
        self.checked = True
        check_daemon_log(self.log(), self.expect_errors, f"blobfs ({self.path.name})")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Ask the daemon to finish (commit and unmount) and wait for it; its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        _lazy_unmount(self.path)
        return self.proc.returncode

    def kill9(self) -> None:
        """Simulate a crash: SIGKILL, then clear the dead mountpoint."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        _lazy_unmount(self.path)


def _lazy_unmount(path: Path) -> None:
    if _is_mount(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _is_mount(path: Path) -> bool:
    # No stat: a dead mount answers ENOTCONN to it.
    target = os.path.abspath(path)
    with open("/proc/mounts") as f:
        return any(line.split()[1] == target for line in f)


def _dead(path: Path) -> bool:
    """A mount left by a killed daemon, still in the table until the next start clears it.
    statfs always reaches the daemon, where a stat may be served from cached attributes."""
    try:
        os.statvfs(path)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def blobfs_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "blobfs", *args]


def mount_env(env: StoreEnv) -> dict[str, str]:
    out = dict(os.environ)
    out.update(env.env)
    out.setdefault("PYTHONUNBUFFERED", "1")
    return out


@contextmanager
def mounted(
    env: StoreEnv,
    base: Path,
    *options: str,
    name: str = "mnt",
    cache_dir: Path | None = None,
    expect_errors: Sequence[str] = (),
    allow_errors: bool = False,
    args: tuple[str, ...] = (),
) -> Iterator[Mount]:
    """Mount `env` at base/name in a foreground daemon; yield once it answers.

    `args` are extra command-line arguments (`--debug`).

    Whatever happens in the body, the daemon is stopped and the mountpoint unmounted.
    A traceback, or an ERROR line that matches none of the `expect_errors` regular
    expressions, in the daemon's log fails the test. `allow_errors` (older spelling)
    expects any ERROR line; a traceback still fails.
    """
    path = base / name
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        # A dead mount left there (ENOTCONN) is blobfs's to clear at start (semantics §5).
        if exc.errno != errno.ENOTCONN:
            raise
    cache_dir = cache_dir or base / f"{name}-cache"
    log_path = base / f"{name}.log"
    opts = [f"cache_dir={cache_dir}", *env.options, *options]
    cmd = blobfs_cmd("mount", env.url, str(path), "-f", "-o", ",".join(opts), *args)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, env=mount_env(env), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    mnt = Mount(path, proc, cache_dir, log_path,
                [*expect_errors, *([".*"] if allow_errors else [])])
    STARTED.append(mnt)
    try:
        wait_started(proc, lambda: _is_mount(path) and not _dead(path), "blobfs",
                     MOUNT_TIMEOUT, mnt.log)
        yield mnt
    finally:
        mnt.stop()
    mnt.check_log()
