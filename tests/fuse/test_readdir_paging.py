"""A big directory read through a real mount while its listing is still paged (issue 15
goal 1): the first entries come before the last page does; the whole listing is the
store's, with this mount's uncommitted files in their place; a page that fails gives
the reader one clean errno and caches nothing; a reader that lets go stops the paging;
and listers, creators and unlinkers in several processes agree with the store at the end.

Pages are slowed, failed and counted by the `Proxy` in front of moto; what is asserted is
which pages had come, never how long anything took.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO

from tests.fuse.test_scale_mount import BIG_DIR, SLOW_LIST
from tests.support import s3_env
from tests.support.envs import StoreEnv
from tests.support.mounting import mounted
from tests.support.proxy import FaultPlan, Proxy, ProxyRequest, error_response
from tests.support.s3_env import MotoServer

#: Keys in the S3 directory, and the page size the proxy asks moto for instead of S3's
#: 1,000 (`_small_pages`): three pages, as a 3,000-key directory pages on S3, without
#: the time filling moto with that many takes.
S3_KEYS = 150
S3_PAGE = 50
#: How long each page after the first takes: the later pages of a directory much
#: bigger than this one, on a slow store.
SLOW_PAGE = 1.0
#: Local-only files (created here, not committed: commit_interval is long), named to
#: sort between, before and after the store's.
LOCAL = ("a-local", "f000100.log-new", "zz-local")


#: The local-only files' sizes: written through the mount and held open, not committed.
LOCAL_SIZES: dict[str, int] = {name: i + 10 for i, name in enumerate(LOCAL)}


def _hold_local_files(big: Path) -> list[BinaryIO]:
    """LOCAL opened in `big` on the mount and written (the caller closes them): entries
    only this mount knows of, since nothing is committed while they are open."""
    local = [open(big / name, "wb") for name in LOCAL]  # noqa: SIM115
    for f in local:
        f.write(b"L" * LOCAL_SIZES[Path(f.name).name])
        f.flush()  # Python's buffer to the mount; nothing committed
    return local


def _size(i: int) -> int:
    return i % 7 + 1


def _fill_s3(moto: MotoServer, bucket: str, n: int) -> None:
    client = moto.client()

    def put(part: range) -> None:
        for i in part:
            client.put_object(Bucket=bucket, Key=f"pfx/big/f{i:06d}.log", Body=b"x" * _size(i))

    threads = [threading.Thread(target=put, args=(range(k, n, 8),)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    client.put_object(Bucket=bucket, Key="pfx/big/sub/inner", Body=b"x")


def _store_view_s3(moto: MotoServer, bucket: str) -> dict[str, int | None]:
    """name -> size (None: a directory) of the store's `big/`."""
    out: dict[str, int | None] = {}
    pages = moto.client().get_paginator("list_objects_v2")
    for page in pages.paginate(Bucket=bucket, Prefix="pfx/big/", Delimiter="/"):
        for c in page.get("Contents", []):
            out[c["Key"].removeprefix("pfx/big/")] = int(c["Size"])
        for p in page.get("CommonPrefixes", []):
            out[p["Prefix"].removeprefix("pfx/big/").rstrip("/")] = None
    return out


def _mount_view(path: Path) -> tuple[list[str], dict[str, int | None]]:
    """The names in readdir order, and name -> size (None: a directory)."""
    names, view = [], {}
    with os.scandir(path) as it:
        for e in it:
            names.append(e.name)
            view[e.name] = None if e.is_dir(follow_symlinks=False) else e.stat().st_size
    return names, view


def _seek_back(path: Path, at: tuple[int, ...]) -> tuple[list[str], list[str], str]:
    """Read `path` with libc's readdir, noting telldir before each entry (while the
    listing pages: the directory is cold); then seekdir back to each entry index in `at`
    and read one, then rewinddir and read one. (all names, names read after the seeks,
    first name after the rewind)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.opendir.restype = ctypes.c_void_p
    libc.opendir.argtypes = [ctypes.c_char_p]
    libc.readdir.restype = ctypes.c_void_p
    libc.telldir.restype = ctypes.c_long
    for fn in (libc.readdir, libc.telldir, libc.rewinddir, libc.closedir):
        fn.argtypes = [ctypes.c_void_p]
    libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
    d = libc.opendir(os.fsencode(path))
    assert d, os.strerror(ctypes.get_errno())

    def one() -> str:
        p = libc.readdir(d)
        assert p, "end of directory"
        return ctypes.string_at(p + 19).decode()  # struct dirent's d_name (x86_64, arm64)

    try:
        names, where = [], []
        while True:
            where.append(libc.telldir(d))
            p = libc.readdir(d)
            if not p:
                break
            names.append(ctypes.string_at(p + 19).decode())
        again = []
        for i in at:
            libc.seekdir(d, where[i])
            again.append(one())
        libc.rewinddir(d)
        return names, again, one()
    finally:
        libc.closedir(d)


def _in_store_order(names: list[str], view: dict[str, int | None]) -> bool:
    keys = [n + "/" if view[n] is None else n for n in names]
    return keys == sorted(keys) and len(set(keys)) == len(keys)


def _big_pages(proxy: Proxy, *, later: bool) -> list[Any]:
    """The proxy's records of listing pages of `big/` (the first, or the later ones)."""
    out = []
    for r in proxy.records:
        q = ProxyRequest(r.method, r.target, r.headers).query
        if (r.method == "GET" and q.get("prefix") == ["pfx/big/"]
                and q.get("max-keys") == ["1000"]
                and ("continuation-token" in q) == later):
            out.append(r)
    return out


def _small_pages(r: ProxyRequest) -> str | None:
    if r.method == "GET" and "max-keys=1000" in r.target:
        return r.target.replace("max-keys=1000", f"max-keys={S3_PAGE}")
    return None


def _later_page(r: ProxyRequest) -> bool:
    q = r.query
    return r.method == "GET" and q.get("prefix") == ["pfx/big/"] and "continuation-token" in q


def test_s3_readdir_streams_while_pages_come(
    s3env: StoreEnv, moto_proxy: Proxy, moto: MotoServer, tmp_path: Path,
) -> None:
    """On S3 with every page after the first slowed: the first entry is read before the
    later pages are in, the listing is the store's plus the local-only files; a page
    refused mid-listing fails the reader once (EACCES) and caches nothing; a reader that
    closes the directory mid-listing stops the paging."""
    bucket = s3_env.bucket_of(s3env)
    _fill_s3(moto, bucket, S3_KEYS)
    moto_proxy.rewrite = _small_pages
    env = s3_env.env_for(moto_proxy.url, bucket, moto_proxy.url)
    with mounted(env, tmp_path, "commit_interval=600") as m:
        big = m.path / "big"
        local = _hold_local_files(big)
        try:
            expected = _store_view_s3(moto, bucket)
            expected.update(LOCAL_SIZES)
            assert len(expected) == S3_KEYS + 1 + len(LOCAL)
            assert S3_KEYS // S3_PAGE == 3

            # 1. Streaming: the first entry before the later pages.
            moto_proxy.reset()
            moto_proxy.faults = FaultPlan(rate=1.0, kinds=("delay",), delay=SLOW_PAGE,
                                          match=_later_page)
            with os.scandir(big) as it:
                first = next(it).name
                done_then = [r for r in _big_pages(moto_proxy, later=True) if r.status]
                rest = [e.name for e in it]
            assert first == "a-local"
            assert len(done_then) < 2, "the first entry waited for every page"
            names, view = _mount_view(big)  # cached now: no pages
            assert [first, *rest] == names
            assert view == expected
            assert _in_store_order(names, view)
            assert len(_big_pages(moto_proxy, later=False)) == 1

            # 2. A page refused mid-listing: one errno for the reader, nothing cached.
            (big / "poke").write_bytes(b"")  # a change: the cached listing goes
            moto_proxy.faults = None
            moto_proxy.reset()
            moto_proxy.hook = lambda r: error_response(403, "AccessDenied") \
                if _later_page(r) else None
            try:
                os.listdir(big)
                raise AssertionError("a listing with a refused page succeeded")
            except PermissionError:
                pass
            moto_proxy.hook = None
            assert len(_big_pages(moto_proxy, later=False)) == 1
            expected["poke"] = 0
            names, view = _mount_view(big)
            assert view == expected
            assert len(_big_pages(moto_proxy, later=False)) == 2  # paged anew

            # 3. A reader that lets go mid-listing: the paging stops.
            (big / "poke").unlink()
            moto_proxy.reset()
            moto_proxy.faults = FaultPlan(rate=1.0, kinds=("delay",), delay=SLOW_PAGE,
                                          match=_later_page)
            with os.scandir(big) as it:
                next(it)
            time.sleep(SLOW_PAGE + 0.5)  # deliberate: room for a third page that must not come
            assert len(_big_pages(moto_proxy, later=True)) == 1

            # 4. A reader killed while its readdir waits for a page is let go at once
            # (the request reaper), not when the page comes.
            moto_proxy.reset()
            moto_proxy.faults = FaultPlan(rate=1.0, kinds=("delay",), delay=SLOW_LIST,
                                          match=_later_page)
            ls = subprocess.Popen(["ls", "-f", str(big)], stdout=subprocess.DEVNULL)
            while not _big_pages(moto_proxy, later=True):  # the first page was in
                time.sleep(0.05)
            time.sleep(0.5)  # deliberate: ls reads the first page's entries, then waits
            ls.kill()
            assert ls.wait(timeout=SLOW_LIST / 3) == -9
        finally:
            for f in local:
                f.close()
    assert "Traceback" not in m.log()


def _fill_local(root: Path, n: int, name: str = "big") -> None:
    (root / name).mkdir()
    for i in range(n):
        (root / name / f"f{i:06d}.log").write_bytes(b"x" * _size(i))
    (root / name / "sub").mkdir()


def _store_view_local(root: Path, name: str = "big") -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    with os.scandir(root / name) as it:
        for e in it:
            out[e.name] = None if e.is_dir() else e.stat().st_size
    return out


#: The directory the stress runs in: 4 pages.
MID_DIR = 4_000

#: A lister: lists `big` ROUNDS times; each listing must hold every store file of the
#: fill, once each, in store order. Prints what went wrong, if anything.
_LISTER = """
import os, sys
big, n, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for _ in range(rounds):
    names = os.listdir(big)
    fill = [x for x in names if x.startswith("f") and x.endswith(".log")]
    if len(set(names)) != len(names):
        sys.exit(f"duplicates in a listing of {len(names)}")
    if fill != [f"f{i:06d}.log" for i in range(n)]:
        sys.exit(f"the fill's {n} names, in order, not listed: {len(fill)}")
"""

#: A creator: creates COUNT files (written and closed: committed), unlinking each odd
#: one again, each followed by a listing of `big`.
_CREATOR = """
import os, sys
big, tag, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
for i in range(count):
    path = os.path.join(big, f"w{tag}-{i:03d}")
    with open(path, "wb") as f:
        f.write(b"%d" % i)
    if i % 2:
        os.unlink(path)
    if i % 5 == 0:
        os.listdir(big)
"""


def test_local_listing_whole_and_in_order_while_it_changes(
    file_env: StoreEnv, tmp_path: Path,
) -> None:
    """file:// with BIG_DIR entries: the listing is the store's plus local-only files.
    Then in a directory of MID_DIR, three listers and two creator-unlinkers run at once
    (each change starts another paging while others run): every listing holds the fill
    once each in order, and the mount agrees with the store at the end."""
    root = Path(file_env.url.removeprefix("file://"))
    _fill_local(root, BIG_DIR)
    _fill_local(root, MID_DIR, "mid")
    with mounted(file_env, tmp_path, "commit_interval=600") as m:
        big = m.path / "big"
        local = _hold_local_files(big)
        try:
            expected = _store_view_local(root)
            expected.update(LOCAL_SIZES)
            names, view = _mount_view(big)
            assert view == expected
            assert _in_store_order(names, view)
            (big / "poke").write_bytes(b"")  # changes: it pages again as it is read
            (big / "poke").unlink()
            at = (len(names) - 1, 5000, 1000, 999, 1, 0)  # seekdir backwards
            read, again, rewound = _seek_back(big, at)
            assert read == names
            assert again == [names[i] for i in at] and rewound == names[0]
        finally:
            for f in local:
                f.close()
        mid = m.path / "mid"
        procs = [subprocess.Popen([sys.executable, "-c", _LISTER, str(mid), str(MID_DIR),
                                   "3"], stderr=subprocess.PIPE) for _ in range(3)]
        procs += [subprocess.Popen([sys.executable, "-c", _CREATOR, str(mid), tag, "30"],
                                   stderr=subprocess.PIPE) for tag in ("a", "b")]
        errors = [(p.wait(timeout=120), p.stderr.read().decode()) for p in procs
                  if p.stderr is not None]
        assert all(rc == 0 for rc, _ in errors), errors
        names, view = _mount_view(mid)
        assert view == _store_view_local(root, "mid")
        assert sorted(n for n in names if n.startswith("w")) == sorted(
            f"w{t}-{i:03d}" for t in "ab" for i in range(0, 30, 2))
