"""The `http` workload: blobfs's HTTP face (`-o http=`) against the same mount's FUSE path.

Rows: same-host latency PUT -> follower (p50/p99), a full GET vs `dd` from the mount (both
cold), one streaming PUT vs `dd` into the mount (both until committed), and 1,000
followers of one growing log (daemon memory above idle, per-line latency). Clients: curl
and `tests/support/http_followers.py` (httpx). Everything on 127.0.0.1.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from benchlib.common import ROOT, BenchError, MiB, drop_caches, log, mib_s
from benchlib.stores import Backend
from benchlib.targets import Blobfs, Target
from benchlib.workloads import Ctx, _dd

TOKEN = "bench-write-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _curl(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-sS", "--noproxy", "*", *args], capture_output=True,
                          timeout=timeout, check=False)


class _Put:
    """A chunked PUT over a raw socket, sent piece by piece."""

    def __init__(self, port: int, key: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=120)
        self.sock.sendall((f"PUT /files/{key} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: "
                           f"chunked\r\nAuthorization: Bearer {TOKEN}\r\n\r\n").encode())

    def send(self, data: bytes) -> None:
        self.sock.sendall(b"%x\r\n%s\r\n" % (len(data), data))

    def finish(self) -> None:
        self.sock.sendall(b"0\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            piece = self.sock.recv(65536)
            if not piece:
                break
            head += piece
        self.sock.close()
        if b" 20" not in head.split(b"\r\n", 1)[0]:
            raise BenchError(f"PUT failed: {head[:200]!r}")


def _line(seq: int) -> bytes:
    head = b"T=%.6f seq %06d " % (time.time(), seq)
    return head + b"x" * (100 - len(head) - 1) + b"\n"


def _followers(url: str, n: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.http_followers", url,
                             str(n)], stdout=subprocess.PIPE, text=True, cwd=str(ROOT))
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise BenchError("the followers did not connect")
    return proc


def _follow_run(port: int, key: str, n: int, lines: int, interval: float,
                pid: int) -> dict[str, Any]:
    put = _Put(port, key)
    put.send(_line(0))
    deadline = time.monotonic() + 30
    while _curl("-o", "/dev/null", "-w", "%{http_code}",
                f"http://127.0.0.1:{port}/files/{key}").stdout != b"200":
        if time.monotonic() > deadline:
            raise BenchError(f"{key} did not appear")
        time.sleep(0.05)
    idle = _rss_kib(pid)
    peak = [idle]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_kib(pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        proc = _followers(f"http://127.0.0.1:{port}/files/{key}?follow=1", n)
        for seq in range(1, lines + 1):
            put.send(_line(seq))
            time.sleep(interval)
        put.finish()
        out, _ = proc.communicate(timeout=600)
    finally:
        done.set()
        sampler.join()
    res = json.loads(out.strip().splitlines()[-1])
    sizes = {r["size"] for r in res["followers"]}
    digests = {r["sha256"] for r in res["followers"]}
    clean = all(r["clean"] for r in res["followers"])
    if len(sizes) != 1 or len(digests) != 1 or not clean:
        raise BenchError(f"followers disagree: sizes {sizes}, clean {clean}")
    return {"p50_ms": round(res["p50"] * 1000, 1), "p99_ms": round(res["p99"] * 1000, 1),
            "lines": res["lines"], "rss_idle_mib": round(idle / 1024, 1),
            "rss_above_idle_mib": round((peak[0] - idle) / 1024, 1)}


def http_face(ctx: Ctx, target: Target, backend: Backend) -> dict[str, Any]:
    if not isinstance(target, Blobfs) or target.extra_options:
        raise BenchError("the HTTP face is measured on blobfs with its defaults")
    tok = ctx.work / "http-write.tok"
    tok.write_text(TOKEN)
    size = ctx.sizes.seq_mib * MiB
    name = "http-seq.bin"
    if backend.size(name) != size:
        backend.put(name, ctx.src)
    out: dict[str, Any] = {}

    def face() -> tuple[Blobfs, int]:
        port = _free_port()
        t = Blobfs([f"http=127.0.0.1:{port}", f"http_write_token_file={tok}"])
        t.name = "blobfs-http"  # its logs and state are named after it
        return t, port

    # 1. A full GET through the face, cold, then dd from a fresh mount, cold.
    t, port = face()
    with t.mount(backend, ctx.mnt("http"), ctx.work, label="http-get"):
        drop_caches()
        t0 = time.perf_counter()
        res = _curl("-o", "/dev/null", "-w", "%{size_download}",
                    f"http://127.0.0.1:{port}/files/{name}")
        took = time.perf_counter() - t0
        if res.stdout != str(size).encode():
            raise BenchError(f"GET returned {res.stdout!r} bytes, expected {size}")
        out["get_mib_s"] = round(mib_s(size, took), 1)
    with t.mount(backend, ctx.mnt("http"), ctx.work, label="http-dd") as m:
        drop_caches()
        t0 = time.perf_counter()
        got = _dd([f"if={m.path / name}", "of=/dev/null"], 900)
        out["mount_read_mib_s"] = round(mib_s(got, time.perf_counter() - t0), 1)
    out["get_vs_mount_read"] = round(out["get_mib_s"] / out["mount_read_mib_s"], 2)

    # 2. One PUT vs dd into the mount, each until the store has it (answer / close=sync).
    t, port = face()
    with t.mount(backend, ctx.mnt("http"), ctx.work, label="http-put") as m:
        backend.delete("http-put.bin")
        t0 = time.perf_counter()
        res = _curl("-T", str(ctx.src), "-H", f"Authorization: Bearer {TOKEN}",
                    f"http://127.0.0.1:{port}/files/http-put.bin")
        took = time.perf_counter() - t0
        if res.returncode or json.loads(res.stdout).get("size") != size:
            raise BenchError(f"PUT failed: {res.stdout[:200]!r} {res.stderr[:200]!r}")
        out["put_mib_s"] = round(mib_s(size, took), 1)
        backend.delete("http-dd.bin")
        t0 = time.perf_counter()
        _dd([f"if={ctx.src}", f"of={m.path / 'http-dd.bin'}",
             f"count={ctx.sizes.seq_mib}"], 900)
        out["mount_write_mib_s"] = round(mib_s(size, time.perf_counter() - t0), 1)
        out["put_vs_mount_write"] = round(out["put_mib_s"] / out["mount_write_mib_s"], 2)

        # 3. Same-host latency PUT -> one follower, then 1,000 followers.
        log("  http: PUT -> 1 follower, 200 lines")
        one = _follow_run(port, "http-lat.log", 1, 200, 0.02, m.pid)
        out["follow_p50_ms"], out["follow_p99_ms"] = one["p50_ms"], one["p99_ms"]
        log("  http: PUT -> 1,000 followers, 100 lines")
        many = _follow_run(port, "http-many.log", 1000, 100, 0.05, m.pid)
        out["followers_1000_p50_ms"] = many["p50_ms"]
        out["followers_1000_p99_ms"] = many["p99_ms"]
        out["followers_1000_rss_above_idle_mib"] = many["rss_above_idle_mib"]
        out["rss_idle_mib"] = many["rss_idle_mib"]
    return out


def section(records: list[dict[str, Any]]) -> list[str]:
    """The markdown rows of the http workload (empty when it did not run)."""
    rows = [r for r in records if r.get("workload") == "http" and r.get("status") == "ok"]
    if not rows:
        return []
    md = ["## Live logs over HTTP (`-o http=`)", "",
          "| store | PUT → follower p50 / p99 (target ≤ 50 / 250 ms) | full GET vs mount read "
          "(≥ 80 %) | one PUT vs dd into the mount (≥ 80 %) | 1,000 followers: RSS above "
          "idle (≤ 150 MiB), line latency p50 / p99 |",
          "| --- | --- | --- | --- | --- |"]
    for r in rows:
        f = r["figures"]
        md.append(
            f"| {r['store']} | {f['follow_p50_ms']:.0f} / {f['follow_p99_ms']:.0f} ms | "
            f"{f['get_mib_s']:.0f} vs {f['mount_read_mib_s']:.0f} MiB/s "
            f"({f['get_vs_mount_read'] * 100:.0f} %) | {f['put_mib_s']:.0f} vs "
            f"{f['mount_write_mib_s']:.0f} MiB/s ({f['put_vs_mount_write'] * 100:.0f} %) | "
            f"+{f['followers_1000_rss_above_idle_mib']:.0f} MiB, "
            f"{f['followers_1000_p50_ms']:.0f} / {f['followers_1000_p99_ms']:.0f} ms |")
    return [*md, ""]
