"""S3 through a real mount: the cost of an append (semantics §2); the mount-time errors
are in test_mount_errors.

A counting `Proxy` sits between the mount and the server (moto, and Ceph RGW: a real S3
server), so the test sees every request the daemon makes and every byte it uploads.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support import s3_env
from tests.support.envs import StoreEnv
from tests.support.mounting import mounted
from tests.support.proxy import Proxy
from tests.support.s3_env import s3_operation

MiB = 1 << 20
#: Open-append-close cycles per server in the append-cost test.
APPEND_CYCLES = {"s3": 200, "rgw": 20}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_appends_to_a_64_mib_blob_upload_only_the_new_bytes(
    s3_server_env: StoreEnv, s3_server_proxy: Proxy, s3_server: Any, tmp_path: Path,
) -> None:
    """64 MiB blob, then open-append-close cycles of a short line through the mount: 200 on
    moto, 20 on RGW (where each costs ~1 s of server-side copying on the test cluster)."""
    s3env, proxy = s3_server_env, s3_server_proxy
    cycles = APPEND_CYCLES[s3env.name]
    env = s3_env.env_for(proxy.url, s3_env.bucket_of(s3env), proxy.url)
    base = os.urandom(64 * MiB)
    src = tmp_path / "base.bin"
    src.write_bytes(base)
    expect = bytearray(base)
    per_append: list[tuple[int, int, int, list[str]]] = []
    with mounted(env, tmp_path) as m:
        target = m.path / "app.log"
        subprocess.run(["dd", f"if={src}", f"of={target}", "bs=1M", "status=none"], check=True)
        for i in range(cycles):
            line = b"%05d an application log line %s\n" % (i, b"." * (i % 23))
            proxy.reset()
            with open(target, "ab") as f:  # close waits for the commit (close=sync)
                f.write(line)
            expect += line
            stats = proxy.stats()
            writes = [s3_operation(r) for r in proxy.records if r.method in ("PUT", "POST",
                                                                             "DELETE")]
            per_append.append((len(line), stats["bytes_up"], stats["write_requests"], writes))
            assert stats["bytes_up"] <= len(line) + 1024, (i, stats, writes)
            assert stats["write_requests"] <= 4, (i, writes)
            assert "UploadPartCopy" in writes, "the previous version is copied server-side"
        assert hashlib.sha256(target.read_bytes()).digest() == hashlib.sha256(expect).digest()
    client = s3_server.client()
    remote = client.get_object(Bucket=s3_env.bucket_of(s3env), Key="pfx/app.log")["Body"].read()
    assert remote == bytes(expect)
    assert client.list_multipart_uploads(Bucket=s3_env.bucket_of(s3env)).get("Uploads", []) == []
    appended = sum(k for k, _, _, _ in per_append)
    sent = sum(b for _, b, _, _ in per_append)
    writes_total = sum(w for _, _, w, _ in per_append)
    print(f"\nmount appends to a 64 MiB blob on {s3env.name}: {appended} bytes appended by "
          f"{cycles} open-append-close cycles, {sent} bytes uploaded "
          f"({(sent - appended) / cycles:.0f} overhead/append), "
          f"{writes_total / cycles:.2f} write requests/append")

