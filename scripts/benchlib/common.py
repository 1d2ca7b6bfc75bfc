"""Small helpers every part of the bench uses: sizes, timing, /proc readings, processes."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

KiB = 1 << 10
MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = ROOT / ".venv" / "bin"


class BenchError(Exception):
    """A workload could not run; the message goes into the table as the reason."""


def log(msg: str) -> None:
    print(f"bench: {msg}", flush=True)


def mib_s(nbytes: int, seconds: float) -> float:
    return nbytes / MiB / seconds if seconds > 0 else float("inf")


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100), linear between closest ranks."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * p / 100
    lo = int(rank)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (rank - lo)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def drop_caches() -> None:
    """Write back dirty pages, then drop the page cache, dentries and inodes (root only)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as exc:
        raise BenchError(f"cannot drop the page cache ({exc.strerror}): run as root") from None


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in bytes; {} once it is gone."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(rest.split()[0]) * KiB
    except OSError:
        return {}
    return out


def tree_rss(pid: int) -> int:
    """VmRSS of a process plus its children (s3fs/rclone may fork helpers)."""
    total = proc_status(pid).get("VmRSS", 0)
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    for child in children:
        total += proc_status(int(child)).get("VmRSS", 0)
    return total


class RssSampler:
    """Samples a process's VmRSS every `interval` seconds in a thread; `peak` is the max."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss(self.pid))
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def is_mounted(path: Path) -> bool:
    """Whether something is mounted at `path`, from /proc/mounts (no syscall on `path`)."""
    target = os.path.abspath(path)
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 1 and fields[1].replace("\\040", " ") == target:
                return True
    return False


def lazy_unmount(path: Path) -> None:
    if is_mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if is_mounted(path):
        subprocess.run(["umount", "-l", str(path)], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM,
                 timeout: float = 120.0) -> int:
    """Signal a process we started (by its PID), wait, SIGKILL it after `timeout`."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def stat_with_timeout(path: Path, timeout: float) -> os.stat_result | None:
    """os.stat in a thread, so a mount that never answers cannot hang the bench."""
    result: list[os.stat_result | OSError] = []

    def run() -> None:
        try:
            result.append(os.stat(path))
        except OSError as exc:
            result.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if not result:
        return None
    if isinstance(result[0], OSError):
        raise result[0]
    return result[0]


def wait_answering(path: Path, proc: subprocess.Popen[bytes], t0: float,
                   timeout: float = 60.0, log_path: Path | None = None) -> float:
    """Wait until the mount at `path` answers a stat; seconds since `t0` (monotonic).

    "Answers" means a stat of the mountpoint returns a device other than its parent's,
    i.e. the filesystem daemon itself replied.
    """
    parent_dev = os.stat(path.parent).st_dev
    deadline = t0 + timeout
    while True:
        if proc.poll() is not None:
            tail = ""
            if log_path is not None and log_path.exists():
                tail = log_path.read_text(errors="replace")[-1500:]
            raise BenchError(f"the mount exited with {proc.returncode} before answering"
                             + (f": {tail.strip().splitlines()[-1]}" if tail.strip() else ""))
        try:
            st = stat_with_timeout(path, max(0.1, deadline - time.monotonic()))
        except OSError as exc:
            if exc.errno not in (errno.ENOTCONN, errno.EIO, errno.ENOENT):
                raise
            st = None
        now = time.monotonic()
        if st is not None and st.st_dev != parent_dev:
            return now - t0
        if now > deadline:
            raise BenchError(f"the mount did not answer within {timeout:g}s")
        time.sleep(0.002)


@contextlib.contextmanager
def timer() -> Iterator[list[float]]:
    """`with timer() as t: ...` then t[0] is the elapsed seconds."""
    out: list[float] = []
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        out.append(time.perf_counter() - t0)


def run(cmd: Sequence[str], timeout: float, **kw: object) -> subprocess.CompletedProcess[str]:
    """Run a command with a deadline; BenchError with its stderr when it fails."""
    try:
        res = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                             **kw)  # type: ignore[call-overload]
    except subprocess.TimeoutExpired:
        raise BenchError(f"{cmd[0]} did not finish within {timeout:g}s") from None
    if res.returncode != 0:
        detail = (res.stderr or res.stdout).strip().splitlines()
        raise BenchError(f"{' '.join(cmd[:2])} failed ({res.returncode})"
                         + (f": {detail[-1]}" if detail else ""))
    return res
