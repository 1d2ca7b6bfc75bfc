"""One directory's listing while it is paged through the store: the order its entries
take, which of them a reader may be given yet, and the waiting for the rest.

`Paging` builds a `Listing` (fs/records.py) page by page, merging in this mount's local-only
entries (files created and not committed yet) at their sorted place, and lets directory
streams read the entries already placed while later pages are still coming: a readdir
waits only for the entries it returns. `Namespace` (fs/namespace.py) starts, shares and
stops pagings and turns store pages into items; this module knows nothing of the store,
the inode table or FUSE. Design notes: docs/design/read-path.md "Big directories".
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable

import trio

from blobfs.fs.records import Listing
from blobfs.types import ObjectMeta

log = logging.getLogger(__name__)

#: An entry as a page gives it: its key (a directory's ends in '/') and version (None
#: for a directory or a file only this mount knows of).
Item = tuple[str, ObjectMeta | None]


def _key(item: Item) -> str:
    return item[0]


class Paging:
    """The paging of one directory, readable before it ends.

    Order: by key, a directory's key with its trailing '/', which is the order every store
    pages in (S3 and RGW by UTF-8 bytes with common prefixes in their place, Azure by
    name, file:// and memory by sorting: tests/contract `test_list_pages_in_key_order`).
    Every entry of a later page then sorts after every entry of an earlier one, so entries
    are only ever appended and a readdir offset (an index) names the same entry for the
    whole life of the listing. Two things can still come later for an entry already
    paged, and it is held back until they cannot:
    - a directory of the same name ("x" then "x.log" ... then "x/"): the directory wins,
      so a file is placed only once the pages passed its name + '/';
    - a local-only entry: placed once the pages passed its key.
    A store paging out of that order (found by the check on each append) still gets a
    sorted listing, its late entries inserted in place; readers of that one paging may
    then see an entry twice or miss one, and a warning says so.
    """

    def __init__(self, listing: Listing, local: list[str], changes: int,
                 warn: Callable[[str, str], None]) -> None:
        #: The listing being filled: `len(listing)` entries may be read now.
        self.listing = listing
        #: The directory's change count (`Namespace._drop_listing`) when paging began.
        self.changes = changes
        #: Open streams and waiting lookups using it: at 0 before the end, it is stopped.
        self.users = 0
        #: Whether it ended (all pages in, failed, or stopped), and why it failed.
        self.done = False
        self.error: BaseException | None = None
        #: Whether the finished listing was cached for lookups (`Namespace._run_paging`).
        self.kept = False
        self.scope = trio.CancelScope()
        self.started = trio.current_time()
        self._local = local  # sorted keys of local-only entries, not placed yet
        self._held: list[Item] = []
        self._warn = warn
        self._disordered = False
        self._grew = trio.Event()

    # --- filled by the paging task --------------------------------------------------------
    def add(self, items: list[Item], *, last: bool) -> None:
        """Place a page's entries (and the local-only ones it passed); `last`: no page
        follows. Never blocks."""
        items.sort(key=_key)  # S3 gives files and directories apart
        upto = items[-1][0] if items else None
        local = self._local
        if last:
            taken, self._local = local, []
        elif upto is not None and local:
            n = bisect.bisect_right(local, upto)
            taken, self._local = local[:n], local[n:]
        else:
            taken = []
        merged = self._held + items
        if taken:
            merged += [(k, None) for k in taken]
            merged.sort(key=_key)
        merged = self._dedupe(merged)
        if last:
            cut = len(merged)
        elif upto is None:
            cut = 0  # an empty page: nothing passed yet
        else:
            cut = self._safe(merged, upto)
        self._held = merged[cut:]
        self._place(merged[:cut])
        self._notify()

    def _dedupe(self, merged: list[Item]) -> list[Item]:
        """Drop a local-only entry the store listed too, and a file beside a directory
        of the same name (the directory wins, as for a lookup)."""
        keys = [k for k, _ in merged]
        drop: set[int] = set()
        for i, (key, meta) in enumerate(merged):
            if i and keys[i - 1] == key:
                drop.add(i if meta is None else i - 1)
            if key.endswith("/"):
                j = bisect.bisect_left(keys, key[:-1])
                if j < len(keys) and keys[j] == key[:-1]:
                    self._warn(key[:-1], "a file beside a directory of the same name; "
                                         "the directory wins")
                    drop.add(j)
        if not drop:
            return merged
        return [it for i, it in enumerate(merged) if i not in drop]

    @staticmethod
    def _safe(merged: list[Item], upto: str) -> int:
        """How many of `merged` (sorted, none past `upto`) no later page can shadow: a
        later page starts after `upto`, so only a file whose name + '/' sorts after it
        (a prefix of `upto` followed by a character below '/', or `upto` itself) may yet
        meet its directory; it and all after it wait."""
        keys = [k for k, _ in merged]
        start = upto.rfind("/", 0, len(upto) - 1) + 1  # the name part of `upto`
        for p in range(start + 1, len(upto) + 1):
            if p < len(upto) and upto[p] >= "/":
                continue
            name = upto[:p]
            j = bisect.bisect_left(keys, name)
            if j < len(keys) and keys[j] == name and not name.endswith("/"):
                return j
        return len(merged)

    def _place(self, items: list[Item]) -> None:
        keys, metas = self.listing.keys, self.listing.metas
        for key, meta in items:
            if not keys or key > keys[-1]:
                keys.append(key)
                metas.append(meta)
                continue
            # Out of order: keep the listing sorted for lookups' bisection.
            at = bisect.bisect_left(keys, key)
            if at < len(keys) and keys[at] == key:
                continue
            if not self._disordered:
                self._disordered = True
                log.warning("the store listed %r after %r: readers of this listing may "
                            "see an entry twice or miss one", key, keys[-1])
            keys.insert(at, key)
            metas.insert(at, meta)

    def finish(self, error: BaseException | None) -> None:
        """The paging ended: all pages in (`error` None) or not. Wakes every reader."""
        self.done = True
        self.error = error
        self._held = []
        self._local = []
        self._notify()

    def _notify(self) -> None:
        self._grew.set()
        self._grew = trio.Event()

    # --- read by streams and lookups ------------------------------------------------------
    async def wait_entries(self, n: int) -> None:
        """Wait until the listing holds `n` entries or paging ended.

        Raises:
            The paging's error (a store error), once the entries paged before it are read.
        """
        while len(self.listing) < n and not self.done:
            await self._grew.wait()
        if self.error is not None and len(self.listing) < n:
            raise self.error

    async def wait_first_page(self) -> None:
        """Wait for the first page (or the end). Raises as `wait_entries`."""
        while self.listing.pages == 0 and not self.done:
            await self._grew.wait()
        if self.error is not None and self.listing.pages == 0:
            raise self.error
