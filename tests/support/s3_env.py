"""S3 for tests: a moto server on 127.0.0.1 and fresh buckets on it.

`server(tmp)` starts `python -m moto.server` on a free port, waits until it answers and
stops exactly that process by PID on exit. `make_env(server, unique)` creates an empty
bucket and returns the `StoreEnv` a mount or an in-test store needs.

Everything here talks to 127.0.0.1 by address, with fake credentials, and makes sure
neither boto3 in this process nor a mount subprocess reads ~/.aws or asks the EC2
instance metadata service for credentials.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.support.envs import ServerProcess, StoreEnv, free_port
from tests.support.proxy import RequestRecord
from tests.support.waiting import http_answers, stop_started, wait_started

START_TIMEOUT = 30.0

#: What every boto3 user in the test session sees: fake keys, a fixed region, no config
#: files, no instance metadata service.
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_PROFILE": "",
}


class MotoServer(ServerProcess):
    """A running moto server."""

    def client(self) -> Any:
        """A plain boto3 client for test setup and inspection (not the store under test)."""
        return s3_client(self.url)


def s3_client(url: str) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.session.Session(
        aws_access_key_id=FAKE_AWS_ENV["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=FAKE_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        region_name=FAKE_AWS_ENV["AWS_DEFAULT_REGION"],
    ).client(
        "s3",
        endpoint_url=url,
        config=Config(s3={"addressing_style": "path"},
                      retries={"total_max_attempts": 1, "mode": "standard"},
                      request_checksum_calculation="when_required",
                      response_checksum_validation="when_required"),
    )


def _apply_fake_env() -> dict[str, str | None]:
    """Put FAKE_AWS_ENV into os.environ; return what to restore."""
    saved = {k: os.environ.get(k) for k in FAKE_AWS_ENV}
    for k, v in FAKE_AWS_ENV.items():
        if v:
            os.environ[k] = v
        else:
            os.environ.pop(k, None)
    return saved


def _restore_env(saved: Mapping[str, str | None]) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@contextmanager
def server(tmp: Path, *, auth: bool = False) -> Iterator[MotoServer]:
    """Run a moto S3 server on 127.0.0.1 until the block ends.

    Args:
        tmp: where the server's log goes.
        auth: enforce request authentication, so the fake keys are rejected with
            InvalidAccessKeyId (for testing bad credentials).

    Raises:
        RuntimeError: the server did not answer within START_TIMEOUT.
    """
    saved = _apply_fake_env()
    port = free_port()
    log_path = tmp / f"moto-{port}.log"
    env = {**os.environ, **{k: v for k, v in FAKE_AWS_ENV.items() if v}}
    if auth:
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
        )
    srv = MotoServer(f"http://127.0.0.1:{port}", port, proc, log_path)
    try:
        wait_started(proc, lambda: http_answers(port, "/moto-api/"), "moto", START_TIMEOUT,
                     srv.log)
        yield srv
    finally:
        stop_started(proc)
        _restore_env(saved)


def bucket_name(unique: str) -> str:
    """A valid bucket name (3-63 of [a-z0-9-], starting and ending alphanumeric)."""
    name = re.sub(r"[^a-z0-9-]", "-", f"blobfs-{unique}".lower()).strip("-")
    return name[:63].rstrip("-")


def env_for(url: str, bucket: str, endpoint: str, prefix: str = "pfx") -> StoreEnv:
    """The StoreEnv of `bucket` reached through `endpoint` (moto itself or a proxy)."""
    source = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    env = {k: v for k, v in FAKE_AWS_ENV.items() if v}
    env["AWS_ENDPOINT_URL"] = endpoint
    return StoreEnv("s3", source, env=env, options=[f"endpoint={endpoint}"],
                    endpoint=endpoint)


def make_env(server: MotoServer, unique: str) -> StoreEnv:
    """Create a fresh bucket on `server`; the env mounts its prefix `pfx/`."""
    bucket = bucket_name(unique)
    server.client().create_bucket(Bucket=bucket)
    return env_for(server.url, bucket, server.url)


def s3_operation(rec: RequestRecord) -> str:
    """The S3 API operation a proxied request was (path-style addressing)."""
    parts = urlsplit(rec.target)
    query = parse_qs(parts.query, keep_blank_values=True)
    on_bucket = parts.path.strip("/").count("/") == 0
    copy = "x-amz-copy-source" in rec.headers
    if rec.method == "HEAD":
        return "HeadBucket" if on_bucket else "HeadObject"
    if rec.method == "GET":
        if "uploads" in query:
            return "ListMultipartUploads"
        if "uploadId" in query:
            return "ListParts"
        return "ListObjectsV2" if on_bucket else "GetObject"
    if rec.method == "PUT":
        if "uploadId" in query:
            return "UploadPartCopy" if copy else "UploadPart"
        if on_bucket:
            return "CreateBucket"
        return "CopyObject" if copy else "PutObject"
    if rec.method == "POST":
        if "uploads" in query:
            return "CreateMultipartUpload"
        if "uploadId" in query:
            return "CompleteMultipartUpload"
        return "DeleteObjects" if "delete" in query else "POST"
    if rec.method == "DELETE":
        if "uploadId" in query:
            return "AbortMultipartUpload"
        return "DeleteBucket" if on_bucket else "DeleteObject"
    return rec.method


def bucket_of(env: StoreEnv) -> str:
    return env.url.removeprefix("s3://").split("/")[0]


def via(env: StoreEnv, proxy_url: str) -> StoreEnv:
    """The same bucket reached through a proxy (or any other endpoint)."""
    return env_for(proxy_url, bucket_of(env), proxy_url)
