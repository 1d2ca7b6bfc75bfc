"""`scripts/bench [--quick] [--peers] ...`: run every workload on every store, write the
results (JSON, markdown table, PNG plot) to docs/bench/.

Everything talks to 127.0.0.1 only, runs in a temp dir under /tmp, is bounded in time
(per workload, plus an overall budget after which the rest is skipped and says so) and
stops the servers and mounts it started, by PID, however it ends.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchlib import loggers, report, scale, workloads
from benchlib.common import ROOT, BenchError, MiB, is_mounted, lazy_unmount, log
from benchlib.stores import Backend
from benchlib.targets import Rclone, Target, by_name, strip_version_null

DEFAULT_WORKLOADS = ("write", "read", "append", "tail", "ready", "rss", "nginx", "pylog",
                     "http")
#: The scale rows (issue 15) run only when asked for:
#: --only list,idle,commits,fuse-ceiling,bigfile,stream.
WORKLOADS = (*DEFAULT_WORKLOADS, *scale.SCALE_WORKLOADS)
PEERS = ("s3fs", "rclone", "rclone-writes")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="scripts/bench",
        description="Benchmark blobfs on file://, S3 (moto server) and Azure (Azurite), "
        "all on 127.0.0.1, against the SDK ceiling and (with --peers) s3fs and rclone.")
    p.add_argument("--quick", action="store_true",
                   help="smaller sizes and counts (64 MiB sequential, 200 appends): ~5 min")
    p.add_argument("--peers", action="store_true",
                   help="also run s3fs and rclone (off and writes VFS cache modes)")
    p.add_argument("--stores", default="file,s3,az",
                   help="comma-separated: file,s3,rgw,az (rgw: S3 on Ceph's RADOS Gateway)")
    p.add_argument("--only", default=",".join(DEFAULT_WORKLOADS),
                   help=f"comma-separated workloads: {','.join(WORKLOADS)} (default: "
                   f"{','.join(DEFAULT_WORKLOADS)})")
    p.add_argument("--systems", default=None,
                   help="comma-separated filesystems (default: blobfs, plus the peers); "
                   "blobfs[OPT=V+OPT=V] is blobfs with those mount options")
    p.add_argument("--profile", action="store_true",
                   help="sample the blobfs daemon with py-spy during write, read and append")
    p.add_argument("--out", default=str(ROOT / "docs" / "bench"),
                   help="where results.{md,json,png} go (default docs/bench)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds after which remaining workloads are skipped "
                   "(default 1500 per filesystem, 600 with --quick)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="first wait up to SECONDS for the 1-minute load average to drop "
                   "below the CPU count (the run records the load either way)")
    p.add_argument("--list-counts", default=None, metavar="N,N,...",
                   help="directory sizes of the list row on every store (default 1000,10000,"
                   "100000 on file:// and 1000,10000 on the network stores, whose seeding "
                   "of 100,000 objects takes minutes to tens of minutes)")
    p.add_argument("--keep-work", action="store_true", help="keep the temp dir (logs)")
    p.add_argument("--render", action="store_true",
                   help="only rebuild results.md and results.png from results.json")
    return p.parse_args(argv)


def sizes_for(quick: bool) -> workloads.Sizes:
    if quick:
        return workloads.Sizes(seq_mib=64, appends=200, tail_lines=40, ready_runs=3,
                               writer_mib=1, idle_wait=2.0)
    return workloads.Sizes()


class Run:
    """The results of one bench run, as records the report turns into tables."""

    def __init__(self, meta: dict[str, Any], budget: float) -> None:
        self.meta = meta
        self.records: list[dict[str, Any]] = []
        self.t0 = time.monotonic()
        self.budget = budget

    def over_budget(self) -> bool:
        return time.monotonic() - self.t0 > self.budget

    def measure(self, system: str, store: str, workload: str,
                fn: Callable[[], dict[str, Any]], skip: str | None = None) -> None:
        rec: dict[str, Any] = {"system": system, "store": store, "workload": workload}
        if skip is None and self.over_budget():
            skip = f"skipped: the run passed its {self.budget:g}s budget"
        if skip is not None:
            rec.update(status="skipped", reason=skip)
            log(f"{system} {store} {workload}: {skip}")
            self.records.append(rec)
            return
        log(f"{system} {store} {workload} ...")
        t0 = time.monotonic()
        try:
            rec.update(status="ok", figures=fn())
            log(f"  -> {json.dumps(rec['figures'])}")
        except BenchError as exc:
            rec.update(status="failed", reason=str(exc))
            log(f"  -> could not run: {exc}")
        except Exception as exc:  # a bench bug or a tool crash: record it, carry on
            rec.update(status="failed", reason=f"{type(exc).__name__}: {exc}")
            log(f"  -> error: {exc}\n{traceback.format_exc()}")
        rec["elapsed_s"] = round(time.monotonic() - t0, 1)
        self.records.append(rec)


def _cmd_version(cmd: list[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    out = (res.stdout or res.stderr).strip().splitlines()
    return out[0].strip() if out else None


def _git_rev() -> str:
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain",
                                "--untracked-files=no"],
                               capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return f"{rev}{'+dirty' if dirty else ''}" if rev else "unknown"


def collect_meta(args: argparse.Namespace, sizes: workloads.Sizes) -> dict[str, Any]:
    from importlib import metadata

    def pkg(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    azurite = None
    pkg_json = ROOT / ".tools" / "node_modules" / "azurite" / "package.json"
    if pkg_json.exists():
        azurite = json.loads(pkg_json.read_text()).get("version")
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "scripts/bench " + " ".join(sys.argv[1:]),
        "quick": args.quick,
        "machine": {"nproc": os.cpu_count(), "memory_gib": round(mem / (1 << 30), 1),
                    "kernel": platform.release(), "cpu": cpu,
                    "loadavg_start": os.getloadavg()[0]},
        "versions": {
            "python": platform.python_version(), "blobfs": _git_rev(),
            "moto": pkg("moto"), "azurite": azurite, "boto3": pkg("boto3"),
            "azure-storage-blob": pkg("azure-storage-blob"), "pyfuse3": pkg("pyfuse3"),
            "trio": pkg("trio"), "fuse3": _cmd_version(["fusermount3", "-V"]),
            "s3fs": _cmd_version(["s3fs", "--version"]),
            "rclone": _cmd_version(["rclone", "version"]),
        },
        "sizes": vars(sizes),
    }


def _wait_quiet(timeout: float) -> None:
    deadline = time.monotonic() + timeout
    limit = os.cpu_count() or 1
    while os.getloadavg()[0] >= limit and time.monotonic() < deadline:
        log(f"load average {os.getloadavg()[0]:.1f} >= {limit}: waiting for a quieter machine")
        time.sleep(min(15.0, max(0.0, deadline - time.monotonic())))


def make_sources(sizes: workloads.Sizes) -> tuple[Path, Path]:
    """The random source file (sequential runs) and the append base, on tmpfs so that
    reading them costs nothing and survives drop_caches."""
    shm = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else Path(tempfile.gettempdir())
    src = shm / f"bench-{os.getpid()}-src.bin"
    base = shm / f"bench-{os.getpid()}-base.bin"
    with open(src, "wb") as f:
        for _ in range(sizes.seq_mib):
            f.write(os.urandom(MiB))
    with open(src, "rb") as fin, open(base, "wb") as fout:
        fout.write(fin.read(sizes.base_mib * MiB))
        if fout.tell() < sizes.base_mib * MiB:
            fout.write(os.urandom(sizes.base_mib * MiB - fout.tell()))
    return src, base


def _append(ctx: workloads.Ctx, target: Target, backend: Backend) -> dict[str, Any]:
    """The append workload, through a counting proxy on the network stores."""
    from tests.support.proxy import Proxy

    if not backend.network:
        return workloads.appends(ctx, target, backend, None)
    with Proxy(backend.upstream()) as proxy:
        if isinstance(target, Rclone) and backend.kind == "s3":
            proxy.hook = strip_version_null(backend.upstream())
        return workloads.appends(ctx, target, backend, proxy)


def _http(ctx: workloads.Ctx, target: Target, backend: Backend) -> dict[str, Any]:
    from benchlib.http import http_face

    return http_face(ctx, target, backend)


RUNNERS: dict[str, Callable[[workloads.Ctx, Target, Backend], dict[str, Any]]] = {
    "write": workloads.seq_write,
    "read": workloads.seq_read,
    "append": _append,
    "tail": workloads.live_tail,
    "ready": workloads.ready,
    "rss": workloads.memory,
    "nginx": loggers.nginx,
    "pylog": loggers.python_logging,
    "http": _http,
}


def scale_runners(quick: bool, list_counts: str | None = None) -> None:
    """Add issue 15's scale workloads (scripts/benchlib/scale.py) at the run's sizes."""
    ss = scale.QUICK if quick else scale.ScaleSizes()
    if list_counts:
        try:
            counts = tuple(int(n) for n in list_counts.split(","))
        except ValueError:
            raise SystemExit(
                f"scripts/bench: --list-counts takes numbers, not {list_counts!r}") from None
        if not counts or min(counts) < 1:
            raise SystemExit("scripts/bench: --list-counts takes positive numbers")
        ss = dataclasses.replace(ss, list_counts=counts, list_counts_net=counts)
    RUNNERS.update({
        "list": functools.partial(scale.listing, ss),
        "idle": functools.partial(scale.idle, ss),
        "commits": functools.partial(scale.commits, ss),
        "fuse-ceiling": functools.partial(scale.fuse_ceiling, ss),
        "bigfile": functools.partial(scale.big_file, ss),
        "stream": functools.partial(scale.stream, ss),
    })


def run_store(run: Run, ctx: workloads.Ctx, backend: Backend, targets: list[Target],
              only: list[str]) -> None:
    kind = backend.kind
    if {"write", "read"} & set(only):
        run.measure("sdk", kind, "ceiling", functools.partial(workloads.ceiling, ctx, backend))
    for target in targets:
        reason = target.unsupported(backend)
        for w in only:
            run.measure(target.name, kind, w,
                        functools.partial(RUNNERS[w], ctx, target, backend), reason)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.render:
        report.rerender(Path(args.out))
        return 0
    if os.geteuid() != 0:
        print("bench: run as root (it drops the page cache and mounts FUSE filesystems)",
              file=sys.stderr)
        return 2
    kinds = [k for k in args.stores.split(",") if k]
    only = [w for w in args.only.split(",") if w]
    bad = [w for w in only if w not in WORKLOADS]
    if bad:
        print(f"bench: unknown workload(s) {bad}; pick from {WORKLOADS}", file=sys.stderr)
        return 2
    systems = args.systems.split(",") if args.systems else \
        ["blobfs", *(PEERS if args.peers else ())]
    targets = [by_name(s) for s in systems]
    sizes = sizes_for(args.quick)
    scale_runners(args.quick, args.list_counts)
    _wait_quiet(args.wait_quiet)
    # An upper bound that stops the run by itself; a default run takes well under it.
    budget = args.budget or (600.0 if args.quick else 1500.0) * len(targets)
    out_dir = Path(args.out)
    meta = collect_meta(args, sizes)
    meta["systems"] = {t.name: t.description for t in targets}
    run = Run(meta, budget)
    work = Path(tempfile.mkdtemp(prefix="bench-", dir="/tmp"))
    log(f"work dir {work}; stores {kinds}; systems {systems}; workloads {only}")
    src = base = None
    try:
        src, base = make_sources(sizes)
        profile_dir = out_dir / "profiles" if args.profile else None
        ctx = workloads.Ctx(work=work, src=src, base_src=base, sizes=sizes,
                            profile_dir=profile_dir)
        from benchlib import stores

        with stores.start(kinds, work) as servers:
            for kind, backend in servers.backends.items():
                server = getattr(backend, "server", None)
                pid = getattr(server, "pid", None) or getattr(getattr(server, "proc", None),
                                                              "pid", None)
                if pid:
                    ctx.server_pids[kind] = pid
            meta["server_pids"] = ctx.server_pids
            for kind in kinds:
                run_store(run, ctx, servers.backends[kind], targets, only)
    finally:
        mnt_root = work / "mnt"
        if mnt_root.exists():
            for path in mnt_root.iterdir():
                if is_mounted(path):
                    lazy_unmount(path)
        for path in (src, base):
            if path is not None:
                path.unlink(missing_ok=True)
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    meta["loadavg_end"] = os.getloadavg()[0]
    meta["elapsed_s"] = round(time.monotonic() - run.t0, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    report.write_all(out_dir, meta, run.records)
    log(f"done in {meta['elapsed_s']:.0f}s: {out_dir / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
