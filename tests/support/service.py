"""Helpers for the service tests: a fake systemd notify socket, a Prometheus text parser,
system tools installed through the project's scripts, and cleanup of daemonized mounts.

Nothing here imports pyfuse3; processes are found and stopped by PID only.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.waiting import alive, stop_pid, wait_for  # noqa: F401  (re-exported)

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
_unique = itertools.count()


# --- waiting ------------------------------------------------------------------------------
# --- system tools, installed by scripts/bootstrap -------------------------------------------
def ensure_tool(tool: str, bootstrap_flag: str) -> str:
    """The path of `tool`, installing its Debian package via `scripts/bootstrap FLAG` when it
    is missing. Fails (never skips) when it cannot be installed."""
    path = shutil.which(tool)
    if path is None:
        res = subprocess.run([str(REPO / "scripts" / "bootstrap"), bootstrap_flag],
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, f"scripts/bootstrap {bootstrap_flag} failed:\n{res.stderr}"
        path = shutil.which(tool)
    assert path, f"{tool} is still missing after scripts/bootstrap {bootstrap_flag}"
    return path


def ensure_wrapper() -> Path:
    """/usr/local/bin/blobfs via `scripts/install-units --bin-only` (idempotent): mount(8)
    drops PATH, so mount.fuse3 finds blobfs only on the fixed default PATH."""
    res = subprocess.run([str(REPO / "scripts" / "install-units"), "--bin-only"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    wrapper = Path("/usr/local/bin/blobfs")
    assert os.access(wrapper, os.X_OK), res.stderr
    return wrapper


# --- a fake service manager ---------------------------------------------------------------
@dataclass
class Notification:
    at: float
    fields: dict[str, str]
    #: Whether the mountpoint was mounted and answering when the message arrived.
    mounted: bool = False


class NotifyListener:
    """A datagram socket standing in for systemd's $NOTIFY_SOCKET.

    A thread receives each message as it arrives and notes, right then, whether the
    watched mountpoint was already answering: that is what "READY=1 only once the mount
    answers" is checked against.
    """

    def __init__(self, address: str, sock: socket.socket, watch: Path | None) -> None:
        self.address = address
        self.watch = watch
        self._sock = sock
        self._lock = threading.Lock()
        self._received: list[Notification] = []
        self._stop = threading.Event()
        self._sock.settimeout(0.05)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines()
                          if "=" in line)
            mounted = answers(self.watch) if self.watch is not None else False
            with self._lock:
                self._received.append(Notification(time.monotonic(), fields, mounted))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()

    @property
    def received(self) -> list[Notification]:
        with self._lock:
            return list(self._received)

    def wait(self, key: str, value: str | None = None, timeout: float = 15.0,
             match: Callable[[str], bool] | None = None) -> Notification:
        """The first message (already received or new) with `key` (= `value`)."""

        def find() -> Notification | None:
            for note in self.received:
                got = note.fields.get(key)
                if got is None or (value is not None and got != value):
                    continue
                if match is None or match(got):
                    return note
            return None

        note = wait_for(find, timeout, f"a {key}={value or '...'} notification")
        assert isinstance(note, Notification)
        return note

    def count(self, key: str) -> int:
        return sum(1 for note in self.received if key in note.fields)


@contextmanager
def notify_socket(*, abstract: bool, watch: Path | None = None) -> Iterator[NotifyListener]:
    """Listen like systemd does: on `@name` (abstract namespace) or a socket file."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"blobfs-test-{os.getpid()}-{next(_unique)}"
        sock.bind(b"\0" + name.encode())
        address = "@" + name
    else:
        # Not under `tmp`: pytest's paths can outgrow sun_path's 108 bytes.
        path = Path(f"/tmp/bfs-notify-{os.getpid()}-{next(_unique)}.sock")
        path.unlink(missing_ok=True)
        sock.bind(str(path))
        address = str(path)
    listener = NotifyListener(address, sock, watch)
    try:
        yield listener
    finally:
        listener.close()
        if not abstract:
            Path(address).unlink(missing_ok=True)


# --- mounts and daemons -----------------------------------------------------------------------
def is_mount(path: Path) -> bool:
    target = os.path.abspath(path)
    with open("/proc/mounts") as f:
        return any(line.split()[1] == target for line in f)


def answers(path: Path) -> bool:
    """Mounted, and a stat through the mount returns (a filesystem of its own)."""
    if not is_mount(path):
        return False
    try:
        return os.stat(path).st_dev != os.stat(path.parent).st_dev
    except OSError:
        return False


def lazy_unmount(path: Path) -> None:
    if is_mount(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def daemon_pids(mountpoint: Path, runtime_dir: Path) -> set[int]:
    """PIDs of blobfs daemons serving `mountpoint`: from the state files in `runtime_dir`,
    plus any process whose command line names the (test-unique) mountpoint."""
    pids = set()
    for state in runtime_dir.glob("*.json"):
        try:
            record = json.loads(state.read_text())
        except (OSError, ValueError):
            continue
        if record.get("mountpoint") == str(mountpoint):
            pids.add(int(record["pid"]))
    needle = str(mountpoint).encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in argv and any(b"blobfs" in a for a in argv):
            pids.add(int(proc.name))
    return {pid for pid in pids if alive(pid)}


@contextmanager
def daemon_cleanup(mountpoint: Path, runtime_dir: Path) -> Iterator[None]:
    """Whatever the body does, stop every daemon serving `mountpoint` and unmount it."""
    try:
        yield
    finally:
        for pid in daemon_pids(mountpoint, runtime_dir):
            stop_pid(pid)
        lazy_unmount(mountpoint)


@contextmanager
def short_runtime_dir() -> Iterator[Path]:
    """A private BLOBFS_RUNTIME_DIR whose socket paths fit sun_path (pytest's tmp paths can
    be long), so tests never see other mounts on the machine; removed afterwards."""
    path = Path(f"/tmp/bfs-rt-{os.getpid()}-{next(_unique)}")
    path.mkdir(mode=0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --- Prometheus text format ------------------------------------------------------------------
_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
_SAMPLE = re.compile(
    rf"^(?P<name>{_NAME})(?:\{{(?P<labels>(?:{_LABEL})(?:,{_LABEL})*)?,?\}})?"
    r" (?P<value>[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|Inf|NaN))(?: -?\d+)?$"
)
_HELP = re.compile(rf"^# HELP (?P<name>{_NAME}) .*$")
_TYPE = re.compile(rf"^# TYPE (?P<name>{_NAME}) (counter|gauge|histogram|summary|untyped)$")
_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')


def parse_prometheus(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Parse the text exposition format strictly: every line is a HELP, a TYPE (before the
    family's samples, once per family) or a sample; counters end in `_total`.

    Returns:
        metric name -> [(labels, value)].
    Raises:
        AssertionError: on any malformed line.
    """
    assert text.endswith("\n"), "the exposition must end with a newline"
    types: dict[str, str] = {}
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("# HELP"):
            assert _HELP.match(line), f"bad HELP line: {line!r}"
            continue
        if line.startswith("# TYPE"):
            m = _TYPE.match(line)
            assert m, f"bad TYPE line: {line!r}"
            name = m.group("name")
            assert name not in types, f"TYPE given twice for {name}"
            assert name not in samples, f"TYPE after samples of {name}"
            types[name] = m.group(2)
            if types[name] == "counter":
                assert name.endswith("_total"), f"counter {name} must end in _total"
            continue
        assert not line.startswith("#"), f"unknown comment line: {line!r}"
        m = _SAMPLE.match(line)
        assert m, f"bad sample line: {line!r}"
        name = m.group("name")
        assert name in types, f"sample of {name} without a TYPE"
        labels = {k: _unescape_label(v) for k, v in _PAIR.findall(m.group("labels") or "")}
        samples.setdefault(name, []).append((labels, float(m.group("value"))))
    return samples


def _unescape_label(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def metric(samples: dict[str, list[tuple[dict[str, str], float]]], name: str,
           **labels: str) -> float:
    """The one value of `name` whose labels include `labels`."""
    found = [v for lab, v in samples.get(name, []) if all(lab.get(k) == x
                                                          for k, x in labels.items())]
    assert len(found) == 1, f"{name}{labels}: {found}"
    return found[0]
