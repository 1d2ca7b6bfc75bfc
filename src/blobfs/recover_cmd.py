"""`blobfs recover`: show what a spool holds and commit it without mounting (semantics §5).

Useful when a mount cannot be started again (the machine moved, the mountpoint is gone):
it replays every journal under CACHE_DIR/spool, prints one line per pending file, and
unless `--list` is given commits them exactly as a mount's startup recovery would, with
the mount's `-o` options (their defaults and checks included).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import trio

from blobfs.args import parser
from blobfs.config import MountConfig, parse_options
from blobfs.errors import StoreError, UsageError
from blobfs.fs.core import Filesystem
from blobfs.fs.journal import JournalCorrupt, read_journal
from blobfs.fs.recovery import replay
from blobfs.fs.spool import Spool
from blobfs.store import open_store

log = logging.getLogger(__name__)


def _sources(cache_dir: Path, damaged: list[str]) -> dict[str, list[tuple[str, int]]]:
    """source -> [(key, pending bytes)] for every journal in the cache dir; the damaged
    journals' descriptions go to `damaged`."""
    found: dict[str, list[tuple[str, int]]] = {}
    for journal in sorted((cache_dir / "spool").glob("*/*.journal")):
        try:
            state = replay(read_journal(journal))
        except JournalCorrupt as exc:
            damaged.append(str(exc))
            continue
        except (OSError, ValueError) as exc:
            damaged.append(f"unreadable journal {journal}: {exc}")
            continue
        pending = state.epoch.dirty.total + (state.inflight.dirty.total if state.inflight else 0)
        found.setdefault(state.source, []).append((state.key, pending))
    return found


async def _commit_all(sources: list[str], values: dict[str, Any]) -> int:
    failures = 0
    for source in sources:
        # What `blobfs mount SOURCE -o ...` builds: the config, its store config, and a
        # Filesystem whose writers and start-up recovery are the mount's own.
        cfg = MountConfig.build(source, "/", values)
        store = open_store(cfg.source, cfg.store)
        spool = Spool(cfg.cache_dir, cfg.source)
        spool.prepare()
        try:
            async with trio.open_nursery() as nursery:
                fs = Filesystem.create(store, cfg, spool=spool, nursery=nursery,
                                       invalidate=lambda ino: None)
                report = await fs.recover(adopt=False)
            print(f"{source}: {report.summary()}")
            failures += len(report.left_pending)
        except StoreError as exc:
            print(f"{source}: cannot reach the store ({exc}); the spool is unchanged")
            failures += 1
        finally:
            spool.release()
            await store.aclose()
    return failures


def cmd_recover(argv: list[str]) -> int:
    p = parser(prog="blobfs recover", description=__doc__)
    p.add_argument("--cache-dir", type=Path,
                   help="the mount's cache_dir (default: the same default as mount)")
    p.add_argument("--list", action="store_true", help="only show what is pending")
    p.add_argument("--json", action="store_true", help="print the listing as JSON")
    p.add_argument("-o", dest="options", action="append", default=[],
                   help="the mount's options, as for blobfs mount (endpoint=URL, "
                        "account=NAME, block_size=SIZE, ...)")
    args = p.parse_args(argv)
    values = parse_options(args.options)
    if args.cache_dir is not None:
        values["cache_dir"] = str(args.cache_dir)
    # Built, defaulted and checked as for `blobfs mount`; each source is filled in later.
    cfg = MountConfig.build("file:///", "/", values)
    cache_dir = cfg.cache_dir
    if not (cache_dir / "spool").is_dir():
        raise UsageError(f"no spool in {cache_dir}: pass the mount's --cache-dir")
    damaged: list[str] = []
    found = _sources(cache_dir, damaged)
    if args.json:
        listing: dict[str, object] = {
            s: [{"key": k, "pending_bytes": n} for k, n in files] for s, files in found.items()}
        if damaged:
            listing["damaged"] = damaged
        print(json.dumps(listing, indent=2))
    else:
        for line in damaged:
            print(f"DAMAGED: {line} (kept; nothing of it is committed)")
        for source, files in found.items():
            print(f"{source}: {len(files)} file(s), {sum(n for _, n in files)} pending bytes")
            for key, n in files:
                print(f"  {key}  {n} bytes")
        if not found and not damaged:
            print("the spool is empty")
    if args.list or not found:
        return 1 if damaged else 0
    return 1 if trio.run(_commit_all, list(found), values) or damaged else 0
