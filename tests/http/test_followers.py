"""Many followers of one growing log (httpx clients in a process of their own): every
follower gets every byte in order, the daemon's memory stays bounded, and a follower
that stops reading is dropped without slowing the others."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support.envs import StoreEnv
from tests.support.http_serve import StreamingPut, http_status, served
from tests.support.waiting import wait_for

MiB = 1 << 20


def _line(seq: int, width: int) -> bytes:
    head = b"T=%.6f seq %06d " % (time.time(), seq)
    return head + b"x" * (width - len(head) - 1) + b"\n"


def _start_followers(url: str, n: int, stalled: int = 0) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-m", "tests.support.http_followers", url,
                             str(n), "--stalled", str(stalled)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # blocks until every follower has its response head
    assert line.strip() == "ready", line
    return proc


def _result(proc: subprocess.Popen[str]) -> dict[str, object]:
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def write_token(tmp_path: Path) -> str:
    (tmp_path / "w.tok").write_text("w-token\n")
    return f"http_write_token_file={tmp_path / 'w.tok'}"


def test_thousand_followers(file_env: StoreEnv, tmp_path: Path, write_token: str) -> None:
    n = 1000
    with served(file_env, tmp_path, write_token, args=()) as srv:
        put = StreamingPut(srv.port, "busy.log", "w-token")
        sent = [_line(0, 100)]
        put.send(sent[0])
        wait_for(lambda: http_status(f"{srv.url}/files/busy.log") == b"200", 10, "log")
        idle_kib = srv.rss_kib()
        peak = [idle_kib]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], srv.rss_kib())
                time.sleep(0.02)  # deliberate: the sampling period

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            followers = _start_followers(f"{srv.url}/files/busy.log?follow=1", n)
            for seq in range(1, 41):
                sent.append(_line(seq, 100))
                put.send(sent[-1])
                time.sleep(0.02)  # deliberate: a log that grows, line by line
            status, _ = put.finish()
            assert status == 201
            result = _result(followers)
        finally:
            done.set()
            sampler.join()
    body = b"".join(sent)
    digest = hashlib.sha256(body).hexdigest()
    rows = result["followers"]
    assert isinstance(rows, list) and len(rows) == n
    assert result["statuses"] == [200]
    bad = [r for r in rows if (r["size"], r["sha256"], r["clean"]) != (len(body), digest, True)]
    assert not bad, bad[:3]
    grown_mib = (peak[0] - idle_kib) / 1024
    print(f"\n{n} followers: memory +{grown_mib:.1f} MiB above idle; line latency "
          f"p50 {result['p50'] * 1000:.1f} ms, p99 {result['p99'] * 1000:.1f} ms")
    assert grown_mib <= 150, f"the daemon grew {grown_mib:.0f} MiB with {n} followers"


def test_stalled_follower_is_dropped(file_env: StoreEnv, tmp_path: Path,
                                     write_token: str) -> None:
    """One client stops reading while 16 MiB arrive (about 4 MiB/s): it is dropped past
    8 MiB of unsent backlog; the two that read get every byte, in order, and end cleanly."""
    with served(file_env, tmp_path, write_token) as srv:
        put = StreamingPut(srv.port, "burst.log", "w-token")
        sent = [_line(0, 1024)]
        put.send(sent[0])
        wait_for(lambda: http_status(f"{srv.url}/files/burst.log") == b"200", 10, "log")
        followers = _start_followers(f"{srv.url}/files/burst.log?follow=1", 2, stalled=1)
        for chunk in range(64):  # 16 MiB in 256 KiB pieces
            piece = b"".join(_line(chunk * 256 + i, 1024) for i in range(256))
            sent.append(piece)
            put.send(piece)
            time.sleep(0.06)  # deliberate: a fast writer the readers keep up with
        status, _ = put.finish()
        assert status == 201
        result = _result(followers)
        log = srv.log()
    body = b"".join(sent)
    digest = hashlib.sha256(body).hexdigest()
    for row in result["followers"]:  # type: ignore[union-attr]
        assert (row["size"], row["sha256"], row["clean"]) == (len(body), digest, True)
    assert result["stalled_dropped"] == 1
    assert log.count("fell behind") == 1
