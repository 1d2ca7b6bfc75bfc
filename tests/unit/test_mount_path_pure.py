"""The mount(8) path without a mount (issue 18): the refusal when umount(8) would not wait
for the final commit, the mount's source name, and `blobfs --help | head`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from blobfs import cli
from blobfs.mount import fsname


@pytest.mark.skipif(os.geteuid() != 0, reason="the refusal is for root's mounts")
def test_mount_8_form_refuses_without_the_umount_helpers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (tmp_path / "mnt").mkdir()
    monkeypatch.setattr(cli, "UMOUNT_HELPER_DIRS", (str(tmp_path / "sbin"),))
    code = cli.main([f"file://{store}", str(tmp_path / "mnt"), "-o", "commit_interval=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "refusing to mount" in err[0] and "umount.fuse.blobfs is missing" in err[0]
    # With only one of the two helpers, still refused: `umount DIR` looks for umount.fuse.
    (tmp_path / "sbin").mkdir()
    helper = tmp_path / "sbin" / "umount.fuse.blobfs"
    helper.write_text("#!/bin/sh\n")
    helper.chmod(0o755)
    code = cli.main([f"file://{store}", str(tmp_path / "mnt"), "-o", "commit_interval=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "umount.fuse is missing" in err[0], err


def test_fsname_is_the_store_url_escaped_for_libfuse() -> None:
    assert fsname("s3://bucket/logs") == "s3://bucket/logs"
    assert fsname("file:///data/a,b") == "file:///data/a\\,b"
    assert "secretsig" not in fsname("az://c/p?sv=2022&sig=secretsig")
    assert fsname("s3://AKIAX:secretkey@bucket/p") == "s3://<redacted>@bucket/p"


def test_help_into_a_closed_pipe_is_quiet() -> None:
    """Item 6: `blobfs --help | head` ends without a BrokenPipeError traceback."""
    res = subprocess.run(f"{sys.executable} -m blobfs --help | head -n 1; "
                         "exit ${PIPESTATUS[0]}",
                         shell=True, executable="/bin/bash", capture_output=True, text=True,
                         timeout=60)
    assert res.stdout.startswith("usage: blobfs")
    assert res.stderr == "", res.stderr
    # Deterministic: the reader is gone before the first write.
    proc = subprocess.Popen([sys.executable, "-m", "blobfs", "--help"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    assert proc.wait(60) == 141
    assert proc.stderr.read() == b""
