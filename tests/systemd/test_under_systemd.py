"""blobfs under a real systemd (PID 1 in a booted Debian 12 container, issue 18).

Units come from `scripts/install-units`, run inside as a user would. The template service
(READY once mounted, STATUS, hardening, watchdog, Restart=, LoadCredential=, journal
priorities) and the fstab/mount-unit path (`systemctl stop`, `umount` and poweroff wait for
the final commit). The store is file:///store, a directory of the test's bind-mounted into
the container, so every check of the bytes is made from the host.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import time
from pathlib import Path

from tests.support.nspawn import Container
from tests.support.waiting import wait_for
from tests.systemd.conftest import boot

#: MiB left pending before a stop or poweroff. BLOBFS_NSPAWN_PENDING_MIB=1024 is the
#: issue's 1 GiB measurement (slow: minutes on a loaded machine).
PENDING_MIB = int(os.environ.get("BLOBFS_NSPAWN_PENDING_MIB", "48"))
#: Long enough that nothing commits before the stop: writing 1 GiB through FUSE takes
#: minutes on a loaded 2-core machine.
INTERVAL = 60 if PENDING_MIB <= 256 else 3600


def configure(c: Container, name: str, options: str, dropin: str = "") -> str:
    """/etc/blobfs/NAME.conf for blobfs@NAME (store file:///store/NAME), and a drop-in
    with `dropin`'s [Service] lines."""
    c.run(f"mkdir -p /mnt/{name} /store/{name} && chmod 0755 /store/{name}")
    conf = (f"SOURCE=file:///store/{name}\nMOUNTPOINT=/mnt/{name}\n"
            f"OPTIONS={options},cache_dir=/var/cache/blobfs/{name}\n")
    c.run(f"install -m 0600 /dev/stdin /etc/blobfs/{name}.conf", input=conf.encode())
    # The store is a mount of its own (the bind): at shutdown it must go after blobfs.
    d = f"/etc/systemd/system/blobfs@{name}.service.d"
    c.run(f"mkdir -p {d} && cat > {d}/test.conf && systemctl daemon-reload",
          input=f"[Unit]\nRequiresMountsFor=/store\n[Service]\n{dropin}\n".encode())
    return f"blobfs@{name}.service"


def journal(c: Container, *args: str) -> list[dict[str, str]]:
    out = c.run("journalctl --no-pager -o json " + " ".join(args)).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def write_pending(c: Container, path: str, mib: int) -> str:
    """Write `mib` MiB of random bytes to `path` inside; their sha256."""
    res = c.run(f"head -c {mib}M /dev/urandom | tee {path} | sha256sum", timeout=600)
    return res.stdout.split()[0]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def commits(status: str) -> int:
    m = re.search(r"(\d+) commits", status)
    return int(m.group(1)) if m else -1


def no_tracebacks(entries: list[dict[str, str]]) -> None:
    bad = [e["MESSAGE"] for e in entries
           if "Traceback" in str(e.get("MESSAGE")) or e.get("PRIORITY") in ("0", "1", "2", "3")]
    assert not bad, bad


def test_service_ready_status_hardening_and_modes(container: Container,
                                                  store_root: Path) -> None:
    c = container
    unit = configure(c, "svc", "commit_interval=1")
    c.run(f"systemctl start {unit}")
    # READY=1 only once mounted: the moment `systemctl start` returns, the mount answers.
    src, fstype = c.run("findmnt -n -o SOURCE,FSTYPE /mnt/svc && stat -f /mnt/svc >/dev/null"
                        ).stdout.split()
    assert (src, fstype) == ("file:///store/svc", "fuse.blobfs")  # item 2
    assert c.show(unit, "ActiveState") == "active"
    c.run("echo hello > /mnt/svc/a.log && mkdir /mnt/svc/sub && echo x > /mnt/svc/sub/b.log")
    wait_for(lambda: (store_root / "svc" / "sub" / "b.log").exists(), 30, "the commit")
    wait_for(lambda: commits(c.show(unit, "StatusText")) >= 2, 30, "STATUS with the commits")
    # Item 4: UMask=0077 in the unit, yet the store's modes follow the store root (0755).
    assert (store_root / "svc" / "a.log").stat().st_mode & 0o777 == 0o644
    assert (store_root / "svc" / "sub").stat().st_mode & 0o777 == 0o755
    # The unit's hardening is in force on the daemon.
    pid = c.show(unit, "MainPID")
    status = c.run(f"cat /proc/{pid}/status").stdout
    assert re.search(r"NoNewPrivs:\s+1", status) and re.search(r"Seccomp:\s+2", status)
    assert re.search(r"CapBnd:\s+0+2*[0-9a-f]*", status)
    caps = int(re.search(r"CapBnd:\s+([0-9a-f]+)", status).group(1), 16)
    assert caps == (1 << 21) | (1 << 1) | (1 << 2) | (1 << 3), hex(caps)  # SYS_ADMIN DAC* FOWNER
    assert c.show(unit, "DevicePolicy") == "closed"  # and blobfs serves under it
    c.run(f"systemctl stop {unit}")
    entries = journal(c, "-u", unit)
    assert any("unmounted /mnt/svc cleanly" in e["MESSAGE"] for e in entries)
    assert {e["SYSLOG_IDENTIFIER"] for e in entries if e.get("_PID") == pid} == {"blobfs"}
    no_tracebacks([e for e in entries if e.get("_PID") == pid])


def test_watchdog_aborts_a_stopped_daemon_and_systemd_restarts_it(container: Container,
                                                                  store_root: Path) -> None:
    c = container
    unit = configure(c, "wd", "commit_interval=1", "WatchdogSec=5\nRestartSec=1")
    c.run(f"systemctl start {unit}")
    pid = c.show(unit, "MainPID")
    c.run(f"kill -STOP {pid}")
    wait_for(lambda: c.show(unit, "MainPID") not in ("0", pid)
             and c.show(unit, "ActiveState") == "active", 90, "the restart")
    assert int(c.show(unit, "NRestarts")) >= 1
    entries = journal(c, "-u", unit)
    text = "\n".join(str(e.get("MESSAGE")) for e in entries)
    assert "Watchdog timeout" in text, text[-3000:]
    # faulthandler's stacks of the aborted daemon, in the journal under its identifier.
    dump = [e for e in entries if e.get("_PID") == pid and "File " in str(e.get("MESSAGE"))]
    assert dump and all(e["SYSLOG_IDENTIFIER"] == "blobfs" for e in dump), text[-3000:]
    # The new daemon cleared the dead mount and serves.
    c.run("echo back > /mnt/wd/after.log")
    wait_for(lambda: (store_root / "wd" / "after.log").exists(), 30, "a commit after restart")
    c.run(f"systemctl stop {unit}")


def test_kill_9_restart_recovers_the_spool_with_journal_priorities(
        container: Container, store_root: Path) -> None:
    c = container
    unit = configure(c, "k9", "close=async,commit_interval=60", "RestartSec=1")
    c.run(f"systemctl start {unit}")
    pid = c.show(unit, "MainPID")
    digest = write_pending(c, "/mnt/k9/data.bin", 3)
    assert not (store_root / "k9" / "data.bin").exists()  # pending: commit_interval=60
    c.run(f"systemctl kill -s KILL {unit}")
    wait_for(lambda: c.show(unit, "MainPID") not in ("0", pid)
             and c.show(unit, "ActiveState") == "active", 90, "the restart")
    # READY came after recovery: the bytes are in the store, and counted (item 5).
    assert sha256(store_root / "k9" / "data.bin") == digest
    assert commits(c.show(unit, "StatusText")) >= 1, c.show(unit, "StatusText")
    new_pid = c.show(unit, "MainPID")
    entries = [e for e in journal(c, "-u", unit) if e.get("_PID") == new_pid]
    by_text = {e["MESSAGE"]: e for e in entries}
    cleared = [e for m, e in by_text.items() if m.startswith("blobfs.mount: clearing a dead")]
    recovered = [e for m, e in by_text.items() if "recovered data.bin" in m]
    assert cleared and cleared[0]["PRIORITY"] == "4", by_text.keys()
    assert recovered and recovered[0]["PRIORITY"] == "6", by_text.keys()
    assert {e["SYSLOG_IDENTIFIER"] for e in entries} == {"blobfs"}
    no_tracebacks(entries)
    c.run(f"systemctl stop {unit}")


def test_load_credential_keeps_the_secret_out_of_the_journal(container: Container) -> None:
    c = container
    secret = "bfs" + secrets.token_hex(16)
    c.run("install -m 0600 /dev/stdin /etc/blobfs/cred.secret", input=secret.encode())
    unit = configure(c, "cred", "commit_interval=1",
                     "LoadCredential=AWS_SECRET_ACCESS_KEY:/etc/blobfs/cred.secret")
    c.run(f"systemctl start {unit}")
    # blobfs exported it from $CREDENTIALS_DIRECTORY...
    used = [e for e in journal(c, "-u", unit)
            if "using systemd credentials AWS_SECRET_ACCESS_KEY" in str(e.get("MESSAGE"))]
    assert used and used[0]["SYSLOG_IDENTIFIER"] == "blobfs"
    c.run("echo x > /mnt/cred/a.log && sync")
    c.run(f"systemctl stop {unit}")
    # ...and it is nowhere in the journal (every field of every entry), nor in the unit.
    assert secret not in c.run("journalctl --no-pager -o export").stdout
    assert secret not in c.run(f"systemctl show {unit}").stdout


def test_mount_unit_stop_and_umount_wait_for_the_final_commit(container: Container,
                                                              store_root: Path) -> None:
    c = container
    c.run("mkdir -p /mnt/fst /store/fst")
    c.run("cat >> /etc/fstab", input=(
        b"file:///store/fst /mnt/fst fuse.blobfs _netdev,nofail,close=async,"
        b"commit_interval=%d," % INTERVAL +
        b"cache_dir=/var/cache/blobfs/fst,x-systemd.mount-timeout=330,"
        b"x-systemd.requires-mounts-for=/store 0 0\n"))
    c.run("systemctl daemon-reload && systemctl start mnt-fst.mount")
    assert c.show("mnt-fst.mount", "What") == "file:///store/fst"  # item 2
    digest = write_pending(c, "/mnt/fst/stop.bin", PENDING_MIB)
    assert not (store_root / "fst" / "stop.bin").exists()
    start = time.monotonic()
    c.run("systemctl stop mnt-fst.mount", timeout=900)
    took = time.monotonic() - start
    # Checked at once: `systemctl stop` returned only after the final commit.
    assert sha256(store_root / "fst" / "stop.bin") == digest
    print(f"systemctl stop with {PENDING_MIB} MiB pending: {took:.1f}s")
    entries = journal(c, "_SYSTEMD_UNIT=mnt-fst.mount")
    assert any("unmounted /mnt/fst cleanly" in e["MESSAGE"] for e in entries)
    daemon = [e for e in entries if str(e.get("MESSAGE")).startswith("blobfs.mount: ")]
    assert daemon and {e["SYSLOG_IDENTIFIER"] for e in daemon} == {"blobfs"}  # item 3
    no_tracebacks(daemon)
    assert "remains running after unit stopped" not in c.run(
        "journalctl --no-pager -u mnt-fst.mount").stdout

    # Plain umount(8) of the same fstab mount waits too.
    c.run("mount /mnt/fst")
    digest = write_pending(c, "/mnt/fst/umount.bin", 8)
    c.run("umount /mnt/fst", timeout=600)
    assert sha256(store_root / "fst" / "umount.bin") == digest


def test_poweroff_commits_what_is_pending(tmp_path: Path, blobfs_wheel: Path) -> None:
    """Poweroff with data pending in an fstab mount and in blobfs@: both commit first."""
    store = tmp_path / "store"
    c = boot(tmp_path / "container", blobfs_wheel, store)
    try:
        unit = configure(c, "off", "close=async,commit_interval=60")
        c.run(f"systemctl start {unit}")
        c.run("mkdir -p /mnt/pwr /store/pwr")
        c.run("cat >> /etc/fstab", input=(
            b"file:///store/pwr /mnt/pwr fuse.blobfs _netdev,close=async,"
            b"commit_interval=%d," % INTERVAL +
            b"cache_dir=/var/cache/blobfs/pwr,x-systemd.mount-timeout=330,"
            b"x-systemd.requires-mounts-for=/store 0 0\n"))
        c.run("systemctl daemon-reload && systemctl start mnt-pwr.mount")
        via_unit = write_pending(c, "/mnt/pwr/poweroff.bin", PENDING_MIB)
        via_service = write_pending(c, "/mnt/off/poweroff.bin", 4)
        assert not (store / "pwr" / "poweroff.bin").exists()
        took = c.poweroff(timeout=900)
        print(f"poweroff with {PENDING_MIB} MiB pending: {took:.1f}s")
        assert sha256(store / "pwr" / "poweroff.bin") == via_unit
        assert sha256(store / "off" / "poweroff.bin") == via_service
        # The journal, read from the host: both daemons said so before the end.
        out = os.popen(f"journalctl --no-pager -D {c.journal_dir()} -o cat").read()
        assert "unmounted /mnt/pwr cleanly" in out and "unmounted /mnt/off cleanly" in out, \
            out[-3000:]
        assert "remains running after unit stopped" not in out
    finally:
        c.close()
