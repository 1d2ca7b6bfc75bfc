"""What the parts of `Filesystem` share, declared once so the type checker sees it.

`Filesystem` (fs/core.py) joins `Namespace` (fs/namespace.py), `Renames`
(fs/renames.py), `Commits` (fs/commits.py) and `Reads` (fs/reads.py): its `__init__`
builds the mount's state and each part calls methods the others define. `CoreParts`
names that state and those methods; every part inherits it, so mypy checks each use
against one declaration and checks that `Filesystem` defines every method. It holds no
behaviour and no state of its own.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import trio

    from blobfs.config import MountConfig
    from blobfs.errors import FsError
    from blobfs.fs.inodes import Inode, InodeTable
    from blobfs.fs.paging import Paging
    from blobfs.fs.reader import Reader
    from blobfs.fs.records import Attr, Handle, Listing, Stats
    from blobfs.fs.spool import Spool
    from blobfs.fs.writer import FileWriter
    from blobfs.store.base import ChecksNames, ObjectStore
    from blobfs.types import Fh, Ino, ObjectMeta


class CoreParts(Protocol):
    """The state `Filesystem.__init__` builds and the methods one part calls in another."""

    store: ObjectStore
    _name_rules: ChecksNames | None
    cfg: MountConfig
    spool: Spool
    inodes: InodeTable
    reader: Reader
    stats: Stats
    shutting_down: bool
    on_change: Callable[[Inode, bool], None]
    _spawn: Callable[..., None]
    _invalidate: Callable[[Ino], None]
    _handles: dict[Fh, Handle]
    _listings: dict[str, Listing]
    _freed_entries: int
    _pagings: dict[str, Paging]
    _creates: dict[str, dict[Ino, Inode]]
    _dir_changes: dict[str, int]
    _stage_limiter: trio.CapacityLimiter
    _commit_limiter: trio.CapacityLimiter

    # --- defined in fs/core.py (Filesystem) ------------------------------------------
    def _attr(self, inode: Inode) -> Attr: ...
    def _inode(self, ino: int) -> Inode: ...
    def _handle(self, fh: int) -> Handle: ...
    def _busy(self, inode: Inode) -> contextlib.AbstractContextManager[None]: ...
    def _keys_locked(self, *keys: str) -> contextlib.AbstractAsyncContextManager[None]: ...
    async def _refresh(self, inode: Inode, *, force: bool = False) -> None: ...
    async def _observe(self, inode: Inode, new: ObjectMeta | None) -> Inode: ...
    def _end_generation(self, inode: Inode, end: FsError) -> None: ...
    def _check(self, h: Handle, off: int = 0) -> bool: ...
    def _writable(self) -> None: ...
    def _new_handle(self, inode: Inode, flags: int) -> Handle: ...
    async def release(self, fh: int) -> None: ...

    # --- defined in fs/namespace.py (Namespace) --------------------------------------
    def _child_key(self, parent: Inode, name: str) -> str: ...
    async def _find(self, parent: Inode, name: str) -> Inode: ...
    def _drop_listing(self, dir_key: str) -> None: ...
    def _note_create(self, inode: Inode) -> None: ...

    # --- defined in fs/renames.py (Renames) ------------------------------------------
    async def _remove_name(self, inode: Inode, *, delete: bool) -> None: ...

    # --- defined in fs/commits.py (Commits) ------------------------------------------
    async def _writer(self, inode: Inode, *, key_locked: bool = False) -> FileWriter: ...
    async def _retire_writer(self, inode: Inode) -> None: ...
    def _arm_timer(self, inode: Inode) -> None: ...
    def _committed(self, inode: Inode, w: FileWriter) -> None: ...
    async def flush(self, fh: int) -> None: ...
