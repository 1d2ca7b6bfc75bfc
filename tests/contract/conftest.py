"""Fixtures of the contract tier shared by more than one module."""

from __future__ import annotations

from pathlib import Path

import pytest

from blobfs.config import StoreConfig
from blobfs.store.local import LocalStore


@pytest.fixture
async def local_store(tmp_path: Path) -> LocalStore:
    root = tmp_path / "store"
    root.mkdir()
    s = LocalStore(root, StoreConfig())
    await s.check()
    return s
