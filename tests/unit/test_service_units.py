"""The shipped systemd units and their installer: `systemd-analyze verify` is clean, and
`scripts/install-units` is idempotent.

The tools come from the project's scripts (`scripts/bootstrap --systemd`,
`scripts/install-units --bin-only`); when they cannot be installed the test fails.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.service import REPO, ensure_tool, ensure_wrapper

UNITS = sorted((REPO / "systemd").iterdir())


def _unit_name(path: Path) -> str:
    # `mnt-logs.mount.example` is installed as `mnt-logs.mount`.
    return path.name.removesuffix(".example")


def test_every_unit_is_shipped() -> None:
    names = [_unit_name(p) for p in UNITS]
    assert "blobfs@.service" in names
    assert any(n.endswith(".mount") for n in names)


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_analyze_verify_is_clean(unit: Path, tmp_path: Path) -> None:
    analyze = ensure_tool("systemd-analyze", "--systemd")
    ensure_wrapper()  # ExecStart= must exist for verify
    target = tmp_path / _unit_name(unit)
    shutil.copy(unit, target)
    res = subprocess.run([analyze, "verify", "--man=no", str(target)], capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 0 and not res.stdout.strip() and not res.stderr.strip(), \
        f"{res.stdout}\n{res.stderr}"


def test_service_unit_keeps_its_contract() -> None:
    text = (REPO / "systemd" / "blobfs@.service").read_text()
    lines = {line.strip() for line in text.splitlines() if not line.startswith("#")}
    for expected in ("Type=notify", "NotifyAccess=main", "After=network-online.target",
                     "Wants=network-online.target", "EnvironmentFile=/etc/blobfs/%i.conf",
                     "Restart=on-failure", "DeviceAllow=/dev/fuse rw"):
        assert expected in lines, expected
    exec_start = next(line for line in lines if line.startswith("ExecStart="))
    assert '-f -o ${OPTIONS}' in exec_start and "${SOURCE} ${MOUNTPOINT}" in exec_start
    stop = int(next(line for line in lines if line.startswith("TimeoutStopSec="))
               .split("=")[1])
    assert stop > 300  # the default shutdown_timeout
    assert any(line.startswith("WatchdogSec=") for line in lines)
    # The mount must be visible outside the service: nothing that makes a mount namespace.
    for option in ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices",
                   "ReadWritePaths", "ReadOnlyPaths", "ProtectKernelTunables",
                   "ProtectControlGroups", "TemporaryFileSystem", "PrivateMounts"):
        assert not any(line.startswith(option + "=") for line in lines), option


def test_install_units_is_idempotent(tmp_path: Path) -> None:
    script = REPO / "scripts" / "install-units"
    first = subprocess.run([str(script), "--root", str(tmp_path)], capture_output=True,
                           text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    wrapper = tmp_path / "usr/local/bin/blobfs"
    unit = tmp_path / "etc/systemd/system/blobfs@.service"
    assert wrapper.stat().st_mode & 0o111
    assert f'exec "{REPO}/.venv/bin/blobfs" "$@"' in wrapper.read_text()
    assert unit.read_text() == (REPO / "systemd" / "blobfs@.service").read_text()
    assert (tmp_path / "etc/blobfs").stat().st_mode & 0o777 == 0o700
    for name in ("umount.fuse.blobfs", "umount.fuse"):
        helper = tmp_path / "sbin" / name
        assert helper.stat().st_mode & 0o111
        assert f'exec "{REPO}/.venv/bin/blobfs" umount-helper "$@"' in helper.read_text()
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}

    second = subprocess.run([str(script), "--root", str(tmp_path)], capture_output=True,
                            text=True, timeout=600)
    assert second.returncode == 0, second.stderr
    assert "nothing to do" in second.stderr
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == before

    # A blobfs there that the script did not write is left alone.
    wrapper.write_text("#!/bin/sh\necho someone else's\n")
    third = subprocess.run([str(script), "--root", str(tmp_path), "--bin-only"],
                           capture_output=True, text=True, timeout=600)
    assert third.returncode == 0 and "leaving" in third.stderr
    assert "someone else's" in wrapper.read_text()
