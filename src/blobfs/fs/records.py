"""The plain records the core hands out and keeps: attributes, directory entries, listings
and directory streams, open handles, the version a handle reads, and the counters.

No behaviour lives here beyond small derived properties; `Filesystem` builds and changes them.
"""

from __future__ import annotations

import bisect
import stat
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from blobfs.fs.inodes import Inode
from blobfs.fs.reader import Window
from blobfs.types import Fh, Ino, ObjectMeta

if TYPE_CHECKING:
    from blobfs.fs.paging import Paging


#: Slots: `ls -l` of a big directory makes an Attr and a DirEntry per entry.
@dataclass(frozen=True, slots=True)
class Attr:
    ino: Ino
    mode: int
    size: int
    mtime: float
    uid: int
    gid: int
    timeout: float
    #: 0 once the file was unlinked while open.
    nlink: int = 1

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


@dataclass(frozen=True, slots=True)
class DirEntry:
    name: str
    attr: Attr


@dataclass
class Handle:
    fh: Fh
    inode: Inode
    gen: int
    writable: bool
    append: bool
    #: Where the last read ended, and the read-ahead window it grew (semantics §3).
    window: Window = field(default_factory=Window)


@dataclass
class Version:
    """What a reader outside FUSE (the HTTP face) is shown of an open file."""

    size: int
    etag: str | None
    mtime: float
    #: Bytes written here and not committed yet are part of `size`.
    pending: bool
    #: Handles open for writing on this file in this process.
    writers: int


@dataclass
class Listing:
    """One directory as the store paged it, plus this mount's uncommitted creates.

    Two parallel lists sorted by key: a lookup is a bisection (17 probes in 100,000
    entries), so it costs about the same in a directory of any size, and an entry costs two
    list slots, not a dict slot (a dict of 100,000 entries holds room for 174,762: 52 bytes
    each). While it is paged (`fs/paging.Paging`) entries are only appended, in key order;
    once complete it is never changed (a refresh makes a new one), so an open directory
    stream keeps reading the one it started with, and an offset names one entry for good.
    """

    #: When paging ended (`Namespace._fresh`); 0 while it is paged.
    at: float
    #: Entry keys, a directory's with its trailing '/', sorted: readdir order (the order
    #: the stores page in), and a readdir offset is an index into it. Keys, not names: a
    #: file's is its ObjectMeta's own string, a directory's the store's prefix string, so
    #: an entry costs no string of its own (60 bytes of 100,000).
    keys: list[str]
    #: The version the listing showed for `keys[i]`; None for directories and uncommitted
    #: files.
    metas: list[ObjectMeta | None]
    #: Store requests the paging took, and lookups it answered: once a stale listing has
    #: answered as many lookups as it cost pages, paging it again is cheaper than a HEAD
    #: (and a one-key LIST) per lookup.
    pages: int
    #: Seconds the paging took (`Filesystem._fresh`).
    took: float = 0.0
    hits: int = 0

    def __len__(self) -> int:
        return len(self.keys)

    def index(self, key: str) -> int | None:
        """Where `key` (a directory's ending in '/') is in `keys`, or None if the
        directory has no such entry."""
        i = bisect.bisect_left(self.keys, key)
        return i if i < len(self.keys) and self.keys[i] == key else None


@dataclass
class DirStream:
    """What `opendir` hands the adapter: the listing an open directory reads from, and
    the paging still filling it (None once the listing was complete at opendir, or once
    the stream was released)."""

    inode: Inode
    listing: Listing
    paging: Paging | None = None


@dataclass
class Stats:
    """What the core counts for `blobfs status` and metrics (`telemetry.snapshot`)."""

    #: Versions this mount committed, recovered spool entries included.
    commits: int = 0
    commit_errors: int = 0
    #: Remote changes observed on files this mount knows (semantics §3).
    appends_followed: int = 0
    replaced: int = 0
    deleted: int = 0
