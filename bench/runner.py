"""`run(config)`: collect every row, run them in interleaved rounds, print the report.

Rounds are interleaved (every row once, then every row again) because the machine is shared:
a burst of load from someone else then costs one trial of several rows, not all trials of one
row, and keeping each row's best trial filters it out. A row that fails is reported with its
error and the run goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import faulthandler
import gc
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import (
    baselines,
    eviction,
    memory,
    peers,
    postgres_rows,
    recovery_rows,
    redis_peer,
    report,
    shared_rows,
    wbcache_rows,
)
from bench.config import BenchConfig
from bench.measurement import Measurement, Result
from bench.postgres_server import redact_dsn
from bench.targets import TARGETS
from bench.workload import Scratch, Workload

REPO_ROOT = Path(__file__).resolve().parent.parent
SECTION_ORDER = ("baselines", "peers", "wbcache", "shared", "postgres", "postgres-far")
TRIAL_WATCHDOG_SECONDS = 900  # the slowest trial (writing a 1,000,000-record log) takes ~15 s


def collect(config: BenchConfig, workload: Workload, scratch: Scratch,
            resources: contextlib.ExitStack) -> list[Measurement]:
    """Every row the config selects, in table order."""
    only = config.only
    rows: list[Measurement] = []
    if "baselines" in only:
        rows += baselines.measurements(config, workload, scratch)
    if "peers" in only:
        rows += peers.measurements(config, workload, scratch)
    if "redis" in only:
        rows += redis_peer.measurements(config, workload, scratch, resources)
    if "wbcache" in only:
        rows += wbcache_rows.measurements(config, workload, scratch)
    rows += shared_rows.measurements(config, scratch, only, resources)
    if "postgres" in only:
        rows += postgres_rows.measurements(config, workload, scratch, resources)
    rows += recovery_rows.measurements(config, workload, scratch, only)
    rows += memory.measurements(config, scratch, only)
    rows += eviction.measurements(config, scratch, only)
    return sorted(rows, key=lambda m: SECTION_ORDER.index(m.section))  # stable within sections


def run(config: BenchConfig, *, command: str, plot_path: Path | None, json_path: Path | None,
        echo: Callable[[str], None] = print,
        progress: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
        ) -> list[Result]:
    """Run the benchmark, print the report with `echo`, progress lines with `progress`."""
    started = time.monotonic()
    load_before = os.getloadavg()
    scratch = Scratch(REPO_ROOT, config.scratch_parent)
    with contextlib.ExitStack() as resources:
        resources.callback(scratch.remove)
        workload = Workload(config.key_pool)
        rows = collect(config, workload, scratch, resources)
        results = [Result(row) for row in rows]
        _measure(config, results, progress)
        machine = report.machine_description(scratch.root)
    load_after = os.getloadavg()
    elapsed = time.monotonic() - started

    title = f"wbcache benchmark, {config.mode} run, {datetime.date.today().isoformat()}"
    echo(f"{title}: {command}")
    for line in machine:
        echo(line)
    echo(f"load average: {_load(load_before)} before, {_load(load_after)} after; "
         f"run took {elapsed:.0f} s")
    if config.mode == "smoke":
        echo("SMOKE RUN: every row ran, but for milliseconds; these numbers mean nothing")
    echo("")
    echo(report.format_table(results))
    echo("")
    latency = report.format_latency_block(results)
    if latency:
        echo(latency)
        echo("")
    echo(report.format_targets(results, config))
    echo("")
    echo(_method(config))
    if plot_path is not None:
        disk = " ".join(machine[1].split("(")[0].split()[1:])
        echo(report.plot(results, plot_path, f"{title}\n{machine[0]}; {disk}"))
    if json_path is not None:
        _write_json(json_path, config, command, machine, results)
        echo(f"results written to {json_path}")
    return results


def _measure(config: BenchConfig, results: list[Result], progress: Callable[[str], None]) -> None:
    anchors = [result for result in results if result.measurement.anchor]
    for round_ in range(config.rounds):
        for result in [*results, *anchors]:  # anchors: start and end of every round
            m = result.measurement
            if m.trial is None or result.error or (m.big and round_ >= config.big_rounds) \
                    or (m.once and round_ > 0):
                continue
            progress(f"[{round_ + 1}/{config.rounds}] {m.section}: {m.label}")
            gc.collect()
            # A trial that hangs (a deadlock in the code under test) cannot be interrupted:
            # dump every thread's stack and end the run, rather than wait forever.
            if sys.__stderr__ is not None:
                faulthandler.dump_traceback_later(TRIAL_WATCHDOG_SECONDS, exit=True,
                                                  file=sys.__stderr__)
            try:
                result.samples.append(m.trial())
            except Exception as exc:  # reported in the table; the run goes on
                result.error = f"{type(exc).__name__}: {exc}"
                progress(f"    failed: {result.error}")
            finally:
                faulthandler.cancel_dump_traceback_later()


def _load(load: tuple[float, float, float]) -> str:
    return "/".join(f"{value:.2f}" for value in load)


def _method(config: BenchConfig) -> str:
    return "\n".join([
        f"method: {config.rounds} interleaved round(s); each trial counts operations for "
        f"{config.trial_seconds:g} s after a {config.warmup_seconds:g} s warm-up "
        f"(recovery, flusher, memory, hot keys: {config.big_rounds} trial(s), one-shot; hit "
        f"ratios: 1 trial;",
        "  the cheap baselines: 2 trials per round, at the start and at the end of it).",
        "  result = the BEST trial (highest ops/s; lowest time or memory): load from other "
        "processes only ever slows a trial down.",
        "  p50/p99/p99.9 ack = per-call latency percentiles, the MEDIAN over trials. Durable "
        "ratios "
        "divide by the raw write+fdatasync loop,",
        "  1 thread, of what one put appends to the log, in this run; p99 targets divide by "
        "that loop's median (p50) call.",
    ])


def _write_json(path: Path, config: BenchConfig, command: str, machine: list[str],
                results: list[Result]) -> None:
    by_id = {result.id: result for result in results}
    document: dict[str, Any] = {
        "command": command,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": machine,
        "config": {k: (str(v) if isinstance(v, Path) else redact_dsn(v) if k == "pg_dsn" and v
                       else v)
                   for k, v in dataclasses.asdict(config).items()},
        "rows": [{
            "id": r.id, "section": r.measurement.section, "label": r.measurement.label,
            "unit": r.measurement.unit, "status": r.status, "value": r.value,
            "p50": r.p50, "p99": r.p99, "p999": r.p999, "baseline": r.measurement.baseline,
            "extra": r.best.extra if r.best is not None else {},
            "usage": dataclasses.asdict(r.usage) if r.usage is not None else None,
            "trials": [s.value for s in r.samples], "note": r.note,
            "series": r.measurement.series, "concurrency": r.measurement.concurrency,
        } for r in results],
        "targets": [{"row": t.row, "text": t.label(config), "op": t.op, "limit": t.limit,
                     "measured": t.judge(by_id)[0], "verdict": t.judge(by_id)[1]}
                    for t in TARGETS],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
