"""`file:///DIR`: a local directory with the same blob semantics as the clouds.

Keys are paths under DIR; "a/" markers are directories. Each commit writes the new version
aside in DIR/.blobfs/tmp, fsyncs it and renames it over the key under an inter-process
lock, so a reader never sees a partial version and two mounts of one directory get the
same conditional-commit semantics as S3 or Azure. ETags combine a random token kept in an
xattr with the inode, mtime and size, so edits made by other tools change them too.

Every path is opened beneath the source directory without following links
(`blobfs.store.beneath`): others may be able to write the source, and a planted link must
not let the mount read or replace a file outside it. Symbolic links in the source are
neither listed nor followed; a key whose path meets one does not exist.

The package's parts: files.py (blocking primitives: ETags, xattrs, temp versions,
copies), publish.py (key paths, the store lock, conditional rename and in-place append
with its crash undo), upload.py (LocalUpload, directory markers), store.py (LocalStore).
It must not know about FUSE or the core's data structures.
"""

from blobfs.store.local.files import classify
from blobfs.store.local.store import LocalStore, open_local
from blobfs.store.local.upload import LocalUpload

__all__ = ["LocalStore", "LocalUpload", "classify", "open_local"]
