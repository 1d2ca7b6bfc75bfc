"""HeldFiles (store/local/held.py): a held version is read in place only while it is still
that version, still linked and in the page cache; held files are bounded in number and
time, and a deleted or replaced file's space is not kept."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from blobfs.store.local import held as held_mod
from blobfs.store.local.files import etag_of
from blobfs.store.local.held import HELD_MAX, HeldFiles


def _version(path: Path, data: bytes) -> tuple[int, str]:
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    return fd, etag_of(fd)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_held_version_reads_in_place(tmp_path: Path) -> None:
    held = HeldFiles()
    fd, etag = _version(tmp_path / "f", b"0123456789")
    assert held.read_nowait("f", etag, 0, 4) is None  # nothing held yet
    held.adopt("f", etag, fd)
    assert bytes(held.read_nowait("f", etag, 2, 4) or b"?") == b"2345"
    assert bytes(held.read_nowait("f", etag, 8, 100) or b"?") == b"89"  # short at the end
    at_end = held.read_nowait("f", etag, 10, 4)
    assert at_end is not None and bytes(at_end) == b""
    assert held.read_nowait("f", "another-etag", 0, 4) is None
    held.close_all()


@pytest.mark.parametrize("change", ["replaced", "deleted", "appended", "rewritten"])
def test_a_changed_file_is_not_read_and_is_closed(tmp_path: Path, change: str) -> None:
    held = HeldFiles()
    path = tmp_path / "f"
    fd, etag = _version(path, b"old bytes\n")
    before = _open_fds()
    held.adopt("f", etag, fd)
    if change == "replaced":  # a new version renamed over it, as a commit does
        (tmp_path / "new").write_bytes(b"new bytes\n")
        os.rename(tmp_path / "new", path)
    elif change == "deleted":
        path.unlink()
    elif change == "appended":
        with open(path, "ab") as f:
            f.write(b"more\n")
    else:  # written in place by something else, same size
        with open(path, "r+b") as f:
            f.write(b"OLD")
    assert held.read_nowait("f", etag, 0, 4) is None
    assert _open_fds() == before - 1  # the held fd was closed: no space kept


def test_held_files_are_bounded_and_expire(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           ) -> None:
    held = HeldFiles()
    before = _open_fds()
    etags = {}
    for i in range(HELD_MAX + 3):
        fd, etags[i] = _version(tmp_path / f"f{i}", b"x" * 10)
        held.adopt(f"f{i}", etags[i], fd)
    assert _open_fds() == before + HELD_MAX
    assert held.read_nowait("f0", etags[0], 0, 1) is None  # the oldest were closed
    assert held.read_nowait(f"f{HELD_MAX + 2}", etags[HELD_MAX + 2], 0, 1) is not None
    fd, etag = _version(tmp_path / "f0", b"y" * 10)
    held.adopt("f0", etag, fd)
    held.adopt("f0", etag, os.open(tmp_path / "f0", os.O_RDONLY))  # a second: closed
    assert _open_fds() == before + HELD_MAX
    # Unread for longer than HELD_IDLE: the next read closes them all.
    monkeypatch.setattr(held_mod, "HELD_IDLE", -1.0)
    assert held.read_nowait("f0", etag, 0, 1) is None
    assert _open_fds() == before
    held.drop_key("nothing")


def test_drop_key_closes_that_keys_versions(tmp_path: Path) -> None:
    held = HeldFiles()
    before = _open_fds()
    fd, etag = _version(tmp_path / "a", b"a")
    held.adopt("a", etag, fd)
    fd, etag_b = _version(tmp_path / "b", b"b")
    held.adopt("b", etag_b, fd)
    held.drop_key("a")
    assert _open_fds() == before + 1
    assert bytes(held.read_nowait("b", etag_b, 0, 1) or b"?") == b"b"
    held.close_all()
    assert _open_fds() == before


def test_bytes_not_in_the_page_cache_go_to_the_worker(tmp_path: Path) -> None:
    """RWF_NOWAIT refuses a read that would wait for the disk: None, and for COLD_FOR the
    version's reads go to the worker without trying (each try starts read-ahead and gives
    up); the file stays held, and once warm it is read in place again."""
    held = HeldFiles()
    path = tmp_path / "cold"
    fd, etag = _version(path, os.urandom(1 << 20))
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # written back, so droppable
    held.adopt("cold", etag, fd)
    assert held.read_nowait("cold", etag, 0, 1 << 20) is None
    os.pread(fd, 1 << 20, 0)  # what the worker's read does
    assert held.read_nowait("cold", etag, 0, 1 << 20) is None  # within COLD_FOR
    held.adopt("cold", etag, os.open(path, os.O_RDONLY))  # already held: this one closed
    held.close_all()  # as after HELD_IDLE: held anew, and tried in place again
    held.adopt("cold", etag, os.open(path, os.O_RDONLY))
    got = held.read_nowait("cold", etag, 0, 1 << 20)
    assert got is not None and bytes(got) == path.read_bytes()
    held.close_all()
