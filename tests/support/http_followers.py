"""N concurrent followers of one URL (`?follow=1`) with httpx, in a process of their own.

`python -m tests.support.http_followers URL N [--stalled K]` opens N follow streams,
prints `ready` once every one has its response head, reads each to its end, and prints
one JSON line: per-follower byte counts and SHA-256 of what arrived, and the latency of
every line, taken from the send time the producer wrote at the start of each line
(`T=<unix time> ...`). K extra clients open the stream and never read (their receive
buffer made small), to show a stalled follower is dropped without slowing the others.
Used by tests/http and scripts/bench; asyncio lives only here, never in blobfs.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import socket
import sys
import time
from urllib.parse import urlsplit

import httpx

#: When every follower had its response head: lines written before that do not count.
READY_AT = [float("inf")]


async def follow(client: httpx.AsyncClient, url: str, ready: list[int],
                 lat: list[float]) -> dict[str, object]:
    h = hashlib.sha256()
    size = 0
    partial = b""
    clean = True
    try:
        async with client.stream("GET", url) as resp:
            ready.append(resp.status_code)
            async for chunk in resp.aiter_raw():
                now = time.time()
                h.update(chunk)
                size += len(chunk)
                data = partial + chunk
                *lines, partial = data.split(b"\n")
                for line in lines:
                    if line.startswith(b"T="):
                        sent = float(line[2:].split(b" ", 1)[0])
                        if sent >= READY_AT[0]:  # written while every follower followed
                            lat.append(now - sent)
    except httpx.HTTPError as exc:
        clean = False
        print(f"follower failed: {exc!r}", file=sys.stderr)
    return {"size": size, "sha256": h.hexdigest(), "clean": clean}


def stalled(url: str) -> socket.socket:
    parts = urlsplit(url)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect((parts.hostname or "127.0.0.1", parts.port or 80))
    target = parts.path + ("?" + parts.query if parts.query else "")
    s.sendall(f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode())
    return s


async def main_async(url: str, n: int, stall: int) -> dict[str, object]:
    limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=0)
    timeout = httpx.Timeout(120.0, connect=60.0, pool=120.0)
    stuck = [stalled(url) for _ in range(stall)]
    lat: list[float] = []
    ready: list[int] = []
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
        tasks = [asyncio.create_task(follow(client, url, ready, lat)) for _ in range(n)]
        while len(ready) < n and not all(t.done() for t in tasks):
            await asyncio.sleep(0.01)
        READY_AT[0] = time.time()
        print("ready", flush=True)
        results = await asyncio.gather(*tasks)
    # A stalled client was dropped: its connection ends without the final chunk.
    dropped = 0
    for s in stuck:
        s.settimeout(30)
        got = b""
        try:
            while True:
                piece = s.recv(1 << 20)
                if not piece:
                    break
                got += piece[-16:]
                got = got[-16:]
        except OSError:
            pass
        if not got.endswith(b"0\r\n\r\n"):
            dropped += 1
        s.close()
    lat.sort()

    def pct(p: float) -> float | None:
        return lat[min(int(p * len(lat)), len(lat) - 1)] if lat else None

    return {"followers": results, "statuses": sorted(set(ready)), "lines": len(lat),
            "p50": pct(0.5), "p99": pct(0.99), "max": lat[-1] if lat else None,
            "stalled_dropped": dropped}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("n", type=int)
    p.add_argument("--stalled", type=int, default=0)
    args = p.parse_args()
    out = asyncio.run(main_async(args.url, args.n, args.stalled))
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
