"""Issue 12: rotation and replacement like a local disk, through two real mounts.

GNU `tail -F` on mount B follows a log written on mount A through rename-and-recreate,
copytruncate, `cp` over the file and an SDK overwrite; `tail -f` by descriptor on a file
renamed on A stays alive and quiet; and every cell of the rules table in
docs/semantics.md (handle mid-file / at the end x append / replace / truncate / delete /
rename) behaves as written.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time
from pathlib import Path

import trio

from blobfs.store.base import put_bytes
from tests.support.envs import StoreEnv
from tests.support.mounting import mounted
from tests.support.waiting import stop_started, wait_for

KiB = 1 << 10
#: Issue 12 asks for every line within 3 s; the assertion keeps margin for a loaded
#: machine and the test prints the figures.
LINE_LIMIT = 6.0


def sdk_overwrite(env: StoreEnv, key: str, data: bytes) -> None:
    """Replace `key` as another tool would: a plain upload, no blobfs lineage."""

    async def run() -> None:
        store = env.open()
        try:
            await put_bytes(store, key, data, base=await store.head(key), metadata={})
        finally:
            await store.aclose()

    trio.run(run)


def append_lines(path: Path, lines: list[str]) -> None:
    for line in lines:
        with open(path, "a") as f:  # a logger that opens, appends and closes
            f.write(line + "\n")


def let_tail_poll() -> None:
    """Deliberate: one `tail -s 0.5` poll must pass between two rotations, so tail has
    settled on the file the last one left (tail shows nothing of its polls to wait on)."""
    time.sleep(0.6)


def test_tail_F_follows_every_rotation(store_env: StoreEnv, tmp_path: Path) -> None:
    out, err = tmp_path / "tail.out", tmp_path / "tail.err"
    quiet_out = tmp_path / "quiet.out"
    figures: dict[str, float] = {}
    with mounted(store_env, tmp_path, name="a") as a, \
            mounted(store_env, tmp_path, name="b") as b:
        log, other = a.path / "app.log", a.path / "other.log"
        append_lines(log, ["start 0", "start 1"])
        append_lines(other, ["other 0"])
        wait_for(lambda: (b.path / "app.log").exists() and (b.path / "other.log").exists(), 10)
        with open(out, "wb") as so, open(err, "wb") as se, open(quiet_out, "wb") as qo:
            tail = subprocess.Popen(["tail", "-F", "-s", "0.5", str(b.path / "app.log")],
                                    stdout=so, stderr=se)
            quiet = subprocess.Popen(["tail", "-f", "-s", "0.5", str(b.path / "other.log")],
                                     stdout=qo, stderr=subprocess.STDOUT)
            try:
                def printed(lines: list[str]) -> bool:
                    text = out.read_text(errors="replace").splitlines()
                    return all(line in text for line in lines)

                wait_for(lambda: printed(["start 0", "start 1"]), 10, "the first lines")
                wait_for(lambda: "other 0" in quiet_out.read_text(), 10)

                def event(name: str, do: object, lines: list[str], *,
                          by_sdk: bool = False) -> None:
                    assert callable(do)
                    do()
                    t0 = time.monotonic()
                    if not by_sdk:
                        append_lines(log, lines)
                    wait_for(lambda: printed(lines), 30, f"lines after {name}")
                    figures[name] = time.monotonic() - t0
                    assert tail.poll() is None, f"tail -F exited after {name}"

                def rename_rotation() -> None:
                    os.rename(log, a.path / "app.log.1")
                    log.write_text("")

                def copytruncate() -> None:
                    shutil.copyfile(log, a.path / "app.log.2")
                    os.truncate(log, 0)

                def cp_over() -> None:
                    src = tmp_path / "fresh.log"
                    src.write_text("cp 0\n")
                    subprocess.run(["cp", str(src), str(log)], check=True)

                let_tail_poll()
                event("rename", rename_rotation, [f"renamed {i}" for i in range(5)])
                let_tail_poll()
                event("copytruncate", copytruncate, [f"copytrunc {i}" for i in range(5)])
                let_tail_poll()
                event("cp", cp_over, ["cp 0"] + [f"cp after {i}" for i in range(5)])
                let_tail_poll()
                sdk_lines = [f"sdk {i}" for i in range(5)]
                event("sdk", lambda: sdk_overwrite(store_env, "app.log",
                                                   "".join(x + "\n" for x in sdk_lines)
                                                   .encode()),
                      sdk_lines, by_sdk=True)
                # tail -f by descriptor on a file renamed on A: alive and quiet.
                os.rename(other, a.path / "other.log.1")
                append_lines(other, ["new other 0"])
                time.sleep(2.5)  # deliberate: five tail polls in which nothing may happen
                assert quiet.poll() is None, "tail -f exited after a rename"
                assert tail.poll() is None
            finally:
                stop_started(tail)
                stop_started(quiet)
    print(f"\n{store_env.name}: tail -F latency per event (s): "
          + ", ".join(f"{k} {v:.2f}" for k, v in figures.items()))
    errors = err.read_text()
    assert "Stale file handle" not in errors and "error reading" not in errors, errors
    # As on a local disk: tail saw each event as a new file under the name.
    assert errors.count("following new file") >= 4, errors
    assert quiet_out.read_text() == "other 0\n", "tail -f printed after a rename"
    assert max(figures.values()) <= LINE_LIMIT, figures
    assert "\0" not in out.read_text(errors="replace")


CHANGES = ("append", "replace", "truncate", "delete", "rename")
OLD = 300 * KiB
MID = 100 * KiB


def test_every_cell_of_the_rules_table(store_env: StoreEnv, tmp_path: Path) -> None:
    """docs/semantics.md "Reads and versions": 5 changes x (mid-file, at the end)."""
    content = {c: os.urandom(OLD) for c in CHANGES}
    with mounted(store_env, tmp_path, name="a") as a, \
            mounted(store_env, tmp_path, name="b", allow_errors=False) as b:
        for c in CHANGES:
            for pos in ("mid", "end"):
                (a.path / f"{c}-{pos}").write_bytes(content[c])
        names = [f"{c}-{pos}" for c in CHANGES for pos in ("mid", "end")]
        wait_for(lambda: all((b.path / n).exists() and (b.path / n).stat().st_size == OLD
                             for n in names), 15)
        fds: dict[str, int] = {}
        inos: dict[str, int] = {}
        try:
            for n in names:
                fd = fds[n] = os.open(b.path / n, os.O_RDONLY)
                inos[n] = os.fstat(fd).st_ino
                want = MID if n.endswith("mid") else OLD
                got = b""
                while len(got) < want:
                    chunk = os.read(fd, want - len(got))
                    assert chunk
                    got += chunk
                assert got == content[n.split("-")[0]][:want]
                if n.endswith("end"):
                    assert os.read(fd, 4096) == b""
            extra = b"appended line\n" * 100
            for pos in ("mid", "end"):
                with open(a.path / f"append-{pos}", "ab") as f:
                    f.write(extra)
                (a.path / f"replace-{pos}").write_bytes(b"new version\n")
                os.truncate(a.path / f"truncate-{pos}", 1000)
                (a.path / f"delete-{pos}").unlink()
                os.rename(a.path / f"rename-{pos}", a.path / f"renamed-{pos}")

            def errno_of(fd: int, off: int | None = None) -> int | bytes:
                try:
                    return os.read(fd, 4096) if off is None else os.pread(fd, 4096, off)
                except OSError as exc:
                    return exc.errno

            # Append: both handles read on into the new bytes.
            tail = wait_for(lambda: errno_of(fds["append-end"]), 15, "append at the end")
            assert tail == extra[:4096]
            rest = content["append"][MID:] + extra
            got = b""
            while len(got) < len(rest):
                chunk = os.read(fds["append-mid"], 1 << 20)
                assert chunk, "the mid-file handle stopped before the appended bytes"
                got += chunk
            assert got == rest
            assert os.stat(b.path / "append-mid").st_ino == inos["append-mid"]
            # Replace and truncate: mid-file ESTALE (every time), at the end EOF; new inode.
            for c, want_errno in (("replace", errno.ESTALE), ("truncate", errno.ESTALE),
                                  ("delete", errno.ENOENT), ("rename", errno.ENOENT)):
                fd = fds[f"{c}-mid"]
                # Poll without moving the offset: until this mount notices the change, a read
                # still returns the old version's bytes (allowed within metadata_ttl).
                wait_for(lambda fd=fd, e=want_errno: errno_of(fd, MID) == e, 15,
                         f"{c} mid-file")
                assert errno_of(fd) == want_errno
                assert os.lseek(fd, 0, os.SEEK_CUR) == MID
                end = fds[f"{c}-end"]
                for _ in range(3):
                    assert os.read(end, 4096) == b"", f"{c} at the end"
                assert os.fstat(end).st_size == OLD
            for c in ("replace", "truncate"):
                for pos in ("mid", "end"):
                    path = b.path / f"{c}-{pos}"
                    wait_for(lambda path=path, n=f"{c}-{pos}":
                             os.stat(path).st_ino != inos[n], 15, f"{c} new inode")
                want = b"new version\n" if c == "replace" else content[c][:1000]
                assert (b.path / f"{c}-end").read_bytes() == want
                assert os.read(fds[f"{c}-end"], 4096) == b""  # still its own version
            for c in ("delete", "rename"):
                for pos in ("mid", "end"):
                    wait_for(lambda p=b.path / f"{c}-{pos}": not p.exists(), 15)
            assert (b.path / "renamed-end").read_bytes() == content["rename"]
            assert os.stat(b.path / "renamed-end").st_ino != inos["rename-end"]
        finally:
            for fd in fds.values():
                os.close(fd)
