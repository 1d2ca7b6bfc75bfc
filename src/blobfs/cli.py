"""Command line: argument and fstab-option parsing, daemon mode, exit codes.

`blobfs mount SOURCE MOUNTPOINT [-o opts] [-f]`, the mount(8) form
`blobfs SOURCE MOUNTPOINT -o opts`, `blobfs unmount MOUNTPOINT`, `blobfs status`,
`blobfs recover`, and `blobfs umount-helper` (what /sbin/umount.fuse.blobfs runs, so
umount(8) and systemd's mount units return only after the daemon's final commit). Bad
input becomes one line on stderr and a non-zero exit code (documented in the README),
never a traceback. Daemon mode (`_daemonize`) lives here: the
parent returns only once the mount answers, and hands a systemd service over to its child.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import trio

from blobfs import __version__
from blobfs import log as blog
from blobfs.args import parser
from blobfs.config import MountConfig, options_help, parse_options
from blobfs.errors import UsageError
from blobfs.runtime import control_socket, pid_alive, state_file
from blobfs.store import split_source
from blobfs.systemd import Notifier, import_credentials

log = logging.getLogger(__name__)

EXIT_OK, EXIT_ERROR = 0, 1

USAGE = """\
usage: blobfs mount SOURCE MOUNTPOINT [-o OPT[=VALUE],...] [-f] [--debug]
       blobfs SOURCE MOUNTPOINT [-o ...]          (the mount(8) / fstab form)
       blobfs unmount MOUNTPOINT
       blobfs status [MOUNTPOINT] [--json] [--watch]
       blobfs serve SOURCE --listen HOST:PORT [-o ...]   (HTTP, no FUSE: blobfs serve --help)

SOURCE is s3://BUCKET[/PREFIX], az://CONTAINER[/PREFIX] or file:///DIR.
"""


def _mount_parser() -> argparse.ArgumentParser:
    p = parser(
        prog="blobfs mount",
        usage="blobfs mount SOURCE MOUNTPOINT [-o OPT[=VALUE],...] [-f] [--debug]",
        description="Mount a blob container. Options (-o name=value, comma separated):\n"
        + options_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source")
    p.add_argument("mountpoint")
    p.add_argument("-o", dest="options", action="append", default=[],
                   help="mount options, comma separated")
    p.add_argument("-f", "--foreground", action="store_true",
                   help="stay in the foreground (default: daemonize once mounted)")
    p.add_argument("--debug", action="store_true", help="log every request")
    return p


def parse_mount_args(argv: list[str]) -> MountConfig:
    p = _mount_parser()
    args = p.parse_args(argv)
    split_source(args.source)  # validates the scheme
    values = parse_options(args.options)
    if values.get("metrics"):
        from blobfs.metrics import parse_target

        try:
            parse_target(values["metrics"])
        except ValueError as exc:
            raise UsageError(f"bad value for option 'metrics': {exc}") from None
    if values.get("http"):
        from blobfs.http.settings import from_options

        from_options(values["http"], argparse.Namespace(**values))  # refused here, exit 2
    if values.get("cache_dir"):
        # The daemon leaves the working directory (chdir /): keep the path meaning the same.
        values["cache_dir"] = os.path.abspath(values["cache_dir"])
    return MountConfig.build(args.source, args.mountpoint, values,
                             foreground=args.foreground, debug=args.debug)


#: Where umount(8) looks for `umount.fuse.blobfs` (libmount's helper search path).
UMOUNT_HELPER_DIRS = ("/sbin", "/sbin/fs.d", "/sbin/fs")


def umount_helpers_missing() -> list[str]:
    """Which of umount(8)'s helpers for blobfs mounts are not installed. Both are needed:
    umount looks for `umount.fuse.blobfs` when it reads the type from mountinfo (`-c`, as
    systemd runs it, or a mount with a utab entry), but for `umount DIR` it takes the type
    from statfs(2), which says only "fuse", and looks for `umount.fuse`."""
    return [name for name in ("umount.fuse.blobfs", "umount.fuse")
            if not any(os.access(Path(d) / name, os.X_OK) for d in UMOUNT_HELPER_DIRS)]


def cmd_mount(argv: list[str], *, via_mount_8: bool = False) -> int:
    from blobfs import mount

    cfg = parse_mount_args(argv)
    missing = umount_helpers_missing() if via_mount_8 and not cfg.foreground \
        and os.geteuid() == 0 else []
    if missing:
        # Without the helpers, umount(8) -- and so `systemctl stop` of a mount unit and
        # poweroff -- returns while the daemon still commits: refuse, never a silent window.
        raise UsageError(f"refusing to mount: /sbin/{missing[0]} is missing, so umount and "
                         "systemd would not wait for the final commit (install it with "
                         "scripts/install-units --bin-only)")
    blog.setup(cfg.debug)
    import_credentials()
    mount.preflight(cfg)
    # Read (and unset) the systemd variables before any fork: a daemonized child still
    # feeds the watchdog addressed to this process, once it has been handed MAINPID.
    notifier = Notifier.from_env()
    if cfg.foreground:
        blog.install_faulthandler()
        return trio.run(functools.partial(mount.serve, cfg, notifier=notifier))
    return _daemonize(cfg, notifier)


def _daemonize(cfg: MountConfig, notifier: Notifier) -> int:
    """Fork; the parent returns only once the mount answers, or with the child's error.

    The child starts a new session, leaves the working directory (so it never keeps
    another filesystem busy), and logs to stderr when that is the journal (a systemd
    `.mount` unit), else to CACHE_DIR/blobfs.log. Under a `Type=notify` service the
    parent sends `MAINPID=child` with READY=1, so systemd follows the child.
    """
    from blobfs import mount

    log_path = cfg.cache_dir / "blobfs.log"
    keep_stderr = blog.stderr_is_journal()
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            message = pipe.read().decode(errors="replace")
        if message == "ok":
            notifier.ready(status="mounted", mainpid=pid)
            return EXIT_OK
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        where = "the journal" if keep_stderr else str(log_path)
        why = message or "the daemon exited before the mount was ready"
        print(blog.redact(f"blobfs: {why} (log: {where})"), file=sys.stderr)
        return code if code > 0 else EXIT_ERROR
    try:
        os.close(read_fd)
        os.setsid()
        os.chdir("/")
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        if keep_stderr:
            blog.reopen_stderr_as("blobfs")
        else:
            # O_NOFOLLOW: a link planted in the cache dir must not aim our writes.
            err = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW,
                          0o600)
            os.dup2(err, 2)
            os.close(err)
            os.environ.pop("JOURNAL_STREAM", None)
        os.close(devnull)
        blog.setup(cfg.debug)
        blog.install_faulthandler()
    except BaseException as exc:
        os.write(write_fd, f"cannot start the daemon: {exc}".encode())
        os._exit(EXIT_ERROR)
    told = False

    def tell(message: bytes) -> None:
        nonlocal told
        if told:
            return
        told = True
        try:
            os.write(write_fd, message)
            os.close(write_fd)
        except OSError:
            pass  # the parent was interrupted; the mount carries on regardless

    try:
        code = trio.run(functools.partial(mount.serve, cfg, notifier=notifier,
                                          on_ready=lambda: tell(b"ok")))
    except UsageError as exc:
        tell(str(exc).encode())
        log.error("%s", exc)
        code = exc.exit_code
    except BaseException as exc:
        log.exception("blobfs daemon failed")
        tell(f"the daemon failed: {exc}".encode())
        code = EXIT_ERROR
    logging.shutdown()
    os._exit(code)


def cmd_unmount(argv: list[str]) -> int:
    """Commit what is pending, unmount, and say what stayed in the spool.

    The pid in the state file is only a hint: it is signalled only once /proc says it is
    a blobfs process and the mount's control socket says that process serves this
    mountpoint. A dead mount (the daemon is gone) is cleared with a lazy unmount. Exit 0
    only when the mount is gone and nothing of it is left in the spool.
    """
    from blobfs import mount

    p = parser(prog="blobfs unmount",
                                description="Commit pending data, then unmount.")
    p.add_argument("mountpoint")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds to wait for the final commit (default 600)")
    args = p.parse_args(argv)
    mnt = Path(os.path.abspath(args.mountpoint))
    if not mount.is_mountpoint(mnt):
        raise UsageError(f"{mnt} is not mounted")
    state: dict[str, object] = {}
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads(state_file(mnt).read_text())
        if isinstance(loaded, dict):
            state = loaded
    raw_spool = state.get("spool")
    spool = raw_spool if isinstance(raw_spool, str) else None
    pid = _serving_pid(mnt)
    if pid is None:
        if mount._probe(mnt) == "dead":
            # The daemon is gone: whatever the state file's pid is now, it is not ours.
            mount._clear_dead_mount(mnt)
            left = _left_in_spool(spool)
            raise UsageError(f"the blobfs daemon of {mnt} was gone; cleared the dead mount"
                             + (f"; left in the spool {spool}: {', '.join(left)} (it is "
                                "committed at the next mount or by blobfs recover)"
                                if left else ""), EXIT_ERROR)
        # Not a blobfs we can identify: unmounting still makes a daemon commit.
        res = subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, text=True)
        if res.returncode:
            raise UsageError(f"cannot unmount {mnt}: {res.stderr.strip()}", EXIT_ERROR)
        return EXIT_OK
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + args.timeout
    while pid_alive(pid):
        if time.monotonic() > deadline:
            raise UsageError(f"blobfs (pid {pid}) is still committing after {args.timeout:g}s",
                             EXIT_ERROR)
        time.sleep(0.05)
    if mount.is_mountpoint(mnt):
        mount._clear_dead_mount(mnt)
        raise UsageError(f"blobfs (pid {pid}) exited without unmounting {mnt}; cleared it",
                         EXIT_ERROR)
    left = _left_in_spool(spool)
    if left:
        raise UsageError(f"unmounted {mnt}, but the final commit failed for: "
                         f"{', '.join(left)}; the data stays in the spool {spool} (the next "
                         "mount or blobfs recover commits it)", EXIT_ERROR)
    return EXIT_OK


def cmd_umount_helper(argv: list[str]) -> int:
    """umount(8)'s helper for fuse.blobfs: `umount.fuse.blobfs MOUNTPOINT [-flnrvd] [-N NS]
    [-t TYPE]`. Unmounts with `umount -i` (busy mounts stay busy, as with any umount), then
    waits until the daemon has committed what was pending and exited. systemd runs umount
    to stop a mount unit, also at poweroff, so those wait too, bounded by the unit's
    TimeoutSec=."""
    from blobfs import mount

    p = parser(prog="umount.fuse.blobfs")
    p.add_argument("mountpoint")
    for flag in ("-f", "-l", "-n", "-r", "-v", "-d"):
        p.add_argument(flag, action="store_true")
    p.add_argument("-N", dest="namespace")
    p.add_argument("-t", dest="type")
    args = p.parse_args(argv)
    mnt = Path(args.mountpoint)
    # Installed as umount.fuse too, this runs for every FUSE mount: others just unmount.
    pid = _daemon_of(mnt) if mount.fstype_at(mnt) == "fuse.blobfs" else None
    cmd = ["umount", "-i"] + [f"-{f}" for f in "flnrvd" if getattr(args, f)]
    if args.namespace:
        cmd += ["-N", args.namespace]
    res = subprocess.run([*cmd, str(mnt)], check=False)
    if res.returncode:
        return res.returncode
    if pid is not None:
        _wait_exit(pid)
    return EXIT_OK


def _daemon_of(mnt: Path) -> int | None:
    """The pid of the blobfs daemon serving `mnt`: from its state file, else (a runtime
    directory this process does not see) the blobfs process whose command line names
    `mnt`. Checked against the command line: a stale record's pid may have been reused."""

    target = os.path.abspath(mnt)
    candidates = []
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        candidates.append(int(json.loads(state_file(mnt).read_text())["pid"]))
    candidates += sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    for pid in candidates:
        if pid == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not any(a.endswith("blobfs") for a in args[:3]) \
                or any(a in ("umount-helper", "unmount", "umount", "status") for a in args):
            continue
        if any(a and os.path.abspath(a) == target for a in args) and pid_alive(pid):
            return pid
    return None


def _wait_exit(pid: int) -> None:
    """Wait, without a deadline of our own, until `pid` has exited."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        while pid_alive(pid):
            time.sleep(0.05)
        return
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        # A zombie is readable too: it has exited; its parent reaps it.
        while not poller.poll(1000) and pid_alive(pid):
            pass
    finally:
        os.close(fd)


def _serving_pid(mnt: Path) -> int | None:
    """The pid of the blobfs daemon serving `mnt`, as its control socket says and /proc
    confirms; None when no live blobfs daemon answers for it."""
    from blobfs.telemetry import read_control

    try:
        snap = read_control(control_socket(mnt), timeout=5.0)
    except (OSError, ValueError):
        return None
    pid = snap.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    if snap.get("mountpoint") != str(mnt):
        return None
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return None
    if not any("blobfs" in os.path.basename(a) for a in args):
        return None
    return pid


def _left_in_spool(spool: str | None) -> list[str]:
    """The keys (or journal names) a spool still holds (blocking)."""
    from blobfs.fs.journal import read_journal

    if not spool or not os.path.isdir(spool):
        return []
    left = []
    for journal in sorted(Path(spool).glob("*.journal")):
        try:
            left.append(read_journal(journal).header.key)
        except (OSError, ValueError):
            left.append(f"{journal} (damaged)")
    return left


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        try:
            return _run(argv)
        finally:
            sys.stdout.flush()  # here, so a closed pipe is caught below, not at exit
    except BrokenPipeError:
        # `blobfs --help | head`: the reader left. Quietly, like a command killed by
        # SIGPIPE; stdout goes to /dev/null so the interpreter's last flush stays quiet too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + signal.SIGPIPE


def _run(argv: list[str]) -> int:
    try:
        if not argv or argv[0] in ("-h", "--help", "help"):
            print(USAGE + "\nOptions:\n" + options_help())
            return EXIT_OK if argv else 2
        if argv[0] == "--version":
            print(f"blobfs {__version__}")
            return EXIT_OK
        cmd, rest = argv[0], argv[1:]
        if cmd == "mount":
            return cmd_mount(rest)
        if cmd == "recover":
            from blobfs.recover_cmd import cmd_recover

            blog.setup(False)
            return cmd_recover(rest)
        if cmd in ("unmount", "umount"):
            return cmd_unmount(rest)
        if cmd == "umount-helper":
            return cmd_umount_helper(rest)
        if cmd == "serve":
            from blobfs.serve import cmd_serve

            return cmd_serve(rest)
        if cmd == "status":
            from blobfs.status import cmd_status

            return cmd_status(rest)
        if "://" in cmd:
            # mount(8) calls helpers as: blobfs SOURCE MOUNTPOINT -o opts
            return cmd_mount(argv, via_mount_8=True)
        raise UsageError(f"unknown command '{cmd}': use mount, unmount, status, serve or recover "
                         "(blobfs --help)")
    except UsageError as exc:
        print(blog.redact(f"blobfs: {exc}"), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
