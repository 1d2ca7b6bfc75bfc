"""Where running mounts are recorded: the runtime directory, each mount's state file and
control socket, and whether a recorded daemon still runs.

Shared by `mount` (which writes them) and the commands that find mounts (`status`,
`unmount`); it imports no FUSE, so `blobfs status` runs without pyfuse3.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from blobfs.errors import UsageError
from blobfs.fs.spool import ensure_private_dir

log = logging.getLogger(__name__)


def runtime_dir() -> Path:
    """Where running mounts are recorded: /run/blobfs for root, else under
    $XDG_RUNTIME_DIR. `BLOBFS_RUNTIME_DIR` overrides both (tests, containers). Without
    either, /tmp/blobfs-UID: a name others can guess, so `prepare_runtime_dir` checks it."""
    override = os.environ.get("BLOBFS_RUNTIME_DIR")
    if override:
        return Path(override)
    if os.geteuid() == 0:
        return Path("/run/blobfs")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "blobfs"
    return Path(f"/tmp/blobfs-{os.geteuid()}")


def prepare_runtime_dir() -> bool:
    """Create the runtime directory (0700) or check the one there: ours, and writable by
    no one else. False, with a warning, when it is not safe to use (blocking)."""
    path = runtime_dir()
    try:
        ensure_private_dir(path, "runtime directory",
                           hint="set XDG_RUNTIME_DIR or BLOBFS_RUNTIME_DIR to a private one")
    except UsageError as exc:
        log.warning("%s; blobfs status and unmount will not find this mount", exc)
        return False
    return True


def _mount_id(mountpoint: Path) -> str:
    # abspath, not resolve(): stat-ing our own mountpoint from the trio thread deadlocks.
    return hashlib.sha256(os.path.abspath(mountpoint).encode()).hexdigest()[:16]


def state_file(mountpoint: Path) -> Path:
    """The JSON record of the mount at `mountpoint` (pid, source, control socket)."""
    return runtime_dir() / f"{_mount_id(mountpoint)}.json"


def control_socket(mountpoint: Path) -> Path:
    """The UNIX socket the mount at `mountpoint` answers status requests on."""
    return runtime_dir() / f"{_mount_id(mountpoint)}.sock"


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs: a zombie counts as gone, someone else's as alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's daemon: alive, though we may not reach its socket
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False
