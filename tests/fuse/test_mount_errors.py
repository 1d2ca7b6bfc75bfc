"""The mount-time errors of every cloud store: a missing bucket or container, bad
credentials and an unreachable endpoint each end `blobfs mount` with a one-line error that
names the cause, no traceback and no secret (semantics §5). The cases are
tests/support/broken_stores.py's.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.broken_stores import CASES, BrokenStore, broken_store
from tests.support.mounting import blobfs_cmd, mount_env


@pytest.fixture(params=list(CASES))
def broken(request: pytest.FixtureRequest, server_for: Callable[[str], Any],
           tmp_path: Path) -> Iterator[BrokenStore]:
    with broken_store(request.param, server_for, tmp_path) as case:
        yield case


def test_mount_error_is_one_line_naming_the_cause(broken: BrokenStore, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir(exist_ok=True)
    env = broken.env
    cmd = blobfs_cmd("mount", env.url, str(mnt), "-f", "-o",
                     ",".join([f"cache_dir={tmp_path / 'cache'}", *env.options]))
    result = subprocess.run(cmd, env=mount_env(env), capture_output=True, text=True,
                            timeout=120)
    out = result.stderr + result.stdout
    assert result.returncode != 0
    for name in broken.names + broken.mount_says:
        assert name in result.stderr, (name, result.stderr)
    for secret in broken.secrets:
        assert secret not in out
    assert "Traceback" not in out
