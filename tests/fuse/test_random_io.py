"""Random pwrite / truncate / append sequences through a mount match a plain local file,
and still match after a remount (property-based, hypothesis)."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.envs import StoreEnv
from tests.support.mounting import mounted

BLOCK = 64 << 10  # a small block_size makes block boundaries matter with small files
MAX_OFF = 5 * BLOCK

ops = st.lists(
    st.one_of(
        st.tuples(st.just("pwrite"), st.integers(0, MAX_OFF),
                  st.binary(min_size=1, max_size=3 * BLOCK)),
        st.tuples(st.just("append"), st.just(0), st.binary(min_size=1, max_size=BLOCK)),
        st.tuples(st.just("truncate"), st.integers(0, MAX_OFF), st.just(b"")),
        st.tuples(st.just("reopen"), st.just(0), st.just(b"")),
        st.tuples(st.just("fsync"), st.just(0), st.just(b"")),
    ),
    min_size=1,
    max_size=12,
)


def apply(path: Path, steps: list[tuple[str, int, bytes]]) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for op, off, data in steps:
            if op == "pwrite":
                os.pwrite(fd, data, off)
            elif op == "append":
                os.lseek(fd, 0, os.SEEK_END)
                os.write(fd, data)
            elif op == "truncate":
                os.ftruncate(fd, off)
            elif op == "fsync":
                os.fsync(fd)
            else:
                os.close(fd)
                fd = os.open(path, os.O_RDWR)
    finally:
        os.close(fd)


def test_random_io_matches_local_file(file_env: StoreEnv, tmp_path: Path) -> None:
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    names = (f"f{i}" for i in itertools.count())
    written: list[str] = []
    with mounted(file_env, tmp_path, f"block_size={BLOCK}", name="a") as a:

        @settings(max_examples=40, deadline=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture])
        @given(steps=ops)
        def check(steps: list[tuple[str, int, bytes]]) -> None:
            name = next(names)
            apply(ref_dir / name, steps)
            apply(a.path / name, steps)
            written.append(name)
            assert (a.path / name).read_bytes() == (ref_dir / name).read_bytes()

        check()
    assert len(written) >= 20  # hypothesis really ran the examples
    with mounted(file_env, tmp_path, f"block_size={BLOCK}", name="b") as b:
        for name in written:
            assert (b.path / name).read_bytes() == (ref_dir / name).read_bytes(), name
