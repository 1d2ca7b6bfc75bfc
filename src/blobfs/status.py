"""`blobfs status [MOUNTPOINT] [--json] [--watch]`: what running mounts are doing.

Finds mounts through the state files `mount` records in `runtime_dir()` (ignoring those
whose daemon is gone), asks each daemon's control socket for a snapshot
(`telemetry.Telemetry.snapshot`), and prints it as a screen, a redrawn screen with a
progress bar while pending data drains, or JSON for scripts. It is a plain blocking
client: it knows the snapshot format and the runtime directory, nothing of FUSE, the core
or stores. Every string it prints passes through `log.redact`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from blobfs.args import parser
from blobfs.errors import UsageError
from blobfs.log import redact
from blobfs.runtime import pid_alive, runtime_dir, state_file
from blobfs.telemetry import human_bytes, read_control, scrub

EXIT_OK, EXIT_ERROR = 0, 1
BAR_WIDTH = 30


def _parser() -> argparse.ArgumentParser:
    p = parser(
        prog="blobfs status",
        description="Show open files, pending bytes, upload lag, commits and errors of "
        "running blobfs mounts (all of them without MOUNTPOINT).",
    )
    p.add_argument("mountpoint", nargs="?")
    p.add_argument("--json", action="store_true",
                   help="print JSON: one object for MOUNTPOINT, else a list")
    p.add_argument("-w", "--watch", action="store_true",
                   help="redraw every --interval seconds until interrupted")
    p.add_argument("-i", "--interval", type=float, default=1.0,
                   help="seconds between redraws with --watch (default 1)")
    p.add_argument("-n", "--count", type=int, default=0,
                   help="with --watch, stop after this many screens (default: never)")
    return p


# --- finding mounts -------------------------------------------------------------------
def _read_state(path: Path) -> dict[str, Any] | None:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or not isinstance(state.get("pid"), int):
        return None
    return state if pid_alive(state["pid"]) else None


def running_mounts() -> list[dict[str, Any]]:
    """State records of every mount whose daemon is alive, sorted by mountpoint."""

    found = []
    for path in sorted(runtime_dir().glob("*.json")):
        state = _read_state(path)
        if state is not None:
            found.append(state)
    return sorted(found, key=lambda s: str(s.get("mountpoint")))


def query(state: dict[str, Any]) -> dict[str, Any] | None:
    """A live snapshot from the daemon, the state record with an `error` key when the
    daemon does not answer, or None when nobody listens on its socket any more (the daemon
    died and its pid was reused)."""
    control = state.get("control")
    if not control:
        return {**state, "error": "this daemon has no status socket"}
    try:
        return read_control(Path(control))
    except (ConnectionRefusedError, FileNotFoundError):
        return None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        return {**state, "error": f"no answer on {control}: {reason}"}


def collect(mountpoint: str | None) -> list[dict[str, Any]]:
    """Snapshots of the mount at `mountpoint`, or of every running mount.

    Raises:
        UsageError: `mountpoint` is not a running blobfs mount.
    """

    if mountpoint is None:
        snaps = (query(state) for state in running_mounts())
        return [scrub(snap) for snap in snaps if snap is not None]
    mnt = Path(os.path.abspath(mountpoint))
    state = _read_state(state_file(mnt))
    snap = query(state) if state is not None else None
    if snap is None:
        raise UsageError(f"{mnt} is not a running blobfs mount (blobfs status lists them)",
                         EXIT_ERROR)
    return [scrub(snap)]


# --- rendering --------------------------------------------------------------------------
def _ago(when: float | None, now: float) -> str:
    if not when:
        return "never"
    stamp = datetime.fromtimestamp(when, UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    return f"{_duration(now - when)} ago ({stamp})"


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    return f"{hours // 24}d{hours % 24:02d}h"


def progress_bar(pending: int, peak: int, width: int = BAR_WIDTH) -> str:
    """`[#####.....]  40% committed` of the most pending bytes seen while watching."""
    if peak <= 0:
        return "[" + "#" * width + "] nothing pending"
    done = max(0.0, min(1.0, 1 - pending / peak))
    filled = round(done * width)
    return f"[{'#' * filled}{'.' * (width - filled)}] {done * 100:3.0f}% of " \
           f"{human_bytes(peak)} committed"


def render(snap: dict[str, Any], *, peak: int | None = None, now: float | None = None) -> str:
    """The human screen for one mount."""
    now = time.time() if now is None else now
    head = f"{snap.get('mountpoint')}  <-  {snap.get('source')}"
    if "error" in snap:
        return f"{head}  (pid {snap.get('pid')})\n  {snap['error']}\n"
    state = snap.get("state", "mounted")
    lines = [f"{head}  (pid {snap.get('pid')}, {state}, "
             f"up {_duration(float(snap.get('uptime_seconds', 0)))})"]
    pending = int(snap.get("pending_bytes", 0))
    lag = float(snap.get("upload_lag_seconds", 0))
    changes = snap.get("remote_changes") or {}
    rows = [
        ("open files", str(snap.get("open_files", 0))),
        ("pending", f"{human_bytes(pending)}" + (f" ({pending} bytes)" if pending else "")),
        ("upload lag", _duration(lag) if pending else "-"),
        ("last commit", _ago(snap.get("last_commit_at"), now)),
        ("upload rate", f"{human_bytes(float(snap.get('upload_rate_bytes_per_second', 0)))}/s"
                        f" ({human_bytes(int(snap.get('committed_bytes', 0)))} committed)"),
        ("commits", f"{snap.get('commits', 0)}   retries {snap.get('retries', 0)}   "
                    f"conflicts {snap.get('conflicts', 0)}   "
                    f"errors {snap.get('commit_errors', 0)}"),
        ("remote changes", f"{changes.get('appends_followed', 0)} appends followed, "
                           f"{changes.get('replaced', 0)} replaced, "
                           f"{changes.get('deleted', 0)} deleted"),
    ]
    if peak is not None:
        rows.insert(2, ("drain", progress_bar(pending, peak)))
    for journal in snap.get("damaged_journals") or []:
        rows.append(("DAMAGED spool", f"{journal} (kept, not committed)"))
    failing = snap.get("failing") or []
    if snap.get("failing_files"):
        rows.append(("FAILING", f"{snap['failing_files']} files cannot be committed "
                                "(data kept in the spool, retried)"))
        rows += [("", f"{f.get('key')}: {f.get('failures')} attempts, {f.get('error')}")
                 for f in failing]
    lines += [f"  {label:<15} {value}" for label, value in rows]
    return redact("\n".join(lines)) + "\n"


def _render_all(snaps: list[dict[str, Any]], peaks: dict[str, int] | None) -> str:
    if not snaps:
        return "no blobfs mounts are running\n"
    parts = []
    for snap in snaps:
        peak = None
        if peaks is not None:
            key = str(snap.get("mountpoint"))
            peaks[key] = max(peaks.get(key, 0), int(snap.get("pending_bytes", 0)))
            peak = peaks[key]
        parts.append(render(snap, peak=peak))
    return "\n".join(parts)


def _watch(args: argparse.Namespace, out: TextIO) -> int:
    peaks: dict[str, int] = {}
    shown = 0
    clear = "\x1b[H\x1b[2J" if out.isatty() else ""
    try:
        while True:
            snaps = collect(args.mountpoint)
            if args.json:
                out.write(json.dumps(snaps if args.mountpoint is None else snaps[0]) + "\n")
            else:
                stamp = datetime.now(UTC).strftime("%H:%M:%SZ")
                out.write(f"{clear}blobfs status  {stamp}  (every {args.interval:g}s)\n\n")
                out.write(_render_all(snaps, peaks))
                if not clear:
                    out.write("\n")
            out.flush()
            shown += 1
            if args.count and shown >= args.count:
                return EXIT_OK
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return EXIT_OK


def cmd_status(argv: list[str], out: TextIO | None = None) -> int:
    """Run `blobfs status`; returns the exit code (1 when a mount does not answer)."""
    out = out or sys.stdout
    p = _parser()
    args = p.parse_args(argv)
    if args.interval <= 0:
        raise UsageError("--interval must be greater than 0")
    if args.watch:
        return _watch(args, out)
    snaps = collect(args.mountpoint)
    if args.json:
        out.write(json.dumps(snaps if args.mountpoint is None else snaps[0], indent=2) + "\n")
    else:
        out.write(_render_all(snaps, None))
    return EXIT_ERROR if any("error" in s for s in snaps) else EXIT_OK
