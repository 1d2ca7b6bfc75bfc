"""`blobfs serve SOURCE --listen HOST:PORT`: the HTTP face on a store, without FUSE.

A composition root like `mount`: builds the store, the spool and the core, finishes what
a crashed run left in the spool, serves HTTP until SIGTERM/SIGINT, then commits what is
pending (semantics §4). Runs in the foreground; under a `Type=notify` service READY=1 goes out
once the socket listens. It must not import pyfuse3 (or `mount`, which does).
"""

from __future__ import annotations

import argparse
import functools
import logging
import signal

import trio

from blobfs import http, systemd
from blobfs.args import parser
from blobfs.budget import tune_malloc
from blobfs.config import MountConfig, options_help, parse_options
from blobfs.errors import UsageError
from blobfs.fs.core import Filesystem
from blobfs.fs.spool import Spool
from blobfs.http.settings import from_options
from blobfs.preflight import check_store
from blobfs.store import split_source
from blobfs.systemd import Notifier

log = logging.getLogger(__name__)


USAGE = "blobfs serve SOURCE --listen HOST:PORT [-o OPT[=VALUE],...] [--debug]"


def parse_serve_args(argv: list[str]) -> tuple[MountConfig, str]:
    """(configuration, listen address). Raises UsageError on bad input, before anything
    starts: a non-loopback address without a read token is refused here."""
    p = parser(
        prog="blobfs serve", usage=USAGE,
        description="Serve a blob container over HTTP, without FUSE: range GETs, live "
        "following (?follow=1), streaming PUT, a live viewer (/view/KEY). Options (-o "
        "name=value, comma separated; the http_* ones matter most here):\n" + options_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source")
    p.add_argument("--listen", required=True, metavar="HOST:PORT",
                   help="address to serve on (non-loopback needs http_read_token_file)")
    p.add_argument("-o", dest="options", action="append", default=[],
                   help="options, comma separated")
    p.add_argument("--debug", action="store_true", help="log every request")
    args = p.parse_args(argv)
    split_source(args.source)
    values = parse_options(args.options)
    if values.get("http"):
        raise UsageError("blobfs serve takes its address from --listen, not -o http=")
    # No mountpoint: the core never uses it; the value only fills the field.
    cfg = MountConfig.build(args.source, "/", values, foreground=True, debug=args.debug)
    from_options(args.listen, cfg, "--listen")  # checks tokens, TLS files, the address
    return cfg, args.listen


async def serve(cfg: MountConfig, listen: str, *, notifier: Notifier | None = None) -> int:
    """Serve until SIGTERM/SIGINT, then commit what is pending; the exit code.

    Raises:
        UsageError: the store or the address is unusable.
    """
    tune_malloc()
    notifier = notifier or Notifier(None)
    store = await check_store(cfg)
    spool = Spool(cfg.cache_dir, cfg.source)
    spool.prepare()
    failed: list[str] = []
    try:
        async with trio.open_nursery() as nursery:
            fs = Filesystem.create(store, cfg, spool=spool, nursery=nursery,
                                   invalidate=lambda ino: None)
            await fs.recover()
            settings = await http.start(cfg, fs, nursery, listen)
            notifier.ready(status=f"serving {store.display} on {settings.url}")
            nursery.start_soon(systemd.run_watchdog, notifier)
            log.info("serving %s on %s", store.display, settings.url)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("got %s: committing pending data and stopping",
                             signal.Signals(signum).name)
                    break
            fs.begin_shutdown()
            notifier.stopping("committing pending data")
            failed = await fs.final_flush(cfg.shutdown_timeout)
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        usage = [e for e in group.exceptions if isinstance(e, UsageError)]
        if len(usage) == 1:
            raise usage[0] from None
        raise
    finally:
        await store.aclose()
        notifier.close()
    if failed:
        log.error("%d file(s) could not be committed and stay in the spool: %s",
                  len(failed), ", ".join(failed))
        return 1
    log.info("stopped cleanly")
    return 0


def cmd_serve(argv: list[str]) -> int:
    from blobfs import log as blog

    cfg, listen = parse_serve_args(argv)
    blog.setup(cfg.debug)
    systemd.import_credentials()
    notifier = Notifier.from_env()
    blog.install_faulthandler()
    return trio.run(functools.partial(serve, cfg, listen, notifier=notifier))
