"""blobfs: a FUSE filesystem for blob stores, built for data that grows."""

__version__ = "0.1.0"
