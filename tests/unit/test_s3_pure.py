"""The pure parts of the S3 store: the multipart layout planner (including the > 5 GiB
splits no test server could hold), the multipart ETag, error classification and source-URL
parsing. No server; the wire behaviour is in tests/contract/test_s3_store.py.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import botocore.exceptions as bce
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from blobfs.config import StoreConfig
from blobfs.errors import (
    AccessDenied,
    BadRequest,
    NotFound,
    ObjectTooLarge,
    PreconditionFailed,
    Throttled,
    TransientError,
    UsageError,
)
from blobfs.store import open_store
from blobfs.store.base import Range, base_segments
from blobfs.store.s3.errors import classify
from blobfs.store.s3.planner import (
    MAX_PART,
    MAX_PARTS,
    MIN_PART,
    Part,
    StagedPart,
    multipart_etag,
    part_number_for,
    plan_parts,
    split_copy,
)

MiB = 1 << 20
GiB = 1 << 30


# --- the layout planner (pure) ---------------------------------------------------------------
def check_layout(size: int, segments: Sequence[tuple[str, Range]], parts: Sequence[Part],
                 staged: Sequence[StagedPart] = ()) -> None:
    """Every invariant S3 and semantics §2 put on a multipart layout."""
    assert parts, "a layout has parts"
    pos = 0
    last_number = 0
    for i, p in enumerate(parts):
        assert p.range.off == pos, f"part {i} leaves a gap or overlaps"
        pos = p.range.end
        assert 1 <= p.number <= MAX_PARTS and p.number > last_number, "numbers ascend"
        last_number = p.number
        assert p.range.size <= MAX_PART
        if i < len(parts) - 1:
            assert p.range.size >= MIN_PART, f"part {i} of {len(parts)} is under 5 MiB"
        if p.source == "copy":
            # A copy must lie inside one base segment: its bytes are unchanged.
            assert any(k == "base" and r.off <= p.range.off and p.range.end <= r.end
                       for k, r in segments)
        elif p.source == "upload":
            assert p.pieces[0][1].off == p.range.off and p.pieces[-1][1].end == p.range.end
            for kind, r in p.pieces:
                assert any(k == kind and s.off <= r.off and r.end <= s.end
                           for k, s in segments), f"piece {kind} {r} disagrees with the base"
        else:
            assert p.staged is not None and p.staged in staged
            assert p.number == p.staged.number
            assert any(k == "dirty" and r.off <= p.range.off and p.range.end <= r.end
                       for k, r in segments), "a staged part must cover only new bytes"
    assert pos == size


def uploaded_bytes(parts: Sequence[Part]) -> int:
    return sum(p.range.size for p in parts if p.source == "upload")


def test_plan_append_copies_the_base_and_uploads_only_the_tail() -> None:
    n, k = 64 * MiB, 100
    segments = base_segments(n + k, [Range(n, k)], n)
    parts = plan_parts(n + k, segments)
    check_layout(n + k, segments, parts)
    assert [(p.source, p.range) for p in parts] == [("copy", Range(0, n)),
                                                     ("upload", Range(n, k))]


def test_plan_splits_copies_per_5_gib() -> None:
    n, k = 12 * GiB + 7, 10
    segments = base_segments(n + k, [Range(n, k)], n)
    parts = plan_parts(n + k, segments)
    check_layout(n + k, segments, parts)
    assert [p.source for p in parts] == ["copy"] * 3 + ["upload"]
    assert uploaded_bytes(parts) == k
    assert split_copy(Range(0, 5 * GiB)) == [Range(0, 5 * GiB)]
    assert len(split_copy(Range(0, 5 * GiB + 1))) == 2


def test_plan_small_write_in_the_middle_reads_base_bytes_to_reach_5_mib() -> None:
    size = 100 * MiB
    segments = base_segments(size, [Range(50 * MiB, 10)], size)
    parts = plan_parts(size, segments)
    check_layout(size, segments, parts)
    # One part of new bytes padded with base bytes; the rest is copied.
    assert uploaded_bytes(parts) == MIN_PART
    assert sum(p.range.size for p in parts if p.source == "copy") == size - MIN_PART


def test_plan_uses_the_staged_blocks_of_an_append_stream() -> None:
    n, block = 64 * MiB, 8 * MiB
    size = n + 3 * block + 1000
    staged = [StagedPart(n + i * block, block, part_number_for(n + i * block, n), f"e{i}")
              for i in range(3)]
    segments = base_segments(size, [Range(n, size - n)], n)
    parts = plan_parts(size, segments, staged)
    check_layout(size, segments, parts, staged)
    assert [p.source for p in parts] == ["copy", "staged", "staged", "staged", "upload"]
    assert uploaded_bytes(parts) == 1000


def test_plan_resends_a_staged_block_that_cannot_stand_alone() -> None:
    # Base of 1 MiB: the first block after it would leave a 1 MiB first part.
    n, block = 1 * MiB, 8 * MiB
    size = n + 2 * block
    staged = [StagedPart(n + i * block, block, part_number_for(n + i * block, n), f"e{i}")
              for i in range(2)]
    segments = base_segments(size, [Range(n, size - n)], n)
    parts = plan_parts(size, segments, staged)
    check_layout(size, segments, parts, staged)
    assert [p.source for p in parts] == ["upload", "staged"]
    assert parts[1].staged == staged[1]


def test_plan_drops_staged_bytes_no_longer_dirty_or_cut_by_truncate() -> None:
    size = 20 * MiB
    staged = [StagedPart(0, 8 * MiB, 1, "a"), StagedPart(16 * MiB, 8 * MiB, 4, "b")]
    segments = base_segments(size, [Range(8 * MiB, 12 * MiB)], 30 * MiB)
    parts = plan_parts(size, segments, staged)
    check_layout(size, segments, parts, staged)
    assert not any(p.source == "staged" for p in parts)


def test_part_numbers_of_staged_blocks_leave_room_for_copies() -> None:
    for base in (0, 3 * MiB, 64 * MiB, 40 * GiB, 3 << 40):
        starts = [base + i * MIN_PART for i in range(50)]
        numbers = [part_number_for(s, base) for s in starts]
        assert numbers == sorted(set(numbers)), "distinct and ascending"
        copies_needed = -(-base // MAX_PART)
        assert numbers[0] > copies_needed
        assert numbers[-1] <= MAX_PARTS


def test_plan_refuses_more_than_10000_parts() -> None:
    # Alternating 5 MiB dirty and 5 MiB clean ranges of a 60 GiB blob: 12,288 parts.
    size = 60 * GiB
    dirty = [Range(off, MIN_PART) for off in range(0, size, 2 * MIN_PART)]
    with pytest.raises(ObjectTooLarge):
        plan_parts(size, base_segments(size, dirty, size), target=MIN_PART)


@st.composite
def layouts(draw: st.DrawFn) -> tuple[int, list[tuple[str, Range]], list[StagedPart]]:
    unit = draw(st.sampled_from([MiB, MIN_PART // 3, 7 * MiB + 13]))
    base_size = draw(st.integers(0, 40)) * unit + draw(st.integers(0, 1000))
    size = max(MIN_PART, draw(st.integers(0, 50)) * unit + draw(st.integers(0, 1000)))
    dirty = [Range(draw(st.integers(0, size)), draw(st.integers(0, 12 * MiB)))
             for _ in range(draw(st.integers(0, 6)))]
    staged = []
    for _ in range(draw(st.integers(0, 5))):
        off = draw(st.integers(0, size))
        length = draw(st.sampled_from([MIN_PART, 8 * MiB, 3 * MiB]))
        staged.append(StagedPart(off, length, part_number_for(off, base_size), "e"))
    return size, base_segments(size, dirty, base_size), staged


@settings(max_examples=400, deadline=None)
@given(layouts())
# Edges pinned so every run has them (no failure of this test has been recorded): a new
# blob of exactly one minimum part; a truncate below the base; a staged block the size
# has cut; staged blocks at the base's end with nothing else dirty.
@example((MIN_PART, base_segments(MIN_PART, [], 0), []))
@example((MIN_PART, base_segments(MIN_PART, [], 40 * MiB), []))
@example((MIN_PART + 10, base_segments(MIN_PART + 10, [Range(MIN_PART, 10)], MIN_PART),
          [StagedPart(MIN_PART, 8 * MiB, part_number_for(MIN_PART, MIN_PART), "e")]))
@example((40 * MiB, base_segments(40 * MiB, [Range(24 * MiB, 16 * MiB)], 24 * MiB),
          [StagedPart(24 * MiB + i * 8 * MiB, 8 * MiB,
                      part_number_for(24 * MiB + i * 8 * MiB, 24 * MiB), "e")
           for i in range(2)]))
def test_plan_invariants_hold_for_random_writes(
    case: tuple[int, list[tuple[str, Range]], list[StagedPart]],
) -> None:
    size, segments, staged = case
    parts = plan_parts(size, segments, staged, target=16 * MiB)
    check_layout(size, segments, parts, staged)
    # Read-modify-write stays local: besides new bytes, at most ~2 parts' worth of base
    # bytes per dirty extent are uploaded.
    dirty = sum(r.size for k, r in segments if k != "base")
    extents = sum(1 for k, _ in segments if k != "base")
    assert uploaded_bytes(parts) <= dirty + (extents + 1) * 2 * MIN_PART


def test_multipart_etag_is_md5_of_part_md5s() -> None:
    parts = [hashlib.md5(b"a").hexdigest(), hashlib.md5(b"b").hexdigest()]
    digest = hashlib.md5(bytes.fromhex(parts[0]) + bytes.fromhex(parts[1])).hexdigest()
    assert multipart_etag([f'"{p}"' for p in parts]) == f'"{digest}-2"'
    assert multipart_etag(['"not-hex"']) is None


# --- classification (pure) -----------------------------------------------------------------
def client_error(code: str, status: int, op: str = "GetObject") -> bce.ClientError:
    return bce.ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        op,
    )


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (client_error("NoSuchKey", 404), NotFound),
        (client_error("404", 404, "HeadObject"), NotFound),
        (client_error("NoSuchBucket", 404), NotFound),
        (client_error("AccessDenied", 403), AccessDenied),
        (client_error("InvalidAccessKeyId", 403), AccessDenied),
        (client_error("SignatureDoesNotMatch", 403), AccessDenied),
        (client_error("ExpiredToken", 400), AccessDenied),
        (client_error("PreconditionFailed", 412), PreconditionFailed),
        (client_error("SlowDown", 503), Throttled),
        (client_error("TooManyRequests", 429), Throttled),
        (client_error("InternalError", 500), TransientError),
        (client_error("ServiceUnavailable", 503), TransientError),
        (client_error("RequestTimeout", 400), TransientError),
        (client_error("", 408), TransientError),
        (client_error("EntityTooLarge", 400), ObjectTooLarge),
        (client_error("InvalidArgument", 400), BadRequest),
        (bce.EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), TransientError),
        (bce.ConnectTimeoutError(endpoint_url="http://127.0.0.1:1"), TransientError),
        (bce.ReadTimeoutError(endpoint_url="http://127.0.0.1:1"), TransientError),
        (bce.ConnectionClosedError(endpoint_url="http://127.0.0.1:1"), TransientError),
        (bce.NoCredentialsError(), AccessDenied),
        (bce.ParamValidationError(report="bad"), BadRequest),
        (ConnectionResetError(104, "reset"), TransientError),
        (ValueError("a bug"), BadRequest),
    ],
)
def test_classify(exc: BaseException, expected: type) -> None:
    assert type(classify(exc)) is expected


def test_conditional_conflict_is_not_a_plain_retry() -> None:
    # 409 ConditionalRequestConflict means "start the multipart upload over", which only
    # the commit can do; Blocking must not simply repeat the request.
    err = classify(client_error("ConditionalRequestConflict", 409, "CompleteMultipartUpload"))
    assert not isinstance(err, Throttled | TransientError | PreconditionFailed)


# --- source URLs (pure) ---------------------------------------------------------------------
def test_bad_source_urls_are_usage_errors() -> None:
    with pytest.raises(UsageError):
        open_store("s3://ab", StoreConfig())
    with pytest.raises(UsageError):
        open_store("s3://bucket", StoreConfig(endpoint="127.0.0.1:9000"))
