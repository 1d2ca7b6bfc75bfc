"""The inode table: inode numbers, lookup counts, key <-> path mapping, cached attributes.

A file's key is its parent's key plus its name; a directory's key ends in '/'; the root's
key is ''. Runs on the trio thread only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar, cast

from blobfs.errors import FsError
from blobfs.fs.writer import FileWriter
from blobfs.types import ETag, Ino, ObjectMeta

log = logging.getLogger(__name__)

ROOT_INO = Ino(1)
NAME_MAX = 255


@dataclass(slots=True)
class _Rare:
    """The inode fields most inodes keep at their defaults: those of files opened, written,
    changed remotely or touched here. Made on the first change (`Inode._rare`): a listed
    inode costs 80 bytes, not 152."""

    open_count: int = 0
    #: Bumped when the blob is replaced or deleted remotely; old handles then fail.
    gen: int = 0
    gen_end: dict[int, FsError] | None = None
    gen_size: dict[int, int] | None = None
    #: Replaced or deleted remotely: no longer named by its key, frozen at `meta`.
    retired: bool = False
    writer: FileWriter | None = None
    #: The ETag whose pages the kernel may still cache for this inode.
    kernel_etag: ETag | None = None
    #: Set when this mount changed the file or directory; 0.0 (the version's) until then.
    mtime: float = 0.0
    #: The blob is gone remotely; `meta` still describes what open handles had.
    deleted: bool = False


#: The defaults every inode without its own `_Rare` reads.
_DEFAULTS = _Rare()

T = TypeVar("T")


class _InRare(Generic[T]):
    """An `Inode` attribute kept in its `_Rare` part: read from the shared defaults while
    the inode has none, and set to its default it makes none."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name
        self.default = getattr(_DEFAULTS, name)

    def __get__(self, inode: Inode, owner: type | None = None) -> T:
        return cast(T, getattr(inode._get(), self.name))

    def __set__(self, inode: Inode, value: T) -> None:
        if inode._more is not None or value != self.default:
            setattr(inode._rare(), self.name, value)


@dataclass(slots=True)
class Inode:
    ino: Ino
    #: A directory's ends in '/' (the root's is ''): that is its kind, no field of its
    #: own (six fields make 80 bytes, seven 96).
    key: str
    meta: ObjectMeta | None = None
    #: trio.current_time() when `meta` was last confirmed by the store.
    checked_at: float = float("-inf")
    lookups: int = 0
    #: The rest (`_Rare`), once any of it differs from its default.
    _more: _Rare | None = None

    @property
    def is_dir(self) -> bool:
        return is_dir_key(self.key)

    def _rare(self) -> _Rare:
        if self._more is None:
            self._more = _Rare()
        return self._more

    def _get(self) -> _Rare:
        return self._more if self._more is not None else _DEFAULTS

    # Kept in `_Rare` (documented there); no field of `Inode`, so not dataclass fields.
    open_count = _InRare[int]()
    gen = _InRare[int]()
    retired = _InRare[bool]()
    writer = _InRare["FileWriter | None"]()
    kernel_etag = _InRare["ETag | None"]()
    mtime = _InRare[float]()
    deleted = _InRare[bool]()

    @property
    def gen_end(self) -> dict[int, FsError]:
        """errno each generation ended with (ESTALE for replaced, ENOENT for deleted)."""
        more = self._rare()
        if more.gen_end is None:
            more.gen_end = {}
        return more.gen_end

    @property
    def gen_size(self) -> dict[int, int]:
        """The size of the version each ended generation last read: reads at or past it
        are EOF, not an error (a `tail` at the end must survive a rotation)."""
        more = self._rare()
        if more.gen_size is None:
            more.gen_size = {}
        return more.gen_size

    @property
    def unlinked(self) -> bool:
        """Unlinked here (POSIX unlink of an open file): no name leads to it any more,
        open handles keep its data, which is never committed. Stored as retired and
        deleted, a pair nothing else sets (no field: inodes are many)."""
        return self.retired and self.deleted

    def mark_unlinked(self) -> None:
        self.retired = self.deleted = True

    @property
    def size(self) -> int:
        if self.writer is not None:
            return self.writer.size
        return self.meta.size if self.meta else 0

    @property
    def parent_key(self) -> str:
        stem = self.key.rstrip("/")
        cut = stem.rfind("/")
        return stem[: cut + 1] if cut >= 0 else ""


def is_dir_key(key: str) -> bool:
    return key == "" or key.endswith("/")


def valid_name(name: str) -> bool:
    """Whether a key segment can be shown as a path name (semantics §1)."""
    return (
        name not in ("", ".", "..")
        and "/" not in name
        and "\0" not in name
        and len(name.encode("utf-8", "surrogateescape")) <= NAME_MAX
    )


class InodeTable:
    def __init__(self) -> None:
        self._by_ino: dict[Ino, Inode] = {ROOT_INO: Inode(ROOT_INO, "", lookups=1)}
        self._by_key: dict[str, Ino] = {"": ROOT_INO}
        self._next = 2
        #: Most entries the tables held since they were last copied (`_shrink`).
        self._peak = 1
        self._warned: set[str] = set()
        #: Requests using an inode's writer without a handle (open, create, truncate by
        #: path, rename, unlink), by inode: its writer and spool entry must stay. Here, not
        #: on the inode: it is empty nearly always, and inodes are many.
        self.busy: dict[Ino, int] = {}

    def __iter__(self) -> Iterator[Inode]:
        return iter(list(self._by_ino.values()))

    def get(self, ino: int) -> Inode | None:
        return self._by_ino.get(Ino(ino))

    def by_key(self, key: str) -> Inode | None:
        ino = self._by_key.get(key)
        return self._by_ino[ino] if ino is not None else None

    def ensure(self, key: str, is_dir: bool, meta: ObjectMeta | None = None) -> Inode:
        """The inode for `key`, made if new. A key that changed kind gets a new inode."""
        inode = self.by_key(key)
        if inode is not None and inode.is_dir == is_dir:
            if meta is not None and inode.meta is None:
                inode.meta = meta
            return inode
        if is_dir != is_dir_key(key):
            raise ValueError(f"a {'directory' if is_dir else 'file'} cannot have key {key!r}")
        inode = Inode(Ino(self._next), key, meta=meta)
        self._next += 1
        self._by_ino[inode.ino] = inode
        self._by_key[key] = inode.ino
        self._peak = max(self._peak, len(self._by_ino))
        return inode

    def forget(self, ino: int, n: int) -> None:
        inode = self._by_ino.get(Ino(ino))
        if inode is None or inode.ino == ROOT_INO:
            return
        inode.lookups = max(0, inode.lookups - n)
        self.maybe_drop(inode)

    def maybe_drop(self, inode: Inode) -> None:
        """Free the inode once the kernel and every handle are done with it."""
        if (inode.lookups or inode.open_count or inode.ino in self.busy
                or (inode.writer and inode.writer.pending)):
            return
        if inode.ino == ROOT_INO:
            return
        self._by_ino.pop(inode.ino, None)
        if self._by_key.get(inode.key) == inode.ino:
            del self._by_key[inode.key]
        self._shrink()

    def _shrink(self) -> None:
        """Copy the tables once most of their entries are gone: a dict never gives back
        the room it grew to, so a big directory forgotten would keep costing memory."""
        size = len(self._by_ino)
        if size > self._peak:
            self._peak = size
        elif self._peak > 4096 and size < self._peak // 4:
            self._by_ino = dict(self._by_ino)
            self._by_key = dict(self._by_key)
            self._peak = size

    def unlink_key(self, key: str, inode: Inode | None = None) -> None:
        """Detach `key` from its inode (the inode lives on while referenced); with
        `inode`, only if the key still names that one."""
        if inode is None or self._by_key.get(key) == inode.ino:
            self._by_key.pop(key, None)

    def rekey(self, inode: Inode, key: str) -> None:
        if self._by_key.get(inode.key) == inode.ino:
            del self._by_key[inode.key]
        inode.key = key
        self._by_key[key] = inode.ino

    def warn_once(self, key: str, why: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("skipping key %r: %s", key, why)
