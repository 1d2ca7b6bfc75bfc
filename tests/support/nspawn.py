"""A Debian 12 container booted with systemd-nspawn, for the tests that need systemd as PID 1.

The image comes from `scripts/nspawn-image` (built once, cached under /var/cache/blobfs-test).
Each container runs on an overlay of it, so the image stays pristine; blobfs goes in from a
wheel built from this checkout, with the checkout's scripts/ and systemd/ beside it so the
tests install the units the way a user does (`scripts/install-units`). Machine PID 1 is not
systemd here, so nspawn runs with `--register=no --keep-unit`, and commands enter the
container with nsenter. `SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1` gives the container cgroup v2,
where systemd enforces DevicePolicy=. Everything started here is stopped by PID.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tests.support.service import REPO, ensure_tool
from tests.support.waiting import wait_for

PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
#: Where the checkout's scripts, units and README go inside, with .venv -> /opt/blobfs.
SRC = "/opt/blobfs-src"


def image() -> Path:
    """The cached image directory (building it on first use, via scripts/bootstrap)."""
    ensure_tool("systemd-nspawn", "--nspawn")
    ensure_tool("debootstrap", "--nspawn")
    res = subprocess.run([str(REPO / "scripts" / "nspawn-image")], capture_output=True,
                         text=True, timeout=1800)
    assert res.returncode == 0, f"scripts/nspawn-image failed:\n{res.stderr[-3000:]}"
    return Path(res.stdout.strip().splitlines()[-1])


def build_wheel(out: Path) -> Path:
    """A wheel of this checkout's blobfs (its dependencies are in the image already), built
    offline from a copy of the sources: nothing is written into the checkout."""
    src = out / "src"
    shutil.copytree(REPO / "src", src / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src)
    res = subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-m", "pip", "wheel", "-q",
                          "--no-deps", "--no-index", "--find-links",
                          str(image() / "opt" / "build-wheels"), "-w", str(out), str(src)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"pip wheel failed:\n{res.stderr[-3000:]}"
    [wheel] = out.glob("blobfs-*.whl")
    return wheel


class Container:
    """One booted container. `run` executes a shell command inside, as root."""

    def __init__(self, workdir: Path, wheel: Path, binds: dict[Path, str]) -> None:
        self.workdir = workdir
        self.root = workdir / "root"
        self.console = workdir / "console.log"
        self._binds = binds
        self._proc: subprocess.Popen[bytes] | None = None
        self.leader = 0
        self._mount_overlay()
        self._install(wheel)

    # --- setup ------------------------------------------------------------------------------
    def _mount_overlay(self) -> None:
        for name in ("upper", "work", "root"):
            (self.workdir / name).mkdir(parents=True, exist_ok=True)
        opts = (f"lowerdir={image()},upperdir={self.workdir / 'upper'},"
                f"workdir={self.workdir / 'work'}")
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(self.root)],
                       check=True, timeout=60)

    def _install(self, wheel: Path) -> None:
        shutil.copy(wheel, self.root / "tmp" / wheel.name)
        res = subprocess.run(["chroot", str(self.root), "/opt/blobfs/bin/pip", "install", "-q",
                              "--no-deps", "--no-index", "--force-reinstall",
                              f"/tmp/{wheel.name}"],
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        src = self.root / SRC.lstrip("/")
        (src / "scripts").mkdir(parents=True)
        shutil.copy(REPO / "scripts" / "install-units", src / "scripts")
        shutil.copytree(REPO / "systemd", src / "systemd")
        shutil.copy(REPO / "README.md", src)
        (src / ".venv").symlink_to("/opt/blobfs")
        # A persistent journal: read from the host after poweroff (journalctl -D).
        (self.root / "var" / "log" / "journal").mkdir(parents=True, exist_ok=True)

    def boot(self, timeout: float = 120.0) -> None:
        cmd = ["systemd-nspawn", "-q", "-b", "-D", str(self.root), "--register=no",
               "--keep-unit", f"--machine=bfs{os.getpid()}x{id(self) % 10000}",
               "--console=passive", "--bind=/dev/fuse"]
        cmd += [f"--bind={host}:{inside}" for host, inside in self._binds.items()]
        env = {**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}
        with open(self.console, "ab") as out:
            self._proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=subprocess.STDOUT)
        self.leader = int(wait_for(self._find_leader, 60, "the container's systemd to start"))
        deadline = time.monotonic() + timeout
        while True:
            # "offline" until the manager answers on its socket; then --wait waits for boot.
            res = self.run("systemctl is-system-running --wait", check=False,
                           timeout=timeout)
            state = res.stdout.strip()
            if state not in ("offline", "") or time.monotonic() > deadline \
                    or not self.running:
                break
            time.sleep(0.1)
        assert state in ("running", "degraded"), (
            f"systemd-nspawn cannot boot a container on this host (state {state!r}, "
            f"{res.stderr.strip()!r}):\n" + self.console.read_text(errors="replace")[-3000:])
        if state == "degraded":
            failed = self.run("systemctl --failed --no-legend --plain", check=False).stdout
            raise AssertionError(f"the container booted degraded:\n{failed}")

    def _find_leader(self) -> int | None:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise AssertionError(
                f"systemd-nspawn exited ({self._proc.returncode}) before booting: this host "
                "cannot run the real-systemd tests:\n"
                + self.console.read_text(errors="replace")[-3000:])
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                status = dict(line.split(":\t", 1) for line in
                              (proc / "status").read_text().splitlines() if ":\t" in line)
            except OSError:
                continue
            # nspawn's child becomes PID 1 of the new namespace, then execs systemd.
            if int(status.get("PPid", 0)) == self._proc.pid \
                    and status.get("NSpid", "").split()[-1:] == ["1"] \
                    and status.get("Name") == "systemd":
                return int(proc.name)
        return None

    # --- using it --------------------------------------------------------------------------
    def run(self, command: str, *, check: bool = True, timeout: float = 120.0,
            input: bytes | None = None) -> subprocess.CompletedProcess[str]:
        """`sh -c command` inside the container (all its namespaces), clean environment."""
        res = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-a", "env", "-i", f"PATH={PATH}",
             "LANG=C.UTF-8", "SYSTEMD_PAGER=", "sh", "-c", command],
            capture_output=True, timeout=timeout, input=input)
        out = subprocess.CompletedProcess(res.args, res.returncode,
                                          res.stdout.decode(errors="replace"),
                                          res.stderr.decode(errors="replace"))
        if check and out.returncode:
            raise AssertionError(f"in the container: {command}\nexit {out.returncode}\n"
                                 f"{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
        return out

    def show(self, unit: str, prop: str) -> str:
        return self.run(f"systemctl show -P {prop} {unit}").stdout.strip()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def poweroff(self, timeout: float = 300.0) -> float:
        """`systemctl poweroff` inside; seconds until systemd-nspawn exited."""
        assert self._proc is not None
        start = time.monotonic()
        self.run("systemctl poweroff", check=False)
        self._proc.wait(timeout)
        return time.monotonic() - start

    def journal_dir(self) -> Path:
        """The persistent journal, readable from the host once the container is off."""
        [machine] = (self.workdir / "upper" / "var" / "log" / "journal").iterdir()
        return machine

    def close(self) -> None:
        """Stop the container if it still runs (SIGTERM makes nspawn power it off), then
        remove the overlay."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                # Killing nspawn alone would leave the container running: end its PID 1,
                # which takes every process of the container with it.
                if self.leader:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.leader, signal.SIGKILL)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if os.path.ismount(self.root):
            subprocess.run(["umount", str(self.root)], check=False, timeout=60)
            if os.path.ismount(self.root):
                subprocess.run(["umount", "-l", str(self.root)], check=False, timeout=60)
