"""HTTPS with a certificate the test makes (trustme), and `-o http=` on a real mount:
the HTTP face shows bytes written through the mount before they are committed, and a
follower ends when the mount's last writer closes the file."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
import trustme

from tests.support.envs import StoreEnv, free_port
from tests.support.http_serve import healthy, served
from tests.support.mounting import mounted
from tests.support.waiting import wait_for


def test_tls_with_a_made_certificate(file_env: StoreEnv, tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    (tmp_path / "read.tok").write_text("tls-token")
    root = Path(file_env.url.removeprefix("file://"))
    (root / "secure.log").write_text("over tls\n")
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    with served(file_env, tmp_path, f"http_cert={tmp_path / 'server.pem'}",
                f"http_key={tmp_path / 'server.key'}",
                f"http_read_token_file={tmp_path / 'read.tok'}", tls=client_ctx) as srv:
        assert srv.url.startswith("https://")
        res = subprocess.run(["curl", "-sS", "--noproxy", "*", "--cacert",
                              str(tmp_path / "ca.pem"), "-H", "Authorization: Bearer tls-token",
                              f"{srv.url}/files/secure.log"], capture_output=True, check=False)
        assert res.returncode == 0 and res.stdout == b"over tls\n", res.stderr
        with httpx.Client(verify=client_ctx, trust_env=False) as client:
            r = client.get(f"{srv.url}/files/secure.log", params={"token": "tls-token"},
                           headers={"Range": "bytes=5-"})
            assert (r.status_code, r.content) == (206, b"tls\n")
            assert client.get(f"{srv.url}/files/secure.log").status_code == 401
        # An untrusting client and a plain-HTTP client both fail; the server lives on.
        res = subprocess.run(["curl", "-sS", "--noproxy", "*", f"{srv.url}/healthz"],
                             capture_output=True, check=False)
        assert res.returncode == 60  # peer certificate cannot be authenticated
        plain = srv.url.replace("https://", "http://")
        res = subprocess.run(["curl", "-sS", "--noproxy", "*", "-m", "5", f"{plain}/healthz"],
                             capture_output=True, check=False)
        assert res.returncode != 0
        assert healthy("127.0.0.1", srv.port, client_ctx)
    # Half a pair is refused at start, in one line.
    res = subprocess.run([sys.executable, "-m", "blobfs", "serve", file_env.url, "--listen",
                          "127.0.0.1:1", "-o", f"http_cert={tmp_path / 'server.pem'}"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 2 and "http_cert and http_key go together" in res.stderr


@pytest.mark.fuse
@pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="needs /dev/fuse")
def test_mount_serves_its_own_view(file_env: StoreEnv, tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with mounted(file_env, tmp_path, f"http=127.0.0.1:{port}", "commit_interval=30",
                 "metadata_ttl=0.2", args=("--debug",)) as m:
        wait_for(lambda: healthy("127.0.0.1", port), 10, "the HTTP face")
        with httpx.Client(trust_env=False, timeout=30) as client:
            f = open(m.path / "app.log", "w")  # noqa: SIM115 - held open on purpose
            f.write("first line\n")
            f.flush()
            # Not committed (commit_interval is long, the file is open), yet served.
            r = client.get(f"{base}/files/app.log")
            assert (r.status_code, r.text) == (200, "first line\n")
            assert r.headers["etag"].startswith("W/")  # pending bytes: a weak validator
            got: list[str] = []
            ended: list[bool] = []

            def follow() -> None:
                with client.stream("GET", f"{base}/files/app.log?follow=1&idle=60") as resp:
                    for text in resp.iter_text():
                        got.append(text)
                ended.append(True)

            follower = threading.Thread(target=follow)
            follower.start()
            wait_for(lambda: "".join(got) == "first line\n", 10, "what exists")
            f.write("second line\n")
            f.flush()
            wait_for(lambda: "".join(got) == "first line\nsecond line\n", 5, "a live line")
            assert not ended
            f.close()  # the last writer on the mount closes it: the follow ends
            follower.join(15)
            assert ended == [True]
            listing = client.get(f"{base}/files/").json()
            assert [(e["name"], e["size"]) for e in listing] == [("app.log", 23)]
