"""POSIX details foreign programs rely on, through real mounts (issue 11, bugs 4, 5, 7-10).

Unlink of an open file (the data stays readable through the handle, nothing comes back),
rm racing O_TRUNC writers, truncate(2) by path, two mounts creating one new log, errno
values, directory times and log volume. What the store holds is read straight from it.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.support.envs import StoreEnv
from tests.support.mounting import mounted
from tests.support.outside import list_keys, read_blob, replace_blob
from tests.support.waiting import pread_is_stale, wait_for


def spool_files(cache_dir: Path) -> list[str]:
    """Entries (journal, data) left in a mount's spool."""
    return sorted(p.name for p in (cache_dir / "spool").rglob("*")
                  if p.suffix in (".data", ".journal"))


# --- bug 4: unlink of an open file --------------------------------------------------------------
@pytest.mark.parametrize("how", ["rdwr", "append"])
def test_unlinked_open_file_keeps_its_data_and_stays_gone(store_env: StoreEnv, tmp_path: Path,
                                                          how: str) -> None:
    with mounted(store_env, tmp_path, "commit_interval=0.1") as m:
        f = m.path / "f"
        f.write_bytes(b"committed bytes\n")
        flags = os.O_RDWR | (os.O_APPEND if how == "append" else 0)
        fd = os.open(f, flags)
        try:
            os.unlink(f)
            assert not f.exists()
            # POSIX: the data stays readable through the handle, with its size...
            assert os.pread(fd, 100, 0) == b"committed bytes\n"
            st = os.fstat(fd)
            assert st.st_size == 16 and st.st_nlink == 0
            # ... and what is written through it is readable there and nowhere else.
            if how == "append":
                os.write(fd, b"hi\n")
            else:
                os.pwrite(fd, b"hi\n", 16)
            os.fsync(fd)
            assert os.pread(fd, 100, 0) == b"committed bytes\nhi\n"
            time.sleep(0.5)  # deliberate: several commit intervals in which nothing may commit
        finally:
            os.close(fd)
        assert not f.exists() and "f" not in os.listdir(m.path)
        assert read_blob(store_env, "f") is None
    assert read_blob(store_env, "f") is None, "the unlinked name came back at unmount"
    assert spool_files(m.cache_dir) == []


def test_shell_rdwr_handle_after_rm_brings_nothing_back(store_env: StoreEnv,
                                                        tmp_path: Path) -> None:
    with mounted(store_env, tmp_path) as m:
        script = "echo old > f; exec 3<>f; rm f; echo hi >&3; exec 3>&-; ls"
        res = subprocess.run(["bash", "-c", script], cwd=m.path, capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 0 and res.stdout == "" and res.stderr == "", res
    assert read_blob(store_env, "f") is None


# --- bug 5: rm racing O_TRUNC writers -----------------------------------------------------------
def test_rm_racing_truncating_writers(store_env: StoreEnv, tmp_path: Path) -> None:
    rounds = 30 if store_env.name == "file" else 8
    with mounted(store_env, tmp_path) as m:
        d = m.path / "d"
        d.mkdir()
        script = (f"for k in $(seq {rounds}); do (echo foo>f) & rm -f f & (echo foo>f) & "
                  "wait; done; rm -f f")
        res = subprocess.run(["bash", "-c", script], cwd=d, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0 and res.stderr == "", res.stderr
        assert os.listdir(d) == []
        assert not (d / "f").exists()
        wait_for(lambda: _pending(m.path / "d") == 0, 10, "no pending bytes")
        d.rmdir()
    assert [k for k in list_keys(store_env) if k.startswith("d/")] == []
    assert spool_files(m.cache_dir) == []
    with mounted(store_env, tmp_path, cache_dir=m.cache_dir, name="again") as again:
        assert os.listdir(again.path) == []


def _pending(path: Path) -> int:
    """Bytes still pending under `path`, from the files' xattrs."""
    total = 0
    for child in path.iterdir():
        try:
            total += int(os.getxattr(child, "user.blobfs.pending_bytes"))
        except OSError:
            continue
    return total


# --- bug 7: truncate(2) by path -----------------------------------------------------------------
def test_truncate_by_path_leaves_nothing_in_the_spool(store_env: StoreEnv,
                                                      tmp_path: Path) -> None:
    with mounted(store_env, tmp_path) as m:
        a = m.path / "a"
        for size in (783163, 10, 0, 4096):
            a.write_bytes(b"")
            os.truncate(a, size)
            assert a.stat().st_size == size
        assert spool_files(m.cache_dir) == [], "a clean file keeps no spool entry"
    assert read_blob(store_env, "a") == bytes(4096)
    assert spool_files(m.cache_dir) == []


# --- bug 8: two mounts create one new log ------------------------------------------------------
def test_two_mounts_create_one_log_with_o_append(store_env: StoreEnv, tmp_path: Path) -> None:
    lines = 150
    with mounted(store_env, tmp_path, "commit_interval=0.2", name="a") as a, \
            mounted(store_env, tmp_path, "commit_interval=0.2", name="b") as b:
        fds = {tag: os.open(m.path / "new.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
               for tag, m in (("A", a), ("B", b))}
        errors: list[BaseException] = []

        def writer(tag: str) -> None:
            try:
                for n in range(lines):
                    os.write(fds[tag], b"%s %05d %s|\n" % (tag.encode(), n, b"." * (n % 97)))
                    if n % 10 == 0:
                        time.sleep(0.01)  # deliberate: lets the two writers interleave
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(t,)) for t in fds]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for fd in fds.values():
            os.close(fd)  # EIO here was the bug
        assert not errors, errors
        # Both created it: one first commit lost its If-None-Match and was rebased.
        assert "rebased" in a.log() + b.log()
    data = read_blob(store_env, "new.log")
    assert data is not None
    got = data.decode().splitlines()
    for tag in "AB":
        mine = [line for line in got if line.startswith(tag + " ")]
        want = [f"{tag} {n:05d} {'.' * (n % 97)}|" for n in range(lines)]
        assert mine == want, f"writer {tag}: lines missing, torn or out of order"
    assert len(got) == 2 * lines


# --- bug 9: errno -------------------------------------------------------------------------------
def test_errno_for_sizes_names_and_special_files(any_store_env: StoreEnv,
                                                 tmp_path: Path) -> None:
    with mounted(any_store_env, tmp_path) as m:
        f = m.path / "f"
        f.write_bytes(b"x")
        with pytest.raises(OSError) as err:
            os.truncate(f, 999999999999999)
        assert err.value.errno in (errno.EFBIG, errno.EINVAL)
        assert f.read_bytes() == b"x"
        with pytest.raises(OSError) as err:
            (m.path / ("n" * 256)).write_bytes(b"")
        assert err.value.errno == errno.ENAMETOOLONG
        # Each name is fine, the key is not: 5 x 240 bytes is past every store's 1024.
        deep = m.path
        with pytest.raises(OSError) as err:
            for i in range(5):
                deep = deep / (str(i) * 240)
                deep.mkdir()
        assert err.value.errno == errno.ENAMETOOLONG
        bad = os.fsencode(str(m.path)) + b"/caf\xe9"
        with pytest.raises(OSError) as err:
            os.close(os.open(bad, os.O_CREAT | os.O_WRONLY, 0o644))
        assert err.value.errno == errno.EILSEQ
        with pytest.raises(FileNotFoundError):
            os.stat(bad)
        os.mknod(m.path / "node", stat.S_IFREG | 0o644)
        assert (m.path / "node").stat().st_size == 0
        with pytest.raises(OSError) as err:
            os.mkfifo(m.path / "fifo")
        assert err.value.errno == errno.EPERM
    keys = list_keys(any_store_env) if any_store_env.name != "memory" else None
    if keys is not None:
        assert "node" in keys and not any(len(k) > 1024 for k in keys)


def test_directory_times_change_with_its_entries(file_env: StoreEnv, tmp_path: Path) -> None:
    # The core keeps these times (stores have none for directories): one store is enough.
    with mounted(file_env, tmp_path) as m:
        d = m.path / "d"
        d.mkdir()
        seen = [d.stat().st_mtime_ns]

        def changed() -> None:
            st = d.stat()
            assert st.st_mtime_ns > seen[-1] and st.st_ctime_ns >= st.st_mtime_ns
            seen.append(st.st_mtime_ns)

        for step in (lambda: (d / "a").write_bytes(b"1"),
                     lambda: os.rename(d / "a", d / "b"),
                     lambda: os.unlink(d / "b")):
            # The daemon stamps times from the wall clock: once it has moved past the last
            # mtime, the next change must show a later one.
            wait_for(lambda: time.time_ns() > seen[-1], 5, "the clock passing the last mtime")
            step()
            changed()


# --- bug 10: log volume -------------------------------------------------------------------------
def test_repeated_failed_reads_log_once(file_env: StoreEnv, tmp_path: Path) -> None:
    # The adapter decides what is logged, whatever the store: one store is enough.
    store_env = file_env
    with mounted(store_env, tmp_path, "metadata_ttl=0.1", name="a") as a:
        (a.path / "r.log").write_bytes(b"version one\n" * 10000)
        fd = os.open(a.path / "r.log", os.O_RDONLY)
        try:
            assert os.pread(fd, 10, 0) == b"version on"
            replace_blob(store_env, "r.log", b"something else\n" * 50)
            deadline = time.monotonic() + 30

            def stale_read() -> bool:
                # Out of the kernel's page cache, so every read reaches the daemon.
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                return pread_is_stale(fd, 10, 0)

            wait_for(stale_read, 30, "the first ESTALE after the blob was replaced")
            for _ in range(199):
                assert stale_read(), "a stale handle read again"
            assert time.monotonic() < deadline, "200 failed reads took over 30 s"
        finally:
            os.close(fd)
        log = a.log()
    lines = [ln for ln in log.splitlines() if "r.log" in ln and re.search(r" (WARNING|ERROR) ", ln)]
    assert len(lines) <= 2, "\n".join(lines[:10])
