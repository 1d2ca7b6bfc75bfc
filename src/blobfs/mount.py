"""Startup and shutdown of a mount: the composition root.

Builds the store, the core and the FUSE adapter, owns the nursery, handles signals, and
on the way out commits everything pending before unmounting (SPEC §4).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import signal
import subprocess
from pathlib import Path

import pyfuse3
import trio

from blobfs.config import MountConfig
from blobfs.errors import AccessDenied, NotFound, StoreError, StoreUnavailable, UsageError
from blobfs.fs.core import Filesystem
from blobfs.fs.recovery import recover_spool
from blobfs.fs.spool import Spool
from blobfs.fuse_ops import FuseOps
from blobfs.store import open_store
from blobfs.store.base import ObjectStore
from blobfs.types import Ino

log = logging.getLogger(__name__)

EXIT_USAGE = 2
EXIT_STORE = 3
EXIT_FUSE = 4


def runtime_dir() -> Path:
    if os.geteuid() == 0:
        return Path("/run/blobfs")
    return Path(os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/blobfs-{os.getuid()}") / "blobfs"


def state_file(mountpoint: Path) -> Path:
    # abspath, not resolve(): stat-ing our own mountpoint from the trio thread deadlocks.
    digest = hashlib.sha256(os.path.abspath(mountpoint).encode()).hexdigest()[:16]
    return runtime_dir() / f"{digest}.json"


def is_mountpoint(path: Path) -> bool:
    target = os.path.abspath(path)
    with open("/proc/mounts") as f:
        return any(line.split()[1] == target for line in f)


def preflight(cfg: MountConfig) -> None:
    """Check what can be checked before touching the store. Raises UsageError."""
    if not os.path.exists("/dev/fuse"):
        raise UsageError("/dev/fuse is missing: load the fuse module (modprobe fuse) or run "
                         "the container with --device /dev/fuse", EXIT_FUSE)
    mnt = cfg.mountpoint
    try:
        os.stat(mnt)
    except FileNotFoundError:
        raise UsageError(f"mountpoint {mnt} does not exist: create it (mkdir -p {mnt})") \
            from None
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise UsageError(f"mountpoint {mnt}: {exc.strerror}") from None
        # A dead earlier mount ("Transport endpoint is not connected"): clear it (SPEC §5).
        log.warning("clearing a dead mount left at %s", mnt)
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not mnt.is_dir():
        raise UsageError(f"mountpoint {mnt} is not a directory: pick a directory")
    if is_mountpoint(mnt):
        raise UsageError(f"mountpoint {mnt} is busy: something is already mounted there "
                         f"(blobfs unmount {mnt})")
    try:
        cfg.cache_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(cfg.cache_dir, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "not writable")
    except OSError as exc:
        raise UsageError(f"cache_dir {cfg.cache_dir} is not usable: {exc.strerror}; pick "
                         "another with -o cache_dir=DIR") from None


async def check_store(cfg: MountConfig) -> ObjectStore:
    store = open_store(cfg.source, cfg.store)
    try:
        await store.check()
    except NotFound as exc:
        raise UsageError(f"{store.display} does not exist ({exc}): create it first, or fix "
                         "the source URL", EXIT_STORE) from None
    except AccessDenied as exc:
        raise UsageError(f"{store.display}: access denied ({exc}): check the credentials",
                         EXIT_STORE) from None
    except StoreUnavailable as exc:
        raise UsageError(f"{store.display} cannot be reached ({exc}): check the endpoint "
                         "and the network", EXIT_STORE) from None
    except StoreError as exc:
        raise UsageError(f"{store.display}: {exc}", EXIT_STORE) from None
    return store


def fuse_options(cfg: MountConfig) -> set[str]:
    opts = {"fsname=blobfs", "subtype=blobfs", "default_permissions"}
    if cfg.allow_other:
        opts.add("allow_other")
    if cfg.read_only:
        opts.add("ro")
    return opts


async def serve(cfg: MountConfig, *, on_ready: object = None) -> int:
    """Mount, serve until unmounted or signalled, commit what is pending, return exit code."""
    store = await check_store(cfg)
    spool = Spool(cfg.cache_dir, cfg.source)
    spool.prepare()  # locks it: one running mount per source and cache_dir
    failed: list[str] = []
    async with trio.open_nursery() as nursery:

        def invalidate(ino: Ino) -> None:
            nursery.start_soon(_invalidate_inode, ino)

        fs = Filesystem.create(store, cfg, spool=spool, nursery=nursery,
                               invalidate=invalidate)
        # Finish what a crashed run left in the spool before serving (SPEC §4).
        report = await recover_spool(store, spool, fs.make_writer)
        for writer in report.writers:
            fs.adopt(writer)
        ops = FuseOps(fs)
        try:
            pyfuse3.init(ops, str(cfg.mountpoint), fuse_options(cfg))
        except RuntimeError as exc:
            raise UsageError(f"cannot mount at {cfg.mountpoint}: {exc}", EXIT_FUSE) from None
        _write_state(cfg)
        nursery.start_soon(_watch_signals, fs)
        nursery.start_soon(_announce_ready, cfg, on_ready)
        log.info("mounted %s at %s (block_size=%d commit_interval=%gs close=%s)",
                 store.display, cfg.mountpoint, cfg.block_size, cfg.commit_interval,
                 cfg.close)
        try:
            await pyfuse3.main()
        finally:
            fs.shutting_down = True
            with trio.move_on_after(cfg.shutdown_timeout) as scope:
                scope.shield = True
                failed = await fs.flush_all()
            if scope.cancelled_caught:
                log.error("shutdown_timeout (%gs) passed with data still pending; it stays "
                          "in the spool at %s", cfg.shutdown_timeout, spool.root)
            pyfuse3.close(unmount=True)
            _remove_state(cfg)
            nursery.cancel_scope.cancel()
    await store.aclose()
    if failed:
        log.error("%d file(s) could not be committed and stay in the spool: %s",
                  len(failed), ", ".join(failed))
        return 1
    log.info("unmounted %s cleanly", cfg.mountpoint)
    return 0


async def _invalidate_inode(ino: Ino) -> None:
    # invalidate_inode can block on the kernel: never on the trio thread (STYLE §4).
    try:
        await trio.to_thread.run_sync(pyfuse3.invalidate_inode, ino)
    except OSError as exc:
        log.debug("invalidate_inode(%d): %s", ino, exc)


async def _watch_signals(fs: Filesystem) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                continue
            log.info("got %s: committing pending data and unmounting",
                     signal.Signals(signum).name)
            fs.shutting_down = True
            pyfuse3.terminate()
            return


async def _announce_ready(cfg: MountConfig, on_ready: object) -> None:
    # The mount answers once the kernel gets a reply to a stat through it.
    await trio.to_thread.run_sync(os.stat, cfg.mountpoint)
    if callable(on_ready):
        on_ready()


def _write_state(cfg: MountConfig) -> None:
    try:
        path = state_file(cfg.mountpoint)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"pid": os.getpid(), "mountpoint": str(cfg.mountpoint),
                                    "source": cfg.source, "cache_dir": str(cfg.cache_dir)}))
    except OSError as exc:
        log.warning("cannot record the mount in %s: %s", runtime_dir(), exc)


def _remove_state(cfg: MountConfig) -> None:
    try:
        state_file(cfg.mountpoint).unlink()
    except OSError:
        pass
