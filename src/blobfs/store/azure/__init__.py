"""The Azure Blob Storage adapter: block blobs of one container, under an optional prefix.

This package owns everything Azure: credentials and endpoints, the block-id scheme, how a
new version is assembled from committed blocks plus newly staged ones (semantics §2), the
block-merge ladder that keeps the committed block count bounded, and the translation of
every azure-core / azure-storage exception into `blobfs.errors` (one `classify`). It is
the only package that imports the Azure SDK. It must not know about inodes, handles, FUSE
or trio beyond checkpoints; every SDK call runs in a worker thread via `Blocking`.

Azurite 3.35 with azure-storage-blob 12.31 taught us a few rules; each is pinned by a test
in `tests/contract/test_azure_store.py`:

1. A blob written by one Put Blob (`upload_blob`) has an EMPTY committed block list, so
   "old ids + new ones" would silently drop the old bytes. A layout whose blocks do not add
   up to the blob's size is turned into blocks (from ranged reads) before appending.
2. Put Block List without metadata clears the metadata: every commit sends it.
3. All block ids of a blob have one length (a new blob's are `BLOCK_ID_LENGTH` bytes; an
   existing blob's length is adopted), and an id is never reused: Azurite serves the new
   bytes for an old committed id. Ids are random.
4. The SDK's newest API version is rejected by Azurite: `DEFAULT_API_VERSION` is pinned and
   `StoreConfig.api_version` overrides it.
5. A range starting exactly at the size returns 0 bytes on Azurite and 416 on Azure.
6. A commit discards every other writer's uncommitted blocks: an upload re-stages whatever
   it needs from its `PendingSource` rather than trusting earlier Put Blocks.
7. Azurite has no Put Block From URL (501): merges read the bytes and stage them again.
"""

from blobfs.store.azure.store import AzureStore, open_azure

__all__ = ["AzureStore", "open_azure"]
