"""Value types shared by every layer: identifiers, object metadata and versions.

Nothing here knows about FUSE, trio or any SDK.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NewType

Ino = NewType("Ino", int)
Fh = NewType("Fh", int)
ETag = NewType("ETag", str)

# User-metadata names that carry lineage. Lower case because S3 servers (moto among them)
# lower-case metadata keys, and Azure forbids '-' in metadata names.
META_STREAM = "blobfs_stream"
META_MTIME = "blobfs_mtime"
#: A random id per commit attempt: recovery checks it to see if an interrupted commit landed.
META_COMMIT = "blobfs_commit"


@dataclass(frozen=True, slots=True)
class ObjectMeta:
    """What a store knows about one version of one key."""

    key: str
    size: int
    etag: ETag
    mtime: float
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def version(self) -> ObjectVersion:
        return ObjectVersion(self.key, self.etag)

    @property
    def stream(self) -> str | None:
        """The lineage id: kept by appends, changed by any rewrite (SPEC §3)."""
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


def is_append_of(new: ObjectMeta, old: ObjectMeta) -> bool:
    """Whether `new` provably extends `old` without touching its bytes (SPEC §3).

    The proof is the lineage stream id that every blobfs commit records: appends keep it,
    rewrites and truncates change it. A store may add its own proof (Azure's block list).
    """
    if new.etag == old.etag:
        return True
    return (
        old.stream is not None
        and new.stream == old.stream
        and new.size >= old.size
    )
