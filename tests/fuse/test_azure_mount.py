"""Azure through a real mount (Azurite): the cost of an append, the block-count bound and
blobs other tools wrote (semantics §2, §3); the mount-time errors are in test_mount_errors.

A counting `Proxy` sits between the mount and Azurite (the mount's endpoint is the proxy),
so the test sees every request the daemon makes and every byte it uploads. "Another tool"
is the plain Azure SDK.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from azure.storage.blob import BlobBlock, BlobServiceClient, ContainerClient

from blobfs.fs.spool import Spool
from blobfs.store.azure.layout import DEFAULT_API_VERSION, max_committed_blocks
from tests.support import azure_env
from tests.support.envs import StoreEnv
from tests.support.mounting import blobfs_cmd, mount_env, mounted
from tests.support.proxy import Proxy
from tests.support.waiting import read_until

KiB = 1 << 10
BLOCK = 64 * KiB  # the smallest block_size: 3,000 short lines cross full blocks


@pytest.fixture
def raw(azurite: azure_env.Azurite, azenv: StoreEnv) -> Iterator[ContainerClient]:
    """The container as another tool (the plain SDK) sees it."""
    service = BlobServiceClient.from_connection_string(
        azurite.connection_string, api_version=DEFAULT_API_VERSION, retry_total=0
    )
    with service:
        yield service.get_container_client(container_of(azenv))


def container_of(env: StoreEnv) -> str:
    return env.url.removeprefix("az://").split("/")[0]


def via(env: StoreEnv, endpoint: str) -> StoreEnv:
    """`env` with the mount talking to `endpoint` (a proxy) instead of Azurite."""
    return StoreEnv(
        env.name, env.url, env=dict(env.env), options=[f"endpoint={endpoint}"], endpoint=endpoint
    )


def is_comp(target: str, comp: str) -> bool:
    return parse_qs(urlsplit(target).query).get("comp") == [comp]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_3000_appends_through_the_mount_cost_only_the_new_bytes(
    azenv: StoreEnv, azurite_proxy: Proxy, raw: ContainerClient, tmp_path: Path
) -> None:
    """3,000 open-append-close cycles of a short line: exact content, bounded blocks."""
    env = via(azenv, f"{azurite_proxy.url}/{azure_env.ACCOUNT}")
    expect = bytearray()
    rows: list[tuple[int, int, int, int, bool]] = []  # line, bytes up, writes, staged, merged
    with mounted(env, tmp_path, f"block_size={BLOCK}") as m:
        target = m.path / "app.log"
        target.write_bytes(b"")
        for i in range(3000):
            line = b"%05d an application log line %s\n" % (i, b"." * (i % 23))
            azurite_proxy.reset()
            with open(target, "ab") as f:  # close waits for the commit (close=sync)
                f.write(line)
            expect += line
            records = list(azurite_proxy.records)
            writes = [r for r in records if r.method in ("PUT", "POST", "DELETE")]
            staged = sum(r.bytes_up for r in writes if is_comp(r.target, "block"))
            merged = any(r.method == "GET" and "x-ms-range" in r.headers for r in records)
            up = sum(r.bytes_up for r in records)
            rows.append((len(line), up, len(writes), staged, merged))
            assert len(writes) <= 3, (i, [(r.method, r.target) for r in writes])
            assert sum(is_comp(r.target, "blocklist") for r in writes) == 1
            if not merged:
                # Between merges: the new bytes once, plus the block list.
                assert staged == len(line), (i, staged)
                assert up <= len(line) + 4 * KiB, (i, up)
        assert hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(expect).digest()
    blob = raw.get_blob_client("pfx/app.log")
    assert blob.download_blob().readall() == bytes(expect)
    blocks = blob.get_block_list("committed")[0]
    assert sum(b.size for b in blocks) == len(expect)
    assert len(blocks) <= len(expect) // BLOCK + BLOCK.bit_length()
    assert len(blocks) <= max_committed_blocks(len(expect), BLOCK)

    appended = sum(r[0] for r in rows)
    sent = sum(r[1] for r in rows)
    staged = sum(r[3] for r in rows)
    plain = [r for r in rows if not r[4]]
    # Merges re-upload the small tail blocks: O(log block_size) per appended byte.
    assert staged <= (BLOCK.bit_length() + 2) * appended
    print(
        f"\nmount, 3000 appends to an Azure blob: {appended} bytes appended, {sent} bytes up "
        f"({sent / 3000:.0f}/append), {staged} block bytes ({staged / appended:.1f}x), "
        f"{sum(r[2] for r in rows) / 3000:.2f} writes/append; {len(plain)} appends without a "
        f"merge at {sum(r[1] for r in plain) / max(1, len(plain)):.0f} bytes up each; "
        f"{len(blocks)} committed blocks (bound {max_committed_blocks(len(expect), BLOCK)})"
    )


def test_put_blob_then_append_through_the_mount_keeps_the_old_bytes(
    azenv: StoreEnv, raw: ContainerClient, tmp_path: Path
) -> None:
    old = os.urandom(200 * KiB + 17)
    blob = raw.get_blob_client("pfx/data.bin")
    blob.upload_blob(old)
    assert blob.get_block_list("committed")[0] == []  # Put Blob: no blocks to keep
    with mounted(azenv, tmp_path, f"block_size={BLOCK}") as m:
        with open(m.path / "data.bin", "ab") as f:
            f.write(b"appended\n")
        with open(m.path / "data.bin", "ab") as f:
            f.write(b"again\n")
        assert (m.path / "data.bin").read_bytes() == old + b"appended\nagain\n"
    assert blob.download_blob().readall() == old + b"appended\nagain\n"
    blocks = blob.get_block_list("committed")[0]
    assert sum(b.size for b in blocks) == len(old) + len(b"appended\nagain\n")


def test_open_handle_follows_appends_proven_by_block_list(
    azenv: StoreEnv, raw: ContainerClient, tmp_path: Path
) -> None:
    """Another tool appends blocks (no blobfs lineage): an open handle reads on (tail -f)."""
    blob = raw.get_blob_client("pfx/other.log")
    ids = ["blk-0001"]
    blob.stage_block(ids[0], b"first line\n")
    blob.commit_block_list([BlobBlock(i) for i in ids])
    with mounted(azenv, tmp_path, "metadata_ttl=0.2") as m, open(m.path / "other.log", "rb") as f:
        assert f.read() == b"first line\n"
        ids.append("blk-0002")
        blob.stage_block(ids[1], b"second line\n")
        blob.commit_block_list([BlobBlock(i) for i in ids])
        # ESTALE (or any read error) fails read_until.
        assert read_until(f, len(b"second line\n"), 20) == b"second line\n"
        assert f.read() == b"", "nothing after the appended line"


def test_recover_commits_with_the_mounts_block_size(
    azenv: StoreEnv, raw: ContainerClient, tmp_path: Path
) -> None:
    # `blobfs recover` builds its store and writers from -o like mount does: block_size
    # lays out the blocks it commits (it used to be dropped: one 8 MiB-sized block).
    cache = tmp_path / "cache"
    data = os.urandom(3 * BLOCK)
    spool = Spool(cache, azenv.url)
    spool.prepare()
    try:
        entry = spool.new_entry("rec.bin", None)  # what a killed mount leaves
        entry._write_sync(0, data)
        entry._close_sync(False)
    finally:
        spool.release()
    options = ",".join([*azenv.options, f"block_size={BLOCK}"])
    res = subprocess.run(blobfs_cmd("recover", "--cache-dir", str(cache), "-o", options),
                         capture_output=True, text=True, env=mount_env(azenv), timeout=60)
    assert res.returncode == 0 and "1 committed" in res.stdout, res.stdout + res.stderr
    blob = raw.get_blob_client("pfx/rec.bin")
    assert blob.download_blob().readall() == data
    assert [b.size for b in blob.get_block_list("committed")[0]] == [BLOCK] * 3
