"""Start `blobfs mount` in the foreground in a subprocess, and always take it down again."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.envs import StoreEnv
from tests.support.waiting import wait_started

MOUNT_TIMEOUT = 30.0


@dataclass
class Mount:
    path: Path
    proc: subprocess.Popen[bytes]
    cache_dir: Path
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

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
    allow_errors: bool = False,
    args: tuple[str, ...] = (),
) -> Iterator[Mount]:
    """Mount `env` at base/name in a foreground daemon; yield once it answers.

    `args` are extra command-line arguments (`--debug`).

    Whatever happens in the body, the daemon is stopped and the mountpoint unmounted.
    A traceback or an ERROR line in the daemon's log fails the test unless
    `allow_errors` says the test provokes them.
    """
    path = base / name
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        # A dead mount left there (ENOTCONN) is blobfs's to clear at start (SPEC §5).
        if exc.errno != errno.ENOTCONN:
            raise
    cache_dir = cache_dir or base / f"{name}-cache"
    log_path = base / f"{name}.log"
    opts = [f"cache_dir={cache_dir}", *env.options, *options]
    cmd = blobfs_cmd("mount", env.url, str(path), "-f", "-o", ",".join(opts), *args)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, env=mount_env(env), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    mnt = Mount(path, proc, cache_dir, log_path)
    try:
        wait_started(proc, lambda: _is_mount(path) and not _dead(path), "blobfs",
                     MOUNT_TIMEOUT, mnt.log)
        yield mnt
    finally:
        mnt.stop()
    text = mnt.log()
    if "Traceback" in text or (not allow_errors and " ERROR " in text):
        raise AssertionError(f"the blobfs daemon logged errors:\n{text[-4000:]}")
