"""The scale workloads of issue 15: big directories, idle open files, the cost of a commit
as the blob grows, and the do-nothing pyfuse3 filesystem as the ceiling for file://.

Each returns figures and, where the issue asks for one, the ratio measured in the same
run (per-entry cost at the largest directory over the smallest; blobfs over the
passthrough baseline; blobfs over the null filesystem). `section(records)` renders them.
"""

from __future__ import annotations

import contextlib
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
    BenchError,
    MiB,
    drop_caches,
    lazy_unmount,
    log,
    mib_s,
    percentile,
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
    commits_per_size: int = 30
    ceiling_mib: tuple[int, ...] = (256, 2048)


QUICK = ScaleSizes(list_counts=(1000, 10000), list_counts_net=(1000, 5000),
                   idle_counts=(55, 200), idle_seconds=5.0, commit_mib=(1, 64, 256),
                   commit_mib_net=(1, 16), commits_per_size=20, ceiling_mib=(256,))


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
            with helper_mount(ctx, "passthrough", "passthrough",
                              str(backend.path(folder))) as p:
                took = _timed(_list_cmds(p)["ls_l"])
                row["passthrough_ls_l_s"] = round(took, 3)
                row["ls_l_over_passthrough"] = round(row["ls_l_s"] / took, 2)
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
    sizes = ss.commit_mib if not backend.network else ss.commit_mib_net
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


def fuse_ceiling(ss: ScaleSizes, ctx: Any, target: Target,
                 backend: Backend) -> dict[str, Any]:
    """dd bs=1M through a pyfuse3 filesystem that does nothing, and through blobfs on
    file:// in the same run, at each size: blobfs as a share of the ceiling."""
    if not isinstance(backend, FileBackend):
        raise BenchError("the ceiling row is for file:// (the network stores have the SDK's)")
    out: dict[str, Any] = {}
    for size_mib in ss.ceiling_mib:
        nbytes = size_mib * MiB
        row: dict[str, Any] = {}
        with helper_mount(ctx, "null", "null", "--size", str(nbytes)) as mnt:
            row["null_write_mib_s"] = round(_dd_rate(
                ["if=/dev/zero", f"of={mnt / 'out'}", f"count={size_mib}"], nbytes), 1)
            row["null_read_mib_s"] = round(_dd_rate(
                [f"if={mnt / 'zero'}", "of=/dev/null"], nbytes), 1)
        name = f"ceil{size_mib}.bin"
        backend.delete(name)
        with target.mount(backend, ctx.mnt("ceil"), ctx.work, label=f"ceil{size_mib}") as m:
            t0 = time.perf_counter()
            subprocess.run(["dd", "if=/dev/zero", f"of={m.path / name}", "bs=1M",
                            f"count={size_mib}", "status=none"], check=True, timeout=1800)
            row["blobfs_write_mib_s"] = round(mib_s(nbytes, time.perf_counter() - t0), 1)
        with target.mount(backend, ctx.mnt("ceil"), ctx.work, label=f"ceil{size_mib}r") as m:
            drop_caches()
            row["blobfs_read_mib_s"] = round(_dd_rate(
                [f"if={m.path / name}", "of=/dev/null"], nbytes), 1)
        backend.delete(name)
        row["write_share"] = round(row["blobfs_write_mib_s"] / row["null_write_mib_s"], 2)
        row["read_share"] = round(row["blobfs_read_mib_s"] / row["null_read_mib_s"], 2)
        out[f"{size_mib}MiB"] = row
    return out


# --- the report section ----------------------------------------------------------------------
SCALE_WORKLOADS = ("list", "idle", "commits", "fuse-ceiling")


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
             "file:// also through a passthrough pyfuse3 mount). idle: requests/s with N "
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
