"""Opening a store at start-up, shared by `blobfs mount` and `blobfs serve`.

It turns the store's first failure into the one-line usage error and exit code a user sees.
It must not import pyfuse3: `serve` runs where there is no FUSE.
"""

from __future__ import annotations

from blobfs.config import MountConfig
from blobfs.errors import AccessDenied, NotFound, StoreError, StoreUnavailable, UsageError
from blobfs.store import open_store
from blobfs.store.base import ObjectStore

#: Exit code when the store is missing, refuses the credentials or cannot be reached.
EXIT_STORE = 3


async def check_store(cfg: MountConfig) -> ObjectStore:
    """Open the configured store and make one request to it.

    Raises:
        UsageError: the container is missing, access is denied, or the endpoint cannot be
            reached; the message names the fix.
    """
    store = open_store(cfg.source, cfg.store)
    try:
        await store.check()
    except NotFound as exc:
        raise UsageError(f"{store.display} does not exist ({exc}): create it first, or fix "
                         "the source URL", EXIT_STORE) from None
    except AccessDenied as exc:
        raise UsageError(f"{store.display}: access denied ({exc}): check the credentials",
                         EXIT_STORE) from None
    except StoreUnavailable as exc:
        raise UsageError(f"{store.display} cannot be reached ({exc}): check the endpoint "
                         "and the network", EXIT_STORE) from None
    except StoreError as exc:
        raise UsageError(f"{store.display}: {exc}", EXIT_STORE) from None
    return store
