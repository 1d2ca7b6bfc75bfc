"""Random pwrite / truncate / append sequences through a mount match a plain local file,
and still match after a remount (property-based, hypothesis); and the differential
random-operation run of issue 11: thousands of seeded operations on the mount and on a
local model file, with commits landing all the time and a second mount reading."""

from __future__ import annotations

import itertools
import mmap
import os
import random
import time
from collections import deque
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.support.envs import StoreEnv
from tests.support.mounting import mounted
from tests.support.waiting import wait_for

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
        # An edge pinned so every run has it (no failure of this test has been recorded):
        # a write across a block boundary, truncate to the boundary, reopen, append.
        @example(steps=[("pwrite", BLOCK - 1, b"ab"), ("truncate", BLOCK, b""),
                        ("reopen", 0, b""), ("append", 0, b"z")])
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


# --- the differential random-operation run (issue 11) ------------------------------------
#: Operations per store in the suite; `scripts/test --long-io` runs LONG_OPS on file://.
SUITE_OPS = {"file": 20_000, "s3": 3_000, "rgw": 3_000, "az": 3_000}
LONG_OPS = 100_000
MAX_SIZE = 768 << 10
#: How often (in operations) the second mount must catch up with the model.
CHECK_EVERY = {"file": 2_000, "s3": 500, "rgw": 500, "az": 500}

#: Weights: small writes and reads dominate, as they are the cheap operations (each costs
#: a FUSE round trip); truncate, fsync and close-reopen commit or reshape the file.
OPS = [("pwrite", 15), ("read", 20), ("direct_read", 15), ("append", 12), ("truncate", 4),
       ("fsync", 1), ("reopen", 1), ("small_pwrite", 32)]


class Driver:
    """Applies one seeded operation stream to the mount and to a local model file."""

    def __init__(self, mnt: Path, model: Path, rng: random.Random) -> None:
        self.rng = rng
        self.mnt, self.model = mnt, model
        self.m_rw = os.open(model, os.O_RDWR | os.O_CREAT, 0o644)
        self.m_app = os.open(model, os.O_WRONLY | os.O_APPEND)
        self.f_rw = os.open(mnt, os.O_RDWR | os.O_CREAT, 0o644)
        self.f_app = os.open(mnt, os.O_WRONLY | os.O_APPEND)
        self.f_direct = os.open(mnt, os.O_RDONLY | os.O_DIRECT)
        self.buf = mmap.mmap(-1, MAX_SIZE + (1 << 20))  # page aligned, for O_DIRECT
        self.history: deque[str] = deque(maxlen=12)
        self.reads = 0

    def close(self) -> None:
        for fd in (self.m_rw, self.m_app, self.f_rw, self.f_app, self.f_direct):
            os.close(fd)

    def size(self) -> int:
        return os.fstat(self.m_rw).st_size

    def step(self, op: str) -> None:
        rng, size = self.rng, self.size()
        if op in ("pwrite", "small_pwrite"):
            n = rng.randint(1, 64 << 10) if op == "pwrite" else rng.randint(1, 4096)
            off = rng.randint(0, max(0, min(size + 4096, MAX_SIZE - n)))
            data = rng.randbytes(n)
            self.history.append(f"pwrite {off}+{n}")
            os.pwrite(self.m_rw, data, off)
            assert os.pwrite(self.f_rw, data, off) == n
        elif op == "append":
            if size > MAX_SIZE - (16 << 10):
                return self.step("truncate")
            data = rng.randbytes(rng.randint(1, 16 << 10))
            self.history.append(f"append {len(data)}")
            os.write(self.m_app, data)
            assert os.write(self.f_app, data) == len(data)
        elif op == "truncate":
            new = rng.randint(0, min(MAX_SIZE, size + (64 << 10)))
            self.history.append(f"truncate {new}")
            os.ftruncate(self.m_rw, new)
            os.ftruncate(self.f_rw, new)
        elif op == "fsync":
            self.history.append("fsync")
            os.fsync(self.f_rw)
        elif op == "reopen":
            self.history.append("reopen")
            os.close(self.f_rw)
            self.f_rw = os.open(self.mnt, os.O_RDWR)
        else:
            off = rng.randint(0, size)
            n = rng.randint(1, 64 << 10) if rng.random() < 0.8 else size + 10
            want = os.pread(self.m_rw, n, off)
            if op == "read":
                got = os.pread(self.f_rw, n, off)
            else:
                got = bytes(self.buf[: os.preadv(self.f_direct, [memoryview(self.buf)[:n]],
                                                 off)])
            self.reads += 1
            self.history.append(f"{op} {off}+{n}")
            if got != want:
                raise AssertionError(f"{op} {off}+{n}: {describe(got, want)}")


def describe(got: bytes, want: bytes) -> str:
    for i, (g, w) in enumerate(zip(got, want, strict=False)):
        if g != w:
            return f"first bad byte at +{i}: got {g} want {w}"
    return f"got {len(got)} bytes, want {len(want)}"


def read_whole(path: Path, direct: bool) -> bytes:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        buf = mmap.mmap(-1, MAX_SIZE + (1 << 20))
        return bytes(buf[: os.preadv(fd, [buf], 0)])
    finally:
        os.close(fd)


def run_differential(env: StoreEnv, tmp_path: Path, n_ops: int, check_every: int) -> None:
    seed = int(os.environ.get("BLOBFS_SEED", random.randrange(1 << 31)))
    rng = random.Random(seed)
    interval = round(rng.uniform(0.1, 0.2), 3)
    names, weights = zip(*OPS, strict=True)
    model = tmp_path / "model.bin"
    counts = {name: 0 for name in names}
    b_reads = 0
    t0 = time.monotonic()
    with mounted(env, tmp_path, f"commit_interval={interval}", name="a") as a, \
            mounted(env, tmp_path, name="b") as b:
        driver = Driver(a.path / "f.bin", model, rng)
        committed = b""
        i = 0
        try:
            for i in range(n_ops):
                op = rng.choices(names, weights)[0]
                counts[op] += 1
                driver.step(op)
                if (i + 1) % check_every == 0:
                    # The second mount: every read is a version the model had at a
                    # checkpoint, and it catches up with this one.
                    os.fsync(driver.f_rw)
                    want = model.read_bytes()

                    def caught_up(want: bytes = want, committed: bytes = committed) -> bool:
                        nonlocal b_reads
                        got = read_whole(b.path / "f.bin", direct=b_reads % 2 == 0)
                        b_reads += 1
                        if got == want:
                            return True
                        assert got == committed, \
                            f"mount b read bytes of no version: {describe(got, want)}"
                        return False

                    wait_for(caught_up, 15, "mount b catching up", interval=0.1)
                    committed = want
            driver.close()
        except BaseException as exc:
            raise AssertionError(
                f"differential run failed at op {i} (seed {seed}, commit_interval "
                f"{interval}; rerun with BLOBFS_SEED={seed}): {exc}; last ops: "
                f"{list(driver.history)}") from exc
        assert (a.path / "f.bin").read_bytes() == model.read_bytes()
    print(f"\n{env.name}: {n_ops} ops in {time.monotonic() - t0:.1f}s, seed {seed}, "
          f"commit_interval {interval}, {driver.reads} reads compared on a, {b_reads} on b, "
          f"0 mismatches; {counts}")


@pytest.mark.timeout(1800)  # --long-io: 100,000 operations take minutes on a busy machine
def test_differential_random_ops(store_env: StoreEnv, tmp_path: Path,
                                 request: pytest.FixtureRequest) -> None:
    n = SUITE_OPS[store_env.name]
    if store_env.name == "file" and request.config.getoption("--long-io"):
        n = LONG_OPS
    run_differential(store_env, tmp_path, n, CHECK_EVERY[store_env.name])
