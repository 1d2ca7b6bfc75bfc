"""The FUSE-agnostic filesystem core: inodes, handles, reads, writes.

Nothing in this package imports pyfuse3, an SDK or HTTP types.
"""
