"""The pure parts of the Azure store: the block layout (merge plan and the block-count
bound) and credential resolution. No server; the wire behaviour against Azurite is in
tests/contract/test_azure_store.py.
"""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from blobfs.config import StoreConfig
from blobfs.errors import UsageError
from blobfs.log import redact
from blobfs.store.azure.credentials import resolve_access
from blobfs.store.azure.layout import ladder_suffix, max_committed_blocks, plan_merges
from tests.support import azure_env

KiB = 1 << 10
SMALL_BLOCK = 64 * KiB


# --- the block-count bound --------------------------------------------------------------------
def simulate_appends(sizes: list[int], block_size: int) -> tuple[list[int], int]:
    """Block sizes after appending `sizes` one commit at a time, and bytes re-uploaded."""
    blocks: list[int] = []
    reuploaded = 0
    for size in sizes:
        ladder = ladder_suffix(blocks, block_size)
        pieces = blocks + [size]
        open_ = [len(blocks) - ladder <= i < len(blocks) for i in range(len(blocks))]
        open_.append(size < block_size)
        groups = plan_merges(pieces, open_, block_size)
        new_blocks = []
        for start, end in groups:
            total = sum(pieces[start:end])
            if end - start > 1:
                reuploaded += total - size if end == len(pieces) else total
            new_blocks.append(total)
        blocks = new_blocks
    return blocks, reuploaded


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 3 * SMALL_BLOCK), min_size=1, max_size=400))
# Edges pinned so every run has them (no failure of this test has been recorded): the
# longest run of 1-byte appends; blocks that straddle the block size; all large appends.
@example([1] * 400)
@example([SMALL_BLOCK - 1, 1, SMALL_BLOCK, SMALL_BLOCK + 1] * 50)
@example([3 * SMALL_BLOCK] * 400)
def test_merge_plan_bounds_blocks_and_reupload(sizes: list[int]) -> None:
    blocks, reuploaded = simulate_appends(sizes, SMALL_BLOCK)
    total = sum(sizes)
    assert sum(blocks) == total
    assert len(blocks) <= max_committed_blocks(total, SMALL_BLOCK)
    assert len(blocks) <= total // SMALL_BLOCK + 17
    # Amortised O(log block_size) re-upload per appended byte (plus one fold per full block).
    assert reuploaded <= (SMALL_BLOCK.bit_length() * 2 + 3) * total


def test_merge_plan_leaves_another_tools_layout_alone() -> None:
    # 4 MiB blocks written by another tool are all "small" at 8 MiB, but only the valid
    # ladder at the end may absorb new bytes: nothing of the old layout is uploaded again.
    four_mib_blocks = [4 << 20] * 100
    assert ladder_suffix(four_mib_blocks, 8 << 20) == 1
    pieces = four_mib_blocks + [10]
    open_ = [False] * 99 + [True, True]
    assert plan_merges(pieces, open_, 8 << 20) == [(i, i + 1) for i in range(101)]
    pieces = four_mib_blocks + [3 << 20]
    assert plan_merges(pieces, open_, 8 << 20)[-1] == (99, 101)


# --- credentials (pure) ---------------------------------------------------------------------
def test_credentials_are_resolved_from_options_and_environment() -> None:
    cfg = StoreConfig()
    conn = "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=c2VjcmV0a2V5c2VjcmV0;"
    access = resolve_access(cfg, {"AZURE_STORAGE_CONNECTION_STRING": conn})
    assert access.account_url == "https://acct.blob.core.windows.net"
    assert access.credential == {"account_name": "acct", "account_key": "c2VjcmV0a2V5c2VjcmV0"}
    assert "c2VjcmV0a2V5c2VjcmV0" in access.secrets and conn in access.secrets

    dev = resolve_access(cfg, {"AZURE_STORAGE_CONNECTION_STRING": "UseDevelopmentStorage=true"})
    assert dev.account_url == f"http://127.0.0.1:10000/{azure_env.ACCOUNT}"

    keyed = resolve_access(
        StoreConfig(account="acct2", endpoint="http://127.0.0.1:9"),
        {"AZURE_STORAGE_KEY": "a2V5a2V5a2V5"},
    )
    assert keyed.account_url == "http://127.0.0.1:9/acct2"  # path-style for an address
    sas = resolve_access(
        StoreConfig(account="acct3"), {"AZURE_STORAGE_SAS_TOKEN": "?sv=1&sig=c2lnbmF0dXJl"}
    )
    assert sas.credential == "sv=1&sig=c2lnbmF0dXJl"
    assert sas.account_url == "https://acct3.blob.core.windows.net"
    with pytest.raises(UsageError, match="account"):
        resolve_access(cfg, {})
    with pytest.raises(UsageError, match="account"):
        resolve_access(StoreConfig(endpoint="http://127.0.0.1:9"), {"AZURE_STORAGE_KEY": "k" * 12})
    # Without azure-identity installed and no secret: anonymous (public containers).
    anon = resolve_access(StoreConfig(account="pub"), {})
    assert anon.source in ("anonymous", "azure-identity")
    assert (
        redact("x?sv=1&sig=abc%3D&se=2 AccountKey=zzz; key=k3yk3yk3y", ["k3yk3yk3y"])
        == "x?sv=1&sig=<redacted>&se=2 AccountKey=<redacted>; key=<redacted>"
    )
