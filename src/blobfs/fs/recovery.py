"""Crash recovery: finish the commits a dead daemon left in the spool (semantics §4).

For each journal in the spool: replay it through the same epoch logic the live write
path uses, find out whether an interrupted commit landed (its id is in the blob's
metadata), then commit what is still pending -- rebasing appends onto a blob that grew
meanwhile. If the remote moved on in a way that cannot be rebased, the pending bytes go
to KEY.blobfs-recovered-UTCSTAMP-ENTRY and the log says so. Nothing is dropped silently.

Recovery never keeps a mount from starting: it is idempotent (a copy's name is chosen once
per spool entry and kept beside it, so a retry after a crash or failure writes the same
copy, not another), and an entry that cannot be applied at all is moved aside to
`spool/.../aside/` and reported once.

Must not know: FUSE, SDKs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from blobfs.errors import FsError, NotFound, PreconditionFailed, StoreError
from blobfs.fs.epoch import Epoch, merge
from blobfs.fs.journal import (
    Base,
    CommitStart,
    Committed,
    Failed,
    Journal,
    JournalCorrupt,
    Truncate,
    Upload,
    Write,
    read_journal,
)
from blobfs.fs.spool import Spool, SpoolEntry
from blobfs.fs.writer import FileWriter
from blobfs.store.base import DropsOrphans, ObjectStore, put_bytes
from blobfs.types import META_COMMIT, ObjectMeta, Range

log = logging.getLogger(__name__)


@dataclass
class Replayed:
    """The pending state a journal describes."""

    key: str
    source: str
    base: Base | None
    size: int
    epoch: Epoch
    inflight: Epoch | None = None
    inflight_id: str | None = None
    inflight_size: int = 0
    #: Server-side leftovers (S3 multipart uploads, local temp versions) of uploads that
    #: had not finished: those journalled since the last commit's outcome.
    uploads: list[str] = field(default_factory=list)


def replay(journal: Journal) -> Replayed:
    """The pending state after the journal's records, applied in order."""
    header = journal.header
    base = header.base
    size = base.size if base else 0
    state = Replayed(header.key, header.source, base, size, Epoch.fresh(size))
    for rec in journal.records:
        match rec:
            case Write(off, n):
                state.size, _ = state.epoch.apply_write(state.size, off, n)
            case Truncate(new_size):
                if state.inflight is not None and new_size < state.size:
                    state.inflight.apply_truncate(state.size, new_size)
                state.epoch.apply_truncate(state.size, new_size)
                state.size = new_size
            case CommitStart(commit_id, commit_size):
                if state.inflight is not None:  # a retried commit: the earlier try failed
                    state.epoch = merge(state.inflight, state.epoch, state.size)
                state.inflight, state.inflight_id = state.epoch, commit_id
                state.inflight_size = commit_size
                state.epoch = Epoch.fresh(state.size)
            case Upload(token):
                state.uploads.append(token)
            case Committed(new_base):
                state.base = new_base
                state.inflight = state.inflight_id = None
                state.uploads.clear()  # completed, or aborted by the commit that failed over
            case Failed():
                if state.inflight is not None:
                    state.epoch = merge(state.inflight, state.epoch, state.size)
                state.inflight = state.inflight_id = None
                state.uploads.clear()  # the failed commit aborted its upload
    return state


@dataclass
class RecoveryReport:
    committed: list[str] = field(default_factory=list)
    recovered_copies: list[str] = field(default_factory=list)
    left_pending: list[str] = field(default_factory=list)
    #: Journals damaged before their last record: kept, nothing of them committed.
    damaged: list[str] = field(default_factory=list)
    #: Entries that could not be applied nor saved, moved to the spool's aside/ directory.
    set_aside: list[str] = field(default_factory=list)
    pending_bytes: int = 0
    seconds: float = 0.0
    writers: list[FileWriter] = field(default_factory=list)

    def summary(self) -> str:
        aside = f", {len(self.set_aside)} set aside" if self.set_aside else ""
        return (f"{len(self.committed)} committed, {len(self.recovered_copies)} saved as "
                f"recovered copies, {len(self.left_pending)} still pending "
                f"({self.pending_bytes} bytes)"
                + (f", {len(self.damaged)} damaged and kept" if self.damaged else "")
                + f"{aside} in {self.seconds:.2f}s")


async def recover_spool(
    store: ObjectStore,
    spool: Spool,
    make_writer: Callable[[str, ObjectMeta | None, SpoolEntry], FileWriter],
) -> RecoveryReport:
    """Commit what earlier runs left in `spool`. Writers that still cannot commit (store
    down) are returned in the report for the caller to keep retrying."""
    report = RecoveryReport()
    start = time.monotonic()
    journals = await trio.to_thread.run_sync(lambda: list(spool.entries()))
    for journal in journals:
        try:
            state = replay(await trio.to_thread.run_sync(read_journal, journal))
        except JournalCorrupt as exc:
            log.error("%s; the entry is kept and none of it is committed: inspect it, then "
                      "delete %s and its .data file", exc, journal)
            report.damaged.append(str(journal))
            continue
        except (OSError, ValueError) as exc:
            log.error("spool journal %s is unreadable (%s); left in place", journal, exc)
            continue
        if state.source and state.source != spool.source:
            continue
        try:
            entry = await trio.to_thread.run_sync(SpoolEntry.reopen, journal, state.key,
                                                  spool.source)
            await _recover_one(store, state, entry, make_writer, report)
        except StoreError as exc:
            # The store is in trouble, not the entry: the next start tries again.
            log.error("could not recover %s from the spool now (%s); it stays there",
                      state.key, exc)
            report.left_pending.append(state.key)
        except Exception as exc:  # a mount must start whatever its spool holds
            where = await trio.to_thread.run_sync(_set_aside, journal)
            log.error("could not recover %s from the spool (%s: %s); its entry was moved "
                      "to %s", state.key, type(exc).__name__, exc, where)
            report.set_aside.append(state.key)
    report.seconds = time.monotonic() - start
    if journals:
        log.info("spool recovery: %s", report.summary())
    return report


async def _recover_one(store: ObjectStore, state: Replayed, entry: SpoolEntry,
                       make_writer: Callable[[str, ObjectMeta | None, SpoolEntry], FileWriter],
                       report: RecoveryReport) -> None:
    key = state.key
    # First, so that a completion still on its way cannot land after the check below.
    await _drop_orphans(store, key, state.uploads)
    if state.inflight is not None:
        # A commit was in flight when the daemon died: did it land?
        try:
            current = await store.head(key)
            landed = current.metadata.get(META_COMMIT) == state.inflight_id
        except NotFound:
            landed = False
        except StoreError as exc:
            log.error("cannot check %s during recovery: %s; left in the spool", key, exc)
            report.left_pending.append(key)
            await entry.close()
            return
        if landed:
            state.base = Base.of(current)
        else:
            state.epoch = merge(state.inflight, state.epoch, state.size)
        state.inflight = None
    base = state.base.meta(key) if state.base is not None else None
    writer = make_writer(key, base, entry)
    writer.restore(state.size, state.epoch)
    if not writer.pending:
        await writer.discard()
        return
    pending = writer.pending_bytes
    try:
        await writer.commit()
    except FsError as exc:
        if not isinstance(exc.__cause__, PreconditionFailed | NotFound):
            log.error("could not commit %s from the spool (%s); it stays pending", key, exc)
            report.left_pending.append(key)
            report.pending_bytes += pending
            report.writers.append(writer)
            return
        copy_key = await _save_copy(store, writer, state)
        report.recovered_copies.append(copy_key)
        await writer.discard()
        await trio.to_thread.run_sync(_copy_name_path(entry).unlink, True)
        return
    log.info("recovered %s: committed %d pending bytes from the spool", key, pending)
    report.committed.append(key)
    await writer.discard()


async def _drop_orphans(store: ObjectStore, key: str, tokens: list[str]) -> None:
    """Abort what the dead run's unfinished uploads left on the server (DropsOrphans)."""
    if not isinstance(store, DropsOrphans):
        return  # this store's leftovers expire on their own
    for token in tokens:
        try:
            await store.drop_orphan(key, token)
        except StoreError as exc:
            log.warning("could not clean up upload %s of %s left by a crashed run (%s); "
                        "a bucket lifecycle rule removes it eventually", token, key, exc)
        else:
            log.info("cleaned up upload %s of %s left by a crashed run", token, key)


def _copy_name_path(entry: SpoolEntry) -> Path:
    # The part of an entry's name a rewrite (rebase, compaction) keeps.
    return entry.root / f"{entry.name.split('.')[0]}.recovered"


def _copy_name_sync(entry: SpoolEntry, key: str) -> str:
    """The recovered copy's key for this entry: chosen once, then read back (blocking).

    Unique per entry (its random token), not just per second: several entries of one key
    recovered in the same second each get their own copy."""
    path = _copy_name_path(entry)
    with contextlib.suppress(FileNotFoundError):
        return path.read_text()
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"
    token = entry.name.split(".")[0].rpartition("-")[2]
    name = f"{key}.blobfs-recovered-{stamp}-{token}"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(name)
    os.replace(tmp, path)
    return name


def _set_aside(journal: Path) -> Path:
    """Move a journal and its data file to the spool's aside/ directory (blocking)."""
    aside = journal.parent / "aside"
    aside.mkdir(mode=0o700, exist_ok=True)
    stem = journal.name.removesuffix(".journal")
    for path in (journal, journal.parent / f"{stem}.data"):
        with contextlib.suppress(FileNotFoundError):
            os.replace(path, aside / path.name)
    return aside


async def _save_copy(store: ObjectStore, writer: FileWriter, state: Replayed) -> str:
    """Write the pending bytes beside the key, since they cannot go into it.

    Idempotent: a retry (after a crash, or a failure further on) writes the same copy; one
    already there from an earlier try is kept."""
    copy_key = await trio.to_thread.run_sync(_copy_name_sync, writer.spool, state.key)
    ep = writer.epoch
    if writer.base is not None and ep.append_only:
        start = writer.base.size  # only what we appended
        what = "the bytes appended"
    else:
        start = 0
        what = "the whole file as this mount had it (bytes it never had read as zeros)"
    data = await writer.spool.read(start, writer.size - start)
    try:
        await put_bytes(store, copy_key, data, base=None, metadata={})
    except PreconditionFailed:
        # Written by an earlier try of this same recovery (the name is this entry's).
        log.info("recovered copy %s is already there", copy_key)
        return copy_key
    log.error("%s changed remotely in a way the pending data cannot be applied to; %s "
              "(%d bytes) were saved to %s", state.key, what, len(data), copy_key)
    return copy_key


__all__ = ["RecoveryReport", "Range", "Replayed", "recover_spool", "replay"]
