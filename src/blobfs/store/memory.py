"""An in-process store for fast tests: a verified fake that passes the contract suite.

It emulates staging and conditional commits exactly like the cloud stores, and shuffles
nothing it does not have to. `memory://NAME` stores of the same name share one namespace
within a process.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import trio

from blobfs.config import StoreConfig
from blobfs.errors import NotFound, PreconditionFailed
from blobfs.store.base import PendingSource, Range, base_segments, lineage_proves_append
from blobfs.types import ETag, ListPage, ObjectMeta

_NAMESPACES: dict[str, dict[str, tuple[bytes, ObjectMeta]]] = {}
_etags = itertools.count(1)


def _new_etag() -> ETag:
    return ETag(f"m{next(_etags):08x}")


class MemoryUpload:
    def __init__(self, store: MemoryStore, key: str, base: ObjectMeta | None,
                 source: PendingSource) -> None:
        self.key = key
        self.base = base
        self._store = store
        self._source = source
        self._staged: dict[int, bytes] = {}

    async def stage(self, off: int, data: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self._staged[off] = bytes(data)
        self._store.staged_bytes += len(data)

    def discard_nowait(self, off: int) -> None:
        self._staged.pop(off, None)

    async def _dirty_bytes(self, r: Range) -> bytes:
        staged = self._staged.get(r.off)
        if staged is not None and len(staged) >= r.size:
            return staged[: r.size]
        out = bytearray()
        pos = r.off
        while pos < r.end:
            staged = self._staged.get(pos)
            if staged is not None and pos + len(staged) <= r.end:
                out += staged
                pos += len(staged)
                continue
            nxt = min([o for o in self._staged if pos < o < r.end] + [r.end])
            out += await self._source.read_pending(pos, nxt - pos)
            pos = nxt
        return bytes(out)

    async def commit(self, size: int, dirty: Sequence[Range],
                     metadata: Mapping[str, str]) -> ObjectMeta:
        ns = self._store.ns
        current = ns.get(self.key)
        base_data = b""
        if self.base is None:
            if current is not None:
                raise PreconditionFailed(f"{self.key} already exists")
        else:
            if current is None or current[1].etag != self.base.etag:
                raise PreconditionFailed(f"{self.key} moved on from {self.base.etag}")
            base_data = current[0]
        parts = []
        for kind, r in base_segments(size, dirty, len(base_data)):
            if kind == "dirty":
                parts.append(await self._dirty_bytes(r))
            elif kind == "base":
                parts.append(base_data[r.off : r.end])
            else:
                parts.append(bytes(r.size))
        data = b"".join(parts)
        # Re-check after the awaits: another task may have committed meanwhile.
        now_current = ns.get(self.key)
        if (now_current is None) != (current is None) or (
            now_current is not None and current is not None
            and now_current[1].etag != current[1].etag
        ):
            raise PreconditionFailed(f"{self.key} moved on during the commit")
        meta = ObjectMeta(self.key, len(data), _new_etag(), time.time(), dict(metadata))
        ns[self.key] = (data, meta)
        self._store.commits += 1
        self._staged.clear()
        return meta

    async def abort(self) -> None:
        self._staged.clear()


@dataclass
class MemoryStore:
    name: str = "default"
    commits: int = 0
    staged_bytes: int = 0

    @property
    def display(self) -> str:
        return f"memory://{self.name}"

    @property
    def ns(self) -> dict[str, tuple[bytes, ObjectMeta]]:
        return _NAMESPACES.setdefault(self.name, {})

    async def check(self) -> None:
        await trio.lowlevel.checkpoint()

    async def head(self, key: str) -> ObjectMeta:
        await trio.lowlevel.checkpoint()
        try:
            return self.ns[key][1]
        except KeyError:
            raise NotFound(key) from None

    async def read(self, key: str, etag: ETag, off: int, size: int) -> bytes:
        await trio.lowlevel.checkpoint()
        entry = self.ns.get(key)
        if entry is None:
            raise NotFound(key)
        if entry[1].etag != etag:
            raise PreconditionFailed(f"{key}: {etag} is not current")
        return entry[0][off : off + size]

    async def list(self, prefix: str, *, delimiter: str = "/", token: str | None = None,
                   limit: int = 1000) -> ListPage:
        await trio.lowlevel.checkpoint()
        items: list[tuple[str, ObjectMeta | None]] = []
        seen: set[str] = set()
        for key in sorted(self.ns):
            if not key.startswith(prefix):
                continue
            rest = key[len(prefix):]
            cut = rest.find(delimiter) if delimiter else -1
            if cut >= 0:
                common = prefix + rest[: cut + 1]
                if common not in seen:
                    seen.add(common)
                    items.append((common, None))
            else:
                items.append((key, self.ns[key][1]))
        items.sort(key=lambda it: it[0])
        if token is not None:
            items = [it for it in items if it[0] > token]
        page, more = items[:limit], len(items) > limit
        return ListPage(
            objects=[m for _, m in page if m is not None],
            prefixes=[k for k, m in page if m is None],
            token=page[-1][0] if more else None,
        )

    async def delete(self, key: str) -> None:
        await trio.lowlevel.checkpoint()
        self.ns.pop(key, None)

    async def copy(self, src: ObjectMeta, dst_key: str,
                   metadata: Mapping[str, str]) -> ObjectMeta:
        await trio.lowlevel.checkpoint()
        entry = self.ns.get(src.key)
        if entry is None:
            raise NotFound(src.key)
        if entry[1].etag != src.etag:
            raise PreconditionFailed(f"{src.key}: {src.etag} is not current")
        meta = ObjectMeta(dst_key, len(entry[0]), _new_etag(), time.time(), dict(metadata))
        self.ns[dst_key] = (entry[0], meta)
        return meta

    def begin_upload(self, key: str, base: ObjectMeta | None, source: PendingSource,
                     metadata: Mapping[str, str] | None = None) -> MemoryUpload:
        return MemoryUpload(self, key, base, source)

    async def proves_append(self, old: ObjectMeta, new: ObjectMeta) -> bool:
        await trio.lowlevel.checkpoint()
        return lineage_proves_append(old, new)

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


def open_memory(url: str, cfg: StoreConfig) -> MemoryStore:
    return MemoryStore(url.removeprefix("memory://").strip("/") or "default")
