"""The limits every ratio is taken against, measured in the same run as the rows.

  raw_fsync       os.write + os.fdatasync of what one wbcache put appends to its log, in a loop:
                  the baseline of every durable ratio (one writer cannot do better)
  dict_msgpack    d[k] = msgpack.packb(v): the in-memory limit of a write
  dict_get        a one-line function returning d.get(k), keys read in insertion order
  dict_get_random the same, keys read in a fixed random order (informational)
  unpack_get      a one-line function returning msgpack.unpackb(d.get(k))
  raw_fsync_overwrite  the same, but pwrite over an already written file (no size change per
                  fdatasync, as SQLite's reused WAL): informational, for the log's design
  raw_putmulti    one LMDB putmulti of the flusher row's entries, in one synced transaction
(The raw recovery pass lives with the recovery rows, which share its log.)
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lmdb
import msgpack

import wbcache
from bench.config import BenchConfig
from bench.harness import run_chunks, run_threads
from bench.measurement import Measurement, Sample
from bench.workload import Scratch, Workload

CHUNK = 1_000
PREWRITTEN_MIB = 32  # size of the file the overwrite row cycles through
SECTION = "baselines"


def measurements(config: BenchConfig, workload: Workload, scratch: Scratch) -> list[Measurement]:
    record: list[bytes] = []

    def raw_fsync() -> Sample:
        if not record:
            record.append(bytes_of_one_put(scratch, workload.keys[1], workload.dict_values[1]))
        record_bytes = record[0]
        with scratch.directory("raw-fsync") as path:
            fd = os.open(path / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            try:
                def op() -> None:
                    os.write(fd, record_bytes)
                    os.fdatasync(fd)
                return run_threads([op], config.trial_seconds, config.warmup_seconds)
            finally:
                os.close(fd)

    def raw_fsync_overwrite() -> Sample:
        if not record:
            record.append(bytes_of_one_put(scratch, workload.keys[1], workload.dict_values[1]))
        record_bytes = record[0]
        with scratch.directory("raw-overwrite") as path:
            fd = os.open(path / "log", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                zeros = bytes(1 << 20)
                for _ in range(PREWRITTEN_MIB):
                    os.write(fd, zeros)
                os.fsync(fd)
                end = (PREWRITTEN_MIB << 20) - len(record_bytes)
                offset = [0]

                def op() -> None:
                    os.pwrite(fd, record_bytes, offset[0])
                    os.fdatasync(fd)
                    offset[0] = offset[0] + len(record_bytes) if offset[0] < end else 0
                return run_threads([op], config.trial_seconds, config.warmup_seconds)
            finally:
                os.close(fd)

    def dict_msgpack() -> Sample:
        store: dict[str, bytes] = {}
        packb = msgpack.packb
        next_part = pair_parts(workload.keys, workload.dict_values)

        def chunk() -> int:  # the loop body is the measured thing: keep it one line
            part = next_part()
            for k, v in part:
                store[k] = packb(v)
            return len(part)
        return run_chunks(chunk, config.trial_seconds, config.warmup_seconds)

    def dict_get(order: list[str]) -> Callable[[], Sample]:
        def trial() -> Sample:
            store = dict(zip(workload.keys, workload.str_values, strict=True))

            def get(k: str) -> Any:
                return store.get(k)
            return _get_loop(get, order, config)
        return trial

    def unpack_get() -> Sample:
        store = dict(zip(workload.keys, workload.encoded_values, strict=True))
        unpackb = msgpack.unpackb

        def get(k: str) -> Any:
            return unpackb(store.get(k))
        return _get_loop(get, workload.keys, config)

    def raw_putmulti() -> Sample:
        keys, values = workload.distinct(config.flush_entries)  # the flusher row's entries
        entries = [(key.encode(), msgpack.packb(value))
                   for key, value in zip(keys, values, strict=True)]
        with scratch.directory("raw-putmulti") as path:
            return Sample(len(entries) / timed_putmulti(path / "db", entries))

    return [
        Measurement("raw_fsync", SECTION, "raw os.write + os.fdatasync loop (1 record)",
                    raw_fsync, baseline="raw_fsync", series="raw write+fdatasync loop",
                    concurrency=1, anchor=True),
        Measurement("raw_fsync_overwrite", SECTION,
                    "raw os.pwrite + os.fdatasync over a pre-written file (informational)",
                    raw_fsync_overwrite, baseline="raw_fsync", anchor=True,
                    note="no size change per sync: what a reused/preallocated log pays"),
        Measurement("dict_msgpack", SECTION, "dict[k] = msgpack.packb(v) loop", dict_msgpack,
                    anchor=True),
        Measurement("dict_get", SECTION, "def f(k): return d.get(k)", dict_get(workload.keys),
                    anchor=True),
        Measurement("dict_get_random", SECTION,
                    "def f(k): return d.get(k), keys in random order (informational)",
                    dict_get(workload.shuffled_keys), anchor=True),
        Measurement("unpack_get", SECTION, "def f(k): return msgpack.unpackb(d.get(k))",
                    unpack_get, anchor=True),
        Measurement("raw_putmulti", SECTION,
                    f"raw LMDB putmulti of {config.flush_entries:,} entries, 1 synced txn",
                    raw_putmulti, unit="entries/s", big=True),
    ]


def bytes_of_one_put(scratch: Scratch, key: str, value: Any) -> bytes:
    """What one `put(key, value)` appends to the log, read back from a real cache's newest
    segment (so the baseline follows the log format, whatever it becomes)."""
    with scratch.directory("one-put") as path:
        with wbcache.open(path / "c") as cache:
            cache.put("warm-up", 0)
            segment = max((path / "c" / "wal").glob("*.log"))
            before = segment.stat().st_size
            cache.put(key, value)
            after = segment.stat().st_size
        with open(segment, "rb") as log:
            log.seek(before)
            return log.read(after - before)


def timed_putmulti(db_path: Path, entries: list[tuple[bytes, bytes]]) -> float:
    """Seconds to store `entries` with one putmulti in one synced LMDB transaction (a fresh
    database opened as wbcache opens its own: sync and metasync on, 1 GiB map)."""
    env = lmdb.open(str(db_path), map_size=1 << 30, subdir=True, max_dbs=3, sync=True,
                    metasync=True)
    try:
        db = env.open_db(b"str")
        started = time.perf_counter()
        with env.begin(write=True) as txn:
            txn.cursor(db=db).putmulti(entries)
        return time.perf_counter() - started
    finally:
        env.close()


def pair_parts(keys: list[str], values: list[Any]) -> Callable[[], list[tuple[str, Any]]]:
    """Returns the next CHUNK (key, value) pairs on each call, cycling over all of them."""
    pairs = list(zip(keys, values, strict=True))
    return itertools.cycle([pairs[i:i + CHUNK] for i in range(0, len(pairs), CHUNK)]).__next__


def _get_loop(get: Callable[[str], Any], keys: list[str], config: BenchConfig) -> Sample:
    """`get(k)` over the keys, CHUNK at a time: the loop shape the wbcache get rows use too."""
    return run_chunks(get_chunks(get, keys), config.trial_seconds, config.warmup_seconds)


def get_chunks(get: Callable[[str], Any], keys: list[str]) -> Callable[[], int]:
    parts = [keys[start:start + CHUNK] for start in range(0, len(keys), CHUNK)]
    cycle = itertools.cycle(parts)

    def chunk() -> int:
        part = next(cycle)
        for k in part:
            get(k)
        return len(part)
    return chunk
