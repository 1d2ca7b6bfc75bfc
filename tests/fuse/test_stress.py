"""Concurrency stress on one mount (issue 11): several processes create, rm, rename,
truncate, O_TRUNC-write and append in one directory, on a few shared names, for a bounded
time. Afterwards: no error but ENOENT (a name another process just removed), no ERROR
or traceback in the daemon log (the mount fixture), the mount's listing and contents equal
the store's, the directory can be removed, the spool is empty after unmount and a remount
with the same cache_dir starts cleanly.

A longer run: `BLOBFS_STRESS_SECONDS=120 scripts/test -k namespace_stress`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.support.envs import StoreEnv
from tests.support.mounting import mounted
from tests.support.outside import list_keys, read_blob
from tests.support.waiting import wait_for

PROCESSES = 4
SECONDS = float(os.environ.get("BLOBFS_STRESS_SECONDS", "8"))
NAMES = 5

#: One worker process: random operations on NAMES shared names until the time is up; prints
#: {"op errno": count} as JSON. Only ENOENT is a legitimate failure (a racing rm/rename).
WORKER = r"""
import errno, json, os, random, sys, time
d, seed, seconds, names = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed)
counts = {}
def name():
    return os.path.join(d, "f%d" % rng.randrange(names))
def create(p):
    fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"c%d\n" % seed)
    finally:
        os.close(fd)
def trunc_write(p):
    with open(p, "wb") as f:  # O_TRUNC, like echo x > f
        f.write(b"t%d\n" % seed * rng.randrange(1, 50))
def append(p):
    fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        for _ in range(rng.randrange(1, 4)):
            os.write(fd, b"a%d %s\n" % (seed, b"." * rng.randrange(100)))
    finally:
        os.close(fd)
def rm(p):
    os.unlink(p)
def rename(p):
    os.rename(p, name())
def truncate(p):
    os.truncate(p, rng.randrange(0, 3000))
ops = [create, trunc_write, append, rm, rename, truncate]
end = time.monotonic() + seconds
while time.monotonic() < end:
    op = rng.choice(ops)
    try:
        op(name())
        outcome = "ok"
    except OSError as exc:
        outcome = errno.errorcode.get(exc.errno, str(exc.errno))
    key = "%s %s" % (op.__name__, outcome)
    counts[key] = counts.get(key, 0) + 1
print(json.dumps(counts))
"""


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_one_mount_under_namespace_stress(kind: str, server_for: object, tmp_path: Path) -> None:
    from tests.conftest import make_store_env

    env: StoreEnv = make_store_env(server_for, kind)  # type: ignore[arg-type]
    with mounted(env, tmp_path, "commit_interval=0.2") as m:
        d = m.path / "d"
        d.mkdir()
        procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(d), str(seed),
                                   str(SECONDS), str(NAMES)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for seed in range(PROCESSES)]
        totals: Counter[str] = Counter()
        for p in procs:
            out, err = p.communicate(timeout=SECONDS + 120)
            assert p.returncode == 0, err.decode()
            totals.update(json.loads(out))
        ops = sum(totals.values())
        # An open racing an unlink gets the unlinked file, never ESTALE (semantics §2).
        failures = {k: v for k, v in totals.items() if not k.endswith((" ok", " ENOENT"))}
        print(f"\nstress on {kind}: {ops} ops by {PROCESSES} processes in {SECONDS:g}s on "
              f"{NAMES} names: {dict(sorted(totals.items()))}")
        assert not failures, f"errors other than ENOENT: {failures}"
        assert ops > PROCESSES * 10

        def same_as_store() -> bool:
            mine = sorted(os.listdir(d))
            theirs = sorted(k.removeprefix("d/") for k in list_keys(env, "d/")
                            if k != "d/")
            return mine == theirs and all(
                (d / n).read_bytes() == read_blob(env, f"d/{n}") for n in mine)

        # Within a listing's lifetime (list_ttl) plus the last commits.
        wait_for(same_as_store, 15, "the mount's listing and contents to equal the store's")
        for n in os.listdir(d):
            os.unlink(d / n)
        d.rmdir()
        assert not d.exists()
    assert [k for k in list_keys(env) if k.startswith("d/")] == []
    left = [p.name for p in (m.cache_dir / "spool").rglob("*")
            if p.suffix in (".data", ".journal")]
    assert left == [], "entries left in the spool after a clean unmount"
    with mounted(env, tmp_path, cache_dir=m.cache_dir, name="again") as again:
        assert os.listdir(again.path) == []
        assert "spool recovery" not in again.log()
