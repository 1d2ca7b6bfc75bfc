"""The spool journal's records (blobfs.fs.journal): the wire format blobfs has always
written decodes to the typed records and encodes back to the same bytes, every record type
round-trips, and hostile lines give a one-line reason, never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blobfs.fs.journal import (
    BadRecord,
    Base,
    CommitStart,
    Committed,
    Failed,
    Header,
    JournalCorrupt,
    Record,
    Truncate,
    Upload,
    Write,
    decode,
    encode,
    read_journal,
)

#: A journal as the daemon before typed records (7efacde) wrote it, byte for byte: an
#: append on a base version, a commit that failed with its upload, a retried commit that
#: landed, then more writes and a truncate. Do not regenerate it from `encode`.
TODAYS_JOURNAL = (
    b'{"t":"H","key":"logs/app.log","source":"s3://bucket/pre","base":'
    b'{"etag":"\\"9b2cf535f27731c974343645a3985328\\"","size":6,"stream":"5f0c"}}\n'
    b'{"t":"W","o":6,"n":6}\n'
    b'{"t":"P","id":"0123abcd","s":12}\n'
    b'{"t":"U","token":"2~mpu-id"}\n'
    b'{"t":"F"}\n'
    b'{"t":"W","o":12,"n":1048576}\n'
    b'{"t":"P","id":"4567ef01","s":1048588}\n'
    b'{"t":"C","etag":"\\"e2\\"","size":1048588,"stream":"5f0c"}\n'
    b'{"t":"T","s":100}\n'
    b'{"t":"W","o":100,"n":3}\n'
)
TODAYS_RECORDS: list[Record] = [
    Write(6, 6),
    CommitStart("0123abcd", 12),
    Upload("2~mpu-id"),
    Failed(),
    Write(12, 1 << 20),
    CommitStart("4567ef01", 1048588),
    Committed(Base('"e2"', 1048588, "5f0c")),
    Truncate(100),
    Write(100, 3),
]


def _journal(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / "e.journal"
    path.write_bytes(content)
    return path


def test_a_journal_in_todays_format_decodes_and_encodes_back_byte_for_byte(
        tmp_path: Path) -> None:
    journal = read_journal(_journal(tmp_path, TODAYS_JOURNAL))
    assert journal.header == Header(
        "logs/app.log", "s3://bucket/pre",
        Base('"9b2cf535f27731c974343645a3985328"', 6, "5f0c"))
    assert journal.records == TODAYS_RECORDS
    again = b"".join(encode(r) for r in [journal.header, *journal.records])
    assert again == TODAYS_JOURNAL


def test_fields_older_journals_may_lack_read_as_their_defaults(tmp_path: Path) -> None:
    # No header source, no base stream, no C stream; an unknown extra field is ignored.
    path = _journal(tmp_path, b'{"t":"H","key":"k","base":{"etag":"e","size":3}}\n'
                              b'{"t":"C","etag":"f","size":4,"later":1}\n')
    journal = read_journal(path)
    assert journal.header == Header("k", "", Base("e", 3, None))
    assert journal.records == [Committed(Base("f", 4, None))]


@pytest.mark.parametrize("record", [
    Header("dir/ключ \u2603", "file:///s", None),
    Header("k", "az://c/p", Base("0x8D1", 0, None)),
    Header("k", "", Base('"q"', (1 << 63) - 1, "s")),
    Write(0, 0), Write(1 << 40, 1 << 20),
    Truncate(0), Truncate(7),
    CommitStart("", 0), CommitStart("c" * 32, 9),
    Upload("tok/with:odd chars"),
    Committed(Base("e", 5, None)), Committed(Base("e", 5, "s")),
    Failed(),
], ids=repr)
def test_every_record_type_round_trips(record: Record) -> None:
    line = encode(record)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode(line) == record
    assert json.loads(line)["t"] == "HWTPUCF"[
        [Header, Write, Truncate, CommitStart, Upload, Committed, Failed].index(type(record))]


@pytest.mark.parametrize(("line", "why"), [
    (b'{"t":"W","o":11,"n"', "not JSON"),  # truncated by a crash
    (b'\xff\xfe', "not JSON"),
    (b'[1,2]', "a list, not a record"),
    (b'{"t":"Z","o":1}', "unknown record type 'Z'"),
    (b'{"o":1}', "unknown record type None"),
    (b'{"t":7}', "unknown record type 7"),
    (b'{"t":"W","o":"0","n":5}', "field 'o' of a W record"),
    (b'{"t":"W","o":0}', "field 'n' of a W record"),
    (b'{"t":"W","o":-1,"n":1}', "field 'o' of a W record"),
    (b'{"t":"T","s":true}', "field 's' of a T record"),
    (b'{"t":"T","s":1e3}', "field 's' of a T record"),
    (b'{"t":"P","id":5,"s":1}', "field 'id' of a P record"),
    (b'{"t":"U","token":""}', "field 'token' of a U record"),
    (b'{"t":"C","size":3}', "field 'etag' of a C record"),
    (b'{"t":"C","etag":"e","size":3,"stream":4}', "field 'stream' of a C record"),
    (b'{"t":"H","key":"","base":null}', "field 'key' of a H record"),
    (b'{"t":"H","key":"k","source":1,"base":null}', "field 'source' of a H record"),
    (b'{"t":"H","key":"k","base":{"etag":1,"size":2}}', "field 'base' of a H record"),
    (b'{"t":"H","key":"k","base":[1]}', "field 'base' of a H record"),
])
def test_a_hostile_line_is_refused_with_one_line_saying_why(line: bytes, why: str) -> None:
    with pytest.raises(BadRecord) as err:
        decode(line)
    assert why in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("bad", [b'{"t":"W","o":11,"n"\n', b'{"t":"Q"}\n',
                                 b'{"t":"T","s":"9"}\n'])
def test_a_hostile_line_in_a_journal_is_damage_and_one_at_the_end_a_torn_write(
        tmp_path: Path, bad: bytes) -> None:
    head = TODAYS_JOURNAL.split(b"\n", 2)
    start = head[0] + b"\n" + head[1] + b"\n"
    with pytest.raises(JournalCorrupt) as err:
        read_journal(_journal(tmp_path, start + bad + b'{"t":"W","o":0,"n":1}\n'))
    assert err.value.line == 3 and "\n" not in str(err.value)
    # Last: a write a crash cut off, never acknowledged; what came before stands.
    assert read_journal(_journal(tmp_path, start + bad)).records == [Write(6, 6)]
