"""The core behaviours of semantics §2-3 through real mounts, on every store two mounts share."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import WITH_RGW
from tests.support.envs import StoreEnv
from tests.support.mounting import mounted
from tests.support.waiting import wait_for

MiB = 1 << 20


@pytest.mark.parametrize("store_env", WITH_RGW, indirect=True)
def test_50mib_written_on_a_reads_back_on_fresh_b(store_env: StoreEnv, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(50 * MiB))
    with mounted(store_env, tmp_path, name="a") as a:
        subprocess.run(["dd", f"if={src}", f"of={a.path / 'big.bin'}", "bs=1M", "status=none"],
                       check=True)
    with mounted(store_env, tmp_path, name="b") as b:
        got = hashlib.sha256((b.path / "big.bin").read_bytes()).hexdigest()
    assert got == hashlib.sha256(src.read_bytes()).hexdigest()


@pytest.mark.parametrize("store_env", WITH_RGW, indirect=True)
def test_open_writer_lines_appear_on_other_mount(store_env: StoreEnv, tmp_path: Path) -> None:
    """A writer that never closes or fsyncs: the commit timer makes each line remote."""
    limit = 1.0 + 1.0 + 1.0  # commit_interval + metadata_ttl + 1 s
    with mounted(store_env, tmp_path, name="a") as a, mounted(store_env, tmp_path, name="b") as b:
        written: dict[int, float] = {}
        seen: dict[int, float] = {}
        done = threading.Event()

        def writer() -> None:
            with open(a.path / "live.log", "w") as f:
                for i in range(20):
                    f.write(f"line {i}\n")
                    f.flush()
                    written[i] = time.monotonic()
                    time.sleep(0.1)  # deliberate: a slow logger, one line per 0.1 s
                done.wait(30)

        t = threading.Thread(target=writer)
        t.start()
        try:
            def all_seen() -> bool:
                try:
                    text = (b.path / "live.log").read_text()
                except FileNotFoundError:
                    text = ""
                now = time.monotonic()
                for line in text.splitlines():
                    i = int(line.split()[1])
                    seen.setdefault(i, now)
                return len(seen) == 20

            wait_for(all_seen, 30, lambda: f"20 lines on mount b (saw {sorted(seen)})",
                     interval=0.05)
        finally:
            done.set()
            t.join()
    assert sorted(seen) == list(range(20))
    lags = [seen[i] - written[i] for i in range(20)]
    assert max(lags) <= limit, f"lags {lags}"


@pytest.mark.parametrize("store_env", WITH_RGW, indirect=True)
def test_tail_f_follows_appends(store_env: StoreEnv, tmp_path: Path) -> None:
    with mounted(store_env, tmp_path, name="a") as a, mounted(store_env, tmp_path, name="b") as b:
        (a.path / "app.log").write_text("")
        wait_for(lambda: (b.path / "app.log").exists(), 10)
        out = tmp_path / "tail.out"
        with open(out, "wb") as sink:
            tail = subprocess.Popen(["tail", "-f", "-s", "0.2", str(b.path / "app.log")],
                                    stdout=sink, stderr=subprocess.STDOUT)
            try:
                for i in range(50):
                    with open(a.path / "app.log", "a") as f:
                        f.write(f"entry {i:02d}\n")
                    time.sleep(0.02)  # deliberate: the log grows while tail follows it
                wait_for(lambda: out.read_text().count("\n") >= 50, 30)
                time.sleep(1.5)  # deliberate: nothing more (no duplicates) may arrive
            finally:
                tail.terminate()
                tail.wait()
    lines = out.read_text().splitlines()
    assert lines == [f"entry {i:02d}" for i in range(50)]


def _read_errno(fd: int, off: int) -> int:
    """The errno of a 4 KiB pread at `off`, 0 when it succeeds."""
    try:
        os.pread(fd, 4096, off)
    except OSError as exc:
        return exc.errno or 0
    return 0


@pytest.mark.parametrize("store_env", WITH_RGW, indirect=True)
def test_replaced_blob_gives_estale_then_enoent(store_env: StoreEnv, tmp_path: Path) -> None:
    old = os.urandom(4 * MiB)
    new = os.urandom(4 * MiB)
    with mounted(store_env, tmp_path, name="a") as a, \
            mounted(store_env, tmp_path, name="b") as b:
        (a.path / "f.bin").write_bytes(old)
        wait_for(lambda: (b.path / "f.bin").exists() and
                 (b.path / "f.bin").stat().st_size == len(old), 10)
        fd = os.open(b.path / "f.bin", os.O_RDONLY)
        try:
            got = os.read(fd, MiB)
            assert got == old[:MiB]
            with open(a.path / "f.bin", "wb") as f:  # O_TRUNC rewrite
                f.write(new)
            # Noticed within metadata_ttl of a read; polled with pread so the offset stays.
            wait_for(lambda: _read_errno(fd, 3 * MiB) == errno.ESTALE, 10, "ESTALE")
            os.lseek(fd, 3 * MiB, os.SEEK_SET)
            with pytest.raises(OSError) as exc:
                os.read(fd, 4096)
            assert exc.value.errno == errno.ESTALE
            assert os.lseek(fd, 0, os.SEEK_CUR) == 3 * MiB
            with pytest.raises(OSError) as exc:
                os.read(fd, 4096)  # every later read fails too
            assert exc.value.errno == errno.ESTALE
        finally:
            os.close(fd)
        # Reopening gives the new version.
        assert (b.path / "f.bin").read_bytes() == new
        fd = os.open(b.path / "f.bin", os.O_RDONLY)
        try:
            assert os.read(fd, 10) == new[:10]
            (a.path / "f.bin").unlink()
            wait_for(lambda: _read_errno(fd, 2 * MiB) == errno.ENOENT, 10, "ENOENT")
            os.lseek(fd, 2 * MiB, os.SEEK_SET)
            with pytest.raises(OSError) as exc:
                os.read(fd, 4096)
            assert exc.value.errno == errno.ENOENT
        finally:
            os.close(fd)
        (a.path / "f.bin").write_bytes(b"third")
        wait_for(lambda: (b.path / "f.bin").exists(), 10)
        assert (b.path / "f.bin").read_bytes() == b"third"
