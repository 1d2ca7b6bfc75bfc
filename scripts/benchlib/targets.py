"""The filesystems under test: blobfs, and with --peers s3fs and rclone (two VFS modes).

`Target.mount(backend, mnt, work, endpoint=...)` starts the filesystem in the foreground
as our own child process, waits until the mountpoint answers a stat and returns a
`Mounted` that knows its daemon PID (for RSS) and how long it took to answer. `stop()`
always unmounts. `unsupported(backend)` names why a target cannot mount a store at all.
"""

from __future__ import annotations

import http.client
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

from benchlib.common import (
    VENV_BIN,
    BenchError,
    is_mounted,
    lazy_unmount,
    stop_process,
    wait_answering,
)
from benchlib.stores import PREFIX, AzBackend, Backend, S3Backend

MOUNT_TIMEOUT = 60.0


@dataclass
class Mounted:
    target: Target
    path: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    #: Seconds from exec of the mount command to the mountpoint answering a stat.
    ready_s: float
    #: Run after the daemon stopped (a helper proxy the target needed).
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> int:
        try:
            return self.target.stop(self)
        finally:
            while self.cleanups:
                self.cleanups.pop()()

    def last_error(self) -> str | None:
        """The daemon's last error line, to explain a failed workload."""
        for line in reversed(self.log_tail(200).splitlines()):
            if "ERROR" in line or "[ERR]" in line or "Traceback" in line:
                return line.strip()[-300:]
        return None

    def __enter__(self) -> Mounted:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Target:
    name = ""
    #: What the results say about the configuration used.
    description = ""

    def unsupported(self, backend: Backend) -> str | None:
        return None

    def command(self, backend: Backend, mnt: Path, work: Path,
                endpoint: str | None) -> tuple[list[str], dict[str, str | None]]:
        raise NotImplementedError

    def mount(self, backend: Backend, mnt: Path, work: Path, *,
              endpoint: str | None = None, label: str = "mnt") -> Mounted:
        """Mount `backend` at `mnt` (created), talking to `endpoint` when given (a proxy)."""
        reason = self.unsupported(backend)
        if reason:
            raise BenchError(reason)
        if is_mounted(mnt):
            lazy_unmount(mnt)
        mnt.mkdir(parents=True, exist_ok=True)
        cmd, env = self.command(backend, mnt, work / f"{self.name}-{label}-state", endpoint)
        log_path = work / f"{self.name}-{label}.log"
        with open(log_path, "ab") as logf:
            t0 = time.monotonic()
            full_env = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
            proc = subprocess.Popen(cmd, env=full_env, stdout=logf,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            ready = wait_answering(mnt, proc, t0, MOUNT_TIMEOUT, log_path)
        except BaseException:
            stop_process(proc, timeout=10)
            lazy_unmount(mnt)
            raise
        return Mounted(self, mnt, proc, log_path, ready)

    def stop(self, m: Mounted) -> int:
        """Unmount cleanly (committing what is pending) and wait for the daemon."""
        if m.proc.poll() is None and is_mounted(m.path):
            subprocess.run(["fusermount3", "-u", str(m.path)], check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
        rc = stop_process(m.proc, timeout=300)
        lazy_unmount(m.path)
        return rc


class Blobfs(Target):
    name = "blobfs"
    description = "blobfs defaults (close=sync, commit_interval=1s, metadata_ttl=1s)"

    def __init__(self, extra_options: list[str] | None = None) -> None:
        self.extra_options = extra_options or []
        if self.extra_options:
            # A variant: its rows must not be read as the defaults' figures.
            self.name = f"blobfs[{'+'.join(self.extra_options)}]"
            self.description = f"blobfs with -o {','.join(self.extra_options)}"

    def command(self, backend: Backend, mnt: Path, state: Path,
                endpoint: str | None) -> tuple[list[str], dict[str, str | None]]:
        opts = [f"cache_dir={state}", *backend.mount_options(endpoint), *self.extra_options]
        cmd = [str(VENV_BIN / "blobfs"), "mount", backend.source(), str(mnt), "-f",
               "-o", ",".join(opts)]
        return cmd, {**backend.mount_env(endpoint), "PYTHONUNBUFFERED": "1"}

    def stop(self, m: Mounted) -> int:
        # SIGTERM: commit everything pending, then unmount (semantics §4).
        rc = stop_process(m.proc, timeout=300)
        lazy_unmount(m.path)
        return rc


class S3fs(Target):
    name = "s3fs"
    description = "s3fs-fuse, stat_cache_expire=1 (so tail -f can see growth)"

    def unsupported(self, backend: Backend) -> str | None:
        if not isinstance(backend, S3Backend):
            return "s3fs mounts S3 only"
        if shutil.which("s3fs") is None:
            return "s3fs is not installed (scripts/bootstrap --peers)"
        return None

    def command(self, backend: Backend, mnt: Path, state: Path,
                endpoint: str | None) -> tuple[list[str], dict[str, str | None]]:
        assert isinstance(backend, S3Backend)
        state.mkdir(parents=True, exist_ok=True)
        passwd = state / "passwd"
        passwd.write_text("testing:testing\n")
        passwd.chmod(0o600)
        opts = [f"url={endpoint or backend.server.url}", "use_path_request_style",
                f"passwd_file={passwd}", "endpoint=us-east-1", "stat_cache_expire=1",
                "dbglevel=warn"]
        cmd = ["s3fs", f"{backend.bucket}:/{PREFIX}", str(mnt), "-f", "-o", ",".join(opts)]
        return cmd, {}


class Rclone(Target):
    """rclone mount; `cache_mode` is its --vfs-cache-mode (off: no local cache)."""

    def __init__(self, cache_mode: str) -> None:
        self.cache_mode = cache_mode
        self.name = "rclone" if cache_mode == "off" else f"rclone-{cache_mode}"
        self.description = (f"rclone mount --vfs-cache-mode {cache_mode} --dir-cache-time 1s "
                            "--vfs-write-back 1s (blobfs's metadata_ttl and commit_interval)")

    def unsupported(self, backend: Backend) -> str | None:
        if not isinstance(backend, S3Backend | AzBackend):
            return "not run: the peers are compared on the servers only"
        if shutil.which("rclone") is None:
            return "rclone is not installed (scripts/bootstrap --peers)"
        return None

    def command(self, backend: Backend, mnt: Path, state: Path,
                endpoint: str | None) -> tuple[list[str], dict[str, str | None]]:
        state.mkdir(parents=True, exist_ok=True)
        conf = state / "rclone.conf"
        if isinstance(backend, S3Backend):
            conf.write_text(
                "[bench]\ntype = s3\nprovider = Other\naccess_key_id = testing\n"
                "secret_access_key = testing\nregion = us-east-1\n"
                f"endpoint = {endpoint or backend.server.url}\nforce_path_style = true\n")
            remote = f"bench:{backend.bucket}/{PREFIX}"
            extra = []
        else:
            assert isinstance(backend, AzBackend)
            # rclone 1.60 cannot point the account-key auth at Azurite's port: a SAS URL can.
            conf.write_text("[bench]\ntype = azureblob\n"
                            f"sas_url = {backend.container_sas_url(endpoint)}\n")
            remote = f"bench:{backend.container}/{PREFIX}"
            extra = []
        cmd = ["rclone", "mount", remote, str(mnt), "--config", str(conf),
               "--cache-dir", str(state / "cache"), "--vfs-cache-mode", self.cache_mode,
               "--dir-cache-time", "1s", "--vfs-write-back", "1s", "--log-level", "NOTICE", *extra]
        # The AWS SDK in rclone 1.60 fails on a custom CA bundle ("unsupported transport")
        # and these servers speak plain http anyway.
        return cmd, {"RCLONE_CONFIG": str(conf), "AWS_CA_BUNDLE": None}


    def mount(self, backend: Backend, mnt: Path, work: Path, *,
              endpoint: str | None = None, label: str = "mnt") -> Mounted:
        if not isinstance(backend, S3Backend) or endpoint is not None:
            return super().mount(backend, mnt, work, endpoint=endpoint, label=label)
        # rclone 1.60 checks each upload with HEAD ?versionId=null (moto names the version
        # "null" on an unversioned bucket), which moto answers with 400: a proxy that drops
        # the parameter stands in between (the append workload's proxy does the same).
        from tests.support.proxy import Proxy

        proxy = Proxy(backend.upstream())
        proxy.hook = strip_version_null(backend.upstream())
        proxy.start()
        try:
            m = super().mount(backend, mnt, work, endpoint=proxy.url, label=label)
        except BaseException:
            proxy.close()
            raise
        m.cleanups.append(proxy.close)
        return m


_HOP = {"connection", "keep-alive", "transfer-encoding", "host", "content-length"}


def strip_version_null(upstream: str) -> Callable[[Any], Any]:
    """A `Proxy.hook` that sends HEAD/GET `?versionId=null` upstream without it (moto
    rejects that parameter on an unversioned bucket; S3 accepts it)."""
    from tests.support.proxy import ProxyResponse

    parts = urlsplit(upstream)

    def hook(req: Any) -> Any:
        query = req.query
        if req.method not in ("HEAD", "GET") or query.get("versionId") != ["null"]:
            return None
        rest = [(k, v) for k, values in query.items() if k != "versionId" for v in values]
        target = req.path + (f"?{urlencode(rest)}" if rest else "")
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80,
                                          timeout=120)
        try:
            headers = {k: v for k, v in req.headers.items() if k.lower() not in _HOP}
            headers["Host"] = parts.netloc
            conn.request(req.method, target, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            out = {k: v for k, v in resp.getheaders() if k.lower() not in _HOP}
            if req.method == "HEAD":
                length = resp.getheader("Content-Length")
                if length is not None:
                    out["Content-Length"] = length
            return ProxyResponse(resp.status, body, out)
        finally:
            conn.close()

    return hook


def by_name(name: str) -> Target:
    if name == "blobfs":
        return Blobfs()
    if name.startswith("blobfs[") and name.endswith("]"):
        # e.g. blobfs[commit_interval=60]: blobfs with mount options, '+' between them
        return Blobfs(name[len("blobfs[") : -1].split("+"))
    if name == "s3fs":
        return S3fs()
    if name == "rclone":
        return Rclone("off")
    if name.startswith("rclone-"):
        return Rclone(name.removeprefix("rclone-"))
    raise BenchError(f"unknown filesystem {name!r}")
