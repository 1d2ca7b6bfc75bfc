"""memory_limit (semantics §5): how the budget is shared out, that the mount applies it, and
that a budget too small for the other options is a one-line usage error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from blobfs import budget, mount
from blobfs.budget import (
    BLOCKS_IN_FLIGHT,
    MAX_REQUESTS,
    MIN_REQUESTS,
    REQUEST_BYTES,
    Budget,
)
from blobfs.config import MiB, MountConfig, parse_options
from blobfs.errors import UsageError
from blobfs.fs import core
from tests.unit.test_cli import one_line_error, run


def build(tmp_path: Path, **options: str) -> MountConfig:
    values = parse_options([",".join(f"{k}={v}" for k, v in options.items())])
    return MountConfig.build("memory://x", str(tmp_path), values)


def test_defaults_serve_the_most_requests(tmp_path: Path) -> None:
    # 512M - 256M cache - 12 x 8M uploads leaves 160M: more than MAX_REQUESTS x 2 MiB.
    assert build(tmp_path).budget.requests == MAX_REQUESTS


def test_requests_are_what_the_budget_leaves(tmp_path: Path) -> None:
    # 256M - 128M cache - 12 x 8M = 32M: 16 requests of 2 MiB.
    cfg = build(tmp_path, memory_limit="256M", cache_size="128M")
    assert cfg.budget.requests == 16
    assert cfg.budget.requests * REQUEST_BYTES == (256 - 128 - 96) * MiB
    # Smaller blocks leave more, up to the cap.
    assert build(tmp_path, memory_limit="256M", cache_size="128M",
                 block_size="4M").budget.requests == MAX_REQUESTS


def test_the_smallest_budget_that_fits(tmp_path: Path) -> None:
    fits = 256 * MiB + BLOCKS_IN_FLIGHT * 8 * MiB + MIN_REQUESTS * REQUEST_BYTES
    assert Budget(fits, 256 * MiB, 8 * MiB).requests == MIN_REQUESTS
    with pytest.raises(UsageError, match="at least 360M"):
        Budget(fits - 1, 256 * MiB, 8 * MiB).check()
    with pytest.raises(UsageError, match="lower cache_size or block_size"):
        build(tmp_path, memory_limit="64M")


def test_the_core_uploads_what_the_budget_counts(tmp_path: Path) -> None:
    """The budget counts the blocks the core uploads at once: they must stay equal."""
    fs = core.Filesystem(object(), build(tmp_path), spool=object(),  # type: ignore[arg-type]
                         spawn=lambda *a: None)
    assert fs._stage_limiter.total_tokens == budget.STAGING_AT_ONCE
    assert fs._commit_limiter.total_tokens == budget.COMMITS_AT_ONCE


def test_the_mount_runs_as_many_tasks_as_the_budget_allows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, Any] = {}

    async def fake_main(**kwargs: Any) -> None:
        seen.update(kwargs)

    monkeypatch.setattr(mount.pyfuse3, "main", fake_main)
    trio.run(mount.serve_requests, build(tmp_path, memory_limit="256M", cache_size="128M"))
    assert seen == {"max_tasks": 16}


def test_malloc_tunables_apply() -> None:
    # glibc takes each of them (this test process keeps them: harmless).
    assert budget.tune_malloc()


def test_too_small_a_budget_is_a_one_line_error(dirs: tuple[Path, Path]) -> None:
    res = run("mount", f"file://{dirs[0]}", str(dirs[1]), "-f", "-o", "memory_limit=300M")
    one_line_error(res, "memory_limit=300M is too small", "at least 360M")
    assert res.returncode == 2
    res = run("mount", f"file://{dirs[0]}", str(dirs[1]), "-f", "-o", "memory_limit=lots")
    one_line_error(res, "bad value for option 'memory_limit'")


def test_help_says_what_memory_limit_bounds() -> None:
    res = run("mount", "--help")
    line = next(x for x in res.stdout.splitlines() if x.startswith("  memory_limit "))
    assert "cache_size" in line and "FUSE request" in line and "(default: 512M)" in line
