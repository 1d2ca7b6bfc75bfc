"""The HTTP face: a second way in to the same core, beside FUSE (docs/design/http.md).

`start` is what a composition root (`mount`, `serve`) calls: it opens the listeners and
runs the face in the root's nursery. Nothing here imports pyfuse3 or a store SDK.
"""

from __future__ import annotations

import logging

import trio

from blobfs.config import MountConfig
from blobfs.errors import UsageError
from blobfs.fs.core import Filesystem
from blobfs.http.face import HttpFace
from blobfs.http.files import Hub
from blobfs.http.settings import HttpSettings, from_options

log = logging.getLogger(__name__)


async def start(cfg: MountConfig, fs: Filesystem, nursery: trio.Nursery,
                listen: str | None = None) -> HttpSettings:
    """Serve `fs` over HTTP on `listen` (default: the `http` option) from `nursery`.

    Raises:
        UsageError: bad settings, or the address cannot be listened on.
    """
    where = listen or cfg.http
    assert where is not None
    settings = from_options(where, cfg, "--listen" if listen else "http")
    try:
        listeners = await trio.open_tcp_listeners(settings.port, host=settings.host or None)
    except OSError as exc:
        raise UsageError(f"cannot serve HTTP on {where}: {exc.strerror or exc}; pick "
                         "another address") from None
    face = HttpFace(fs, settings, Hub(fs, nursery))
    nursery.start_soon(face.run, listeners)
    log.info("serving HTTP on %s (read token: %s, write token: %s)", settings.url,
             "yes" if settings.read_token else "no", "yes" if settings.write_token else "no")
    return settings
