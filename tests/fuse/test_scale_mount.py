"""Scale through a real mount (issue 15): what idle open files cost, and many at once;
what listing a big directory costs, in requests and in memory; a listing still paging
does not keep a killed `ls` or an unmount waiting.

Requests are counted by the `Proxy` between the mount and moto, memory is read from
/proc, and nothing is timed: an open file nobody reads or writes must cost nothing,
however many are open.
"""

from __future__ import annotations

import errno
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
#: A big directory, scaled down from issue 15's 100,000 entries.
BIG_DIR = 20_000
#: Daemon RSS per listed entry while the kernel holds them all (issue 15: 60 MiB for
#: 100,000 is 629 bytes; measured 430-560 here, ~710 with every inode field on every
#: inode, a dict per listing and ENOATTR for ls's label probes), and what may stay once
#: the kernel has forgotten them (measured ~360: the allocator keeps some; ~440 before).
HELD_PER_ENTRY = 650
LEFT_PER_ENTRY = 500
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
    s3env: StoreEnv, moto_proxy: Proxy, moto: MotoServer, tmp_path: Path,
) -> None:
    """`ls -l` of a directory whose listing takes SLOW_LIST to page is killed, then the
    mount is unmounted: the killed `ls` is let go, so `fusermount3 -u` succeeds and the
    daemon exits within seconds (pyfuse3 waits for the requests running before its loop
    returns: the lookup paging would have held both for SLOW_LIST)."""
    bucket = s3_env.bucket_of(s3env)
    client = moto.client()
    for i in range(3):
        client.put_object(Bucket=bucket, Key=f"pfx/big/{i}.log", Body=b"x")
    env = s3_env.env_for(moto_proxy.url, bucket, moto_proxy.url)
    with mounted(env, tmp_path) as m:
        assert (m.path / "big").is_dir()
        moto_proxy.faults = FaultPlan(
            rate=1.0, kinds=("delay",), delay=SLOW_LIST,
            match=lambda r: r.method == "GET" and "big/" in r.query.get("prefix", [""])[0])
        ls = subprocess.Popen(["ls", "-l", str(m.path / "big")], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not any(r.fault == "delay" for r in moto_proxy.records):
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


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


def test_listing_a_big_directory_costs_per_entry_and_its_memory_returns(
    file_env: StoreEnv, tmp_path: Path,
) -> None:
    """`ls`, `ls -l` and `find` of BIG_DIR entries on file://, counted, never timed.

    ls's per-entry ACL and security-label probes are answered ENOTSUP, after which it stops
    asking for the whole mount (ENODATA made two getxattr requests per entry); the daemon's
    RSS grows by at most HELD_PER_ENTRY per entry; and once the kernel forgets the inodes
    (drop_caches) and the listing has expired, it is back within LEFT_PER_ENTRY of idle
    (an open directory's listing was kept for good, and with it every version it listed).
    """
    root = Path(file_env.url.removeprefix("file://"))
    (root / "big").mkdir()
    for i in range(BIG_DIR):
        (root / "big" / f"f{i:06d}.log").write_bytes(b"x\n")
    with mounted(file_env, tmp_path) as m:
        pid = m.proc.pid
        assert (m.path / "big").is_dir()
        idle = _rss(pid)
        for cmd in (["ls"], ["ls", "-l"], ["find"]):
            subprocess.run([*cmd, str(m.path / "big")], check=True, stdout=subprocess.DEVNULL)
        held = _rss(pid) - idle
        one = m.path / "big" / "f000000.log"
        unsupported = []
        for name in ("security.selinux", "system.posix_acl_access"):
            try:
                os.getxattr(one, name)
            except OSError as exc:
                unsupported.append(exc.errno)
        etag = os.getxattr(one, "user.blobfs.etag")
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2")  # dentries and inodes: the kernel sends FORGET for every entry
        deadline = time.monotonic() + 40  # the listing expires 2-3 paging times after
        while (left := _rss(pid) - idle) > LEFT_PER_ENTRY * BIG_DIR:
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert unsupported == [errno.ENOTSUP, errno.ENOTSUP]
    assert etag  # blobfs's own attributes still answer
    assert held <= HELD_PER_ENTRY * BIG_DIR, f"{held / BIG_DIR:.0f} bytes per entry held"
    assert left <= LEFT_PER_ENTRY * BIG_DIR, f"{left / BIG_DIR:.0f} bytes per entry left"
