"""The core tier's one `store` fixture: a fresh, empty memory store for the Filesystem
under test."""

from __future__ import annotations

import uuid

import pytest

from blobfs.store.memory import MemoryStore


@pytest.fixture
def store(request: pytest.FixtureRequest) -> MemoryStore:
    """A MemoryStore with a namespace of its own, of the class a module names in
    `STORE_CLASS` when it must count or gate the core's store calls (a MemoryStore
    subclass)."""
    cls = getattr(request.module, "STORE_CLASS", MemoryStore)
    assert issubclass(cls, MemoryStore), cls
    return cls(f"core-{uuid.uuid4().hex}")
