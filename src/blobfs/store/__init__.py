"""Open a store from its URL: the scheme registry (s3, az, file, memory).

Adapters are imported lazily so a `file://` mount never loads boto3 or the Azure SDK.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from urllib.parse import urlsplit

from blobfs.config import StoreConfig
from blobfs.errors import UsageError
from blobfs.log import redact
from blobfs.store.base import ObjectStore

#: scheme -> (module, factory function). Each factory takes (url, StoreConfig).
SCHEMES = {
    "file": ("blobfs.store.local", "open_local"),
    "memory": ("blobfs.store.memory", "open_memory"),
    "s3": ("blobfs.store.s3", "open_s3"),
    "az": ("blobfs.store.azure", "open_azure"),
}


def split_source(url: str) -> tuple[str, str, str]:
    """'s3://bucket/a/b' -> ('s3', 'bucket', 'a/b/'); the prefix ends in '/' unless empty."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        known = ", ".join(f"{s}://" for s in SCHEMES)
        raise UsageError(f"unknown source '{redact(url)}': use one of {known}")
    if "@" in parts.netloc:
        # A key in the URL would show in /proc/mounts, ps, the journal and fstab: refused,
        # and the message shows the URL without it.
        raise UsageError(f"source '{redact(url)}' holds credentials before '@': give them "
                         "in the environment or as systemd credentials, not in the URL")
    if parts.scheme == "file":
        return "file", "", parts.path
    if not parts.netloc:
        raise UsageError(f"source '{redact(url)}' names no bucket or container: {parts.scheme}://NAME[/PREFIX]")
    prefix = parts.path.strip("/")
    return parts.scheme, parts.netloc, prefix + "/" if prefix else ""


def open_store(url: str, cfg: StoreConfig) -> ObjectStore:
    """Build the store for `url`; no network traffic happens until `check()`."""
    scheme = split_source(url)[0]
    module_name, factory = SCHEMES[scheme]
    module = importlib.import_module(module_name)
    build: Callable[[str, StoreConfig], ObjectStore] = getattr(module, factory)
    return build(url, cfg)
