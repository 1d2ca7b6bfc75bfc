"""Bad input at the command line: one line naming the problem and the fix, non-zero exit."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.support.mounting import blobfs_cmd


def run(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(blobfs_cmd(*args), capture_output=True, text=True, timeout=60,
                          **kw)  # type: ignore[call-overload]


def one_line_error(res: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_help_lists_every_option_with_default() -> None:
    res = run("mount", "--help")
    assert res.returncode == 0
    for name in ["block_size", "commit_interval", "metadata_ttl", "list_ttl", "readahead_max",
                 "cache_size", "cache_dir", "retry_timeout", "shutdown_timeout", "endpoint",
                 "account", "close", "memory_limit", "metrics", "uid", "gid", "file_mode",
                 "dir_mode", "allow_other", "read_only"]:
        assert f"  {name} " in res.stdout, name
    assert "(default: 8M)" in res.stdout


def test_unknown_scheme(dirs: tuple[Path, Path]) -> None:
    res = run("mount", "ftp://x", str(dirs[1]), "-f")
    one_line_error(res, "unknown source", "s3://")
    assert res.returncode == 2


def test_credentials_in_the_url_are_refused_and_never_shown(dirs: tuple[Path, Path]) -> None:
    for cmd in ("mount", "serve"):
        for url in ("s3://AKIAEXAMPLE:topsecret99@bucket/logs", "az://user:topsecret99@c/p"):
            args = ((cmd, url, str(dirs[1]), "-f") if cmd == "mount"
                    else (cmd, url, "--listen", "127.0.0.1:0"))
            res = run(*args)
            one_line_error(res, "holds credentials", "<redacted>@")
            assert res.returncode == 2
            assert "topsecret99" not in res.stderr + res.stdout
            assert not os.path.ismount(dirs[1])
    res = run("mount", "ftp://user:topsecret99@x", str(dirs[1]), "-f")
    one_line_error(res, "unknown source")
    assert "topsecret99" not in res.stderr


def test_unknown_option(dirs: tuple[Path, Path]) -> None:
    res = run("mount", f"file://{dirs[0]}", str(dirs[1]), "-f", "-o", "colour=blue")
    one_line_error(res, "unknown option 'colour'", "--help")
    assert res.returncode == 2


def test_bad_value(dirs: tuple[Path, Path]) -> None:
    res = run("mount", f"file://{dirs[0]}", str(dirs[1]), "-f", "-o", "block_size=lots")
    one_line_error(res, "bad value for option 'block_size'")
    res = run("mount", f"file://{dirs[0]}", str(dirs[1]), "-f", "-o", "close=maybe")
    one_line_error(res, "close must be 'sync' or 'async'")


def test_missing_mountpoint(dirs: tuple[Path, Path]) -> None:
    res = run("mount", f"file://{dirs[0]}", str(dirs[1] / "nope"), "-f")
    one_line_error(res, "does not exist", "mkdir -p")
    assert res.returncode == 2


def test_mountpoint_not_a_directory(dirs: tuple[Path, Path]) -> None:
    f = dirs[1] / "file"
    f.write_text("x")
    res = run("mount", f"file://{dirs[0]}", str(f), "-f")
    one_line_error(res, "is not a directory")


def test_missing_store_directory(dirs: tuple[Path, Path]) -> None:
    res = run("mount", f"file://{dirs[0]}/missing", str(dirs[1]), "-f",
              "-o", f"cache_dir={dirs[0].parent / 'c'}")
    one_line_error(res, "does not exist", "create it first")
    assert res.returncode == 3


def test_no_dev_fuse(dirs: tuple[Path, Path]) -> None:
    # A private mount namespace where /dev is an empty tmpfs: no /dev/fuse there.
    script = ("mount -t tmpfs tmpfs /dev && touch /dev/null && chmod 666 /dev/null && "
              "exec \"$@\"")
    res = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
         *blobfs_cmd("mount", f"file://{dirs[0]}", str(dirs[1]), "-f")],
        capture_output=True, text=True, timeout=60, env=dict(os.environ),
    )
    one_line_error(res, "/dev/fuse is missing")
    assert res.returncode == 4


def test_unknown_command() -> None:
    res = run("frobnicate")
    one_line_error(res, "unknown command")
