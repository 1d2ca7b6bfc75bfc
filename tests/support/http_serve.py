"""Start `blobfs serve` in a subprocess for a test, and always stop it again (by PID).

Also small HTTP helpers the HTTP tests share: a raw streaming PUT (a client whose body
arrives slowly and that can vanish mid-body), waiting for /healthz, the daemon's RSS.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.support.envs import ServerProcess, StoreEnv, free_port
from tests.support.mounting import blobfs_cmd, mount_env
from tests.support.waiting import stop_started, wait_started

START_TIMEOUT = 30.0


class Served(ServerProcess):
    """A `blobfs serve` process."""

    def rss_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS")


def healthy(host: str, port: int, context: ssl.SSLContext | None = None) -> bool:
    try:
        if context is not None:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                host, port, timeout=2, context=context)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=2)
        conn.request("GET", "/healthz")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


@contextmanager
def served(env: StoreEnv, tmp: Path, *options: str, name: str = "serve",
           allow_errors: bool = False, tls: ssl.SSLContext | None = None,
           args: tuple[str, ...] = ("--debug",)) -> Iterator[Served]:
    """`blobfs serve env.url --listen 127.0.0.1:PORT`; yields once /healthz answers.

    A traceback or an ERROR line in its log fails the test unless `allow_errors`.
    """
    port = free_port()
    cache_dir = tmp / f"{name}-cache"
    log_path = tmp / f"{name}.log"
    opts = [f"cache_dir={cache_dir}", *env.options, *options]
    cmd = blobfs_cmd("serve", env.url, "--listen", f"127.0.0.1:{port}", "-o", ",".join(opts),
                     *args)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, env=mount_env(env), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    scheme = "https" if tls is not None else "http"
    srv = Served(f"{scheme}://127.0.0.1:{port}", port, proc, log_path)
    try:
        wait_started(proc, lambda: healthy("127.0.0.1", port, tls), "blobfs serve",
                     START_TIMEOUT, srv.log)
        yield srv
    finally:
        stop_started(proc, timeout=30)
    text = srv.log()
    if "Traceback" in text or (not allow_errors and " ERROR " in text):
        raise AssertionError(f"blobfs serve logged errors:\n{text[-4000:]}")


class StreamingPut:
    """A PUT with a chunked body sent piece by piece over a raw socket."""

    def __init__(self, port: int, key: str, token: str | None = None, query: str = "") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        head = [f"PUT /files/{key}{query} HTTP/1.1", f"Host: 127.0.0.1:{port}",
                "Transfer-Encoding: chunked", "Content-Type: text/plain"]
        if token:
            head.append(f"Authorization: Bearer {token}")
        self.sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())

    def send(self, data: bytes) -> None:
        self.sock.sendall(b"%x\r\n%s\r\n" % (len(data), data))

    def finish(self) -> tuple[int, bytes]:
        """End the body; (status, response bytes)."""
        self.sock.sendall(b"0\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            piece = self.sock.recv(65536)
            if not piece:
                break
            data += piece
        self.sock.close()
        return int(data.split(b" ", 2)[1]), data

    def vanish(self) -> None:
        """Disconnect in the middle of the body."""
        self.sock.close()


def http_status(url: str) -> bytes:
    """The status code curl gets for a GET of `url` (b"000" when nothing answers)."""
    return subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                           "--noproxy", "*", url], capture_output=True, timeout=30).stdout


class CurlFollower:
    """`curl -N` on a follow URL; a thread collects each line with its arrival time."""

    def __init__(self, url: str) -> None:
        self.proc = subprocess.Popen(["curl", "-sS", "-N", "--noproxy", "*", url],
                                     stdout=subprocess.PIPE)
        self.arrivals: list[tuple[bytes, float]] = []
        self.reader = threading.Thread(target=self._read)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.arrivals.append((line, time.time()))

    def wait(self, timeout: float) -> int:
        """curl's exit status once it ends; its lines are all collected then."""
        status = self.proc.wait(timeout=timeout)
        self.reader.join(10)
        return status
