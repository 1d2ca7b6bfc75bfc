from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.envs import StoreEnv


@contextmanager
def server(tmp: Path) -> Iterator[Path]:
    yield tmp


def make_env(server: Path, unique: str) -> StoreEnv:
    root = server / unique
    root.mkdir(parents=True)
    return StoreEnv("file", f"file://{root}")
