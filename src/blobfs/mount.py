"""Startup and shutdown of a mount: the composition root.

Builds the store, the core and the FUSE adapter, owns the nursery, handles signals, and
on the way out commits everything pending before unmounting (semantics §4). It also starts the
service-side workers around the mount: systemd notifications and watchdog (`systemd`), the
status socket (`telemetry`) and Prometheus metrics (`metrics`), and records each mount in
`runtime_dir()` for `blobfs status` and `blobfs unmount`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import resource
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pyfuse3
import trio

from blobfs import metrics, systemd
from blobfs.budget import tune_malloc
from blobfs.config import MountConfig
from blobfs.errors import UsageError
from blobfs.fs.core import Filesystem
from blobfs.fs.journal import JournalCorrupt, read_journal
from blobfs.fs.spool import Spool, ensure_private_dir
from blobfs.fuse_ops import FuseOps
from blobfs.log import redact
from blobfs.preflight import check_store
from blobfs.runtime import control_socket, prepare_runtime_dir, runtime_dir, state_file
from blobfs.systemd import Notifier
from blobfs.telemetry import (
    Meter,
    Telemetry,
    metered,
    open_control_listener,
    serve_control,
)
from blobfs.types import Ino

log = logging.getLogger(__name__)

EXIT_USAGE = 2
EXIT_FUSE = 4


def is_mountpoint(path: Path) -> bool:
    """Whether something is mounted at `path`, from /proc/mounts (no syscall on `path`,
    which could hang on a stuck mount)."""
    target = os.path.abspath(path)
    with open("/proc/mounts") as f:
        return any(_unescape(line.split()[1]) == target for line in f)


def fstype_at(path: Path) -> str | None:
    """The type (fuse.blobfs, ...) of what is mounted at `path` (the topmost mount), from
    /proc/self/mountinfo: no syscall on `path`."""
    target = os.path.abspath(path)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if _unescape(fields[4]) == target and "-" in fields:
                found = fields[fields.index("-", 6) + 1]
    return found


def _unescape(field: str) -> str:
    # /proc/mounts writes space, tab, newline and backslash as octal escapes.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _probe(mnt: Path, timeout: float = 5.0) -> str:
    """'alive', 'dead' (ENOTCONN) or why the mount at `mnt` does not answer.

    statfs always reaches the daemon (a stat may be answered from the kernel's attribute
    cache for a while after the daemon died); a thread keeps a hung daemon from hanging us.
    """
    result: list[str] = []

    def run() -> None:
        try:
            os.statvfs(mnt)
            result.append("alive")
        except OSError as exc:
            result.append("dead" if exc.errno == errno.ENOTCONN else exc.strerror or str(exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    return result[0] if result else f"no answer within {timeout:g}s"


def preflight(cfg: MountConfig) -> None:
    """Check what can be checked before touching the store. Raises UsageError."""
    if not os.path.exists("/dev/fuse"):
        raise UsageError("/dev/fuse is missing: load the fuse module (modprobe fuse) or run "
                         "the container with --device /dev/fuse", EXIT_FUSE)
    mnt = cfg.mountpoint
    if is_mountpoint(mnt):
        state = _probe(mnt)
        if state != "dead":
            detail = "" if state == "alive" else f" ({state})"
            raise UsageError(f"mountpoint {mnt} is busy: something is already mounted "
                             f"there{detail} (blobfs unmount {mnt})")
        # A dead earlier mount ("Transport endpoint is not connected"): clear it (semantics §5).
        log.warning("clearing a dead mount left at %s by a daemon that is gone", mnt)
        _clear_dead_mount(mnt)
    try:
        os.stat(mnt)
    except FileNotFoundError:
        raise UsageError(f"mountpoint {mnt} does not exist: create it (mkdir -p {mnt})") \
            from None
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise UsageError(f"mountpoint {mnt}: {exc.strerror}") from None
        # Dead, though absent from /proc/mounts (another mount namespace's view).
        log.warning("clearing a dead mount left at %s by a daemon that is gone", mnt)
        _clear_dead_mount(mnt)
    if not mnt.is_dir():
        raise UsageError(f"mountpoint {mnt} is not a directory: pick a directory")
    if is_mountpoint(mnt):
        raise UsageError(f"mountpoint {mnt} is busy: something is already mounted there "
                         f"(blobfs unmount {mnt})")
    ensure_private_dir(cfg.cache_dir, "cache_dir", follow=True)


def _clear_dead_mount(mnt: Path) -> None:
    """Lazily unmount a dead FUSE mount. Raises UsageError when it stays."""
    commands = [["fusermount3", "-u", "-z", str(mnt)]]
    if os.geteuid() == 0:
        # Root may lack fusermount3 (or it may refuse a mount missing from mtab).
        commands.append(["umount", "-l", str(mnt)])
    detail = ""
    for cmd in commands:
        if shutil.which(cmd[0]) is None:
            detail = f"{cmd[0]} is not installed"
            continue
        res = subprocess.run(cmd, check=False, capture_output=True, text=True)
        detail = res.stderr.strip() or detail
        if not is_mountpoint(mnt):
            return
    raise UsageError(f"a dead mount is left at {mnt} and cannot be cleared ({detail}): run "
                     f"fusermount3 -u -z {mnt} as its owner, or umount -l {mnt} as root")


def fuse_options(cfg: MountConfig) -> set[str]:
    opts = {f"fsname={fsname(cfg.source)}", "subtype=blobfs", "default_permissions"}
    if cfg.allow_other:
        opts.add("allow_other")
    if cfg.read_only:
        opts.add("ro")
    return opts


def fsname(source: str) -> str:
    """The mount's source as /proc/mounts, findmnt and systemd (`What=`) show it: the store
    URL as given (what an fstab line names), secrets removed. libfuse splits options at
    commas (backslash escapes them), and pyfuse3 passes options as ASCII."""
    text = redact(source).replace("\\", "\\\\").replace(",", "\\,")
    return text if text.isascii() else "blobfs"


async def serve(cfg: MountConfig, *, notifier: Notifier | None = None,
                on_ready: Callable[[], None] | None = None) -> int:
    """Mount, serve until unmounted or signalled, commit what is pending; the exit code.

    Args:
        cfg: the mount's configuration.
        notifier: where systemd notifications go (STATUS, WATCHDOG, STOPPING; and READY
            unless `on_ready` is given). None sends nothing.
        on_ready: called once the mountpoint answers, instead of sending READY=1: a
            daemonizing parent announces readiness itself (with MAINPID).

    Raises:
        UsageError: the store, the mountpoint or the metrics address is unusable.
    """
    # First, before any thread allocates: freed write buffers must not stay resident.
    tune_malloc()
    raise_nofile_limit()
    try:
        return await _serve(cfg, notifier or Notifier(None), on_ready)
    except BaseExceptionGroup as group:
        # A nursery wraps even a lone startup error; the CLI wants it as itself.
        usage = _lone(group, UsageError)
        if usage is None:
            raise
        raise usage from None


def raise_nofile_limit() -> None:
    """Raise the soft descriptor limit to the hard one: systemd's default soft limit
    (1024) is small for a daemon holding spool files, store connections and sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard limit: the kernel's own ceiling (fs.nr_open, 2^20 by default).
    target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.debug("descriptor limit stays at %d: %s", soft, exc)


def _lone(group: BaseExceptionGroup, kind: type[BaseException]) -> BaseException | None:
    leaves = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for sub in exc.exceptions:
                walk(sub)
        elif not isinstance(exc, trio.Cancelled):
            leaves.append(exc)

    walk(group)
    return leaves[0] if len(leaves) == 1 and isinstance(leaves[0], kind) else None


async def _serve(cfg: MountConfig, notifier: Notifier,
                 on_ready: Callable[[], None] | None) -> int:
    target = metrics.parse_target(cfg.metrics) if cfg.metrics else None
    raw_store = await check_store(cfg)
    store = metered(raw_store, Meter())
    telemetry = Telemetry(cfg, store, raw_store.display)
    http: list[trio.SocketListener] = []
    if target is not None and target.port is not None:
        try:
            http = await metrics.open_http_listeners(target)
        except OSError as exc:
            await raw_store.aclose()
            raise UsageError(f"cannot serve metrics on {cfg.metrics}: {exc.strerror or exc}; "
                             "pick another address with -o metrics=HOST:PORT") from None
    spool = Spool(cfg.cache_dir, cfg.source)
    spool.prepare()  # locks it: one running mount per source and cache_dir
    failed: list[str] = []
    async with trio.open_nursery() as nursery:

        def invalidate(ino: Ino) -> None:
            nursery.start_soon(_invalidate_inode, ino)

        def invalidate_entry(parent_ino: Ino, name: str) -> None:
            nursery.start_soon(_invalidate_entry, parent_ino, name)

        fs = Filesystem.create(store, cfg, spool=spool, nursery=nursery,
                               invalidate=invalidate, invalidate_entry=invalidate_entry)
        telemetry.attach(fs)
        if cfg.read_only:
            # A read-only mount never writes to the store, not even a spool's leftovers.
            telemetry.damaged = await trio.to_thread.run_sync(_report_left_spool, spool)
        else:
            # Finish what a crashed run left in the spool before serving (semantics §4).
            # Its commits count like any other (the metered store counted their bytes).
            telemetry.damaged = (await fs.recover()).damaged
        ops = FuseOps(fs)
        runtime_ok = await trio.to_thread.run_sync(prepare_runtime_dir)
        control = await open_control_listener(control_socket(cfg.mountpoint)) \
            if runtime_ok else None
        try:
            pyfuse3.init(ops, str(cfg.mountpoint), fuse_options(cfg))
        except RuntimeError as exc:
            if control is not None:
                await control.aclose()
                control_socket(cfg.mountpoint).unlink(missing_ok=True)
            raise UsageError(f"cannot mount at {cfg.mountpoint}: {exc}", EXIT_FUSE) from None
        if cfg.http:
            from blobfs import http as http_face

            await http_face.start(cfg, fs, nursery)  # the mount's own view, over HTTP
        if runtime_ok:
            _write_state(cfg, control is not None, spool)
        nursery.start_soon(_watch_signals, fs, ops, notifier, telemetry)
        nursery.start_soon(ops.requests.run_reaper)
        nursery.start_soon(_announce_ready, cfg, notifier, telemetry, on_ready)
        if control is not None:
            nursery.start_soon(serve_control, control, telemetry)
        if http:
            nursery.start_soon(metrics.serve_http, http, telemetry.snapshot)
        if target is not None and target.path is not None:
            nursery.start_soon(metrics.run_textfile, target.path, telemetry.snapshot)
        nursery.start_soon(systemd.run_status, notifier, telemetry.summary)
        log.info("mounted %s at %s (block_size=%d commit_interval=%gs close=%s "
                 "memory_limit=%d: %d requests at once%s%s)",
                 raw_store.display, cfg.mountpoint, cfg.block_size, cfg.commit_interval,
                 cfg.close, cfg.memory_limit, cfg.budget.requests,
                 f" endpoint={cfg.endpoint}" if cfg.endpoint else "",
                 f" metrics={cfg.metrics}" if cfg.metrics else "")
        try:
            await serve_requests(cfg)
        finally:
            fs.begin_shutdown()
            notifier.stopping(telemetry.summary())
            failed = await fs.final_flush(cfg.shutdown_timeout)
            pyfuse3.close(unmount=True)
            _remove_state(cfg)
            if target is not None and target.path is not None:
                # The last numbers stay behind, with blobfs_up 0, for whoever scrapes them.
                with trio.CancelScope(shield=True), contextlib.suppress(OSError):
                    await metrics.write_textfile(target.path, telemetry.snapshot())
            nursery.cancel_scope.cancel()
    await raw_store.aclose()
    notifier.close()
    if failed:
        log.error("%d file(s) could not be committed and stay in the spool: %s",
                  len(failed), ", ".join(failed))
        return 1
    log.info("unmounted %s cleanly", cfg.mountpoint)
    return 0


def _report_left_spool(spool: Spool) -> list[str]:
    """Log what a read-only mount leaves in its spool; the damaged journals (blocking)."""
    keys, damaged = [], []
    for journal in spool.entries():
        try:
            keys.append(read_journal(journal).header.key)
        except JournalCorrupt as exc:
            log.error("%s; the entry is kept", exc)
            damaged.append(str(journal))
        except OSError as exc:
            log.warning("cannot read spool journal %s: %s", journal, exc)
    if keys:
        log.warning("read_only: %d file(s) pending in the spool at %s are left as they are "
                    "(mount read-write or run blobfs recover to commit them): %s",
                    len(keys), spool.root, ", ".join(sorted(keys)))
    return damaged


async def serve_requests(cfg: MountConfig) -> None:
    """Run pyfuse3's main loop with as many request tasks as the memory budget allows.

    Each task keeps libfuse's 1 MiB receive buffer, and a write's data is copied before
    our handler runs, so the task count is what bounds the memory of requests (semantics §5).
    """
    await pyfuse3.main(max_tasks=cfg.budget.requests)


async def _invalidate_inode(ino: Ino) -> None:
    # invalidate_inode can block on the kernel: never on the trio thread (STYLE §4).
    try:
        await trio.to_thread.run_sync(pyfuse3.invalidate_inode, ino)
    except OSError as exc:
        log.debug("invalidate_inode(%d): %s", ino, exc)


async def _invalidate_entry(parent_ino: Ino, name: str) -> None:
    # A name that now has a new inode: the kernel looks it up again at once instead of
    # after entry_timeout, so `tail -F` sees "replaced" sooner. Blocking: in a thread.
    try:
        await trio.to_thread.run_sync(pyfuse3.invalidate_entry, parent_ino, os.fsencode(name))
    except OSError as exc:
        log.debug("invalidate_entry(%d, %r): %s", parent_ino, name, exc)


async def _watch_signals(fs: Filesystem, ops: FuseOps, notifier: Notifier,
                         telemetry: Telemetry) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                continue
            log.info("got %s: committing pending data and unmounting",
                     signal.Signals(signum).name)
            fs.begin_shutdown()
            notifier.stopping(telemetry.summary())
            pyfuse3.terminate()
            # pyfuse3's loop returns once the requests running have ended: those that
            # only ask (a lookup paging a huge listing) end now, not when done.
            ops.requests.abandon_all()
            return


async def _announce_ready(cfg: MountConfig, notifier: Notifier, telemetry: Telemetry,
                          on_ready: Callable[[], None] | None) -> None:
    """Announce readiness once the mountpoint answers, then feed the watchdog."""
    # The mount answers once the kernel gets a reply to a stat through it. The stat runs
    # in a thread because this very loop has to answer it.
    try:
        st = await trio.to_thread.run_sync(os.stat, cfg.mountpoint)
    except OSError as exc:
        # Stopped (SIGTERM, umount) before the first stat came back: nothing to announce.
        log.debug("%s did not answer before shutdown: %s", cfg.mountpoint, exc)
        return
    await trio.to_thread.run_sync(_raise_readahead, st.st_dev)
    if on_ready is not None:
        on_ready()
    else:
        notifier.ready(status=telemetry.summary())
    log.debug("%s answers", cfg.mountpoint)
    # systemd arms the watchdog only once READY=1 arrived (and a daemonized child becomes
    # the main PID only then), so the pings start here.
    await systemd.run_watchdog(notifier)


#: Kernel read-ahead for the mount, in KiB. FUSE_INIT caps it at the kernel's default
#: (128 KiB), so a cold sequential read reaches the daemon as 128 KiB requests; at 1 MiB,
#: FUSE's largest request (max_pages 256), it takes 8x fewer round trips. Measured by
#: scripts/bench (cold dd bs=1M of 256 MiB, 3 A/B pairs): file:// 541 -> 680 MiB/s
#: (+25 %); az:// and s3:// are bound by their servers (no change beyond noise). Raising it
#: needs root (sysfs); otherwise the kernel default stays.
READ_AHEAD_KB = 1024


def _raise_readahead(dev: int) -> None:
    """Raise the read-ahead of the mount's backing device info (blocking: sysfs I/O)."""
    path = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
    try:
        with open(path) as f:
            current = int(f.read())
        if current < READ_AHEAD_KB:
            with open(path, "w") as f:
                f.write(str(READ_AHEAD_KB))
    except (OSError, ValueError) as exc:
        log.debug("kernel read-ahead stays at its default (%s: %s)", path, exc)


def _write_state(cfg: MountConfig, has_control: bool, spool: Spool) -> None:
    """Record the mount for `blobfs status` and `blobfs unmount` (atomically: a reader
    never sees half a file). The temp file has a random name and is created with
    O_EXCL | O_NOFOLLOW, so nothing planted under that name is written through."""
    path = state_file(cfg.mountpoint)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        state = {"pid": os.getpid(), "mountpoint": str(cfg.mountpoint),
                 "source": redact(cfg.source), "cache_dir": str(cfg.cache_dir),
                 "spool": str(spool.root),
                 "control": str(control_socket(cfg.mountpoint)) if has_control else None,
                 "metrics": redact(cfg.metrics) if cfg.metrics else None,
                 "started_at": time.time()}
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        with open(fd, "w") as f:
            f.write(json.dumps(state))
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        log.warning("cannot record the mount in %s: %s", runtime_dir(), exc)


def _remove_state(cfg: MountConfig) -> None:
    """Forget the mount, unless a newer daemon already took the mountpoint over."""
    path = state_file(cfg.mountpoint)
    try:
        if json.loads(path.read_text()).get("pid") != os.getpid():
            return
    except (OSError, ValueError, AttributeError):
        return
    for item in (path, control_socket(cfg.mountpoint)):
        with contextlib.suppress(OSError):
            item.unlink()
