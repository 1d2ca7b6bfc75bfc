"""The spool journal's records, their one wire format, and the reader of a journal file.

A journal (`NAME.journal` beside `NAME.data`, see `blobfs.fs.spool`) is JSON lines, one
record a line, each an object whose "t" names its kind. The spool writes them
(`encode`) and recovery, `blobfs recover`, `blobfs status` and a read-only mount read them
(`read_journal`, `decode`); nothing else knows the wire format. It is the format blobfs
has always written, so a spool left by an older daemon recovers:

    H  {"t":"H","key":K,"source":URL,"base":{"etag":E,"size":N,"stream":S}|null}  Header
    W  {"t":"W","o":OFF,"n":SIZE}           Write: bytes at OFF are in the data file
    T  {"t":"T","s":SIZE}                   Truncate
    P  {"t":"P","id":ID,"s":SIZE}           CommitStart (ID is also the blob's metadata)
    U  {"t":"U","token":TOKEN}              Upload: server-side state to drop if no C/F
    C  {"t":"C","etag":E,"size":N,"stream":S}  Committed: the new base
    F  {"t":"F"}                            Failed: the commit's bytes are pending again

Decoding trusts nothing: a record is accepted only with every field of the right type
(sizes are integers from 0 to 2^63, never booleans); fields it does not know are ignored.
"source" of a header and "stream" of a base or C record may be missing (read as "" and
None). Must not know: FUSE, SDKs, the epoch logic of replay (`blobfs.fs.recovery`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blobfs.types import META_STREAM, ETag, ObjectMeta


@dataclass(frozen=True, slots=True)
class Base:
    """The committed version an entry's pending bytes are on top of."""

    etag: str
    size: int
    stream: str | None = None

    @classmethod
    def of(cls, meta: ObjectMeta) -> Base:
        return cls(meta.etag, meta.size, meta.stream)

    def meta(self, key: str) -> ObjectMeta:
        """The version as the store would describe it (mtime unknown: 0)."""
        return ObjectMeta(key, self.size, ETag(self.etag), 0.0,
                          {META_STREAM: self.stream} if self.stream else {})


def base_record(meta: ObjectMeta | None) -> Base | None:
    """How a spool journal names a base version."""
    return None if meta is None else Base.of(meta)


@dataclass(frozen=True, slots=True)
class Header:
    """The first record, and only the first: whose pending bytes these are."""

    key: str
    source: str
    base: Base | None


@dataclass(frozen=True, slots=True)
class Write:
    """`size` bytes at `off` are in the data file (acknowledged to the writer)."""

    off: int
    size: int


@dataclass(frozen=True, slots=True)
class Truncate:
    """The file was cut (or extended with zeros) to `size` bytes."""

    size: int


@dataclass(frozen=True, slots=True)
class CommitStart:
    """A commit of the first `size` bytes began; `commit_id` goes into its metadata."""

    commit_id: str
    size: int


@dataclass(frozen=True, slots=True)
class Upload:
    """Server-side state of an upload (S3 multipart id, local temp version) made before
    its commit: recovery drops it unless a C or F record follows."""

    token: str


@dataclass(frozen=True, slots=True)
class Committed:
    """The commit in flight landed as `base`: what it sent is no longer pending."""

    base: Base


@dataclass(frozen=True, slots=True)
class Failed:
    """The commit in flight failed: its bytes are pending again."""


Record = Header | Write | Truncate | CommitStart | Upload | Committed | Failed


class BadRecord(ValueError):
    """A line that is not a valid record; the message says why, in one line."""


def _json(fields: dict[str, Any]) -> bytes:
    return (json.dumps(fields, separators=(",", ":")) + "\n").encode()


def _base_fields(base: Base) -> dict[str, Any]:
    return {"etag": base.etag, "size": base.size, "stream": base.stream}


def encode_write(off: int, size: int) -> bytes:
    """`encode(Write(off, size))` without the JSON encoder (one per FUSE write)."""
    return b'{"t":"W","o":%d,"n":%d}\n' % (off, size)


def encode(record: Record) -> bytes:
    """One journal line (with its newline) for `record`."""
    match record:
        case Write(off, size):
            return encode_write(off, size)
        case Header(key, source, base):
            return _json({"t": "H", "key": key, "source": source,
                          "base": None if base is None else _base_fields(base)})
        case Truncate(size):
            return _json({"t": "T", "s": size})
        case CommitStart(commit_id, size):
            return _json({"t": "P", "id": commit_id, "s": size})
        case Upload(token):
            return _json({"t": "U", "token": token})
        case Committed(base):
            return _json({"t": "C", **_base_fields(base)})
        case Failed():
            return _json({"t": "F"})
    raise TypeError(f"not a journal record: {record!r}")


# --- decoding ---------------------------------------------------------------------------------
def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 63


def _is_text(value: Any) -> bool:
    return isinstance(value, str)


def _is_name(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def _is_opt_text(value: Any) -> bool:
    return value is None or isinstance(value, str)


def _field(fields: dict[str, Any], kind: str, name: str, valid: Callable[[Any], bool],
           default: Any = None) -> Any:
    value = fields.get(name, default)
    if not valid(value):
        raise BadRecord(f"field {name!r} of a {kind} record is missing or invalid")
    return value


def _base(fields: dict[str, Any], kind: str) -> Base:
    return Base(_field(fields, kind, "etag", _is_text), _field(fields, kind, "size", _is_count),
                _field(fields, kind, "stream", _is_opt_text))


def _header(fields: dict[str, Any]) -> Header:
    base = fields.get("base")
    if base is not None:
        if not isinstance(base, dict):
            raise BadRecord("field 'base' of a H record is missing or invalid")
        try:
            base = _base(base, "H")
        except BadRecord:
            raise BadRecord("field 'base' of a H record is missing or invalid") from None
    return Header(_field(fields, "H", "key", _is_name),
                  _field(fields, "H", "source", _is_text, ""), base)


_DECODERS: dict[str, Callable[[dict[str, Any]], Record]] = {
    "H": _header,
    "W": lambda f: Write(_field(f, "W", "o", _is_count), _field(f, "W", "n", _is_count)),
    "T": lambda f: Truncate(_field(f, "T", "s", _is_count)),
    "P": lambda f: CommitStart(_field(f, "P", "id", _is_text), _field(f, "P", "s", _is_count)),
    "U": lambda f: Upload(_field(f, "U", "token", _is_name)),
    "C": lambda f: Committed(_base(f, "C")),
    "F": lambda f: Failed(),
}


def decode(line: bytes) -> Record:
    """The record one journal line holds (without or with its newline).

    Raises:
        BadRecord: not JSON, not an object, an unknown kind, or a field missing or of
            the wrong type.
    """
    try:
        fields = json.loads(line)
    except ValueError as exc:  # UnicodeDecodeError included
        raise BadRecord(f"not JSON ({exc})") from None
    if not isinstance(fields, dict):
        raise BadRecord(f"a {type(fields).__name__}, not a record")
    kind = fields.get("t")
    parse = _DECODERS.get(kind) if isinstance(kind, str) else None
    if parse is None:
        raise BadRecord(f"unknown record type {kind!r}")
    return parse(fields)


# --- a journal file ---------------------------------------------------------------------------
class JournalCorrupt(ValueError):
    """A journal record that is not the last one is unreadable or invalid: the entry is
    damaged. Nothing from the damage on may be trusted, so nothing of it is committed."""

    def __init__(self, path: Path, line: int, why: str) -> None:
        super().__init__(f"spool journal {path} is damaged at line {line}: {why}")
        self.path = path
        self.line = line


@dataclass(frozen=True, slots=True)
class Journal:
    """The validated records of one journal file."""

    header: Header
    #: The records after the header, in order.
    records: list[Record]


def _check(line: bytes, first: bool) -> Record:
    record = decode(line)
    if first != isinstance(record, Header):
        raise BadRecord("the first record must be the header, and only the first")
    return record


def read_journal(path: Path) -> Journal:
    """Validated records of a journal (blocking).

    A torn or invalid *last* line is what a crash mid-append leaves: it was never
    acknowledged, so it is ignored. An invalid line followed by others is damage.

    Raises:
        JournalCorrupt: an invalid record before the last one, no valid header, or a
            journal another user owns.
        OSError: the journal cannot be read.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    owner = os.fstat(fd).st_uid
    if owner != os.geteuid():
        os.close(fd)
        # Someone else's journal would commit their bytes with our credentials.
        raise JournalCorrupt(path, 1, f"owned by uid {owner}, not by this user")
    with open(fd, "rb") as f:
        lines = f.read().split(b"\n")
    # The piece after the last newline is a torn line (or b"" after a complete one).
    complete, torn = lines[:-1], lines[-1]
    records: list[Record] = []
    bad: tuple[int, str] | None = None
    for number, raw in enumerate(complete, 1):
        record: Record | None = None
        why = ""
        try:
            record = _check(raw, first=not records and bad is None)
        except BadRecord as exc:
            why = str(exc)
        if bad is not None:
            raise JournalCorrupt(path, bad[0], bad[1])
        if record is None:
            bad = (number, why)
            continue
        records.append(record)
    if bad is not None and (bad[0] == 1 or torn):
        raise JournalCorrupt(path, bad[0], bad[1])
    if not records:
        raise JournalCorrupt(path, 1, "no header")
    header = records[0]
    assert isinstance(header, Header)  # `_check` let only a header be first
    return Journal(header, records[1:])
