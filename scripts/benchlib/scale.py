"""The scale workloads of issue 15: big directories, idle open files, the cost of a commit
as the blob grows, and the do-nothing pyfuse3 filesystem as the ceiling for file://.

Each returns figures and, where the issue asks for one, the ratio measured in the same
run (per-entry cost at the largest directory over the smallest; blobfs over the
passthrough baseline; blobfs over the null filesystem). `section(records)` renders them.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchlib.common import (
    VENV_BIN,
    BenchError,
    MiB,
    drop_caches,
    lazy_unmount,
    log,
    mib_s,
    percentile,
    proc_status,
    stop_process,
    tree_rss,
    wait_answering,
)
from benchlib.stores import AzBackend, Backend, FileBackend, S3Backend
from benchlib.targets import Target

#: List prices in USD per 10,000 requests (README "What it costs"): S3 Standard us-east-1
#: GET/HEAD 0.004, PUT/POST/LIST/COPY 0.05; Azure hot LRS read 0.005, write and list 0.065.
PRICE_PER_10K = {"s3": {"read": 0.004, "write": 0.05}, "az": {"read": 0.005, "write": 0.065}}


@dataclass(frozen=True)
class ScaleSizes:
    #: Directory sizes listed; the network stores stop lower (seeding 100,000 objects
    #: through moto or Azurite takes longer than the bench budget).
    list_counts: tuple[int, ...] = (1000, 10000, 100000)
    list_counts_net: tuple[int, ...] = (1000, 10000)
    idle_counts: tuple[int, ...] = (55, 1000)
    idle_seconds: float = 10.0
    #: Blob sizes for the cost of a commit (moto copies the object in Python per commit).
    commit_mib: tuple[int, ...] = (1, 64, 1024)
    commit_mib_net: tuple[int, ...] = (1, 64)
    #: Azure commits a block list (no copy of the blob): Azurite takes 1 GiB.
    commit_mib_az: tuple[int, ...] = (1, 64, 1024)
    commits_per_size: int = 30
    ceiling_mib: tuple[int, ...] = (256, 2048)
    #: Alternating rounds of the null filesystem and blobfs; the best of each is kept.
    ceiling_rounds: int = 3
    #: The big file (goal 4); S3 only when asked (moto's ranged GETs are O(object size)).
    big_mib: int = 4096
    big_on_s3: bool = False
    #: Commit counts onto one blob (goal 5): the emulators stop lower (Azurite ~20 ms,
    #: moto ~100+ ms per commit); each checkpoint reports its last `stream_window` commits.
    stream_counts: tuple[int, ...] = (1000, 10000, 100000)
    stream_counts_az: tuple[int, ...] = (1000, 10000)
    stream_counts_s3: tuple[int, ...] = (1000,)
    stream_window: int = 500
    stream_base_mib: int = 8


QUICK = ScaleSizes(list_counts=(1000, 10000), list_counts_net=(1000, 5000),
                   idle_counts=(55, 200), idle_seconds=5.0, commit_mib=(1, 64, 256),
                   commit_mib_net=(1, 16), commit_mib_az=(1, 64), commits_per_size=20,
                   ceiling_mib=(256,), ceiling_rounds=2, big_mib=1024, stream_counts=(1000, 10000),
                   stream_counts_az=(1000,), stream_counts_s3=(300,), stream_window=200)


def _dir_sizes(ss: ScaleSizes, backend: Backend) -> list[int]:
    return list(ss.list_counts if not backend.network else ss.list_counts_net)


# --- seeding (setup, not measured) --------------------------------------------------------
def _seed(backend: Backend, folder: str, n: int, body: bytes = b"x\n") -> None:
    """n small objects under folder/, named so that they sort as they are numbered."""
    if isinstance(backend, FileBackend):
        d = backend.path(folder)
        d.mkdir(parents=True, exist_ok=True)
        if len(os.listdir(d)) >= n:
            return
        for i in range(n):
            (d / f"f{i:06d}.log").write_bytes(body)
        return

    def put(i: int) -> None:
        key = backend.key(f"{folder}/f{i:06d}.log")
        if isinstance(backend, S3Backend):
            backend.client.put_object(Bucket=backend.bucket, Key=key, Body=body)
        elif isinstance(backend, AzBackend):
            backend.cc.get_blob_client(key).upload_blob(body, overwrite=True)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, range(n)))


def _timed(cmd: list[str], timeout: float = 1800) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True,
                   timeout=timeout)
    return time.perf_counter() - t0


def _first_and_all(path: Path) -> tuple[float, float]:
    """Seconds to the first entry and to the last of a directory read (what `ls -f` does,
    without its output buffering hiding the first entry)."""
    t0 = time.perf_counter()
    first = None
    with os.scandir(path) as it:
        for _ in it:
            if first is None:
                first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    return (total if first is None else first), total


def _list_cmds(path: Path) -> dict[str, list[str]]:
    return {"ls": ["ls", str(path)], "ls_l": ["ls", "-l", str(path)],
            "find": ["find", str(path)]}


@contextlib.contextmanager
def helper_mount(ctx: Any, label: str, *args: str) -> Iterator[Path]:
    """Mount one of benchlib.helperfs's filesystems; always unmount it again."""
    mnt = ctx.mnt(label)
    lazy_unmount(mnt)
    mnt.mkdir(parents=True, exist_ok=True)
    log_path = ctx.work / f"helperfs-{label}.log"
    with open(log_path, "ab") as logf:
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "benchlib.helperfs", *args, str(mnt)],
                                stdout=logf, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        wait_answering(mnt, proc, t0, 60, log_path)
        yield mnt
    finally:
        if proc.poll() is None:
            subprocess.run(["fusermount3", "-u", str(mnt)], check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stop_process(proc, timeout=30)
        lazy_unmount(mnt)


# --- 1. listing ----------------------------------------------------------------------------
def listing(ss: ScaleSizes, ctx: Any, target: Target, backend: Backend) -> dict[str, Any]:
    """`ls`, `ls -l` and `find` of directories of growing size, each on a fresh mount.

    Per-entry cost at the largest size over the smallest must stay within 1.3; on file://
    the same `ls -l` through a passthrough pyfuse3 mount is the baseline.
    """
    out: dict[str, Any] = {}
    sizes = _dir_sizes(ss, backend)
    for n in sizes:
        folder = f"list{n}"
        t0 = time.perf_counter()
        _seed(backend, folder, n)
        log(f"  seeded {n} entries in {time.perf_counter() - t0:.0f}s")
        row: dict[str, Any] = {}
        with target.mount(backend, ctx.mnt("list"), ctx.work, label=f"list{n}") as m:
            idle = tree_rss(m.pid)
            for name, cmd in _list_cmds(m.path / folder).items():
                took = _timed(cmd)
                row[f"{name}_s"] = round(took, 3)
                row[f"{name}_us_per_entry"] = round(took / n * 1e6, 1)
            grown = tree_rss(m.pid) - idle
            row["rss_growth_mib"] = round(grown / MiB, 1)
            # Memory returns once the kernel forgets the inodes and the listing expires
            # (a few paging times, each at most an `ls`): wait that long at most.
            drop_caches()
            t0 = time.monotonic()
            left = grown
            while time.monotonic() - t0 < min(60.0, max(3.0, 6 * row["ls_s"])):
                time.sleep(1)
                left = tree_rss(m.pid) - idle
                if left <= 0.3 * grown:
                    break
            row["rss_after_forget_mib"] = round(left / MiB, 1)
        if isinstance(backend, FileBackend):
            # The rows above run `ls -l` after `ls` has paged the listing; the passthrough's
            # `ls -l` is the first command on its mount, so blobfs gets a fresh mount too.
            with target.mount(backend, ctx.mnt("list"), ctx.work, label=f"list{n}cold") as m:
                row["ls_l_cold_s"] = round(_timed(_list_cmds(m.path / folder)["ls_l"]), 3)
            # A cold directory read streams while the listing is paged: its first entry
            # comes after the first page, not after the whole paging.
            with target.mount(backend, ctx.mnt("list"), ctx.work, label=f"list{n}f") as m:
                first, total = _first_and_all(m.path / folder)
                row["ls_f_cold_first_entry_s"] = round(first, 3)
                row["ls_f_cold_s"] = round(total, 3)
            with helper_mount(ctx, "passthrough", "passthrough",
                              str(backend.path(folder))) as p:
                took = _timed(_list_cmds(p)["ls_l"])
                row["passthrough_ls_l_s"] = round(took, 3)
                row["ls_l_over_passthrough"] = round(row["ls_l_s"] / took, 2)
                row["ls_l_cold_over_passthrough"] = round(row["ls_l_cold_s"] / took, 2)
        out[str(n)] = row
    lo, hi = str(sizes[0]), str(sizes[-1])
    out["per_entry_ratio_largest_over_smallest"] = {
        name: round(out[hi][f"{name}_us_per_entry"] / out[lo][f"{name}_us_per_entry"], 2)
        for name in ("ls", "ls_l", "find")}
    return out


# --- 2. idle open files --------------------------------------------------------------------
def _priced(records: list[Any]) -> dict[str, int]:
    """Requests by price class: GET/HEAD are reads; LIST (a GET with a list query),
    PUT, POST and COPY are billed as writes on S3 and Azure."""
    out = {"read": 0, "write": 0}
    for r in records:
        query = r.target.partition("?")[2]
        listing_ = "list-type=" in query or "comp=list" in query
        out["read" if r.method in ("GET", "HEAD") and not listing_ else "write"] += 1
    return out


def idle(ss: ScaleSizes, ctx: Any, target: Target, backend: Backend) -> dict[str, Any]:
    """Requests per second a mount sends while N files are open and idle: readers that
    read to EOF, and 5 appenders with nothing pending. Counted by a proxy."""
    from tests.support.proxy import Proxy

    if not backend.network:
        raise BenchError("file:// sends no requests to count")
    out: dict[str, Any] = {}
    writers = 5
    for n in ss.idle_counts:
        folder = f"idle{n}"
        _seed(backend, folder, n - writers, b"a line\n")
        with Proxy(backend.upstream()) as proxy, \
                target.mount(backend, ctx.mnt("idle"), ctx.work,
                             endpoint=backend.proxy_endpoint(proxy.url),
                             label=f"idle{n}") as m:
            files = []
            try:
                for i in range(n - writers):
                    f = open(m.path / folder / f"f{i:06d}.log", "rb")  # noqa: SIM115
                    files.append(f)
                    f.read()
                for i in range(writers):
                    f = open(m.path / folder / f"w{i}.log", "ab")  # noqa: SIM115
                    files.append(f)
                    f.write(b"started\n")
                    f.flush()
                    os.fsync(f.fileno())
                time.sleep(1.0)  # let the opens' own requests finish
                proxy.reset()
                time.sleep(ss.idle_seconds)
                stats = proxy.stats()
                classes = _priced(list(proxy.records))
            finally:
                for f in files:
                    f.close()
        secs = ss.idle_seconds
        prices = PRICE_PER_10K[backend.kind]
        usd = sum(classes[c] * prices[c] for c in classes) / 10_000
        out[str(n)] = {"requests_per_s": round(stats["requests"] / secs, 2),
                       "by_method": stats["by_method"],
                       "usd_per_day": round(usd / secs * 86400, 4)}
    return out


# --- 3. cost per commit as the blob grows -------------------------------------------------
def commits(ss: ScaleSizes, ctx: Any, target: Target, backend: Backend) -> dict[str, Any]:
    """open-append-close of a short line onto blobs of growing size: ms per commit (and,
    through a proxy on the network stores, bytes and requests per commit)."""
    from tests.support.proxy import Proxy

    out: dict[str, Any] = {}
    sizes = (ss.commit_mib if not backend.network
             else ss.commit_mib_az if isinstance(backend, AzBackend) else ss.commit_mib_net)
    n = ss.commits_per_size
    for size_mib in sizes:
        name = f"grow{size_mib}.log"
        base = ctx.work / "grow-base.bin"
        with open(ctx.src, "rb") as fin, open(base, "wb") as fout:
            left = size_mib * MiB
            while left > 0:
                fin.seek(0)
                chunk = fin.read(min(left, 64 * MiB))
                fout.write(chunk)
                left -= len(chunk)
        backend.put(name, base)
        base.unlink()
        with contextlib.ExitStack() as stack:
            proxy = stack.enter_context(Proxy(backend.upstream())) if backend.network else None
            endpoint = backend.proxy_endpoint(proxy.url) if proxy is not None else None
            m = stack.enter_context(target.mount(backend, ctx.mnt("grow"), ctx.work,
                                                 endpoint=endpoint, label=f"grow{size_mib}"))
            path = m.path / name
            deadline = time.monotonic() + 30
            while not path.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            if proxy is not None:
                proxy.reset()
            lat = []
            for i in range(n):
                t0 = time.perf_counter()
                with open(path, "ab") as f:
                    f.write(b"%06d a line appended to a growing log\n" % i)
                lat.append(time.perf_counter() - t0)
            row: dict[str, Any] = {"commits": n,
                                   "ms_p50": round(percentile(lat, 50) * 1e3, 1),
                                   "ms_p90": round(percentile(lat, 90) * 1e3, 1)}
            if proxy is not None:
                stats = proxy.stats()
                # Requests include the open's lookup and revalidation (the line before
                # was written more than metadata_ttl ago); write requests are the commit.
                row.update(requests_per_commit=round(stats["requests"] / n, 2),
                           write_requests_per_commit=round(stats["write_requests"] / n, 2),
                           by_method=stats["by_method"],
                           bytes_up_per_commit=round(stats["bytes_up"] / n))
        backend.delete(name)
        out[f"{size_mib}MiB"] = row
    first, last = f"{sizes[0]}MiB", f"{sizes[-1]}MiB"
    out["p50_ratio_largest_over_smallest"] = round(out[last]["ms_p50"] / out[first]["ms_p50"],
                                                   2)
    return out


# --- 4. the pyfuse3 ceiling for file:// ----------------------------------------------------
def _dd_rate(args: list[str], nbytes: int) -> float:
    t0 = time.perf_counter()
    subprocess.run(["dd", *args, "bs=1M", "status=none"], check=True, timeout=1800)
    return mib_s(nbytes, time.perf_counter() - t0)


def _warm(path: Path) -> None:
    """Read a file once so that its pages are in the page cache."""
    with open(path, "rb", buffering=0) as f:
        while f.read(8 * MiB):
            pass


def fuse_ceiling(ss: ScaleSizes, ctx: Any, target: Target,
                 backend: Backend) -> dict[str, Any]:
    """dd bs=1M through a pyfuse3 filesystem that does nothing, and through blobfs on
    file://, alternating in one run (`ceiling_rounds` rounds, best of each): blobfs as a
    share of the ceiling, with the load average it ran under.

    The null filesystem touches no disk, so blobfs's reads are timed with the store's
    file in the page cache (a fresh mount: the kernel caches nothing of the FUSE file),
    which leaves the disk out of both; the cold read (page cache dropped) and a plain
    read of the store's file from the disk are reported beside it. Writes include the
    close, which commits (fsync) into the store. The null filesystem keeps nothing, so
    beside it the same filesystem with `--durable` (each write landed once in a file on the
    store's disk, fsync'd at close) is timed too: the most a filesystem that keeps what it
    acknowledged can write here (`durable_share_of_null`), and blobfs's share of that
    (`write_share_of_durable`).
    """
    if not isinstance(backend, FileBackend):
        raise BenchError("the ceiling row is for file:// (the network stores have the SDK's)")
    out: dict[str, Any] = {}
    for size_mib in ss.ceiling_mib:
        nbytes = size_mib * MiB
        name = f"ceil{size_mib}.bin"
        load0 = os.getloadavg()[0]
        runs: dict[str, list[float]] = {k: [] for k in (
            "null_write", "durable_null_write", "blobfs_write", "null_read", "blobfs_read")}
        landing = ctx.work / "durable-null"
        landing.mkdir(exist_ok=True)
        for _ in range(ss.ceiling_rounds):
            with helper_mount(ctx, "null", "null", "--size", str(nbytes)) as mnt:
                runs["null_write"].append(_dd_rate(
                    ["if=/dev/zero", f"of={mnt / 'out'}", f"count={size_mib}"], nbytes))
                runs["null_read"].append(_dd_rate([f"if={mnt / 'zero'}", "of=/dev/null"],
                                                  nbytes))
            # The same filesystem keeping what it acknowledged: each write lands once in
            # a file beside the store (same disk), fsync'd at close, as blobfs's commit is.
            with helper_mount(ctx, "durable", "null", "--durable", str(landing)) as mnt:
                runs["durable_null_write"].append(_dd_rate(
                    ["if=/dev/zero", f"of={mnt / 'out'}", f"count={size_mib}"], nbytes))
            for f in landing.iterdir():
                f.unlink()
            backend.delete(name)
            with target.mount(backend, ctx.mnt("ceil"), ctx.work,
                              label=f"ceil{size_mib}") as m:
                runs["blobfs_write"].append(_dd_rate(
                    ["if=/dev/zero", f"of={m.path / name}", f"count={size_mib}"], nbytes))
            _warm(backend.path(name))
            with target.mount(backend, ctx.mnt("ceil"), ctx.work,
                              label=f"ceil{size_mib}r") as m:
                runs["blobfs_read"].append(_dd_rate([f"if={m.path / name}", "of=/dev/null"],
                                                    nbytes))
        row: dict[str, Any] = {k: round(max(v), 1) for k, v in
                               ((f"{k}_mib_s", v) for k, v in runs.items())}
        row["write_share"] = round(row["blobfs_write_mib_s"] / row["null_write_mib_s"], 2)
        row["durable_share_of_null"] = round(
            row["durable_null_write_mib_s"] / row["null_write_mib_s"], 2)
        row["write_share_of_durable"] = round(
            row["blobfs_write_mib_s"] / row["durable_null_write_mib_s"], 2)
        row["read_share"] = round(row["blobfs_read_mib_s"] / row["null_read_mib_s"], 2)
        with target.mount(backend, ctx.mnt("ceil"), ctx.work, label=f"ceil{size_mib}c") as m:
            drop_caches()
            row["blobfs_read_cold_mib_s"] = round(_dd_rate(
                [f"if={m.path / name}", "of=/dev/null"], nbytes), 1)
        drop_caches()
        row["disk_read_cold_mib_s"] = round(_dd_rate(
            [f"if={backend.path(name)}", "of=/dev/null"], nbytes), 1)
        backend.delete(name)
        # The other yardstick for writes: the same bytes into the store's disk, fsync'd
        # (blobfs writes them there twice: the spool, then the commit's copy and fsync).
        row["disk_write_fsync_mib_s"] = round(_dd_rate(
            ["if=/dev/zero", f"of={backend.path(name)}", f"count={size_mib}", "conv=fsync"],
            nbytes), 1)
        backend.delete(name)
        row["rounds"] = ss.ceiling_rounds
        row["loadavg"] = f"{load0:.1f}-{os.getloadavg()[0]:.1f}"
        out[f"{size_mib}MiB"] = row
    return out


# --- 5. a big file (goal 4) ------------------------------------------------------------------
def _status(m: Any) -> dict[str, Any]:
    """`blobfs status MNT --json` of a bench mount."""
    res = subprocess.run([str(VENV_BIN / "blobfs"), "status", str(m.path), "--json"],
                         capture_output=True, text=True, timeout=60, check=True)
    snap: dict[str, Any] = json.loads(res.stdout)
    return snap


def big_file(ss: ScaleSizes, ctx: Any, target: Target, backend: Backend) -> dict[str, Any]:
    """A file of `big_mib` written with dd bs=1M and read back on a fresh mount, with the
    daemon's peak RSS (VmHWM) against memory_limit, and the ranged GETs one 4 KiB read in
    the middle of the cold file costs (the mount's counter; a proxy's on network stores).
    """
    from tests.support.proxy import Proxy

    if isinstance(backend, S3Backend) and not ss.big_on_s3:
        raise BenchError(f"moto answers a ranged GET in O(object size) (150 ms per MiB of a "
                         f"256 MiB object): {ss.big_mib} MiB would not read back within the "
                         "budget (--only bigfile with ScaleSizes.big_on_s3 to try)")
    mib = ss.big_mib
    nbytes = mib * MiB
    name = f"big{mib}.bin"
    backend.delete(name)
    out: dict[str, Any] = {"size_mib": mib, "memory_limit_mib": 512}  # the default
    with target.mount(backend, ctx.mnt("big"), ctx.work, label=f"big{mib}w") as m:
        idle = proc_status(m.pid).get("VmRSS", 0)
        src_mib = ctx.sizes.seq_mib
        t0 = time.perf_counter()
        with open(m.path / name, "wb", buffering=0) as f, open(ctx.src, "rb") as src:
            data = src.read()
            for i in range(mib):
                j = i % src_mib
                f.write(memoryview(data)[j * MiB : (j + 1) * MiB])
        took = time.perf_counter() - t0
        out["write_s"] = round(took, 1)
        out["write_mib_s"] = round(mib_s(nbytes, took), 1)
        out["write_rss_peak_mib"] = round(proc_status(m.pid).get("VmHWM", 0) / MiB, 1)
        out["idle_rss_mib"] = round(idle / MiB, 1)
    with contextlib.ExitStack() as stack:
        proxy = stack.enter_context(Proxy(backend.upstream())) if backend.network else None
        endpoint = backend.proxy_endpoint(proxy.url) if proxy is not None else None
        m = stack.enter_context(target.mount(backend, ctx.mnt("big"), ctx.work,
                                             endpoint=endpoint, label=f"big{mib}r"))
        drop_caches()
        path = m.path / name
        if path.stat().st_size != nbytes:
            raise BenchError(f"{name} has {path.stat().st_size} bytes, not {nbytes}")
        before = _status(m)
        if proxy is not None:
            proxy.reset()
        middle = nbytes // 2 + 12345
        with open(path, "rb", buffering=0) as f:
            got = os.pread(f.fileno(), 4096, middle)
        after = _status(m)
        j = (middle // MiB) % src_mib
        with open(ctx.src, "rb") as src:
            src.seek(j * MiB + middle % MiB)
            if got != src.read(4096):
                raise BenchError("the 4 KiB read in the middle returned other bytes")
        out["gets_for_4k_read"] = after["store_reads"] - before["store_reads"]
        out["bytes_for_4k_read"] = after["store_read_bytes"] - before["store_read_bytes"]
        if proxy is not None:
            out["proxy_gets_for_4k_read"] = proxy.stats()["by_method"].get("GET", 0)
        t0 = time.perf_counter()
        subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M", "status=none"],
                       check=True, timeout=3600)
        took = time.perf_counter() - t0
        out["read_s"] = round(took, 1)
        out["read_mib_s"] = round(mib_s(nbytes, took), 1)
        out["read_rss_peak_mib"] = round(proc_status(m.pid).get("VmHWM", 0) / MiB, 1)
    backend.delete(name)
    out["rss_peak_over_idle_mib"] = round(max(out["write_rss_peak_mib"],
                                              out["read_rss_peak_mib"]) - out["idle_rss_mib"], 1)
    return out


# --- 6. long append streams (goal 5) ----------------------------------------------------------
def stream(ss: ScaleSizes, ctx: Any, target: Target, backend: Backend) -> dict[str, Any]:
    """One writer holds a log (8 MiB to start with) open and commits each line (write +
    fsync): the cost of a commit after 1k, 10k and 100k commits onto the same blob (fewer
    on the emulators).

    Each checkpoint row covers the last `stream_window` commits before it: ms per commit,
    and through a proxy on the network stores the requests and bytes each commit sent
    (the line is 40 bytes); on Azure the blob's committed block count against the bound
    blobfs documents (`max_committed_blocks`).
    """
    from tests.support.proxy import Proxy

    counts = {"file": ss.stream_counts, "az": ss.stream_counts_az}.get(
        backend.kind, ss.stream_counts_s3)
    name = "stream.log"
    backend.delete(name)
    # The log starts at 8 MiB: past S3's 5 MiB minimum part, where a commit is a
    # server-side copy of the blob plus the new bytes (below it S3 re-PUTs the blob).
    base = ctx.work / "stream-base.bin"
    with open(ctx.src, "rb") as fin, open(base, "wb") as fout:
        fout.write(fin.read(ss.stream_base_mib * MiB))
    backend.put(name, base)
    base.unlink()
    out: dict[str, Any] = {"base_mib": ss.stream_base_mib}
    window = ss.stream_window
    with contextlib.ExitStack() as stack:
        proxy = stack.enter_context(Proxy(backend.upstream())) if backend.network else None
        endpoint = backend.proxy_endpoint(proxy.url) if proxy is not None else None
        m = stack.enter_context(target.mount(backend, ctx.mnt("stream"), ctx.work,
                                             endpoint=endpoint, label="stream"))
        done = 0
        written = ss.stream_base_mib * MiB
        deadline = time.monotonic() + 30
        while not (m.path / name).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        with open(m.path / name, "ab", buffering=0) as f:
            for count in counts:
                lat: list[float] = []
                while done < count:
                    if done == count - window and proxy is not None:
                        proxy.reset()
                    line = b"%09d a line appended to a long log....\n" % done
                    t0 = time.perf_counter()
                    f.write(line)
                    os.fsync(f.fileno())
                    if done >= count - window:
                        lat.append(time.perf_counter() - t0)
                    done += 1
                    written += len(line)
                row: dict[str, Any] = {"blob_bytes": written,
                                       "ms_p50": round(percentile(lat, 50) * 1e3, 2),
                                       "ms_p90": round(percentile(lat, 90) * 1e3, 2)}
                if proxy is not None:
                    st = proxy.stats()
                    row.update(requests_per_commit=round(st["requests"] / window, 2),
                               bytes_up_per_commit=round(st["bytes_up"] / window),
                               by_method=st["by_method"])
                if isinstance(backend, AzBackend):
                    from blobfs.store.azure.layout import max_committed_blocks

                    blocks = backend.cc.get_blob_client(backend.key(name)).get_block_list(
                        "committed")[0]
                    row["committed_blocks"] = len(blocks)
                    row["block_bound"] = max_committed_blocks(written, 8 * MiB)
                out[f"{count}_commits"] = row
                log(f"  {count} commits: {json.dumps(row)}")
    backend.delete(name)
    first, last = f"{counts[0]}_commits", f"{counts[-1]}_commits"
    out["p50_ratio_last_over_first"] = round(out[last]["ms_p50"] / out[first]["ms_p50"], 2)
    return out


# --- the report section ----------------------------------------------------------------------
SCALE_WORKLOADS = ("list", "idle", "commits", "fuse-ceiling", "bigfile", "stream")


def _flat(figures: dict[str, Any], prefix: str = "") -> list[str]:
    parts = []
    for k, v in figures.items():
        if isinstance(v, dict) and k != "by_method":
            parts += _flat(v, f"{prefix}{k}.")
        else:
            parts.append(f"{prefix}{k}={v}")
    return parts


def section(records: list[dict[str, Any]]) -> list[str]:
    """Markdown lines for the scale rows (empty when none ran)."""
    rows = [r for r in records if r["workload"] in SCALE_WORKLOADS]
    if not rows:
        return []
    lines = ["## Scale (issue 15)", "",
             "list: `ls`, `ls -l`, `find` of N entries on a fresh mount (µs per entry; "
             "file:// also through a passthrough pyfuse3 mount, and `ls -l` first on a "
             "second fresh mount: ls_l_cold; a directory read as `ls -f` on a third: "
             "ls_f_cold, and the time to its first entry). idle: requests/s with N "
             "files open and idle (proxy-counted; USD/day at list prices). commits: "
             "open-append-close onto a blob of the given size. fuse-ceiling: dd bs=1M "
             "through a pyfuse3 filesystem that does nothing vs blobfs on file://.", "",
             "| system | store | workload | figures |", "| --- | --- | --- | --- |"]
    for r in rows:
        if r.get("status") != "ok":
            figures = f"{r.get('status')}: {r.get('reason', '')}"
        else:
            figures = "<br>".join(_flat(r["figures"]))
        lines.append(f"| {r['system']} | {r['store']} | {r['workload']} | {figures} |")
    return lines + [""]
