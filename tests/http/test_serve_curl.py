"""`blobfs serve` with a real client, curl: ranges, validators, follow, streaming PUT,
tokens, 409, abort on replace and delete, listings, a PUT that loses its client."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from blobfs.errors import NotFound
from tests.support.envs import StoreEnv
from tests.support.http_serve import CurlFollower, StreamingPut, http_status, served
from tests.support.waiting import wait_for


def curl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-sS", "--noproxy", "*", *args], capture_output=True,
                          timeout=timeout, check=False)


def head_and_body(res: subprocess.CompletedProcess[bytes]) -> tuple[int, dict[str, str], bytes]:
    raw = res.stdout
    # curl -i prints the 100 Continue block first when there was one.
    while raw.startswith(b"HTTP/1.1 100"):
        raw = raw.split(b"\r\n\r\n", 1)[1]
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return int(lines[0].split()[1]), headers, body


@pytest.fixture
def tokens(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "read.tok").write_text("r-secret-123\n")
    (tmp_path / "write.tok").write_text("w-secret-456\n")
    return {"read": str(tmp_path / "read.tok"), "write": str(tmp_path / "write.tok")}


def test_ranges_validators_and_listing(file_env: StoreEnv, tmp_path: Path) -> None:
    root = Path(file_env.url.removeprefix("file://"))
    body = bytes(range(256)) * 40  # 10240 bytes
    (root / "app.log").write_bytes(body)
    (root / "sub").mkdir()
    (root / "sub" / "x.bin").write_bytes(b"xyz")
    with served(file_env, tmp_path) as srv:
        url = f"{srv.url}/files/app.log"
        status, h, got = head_and_body(curl("-i", url))
        assert status == 200 and got == body
        assert h["content-type"] == "text/plain; charset=utf-8"
        assert h["accept-ranges"] == "bytes" and h["content-length"] == "10240"
        assert h["etag"].startswith('"') and "GMT" in h["last-modified"]
        etag = h["etag"]
        for spec, first, last in [("100-199", 100, 199), ("10000-", 10000, 10239),
                                  ("-40", 10200, 10239), ("10200-99999", 10200, 10239)]:
            status, h, got = head_and_body(curl("-i", "-r", spec, url))
            assert status == 206, spec
            assert h["content-range"] == f"bytes {first}-{last}/10240"
            assert got == body[first:last + 1], spec
        status, h, _ = head_and_body(curl("-i", "-r", "10240-", url))
        assert status == 416 and h["content-range"] == "bytes */10240"
        # HEAD: headers, no body.
        status, h, got = head_and_body(curl("-I", url))
        assert status == 200 and h["content-length"] == "10240" and got == b""
        # Conditionals.
        assert head_and_body(curl("-i", "-H", f"If-None-Match: {etag}", url))[0] == 304
        assert head_and_body(curl("-i", "-H", 'If-Match: "other"', url))[0] == 412
        assert head_and_body(curl("-i", "-H", f"If-Match: {etag}", url))[0] == 200
        status, _, got = head_and_body(curl("-i", "-r", "0-9", "-H", 'If-Range: "old"', url))
        assert status == 200 and got == body  # a stale If-Range gets the whole file
        status, _, got = head_and_body(curl("-i", "-r", "0-9", "-H", f"If-Range: {etag}", url))
        assert status == 206 and got == body[:10]
        assert head_and_body(curl("-i", f"{srv.url}/files/missing.log"))[0] == 404
        assert head_and_body(curl("-i", f"{srv.url}/files/sub/nope/x"))[0] == 404
        # Listings: JSON for programs, HTML for browsers.
        rows = json.loads(curl(f"{srv.url}/files/").stdout)
        assert {(r["name"], r["size"], r["dir"]) for r in rows} == \
            {("app.log", 10240, False), ("sub/", 0, True)}
        assert [r["name"] for r in json.loads(curl(f"{srv.url}/files/sub/").stdout)] == \
            ["x.bin"]
        html = curl("-H", "Accept: text/html", f"{srv.url}/files/").stdout.decode()
        assert "<a href=\"/view/app.log\">view live</a>" in html
        assert curl(f"{srv.url}/healthz").stdout == b"ok\n"
        # Cross-origin reads are allowed by default; writes are not.
        _, h, _ = head_and_body(curl("-i", "-H", "Origin: https://ci.example", url))
        assert h["access-control-allow-origin"] == "*"
        _, h, _ = head_and_body(curl("-i", "-X", "OPTIONS", "-H", "Origin: https://x.example",
                                     "-H", "Access-Control-Request-Method: PUT", url))
        assert "access-control-allow-origin" not in h


def _producer_script(lines: int, pause: float) -> str:
    """A producer that writes a line each `pause` seconds (deliberate: a paced log)."""
    return (
        "import sys, time\n"
        f"for i in range({lines}):\n"
        "    sys.stdout.write('line %03d %.6f\\n' % (i, time.time())); sys.stdout.flush()\n"
        f"    time.sleep({pause})\n"
    )


def test_curl_put_stream_followed_by_curl(file_env: StoreEnv, tmp_path: Path,
                                          tokens: dict[str, str]) -> None:
    """`producer | curl -T -` streams into a blob; a second curl follows it line by line,
    each line arrives while the PUT still runs, and the follower ends cleanly (exit 0)
    when the PUT ends. Commits happen while the body arrives (commit_interval)."""
    n, pause = 12, 0.25
    with served(file_env, tmp_path, f"http_write_token_file={tokens['write']}",
                "commit_interval=0.5") as srv:
        producer = subprocess.Popen([sys.executable, "-c", _producer_script(n, pause)],
                                    stdout=subprocess.PIPE)
        put = subprocess.Popen(
            ["curl", "-sS", "--noproxy", "*", "-T", "-", "-H", "Authorization: Bearer "
             "w-secret-456", f"{srv.url}/files/ci/job.log"],
            stdin=producer.stdout, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert producer.stdout is not None
        producer.stdout.close()
        store = file_env.open()

        def committed_size() -> int:
            async def head() -> int:
                try:
                    return (await store.head("ci/job.log")).size
                except NotFound:  # the PUT has not made the blob yet
                    return 0
            return trio.run(head)

        # The follower starts once the blob exists (the PUT made it), from byte 0.
        wait_for(lambda: http_status(f"{srv.url}/files/ci/job.log") == b"200", 10, "blob")
        follower = CurlFollower(f"{srv.url}/files/ci/job.log?follow=1")
        arrivals = follower.arrivals
        # Mid-body commits: the store has part of the log before the producer is done.
        mid = wait_for(lambda: committed_size() > 0 and producer.poll() is None and
                       committed_size(), 10, "a commit while the body arrives")
        assert mid
        out, err = put.communicate(timeout=60)
        assert put.returncode == 0, err
        assert json.loads(out)["size"] > 0
        assert follower.wait(timeout=30) == 0  # a clean end: the PUT finished
    got = [line for line, _ in arrivals]
    assert got == [b"line %03d " % i + line[9:] for i, line in enumerate(got)]
    assert len(got) == n
    lags = [at - float(line.split()[2]) for line, at in arrivals]
    # Every line reached the follower long before the producer finished (live, not at
    # the end): the first line came more than a second before the last was written.
    assert arrivals[0][1] < float(got[-1].split()[2]) - 1.0, lags
    assert b"".join(got) == trio.run(_read_all, store, "ci/job.log")


async def _read_all(store, key: str) -> bytes:  # type: ignore[no-untyped-def]
    meta = await store.head(key)
    return await store.read(key, meta.etag, 0, meta.size)


def test_tokens_and_refusals(file_env: StoreEnv, tmp_path: Path,
                             tokens: dict[str, str]) -> None:
    root = Path(file_env.url.removeprefix("file://"))
    (root / "a.log").write_text("hello\n")
    with served(file_env, tmp_path, f"http_read_token_file={tokens['read']}",
                f"http_write_token_file={tokens['write']}") as srv:
        url = f"{srv.url}/files/a.log"
        code = ["-o", "/dev/null", "-w", "%{http_code}"]
        assert curl(*code, url).stdout == b"401"
        assert curl(*code, "-H", "Authorization: Bearer nope", url).stdout == b"403"
        assert curl(*code, "-H", "Authorization: Bearer r-secret-123", url).stdout == b"200"
        assert curl(*code, url + "?token=r-secret-123").stdout == b"200"
        assert curl(*code, url + "?token=wrong").stdout == b"403"
        assert curl(*code, f"{srv.url}/healthz").stdout == b"200"
        # The read token does not allow writes; the write token does.
        put = ["-T", "-", f"{srv.url}/files/b.log"]
        assert curl(*code, *put).stdout == b"401"
        assert curl(*code, "-H", "Authorization: Bearer r-secret-123", *put).stdout == b"403"
        assert curl(*code, "-H", "Authorization: Bearer w-secret-456", *put).stdout == b"201"
        log = srv.log()
    assert "r-secret-123" not in log and "w-secret-456" not in log and "wrong" not in log
    # Without a write token file, PUT is refused.
    with served(file_env, tmp_path, name="ro") as srv:
        assert curl("-o", "/dev/null", "-w", "%{http_code}", "-T", "-",
                    f"{srv.url}/files/c.log").stdout == b"403"
    # Listening beyond loopback without a read token: one line, exit 2, nothing served.
    res = subprocess.run([sys.executable, "-m", "blobfs", "serve", file_env.url, "--listen",
                          "0.0.0.0:1", "-o", f"cache_dir={tmp_path / 'c'}"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "read token" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_second_put_409_and_disconnect_commits(file_env: StoreEnv, tmp_path: Path,
                                               tokens: dict[str, str]) -> None:
    root = Path(file_env.url.removeprefix("file://"))
    with served(file_env, tmp_path, f"http_write_token_file={tokens['write']}",
                "commit_interval=0.3") as srv:
        first = StreamingPut(srv.port, "in.log", "w-secret-456")
        first.send(b"one\n")
        wait_for(lambda: (root / "in.log").exists(), 10, "the first PUT began")
        res = curl("-o", "/dev/null", "-w", "%{http_code}", "-T", "-", "-H",
                   "Authorization: Bearer w-secret-456", f"{srv.url}/files/in.log")
        assert res.stdout == b"409"
        first.send(b"two\n")
        first.vanish()  # the client goes away mid-body: what arrived is committed
        wait_for(lambda: "the client went away after 8 bytes" in srv.log(), 10, "the end")
        assert (root / "in.log").read_bytes() == b"one\ntwo\n"  # what arrived, committed
        # The key is free again, and ?append=1 appends.
        again = StreamingPut(srv.port, "in.log", "w-secret-456", "?append=1")
        again.send(b"three\n")
        status, _ = again.finish()
        assert status == 200
        assert (root / "in.log").read_bytes() == b"one\ntwo\nthree\n"


def test_follow_aborts_on_replace_and_delete(file_env: StoreEnv, tmp_path: Path,
                                             tokens: dict[str, str]) -> None:
    """A follower never continues with other bytes: a replace (PUT) or a delete (by
    another client) aborts the stream without its final chunk (curl exit 18); a finished
    log ends it cleanly; `idle=` ends a quiet one cleanly."""
    root = Path(file_env.url.removeprefix("file://"))
    (root / "r.log").write_text("old 1\nold 2\n")
    (root / "d.log").write_text("doomed\n")
    (root / "q.log").write_text("quiet\n")
    with served(file_env, tmp_path, f"http_write_token_file={tokens['write']}",
                "metadata_ttl=0.2") as srv:
        def follow(key: str, extra: str = "") -> subprocess.Popen[bytes]:
            return subprocess.Popen(["curl", "-sS", "-N", "--noproxy", "*",
                                     f"{srv.url}/files/{key}?follow=1&idle=30{extra}"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)

        replaced, deleted = follow("r.log"), follow("d.log")
        quiet = subprocess.Popen(["curl", "-sS", "-N", "--noproxy", "*",
                                  f"{srv.url}/files/q.log?follow=1&idle=0.5"],
                                 stdout=subprocess.PIPE)
        assert replaced.stdout is not None and deleted.stdout is not None
        # Both followers have what exists before anything changes.
        seen_r = replaced.stdout.read(12)
        seen_d = deleted.stdout.read(7)
        res = curl("-T", "-", "-H", "Authorization: Bearer w-secret-456",
                   f"{srv.url}/files/r.log")
        assert json.loads(res.stdout)["size"] == 0
        (root / "d.log").unlink()
        out, _ = replaced.communicate(timeout=20)
        assert replaced.returncode == 18 and seen_r + out == b"old 1\nold 2\n"
        out, _ = deleted.communicate(timeout=20)
        assert deleted.returncode == 18 and seen_d + out == b"doomed\n"
        out, _ = quiet.communicate(timeout=20)
        assert quiet.returncode == 0 and out == b"quiet\n"


def test_follow_across_servers(store_env: StoreEnv, tmp_path: Path,
                               tokens: dict[str, str]) -> None:
    """The writer streams into server A; a follower on server B (another process, as on
    another host; on every store) sees each commit within commit_interval + metadata_ttl,
    every byte in order, and its stream ends cleanly after `idle=` once growth stops."""
    with served(store_env, tmp_path, f"http_write_token_file={tokens['write']}",
                "commit_interval=0.2", name="a") as a, \
            served(store_env, tmp_path, "metadata_ttl=0.2", name="b") as b:
        put = StreamingPut(a.port, "x/remote.log", "w-secret-456")
        put.send(b"T=%.6f first\n" % time.time())
        wait_for(lambda: http_status(f"{b.url}/files/x/remote.log") == b"200", 15,
                 "the first commit, seen from B")
        follower = CurlFollower(f"{b.url}/files/x/remote.log?follow=1&idle=1.5")
        arrivals = follower.arrivals
        wait_for(lambda: arrivals, 10, "what exists")
        sent: list[bytes] = []
        for i in range(10):
            line = b"T=%.6f line %02d\n" % (time.time(), i)
            sent.append(line)
            put.send(line)
            time.sleep(0.1)  # deliberate: a paced writer, so arrival times can be compared
        assert put.finish()[0] == 201
        assert follower.wait(timeout=30) == 0  # ended by idle=: B cannot know the PUT
    got = [line for line, _ in arrivals]
    assert got[1:] == sent
    lags = sorted(at - float(line.split()[0][2:]) for line, at in arrivals[1:])
    print(f"\ncross-server follow on {store_env.name}: lag p50 {lags[len(lags) // 2]:.2f} s,"
          f" max {lags[-1]:.2f} s")
    # commit_interval + metadata_ttl, with a loaded machine's margin.
    assert lags[len(lags) // 2] < 2.0


def test_get_is_pinned_to_one_version(file_env: StoreEnv, tmp_path: Path,
                                      tokens: dict[str, str]) -> None:
    """A slow GET of a file that is replaced mid-response is cut (curl exit 18) and what
    it got is a prefix of the old version: never bytes of the new one."""
    root = Path(file_env.url.removeprefix("file://"))
    old = b"".join(b"old %07d\n" % i for i in range(400_000))  # 4.8 MB
    (root / "big.log").write_bytes(old)
    with served(file_env, tmp_path, f"http_write_token_file={tokens['write']}",
                "metadata_ttl=0.2") as srv:
        slow = subprocess.Popen(["curl", "-sS", "--noproxy", "*", "--limit-rate", "1M",
                                 f"{srv.url}/files/big.log"], stdout=subprocess.PIPE)
        assert slow.stdout is not None
        first = slow.stdout.read(100_000)  # the response is under way
        # Replaced here by a PUT of as many bytes: a read past the old offsets would find
        # new bytes there, so only the rewrite tells the response to stop.
        (tmp_path / "new.log").write_bytes(old.replace(b"old", b"NEW"))
        res = curl("-T", str(tmp_path / "new.log"), "-H", "Authorization: Bearer w-secret-456",
                   f"{srv.url}/files/big.log")
        assert json.loads(res.stdout)["size"] == len(old)
        rest = slow.stdout.read()  # (communicate would skip what the reader buffered)
        slow.wait(60)
    got = first + rest
    assert slow.returncode == 18 and len(got) < len(old)
    bad = next((i for i, (x, y) in enumerate(zip(got, old, strict=False)) if x != y), None)
    assert bad is None, (bad, got[bad - 40 : bad + 40] if bad else b"")
