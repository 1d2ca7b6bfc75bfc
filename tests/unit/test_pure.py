"""Pure logic: range sets, commit layouts, option parsing, the errno table."""

from __future__ import annotations

import errno
import logging

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from blobfs.config import MountConfig, parse_options, parse_size
from blobfs.errors import (
    AccessDenied,
    FsError,
    NotFound,
    PreconditionFailed,
    StoreUnavailable,
    UsageError,
    errno_for,
)
from blobfs.fs.extents import RangeSet
from blobfs.store.base import Range, base_segments
from blobfs.types import (
    META_COMMIT,
    META_STREAM,
    ETag,
    ObjectMeta,
    identifier_metadata,
    is_append_of,
    metadata_from_store,
    rooted_stream,
)


@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 50)), max_size=20),
       st.integers(0, 260))
# Edges pinned so every run has them (no failure of this test has been recorded): empty
# ranges; touching and nested ranges that must merge; a clip inside a range.
@example([(0, 0)], 0)
@example([(0, 5), (5, 5), (3, 1), (20, 0)], 7)
@example([(200, 50), (100, 100)], 260)
def test_rangeset_matches_a_bitmap(adds: list[tuple[int, int]], clip: int) -> None:
    rs = RangeSet()
    bits = [False] * 300
    for off, size in adds:
        rs.add(off, size)
        for i in range(off, off + size):
            bits[i] = True
    rs.clip(clip)
    bits = [b and i < clip for i, b in enumerate(bits)]
    assert rs.total == sum(bits)
    for r in rs:
        assert all(bits[r.off : r.end])
    pieces = list(rs.split(0, 300))
    assert sum(p.size for _, p in pieces) == 300
    for inside, p in pieces:
        assert all(bits[i] == inside for i in range(p.off, p.end))


def test_base_segments_layout() -> None:
    assert base_segments(10, [Range(3, 2)], 8) == [
        ("base", Range(0, 3)), ("dirty", Range(3, 2)), ("base", Range(5, 3)),
        ("zero", Range(8, 2))]
    assert base_segments(4, [Range(2, 10)], 8) == [("base", Range(0, 2)),
                                                   ("dirty", Range(2, 2))]
    assert base_segments(0, [], 5) == []


def test_sizes_and_options() -> None:
    assert parse_size("8M") == 8 << 20
    assert parse_size("512k") == 512 << 10
    assert parse_size("1GiB") == 1 << 30
    opts = parse_options(["_netdev,nofail,x-systemd.automount,commit_interval=0.5", "ro"])
    assert opts == {"commit_interval": 0.5, "read_only": True}
    with pytest.raises(UsageError, match="unknown option"):
        parse_options(["nope=1"])
    with pytest.raises(UsageError, match="needs a value"):
        parse_options(["block_size"])
    with pytest.raises(UsageError, match="block_size must be"):
        MountConfig.build("file:///x", "/mnt", {"block_size": 10})


def test_errno_table() -> None:
    assert errno_for(NotFound("k")) == (errno.ENOENT, logging.DEBUG)
    assert errno_for(PreconditionFailed("k"))[0] == errno.ESTALE
    assert errno_for(AccessDenied("k"))[0] == errno.EACCES
    assert errno_for(StoreUnavailable("k"))[0] == errno.EIO
    assert errno_for(FsError(errno.EROFS))[0] == errno.EROFS
    assert errno_for(OSError(errno.ENOSPC, "full"))[0] == errno.ENOSPC
    assert errno_for(RuntimeError("bug"))[0] == errno.EIO


def test_lineage() -> None:
    old = ObjectMeta("k", 10, ETag("a"), 0, {META_STREAM: "s"})
    grown = ObjectMeta("k", 20, ETag("b"), 0, {META_STREAM: "s"})
    rewritten = ObjectMeta("k", 20, ETag("c"), 0, {META_STREAM: "t"})
    foreign = ObjectMeta("k", 20, ETag("d"), 0, {})
    shrunk = ObjectMeta("k", 5, ETag("e"), 0, {META_STREAM: "s"})
    assert is_append_of(grown, old)
    assert not is_append_of(rewritten, old)
    assert not is_append_of(foreign, old)
    assert not is_append_of(shrunk, old)


def test_lineage_rooted_in_a_version_another_tool_wrote() -> None:
    """The first append onto a foreign version takes a stream id derived from it."""
    sdk = ObjectMeta("k", 10, ETag("a"), 0, {})
    grown = ObjectMeta("k", 20, ETag("b"), 0, {META_STREAM: rooted_stream(sdk)})
    later = ObjectMeta("k", 30, ETag("c"), 0, {META_STREAM: rooted_stream(sdk)})
    other_sdk = ObjectMeta("k", 10, ETag("z"), 0, {})
    assert is_append_of(grown, sdk) and is_append_of(later, sdk)
    assert not is_append_of(grown, other_sdk)  # rooted in another version
    assert not is_append_of(ObjectMeta("k", 20, ETag("d"), 0, {}), sdk)
    assert not is_append_of(ObjectMeta("k", 5, ETag("e"), 0, dict(grown.metadata)), sdk)


def test_metadata_names_read_in_either_spelling() -> None:
    # What moto or S3 return for an object an older blobfs wrote, what RGW returns for it,
    # and what Azure holds: all read as blobfs's hyphenated names; foreign names untouched.
    for wire in ({"blobfs_stream": "s", "Owner_Id": "x"}, {"blobfs-stream": "s", "owner_id": "x"},
                 {"BLOBFS_STREAM": "s", "owner_id": "x"}):
        assert metadata_from_store(wire) == {META_STREAM: "s", "owner_id": "x"}
    assert metadata_from_store(None) == {}
    azure = identifier_metadata({META_STREAM: "s", META_COMMIT: "c", "x-y": "1"})
    assert azure == {"blobfs_stream": "s", "blobfs_commit": "c", "x-y": "1"}
    assert metadata_from_store(azure) == {META_STREAM: "s", META_COMMIT: "c", "x-y": "1"}


def test_replay_splits_writes_at_the_commit_record() -> None:
    from blobfs.fs.journal import Base, CommitStart, Committed, Failed, Header, Journal, Write
    from blobfs.fs.recovery import replay

    header = Header("k", "s", None)
    records = [
        Write(0, 10),
        CommitStart("c1", 10),
        Write(10, 5),  # arrived while c1 was in flight
    ]
    state = replay(Journal(header, records))
    assert state.inflight is not None and state.inflight_id == "c1"
    assert [(r.off, r.size) for r in state.inflight.dirty] == [(0, 10)]
    assert [(r.off, r.size) for r in state.epoch.dirty] == [(10, 5)]
    assert state.size == 15
    done = replay(Journal(header, [*records, Committed(Base("e", 10, "x"))]))
    assert done.inflight is None and done.base == Base("e", 10, "x")
    assert [(r.off, r.size) for r in done.epoch.dirty] == [(10, 5)]
    failed = replay(Journal(header, [*records, Failed()]))
    assert [(r.off, r.size) for r in failed.epoch.dirty] == [(0, 15)]


def test_replay_keeps_only_the_uploads_of_unfinished_commits() -> None:
    from blobfs.fs.journal import (
        Base,
        CommitStart,
        Committed,
        Failed,
        Header,
        Journal,
        Record,
        Upload,
        Write,
    )
    from blobfs.fs.recovery import replay

    def uploads(*records: Record) -> list[str]:
        return replay(Journal(Header("k", "s", None), [Write(0, 9), *records])).uploads

    done = [Upload("u1"), CommitStart("c1", 9), Committed(Base("e", 9, "x"))]
    assert uploads(*done) == []  # completed with its commit
    assert uploads(Upload("u2"), CommitStart("c2", 9), Failed()) == []  # aborted by the failure
    later = [Write(9, 9), Upload("u3"), CommitStart("c3", 18), Upload("u4")]
    assert uploads(*done, *later) == ["u3", "u4"]  # died with these open
