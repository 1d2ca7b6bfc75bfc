"""Credentials and endpoints: which account, key, SAS or connection string a store uses
(`resolve_access`), from the URL, options and environment.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from blobfs.config import StoreConfig
from blobfs.errors import (
    UsageError,
)

log = logging.getLogger(__name__)

_DEV_ACCOUNT = "devstoreaccount1"
# Azurite's published development key (`UseDevelopmentStorage=true`); not a secret.
_DEV_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


# --- credentials -------------------------------------------------------------------------
@dataclass(frozen=True)
class _Access:
    account_url: str
    credential: Any
    #: Values that must never be shown: keys, SAS tokens, the connection string.
    secrets: tuple[str, ...] = ()
    source: str = "anonymous"


def _parse_connection_string(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in text.split(";"):
        name, eq, value = part.strip().partition("=")
        if eq:
            out[name.strip().lower()] = value.strip()
    return out


def _with_account(endpoint: str, account: str | None) -> str:
    """Add the account path to a bare IP/localhost endpoint (Azurite's path-style URLs)."""
    parts = urlsplit(endpoint)
    if not account or parts.path.strip("/"):
        return endpoint.rstrip("/")
    host = parts.hostname or ""
    try:
        ipaddress.ip_address(host)
        path_style = True
    except ValueError:
        path_style = host == "localhost"
    if not path_style:
        return endpoint.rstrip("/")
    return urlunsplit((parts.scheme, parts.netloc, f"/{account}", "", ""))


def resolve_access(cfg: StoreConfig, environ: Mapping[str, str]) -> _Access:
    """Pick the endpoint and credential from options and the environment (semantics §1).

    Order: AZURE_STORAGE_CONNECTION_STRING; account (`-o account=` or AZURE_STORAGE_ACCOUNT)
    with AZURE_STORAGE_KEY, else AZURE_STORAGE_SAS_TOKEN, else azure-identity's
    DefaultAzureCredential when installed, else anonymous access. `-o endpoint=` overrides
    the endpoint in every case. Builds objects only; no network traffic.

    Raises:
        UsageError: neither an account nor an endpoint can be determined.
    """
    conn = environ.get("AZURE_STORAGE_CONNECTION_STRING", "").strip()
    if conn:
        parts = _parse_connection_string(conn)
        if parts.get("usedevelopmentstorage", "").lower() == "true":
            parts = {
                "accountname": _DEV_ACCOUNT,
                "accountkey": _DEV_KEY,
                "blobendpoint": f"http://127.0.0.1:10000/{_DEV_ACCOUNT}",
            }
        account = cfg.account or parts.get("accountname")
        endpoint = cfg.endpoint or parts.get("blobendpoint")
        if not endpoint:
            if not account:
                raise UsageError(
                    "AZURE_STORAGE_CONNECTION_STRING names neither AccountName nor "
                    "BlobEndpoint: fix it or pass -o account=NAME"
                )
            protocol = parts.get("defaultendpointsprotocol", "https")
            suffix = parts.get("endpointsuffix", "core.windows.net")
            endpoint = f"{protocol}://{account}.blob.{suffix}"
        key = parts.get("accountkey")
        sas = parts.get("sharedaccesssignature", "").lstrip("?")
        credential: Any = None
        if key and account:
            credential = {"account_name": account, "account_key": key}
        elif sas:
            credential = sas
        return _Access(
            _with_account(endpoint, account),
            credential,
            tuple(s for s in (conn, key, sas) if s),
            "connection string",
        )

    account = cfg.account or environ.get("AZURE_STORAGE_ACCOUNT")
    if not account and not cfg.endpoint:
        raise UsageError(
            "az:// needs an account: set AZURE_STORAGE_CONNECTION_STRING, or "
            "-o account=NAME (or AZURE_STORAGE_ACCOUNT) with a key, SAS token or identity"
        )
    endpoint = cfg.endpoint or f"https://{account}.blob.core.windows.net"
    endpoint = _with_account(endpoint, account)
    key = environ.get("AZURE_STORAGE_KEY", "").strip()
    sas = environ.get("AZURE_STORAGE_SAS_TOKEN", "").strip().lstrip("?")
    if key:
        if not account:
            raise UsageError("AZURE_STORAGE_KEY needs an account name: -o account=NAME")
        return _Access(
            endpoint, {"account_name": account, "account_key": key}, (key,), "account key"
        )
    if sas:
        return _Access(endpoint, sas, (sas,), "SAS token")
    try:
        from azure.identity import DefaultAzureCredential
    except ImportError:
        return _Access(endpoint, None, (), "anonymous")
    return _Access(endpoint, DefaultAzureCredential(), (), "azure-identity")


def _display_url(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
