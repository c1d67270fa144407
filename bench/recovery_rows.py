"""Recovery: replaying a `recovery_records`-record log, against a raw pass over the same data;
and the peak memory of `wbcache recover` on a log of `recover_rss_records` distinct keys.

Each log is written once per run by a child process that puts one value per record
(fsync="interval", one thread: one record per put), syncs, and exits without closing: the log
a killed writer leaves, none of it in the database. Each trial copies that directory afresh.

  recovery      wall time of `wbcache.open()` on that directory: scan and check every record
                (CRC, LSN order), fold them, one LMDB transaction, delete the log
  raw_recovery  the floor: read the records' payload bytes, one `msgpack.Unpacker` pass folding
                them into a dict (key -> latest value), then one `putmulti` of the final values
                in a synced transaction. The payloads are the log's records as msgpack arrays
                [lsn, op, key, value] back to back, without segment and frame headers (a
                framed log is not one msgpack stream), in a file written alongside the log.
  recover_rss   peak resident memory of `wbcache recover DIR` on a log of
                `recover_rss_records` puts, each of a key of its own (so nothing folds): the
                command runs in a fresh Python process (`wbcache.cli.main`, as the console
                script runs it), which first imports what the command imports and reads its
                own resident set size (the baseline, in the note), then recovers, then reads
                its peak (VmHWM). The target is on the peak, baseline included.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import msgpack

import wbcache
from bench.baselines import timed_putmulti
from bench.config import BenchConfig
from bench.measurement import Measurement, Sample
from bench.workload import Scratch, Workload, dict_value_of, key_of
from wbcache.wal.records import OP_PUT

SECTION_BASE = "baselines"
SECTION = "wbcache"
_BATCH = 10_000  # records per write of the payload file


class RecoveryLog:
    """A log of `count` puts cycling over `pool` keys, written at the first trial that needs
    it; with the raw row's payload file when `payloads` is asked for."""

    def __init__(self, root: Path, count: int, pool: int) -> None:
        self._root = root
        self._count = count
        self._pool = pool
        self._ready = False
        self._payloads_ready = False

    @property
    def cache_dir(self) -> Path:
        self._ensure()
        return self._root / "cache"

    @property
    def payloads(self) -> Path:
        self._ensure()
        path = self._root / "payloads.msgpack"
        if not self._payloads_ready:
            count, pool = self._count, self._pool
            keys = [key_of(i) for i in range(pool)]
            packb = msgpack.packb
            values = [packb(dict_value_of(i)) for i in range(pool)]
            with open(path, "wb") as payload_file:
                for first in range(1, count + 1, _BATCH):
                    payload_file.write(b"".join(
                        packb([lsn, OP_PUT, keys[lsn % pool], values[lsn % pool]])
                        for lsn in range(first, min(first + _BATCH, count + 1))))
            self._payloads_ready = True
        return path

    def _ensure(self) -> None:
        if self._ready:
            return
        self._root.mkdir()
        bench_parent = str(Path(__file__).resolve().parent.parent)
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, bench_parent, str(self._root / "cache"),
             str(self._count), str(self._pool)],
            capture_output=True, text=True, timeout=900, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"the log-writing child failed: {done.stderr.strip()[-300:]}")
        self._ready = True


_CHILD = ("import sys; sys.path.insert(0, sys.argv[1]); "
          "from bench.recovery_rows import write_log_and_exit; write_log_and_exit(sys.argv[2:])")


def write_log_and_exit(argv: list[str]) -> None:
    """In the child: `count` puts cycling over `pool` keys, fsync'd, never flushed; then exit
    at once, as a killed process would, leaving the whole log for recovery."""
    path, count, pool = argv[0], int(argv[1]), int(argv[2])
    workload = Workload(pool)
    cache = wbcache.open(path, fsync="interval", flush_interval=3600.0,
                         flush_threshold=pool + 1, max_dirty=pool + 1,
                         capacity=max(pool, 1_000_000))
    put, keys, values = cache.put, workload.keys, workload.dict_values
    for lsn in range(1, count + 1):
        put(keys[lsn % pool], values[lsn % pool])
    cache.sync()
    stats = cache.stats()
    if stats["flushes"] or stats["checkpoint_lsn"]:
        print(f"the cache flushed while the log was written: {stats}", file=sys.stderr)
        os._exit(1)
    os._exit(0)  # no close(): nothing reaches the database, the log keeps every record


def measurements(config: BenchConfig, workload: Workload, scratch: Scratch,
                 sections: tuple[str, ...]) -> list[Measurement]:
    log = RecoveryLog(scratch.root / "recovery-template", config.recovery_records,
                      config.recovery_keys)
    count = config.recovery_records
    size = config.scaled(1_000_000, count)
    rows = []
    if "baselines" in sections:
        rows.append(Measurement(
            "raw_recovery", SECTION_BASE,
            f"raw replay of the same log: msgpack pass + 1 putmulti{size}", _raw(log, scratch),
            unit="s", better="lower", big=True))
    if "wbcache" in sections:
        rows.append(Measurement(
            "recovery", SECTION,
            f"recovery replay of a {count:,}-record log ({config.recovery_keys:,} keys)",
            _replay(log, scratch), unit="s", better="lower", baseline="raw_recovery", big=True))
        distinct = config.recover_rss_records
        distinct_log = RecoveryLog(scratch.root / "recover-rss-template", distinct, distinct)
        rows.append(Measurement(
            "recover_rss", SECTION,
            f"wbcache recover, peak RSS: log of {distinct:,} puts of distinct keys",
            _recover_rss(distinct_log, scratch), unit="bytes", better="lower", big=True))
    return rows


def _replay(log: RecoveryLog, scratch: Scratch) -> Callable[[], Sample]:
    def trial() -> Sample:
        with scratch.directory("recovery") as path:
            target = path / "cache"
            shutil.copytree(log.cache_dir, target)
            started = time.perf_counter()
            cache = wbcache.open(target)
            seconds = time.perf_counter() - started
            report = cache.recovery
            cache.close()
            return Sample(seconds, note=f"{report.replayed:,} records replayed, "
                                        f"{report.keys:,} entries written to the database (a "
                                        f"key in several replay chunks counts in each), "
                                        f"{report.records / seconds:,.0f} records/s")
    return trial


def _raw(log: RecoveryLog, scratch: Scratch) -> Callable[[], Sample]:
    def trial() -> Sample:
        payloads = log.payloads
        with scratch.directory("raw-recovery") as path:
            started = time.perf_counter()
            with open(payloads, "rb") as source:
                data = source.read()
            state: dict[str, bytes] = {}
            for record in _unpack(data):
                state[record[2]] = record[3]
            entries = [(key.encode(), value) for key, value in state.items()]
            scanned = time.perf_counter() - started
            seconds = scanned + timed_putmulti(path / "db", entries)
            return Sample(seconds, note=f"scan {scanned:.2f} s")
    return trial


def _unpack(data: bytes) -> msgpack.Unpacker:
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(data) + 1)
    unpacker.feed(data)
    return unpacker


_RSS_CHILD = ("import sys; sys.path.insert(0, sys.argv[1]); "
              "from bench.recovery_rows import recover_and_report; recover_and_report(sys.argv[2])")


def _recover_rss(log: RecoveryLog, scratch: Scratch) -> Callable[[], Sample]:
    def trial() -> Sample:
        with scratch.directory("recover-rss") as path:
            target = path / "cache"
            shutil.copytree(log.cache_dir, target)
            bench_parent = str(Path(__file__).resolve().parent.parent)
            done = subprocess.run([sys.executable, "-c", _RSS_CHILD, bench_parent, str(target)],
                                  capture_output=True, text=True, timeout=900, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"wbcache recover failed: {done.stderr.strip()[-300:]}")
            found = json.loads(done.stdout.strip().splitlines()[-1])
            return Sample(float(found["peak"]),
                          note=f"baseline before reading the log {found['baseline'] / 1e6:.1f} MB "
                               f"(interpreter and imports), so recovery added "
                               f"{(found['peak'] - found['baseline']) / 1e6:.1f} MB; peaks sampled "
                               f"every 5 ms: heap (RssAnon) {found['anon'] / 1e6:.1f} MB, mapped "
                               f"files (RssFile: log segments, LMDB) {found['file'] / 1e6:.1f} MB; "
                               f"{found['records']:,} records replayed in {found['seconds']:.2f} s")
    return trial


def recover_and_report(path: str) -> None:
    """In a fresh process: import what `wbcache recover` imports, read the resident set size,
    run the command (its --json output captured), print {"baseline", "peak" (bytes),
    "records", "seconds"} as one JSON line."""
    import contextlib
    import io

    import lmdb  # noqa: F401  (the command imports these before it reads anything)

    import wbcache.backends.lmdb  # noqa: F401
    import wbcache.maintenance  # noqa: F401
    from wbcache.cli import main

    baseline = _status_bytes("VmRSS")
    sampler = _RssSampler()
    output = io.StringIO()
    started = time.perf_counter()
    with sampler, contextlib.redirect_stdout(output):
        main(["recover", "--json", path], standalone_mode=False)
    seconds = time.perf_counter() - started
    peak = _status_bytes("VmHWM")
    report = json.loads(output.getvalue())
    print(json.dumps({"baseline": baseline, "peak": peak, "records": report["replayed"],
                      "seconds": seconds, "anon": sampler.peaks["RssAnon"],
                      "file": sampler.peaks["RssFile"]}))


class _RssSampler:
    """Samples RssAnon (the heap) and RssFile (mapped files: the log segments being read,
    LMDB's map) every 5 ms while recovery runs, keeping each one's peak: VmHWM says how high
    the total went, this says what it was made of."""

    FIELDS = ("RssAnon", "RssFile")

    def __init__(self) -> None:
        self.peaks = dict.fromkeys(self.FIELDS, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self._sample()

    def _sample(self) -> None:
        for field in self.FIELDS:
            self.peaks[field] = max(self.peaks[field], _status_bytes(field))


def _status_bytes(field: str) -> int:
    """A `kB` field of /proc/self/status, in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")
