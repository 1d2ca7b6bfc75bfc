"""Scale through a real mount (issue 15): what idle open files cost, and many at once;
a listing still paging does not keep a killed `ls` or an unmount waiting.

Requests are counted by the `Proxy` between the mount and moto, never timed: an open
file nobody reads or writes must cost nothing, however many are open.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from tests.support import s3_env
from tests.support.envs import StoreEnv
from tests.support.mounting import mounted
from tests.support.proxy import FaultPlan, Proxy
from tests.support.s3_env import MotoServer

#: How long the slow store takes to answer one page of the big directory's listing:
#: the paging of a 100,000-entry directory, scaled down to one page.
SLOW_LIST = 30.0
READERS = 195
WRITERS = 5
IDLE_SECONDS = 4.0


def test_idle_open_files_cost_no_requests(
    s3env: StoreEnv, moto_proxy: Proxy, moto: MotoServer, tmp_path: Path,
) -> None:
    """200 open files (readers at EOF, appenders with nothing pending) on one S3 mount."""
    bucket = s3_env.bucket_of(s3env)
    client = moto.client()
    for i in range(READERS):
        client.put_object(Bucket=bucket, Key=f"pfx/r/{i:03d}.log", Body=b"line\n" * (i + 1))
    env = s3_env.env_for(moto_proxy.url, bucket, moto_proxy.url)
    with mounted(env, tmp_path) as m:
        (m.path / "w").mkdir()
        files = []
        try:
            for i in range(READERS):
                f = open(m.path / "r" / f"{i:03d}.log", "rb")  # noqa: SIM115
                files.append(f)
                assert f.read() == b"line\n" * (i + 1)
            for i in range(WRITERS):
                f = open(m.path / "w" / f"{i}.log", "ab")  # noqa: SIM115
                files.append(f)
                f.write(b"started\n")
                f.flush()
                os.fsync(f.fileno())  # committed: nothing pending
            moto_proxy.reset()
            time.sleep(IDLE_SECONDS)  # deliberate: an idle period, counted in requests
            stats = moto_proxy.stats()
        finally:
            for f in files:
                f.close()
    # Issue 15: 1,000 idle open files at most 5 requests/s (it was 2 HEADs/s per file).
    assert stats["requests"] <= 5 * IDLE_SECONDS, stats


def test_a_thousand_files_open_at_once(file_env: StoreEnv, tmp_path: Path) -> None:
    """500 readers and 500 appenders open together, with the default memory_limit."""
    root = Path(file_env.url.removeprefix("file://"))
    (root / "r").mkdir()
    for i in range(500):
        (root / "r" / f"{i:03d}").write_bytes(b"%d\n" % i)
    with mounted(file_env, tmp_path) as m:
        (m.path / "w").mkdir()
        readers, writers = [], []
        try:
            for i in range(500):
                readers.append(open(m.path / "r" / f"{i:03d}", "rb"))  # noqa: SIM115
                writers.append(open(m.path / "w" / f"{i:03d}", "ab"))  # noqa: SIM115
            for i, f in enumerate(writers):
                f.write(b"line %d\n" % i)
                f.flush()
            for i, f in enumerate(readers):
                assert f.read() == b"%d\n" % i
        finally:
            for f in readers + writers:
                f.close()
        for i in range(500):
            assert (m.path / "w" / f"{i:03d}").read_bytes() == b"line %d\n" % i
    for i in range(500):
        assert (root / "w" / f"{i:03d}").read_bytes() == b"line %d\n" % i


def test_unmount_while_a_listing_pages_ends_promptly(
    s3env: StoreEnv, proxy: Proxy, moto: MotoServer, tmp_path: Path,
) -> None:
    """`ls -l` of a directory whose listing takes SLOW_LIST to page is killed, then the
    mount is unmounted: the killed `ls` is let go, so `fusermount3 -u` succeeds and the
    daemon exits within seconds (pyfuse3 waits for the requests running before its loop
    returns: the lookup paging would have held both for SLOW_LIST)."""
    bucket = s3_env.bucket_of(s3env)
    client = moto.client()
    for i in range(3):
        client.put_object(Bucket=bucket, Key=f"pfx/big/{i}.log", Body=b"x")
    env = s3_env.env_for(proxy.url, bucket, proxy.url)
    with mounted(env, tmp_path) as m:
        assert (m.path / "big").is_dir()
        proxy.faults = FaultPlan(
            rate=1.0, kinds=("delay",), delay=SLOW_LIST,
            match=lambda r: r.method == "GET" and "big/" in r.query.get("prefix", [""])[0])
        ls = subprocess.Popen(["ls", "-l", str(m.path / "big")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not any(r.fault == "delay" for r in proxy.records):
            assert time.monotonic() < deadline, "the listing never reached the store"
            time.sleep(0.05)
        ls.kill()
        t0 = time.monotonic()
        while True:  # EBUSY while the killed ls still waits in the kernel for its reply
            umount = subprocess.run(["fusermount3", "-u", str(m.path)], capture_output=True,
                                    text=True)
            if umount.returncode == 0 or time.monotonic() - t0 > 10:
                break
            time.sleep(0.2)
        assert umount.returncode == 0, umount.stderr
        m.proc.wait(timeout=SLOW_LIST * 2)
        took = time.monotonic() - t0
        assert ls.wait(timeout=5) == -9
    assert m.proc.returncode == 0
    assert took < 8, f"the daemon took {took:.1f}s to exit after the unmount"
