"""scripts/bench: the figures users compare (throughput, append cost, tail -f latency,
mount time, memory) for blobfs and, with --peers, s3fs and rclone, on file://, a moto S3
server and Azurite, all on 127.0.0.1.

A dev tool beside the project: `src/` never imports it. It reuses the test support code
(`tests.support`: the moto and Azurite servers, the counting proxy), so it runs from the
repository root with that root on `sys.path` (the `scripts/bench` wrapper sees to it).
"""
