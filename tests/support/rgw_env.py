"""S3 on a real server for tests: Ceph's RADOS Gateway (radosgw) on 127.0.0.1.

`server(tmp)` brings up a throw-away Ceph cluster: one monitor, one OSD on `memstore` (its
objects live in memory, capped at MEMSTORE_BYTES; every pool has one replica) and radosgw's
beast frontend, each in the foreground as a child process, with all state in one temp
directory. An S3 user with the keys of `s3_env.FAKE_AWS_ENV` is made before the gateway
starts, so every boto3 user of the test session reaches RGW exactly like moto. Setup takes
~13 s (most of it creating the gateway's pools), so the cluster is started once per test
session and shared by pytest-xdist's workers: the first worker to need it starts it under
a file lock, every worker registers itself, and the last one to leave stops the daemons
by PID. `make_env(server, unique)` creates a fresh bucket, like `s3_env.make_env`.

Hard-won settings (see issue 16): with `auth_*_required=none` the gateway also needs
`ms_mon_client_mode=crc` or it loops on auth error -13; everything binds to loopback with
msgr2 only; the garbage collector runs every few seconds instead of keeping replaced
objects for two hours, which would fill the small OSD during the append tests;
`radosgw-admin` runs only before the gateway starts and never under its name.

The daemons come from Debian's `ceph-mon ceph-osd radosgw ceph-common` packages, which
`scripts/bootstrap --rgw` installs (scripts/test passes it).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support import s3_env
from tests.support.envs import StoreEnv, free_port
from tests.support.waiting import alive, http_answers, stop_pid

START_TIMEOUT = 90.0
STOP_TIMEOUT = 15.0
#: The OSD's memory cap: room for the largest test blobs and their replaced versions
#: until the garbage collector frees them.
MEMSTORE_BYTES = 4 << 30
BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "ceph", "monmaptool")


@dataclass
class RgwServer:
    """A running gateway (same interface as `s3_env.MotoServer` where tests need it)."""

    url: str
    port: int
    state_dir: Path
    #: The gateway's PID (the bench meters its CPU).
    pid: int = 0

    def log(self) -> str:
        out = []
        for path in sorted((self.state_dir / "log").glob("*")):
            text = path.read_text(errors="replace")
            out.append(f"--- {path.name}\n{text[-4000:]}")
        return "\n".join(out)

    def client(self) -> Any:
        """A plain boto3 client for test setup and inspection (not the store under test)."""
        return s3_env.s3_client(self.url)


def _conf(state: Path, fsid: str, mon_port: int, rgw_port: int) -> str:
    return f"""[global]
fsid = {fsid}
mon_host = v2:127.0.0.1:{mon_port}
public_addr = 127.0.0.1
ms_bind_msgr1 = false
ms_bind_msgr2 = true
ms_bind_ipv6 = false
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
ms_mon_client_mode = crc
keyring = /dev/null
osd_pool_default_size = 1
osd_pool_default_min_size = 1
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
mon_data_avail_warn = 1
mon_data_avail_crit = 0
osd_pool_default_pg_autoscale_mode = off
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_objectstore = memstore
memstore_device_bytes = {MEMSTORE_BYTES}
run_dir = {state}/run
admin_socket = {state}/run/$name.asok
log_file = {state}/log/$name.log
crash_dir = {state}/crash
pid_file =
mon_data = {state}/mon/$id
osd_data = {state}/osd/$id
rgw_frontends = beast endpoint=127.0.0.1:{rgw_port}
rgw_gc_obj_min_wait = 2
rgw_gc_processor_period = 3
rgw_gc_processor_max_time = 3
rgw_enable_usage_log = false
rgw_enable_ops_log = false
"""


class _Cluster:
    """Starts the three daemons in `state`; remembers their PIDs for whoever stops them."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.conf = state / "ceph.conf"
        self.pids: list[int] = []

    def _run(self, *args: str, timeout: float = 60.0) -> str:
        out = subprocess.run([*args, "-c", str(self.conf)], capture_output=True, text=True,
                             timeout=timeout, stdin=subprocess.DEVNULL)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({out.returncode}):\n"
                               f"{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
        return out.stdout

    def _daemon(self, name: str, *args: str) -> int:
        with open(self.state / "log" / f"{name}.out", "ab") as out:
            proc = subprocess.Popen([*args, "-f", "-c", str(self.conf)], stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.pids.append(proc.pid)
        return proc.pid

    def start(self) -> int:
        """Bring everything up; return the gateway's port."""
        missing = [b for b in BINARIES if shutil.which(b) is None]
        if missing:
            raise RuntimeError(f"{', '.join(missing)} missing: run scripts/bootstrap --rgw")
        for sub in ("run", "log", "mon", "osd/0", "crash"):
            (self.state / sub).mkdir(parents=True, exist_ok=True)
        fsid = str(uuid.uuid4())
        mon_port, rgw_port = free_port(), free_port()
        self.conf.write_text(_conf(self.state, fsid, mon_port, rgw_port))
        monmap = str(self.state / "monmap")
        subprocess.run(["monmaptool", "--create", "--fsid", fsid, "--addv", "a",
                        f"[v2:127.0.0.1:{mon_port}]", monmap], check=True,
                       capture_output=True)
        self._run("ceph-mon", "--mkfs", "-i", "a", "--monmap", monmap)
        self._daemon("mon", "ceph-mon", "-i", "a")
        osd_id = self._run("ceph", "osd", "create").strip()
        self._run("ceph-osd", "-i", osd_id, "--mkfs", "--osd-uuid", str(uuid.uuid4()))
        self._daemon("osd", "ceph-osd", "-i", osd_id)
        # Before the gateway runs, and as client.admin: it makes the pools and the user.
        keys = s3_env.FAKE_AWS_ENV
        self._run("radosgw-admin", "-n", "client.admin", "user", "create", "--uid", "blobfs",
                  "--display-name", "blobfs tests", "--access-key", keys["AWS_ACCESS_KEY_ID"],
                  "--secret", keys["AWS_SECRET_ACCESS_KEY"], timeout=START_TIMEOUT)
        pid = self._daemon("rgw", "radosgw", "-n", "client.rgw.blobfs")
        deadline = time.monotonic() + START_TIMEOUT
        while not http_answers(rgw_port):
            if not alive(pid) or time.monotonic() > deadline:
                raise RuntimeError("radosgw did not answer:\n"
                                   + RgwServer("", rgw_port, self.state).log())
            time.sleep(0.05)
        # The first bucket and the first object make the gateway create its index and data
        # pools (~4 s): pay that here, not inside the first test's timing.
        client = s3_env.s3_client(f"http://127.0.0.1:{rgw_port}")
        client.create_bucket(Bucket="blobfs-warm-up")
        client.put_object(Bucket="blobfs-warm-up", Key="k", Body=b"x")
        client.delete_object(Bucket="blobfs-warm-up", Key="k")
        client.delete_bucket(Bucket="blobfs-warm-up")
        return rgw_port

    def stop(self) -> None:
        # The gateway first: it holds the others' sessions.
        for pid in reversed(self.pids):
            stop_pid(pid, STOP_TIMEOUT)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _shared_root(tmp: Path) -> Path:
    """A directory every xdist worker of this run sees: above the workers' basetemps."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # tmp is BASETEMP/popen-gwN/server-rgwM: the run's BASETEMP is two levels up.
        return tmp.parent.parent
    return tmp


@contextmanager
def server(tmp: Path) -> Iterator[RgwServer]:
    """A gateway on 127.0.0.1, shared by this run's workers, until the last one is done.

    Raises:
        RuntimeError: the packages are missing or the cluster did not come up.
    """
    saved = s3_env._apply_fake_env()
    root = _shared_root(tmp)
    lock, info = root / "rgw.lock", root / "rgw.json"
    me = f"{os.getpid()}"
    with _locked(lock):
        state: dict[str, Any] = json.loads(info.read_text()) if info.exists() else {}
        if not state or not all(alive(p) for p in state["pids"]):
            if state:
                for pid in state["pids"]:
                    stop_pid(pid, STOP_TIMEOUT)
            cluster = _Cluster(root / f"rgw-{uuid.uuid4().hex[:8]}")
            try:
                port = cluster.start()
            except BaseException:
                cluster.stop()
                s3_env._restore_env(saved)
                raise
            state = {"port": port, "pids": cluster.pids, "dir": str(cluster.state),
                     "users": []}
        state["users"].append(me)
        info.write_text(json.dumps(state))
    srv = RgwServer(f"http://127.0.0.1:{state['port']}", state["port"], Path(state["dir"]),
                    pid=state["pids"][-1])
    try:
        yield srv
    finally:
        with _locked(lock):
            state = json.loads(info.read_text())
            state["users"].remove(me)
            if state["users"]:
                info.write_text(json.dumps(state))
            else:
                for pid in reversed(state["pids"]):
                    stop_pid(pid, STOP_TIMEOUT)
                info.unlink()
        s3_env._restore_env(saved)


def make_env(server: RgwServer, unique: str) -> StoreEnv:
    """Create a fresh bucket on the gateway; the env mounts its prefix `pfx/`."""
    bucket = s3_env.bucket_name(unique)
    server.client().create_bucket(Bucket=bucket)
    env = s3_env.env_for(server.url, bucket, server.url)
    env.name = "rgw"
    return env

