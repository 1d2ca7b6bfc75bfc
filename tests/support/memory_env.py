from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.envs import StoreEnv


@contextmanager
def server(tmp: Path) -> Iterator[None]:
    yield None


def make_env(server: None, unique: str) -> StoreEnv:
    return StoreEnv("memory", f"memory://{unique}", shared=False)
