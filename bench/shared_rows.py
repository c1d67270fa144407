"""Shared directories (`wbcache.open(path, shared=True)`): many processes, one LMDB database, a
lane (a log of its own) per process. The rows' work is done by worker processes
(`bench/shared_worker.py`, the benchmark's own interpreter; `bench/shared_pool.py` starts and
reuses them), each trial on a fresh shared directory. A worker opens the directory (untimed),
says it is ready, and does nothing timed until the benchmark, having heard every worker's
"ready", tells them all to start (one line on each one's stdin).

  shared_p{P}_t{T}   P processes x T threads put small values to keys no other put uses,
                     default options (fsync="always": durable acks): aggregate acks/s over a
                     fixed window, the same absolute window (time.monotonic, one clock for
                     the machine) in every process, each process counting the puts that ended
                     in it; latency percentiles over every process's puts
  shared_p1_t{B}     the baseline: 1 process x B threads (B = P x T at the largest P) on the
                     same kind of directory, started the same way. Separate processes escape
                     one GIL; how much they gain is the ratio
  shared_p2_t{B/2}   2 processes with as many threads in all as the baseline: whether a gain
                     or a loss comes from the processes or from the number of threads (each
                     lane's group commit batches only its own process's writers)
  shared_flush_l{L}  L processes each hold `shared_flush_entries` dirty entries (flusher held
                     back), then all call flush() at once: entries written into the database
                     per second of wall time, from the first flush's start to the last one's
                     end. LMDB has one writer at a time, so the lanes' transactions queue; what
                     runs side by side is each lane's own Python work around them
  shared_get         get() in one process of keys another process wrote, flushed and closed
                     (that directory is made once per run), with the shared default read_ttl
                     (a clean entry is read from the database again once it is older than
                     read_ttl); shared_get_db: read_ttl of 1 µs, so every get
                     reads LMDB (the cross-process read itself)
  shared_staleness   one process puts a new value to a key; another, already holding the key,
                     polls get() every `POLL_SECONDS` until it sees the value: the time from the
                     writer's acknowledgement to the end of that first get, over
                     `shared_staleness_samples` writes, both with the default options (flush
                     every `staleness_flush_interval` s). Each write is made as soon as the
                     reader has seen the previous one, i.e. just after one of the writer's
                     flushes: the worst phase, which the samples' median shows. The row's value
                     is the WORST sample (a bound is about the worst case), so it runs as one
                     trial of many samples, compared with the documented bound
                     flush_interval + read_ttl.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import wbcache
from bench.config import BenchConfig
from bench.harness import percentile
from bench.measurement import Measurement, Sample, Usage
from bench.shared_pool import (
    OPEN_TIMEOUT,
    REPORT_TIMEOUT,
    WorkerPool,
    fresh_directory,
    working_on,
)
from bench.shared_worker import key_for
from bench.workload import Scratch

SECTION = "shared"

POLL_SECONDS = 0.001
"""How often the staleness row's reader polls: a measured staleness is at most this late."""

# Options that hold a flush back until flush() is called (and no sweep runs meanwhile).
_HOLD = {"flush_interval": 3600, "fsync": "interval", "adopt_interval": 3600}


def measurements(config: BenchConfig, scratch: Scratch, sections: tuple[str, ...],
                 resources: contextlib.ExitStack) -> list[Measurement]:
    if SECTION not in sections:
        return []
    pool = WorkerPool(scratch.root)
    resources.callback(pool.stop)
    threads, most = config.shared_threads, max(config.shared_processes)
    base_threads = most * threads
    base = f"shared_p1_t{base_threads}"
    rows = [Measurement(base, SECTION,
                        f"put, 1 process x {base_threads} threads, one shared directory",
                        _acks(config, scratch, pool, 1, base_threads), baseline=base)]
    rows += [Measurement(f"shared_p{p}_t{threads}", SECTION,
                         f"put, {p} process{'es' * (p > 1)} x {threads} threads, "
                         "one shared directory",
                         _acks(config, scratch, pool, p, threads), baseline=base,
                         series=f"wbcache shared directory (processes x {threads} threads)",
                         concurrency=p * threads)
             for p in config.shared_processes]
    half = base_threads // 2
    if half != threads or 2 not in config.shared_processes:
        rows.append(Measurement(
            f"shared_p2_t{half}", SECTION,
            f"put, 2 processes x {half} threads, one shared directory (as many threads as "
            "the baseline)", _acks(config, scratch, pool, 2, half), baseline=base))
    entries, lanes = config.shared_flush_entries, config.shared_flush_lanes
    rows += [Measurement(f"shared_flush_l{n}", SECTION,
                         f"flush into the shared LMDB, {n} lanes at once, {entries:,} dirty "
                         "entries each" if n > 1 else
                         f"flush into the shared LMDB, 1 lane, {entries:,} dirty entries",
                         _flush(config, scratch, pool, n), unit="entries/s",
                         baseline="shared_flush_l1", big=True)
             for n in sorted({1, lanes})]
    keys = config.shared_read_keys
    written = WrittenKeys(scratch.root / "shared-written-keys", pool, keys)
    rows += [
        Measurement("shared_get", SECTION,
                    f"get of {keys:,} keys another process wrote and flushed, shared default "
                    "read_ttl", _get(config, pool, written, None), baseline="get_dict"),
        Measurement("shared_get_db", SECTION,
                    f"get of {keys:,} keys another process wrote and flushed, read_ttl 1 µs "
                    "(every get reads LMDB)", _get(config, pool, written, 1e-6),
                    baseline="get_dict"),
        Measurement("shared_staleness", SECTION,
                    f"staleness: writer's ack to another process's first get that sees it, "
                    f"worst of {config.shared_staleness_samples}",
                    _staleness(config, scratch, pool), unit="s", better="lower", once=True),
    ]
    return rows


def default_read_ttl(root: Path) -> float:
    """The read_ttl a cache of the shared directory `root` gets by default."""
    cache = wbcache.open(root, shared=True)
    try:
        read_ttl = cache.read_ttl
    finally:
        cache.close()
    if read_ttl is None:
        raise RuntimeError("a shared directory's cache has no read_ttl: other processes' "
                           "writes would never become visible")
    return read_ttl


class WrittenKeys:
    """A shared directory whose database holds `count` keys a worker process wrote and
    flushed, then closed: made at the first trial that needs it, kept for the run (the get
    rows' readers each open it in turn)."""

    def __init__(self, root: Path, pool: WorkerPool, count: int) -> None:
        self.root = root
        self.keys = [key_for(0, 0, seq) for seq in range(count)]
        self._pool = pool
        self._written = False

    def ensure(self) -> None:
        if self._written:
            return
        with working_on(self.root, self._pool, 1) as shared:
            writer = shared.open(0, "flush", len(self.keys), **_HOLD)
            writer.expect("ready", OPEN_TIMEOUT)
            writer.send({"go": True})
            writer.expect("end", REPORT_TIMEOUT)
        self._written = True


def _acks(config: BenchConfig, scratch: Scratch, pool: WorkerPool, processes: int,
          threads: int) -> Callable[[], Sample]:
    warmup, seconds = config.warmup_seconds, config.trial_seconds

    def trial() -> Sample:
        with fresh_directory(scratch, pool, f"shared-p{processes}-t{threads}",
                             processes) as shared:
            group = [shared.open(i, "acks", threads) for i in range(processes)]
            for worker in group:
                worker.expect("ready", OPEN_TIMEOUT)
            began = time.monotonic()
            for worker in group:
                worker.send({"start": began, "warmup": warmup, "seconds": seconds})
            reports = [worker.expect("count", warmup + seconds + REPORT_TIMEOUT)
                       for worker in group]
            stats = [worker.stats() for worker in group]
        count = sum(report["count"] for report in reports)
        # Each worker's window is `seconds` long unless no put of that worker ended in it (a
        # loaded machine, a --smoke trial of 0.04 s): then it widened until one did, bounded
        # (bench/shared_worker.py, WIDEN_LIMIT). Each process's rate is over its own window.
        window = max(report["seconds"] for report in reports)
        if not count:
            raise RuntimeError(f"no put ended within the {window:.2g} s window")
        rates = [report["count"] / report["seconds"] for report in reports]
        latencies = sorted(lat for report in reports for lat in report["latencies"])
        fsyncs = sum(s["fsyncs"] for s in stats)
        usage = Usage(sum(r["cpu"] for r in reports), sum(r["voluntary"] for r in reports), 0,
                      count)
        each = ", ".join(f"{rate:,.0f}" for rate in rates)
        note = (f"{sum(s['writes'] for s in stats) / max(fsyncs, 1):.1f} writes per fsync; "
                f"{usage.per_op()}, {usage.cpu_seconds / window:.2f} cores busy "
                "(all processes)")
        if processes > 1:
            note = f"acks/s per process {each}; {note}"
        if window > seconds * 1.001:
            note = f"window widened to {window:.3g} s until a put ended in it; {note}"
        return Sample(sum(rates), percentile(latencies, 0.50), percentile(latencies, 0.99),
                      percentile(latencies, 0.999), note=note, usage=usage)
    return trial


def _flush(config: BenchConfig, scratch: Scratch, pool: WorkerPool,
           lanes: int) -> Callable[[], Sample]:
    entries = config.shared_flush_entries
    hold = {**_HOLD, "flush_threshold": entries + 1, "max_dirty": entries + 1,
            "capacity": max(entries, 1_000_000)}

    def trial() -> Sample:
        with fresh_directory(scratch, pool, f"shared-flush-{lanes}", lanes) as shared:
            group = [shared.open(i, "flush", entries, **hold) for i in range(lanes)]
            for worker in group:
                worker.expect("ready", OPEN_TIMEOUT)
            for worker in group:
                worker.send({"go": True})
            reports = [worker.expect("end", REPORT_TIMEOUT) for worker in group]
            flushed = sum(worker.stats()["flushed_entries"] for worker in group)
        if flushed != lanes * entries:
            raise RuntimeError(f"{flushed:,} entries flushed, not {lanes * entries:,}")
        first = min(report["start"] for report in reports)
        wall = max(report["end"] for report in reports) - first
        each = ", ".join(f"{report['end'] - report['start']:.3f}" for report in reports)
        spread = max(report["start"] for report in reports) - first
        note = f"{wall:.3f} s from the first flush's start to the last one's end"
        if lanes > 1:
            note += f"; each lane's flush() took {each} s; starts spread over {spread * 1e3:.1f} ms"
        return Sample(flushed / wall, note=note)
    return trial


def _get(config: BenchConfig, pool: WorkerPool, written: WrittenKeys,
         read_ttl: float | None) -> Callable[[], Sample]:
    reader_options = {} if read_ttl is None else {"read_ttl": read_ttl}

    def trial() -> Sample:
        written.ensure()
        with working_on(written.root, pool, 1) as shared:
            reader = shared.open(0, None, **reader_options)
            reader.expect("ready", OPEN_TIMEOUT)
            reader.send({"loop": written.keys, "warmup": config.warmup_seconds,
                         "seconds": config.trial_seconds})
            report = reader.expect("count", config.warmup_seconds + config.trial_seconds
                                   + REPORT_TIMEOUT)
            stats = reader.stats()
        latencies = sorted(report["latencies"])
        if not latencies:
            raise RuntimeError(f"no get ended within the {report['seconds']:.2g} s window")
        reads = stats["misses"] / max(stats["misses"] + stats["hits"], 1)
        # The window widens if no get ended in it (bench/shared_worker.py, WIDEN_LIMIT).
        return Sample(report["count"] / report["seconds"], percentile(latencies, 0.50),
                      percentile(latencies, 0.99), percentile(latencies, 0.999),
                      note=f"{reads * 100:.1f} % of gets read LMDB (warm-up included)")
    return trial


def _staleness(config: BenchConfig, scratch: Scratch, pool: WorkerPool) -> Callable[[], Sample]:
    samples, interval = config.shared_staleness_samples, config.staleness_flush_interval

    def trial() -> Sample:
        with fresh_directory(scratch, pool, "shared-staleness", 2) as shared:
            read_ttl = default_read_ttl(shared.root)
            writer = shared.open(0, None, flush_interval=interval)
            reader = shared.open(1, None, flush_interval=interval)
            for worker in (writer, reader):
                worker.expect("ready", OPEN_TIMEOUT)
            bound = interval + read_ttl
            key = "staleness:register"
            found: list[float] = []
            get_latencies: list[float] = []
            for value in range(1, samples + 1):
                reader.send({"watch": key, "value": value, "poll": POLL_SECONDS,
                             "timeout": 3 * bound + 10})
                reader.expect("watching", OPEN_TIMEOUT)
                writer.send({"put": key, "value": value})
                acked = writer.expect("ack", REPORT_TIMEOUT)["ack"]
                seen = reader.expect("seen", 3 * bound + REPORT_TIMEOUT)
                if seen["seen"] is None:
                    raise RuntimeError(f"the reader never saw value {value} "
                                       f"({3 * bound + 10:g} s)")
                found.append(seen["seen"] - acked)
                get_latencies += seen["latencies"]
        worst, lats = max(found), sorted(get_latencies)
        return Sample(worst, extra={"of_bound": worst / bound},
                      note=f"median {statistics.median(found):.3f} s, best {min(found):.3f} s "
                           f"over {samples} writes, each just after the writer's last flush; "
                           f"documented bound flush_interval "
                           f"{interval:g} + read_ttl {read_ttl:g} = {bound:g} s "
                           f"(worst = {worst / bound:.2f}× it); the reader's gets meanwhile: "
                           f"p50 {lats[len(lats) // 2] * 1e6:.1f} µs, "
                           f"p99 {percentile(lats, 0.99) * 1e6:.1f} µs")
    return trial

