"""Lineage across tools, through real mounts on S3 (moto) and Azure (Azurite).

An append made through a mount onto a blob another program wrote must be a proven append
for every other mount, so their open handles follow it (issue 12). And lineage is only
metadata: a version whose metadata claims to continue the one a reader read, but whose
bytes differ, must reach that reader as a replacement (ESTALE), never as a mix of the old
bytes it cached and the new ones (issue 13 item 12).
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import make_store_env
from tests.support.envs import StoreEnv
from tests.support.mounting import mounted
from tests.support.outside import sdk_metadata, sdk_put
from tests.support.waiting import read_until

MiB = 1 << 20


@pytest.fixture(params=["s3", "az"])
def cloud_env(request: pytest.FixtureRequest, server_for: Callable[[str], Any]) -> StoreEnv:
    return make_store_env(server_for, request.param)


def test_append_onto_an_sdk_blob_is_followed_by_an_open_handle(cloud_env: StoreEnv,
                                                               tmp_path: Path) -> None:
    first = b"".join(b"line %04d written by another tool\n" % i for i in range(200))
    sdk_put(cloud_env, "app.log", first)
    with mounted(cloud_env, tmp_path, name="a") as a, \
            mounted(cloud_env, tmp_path, name="b") as b, \
            open(b.path / "app.log", "rb", buffering=0) as held:
        assert read_until(held, len(first), 10) == first
        more = b""
        for i in range(3):
            line = b"line %04d appended through mount a\n" % i
            with open(a.path / "app.log", "ab") as f:
                f.write(line)
            more += line
            # The handle on B, at its end, follows each append: new bytes, no ESTALE.
            assert read_until(held, len(line), 10) == line
        with open(b.path / "app.log", "rb") as fresh:
            assert fresh.read() == first + more


def test_forged_lineage_gives_estale_not_mixed_bytes(cloud_env: StoreEnv,
                                                     tmp_path: Path) -> None:
    old = os.urandom(6 * MiB)
    with mounted(cloud_env, tmp_path, name="a") as a, \
            mounted(cloud_env, tmp_path, name="b") as b:
        (a.path / "data.bin").write_bytes(old)
        with open(b.path / "data.bin", "rb", buffering=0) as held:
            got = held.read(MiB + 4096)  # mid-file: the first blocks are cached on B
            assert got == old[:len(got)]
            # Another writer of the bucket puts different, longer content, with metadata
            # copied from the version B read: its lineage claims an append.
            sdk_put(cloud_env, "data.bin", os.urandom(len(old) + 4096),
                    metadata=sdk_metadata(cloud_env, "data.bin"))
            # Deliberate: metadata_ttl (1 s) must pass so B's reads revalidate and meet the
            # forged version; nothing outside the handle shows that without itself making
            # B look the blob up, which is not the path under test.
            time.sleep(2.5)
            with pytest.raises(OSError) as caught:
                while True:
                    chunk = held.read(MiB)
                    assert chunk, "the handle reached the end without an error"
                    assert chunk == old[len(got):len(got) + len(chunk)], "mixed bytes"
                    got += chunk
            assert caught.value.errno == errno.ESTALE
