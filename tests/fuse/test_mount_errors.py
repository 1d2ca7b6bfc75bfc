"""The mount-time errors of every cloud store: a missing bucket or container, bad
credentials and an unreachable endpoint each end `blobfs mount` with a one-line error that
names the cause, no traceback and no secret (semantics §5).

One test body; each case builds the broken StoreEnv of its store and says what the line
must name and what it must never show.
"""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import make_store_env
from tests.support import azure_env, s3_env
from tests.support.envs import StoreEnv, free_port
from tests.support.mounting import blobfs_cmd, mount_env


@dataclass(frozen=True)
class BadMount:
    """A mount that must fail at startup."""

    env: StoreEnv
    #: Each must appear in stderr (as written).
    names: tuple[str, ...]
    #: Each must appear in stderr, compared in lower case.
    names_lower: tuple[str, ...] = ()
    #: None may appear in stderr or stdout.
    secrets: tuple[str, ...] = ()


#: A case: (server_for, tmp_path, stack for servers it starts) -> the broken mount.
Case = Callable[[Callable[[str], Any], Path, ExitStack], BadMount]


def s3_missing_bucket(server_for: Callable[[str], Any], tmp: Path, stack: ExitStack) -> BadMount:
    moto = server_for("s3")
    return BadMount(s3_env.env_for(moto.url, "no-such-bucket-anywhere", moto.url),
                    names=("no-such-bucket-anywhere",))


def s3_unreachable(server_for: Callable[[str], Any], tmp: Path, stack: ExitStack) -> BadMount:
    url = f"http://127.0.0.1:{free_port()}"
    return BadMount(s3_env.env_for(url, "some-bucket", url), names=("127.0.0.1",))


def s3_bad_credentials(server_for: Callable[[str], Any], tmp: Path,
                       stack: ExitStack) -> BadMount:
    strict = stack.enter_context(s3_env.server(tmp, auth=True))
    return BadMount(s3_env.env_for(strict.url, "some-bucket", strict.url),
                    names=("denied", "some-bucket"))


def az_env(endpoint: str, url: str, conn: str) -> StoreEnv:
    return StoreEnv("az", url, env={azure_env.ENV_VAR: conn}, options=[f"endpoint={endpoint}"],
                    endpoint=endpoint)


def az_missing_container(server_for: Callable[[str], Any], tmp: Path,
                         stack: ExitStack) -> BadMount:
    azurite = server_for("az")
    env = az_env(azurite.endpoint, "az://no-such-container-here/x", azurite.connection_string)
    return BadMount(env, names=("no-such-container-here",), secrets=(azure_env.ACCOUNT_KEY,))


def az_unreachable(server_for: Callable[[str], Any], tmp: Path, stack: ExitStack) -> BadMount:
    azurite = server_for("az")
    endpoint = f"http://127.0.0.1:{free_port()}/{azure_env.ACCOUNT}"
    return BadMount(az_env(endpoint, "az://somewhere/x", azurite.connection_string),
                    names=("127.0.0.1",))


def az_bad_key(server_for: Callable[[str], Any], tmp: Path, stack: ExitStack) -> BadMount:
    good = make_store_env(server_for, "az")
    bad_key = base64.b64encode(b"definitely not the key" * 3).decode()
    assert good.endpoint is not None
    conn = azure_env.connection_string(server_for("az").endpoint, key=bad_key)
    container = good.url.removeprefix("az://").split("/")[0]
    return BadMount(az_env(good.endpoint, good.url, conn), names=(container,),
                    names_lower=("denied",), secrets=(bad_key,))


CASES: dict[str, Case] = {
    "s3-missing-bucket": s3_missing_bucket,
    "s3-unreachable-endpoint": s3_unreachable,
    "s3-bad-credentials": s3_bad_credentials,
    "az-missing-container": az_missing_container,
    "az-unreachable-endpoint": az_unreachable,
    "az-bad-key": az_bad_key,
}


@pytest.fixture(params=list(CASES))
def bad_mount(request: pytest.FixtureRequest, server_for: Callable[[str], Any],
              tmp_path: Path) -> Iterator[BadMount]:
    with ExitStack() as stack:
        yield CASES[request.param](server_for, tmp_path, stack)


def test_mount_error_is_one_line_naming_the_cause(bad_mount: BadMount, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir(exist_ok=True)
    env = bad_mount.env
    cmd = blobfs_cmd("mount", env.url, str(mnt), "-f", "-o",
                     ",".join([f"cache_dir={tmp_path / 'cache'}", *env.options]))
    result = subprocess.run(cmd, env=mount_env(env), capture_output=True, text=True,
                            timeout=120)
    out = result.stderr + result.stdout
    assert result.returncode != 0
    for name in bad_mount.names:
        assert name in result.stderr, (name, result.stderr)
    for name in bad_mount.names_lower:
        assert name in result.stderr.lower(), (name, result.stderr)
    for secret in bad_mount.secrets:
        assert secret not in out
    assert "Traceback" not in out
