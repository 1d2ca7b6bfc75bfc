"""Turn a run's records into docs/bench/results.{json,md,png}.

The markdown has: the machine and versions, one table of every figure (throughputs as
a percentage of the SDK ceiling on the same server), the targets blobfs is held to (met or
missed, read off the table), what caps the figures (the servers' own speed, measured), the
CPU each side used, and the py-spy hot spots when the run was profiled.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path
from typing import Any

from benchlib.common import MiB

STORE_TITLE = {"file": "file://", "s3": "s3:// (moto)", "rgw": "s3:// (Ceph RGW)",
               "az": "az:// (Azurite)"}
SDK_NAME = {"file": "plain file I/O", "s3": "boto3", "rgw": "boto3", "az": "azure-storage-blob"}
ORDER = ["sdk", "blobfs", "s3fs", "rclone", "rclone-writes"]

Records = list[dict[str, Any]]


class Table:
    """Records indexed by (system, store, workload), with footnotes for the failures."""

    def __init__(self, records: Records) -> None:
        self.by = {(r["system"], r["store"], r["workload"]): r for r in records}
        self.notes: list[str] = []
        self._note_ids: dict[str, int] = {}

    def get(self, system: str, store: str, workload: str) -> dict[str, Any] | None:
        rec = self.by.get((system, store, workload))
        return rec.get("figures") if rec and rec.get("status") == "ok" else None

    def note(self, text: str) -> str:
        if text not in self._note_ids:
            self.notes.append(text)
            self._note_ids[text] = len(self.notes)
        return f"[{self._note_ids[text]}]"

    def cell(self, system: str, store: str, workload: str, fmt: Any) -> str:
        rec = self.by.get((system, store, workload))
        if rec is None:
            return "—"
        if rec.get("status") != "ok":
            reason = rec.get("reason", "failed")
            mark = "n/a" if rec.get("status") == "skipped" else "✗"
            return f"{mark} {self.note(f'{system} on {store}, {workload}: {reason}')}"
        try:
            return str(fmt(rec["figures"]))
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            return "?"


def unsupported_map(records: Records) -> dict[str, dict[str, str]]:
    """system -> store -> reason, for systems that cannot mount a store at all."""
    out: dict[str, dict[str, str]] = {}
    for r in records:
        reason = r.get("reason", "")
        if r.get("status") == "skipped" and "budget" not in reason:
            out.setdefault(r["system"], {})[r["store"]] = reason
    return out


def _pct(value: float, ceiling: float | None) -> str:
    return f" ({value / ceiling * 100:.0f} %)" if ceiling else ""


def _bytes(n: float) -> str:
    if abs(n) >= MiB:
        return f"{n / MiB:.1f} MiB"
    if abs(n) >= 10 * 1024:
        return f"{n / 1024:.0f} KiB"
    return f"{n:.0f} B"


def _systems(records: Records) -> list[str]:
    seen = {r["system"] for r in records}
    return [s for s in ORDER if s in seen] + sorted(seen - set(ORDER))


def _stores(records: Records) -> list[str]:
    seen = {r["store"] for r in records}
    return [s for s in ("file", "s3", "rgw", "az") if s in seen]


def main_table(t: Table, records: Records, meta: dict[str, Any]) -> list[str]:
    sizes = meta["sizes"]
    n_app, base = sizes["appends"], sizes["base_mib"]
    head = ["store", "system", f"seq write {sizes['seq_mib']} MiB",
            f"seq read {sizes['seq_mib']} MiB (cold)",
            f"{n_app} open-append-close onto {base} MiB", "uploaded beyond the lines",
            "write requests / append", "tail -f latency p50 / p99", "mount ready",
            "RSS idle", f"RSS, {sizes['writers']} files written at once"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    unsupported = unsupported_map(records)
    for store in _stores(records):
        ceil = t.get("sdk", store, "ceiling") or {}
        for system in _systems(records):
            if system == "sdk":
                if ("sdk", store, "ceiling") not in t.by:
                    continue
                row = [STORE_TITLE[store], f"**SDK ceiling** ({SDK_NAME[store]})",
                       t.cell("sdk", store, "ceiling", lambda f: f"{f['write_mib_s']:.0f} MiB/s"),
                       t.cell("sdk", store, "ceiling", lambda f: f"{f['read_mib_s']:.0f} MiB/s"),
                       "", "", "", "", "", "", ""]
                lines.append("| " + " | ".join(row) + " |")
                continue
            mine = [r for k, r in t.by.items() if k[0] == system and k[1] == store]
            cannot = unsupported.get(system, {}).get(store)
            if not mine or (cannot and all(r.get("reason") == cannot for r in mine)):
                continue  # cannot mount this store at all: one line under the table
            cw, cr = ceil.get("write_mib_s"), ceil.get("read_mib_s")
            net = store != "file"

            def upload(f: dict[str, Any]) -> str:
                if "bytes_up" not in f:
                    return "no network (local disk)"
                text = f"{_bytes(f['bytes_up'] - f['appended_bytes'])} in all"
                if f["write_requests_per_append"] < 0.5:
                    text += " (uploaded after the closes, in a batch)"
                elif "mean_extra_bytes_after_first" in f:
                    text += f"; +{_bytes(f['mean_extra_bytes_after_first'])} per append"
                    if f["first_append_extra_bytes"] > 64 * 1024:
                        text += f" after a first of +{_bytes(f['first_append_extra_bytes'])}"
                return text

            def appends(f: dict[str, Any], system: str = system, store: str = store) -> str:
                text = f"{f['wall_s']:.1f} s ({f['per_append_ms_p50']:.0f} ms p50 each)"
                if f.get("remote_s", 0) > f["wall_s"] + 0.5:
                    text += f"; in the store after {f['remote_s']:.1f} s"
                if f.get("cut_short"):
                    text += " " + t.note(f"{system} on {store}: {f['cut_short']}")
                return text

            def writes(f: dict[str, Any]) -> str:
                if "write_requests_per_append" not in f:
                    return "—"
                return (f"{f['write_requests_per_append']:.2f} (max "
                        f"{f.get('max_write_requests_per_append', '?')}); "
                        f"{f['requests_per_append']:.1f} requests in all")

            def write_cell(f: dict[str, Any], cw: float | None = cw) -> str:
                text = f"{f['mib_s']:.0f} MiB/s{_pct(f['mib_s'], cw)}"
                if f["seconds"] > f["close_seconds"] + 0.5:
                    text += f"; close returned after {f['close_seconds']:.1f} s"
                return text

            row = [
                STORE_TITLE[store], system,
                t.cell(system, store, "write", write_cell),
                t.cell(system, store, "read",
                       lambda f, cr=cr: f"{f['mib_s']:.0f} MiB/s{_pct(f['mib_s'], cr)}"),
                t.cell(system, store, "append", appends),
                t.cell(system, store, "append", upload) if net else "no network (local disk)",
                t.cell(system, store, "append", writes) if net else "—",
                t.cell(system, store, "tail", lambda f: f"{f['p50_s']:.2f} / {f['p99_s']:.2f} s"),
                t.cell(system, store, "ready", lambda f: f"{f['median_s']:.2f} s"),
                t.cell(system, store, "rss", lambda f: f"{f['idle_mib']:.0f} MiB"),
                t.cell(system, store, "rss", lambda f: f"{f['peak_mib']:.0f} MiB"),
            ]
            lines.append("| " + " | ".join(row) + " |")
    return lines


TARGETS = [
    ("sequential write ≥ 85 % of the SDK ceiling", "write"),
    ("sequential read ≥ 85 % of the SDK ceiling", "read"),
    ("an append uploads ≤ its bytes + a small constant (4 KiB) per commit", "append_bytes"),
    ("≤ 4 write requests per commit", "append_writes"),
    ("tail -f p50 ≤ 2 s", "tail"),
    ("idle RSS ≤ 60 MiB", "rss_idle"),
    ("RSS with 100 files written at once ≤ 250 MiB", "rss_peak"),
    ("mount ready ≤ 1 s", "ready"),
    ("nginx access log on the mount ≥ 50 % of local-disk req/s", "nginx"),
]


def judge(t: Table, store: str, what: str) -> tuple[bool | None, str]:
    """(met?, evidence) of one target for blobfs on one store; None when not measured."""
    ceil = t.get("sdk", store, "ceiling") or {}
    if what in ("write", "read"):
        f = t.get("blobfs", store, what)
        c = ceil.get(f"{what}_mib_s")
        if not f or not c:
            return None, "not measured"
        ratio = f["mib_s"] / c
        return ratio >= 0.85, f"{ratio * 100:.0f} % ({f['mib_s']:.0f} of {c:.0f} MiB/s)"
    if what in ("append_bytes", "append_writes"):
        f = t.get("blobfs", store, "append")
        if not f:
            return None, "not measured"
        if "bytes_up" not in f:
            return None, "no network: nothing uploaded"
        if what == "append_bytes":
            over = f["appends_over_4k_extra"]
            text = (f"+{_bytes(f['mean_extra_bytes_after_first'])} mean, "
                    f"+{_bytes(f['max_extra_bytes_after_first'])} max after the first")
            if over:
                text += (f"; {over} of {f['appends']} over, the first +"
                         f"{_bytes(f['first_append_extra_bytes'])}")
            return over == 0, text
        worst = f["max_write_requests_per_append"]
        return worst <= 4, f"max {worst}, mean {f['write_requests_per_append']:.2f}"
    if what == "tail":
        f = t.get("blobfs", store, "tail")
        if not f:
            return None, "not measured"
        return f["p50_s"] <= 2.0, f"p50 {f['p50_s']:.2f} s, p99 {f['p99_s']:.2f} s"
    if what in ("rss_idle", "rss_peak"):
        f = t.get("blobfs", store, "rss")
        if not f:
            return None, "not measured"
        if what == "rss_idle":
            return f["idle_mib"] <= 60, f"{f['idle_mib']:.0f} MiB"
        return f["peak_mib"] <= 250, f"{f['peak_mib']:.0f} MiB"
    if what == "nginx":
        f = t.get("blobfs", store, "nginx")
        if not f:
            return None, "not measured"
        return f["ratio"] >= 0.5, (f"{f['ratio'] * 100:.0f} % ({f['mount_req_s']:,} of "
                                   f"{f['local_req_s']:,} req/s)")
    f = t.get("blobfs", store, "ready")
    if not f:
        return None, "not measured"
    return f["median_s"] <= 1.0, f"{f['median_s']:.2f} s median ({f['max_s']:.2f} max)"


def targets_table(t: Table, records: Records) -> list[str]:
    stores = _stores(records)
    lines = ["| target | " + " | ".join(STORE_TITLE[s] for s in stores) + " |",
             "|---|" + "---|" * len(stores)]
    for label, what in TARGETS:
        cells = []
        for store in stores:
            ok, text = judge(t, store, what)
            mark = "—" if ok is None else ("✅ met" if ok else "❌ missed")
            cells.append(f"{mark}: {text}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def loggers_section(t: Table, records: Records) -> list[str]:
    """nginx's access log and Python logging on the mount vs on local disk (issue 12)."""
    rows = []
    for store in _stores(records):
        for system in _systems(records):
            if (system, store, "nginx") not in t.by and (system, store, "pylog") not in t.by:
                continue
            rows.append("| " + " | ".join([
                STORE_TITLE[store], system,
                t.cell(system, store, "nginx", lambda f: f"{f['mount_req_s']:,}"),
                t.cell(system, store, "nginx", lambda f: f"{f['local_req_s']:,}"),
                t.cell(system, store, "nginx", lambda f: f"**{f['ratio'] * 100:.0f} %**"),
                t.cell(system, store, "nginx", lambda f: f"{f['daemon_us_per_request']} µs"),
                t.cell(system, store, "pylog", lambda f: f"{f['mount_s']} s"),
                t.cell(system, store, "pylog", lambda f: f"{f['local_s']} s"),
                t.cell(system, store, "pylog", lambda f: f"{f['slowdown']}x"),
            ]) + " |")
    if not rows:
        return []
    return [
        "## Loggers on the mount", "",
        "nginx (2 workers, loopback, default `access_log` without `buffer=`) under "
        "`ab -n 20000 -c 20`, its access log on the mount vs on local disk; Python's "
        "`RotatingFileHandler`, 50,000 records. The two sides alternate within one run, "
        "best of 3 each. Target: nginx at >= 50 % of its local-disk req/s.", "",
        "| store | system | nginx req/s, log on mount | log on local disk | ratio "
        "| daemon CPU / request | Python logging, 50,000 records on mount | on local disk "
        "| slowdown |",
        "|---|---|---|---|---|---|---|---|---|", *rows, ""]


def caps_section(t: Table, records: Records) -> list[str]:
    out = []
    s3 = t.get("sdk", "s3", "ceiling")
    if s3:
        out.append(
            f"- **moto caps every S3 figure.** boto3 itself reaches {s3['write_mib_s']:.0f} MiB/s "
            f"up and {s3['read_mib_s']:.0f} MiB/s down (8 parallel 8 MiB parts/ranges), with "
            f"moto busy {s3.get('write_server_cores') or 0:.2f} / "
            f"{s3.get('read_server_cores') or 0:.2f} cores: moto is one Python process. A ranged "
            f"GET costs O(object size) on moto: 1 MiB from the {records_size(records)} MiB "
            f"object takes {s3['ranged_1mib_get_ms_from_big']:.0f} ms, from a 1 MiB object "
            f"{s3['ranged_1mib_get_ms_from_1mib']:.0f} ms. A reader that fetches 1 MiB blocks "
            "(blobfs's cache block) pays that per MiB, a reader with 8 MiB ranges (boto3) pays "
            "it per 8 MiB, so the S3 read ratio measures moto more than the reader. Likewise "
            "each S3 append commit copies the previous object server-side (`UploadPartCopy`), "
            "which moto does by copying all 64 MiB in Python: the append wall time on S3 is "
            "moto's copy speed (see the server CPU below); on AWS the copy runs inside S3.")
    az = t.get("sdk", "az", "ceiling")
    if az:
        out.append(
            f"- **Azurite** (one Node.js process) gives the SDK {az['write_mib_s']:.0f} MiB/s up "
            f"and {az['read_mib_s']:.0f} MiB/s down (`upload_blob` / `download_blob` with "
            "max_concurrency 8). The \"ceiling\" is the Python SDK's own speed, not "
            "Azurite's: a filesystem with larger requests or less per-request work can pass "
            "100 %.")
    fl = t.get("sdk", "file", "ceiling")
    if fl:
        out.append(
            f"- **file://** is compared with plain file I/O on the same disk: "
            f"{fl['write_mib_s']:.0f} MiB/s for 1 MiB writes + fsync, {fl['read_mib_s']:.0f} "
            "MiB/s for 1 MiB reads after dropping the page cache (best of 3 runs, like the "
            "file:// filesystem figures: this VM's disk sits on the host's cache and varies "
            "from run to run). It has no network, so the append row reports wall time only.")
    return out


def records_size(records: Records) -> int:
    for r in records:
        if r["workload"] == "ceiling" and r.get("status") == "ok":
            return int(r["figures"]["write_seconds"] * r["figures"]["write_mib_s"] + 0.5)
    return 0


def cpu_table(records: Records) -> list[str]:
    lines = ["| system | store | workload | wall | daemon CPU (cores) | server CPU (cores) |",
             "|---|---|---|---|---|---|"]
    for r in records:
        f = r.get("figures") or {}
        if "daemon_cores" not in f:
            continue
        server = (f"{f['server_cpu_s']:.1f} s ({f['server_cores']:.2f})"
                  if "server_cpu_s" in f else "—")
        lines.append(f"| {r['system']} | {r['store']} | {r['workload']} | {f['wall_s']:.1f} s | "
                     f"{f['daemon_cpu_s']:.1f} s ({f['daemon_cores']:.2f}) | {server} |")
    return lines


def profile_section(out: Path, top: int = 12) -> list[str]:
    """Self time and inclusive time per function from py-spy's collapsed stacks."""
    prof = out / "profiles"
    files = sorted(prof.glob("*.collapsed*")) if prof.is_dir() else []
    lines: list[str] = []
    for path in files:
        self_t: Counter[str] = Counter()
        incl: Counter[str] = Counter()
        total = 0
        blob = path.read_bytes()
        if path.suffix == ".gz":
            blob = gzip.decompress(blob)
        for raw in blob.decode(errors="replace").splitlines():
            stack, _, count = raw.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            frames = stack.split(";")
            total += n
            self_t[frames[-1]] += n
            for fr in set(frames[1:]):
                incl[fr] += n
        if not total:
            continue
        lines += [f"**{path.name.split('.')[0]}** ({total} samples of the daemon's busy threads at "
                  "200 Hz)", "",
                  "| self | inclusive | function |", "|---|---|---|"]
        for fn, n in self_t.most_common(top):
            lines.append(f"| {n / total * 100:.1f} % | {incl.get(fn, n) / total * 100:.1f} % | "
                         f"`{fn}` |")
        lines.append("")
    return lines


def write_markdown(out: Path, meta: dict[str, Any], records: Records) -> None:
    t = Table(records)
    m, v = meta["machine"], meta["versions"]
    systems = meta.get("systems", {})
    md = [
        "# blobfs benchmarks",
        "",
        f"Generated by `{meta['command'].strip()}` on {meta['date']} in "
        f"{meta.get('elapsed_s', 0) / 60:.1f} min. Every server listens on 127.0.0.1; "
        "the figures compare filesystems on one machine, not clouds.",
        "",
        f"- **Machine:** {m['nproc']} CPUs ({m['cpu']}), {m['memory_gib']} GiB memory, "
        f"Linux {m['kernel']}; load average {m['loadavg_start']:.1f} at the start, "
        f"{meta.get('loadavg_end', 0):.1f} at the end (other work on the machine adds noise).",
        "- **Versions:** " + ", ".join(f"{k} {val}" for k, val in v.items() if val) + ".",
        "- **Systems:** " + "; ".join(f"{k}: {d}" for k, d in systems.items()) + ".",
        "",
        "## Results",
        "",
        "Throughputs are MiB/s, with the percentage of the SDK ceiling on the same server "
        "in parentheses. Sequential write: `dd bs=1M` into a fresh mount, close included, "
        "timed until the store holds every byte. Sequential read: `dd bs=1M` from a fresh "
        "mount after `echo 3 > /proc/sys/vm/drop_caches`. Appends: open, write one short "
        "line, close, through a counting proxy between mount and server (bytes and requests "
        "sent to the server). tail -f: a writer holds the file open on one mount and writes a "
        "timestamped line every "
        f"{meta['sizes']['tail_interval'] * 1000:.0f} ms; GNU `tail -f` follows it on a second "
        f"mount of the same store; latency over {meta['sizes']['tail_lines']} lines. Mount "
        "ready: from exec of the mount command (foreground) to the mountpoint answering a "
        f"stat, median of {meta['sizes']['ready_runs']}. RSS: the daemon idle after mounting, "
        f"and its peak while {meta['sizes']['writers']} files of "
        f"{meta['sizes']['writer_mib']} MiB are written at once.",
        "",
        *main_table(t, records, meta),
        "",
    ]
    if t.notes:
        md += [f"{i}. {text}" for i, text in enumerate(t.notes, 1)] + [""]
    for system, stores in unsupported_map(records).items():
        for reason in sorted(set(stores.values())):
            where = ", ".join(STORE_TITLE[s] for s in stores if stores[s] == reason)
            why = reason.removeprefix("not run: ")
            md.append(f"- {system} is not in the table for {where}: {why}.")
    md.append("")
    if any(r["system"] == "blobfs" for r in records):
        md += ["## Targets (blobfs)", "", "Read off the table above, never timed tests.", "",
               *targets_table(t, records), ""]
    from benchlib.scale import section as scale_section

    md += scale_section(records)
    md += loggers_section(t, records)
    caps = caps_section(t, records)
    if caps:
        md += ["## What caps the figures", "", *caps, ""]
    from benchlib.http import section as http_section

    md += http_section(records)
    cpu = cpu_table(records)
    if len(cpu) > 2:
        md += ["## CPU used during each workload", "",
               "Daemon = the filesystem process; server = moto or Azurite. A side near 1.0 "
               "core while the other idles is what bounds a figure (Python and Node are "
               "mostly one core each).", "", *cpu, ""]
    prof = profile_section(out)
    if prof:
        md += ["## Hot spots (py-spy)", "",
               "From `scripts/bench --profile` (py-spy sampling the blobfs daemon at 200 Hz "
               "while the workload runs; the raw stacks are in `profiles/`). Profiles from a "
               "separate run, so that sampling does not perturb the figures above. Waiting in "
               "`epoll`/`WorkerThread._work` is idle time; the rest is where the daemon's "
               "time goes.", "", *prof]
    if (out / "peers" / "results.md").exists():
        md += ["The same workloads on s3fs and rclone (`scripts/bench --quick --peers`): "
               "[`peers/results.md`](peers/results.md).", ""]
    if (out / "analysis.md").exists():
        md += ["What bounds each missed target, with the evidence, and what was fixed: "
               "[`analysis.md`](analysis.md).", ""]
    md += ["Raw figures: [`results.json`](results.json). Plot: ![results](results.png)", ""]
    (out / "results.md").write_text("\n".join(md))


def write_plot(out: Path, meta: dict[str, Any], records: Records) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    t = Table(records)
    stores = _stores(records)
    systems = _systems(records)
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    colors = {"sdk": "#999999", "blobfs": "#1f77b4", "s3fs": "#ff7f0e", "rclone": "#2ca02c",
              "rclone-writes": "#98df8a"}

    def bars(ax: Any, title: str, unit: str, value: Any, log: bool = False,
             systems_here: list[str] | None = None, label: Any = None) -> None:
        names = systems_here or [s for s in systems if s != "sdk"]
        width = 0.8 / max(1, len(names))
        for i, system in enumerate(names):
            xs, ys = [], []
            for j, store in enumerate(stores):
                v = value(system, store)
                if v is not None:
                    xs.append(j + (i - (len(names) - 1) / 2) * width)
                    ys.append(v)
                    if label is not None:
                        ax.annotate(label(system, store), (xs[-1], v), ha="center",
                                    va="bottom", fontsize=7)
            ax.bar(xs, ys, width, label=system, color=colors.get(system))
        ax.set_xticks(range(len(stores)), [STORE_TITLE[s] for s in stores])
        ax.set_title(title)
        ax.set_ylabel(unit)
        if log and ax.patches:  # a run without this workload has nothing to scale
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)

    def mib(kind: str, system: str, store: str) -> float | None:
        f = t.get(system, store, kind)
        return f["mib_s"] if f else None

    def pct(kind: str) -> Any:
        def value(system: str, store: str) -> float | None:
            c = t.get("sdk", store, "ceiling")
            v = mib(kind, system, store)
            return v / c[f"{kind}_mib_s"] * 100 if c and v is not None else None
        return value

    def mib_label(kind: str) -> Any:
        return lambda system, store: f"{mib(kind, system, store):.0f} MiB/s"

    bars(axes[0][0], f"sequential write {meta['sizes']['seq_mib']} MiB", "% of the SDK ceiling",
         pct("write"), label=mib_label("write"))
    bars(axes[0][1], f"sequential read {meta['sizes']['seq_mib']} MiB (cold)",
         "% of the SDK ceiling", pct("read"), label=mib_label("read"))
    for ax in (axes[0][0], axes[0][1]):
        ax.axhline(85, color="red", lw=0.8, ls="--")
        ax.axhline(100, color="grey", lw=0.6)
    axes[0][0].legend(fontsize=8)

    def per_append(system: str, store: str) -> float | None:
        f = t.get(system, store, "append")
        return f["per_append_ms_p50"] if f else None

    bars(axes[0][2], f"open-append-close onto {meta['sizes']['base_mib']} MiB (p50)", "ms",
         per_append, log=True)

    def tail(system: str, store: str) -> float | None:
        f = t.get(system, store, "tail")
        return f["p50_s"] if f else None

    bars(axes[1][0], "tail -f latency p50 (second mount)", "s", tail)
    axes[1][0].axhline(2.0, color="red", lw=0.8, ls="--")

    def ready(system: str, store: str) -> float | None:
        f = t.get(system, store, "ready")
        return f["median_s"] if f else None

    bars(axes[1][1], "mount ready (median)", "s", ready)
    axes[1][1].axhline(1.0, color="red", lw=0.8, ls="--")

    def peak(system: str, store: str) -> float | None:
        f = t.get(system, store, "rss")
        return f["peak_mib"] if f else None

    bars(axes[1][2], f"daemon peak RSS, {meta['sizes']['writers']} files at once", "MiB", peak)
    axes[1][2].axhline(250, color="red", lw=0.8, ls="--")
    for ax in axes.flat:
        ax.tick_params(labelsize=8)
    fig.suptitle(f"blobfs bench, {meta['date']} ({meta['machine']['nproc']} CPUs, "
                 f"loopback servers; dashed: targets)")
    fig.tight_layout()
    fig.savefig(out / "results.png", dpi=90)
    plt.close(fig)


def write_all(out: Path, meta: dict[str, Any], records: Records) -> None:
    (out / "results.json").write_text(
        json.dumps({"meta": meta, "records": records}, indent=1, default=str) + "\n")
    write_markdown(out, meta, records)
    write_plot(out, meta, records)


def rerender(out: Path) -> None:
    """Rebuild results.md and results.png from results.json (after editing the report)."""
    data = json.loads((out / "results.json").read_text())
    write_markdown(out, data["meta"], data["records"])
    write_plot(out, data["meta"], data["records"])

