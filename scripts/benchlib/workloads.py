"""The workloads: each takes (ctx, target, backend) and returns a dict of figures, or
raises BenchError with the reason it could not run (which goes into the table).

All of them are bounded in time and leave nothing mounted behind.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchlib.common import (
    VENV_BIN,
    BenchError,
    MiB,
    RssSampler,
    drop_caches,
    log,
    median,
    mib_s,
    percentile,
    proc_status,
    run,
    stop_process,
    tree_rss,
)
from benchlib.stores import Backend
from benchlib.targets import Mounted, Target

_DD_BYTES = re.compile(rb"^(\d+) bytes", re.M)


@dataclass
class Sizes:
    seq_mib: int = 256
    base_mib: int = 64
    appends: int = 1000
    tail_lines: int = 60
    tail_interval: float = 0.1
    ready_runs: int = 5
    writers: int = 100
    writer_mib: int = 9
    idle_wait: float = 3.0
    #: The append loop stops after this many seconds (moto copies the whole object in
    #: Python on every S3 commit: ~0.5 s per append onto 64 MiB).
    append_budget: float = 400.0


@dataclass
class Ctx:
    work: Path
    src: Path
    base_src: Path
    sizes: Sizes
    profile_dir: Path | None = None
    #: pid of each store's server process, for its CPU time during a workload.
    server_pids: dict[str, int] = field(default_factory=dict)

    def mnt(self, label: str) -> Path:
        return self.work / "mnt" / label


# --- CPU time and profiles ----------------------------------------------------------------
def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds a process (all its threads) used so far."""
    if not pid:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


class CpuMeter:
    """CPU seconds used by the mount daemon and the store's server across a block."""

    def __init__(self, daemon: int, server: int | None) -> None:
        self.daemon, self.server = daemon, server
        self.result: dict[str, float] = {}

    def __enter__(self) -> CpuMeter:
        self._d0, self._s0 = cpu_seconds(self.daemon), cpu_seconds(self.server)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._t0
        d = cpu_seconds(self.daemon) - self._d0
        self.result = {"daemon_cpu_s": round(d, 2), "wall_s": round(wall, 3),
                       "daemon_cores": round(d / wall, 2) if wall else 0.0}
        if self.server:
            s = cpu_seconds(self.server) - self._s0
            self.result.update(server_cpu_s=round(s, 2),
                               server_cores=round(s / wall, 2) if wall else 0.0)


@contextlib.contextmanager
def profiled(ctx: Ctx, m: Mounted, label: str) -> Iterator[None]:
    """Sample the blobfs daemon with py-spy while the block runs (only with --profile)."""
    spy = VENV_BIN / "py-spy"
    if ctx.profile_dir is None or m.target.name != "blobfs" or not spy.exists():
        yield
        return
    ctx.profile_dir.mkdir(parents=True, exist_ok=True)
    out = ctx.profile_dir / f"{label}.collapsed"
    proc = subprocess.Popen([str(spy), "record", "--pid", str(m.pid), "--rate", "200",
                             "--format", "raw", "--threads", "--nonblocking",
                             "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # attached
    try:
        yield
    finally:
        stop_process(proc, signal.SIGINT, timeout=30)  # SIGINT: py-spy writes its output
        if out.exists():  # kept small: the report reads it compressed
            Path(f"{out}.gz").write_bytes(gzip.compress(out.read_bytes()))
            out.unlink()


@contextlib.contextmanager
def explained(m: Mounted) -> Iterator[None]:
    """Add the daemon's last error line to a workload failure."""
    try:
        yield
    except BenchError as exc:
        err = m.last_error()
        if err and err not in str(exc):
            raise BenchError(f"{exc} [its log: {err}]") from None
        raise


# --- sequential write and read ------------------------------------------------------------
def _dd(args: list[str], timeout: float) -> int:
    res = run(["dd", *args, "bs=1M"], timeout)
    found = _DD_BYTES.search(res.stderr.encode())
    return int(found.group(1)) if found else -1


def _repeats(backend: Backend) -> int:
    """Runs of a throughput figure (the best counts): 3 on file://, whose runs take a
    second and vary with the VM's disk cache; 1 on the servers, whose runs take longer."""
    return 1 if backend.network else 3


def _best(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    best = dict(max(runs, key=lambda r: r[key]))
    if len(runs) > 1:
        best["runs_mib_s"] = [r[key] for r in runs]
    return best


def seq_write(ctx: Ctx, target: Target, backend: Backend) -> dict[str, Any]:
    return _best([_seq_write_once(ctx, target, backend) for _ in range(_repeats(backend))],
                 "mib_s")


def seq_read(ctx: Ctx, target: Target, backend: Backend) -> dict[str, Any]:
    return _best([_seq_read_once(ctx, target, backend) for _ in range(_repeats(backend))],
                 "mib_s")


def _seq_write_once(ctx: Ctx, target: Target, backend: Backend) -> dict[str, Any]:
    """dd bs=1M of the source through a fresh mount; close included, then until the store
    holds every byte (a peer that uploads after close is timed to the upload's end)."""
    size = ctx.sizes.seq_mib * MiB
    name = f"seq-{target.name}.bin"
    backend.delete(name)
    with target.mount(backend, ctx.mnt("write"), ctx.work, label="write") as m, \
            explained(m), profiled(ctx, m, f"{backend.kind}-write"), \
            CpuMeter(m.pid, ctx.server_pids.get(backend.kind)) as cpu:
        t0 = time.perf_counter()
        _dd([f"if={ctx.src}", f"of={m.path / name}", f"count={ctx.sizes.seq_mib}"], 900)
        closed = time.perf_counter() - t0
        backend.wait_size(name, size, timeout=600)
        remote = time.perf_counter() - t0
    return {"seconds": round(remote, 3), "close_seconds": round(closed, 3),
            "mib_s": round(mib_s(size, remote), 1), **cpu.result}


def _seq_read_once(ctx: Ctx, target: Target, backend: Backend) -> dict[str, Any]:
    """dd bs=1M from a fresh mount (cold blobfs cache) with the page cache dropped."""
    size = ctx.sizes.seq_mib * MiB
    name = f"seq-{target.name}.bin"
    if backend.size(name) != size:
        backend.put(name, ctx.src)
    with target.mount(backend, ctx.mnt("read"), ctx.work, label="read") as m, explained(m):
        drop_caches()
        with profiled(ctx, m, f"{backend.kind}-read"), \
                CpuMeter(m.pid, ctx.server_pids.get(backend.kind)) as cpu:
            t0 = time.perf_counter()
            got = _dd([f"if={m.path / name}", "of=/dev/null"], 900)
            took = time.perf_counter() - t0
    if got != size:
        raise BenchError(f"read {got} bytes, expected {size}")
    return {"seconds": round(took, 3), "mib_s": round(mib_s(size, took), 1), **cpu.result}


# --- appends -------------------------------------------------------------------------------
def appends(ctx: Ctx, target: Target, backend: Backend, proxy: Any | None) -> dict[str, Any]:
    """open-append-close of a short line, `appends` times, onto a `base_mib` blob.

    With a proxy (network stores) the mount talks to it, so every request and uploaded
    byte is counted. The loop stops early (and says so) after `budget` seconds.
    """
    n = ctx.sizes.appends
    base = ctx.sizes.base_mib * MiB
    name = f"app-{target.name}.log"
    backend.put(name, ctx.base_src)
    endpoint = backend.proxy_endpoint(proxy.url) if proxy is not None else None
    budget = ctx.sizes.append_budget
    lat: list[float] = []
    #: (line bytes, bytes uploaded, write requests) of each open-append-close.
    steps: list[tuple[int, int, int]] = []
    appended = 0
    with target.mount(backend, ctx.mnt("append"), ctx.work, endpoint=endpoint,
                      label="append") as m, explained(m):
        path = m.path / name
        _wait_visible(path, 30)
        if proxy is not None:
            proxy.reset()
        with profiled(ctx, m, f"{backend.kind}-append"), \
                CpuMeter(m.pid, ctx.server_pids.get(backend.kind)) as cpu:
            t0 = time.perf_counter()
            for i in range(n):
                line = b"%06d %.6f an application log line %s\n" % (i, time.time(),
                                                                    b"." * (i % 23))
                t1 = time.perf_counter()
                try:
                    with open(path, "ab") as f:
                        f.write(line)
                except OSError as exc:
                    if i == 0:
                        raise BenchError(f"cannot append: open(O_APPEND)/write/close fails "
                                         f"with {errno.errorcode.get(exc.errno or 0, exc)}"
                                         ) from None
                    raise BenchError(f"append {i} failed: {exc}") from None
                lat.append(time.perf_counter() - t1)
                appended += len(line)
                if proxy is not None:
                    now = proxy.stats()
                    steps.append((len(line), now["bytes_up"], now["write_requests"]))
                if time.perf_counter() - t0 > budget:
                    break
            wall = time.perf_counter() - t0
            # A peer may upload after close returned: the cost counts until the store has it.
            backend.wait_size(name, base + appended, timeout=300)
            remote = time.perf_counter() - t0
    done = len(lat)
    out: dict[str, Any] = {
        "appends": done, "appended_bytes": appended, "wall_s": round(wall, 2),
        "remote_s": round(remote, 2), "per_append_ms_p50": round(percentile(lat, 50) * 1e3, 1),
        "per_append_ms_p99": round(percentile(lat, 99) * 1e3, 1), **cpu.result,
    }
    if done < n:
        out["cut_short"] = f"stopped after {done} of {n} appends ({budget:g}s budget)"
    if proxy is not None:
        stats = proxy.stats()
        out.update(requests=stats["requests"], write_requests=stats["write_requests"],
                   bytes_up=stats["bytes_up"], by_method=stats["by_method"],
                   overhead_per_append=round((stats["bytes_up"] - appended) / done, 1),
                   write_requests_per_append=round(stats["write_requests"] / done, 2),
                   requests_per_append=round(stats["requests"] / done, 2))
        # Per open-append-close: what it uploaded beyond its line, and its write requests.
        extra, writes, prev_b, prev_w = [], [], 0, 0
        for size, b, w in steps:
            extra.append(b - prev_b - size)
            writes.append(w - prev_w)
            prev_b, prev_w = b, w
        if extra:
            steady = extra[1:] or extra
            out.update(first_append_extra_bytes=extra[0],
                       max_extra_bytes_after_first=max(steady),
                       mean_extra_bytes_after_first=round(sum(steady) / len(steady), 1),
                       appends_over_4k_extra=sum(1 for e in extra if e > 4096),
                       max_write_requests_per_append=max(writes))
    return out


def _wait_visible(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise BenchError(f"{path.name} did not appear in the mount within {timeout:g}s")
        time.sleep(0.1)


# --- the live log and tail -f --------------------------------------------------------------
def live_tail(ctx: Ctx, target: Target, backend: Backend) -> dict[str, Any]:
    """A writer holds the file open on mount A and writes a timestamped line every
    `tail_interval`; GNU `tail -f` follows it on mount B. Latency = arrival - write time.

    The file is created (one header line, closed) before tail starts, so every system
    has it remotely; the writer then reopens it for appending and keeps it open.
    """
    n = ctx.sizes.tail_lines
    name = f"live-{target.name}.log"
    backend.delete(name)
    arrivals: dict[int, tuple[float, float]] = {}
    seen_open = 0
    closed_at: float | None = None
    with target.mount(backend, ctx.mnt("live-a"), ctx.work, label="live-a") as a, \
            target.mount(backend, ctx.mnt("live-b"), ctx.work, label="live-b") as b, \
            explained(a):
        with open(a.path / name, "w") as f:
            f.write("header: the writer starts\n")
        try:
            _wait_visible(b.path / name, 30)
        except BenchError as exc:
            raise BenchError(f"the file never showed up on the second mount: {exc}") from None
        tail = subprocess.Popen(["tail", "-n", "+1", "-f", str(b.path / name)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        reader = threading.Thread(target=_read_tail, args=(tail, arrivals), daemon=True)
        reader.start()
        try:
            try:
                writer = open(a.path / name, "a", buffering=1)  # noqa: SIM115
            except OSError as exc:
                raise BenchError("the writer cannot open the file for appending: "
                                 f"{errno.errorcode.get(exc.errno or 0, exc)}") from None
            try:
                t_start = time.monotonic()
                for i in range(n):
                    _sleep_until(t_start + i * ctx.sizes.tail_interval)
                    writer.write(f"{i} {time.time():.6f} a live log line\n")
                _wait_lines(arrivals, n, 15.0)
                seen_open = len(arrivals)
            except OSError as exc:
                raise BenchError(f"the writer's write failed: {exc}") from None
            finally:
                with contextlib.suppress(OSError):
                    writer.close()
                closed_at = time.time()
            if seen_open < n:
                _wait_lines(arrivals, n, 15.0)
        finally:
            tail.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                tail.wait(5)
            if tail.poll() is None:
                tail.kill()
                tail.wait()
            reader.join(5)
    lat = [arr - ts for arr, ts in arrivals.values()]
    out: dict[str, Any] = {"lines": n, "seen_while_open": seen_open, "seen": len(arrivals)}
    open_lat = [arr - ts for arr, ts in arrivals.values() if closed_at is None or arr < closed_at]
    if seen_open >= 30:
        out.update(p50_s=round(percentile(open_lat, 50), 3),
                   p99_s=round(percentile(open_lat, 99), 3), max_s=round(max(open_lat), 3))
    else:
        after = len(arrivals) - seen_open
        raise BenchError(
            f"tail -f saw {seen_open} of {n} lines while the writer held the file open "
            f"(15 s grace)" + (f"; {after} more appeared after close" if after else "")
            + (f"; p50 {percentile(lat, 50):.1f}s counting those" if len(lat) >= 30 else ""))
    return out


def _sleep_until(t: float) -> None:
    delay = t - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def _wait_lines(arrivals: dict[int, tuple[float, float]], n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while len(arrivals) < n and time.monotonic() < deadline:
        time.sleep(0.05)


def _read_tail(tail: subprocess.Popen[bytes], arrivals: dict[int, tuple[float, float]]) -> None:
    assert tail.stdout is not None
    for raw in tail.stdout:
        now = time.time()
        parts = raw.split()
        if len(parts) >= 2 and parts[0].isdigit():
            with contextlib.suppress(ValueError):
                arrivals.setdefault(int(parts[0]), (now, float(parts[1])))


# --- mount time and memory -----------------------------------------------------------------
def ready(ctx: Ctx, target: Target, backend: Backend) -> dict[str, Any]:
    """Exec of the mount command to the mountpoint answering a stat, `ready_runs` times."""
    times = []
    for i in range(ctx.sizes.ready_runs):
        with target.mount(backend, ctx.mnt("ready"), ctx.work, label=f"ready{i}") as m:
            times.append(m.ready_s)
    return {"median_s": round(median(times), 3), "min_s": round(min(times), 3),
            "max_s": round(max(times), 3), "runs": [round(t, 3) for t in times]}


def memory(ctx: Ctx, target: Target, backend: Backend) -> dict[str, Any]:
    """Daemon RSS idle after mounting, and its peak while `writers` files are written at
    once (each `writer_mib` MiB in 1 MiB writes, all open together, then all closed)."""
    s = ctx.sizes
    chunk = os.urandom(MiB)
    with target.mount(backend, ctx.mnt("rss"), ctx.work, label="rss") as m:
        time.sleep(s.idle_wait)
        idle = tree_rss(m.pid)
        barrier = threading.Barrier(s.writers, timeout=120)
        errors: list[str] = []

        def write_one(i: int) -> None:
            try:
                with open(m.path / f"rss-{i:03d}.bin", "wb") as f:
                    barrier.wait()
                    for _ in range(s.writer_mib):
                        f.write(chunk)
                    f.flush()
                    barrier.wait()  # every file is written before any is closed
            except (OSError, threading.BrokenBarrierError) as exc:
                errors.append(str(exc))
                barrier.abort()

        with RssSampler(m.pid) as sampler, \
                CpuMeter(m.pid, ctx.server_pids.get(backend.kind)) as cpu:
            t0 = time.perf_counter()
            with ThreadPoolExecutor(s.writers) as pool:
                list(pool.map(write_one, range(s.writers)))
            took = time.perf_counter() - t0
        hwm = proc_status(m.pid).get("VmHWM", 0)
        peak = max(sampler.peak, hwm)
    if errors:
        raise BenchError(f"{len(errors)} of {s.writers} writers failed: {errors[0]}")
    total = s.writers * s.writer_mib * MiB
    log(f"  {s.writers} writers: {took:.1f}s, peak RSS {peak / MiB:.0f} MiB")
    return {"idle_mib": round(idle / MiB, 1), "peak_mib": round(peak / MiB, 1),
            "writers": s.writers, "writer_mib": s.writer_mib,
            "writers_seconds": round(took, 2), "writers_mib_s": round(mib_s(total, took), 1),
            **cpu.result}


# --- the ceiling: the SDK itself on the same server -----------------------------------------
def ceiling(ctx: Ctx, backend: Backend) -> dict[str, Any]:
    """The SDK uploading the source and range-downloading it back (page cache dropped);
    plain file I/O with an fsync for file://."""
    size = ctx.sizes.seq_mib * MiB
    name = "ceiling.bin"
    backend.delete(name)
    server = ctx.server_pids.get(backend.kind)
    ups, downs = [], []
    for _ in range(_repeats(backend)):
        with CpuMeter(0, server) as up_cpu:
            t0 = time.perf_counter()
            backend.upload(ctx.src, name)
            ups.append(time.perf_counter() - t0)
    up = min(ups)
    sink = Path(f"/dev/shm/bench-{os.getpid()}-sink.bin")
    try:
        for _ in range(_repeats(backend)):
            drop_caches()
            with CpuMeter(0, server) as down_cpu:
                t0 = time.perf_counter()
                got = backend.download(name, sink)
                downs.append(time.perf_counter() - t0)
    finally:
        sink.unlink(missing_ok=True)
    down = min(downs)
    if got != size:
        raise BenchError(f"the SDK downloaded {got} bytes, expected {size}")
    out: dict[str, Any] = {
        "write_mib_s": round(mib_s(size, up), 1), "write_seconds": round(up, 3),
        "read_mib_s": round(mib_s(size, down), 1), "read_seconds": round(down, 3),
        "write_server_cores": up_cpu.result.get("server_cores"),
        "read_server_cores": down_cpu.result.get("server_cores"),
    }
    if len(ups) > 1:
        out["runs_write_mib_s"] = [round(mib_s(size, u), 1) for u in ups]
        out["runs_read_mib_s"] = [round(mib_s(size, d), 1) for d in downs]
    probe = getattr(backend, "ranged_get_seconds", None)
    if probe is not None:
        small = "ceiling-1mib.bin"
        small_src = ctx.work / "one-mib.bin"
        small_src.write_bytes(os.urandom(MiB))
        backend.put(small, small_src)
        out["ranged_1mib_get_ms_from_big"] = round(probe(name) * 1e3, 1)
        out["ranged_1mib_get_ms_from_1mib"] = round(probe(small) * 1e3, 1)
    return out
