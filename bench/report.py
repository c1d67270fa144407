"""The printed table, the machine it ran on, and the PNG plot."""

from __future__ import annotations

import os
import platform
import shutil
import sqlite3
import subprocess
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from bench.config import BenchConfig
from bench.measurement import Result
from bench.targets import TARGETS, Results

SHORT_NAMES = {
    "raw_fsync": "raw fsync loop",
    "dict_msgpack": "dict+msgpack",
    "dict_get": "d.get fn",
    "dict_get_random": "d.get fn",
    "unpack_get": "unpackb fn",
    "raw_putmulti": "raw putmulti",
    "raw_recovery": "raw replay",
    "memory_dict": "plain dict",
    "pg_write_through": "write-through",
    "far_write_through_t1": "write-through",
    "far_write_through_t4": "write-through",
    "far_write_through_t16": "write-through",
    "far_hot_write_through": "write-through",
    "lru_zipf": "exact LRU",
    "lru_scan": "exact LRU",
    "shared_p1_t64": "1 proc x 64 thr",
    "shared_flush_l1": "1 lane",
    "get_dict": "in-process hit",
}

SECTION_TITLES = {
    "baselines": "baselines (same run)",
    "peers": "peers: durable acks/s, one commit per write, N client threads",
    "wbcache": "wbcache",
    "shared": "shared directory: processes on one directory, one LMDB database, a lane each "
              "(wbcache.open(path, shared=True))",
    "postgres": "postgres: wbcache over PostgreSQL against PostgreSQL alone, same threads, keys "
                "and values (durable acks/s)",
    "postgres-far": "postgres over a far link: the same, the database behind a proxy that holds "
                    "every byte 1 ms each way",
}

LATENCY_ROWS = ("raw_fsync", "put_t1", "put_t16", "put_t64", "put_t64_switch", "async_t256")
"""The rows the latency block shows (those that ran), beside the raw fdatasync's median. The
raw loop comes first: its own tail is what the machine adds to any durable write."""


def machine_description(scratch: Path) -> list[str]:
    cpu = _cpu_model()
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    device, fstype = _filesystem_of(scratch)
    return [
        f"machine: {cpu}, {os.cpu_count()} cores, {memory_gib:.0f} GiB RAM, "
        f"Linux {platform.release()}",
        f"disk:    {fstype} on {device} (benchmark files in {scratch})",
        f"python:  {platform.python_version()}; " + ", ".join(_versions()),
    ]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _filesystem_of(path: Path) -> tuple[str, str]:
    best = ("?", "?", "")
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                device, mount_point, fstype = line.split()[:3]
                if str(path).startswith(mount_point) and len(mount_point) >= len(best[2]):
                    best = (device, fstype, mount_point)
    except OSError:
        pass
    return best[0], best[1]


def _versions() -> list[str]:
    found = []
    for package in ("wbcache", "msgpack", "lmdb", "diskcache", "redis", "psycopg"):
        try:
            found.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            found.append(f"{package} not installed")
    found.append(f"sqlite {sqlite3.sqlite_version}")
    server = shutil.which("redis-server")
    if server:
        out = subprocess.run([server, "--version"], capture_output=True, text=True).stdout
        version = next((part[2:] for part in out.split() if part.startswith("v=")), "?")
        found.append(f"redis-server {version}")
    else:
        found.append("redis-server not installed")
    return found


def format_value(value: float, unit: str) -> str:
    if unit in ("ops/s", "keys/s", "entries/s"):
        return f"{value:,.0f} {unit}"
    if unit == "s":
        return f"{value:.2f} s" if value >= 1 else f"{value * 1e3:,.1f} ms"
    if unit == "bytes":
        return f"{value / 1e6:,.1f} MB"
    if unit == "fraction":
        return f"{value * 100:.2f} %"
    return f"{value:g} {unit}"


def _row_value(result: Result) -> str:
    value = result.value
    if value is None:
        return result.status.split(":")[0]
    return format_value(value, result.measurement.unit)


def format_latency(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds >= 0.01:
        return f"{seconds * 1e3:,.1f} ms"
    return f"{seconds * 1e6:,.0f} µs"


def _ratio_cell(result: Result, results: Results) -> str:
    base_id = result.measurement.baseline
    if base_id is None:
        return ""
    if base_id == result.id:
        return "1.00× (baseline)"
    base = results.get(base_id)
    if base is None or result.value is None or base.value is None or not base.value:
        return ""
    return f"{result.value / base.value:,.2f}× {SHORT_NAMES.get(base_id, base_id)}"


def _verdict_cell(row_id: str, results: Results) -> tuple[str, str]:
    targets = [target for target in TARGETS if target.row == row_id]
    if not targets:
        return "", ""
    texts, verdicts = [], []
    for target in targets:
        _value, verdict = target.judge(results)
        texts.append(target.limit_text())
        verdicts.append(verdict)
    missed = [v for v in verdicts if v.startswith("MISSED")]
    if missed:
        verdict = "MISSED" if len(verdicts) > 1 else missed[0]
    elif all(v == "met" for v in verdicts):
        verdict = "met"
    else:
        verdict = "not measured"
    return " and ".join(texts), verdict


def format_table(results: Sequence[Result]) -> str:
    by_id = {result.id: result for result in results}
    header = ("row", "result", "ratio", "p50 ack", "p99 ack", "p99.9 ack", "target", "verdict",
              "note")
    lines: list[tuple[str, ...]] = []
    section = None
    for result in results:
        m = result.measurement
        if m.section != section:
            section = m.section
            lines.append((SECTION_TITLES.get(section, section),))
        target, verdict = _verdict_cell(result.id, by_id)
        lines.append((
            "  " + m.label,
            _row_value(result),
            _ratio_cell(result, by_id),
            format_latency(result.p50),
            format_latency(result.p99),
            format_latency(result.p999),
            target,
            verdict,
            result.error or result.note,
        ))
    widths = [max(len(line[i]) for line in [header, *lines] if len(line) > 1)
              for i in range(len(header))]
    right = {1, 2, 3, 4, 5}

    def render(line: tuple[str, ...]) -> str:
        if len(line) == 1:
            return line[0]
        cells = [cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
                 for i, cell in enumerate(line)]
        return "  ".join(cells).rstrip()
    return "\n".join(render(line) for line in [header, *lines])


def format_targets(results: Sequence[Result], config: BenchConfig) -> str:
    """The targets section; each target's text names the sizes of `config`'s run."""
    by_id = {result.id: result for result in results}
    rows = []
    counts = {"met": 0, "MISSED": 0, "not measured": 0}
    for target in TARGETS:
        value, verdict = target.judge(by_id)
        counts[verdict.split(" ")[0] if verdict.startswith("MISSED") else verdict] += 1
        rows.append((target.label(config), "" if value is None else target.value_text(value),
                     target.limit_text(), verdict))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["targets, each judged on numbers of this run:"]
    lines += [f"  {text.ljust(widths[0])}  {value.rjust(widths[1])}  {limit.ljust(widths[2])}  "
              f"{verdict}" for text, value, limit, verdict in rows]
    lines.append(f"  {counts['met']} met, {counts['MISSED']} MISSED, "
                 f"{counts['not measured']} not measured")
    return "\n".join(lines)


def format_latency_block(results: Sequence[Result]) -> str:
    """Acknowledgement latency of a put at each concurrency, each percentile also as a multiple
    of the raw loop's median write + fdatasync. Empty when neither side ran."""
    by_id = {result.id: result for result in results}
    raw = by_id.get("raw_fsync")
    fsync = raw.p50 if raw is not None else None
    shown = [by_id[row] for row in LATENCY_ROWS
             if row in by_id and by_id[row].p50 is not None]
    if not fsync or not shown:
        return ""
    lines = [f"put acknowledgement latency (median over trials of each trial's percentile), "
             f"beside the median raw write + fdatasync ({format_latency(fsync)}):"]
    width = max(len(result.measurement.label) for result in shown)
    for result in shown:
        cells = []
        for name, value in (("p50", result.p50), ("p99", result.p99), ("p99.9", result.p999)):
            if value is not None:
                cells.append(f"{name} {format_latency(value):>9} ({value / fsync:5.1f}×)")
        lines.append(f"  {result.measurement.label.ljust(width)}  " + "   ".join(cells))
    return "\n".join(lines)


def plot(results: Sequence[Result], path: Path, title: str) -> str:
    """Write the PNG of durable acks/s against concurrency; return what happened, one line."""
    try:
        import matplotlib
    except ImportError:
        return "plot skipped: matplotlib is not installed (pip install 'wbcache[bench]')"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    series: dict[str, list[tuple[int, float]]] = {}
    raw = None
    for result in results:
        m = result.measurement
        if m.series is None or m.concurrency is None or result.value is None:
            continue
        if m.id == "raw_fsync":
            raw = result.value
            continue
        series.setdefault(m.series, []).append((m.concurrency, result.value))
    fig, ax = plt.subplots(figsize=(10, 6), dpi=110)
    for name, points in series.items():
        points.sort()
        xs, ys = zip(*points, strict=True)
        not_durable = "not" in name
        wb = name.startswith("wbcache")
        ax.plot(xs, ys, marker="o", linestyle="--" if not_durable else "-",
                linewidth=2.6 if wb else 1.5, label=name, alpha=0.7 if not_durable else 1.0)
    if raw is not None:
        ax.axhline(raw, color="black", linestyle=":", linewidth=1.2,
                   label=f"raw write+fdatasync loop, 1 thread ({raw:,.0f}/s)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ticks = sorted({m.concurrency for r in results for m in [r.measurement]
                    if m.concurrency and r.value is not None and m.series})
    if ticks:
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
        lambda v, _: f"{v:,.0f}" if str(int(v))[0] in "25" else ""))
    ax.set_xlabel("concurrency (threads, tasks or client connections)")
    ax.set_ylabel("acknowledged writes per second (log scale)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return f"plot written to {path}"

