"""`s3://BUCKET[/PREFIX]`: the S3 adapter (boto3), for AWS and S3-compatible servers.

This package owns the boto3 client, the translation of every S3/botocore failure into
`blobfs.errors`, and the multipart layout planner that turns a commit (semantics §2) into S3
requests: one conditional `PutObject` below 5 MiB, otherwise a multipart upload that copies
unchanged base ranges server-side (`UploadPartCopy`), uploads only new bytes
(`UploadPart`), and publishes them atomically with a conditional
`CompleteMultipartUpload`. Keys handed to and returned by `S3Store` are relative to the
source's PREFIX.

It must not know about FUSE, inodes, handles or the spool; the only thing it reads from
the core is `PendingSource.read_pending`. Every SDK call runs in a worker thread through
`store._blocking.Blocking`, which also owns retries: botocore's own retries are off.

S3-compatible servers differ (docs/server-compatibility.md has the table); this module
copes by what a server does, never by its name:
- Conditions not enforced: moto 5.2.5 and Ceph RGW 16.2 ignore `If-Match` on
  `CompleteMultipartUpload` (RGW also `If-None-Match`) and `x-amz-copy-source-if-match`
  on `UploadPartCopy` and `CopyObject`. The real conditions are always sent (S3 enforces
  them atomically); in addition a large commit does a HEAD of the base (or, for a new
  key, of its absence) right before Complete, and `copy` a conditional HEAD of the
  source. Those checks are not atomic: on such a server a writer that slips in between
  HEAD and Complete still loses its update. The tests enforce the real conditions with a
  proxy in front of moto (`tests/support/proxy.py: S3Conditions`).
- If-Match spelling on PutObject: RGW refuses the quoted ETag (its own HEAD's form) with
  412 and accepts it unquoted. A 412 whose HEAD shows the base unchanged is the server
  refusing our spelling, not a conflict: the put is sent once more with the other
  spelling, which the store then keeps (`S3Store.if_match_unquoted`). It never loops.
- ETag forms: RGW answers CompleteMultipartUpload with an empty ETag and CopyObject with
  an unquoted one. ETags are kept quoted (`_quoted`); a missing one is taken from a HEAD
  that shows our own commit (`_published`).
- Metadata names: RGW turns '_' into '-', so blobfs's names use hyphens and are read in
  either spelling (`blobfs.types.metadata_from_store`).
- Listing pages: S3 and RGW return at most 1,000 keys a page, moto more; `list` asks for
  at most 1,000 and follows continuation tokens.
"""

from blobfs.store.s3.store import S3Store, open_s3

__all__ = ["S3Store", "open_s3"]
