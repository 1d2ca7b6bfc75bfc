"""Big files and long append streams through a real mount (issue 15 goals 4 and 5), scaled
to the suite: a 256 MiB file within a small `memory_limit`, a 4 KiB read in the middle of
a cold big file costing one ranged GET, 1,000 commits onto one file:// blob each
writing only their new bytes, in place, and a streamed file:// write sending each byte
once, with the spool holding only what is not committed yet.

Nothing here is timed: memory is the daemon's peak RSS (/proc/PID/status VmHWM), reads and
bytes are the mount's own counters (`blobfs status --json`), and on Azure the GETs are
also counted by a `Proxy` between the mount and Azurite. The full-size rows (4 GiB,
100,000 commits) are `scripts/bench --only bigfile,stream`.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import make_store_env
from tests.support.envs import StoreEnv
from tests.support.mounting import Mount, blobfs_cmd, mount_env, mounted
from tests.support.outside import vm_kib
from tests.support.proxy import Proxy

MiB = 1 << 20
SIZE_MIB = 256
#: Small against the file: cache_size 64M + 12 uploads x 8M + 8 requests x 2M = 176M.
MEMORY_LIMIT_MIB = 176
OPTIONS = (f"memory_limit={MEMORY_LIMIT_MIB}M", "cache_size=64M")


def status(env: StoreEnv, m: Mount) -> dict[str, int]:
    res = subprocess.run(blobfs_cmd("status", str(m.path), "--json"), env=mount_env(env),
                         capture_output=True, text=True, timeout=60, check=True)
    snap: dict[str, int] = json.loads(res.stdout)
    return snap


def block(i: int) -> bytes:
    """MiB number i of the big file: its number, then a pattern that differs per MiB."""
    head = b"%012d" % i
    return head + bytes((i * 7 + j) % 251 for j in range(256)) * ((MiB - len(head)) // 256) \
        + b"\n" * ((MiB - len(head)) % 256)


@pytest.fixture(params=["file", "az"])
def big_env(request: pytest.FixtureRequest, tmp_path: Path,
            server_for: object) -> Iterator[tuple[StoreEnv, Proxy | None]]:
    """A store and, on Azurite, a counting proxy the mount talks to."""
    if request.param == "file":
        root = tmp_path / "store"
        root.mkdir()
        yield StoreEnv("file", f"file://{root}"), None
        return
    env = make_store_env(server_for, "az")  # type: ignore[arg-type]
    assert env.endpoint is not None
    with Proxy(f"http://{urlsplit(env.endpoint).netloc}") as proxy:
        yield StoreEnv(env.name, env.url, env=dict(env.env),
                       options=[f"endpoint={proxy.url}"], endpoint=proxy.url), proxy


@pytest.mark.timeout(240)
def test_big_file_stays_in_memory_limit_and_a_small_read_costs_one_get(
    big_env: tuple[StoreEnv, Proxy | None], tmp_path: Path,
) -> None:
    env, proxy = big_env
    # memory_limit bounds the file data the daemon holds (README "Memory"), on top of
    # what the interpreter and the SDKs take when idle.
    with mounted(env, tmp_path, *OPTIONS) as m:
        idle = vm_kib(m.proc.pid) // 1024
        with open(m.path / "big.bin", "wb", buffering=0) as f:
            for i in range(SIZE_MIB):
                f.write(block(i))
        write_peak = vm_kib(m.proc.pid, "VmHWM") // 1024 - idle
    assert write_peak < MEMORY_LIMIT_MIB, f"writing: peak RSS {write_peak} MiB over idle"

    with mounted(env, tmp_path, *OPTIONS, name="cold") as m:
        idle = vm_kib(m.proc.pid) // 1024
        path = m.path / "big.bin"
        assert path.stat().st_size == SIZE_MIB * MiB
        before = status(env, m)
        if proxy is not None:
            proxy.reset()
        middle = SIZE_MIB // 2 * MiB + 12345
        with open(path, "rb", buffering=0) as f:
            data = os.pread(f.fileno(), 4096, middle)
        after = status(env, m)
        gets = [r for r in proxy.records if r.method == "GET"] if proxy is not None else []
        assert data == block(SIZE_MIB // 2)[12345 : 12345 + 4096]
        # One ranged GET, of one cache block (1 MiB), however big the file.
        assert after["store_reads"] - before["store_reads"] == 1, (before, after)
        assert after["store_read_bytes"] - before["store_read_bytes"] <= 2 * MiB
        if proxy is not None:
            assert len(gets) == 1, [r.target for r in proxy.records]

        with open(path, "rb", buffering=0) as f:
            for i in range(SIZE_MIB):
                got = f.read(MiB)
                assert got[:12] == b"%012d" % i and got == block(i), f"MiB {i} differs"
        read_peak = vm_kib(m.proc.pid, "VmHWM") // 1024 - idle
    assert read_peak < MEMORY_LIMIT_MIB, f"reading: peak RSS {read_peak} MiB over idle"
    if env.name == "file":
        # file:// reads go straight to the store's file (`ReadsLocally`), which the kernel
        # caches: the daemon holds none of it (through the block cache it held cache_size).
        assert read_peak < 24, f"reading file://: peak RSS {read_peak} MiB over idle"
    print(f"\n{env.name}: {SIZE_MIB} MiB file, peak RSS over idle {write_peak} MiB writing, "
          f"{read_peak} MiB reading (memory_limit {MEMORY_LIMIT_MIB}M)")


COMMITS = 1000


def test_1000_commits_onto_one_file_blob_write_only_their_bytes_in_place(
    tmp_path: Path,
) -> None:
    """file://: each commit of an append stream adds its bytes to the live file (the same
    inode, no temp version), so its cost does not grow with the blob (goal 5)."""
    root = tmp_path / "store"
    root.mkdir()
    base = os.urandom(MiB) * 16  # 16 MiB already there
    (root / "app.log").write_bytes(base)
    env = StoreEnv("file", f"file://{root}")
    ino = (root / "app.log").stat().st_ino
    lines = [b"%06d a line appended to a growing log\n" % i for i in range(COMMITS)]
    with mounted(env, tmp_path) as m:
        before = status(env, m)
        with open(m.path / "app.log", "ab", buffering=0) as f:
            for line in lines:
                f.write(line)
                os.fsync(f.fileno())  # one commit each
        after = status(env, m)
        spool_bytes = sum(p.stat().st_blocks * 512 for p in m.cache_dir.rglob("*.data"))
    assert after["commits"] - before["commits"] == COMMITS
    # Each commit sent its line only: nothing of the 16 MiB below it.
    assert after["committed_bytes"] - before["committed_bytes"] == sum(map(len, lines))
    assert (root / "app.log").stat().st_ino == ino, "a commit rewrote the blob aside"
    assert (root / "app.log").read_bytes() == base + b"".join(lines)
    assert not list((root / ".blobfs" / "tmp").iterdir()), "a temp version was left"
    # The spool holds what is pending, not the stream so far.
    assert spool_bytes <= 2 * MiB, f"{spool_bytes} bytes left in the spool"


def test_a_streamed_file_write_is_copied_once_and_leaves_the_spool(tmp_path: Path) -> None:
    """file://: a big sequential write appending to its first commit, with a commit every
    12 MiB. No block is staged aside (an append commit copies straight from the spool into
    the live file), and what was committed is punched out of the spool, so it holds the
    uncommitted part only (goal 6).
    """
    root = tmp_path / "store"
    root.mkdir()
    env = StoreEnv("file", f"file://{root}")
    chunk = os.urandom(MiB)
    with mounted(env, tmp_path, "commit_interval=3600") as m:
        with open(m.path / "stream.bin", "wb", buffering=0) as f:
            f.write(chunk)
            os.fsync(f.fileno())  # the blob exists: what follows appends to it
            before = status(env, m)
            for i in range(32):
                f.write(chunk)
                if i % 12 == 11:
                    os.fsync(f.fileno())
            spool = sum(p.stat().st_blocks * 512 for p in m.cache_dir.rglob("*.data"))
        after = status(env, m)
    assert (root / "stream.bin").read_bytes() == chunk * 33
    assert after["staged_bytes"] == before["staged_bytes"], "blocks were staged aside"
    assert after["committed_bytes"] - before["committed_bytes"] == 32 * MiB
    # 8 MiB written since the last commit, and nothing before them.
    assert spool <= 9 * MiB, f"the spool holds {spool} bytes of a committed stream"
