"""Unprivileged users made for one test and removed after it, and directories they can reach.

`temp_user()` runs useradd (no home directory, no login shell) and always userdel's the
user again; `run_as` runs a command as that user. `shared_dir()` is a temp directory under
/tmp that other users may traverse (pytest's own tmp paths are private to root), removed
afterwards. Nothing is left outside temp directories.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int


@contextmanager
def temp_user() -> Iterator[User]:
    """A fresh unprivileged user; needs root. Removed (with its group) afterwards."""
    name = f"bfs{secrets.token_hex(4)}"
    subprocess.run(["useradd", "--no-create-home", "--user-group", "--shell",
                    "/usr/sbin/nologin", name], check=True, capture_output=True, timeout=60)
    try:
        entry = pwd.getpwnam(name)
        yield User(name, entry.pw_uid, entry.pw_gid)
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True, timeout=60)


def run_as(user: User, *cmd: str, timeout: float = 30.0,
           **kw: object) -> subprocess.CompletedProcess[str]:
    """Run `cmd` as `user` (no supplementary groups), capturing its output."""
    return subprocess.run(list(cmd), user=user.uid, group=user.gid, extra_groups=[],
                          capture_output=True, text=True, timeout=timeout,
                          cwd="/", env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                          **kw)  # type: ignore[call-overload]


@contextmanager
def shared_dir() -> Iterator[Path]:
    """A temp directory (mode 0755) other users can traverse; removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="bfs-sec-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
