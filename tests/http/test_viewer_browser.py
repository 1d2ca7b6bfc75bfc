"""The live viewer page (/view/KEY) in headless Chromium: lines appended after the page
loaded appear within 2 s, the line count follows, and the page says clearly when the log
ended or was replaced. Chromium comes from `scripts/bootstrap --http`."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from tests.support.chromium import Browser
from tests.support.envs import StoreEnv
from tests.support.http_serve import StreamingPut, served
from tests.support.waiting import wait_for

#: Where the screenshot goes for a person to look at (outside the repository).
SHOT = os.environ.get("BLOBFS_VIEWER_SHOT")


def test_viewer_follows_live_in_chromium(file_env: StoreEnv, tmp_path: Path) -> None:
    root = Path(file_env.url.removeprefix("file://"))
    (root / "other.log").write_text("old content\n")
    (tmp_path / "r.tok").write_text("view-token")
    (tmp_path / "w.tok").write_text("write-token")
    with served(file_env, tmp_path, f"http_read_token_file={tmp_path / 'r.tok'}",
                f"http_write_token_file={tmp_path / 'w.tok'}") as srv:
        put = StreamingPut(srv.port, "app/live.log", "write-token")
        put.send(b"".join(b"boot line %d\n" % i for i in range(3)))
        browser = Browser(tmp_path / "profile")
        try:
            page = browser.open(f"{srv.url}/view/app/live.log?token=view-token")
            other = browser.open(f"{srv.url}/view/other.log?token=view-token")

            def text(session: str, element: str) -> str:
                return browser.evaluate(
                    session, f"document.getElementById('{element}').textContent") or ""

            wait_for(lambda: "boot line 2" in text(page, "log"), 30, "the page loaded")
            wait_for(lambda: "old content" in text(other, "log"), 30, "the other page")
            for i in range(3):
                line = b"appended after load %d\n" % i
                sent = time.monotonic()
                put.send(line)
                wait_for(lambda line=line: line.decode().strip() in text(page, "log"), 2.0,
                         f"line {i} shown within 2 s")
                print(f"line {i} shown after {(time.monotonic() - sent) * 1000:.0f} ms")
            assert text(page, "lines") == "6 lines"
            assert text(page, "state") == "following"
            # The log is replaced: that page says so and shows nothing of the new content.
            res = subprocess.run(["curl", "-sS", "--noproxy", "*", "-T", "-", "-H",
                                  "Authorization: Bearer write-token",
                                  f"{srv.url}/files/other.log"], input=b"NEW\n",
                                 capture_output=True, check=True)
            assert res.returncode == 0
            wait_for(lambda: "replaced" in text(other, "state"), 10, "the replaced message")
            assert "NEW" not in text(other, "log")
            # The PUT ends: the log is finished, and the page says it ended.
            assert put.finish()[0] == 201
            wait_for(lambda: "ended" in text(page, "state"), 10, "the ended message")
            browser.screenshot(page, Path(SHOT) if SHOT else tmp_path / "viewer.png")
            # Everything came from the server itself: no external assets.
            hosts = browser.evaluate(page, "performance.getEntriesByType('resource')"
                                     ".map(e => new URL(e.name).host)")
            assert set(hosts) <= {f"127.0.0.1:{srv.port}"}
        finally:
            browser.close()
