"""Faults through real mounts (semantics §2 "Conditional", "Failures"; §4; §5 memory).

A `Proxy` between the mount and moto or Azurite injects 5xx, resets and delays, or plays
an endpoint that is down; two mounts append to one blob; another client replaces a blob
under pending appends; a hundred files are written at once while the daemon's memory is
watched. What arrived is always read straight from the store (never through the proxy or
a mount) and compared byte for byte.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import RGW_FULL
from tests.support.envs import StoreEnv
from tests.support.mounting import mounted
from tests.support.outside import (
    blob_size,
    list_keys,
    read_blob,
    replace_blob,
    spool_listing,
    upstream_of,
    via_proxy,
    vm_kib,
)
from tests.support.proxy import FAULT_KINDS, FaultPlan, Proxy
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow

KiB = 1 << 10
MiB = 1 << 20
#: Stores with an HTTP endpoint a proxy can sit in front of.
#: The RGW runs of the fault tests (~50 s) go beyond the default suite's time budget: they
#: run with `scripts/test --rgw-full` (tests/conftest.py).
HTTP_KINDS = ["s3", RGW_FULL, "az"]


@pytest.fixture
def endpoint_proxy(store_env: StoreEnv) -> Iterator[Proxy]:
    """A proxy in front of `store_env`'s server (stopped however the test ends)."""
    with Proxy(upstream_of(store_env)) as p:
        yield p


def line_for(tag: str, n: int, scale: int = 1) -> bytes:
    """Line `n` of writer `tag`: its length varies (up to 150 * `scale` dots), so a torn or
    merged line cannot pass."""
    return b"%s %07d %s|\n" % (tag.encode(), n, b"." * ((n * 7919) % 151 * scale))


class LineWriter(threading.Thread):
    """Appends numbered lines with O_APPEND, either through one descriptor held open
    (`reopen=False`, never fsynced) or with open-append-close per line.

    Remembers exactly what was acknowledged (write() and, when reopening, close()
    returned), the slowest write, and the first error."""

    def __init__(self, path: Path, tag: str, *, reopen: bool = False,
                 pause: float = 0.0, scale: int = 1) -> None:
        super().__init__(daemon=True, name=f"writer-{tag}")
        self.path = path
        self.tag = tag
        self.reopen = reopen
        self.pause = pause
        self.scale = scale
        self.acked = bytearray()
        self.lines = 0
        self.max_latency = 0.0
        self.error: OSError | None = None
        self.stopping = threading.Event()

    def _write_line(self, fd: int) -> None:
        line = line_for(self.tag, self.lines, self.scale)
        start = time.monotonic()
        n = os.write(fd, line)
        self.max_latency = max(self.max_latency, time.monotonic() - start)
        assert n == len(line), f"short write {n} of {len(line)}"

    def run(self) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        try:
            if self.reopen:
                while not self.stopping.is_set():
                    fd = os.open(self.path, flags, 0o644)
                    try:
                        self._write_line(fd)
                    finally:
                        os.close(fd)  # close=sync: returns once committed
                    self.acked += line_for(self.tag, self.lines, self.scale)
                    self.lines += 1
                    if self.pause:
                        time.sleep(self.pause)  # deliberate: the writer's pace
                return
            fd = os.open(self.path, flags, 0o644)
            try:
                while not self.stopping.is_set():
                    self._write_line(fd)
                    self.acked += line_for(self.tag, self.lines, self.scale)
                    self.lines += 1
                    if self.pause:
                        time.sleep(self.pause)  # deliberate: the writer's pace
            finally:
                os.close(fd)
        except OSError as exc:
            self.error = exc

    def finish(self, timeout: float = 120.0) -> None:
        self.stopping.set()
        self.join(timeout)
        assert not self.is_alive(), f"{self.name} did not finish within {timeout}s"


def check_lines(data: bytes, writers: list[LineWriter]) -> None:
    """Every acknowledged line of every writer is there once, whole, in its writer's order."""
    seen: dict[str, list[int]] = {w.tag: [] for w in writers}
    scale = {w.tag: w.scale for w in writers}
    for i, raw in enumerate(data.split(b"\n")[:-1]):
        line = raw + b"\n"
        m = re.fullmatch(rb"(\S+) (\d{7}) \.*\|\n", line)
        assert m is not None, f"line {i} is torn or foreign: {line[:80]!r}"
        tag, n = m.group(1).decode(), int(m.group(2))
        assert tag in seen, f"line {i} is from an unknown writer: {line[:80]!r}"
        assert line == line_for(tag, n, scale[tag]), f"line {i} is damaged: {line[:80]!r}"
        seen[tag].append(n)
    assert data.endswith(b"\n"), f"the blob ends in a partial line: {data[-80:]!r}"
    for w in writers:
        got = seen[w.tag]
        assert got == list(range(w.lines)), (
            f"writer {w.tag}: {w.lines} lines acknowledged, {len(got)} present; first "
            f"problem at {next((i for i, n in enumerate(got) if n != i), len(got))}")


# --- 1. a faulty endpoint ------------------------------------------------------------------
APPENDS = 500
#: The appends come from this many threads, each open-append-closing its own file.
APPENDERS = 5


@pytest.mark.timeout(240)
@pytest.mark.parametrize("store_env", HTTP_KINDS, indirect=True)
def test_50mib_and_500_appends_survive_5xx_resets_and_delays(
    store_env: StoreEnv, endpoint_proxy: Proxy, tmp_path: Path
) -> None:
    """~10 % of requests fail (500, 503, reset before or after forwarding) or are slow,
    while a 50 MiB stream is written with dd and 500 open-append-close appends are made."""
    proxy = endpoint_proxy
    env = via_proxy(store_env, proxy.url)
    src = tmp_path / "src.bin"
    payload = os.urandom(50 * MiB)
    src.write_bytes(payload)
    plan = FaultPlan(rate=0.1, kinds=FAULT_KINDS, seed=5, delay=0.3)
    logs = {f"app{k}.log": bytearray() for k in range(APPENDERS)}
    timings: dict[str, float] = {}

    def appends(name: str) -> None:
        for i in range(APPENDS // APPENDERS):
            line = b"%s %04d appended through a faulty endpoint %s\n" % (
                name.encode(), i, b"-" * (i % 37))
            with open(a.path / name, "ab") as f:  # close=sync: committed on return
                f.write(line)
            logs[name].extend(line)

    with mounted(env, tmp_path, name="a") as a:
        proxy.faults = plan
        # The stream and the appenders run side by side: all of them meet the faults.
        appenders = [threading.Thread(target=appends, args=(name,), daemon=True)
                     for name in logs]
        start = time.monotonic()
        for t in appenders:
            t.start()
        try:
            subprocess.run(["dd", f"if={src}", f"of={a.path / 'stream.bin'}", "bs=1M",
                            "status=none"], check=True, timeout=180)
            timings["50 MiB dd"] = time.monotonic() - start
        finally:
            for t in appenders:
                t.join(180)
        timings[f"{APPENDS} appends"] = time.monotonic() - start
        assert not any(t.is_alive() for t in appenders)
        proxy.faults = None
    injected = dict(plan.injected)
    print(f"\n{store_env.name}: faults injected {injected} in {sum(injected.values())} "
          f"of {len(proxy.records)} requests; " +
          ", ".join(f"{k} took {v:.1f}s" for k, v in timings.items()))
    got = read_blob(store_env, "stream.bin")
    assert got is not None and len(got) == len(payload)
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest(), \
        "the 50 MiB stream arrived damaged"
    for name, expect in logs.items():
        assert len(expect) > 0
        assert read_blob(store_env, name) == bytes(expect), f"{name} differs"
    assert set(injected) == set(FAULT_KINDS), f"not every kind of fault was hit: {injected}"
    assert sum(injected.values()) >= 50


# --- 2. an endpoint that is down -------------------------------------------------------------
@pytest.mark.timeout(240)
@pytest.mark.parametrize("store_env,outage", [("s3", 20.0), ("az", 6.0)],
                         indirect=["store_env"])
def test_endpoint_down_mid_stream_then_everything_arrives(
    store_env: StoreEnv, endpoint_proxy: Proxy, outage: float, tmp_path: Path
) -> None:
    """A held-open log keeps being written while the endpoint refuses connections for
    `outage` seconds (default retry_timeout 60 s); afterwards every byte arrives."""
    proxy = endpoint_proxy
    env = via_proxy(store_env, proxy.url)
    with mounted(env, tmp_path, name="a") as a:
        writer = LineWriter(a.path / "live.log", "w", pause=0.002)
        writer.start()
        try:
            wait_for(lambda: blob_size(store_env, "live.log") > 0, 20,
                     "the first commit through the proxy")
            with proxy.down("refuse"):
                # A request forwarded before the cut may still land: wait it out.
                wait_for(lambda: proxy.busy == 0, 30, "requests in flight at the cut")
                frozen = blob_size(store_env, "live.log")
                at_down = writer.lines
                start = time.monotonic()
                progress = [writer.lines]
                while time.monotonic() - start < outage:
                    # Deliberate: the outage lasts `outage` seconds; meanwhile the writer must
                    # never stall (sampled each second).
                    time.sleep(1.0)
                    progress.append(writer.lines)
                    assert writer.error is None, writer.error
                    assert progress[-1] > progress[-2], f"writes stalled: {progress}"
                during = writer.lines - at_down
                assert blob_size(store_env, "live.log") == frozen, "the proxy let a commit by"
                slowest = writer.max_latency
            pending = len(writer.acked)
            up_at = time.monotonic()
            wait_for(lambda: blob_size(store_env, "live.log") >= pending, 60,
                     "the spooled data reaching the store after the outage")
            caught_up = time.monotonic() - up_at
            writer.finish()
        finally:
            writer.stopping.set()
            writer.join(60)
        assert writer.error is None, writer.error
        log = a.log()
    assert read_blob(store_env, "live.log") == bytes(writer.acked)
    print(f"\n{store_env.name}: {outage:g}s outage: {during} lines written during it, slowest "
          f"write {slowest * 1000:.0f} ms; {pending} spooled bytes in the store "
          f"{caught_up:.1f}s after it ended; {len(writer.acked)} bytes in all")
    assert slowest < 2.0, f"a write took {slowest:.1f}s while the endpoint was down"
    assert during > 100
    assert "retrying" in log, "the daemon never retried: was the endpoint really down?"


RETRY_TIMEOUT = 5.0


@pytest.mark.timeout(240)
@pytest.mark.parametrize("store_env", HTTP_KINDS, indirect=True)
def test_endpoint_down_beyond_retry_timeout_keeps_data_for_next_mount(
    store_env: StoreEnv, endpoint_proxy: Proxy, tmp_path: Path
) -> None:
    """retry_timeout=5: fsync and close give EIO, the spool keeps the bytes, shutdown gives
    up after shutdown_timeout and exits 1 saying so, and the next mount (endpoint back,
    same cache_dir) commits them (semantics §2 "Failures", §4)."""
    proxy = endpoint_proxy
    env = via_proxy(store_env, proxy.url)
    cache = tmp_path / "cache"
    first = b"".join(line_for("first", n) for n in range(200))
    second = b"".join(line_for("second", n) for n in range(3000))
    with mounted(env, tmp_path, f"retry_timeout={RETRY_TIMEOUT:g}", "shutdown_timeout=2",
                 name="a", cache_dir=cache,
                 expect_errors=[r"kept\.log", r"shutdown_timeout", r"could not be committed"]) as a:
        fd = os.open(a.path / "kept.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, first)
            os.fsync(fd)
            with proxy.down("refuse"):
                for n in range(0, len(second), 4096):
                    os.write(fd, second[n:n + 4096])  # only the spool is needed
                start = time.monotonic()
                with pytest.raises(OSError) as exc:
                    os.fsync(fd)
                took = time.monotonic() - start
                assert exc.value.errno == errno.EIO
                with pytest.raises(OSError) as exc:
                    os.close(fd)
                fd = -1
                assert exc.value.errno == errno.EIO
                # While the daemon still runs, and again after it has gone.
                assert spool_listing(env, cache) == {"kept.log": len(second)}
                assert a.stop() == 1, "shutdown must report the uncommitted file"
        finally:
            if fd >= 0:
                os.close(fd)
    log = a.log()
    assert re.search(r"ERROR .*kept\.log", log), log[-3000:]
    assert "shutdown_timeout (2s) passed" in log
    assert "cleanly" not in log
    # Retried for retry_timeout, not less (an outage shorter than it is ridden out), and
    # not much more: at most a timer commit already under way, then fsync's own.
    assert RETRY_TIMEOUT - 0.5 <= took <= 2 * RETRY_TIMEOUT + 5, f"EIO after {took:.1f}s"
    assert read_blob(store_env, "kept.log") == first
    assert spool_listing(env, cache) == {"kept.log": len(second)}
    start = time.monotonic()
    with mounted(env, tmp_path, name="b", cache_dir=cache) as b:
        recovered_in = time.monotonic() - start
        assert (b.path / "kept.log").read_bytes() == first + second
        summary = re.search(r"spool recovery: (.*)", b.log())
    assert read_blob(store_env, "kept.log") == first + second
    assert spool_listing(env, cache) == {}
    assert summary is not None and summary.group(1).startswith("1 committed"), summary
    print(f"\n{store_env.name}: fsync gave EIO after {took:.1f}s (retry_timeout="
          f"{RETRY_TIMEOUT:g}); the next "
          f"mount recovered {len(second)} bytes and answered {recovered_in:.1f}s after start "
          f"({summary.group(1)})")


# --- 3. two mounts appending to one blob -----------------------------------------------------
#: variant -> (open-append-close per line?, pause between lines, line scale, mount options).
#: "reopen" is a close=sync logger with 10 ms between lines; "reopen-tight" has no pause at
#: all, so one mount commits back to back; "held" keeps one descriptor open and relies on
#: the timer, with lines up to 1.8 KiB: many cross a page boundary, where the kernel
#: could split one write() in two if the handle went through the page cache.
VARIANTS = {
    "reopen": (True, 0.01, 1, ()),
    "reopen-tight": (True, 0.0, 1, ()),
    "held": (False, 0.001, 12, ("commit_interval=0.2",)),
}
CONTEST = 3.0


@pytest.mark.timeout(180)
@pytest.mark.parametrize("store_env,variant", [
    ("file", "reopen"), ("file", "held"), ("az", "reopen"), ("az", "held"),
    ("az", "reopen-tight"),
], indirect=["store_env"])
def test_two_mounts_append_whole_lines_to_one_blob(
    store_env: StoreEnv, variant: str, tmp_path: Path
) -> None:
    """Two mounts append to one blob for a few seconds: every line of both lands once,
    whole, in its writer's order, and no close or write fails (semantics §2 "Conditional":
    when both sides only append, ours are rebased and committed)."""
    reopen, pause, scale, opts = VARIANTS[variant]
    with mounted(store_env, tmp_path, *opts, name="a") as a, \
            mounted(store_env, tmp_path, *opts, name="b") as b:
        (a.path / "shared.log").write_bytes(b"")
        wait_for(lambda: (b.path / "shared.log").exists(), 10, "the empty blob on mount b")
        writers = [LineWriter(m.path / "shared.log", tag, reopen=reopen, pause=pause,
                              scale=scale) for m, tag in ((a, "A"), (b, "B"))]
        for w in writers:
            w.start()
        try:
            wait_for(lambda: all(w.lines >= 50 for w in writers) or
                     any(w.error for w in writers), 30, "both writers going")
            # Deliberate: the contest lasts CONTEST seconds (cut short by a writer's error).
            end = time.monotonic() + CONTEST
            while time.monotonic() < end and not any(w.error for w in writers):
                time.sleep(0.1)
        finally:
            for w in writers:
                w.finish()
        for w in writers:
            assert w.error is None, f"writer {w.tag} after {w.lines} lines: {w.error}"
    data = read_blob(store_env, "shared.log")
    assert data is not None
    check_lines(data, writers)
    assert len(data) == sum(len(w.acked) for w in writers)
    print(f"\n{store_env.name}/{variant}: {writers[0].lines} + {writers[1].lines} lines, "
          f"{len(data)} bytes, all whole and in order")


# --- 4. a replacement race -------------------------------------------------------------------
@pytest.mark.timeout(180)
def test_replaced_blob_fails_pending_appends_and_saves_them_aside(
    store_env: StoreEnv, tmp_path: Path
) -> None:
    """Pending appends on mount A; another client replaces the blob. A's fsync and close
    give EIO, its log names the file, the spool keeps the bytes, and A's next start saves
    them as KEY.blobfs-recovered-STAMP (semantics §2 "Conditional", §4)."""
    cache = tmp_path / "cache"
    original = b"".join(line_for("orig", n) for n in range(100))
    appended = b"".join(line_for("mine", n) for n in range(500))
    replacement = b"another client rewrote this blob\n" * 50
    with mounted(store_env, tmp_path, "commit_interval=600", name="a", cache_dir=cache,
                 expect_errors=[r"race\.log"]) as a:
        (a.path / "race.log").write_bytes(original)
        fd = os.open(a.path / "race.log", os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, appended)
            replace_blob(store_env, "race.log", replacement)
            with pytest.raises(OSError) as exc:
                os.fsync(fd)
            assert exc.value.errno == errno.EIO
            with pytest.raises(OSError) as exc:
                os.close(fd)
            fd = -1
            assert exc.value.errno == errno.EIO
        finally:
            if fd >= 0:
                os.close(fd)
        assert spool_listing(store_env, cache) == {"race.log": len(appended)}
        assert read_blob(store_env, "race.log") == replacement
        assert a.stop() == 1
        log = a.log()
    assert re.search(r"ERROR .*race\.log.*(replaced|changed)", log), log[-3000:]
    assert spool_listing(store_env, cache) == {"race.log": len(appended)}
    with mounted(store_env, tmp_path, name="a2", cache_dir=cache,
                 expect_errors=[r"race\.log"]) as a2:
        copies = [k for k in list_keys(store_env) if k.startswith("race.log.blobfs-recovered-")]
        assert len(copies) == 1, list_keys(store_env)
        assert re.fullmatch(r"race\.log\.blobfs-recovered-\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{8}",
                            copies[0])
        assert (a2.path / copies[0]).read_bytes() == appended
        log = a2.log()
    assert read_blob(store_env, copies[0]) == appended
    assert read_blob(store_env, "race.log") == replacement, "the other client's version won"
    assert copies[0] in log
    assert spool_listing(store_env, cache) == {}


# --- 5. bounded memory -----------------------------------------------------------------------
#: The daemon's baseline (interpreter, SDK, ~30-60 MiB), plus at most 8 commits at once
#: (budget.COMMITS_AT_ONCE) each holding one 4 MiB file about three times over (read from the
#: spool, the SDK's request body, checksums), plus 4 staged 8 MiB blocks and the kernel's
#: write requests in flight (99 x 128 KiB): about 200 MiB. 400 MiB pending must not show.
RSS_BOUND_MIB = 250
FILES = 100
FILE_SIZE = 4 * MiB
CHUNK = 128 * KiB


def chunk_of(file_no: int, chunk_no: int, body: bytes) -> bytes:
    """Chunk `chunk_no` of file `file_no`: a header naming it, then shared random bytes."""
    head = b"file %03d chunk %04d\n" % (file_no, chunk_no)
    return head + body[len(head):]


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True, name="rss")
        self.pid = pid
        self.peak_kib = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.02):
            try:
                self.peak_kib = max(self.peak_kib, vm_kib(self.pid))
            except (OSError, KeyError):
                return


@pytest.mark.timeout(240)
@pytest.mark.parametrize("store_env", ["az", "file"], indirect=True)
def test_100_files_at_once_keep_daemon_memory_bounded(
    store_env: StoreEnv, tmp_path: Path
) -> None:
    """100 writers, 4 MiB each, held open, then fsynced all at once: pending data lives in
    the spool, and commits of 100 files at once must not hold 100 files in memory."""
    body = random.Random(9).randbytes(CHUNK)
    with mounted(store_env, tmp_path, "commit_interval=600", name="a") as a:
        pid = a.proc.pid
        baseline = vm_kib(pid)
        sampler = RssSampler(pid)
        sampler.start()
        barrier = threading.Barrier(FILES + 1)
        errors: list[BaseException] = []

        def write_one(i: int) -> None:
            try:
                fd = os.open(a.path / f"f{i:03d}.bin", os.O_WRONLY | os.O_CREAT, 0o644)
                try:
                    for c in range(FILE_SIZE // CHUNK):
                        os.write(fd, chunk_of(i, c, body))
                    barrier.wait(120)  # all 400 MiB written, none committed
                    barrier.wait(120)  # the test measured; now commit all at once
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except BaseException as exc:  # noqa: BLE001 - reported by the test thread
                errors.append(exc)
                barrier.abort()

        threads = [threading.Thread(target=write_one, args=(i,), daemon=True)
                   for i in range(FILES)]
        try:
            for t in threads:
                t.start()
            barrier.wait(120)
            spooled_kib = vm_kib(pid)
            barrier.wait(120)
            for t in threads:
                t.join(180)
        finally:
            barrier.abort()
            sampler.done.set()
        assert not errors, errors[:3]
        assert not any(t.is_alive() for t in threads)
        peak_kib = max(sampler.peak_kib, vm_kib(pid, "VmHWM"))
    print(f"\n{store_env.name}: daemon RSS {baseline // 1024} MiB at start, "
          f"{spooled_kib // 1024} MiB with {FILES * FILE_SIZE // MiB} MiB pending, peak "
          f"{peak_kib // 1024} MiB (VmHWM) while {FILES} files committed at once")
    assert sorted(list_keys(store_env)) == [f"f{i:03d}.bin" for i in range(FILES)]
    for i in range(FILES):
        expect = b"".join(chunk_of(i, c, body) for c in range(FILE_SIZE // CHUNK))
        assert read_blob(store_env, f"f{i:03d}.bin") == expect, f"f{i:03d}.bin differs"
    assert peak_kib < RSS_BOUND_MIB * 1024, f"peak RSS {peak_kib // 1024} MiB"

