"""Value types shared by every layer: identifiers, object metadata and versions.

Nothing here knows about FUSE, trio or any SDK.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NewType

Ino = NewType("Ino", int)
Fh = NewType("Fh", int)
ETag = NewType("ETag", str)

# User-metadata names that carry lineage: lower case, with hyphens. Every S3 server keeps
# such a name as sent (moto and S3 lower-case names; Ceph RGW turns '_' into '-', so the
# underscore spelling blobfs used first came back changed and hid the lineage). Azure
# forbids '-' in metadata names: its store writes them with '_' (`identifier_metadata`).
# Every store reads either spelling through `metadata_from_store`.
META_PREFIX = "blobfs-"
META_STREAM = "blobfs-stream"
META_MTIME = "blobfs-mtime"
#: A random id per commit attempt: recovery checks it to see if an interrupted commit landed.
META_COMMIT = "blobfs-commit"
#: How blobfs spelled its names before, and how Azure stores them.
_UNDERSCORE_PREFIX = "blobfs_"


def metadata_from_store(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """User metadata as a store returned it, in blobfs's spelling: lower-case names, and
    blobfs's own names with hyphens whichever way the server or an old version wrote them.
    """
    out: dict[str, str] = {}
    for name, value in (metadata or {}).items():
        name = name.lower()
        if name.startswith(_UNDERSCORE_PREFIX):
            name = META_PREFIX + name[len(_UNDERSCORE_PREFIX):].replace("_", "-")
        out[name] = value
    return out


def identifier_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """blobfs's own names spelled as identifiers ('_' for '-'), for stores that forbid '-'."""
    return {
        (name.replace("-", "_") if name.startswith(META_PREFIX) else name): value
        for name, value in metadata.items()
    }


NO_METADATA: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class ObjectMeta:
    """What a store knows about one version of one key."""

    key: str
    size: int
    etag: ETag
    mtime: float
    #: One shared empty mapping when there is none: a listing holds an ObjectMeta per
    #: entry, and an empty dict each cost 64 bytes of 100,000.
    metadata: Mapping[str, str] = field(default_factory=lambda: NO_METADATA)

    @property
    def version(self) -> ObjectVersion:
        return ObjectVersion(self.key, self.etag)

    @property
    def stream(self) -> str | None:
        """The lineage id: kept by appends, changed by any rewrite (semantics §3)."""
        return self.metadata.get(META_STREAM)


@dataclass(frozen=True)
class ObjectVersion:
    """One immutable version of a key: reads, commits and cache entries are keyed by it."""

    key: str
    etag: ETag


@dataclass(frozen=True)
class ListPage:
    """One page of a delimited listing."""

    objects: list[ObjectMeta]
    prefixes: list[str]
    token: str | None = None


def rooted_stream(base: ObjectMeta) -> str:
    """The lineage id of a stream that begins by appending onto `base`, a version another
    tool wrote (it has no lineage of its own).

    Derived from the base's ETag and size, so the new version records what it grew from:
    a reader pinned to `base` computes the same id and can prove the append (semantics §3).
    """
    digest = hashlib.sha256(f"{base.size}\0{base.etag}".encode()).hexdigest()
    return "r" + digest[:31]


def is_append_of(new: ObjectMeta, old: ObjectMeta) -> bool:
    """Whether `new`'s lineage says it extends `old` without touching its bytes (semantics §3).

    The claim is the lineage stream id that every blobfs commit records: appends keep it,
    rewrites and truncates change it; the first append onto another tool's version takes
    the id `rooted_stream` derives from that version. Metadata is a claim anyone who can
    write the bucket can make: the core checks bytes it served before it follows
    (`Filesystem._proves_append`), and a store may add its own proof (Azure's block list).
    """
    if new.etag == old.etag:
        return True
    if new.size < old.size or new.stream is None:
        return False
    expected = old.stream if old.stream is not None else rooted_stream(old)
    return new.stream == expected


@dataclass(frozen=True, order=True)
class Range:
    """A half-open byte range [off, off + size)."""

    off: int
    size: int

    @property
    def end(self) -> int:
        return self.off + self.size


def normalize_ranges(ranges: Sequence[Range]) -> list[Range]:
    """Sort, drop empties and merge overlapping or touching ranges."""
    out: list[Range] = []
    for r in sorted(r for r in ranges if r.size > 0):
        if out and r.off <= out[-1].end:
            last = out[-1]
            out[-1] = Range(last.off, max(last.end, r.end) - last.off)
        else:
            out.append(r)
    return out
