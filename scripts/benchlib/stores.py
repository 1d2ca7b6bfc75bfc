"""The stores the bench runs on, each reached directly or through a counting proxy:
file://, S3 on moto, S3 on Ceph's RADOS Gateway (a real S3 server, `--stores rgw`) and
Azure on Azurite.

A `Backend` knows how blobfs mounts it (source URL, environment, `-o` options), how the
plain SDK reaches it (the ceiling: boto3, azure-storage-blob, or plain file I/O for
file://) and how to seed, size and delete objects. Every server listens on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from benchlib.common import BenchError, MiB, log

PREFIX = "bench"
#: Parallel requests the SDK ceilings use (boto3's TransferConfig, azure max_concurrency).
SDK_CONCURRENCY = 8


class Backend:
    kind = ""
    #: Whether requests cross a (loopback) network, so a proxy can count them.
    network = True

    def source(self) -> str:
        raise NotImplementedError

    def mount_env(self, endpoint: str | None = None) -> dict[str, str]:
        return {}

    def mount_options(self, endpoint: str | None = None) -> list[str]:
        return []

    def upstream(self) -> str:
        """http://127.0.0.1:PORT of the server (what a proxy forwards to)."""
        raise NotImplementedError

    def proxy_endpoint(self, proxy_url: str) -> str:
        """The endpoint a client uses to reach this store through a proxy at `proxy_url`."""
        return proxy_url

    def key(self, name: str) -> str:
        return f"{PREFIX}/{name}"

    # --- SDK operations (blocking) -------------------------------------------------------
    def size(self, name: str) -> int | None:
        raise NotImplementedError

    def upload(self, src: Path, name: str) -> None:
        """The SDK's own upload of a file (the ceiling)."""
        raise NotImplementedError

    def download(self, name: str, sink: Path) -> int:
        """The SDK's own ranged, parallel download (the ceiling); bytes received."""
        raise NotImplementedError

    def put(self, name: str, src: Path) -> None:
        """Seed an object (setup, not measured)."""
        self.upload(src, name)

    def delete(self, name: str) -> None:
        raise NotImplementedError

    def wait_size(self, name: str, size: int, timeout: float, settle: float = 30.0) -> float:
        """Wait until the object has `size` bytes in the store; seconds waited.

        Gives up after `timeout`, or once a wrong size has not changed for `settle` s.
        """
        t0 = time.monotonic()
        last, since = None, t0
        while True:
            got = self.size(name)
            now = time.monotonic()
            if got == size:
                return now - t0
            if got != last:
                last, since = got, now
            if now - t0 > timeout or (got is not None and now - since > settle):
                diff = "" if got is None else f", {got - size:+d} bytes"
                raise BenchError(f"the store holds {got} bytes of {name} after "
                                 f"{now - t0:.0f}s, expected {size}{diff}")
            time.sleep(0.05)


class FileBackend(Backend):
    kind = "file"
    network = False

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / PREFIX).mkdir(parents=True, exist_ok=True)

    def source(self) -> str:
        return f"file://{self.root / PREFIX}"

    def path(self, name: str) -> Path:
        return self.root / PREFIX / name

    def size(self, name: str) -> int | None:
        try:
            return self.path(name).stat().st_size
        except FileNotFoundError:
            return None

    def upload(self, src: Path, name: str) -> None:
        # The raw disk: 1 MiB writes, fsync, close (what blobfs's commit also ends with).
        with open(src, "rb") as fin, open(self.path(name), "wb") as fout:
            while chunk := fin.read(MiB):
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())

    def download(self, name: str, sink: Path) -> int:
        total = 0
        with open(self.path(name), "rb", buffering=0) as f:
            buf = bytearray(MiB)
            while n := f.readinto(buf):
                total += n
        return total

    def put(self, name: str, src: Path) -> None:
        shutil.copyfile(src, self.path(name))

    def delete(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)


class S3Backend(Backend):
    kind = "s3"

    def __init__(self, server: Any, bucket: str) -> None:
        from tests.support.s3_env import FAKE_AWS_ENV

        self.server = server
        self.bucket = bucket
        self.fake_env = {k: v for k, v in FAKE_AWS_ENV.items() if v}
        self.client = self._client(server.url)
        self.client.create_bucket(Bucket=bucket)
        # A directory marker, so tools that insist on an existing prefix (s3fs) mount it.
        self.client.put_object(Bucket=bucket, Key=f"{PREFIX}/", Body=b"")

    @staticmethod
    def _client(url: str) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.session.Session(
            aws_access_key_id="testing", aws_secret_access_key="testing",
            region_name="us-east-1",
        ).client("s3", endpoint_url=url, config=Config(
            s3={"addressing_style": "path"},
            max_pool_connections=SDK_CONCURRENCY * 2,
            # The same settings blobfs uses (S3-compatible servers and trailing checksums).
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"total_max_attempts": 3, "mode": "standard"},
        ))

    def source(self) -> str:
        return f"s3://{self.bucket}/{PREFIX}"

    def upstream(self) -> str:
        return self.server.url

    def mount_env(self, endpoint: str | None = None) -> dict[str, str]:
        return {**self.fake_env, "AWS_ENDPOINT_URL": endpoint or self.server.url}

    def mount_options(self, endpoint: str | None = None) -> list[str]:
        return [f"endpoint={endpoint or self.server.url}"]

    def _transfer(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB,
                              max_concurrency=SDK_CONCURRENCY, use_threads=True)

    def size(self, name: str) -> int | None:
        try:
            return int(self.client.head_object(Bucket=self.bucket,
                                               Key=self.key(name))["ContentLength"])
        except self.client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    def upload(self, src: Path, name: str) -> None:
        self.client.upload_file(str(src), self.bucket, self.key(name), Config=self._transfer())

    def download(self, name: str, sink: Path) -> int:
        self.client.download_file(self.bucket, self.key(name), str(sink),
                                  Config=self._transfer())
        return sink.stat().st_size

    def ranged_get_seconds(self, name: str, size: int = MiB, repeat: int = 3) -> float:
        """Best time of a `size`-byte ranged GET at offset 0 (shows moto's O(object) cost)."""
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter()
            self.client.get_object(Bucket=self.bucket, Key=self.key(name),
                                   Range=f"bytes=0-{size - 1}")["Body"].read()
            best = min(best, time.perf_counter() - t0)
        return best

    def delete(self, name: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key(name))


class RgwBackend(S3Backend):
    """S3 on Ceph RGW (tests/support/rgw_env): unlike moto it does not cap the figures, so
    blobfs's own S3 path shows."""

    kind = "rgw"


class AzBackend(Backend):
    kind = "az"

    def __init__(self, server: Any, container: str) -> None:
        from azure.storage.blob import BlobServiceClient

        from blobfs.store.azure.layout import DEFAULT_API_VERSION

        self.server = server
        self.container = container
        self.service = BlobServiceClient.from_connection_string(
            server.connection_string, api_version=DEFAULT_API_VERSION)
        self.service.create_container(container)
        self.cc = self.service.get_container_client(container)

    def source(self) -> str:
        return f"az://{self.container}/{PREFIX}"

    def upstream(self) -> str:
        parts = urlsplit(self.server.endpoint)
        return f"{parts.scheme}://{parts.netloc}"

    def proxy_endpoint(self, proxy_url: str) -> str:
        return f"{proxy_url}{urlsplit(self.server.endpoint).path}"

    def mount_env(self, endpoint: str | None = None) -> dict[str, str]:
        return {"AZURE_STORAGE_CONNECTION_STRING": self.server.connection_string}

    def mount_options(self, endpoint: str | None = None) -> list[str]:
        return [f"endpoint={endpoint or self.server.endpoint}"]

    def size(self, name: str) -> int | None:
        from azure.core.exceptions import ResourceNotFoundError

        try:
            return int(self.cc.get_blob_client(self.key(name)).get_blob_properties().size)
        except ResourceNotFoundError:
            return None

    def upload(self, src: Path, name: str) -> None:
        with open(src, "rb") as f:
            self.cc.get_blob_client(self.key(name)).upload_blob(
                f, overwrite=True, length=src.stat().st_size, max_concurrency=SDK_CONCURRENCY)

    def download(self, name: str, sink: Path) -> int:
        with open(sink, "wb") as f:
            return int(self.cc.get_blob_client(self.key(name)).download_blob(
                max_concurrency=SDK_CONCURRENCY).readinto(f))

    def container_sas_url(self, endpoint: str | None = None) -> str:
        """A container SAS URL (what rclone 1.60 needs to reach Azurite)."""
        from datetime import UTC, datetime, timedelta

        from azure.storage.blob import ContainerSasPermissions, generate_container_sas
        from tests.support.azure_env import ACCOUNT, ACCOUNT_KEY

        token = generate_container_sas(
            ACCOUNT, self.container, account_key=ACCOUNT_KEY,
            permission=ContainerSasPermissions(read=True, write=True, delete=True, list=True,
                                               add=True, create=True),
            expiry=datetime.now(UTC) + timedelta(hours=6))
        return f"{endpoint or self.server.endpoint}/{self.container}?{token}"

    def delete(self, name: str) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        with contextlib.suppress(ResourceNotFoundError):
            self.cc.get_blob_client(self.key(name)).delete_blob()


@dataclass
class Servers:
    """The running servers of one bench run, with one fresh bucket/container each."""

    backends: dict[str, Backend] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)


@contextmanager
def start(kinds: list[str], work: Path) -> Iterator[Servers]:
    """Start what `kinds` need (moto for s3, Azurite for az) and stop them by PID after."""
    out = Servers()
    with ExitStack() as stack:
        unique = f"{int(time.time())}-{os.getpid()}"
        for kind in kinds:
            if kind == "file":
                out.backends["file"] = FileBackend(work / "file-store")
            elif kind == "s3":
                from tests.support import s3_env

                server = stack.enter_context(s3_env.server(work))
                log(f"moto server on {server.url} (pid {server.proc.pid})")
                out.backends["s3"] = S3Backend(server, f"bench-{unique}")
            elif kind == "rgw":
                from tests.support import rgw_env

                server = stack.enter_context(rgw_env.server(work))
                log(f"Ceph RGW on {server.url} (radosgw pid {server.pid})")
                out.backends["rgw"] = RgwBackend(server, f"bench-{unique}")
            elif kind == "az":
                from tests.support import azure_env

                server = stack.enter_context(azure_env.server(work))
                log(f"Azurite on {server.endpoint} (pid {server.pid})")
                out.backends["az"] = AzBackend(server, f"bench-{unique}")
            else:
                raise BenchError(f"unknown store {kind!r} (file, s3, rgw, az)")
        yield out
