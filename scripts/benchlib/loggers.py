"""Loggers writing through the mount, against the same logger on local disk (issue 12):
nginx's access log under `ab`, and Python's RotatingFileHandler.

Each figure is a ratio measured within one run: the local-disk and the mount runs
alternate (ROUNDS of each, the best of each counts), so the load of a shared machine
weighs on both sides alike.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchlib.common import BenchError, run, stop_process
from benchlib.stores import Backend
from benchlib.targets import Target
from benchlib.workloads import CpuMeter, Ctx, explained

NGINX_REQUESTS = 20_000
AB_CONCURRENCY = 20
LOG_RECORDS = 50_000
ROUNDS = 3

_REQ_S = re.compile(r"Requests per second:\s+([\d.]+)")
_FAILED = re.compile(r"Failed requests:\s+(\d+)")

#: The logging run, in a fresh interpreter (no bench state in its way). argv: path, count.
_PY_LOGGING = """
import logging, logging.handlers, sys, time
h = logging.handlers.RotatingFileHandler(sys.argv[1], maxBytes=1 << 30, backupCount=3)
h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
log = logging.getLogger("bench")
log.addHandler(h)
log.setLevel(logging.INFO)
log.propagate = False
t0 = time.perf_counter()
for i in range(int(sys.argv[2])):
    log.info("request %d served in %.3f ms for %s", i, 1.234, "127.0.0.1")
h.close()
print(time.perf_counter() - t0)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nginx_conf(work: Path, log_path: Path, port: int, access_log: str) -> Path:
    work.mkdir(parents=True, exist_ok=True)
    conf = work / "nginx.conf"
    # As root, the workers stay root: a mount without allow_other answers only its owner.
    user = "user root;" if os.geteuid() == 0 else ""
    temp = " ".join(f"{kind}_temp_path {work / kind};" for kind in
                    ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf.write_text(f"""
worker_processes 2;
daemon off;
{user}
pid {work / "nginx.pid"};
error_log {work / "error.log"};
events {{ worker_connections 1024; }}
http {{
  {temp}
  access_log {log_path}{access_log};
  server {{ listen 127.0.0.1:{port}; location / {{ return 200 "ok\\n"; }} }}
}}
""")
    return conf


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"nginx exited with {proc.returncode} at start")
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"nginx did not answer on port {port} within {timeout:g}s")


def nginx_once(work: Path, log_path: Path, access_log: str = "") -> float:
    """req/s of `ab -n NGINX_REQUESTS -c AB_CONCURRENCY` against nginx (2 workers) whose
    access log is `log_path`; checks that the log holds one line per request."""
    port = _free_port()
    conf = _nginx_conf(work, log_path, port, access_log)
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-e", str(work / "error.log")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL)
    try:
        _wait_port(port, proc)
        res = run(["ab", "-q", "-n", str(NGINX_REQUESTS), "-c", str(AB_CONCURRENCY),
                   f"http://127.0.0.1:{port}/"], 600)
    finally:
        stop_process(proc, signal.SIGQUIT, timeout=60)  # QUIT: workers flush their buffers
    rate, failed = _REQ_S.search(res.stdout), _FAILED.search(res.stdout)
    if rate is None or failed is None:
        raise BenchError(f"cannot read ab's output: {res.stdout[-200:]!r}")
    if int(failed.group(1)):
        raise BenchError(f"ab saw {failed.group(1)} failed requests")
    with open(log_path, "rb") as f:
        lines = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    # ab's probe connection before the run adds nothing: it sends no request.
    if lines != NGINX_REQUESTS:
        raise BenchError(f"the access log holds {lines} lines for {NGINX_REQUESTS} requests")
    return float(rate.group(1))


def logging_once(path: Path) -> float:
    """Seconds for LOG_RECORDS records through a RotatingFileHandler writing `path`."""
    res = run([sys.executable, "-c", _PY_LOGGING, str(path), str(LOG_RECORDS)], 900)
    return float(res.stdout.strip())


def _need_nginx() -> None:
    missing = [tool for tool in ("nginx", "ab") if shutil.which(tool) is None]
    if missing:
        raise BenchError(f"{' and '.join(missing)} missing: `scripts/bootstrap --bench` "
                         "installs nginx and apache2-utils")


def nginx(ctx: Ctx, target: Target, backend: Backend, access_log: str = "") -> dict[str, Any]:
    """nginx with its access log on the mount vs on local disk, alternating, best of ROUNDS."""
    _need_nginx()
    local_dir = ctx.work / "nginx-local"
    local, mounted, cpu_s = [], [], 0.0
    with target.mount(backend, ctx.mnt("nginx"), ctx.work, label="nginx") as m, explained(m):
        for i in range(ROUNDS):
            local_log = local_dir / f"access-{i}.log"
            local.append(nginx_once(local_dir / "conf", local_log, access_log))
            local_log.unlink()
            with CpuMeter(m.pid, None) as cpu:
                mounted.append(nginx_once(ctx.work / "nginx-mnt", m.path / f"access-{i}.log",
                                          access_log))
            cpu_s += cpu.result["daemon_cpu_s"]
    best_local, best_mount = max(local), max(mounted)
    return {"local_req_s": round(best_local), "mount_req_s": round(best_mount),
            "ratio": round(best_mount / best_local, 2),
            "runs_local": [round(r) for r in local], "runs_mount": [round(r) for r in mounted],
            "daemon_us_per_request": round(cpu_s / (ROUNDS * NGINX_REQUESTS) * 1e6, 1),
            "requests": NGINX_REQUESTS, "concurrency": AB_CONCURRENCY,
            "access_log": f"access_log PATH{access_log}"}


def python_logging(ctx: Ctx, target: Target, backend: Backend) -> dict[str, Any]:
    """LOG_RECORDS records of Python logging (RotatingFileHandler) on the mount vs local."""
    local_dir = ctx.work / "pylog-local"
    local_dir.mkdir(parents=True, exist_ok=True)
    local, mounted = [], []
    with target.mount(backend, ctx.mnt("pylog"), ctx.work, label="pylog") as m, explained(m):
        for i in range(ROUNDS):
            path = local_dir / f"app-{i}.log"
            local.append(logging_once(path))
            path.unlink()
            mounted.append(logging_once(m.path / f"app-{i}.log"))
    best_local, best_mount = min(local), min(mounted)
    return {"local_s": round(best_local, 2), "mount_s": round(best_mount, 2),
            "slowdown": round(best_mount / best_local, 1), "records": LOG_RECORDS,
            "runs_local_s": [round(r, 2) for r in local],
            "runs_mount_s": [round(r, 2) for r in mounted]}
