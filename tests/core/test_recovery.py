"""Crash recovery never locks a mount out (issue 11, bug 6): idempotent, one uniquely named
copy per spool entry that cannot be applied, and an entry that cannot be handled at all is
moved aside and reported once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from blobfs.errors import TransientError
from blobfs.fs.journal import base_record
from blobfs.fs.recovery import recover_spool
from blobfs.fs.spool import Spool
from blobfs.store.base import put_bytes, read_all
from blobfs.store.memory import MemoryStore
from tests.core.harness import running_fs

pytestmark = pytest.mark.trio


class _LostReply:
    """A store whose recovered-copy puts land but whose replies get lost (a reset after
    the server applied the request): recovery sees a failure for a copy that exists."""

    def __init__(self, inner: MemoryStore) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def begin_upload(self, key: str, *args: Any, **kwargs: Any) -> Any:
        upload = self._inner.begin_upload(key, *args, **kwargs)
        if ".blobfs-recovered-" not in key:
            return upload
        commit = upload.commit

        async def lost(*a: Any, **k: Any) -> Any:
            await commit(*a, **k)
            raise TransientError("connection reset after the request was applied")

        upload.commit = lost
        return upload


async def _entries(cache: Path, store: MemoryStore, key: str, base: Any, n: int) -> None:
    spool = Spool(cache, store.display)
    spool.prepare()
    try:
        for i in range(n):
            entry = spool.new_entry(key, base_record(base))
            await entry.write(0, b"mine %d" % i)  # a rewrite, not an append: no rebase
            await entry.close()
    finally:
        spool.release()


def _left(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "spool").rglob("*")
                  if p.suffix in (".data", ".journal") and p.parent.name != "aside")


async def test_recovery_is_idempotent_with_one_unique_copy_per_entry(store: MemoryStore,
                                                                      tmp_path: Path) -> None:
    v1 = await put_bytes(store, "k", b"original", base=None, metadata={})
    await _entries(tmp_path / "cache", store, "k", v1, 3)
    await put_bytes(store, "k", b"theirs", base=v1, metadata={})  # moved on: no rebase

    async with running_fs(store, tmp_path) as fs:
        first = await recover_spool(_LostReply(store), fs.spool, fs.make_writer)  # type: ignore[arg-type]
    assert first.left_pending == ["k"] * 3 and _left(tmp_path / "cache")
    copies = sorted(k for k in store.ns if ".blobfs-recovered-" in k)
    assert len(copies) == 3, "one copy per entry, each its own name within one second"

    async with running_fs(store, tmp_path) as fs:
        second = await recover_spool(store, fs.spool, fs.make_writer)
    assert sorted(second.recovered_copies) == copies, "the retry reused each entry's name"
    assert sorted(k for k in store.ns if ".blobfs-recovered-" in k) == copies
    assert _left(tmp_path / "cache") == []
    # The whole file as the entry had it; the base bytes it never held read as zeros.
    assert sorted([await read_all(store, store.ns[c][1]) for c in copies]) == \
        [b"mine %d\0\0" % i for i in range(3)]
    assert await read_all(store, await store.head("k")) == b"theirs"

    async with running_fs(store, tmp_path) as fs:
        third = await recover_spool(store, fs.spool, fs.make_writer)
    assert third.summary().startswith("0 committed, 0 saved")


async def test_an_entry_recovery_cannot_handle_is_set_aside_once(store: MemoryStore,
                                                                 tmp_path: Path,
                                                                 caplog: Any) -> None:
    await _entries(tmp_path / "cache", store, "good", None, 1)
    await _entries(tmp_path / "cache", store, "bad", None, 1)
    for journal in (tmp_path / "cache" / "spool").rglob("*.journal"):
        if b'"bad"' in journal.read_bytes():
            data = journal.with_suffix(".data")
            data.unlink()
            data.mkdir()  # cannot be opened as a file: not a store problem, not readable
    async with running_fs(store, tmp_path) as fs:
        report = await recover_spool(store, fs.spool, fs.make_writer)
    assert report.committed == ["good"] and report.set_aside == ["bad"]
    assert await read_all(store, await store.head("good")) == b"mine 0"
    assert [r for r in caplog.records if "moved to" in r.getMessage()], caplog.text
    assert _left(tmp_path / "cache") == []
    caplog.clear()
    async with running_fs(store, tmp_path) as fs:
        again = await recover_spool(store, fs.spool, fs.make_writer)
    assert again.set_aside == [] and "bad" not in caplog.text, "reported once"


def _plant(cache: Path, store: MemoryStore, name: str, journal: bytes, data: bytes) -> Path:
    """An entry as an earlier daemon left it: its journal and data file, written as bytes."""
    root = Spool(cache, store.display).root
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    for parent in (cache, cache / "spool", root):
        parent.chmod(0o700)
    (root / f"{name}.data").write_bytes(data)
    path = root / f"{name}.journal"
    path.write_bytes(journal)
    return path


async def test_a_spool_written_before_typed_records_recovers(store: MemoryStore,
                                                             tmp_path: Path) -> None:
    # The exact bytes the daemon wrote before journal records were typed (7efacde): an
    # append onto a committed version, a commit that failed, then more writes and a
    # truncate. Written out literally: the format must stay readable.
    v1 = await put_bytes(store, "old.log", b"hello\n", base=None, metadata={})
    journal = (
        b'{"t":"H","key":"old.log","source":"%s","base":{"etag":"%s","size":6,"stream":null}}\n'
        b'{"t":"W","o":6,"n":6}\n'
        b'{"t":"P","id":"c1","s":12}\n'
        b'{"t":"F"}\n'
        b'{"t":"W","o":12,"n":4}\n'
        b'{"t":"T","s":14}\n'
    ) % (store.display.encode(), v1.etag.encode())
    _plant(tmp_path / "cache", store, "0123456789ab-cafe0001", journal,
           bytes(6) + b"world\n!!??")
    async with running_fs(store, tmp_path) as fs:
        report = await recover_spool(store, fs.spool, fs.make_writer)
    assert report.committed == ["old.log"], report.summary()
    assert await read_all(store, await store.head("old.log")) == b"hello\nworld\n!!"
    assert _left(tmp_path / "cache") == []


async def test_hostile_journals_are_kept_as_damage_and_never_crash_recovery(
        store: MemoryStore, tmp_path: Path, caplog: Any) -> None:
    header = b'{"t":"H","key":"%s","source":"%s","base":null}\n'
    cache = tmp_path / "cache"
    lines = {
        "torn": b'{"t":"W","o":0,"n":3}\n{"t":"W","o":3,"n"',  # crash mid-append: fine
        "unknown": b'{"t":"W","o":0,"n":3}\n{"t":"X","o":1}\n{"t":"W","o":3,"n":3}\n',
        "types": b'{"t":"W","o":"0","n":3}\n{"t":"W","o":3,"n":3}\n',
        "shape": b'{"t":"W","o":0,"n":3}\n["W",3,3]\n{"t":"T","s":6}\n',
        "binary": b'\x00\xff\xfe\n{"t":"W","o":0,"n":3}\n',
    }
    planted = {name: _plant(cache, store, f"{i:012x}-0000000{i}",
                            header % (name.encode(), store.display.encode()) + body, b"abcdef")
               for i, (name, body) in enumerate(lines.items())}
    async with running_fs(store, tmp_path) as fs:
        report = await recover_spool(store, fs.spool, fs.make_writer)
    assert report.committed == ["torn"]
    assert await read_all(store, await store.head("torn")) == b"abc"
    damaged = sorted(str(planted[n]) for n in ("unknown", "types", "shape", "binary"))
    assert sorted(report.damaged) == damaged
    assert all(planted[n].exists() for n in ("unknown", "types", "shape", "binary"))
    assert not any(r.exc_info for r in caplog.records), "a traceback was logged"
    for name, line in (("unknown", 3), ("types", 2), ("shape", 3), ("binary", 2)):
        assert f"spool journal {planted[name]} is damaged at line {line}" in caplog.text
