"""wbcache over PostgreSQL against PostgreSQL alone (issue 6): same threads, same keys and
values, same run. Every put is durable when it returns, on both sides.

  pg_write_through  each put an upsert in its own transaction (autocommit), one connection per
                    thread, into a table laid out as wbcache's (keys stored as wbcache stores
                    them): acknowledged once PostgreSQL committed it (durable with fsync and
                    synchronous_commit on, which the note shows)
  pg_write_back     `put` on a cache over `PostgresBackend`, fsync="always": acknowledged once
                    the log holds it, fsync'd; the flusher writes PostgreSQL behind it. The
                    final flush of what is still dirty when the trial ends is not counted (its
                    time is in the note); after it, every acknowledged put is read back from
                    PostgreSQL, and one missing or wrong fails the row
  pg_flush_puts     one `flush()` of `pg_flush_entries` dirty puts: one transaction, one round
                    trip (after a warm-up flush of the same keys: connection, statements)
  pg_flush_incrs    the same with increments, which PostgreSQL adds as deltas

Without a server (--pg-dsn or WBCACHE_BENCH_PG_DSN) the rows say "not configured". Each trial
writes a fresh table in the run's own schema (postgres_server.py).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import msgpack

import wbcache
from bench.config import BenchConfig
from bench.harness import Op, run_threads
from bench.measurement import Measurement, Sample
from bench.peers import cycling_op
from bench.postgres_server import BenchSchema
from bench.wbcache_rows import HOLD_OPTIONS, fill
from bench.workload import Scratch, Workload

SECTION = "postgres"
NOT_CONFIGURED = "not configured"

_TrialFactory = Callable[[BenchConfig, Workload, Scratch, "BenchSchema"], Callable[[], Sample]]


def measurements(config: BenchConfig, workload: Workload, scratch: Scratch,
                 resources: contextlib.ExitStack) -> list[Measurement]:
    threads, entries = config.pg_threads, config.pg_flush_entries
    against = {"baseline": "pg_write_through", "concurrency": threads}
    specs: list[tuple[str, str, _TrialFactory, dict[str, Any]]] = [
        ("pg_write_through", f"PostgreSQL alone, 1 transaction per put (write-through), "
                             f"{threads} threads", _write_through,
         {**against, "series": "PostgreSQL alone, 1 txn per put"}),
        ("pg_write_back", f"wbcache over PostgreSQL, put, fsync always, {threads} threads",
         _write_back, {**against, "series": "wbcache over PostgreSQL"}),
        ("pg_flush_puts", f"flusher into PostgreSQL, {entries:,} dirty puts per flush",
         _flush_puts, {"unit": "entries/s", "big": True}),
        ("pg_flush_incrs", f"flusher into PostgreSQL, {entries:,} dirty increments per flush",
         _flush_increments, {"unit": "entries/s", "big": True}),
    ]
    if not config.pg_dsn:
        return [Measurement(row_id, SECTION, label, None, unavailable=NOT_CONFIGURED,
                            note="" if index else "give a server: --pg-dsn or "
                                                  "WBCACHE_BENCH_PG_DSN")
                for index, (row_id, label, _factory, _options) in enumerate(specs)]
    schema = BenchSchema(config.pg_dsn, resources)
    return [Measurement(row_id, SECTION, label, factory(config, workload, scratch, schema),
                        **options)
            for row_id, label, factory, options in specs]


def _write_through(config: BenchConfig, workload: Workload, scratch: Scratch,
                   schema: BenchSchema) -> Callable[[], Sample]:
    threads = config.pg_threads

    def trial() -> Sample:
        table = schema.table("write_through")
        wbcache.PostgresBackend(schema.dsn, table=table).close()  # wbcache's own layout
        upsert = (f"INSERT INTO {table} (key, value) VALUES (%b, %b) "
                  "ON CONFLICT (key) DO UPDATE SET num = NULL, value = EXCLUDED.value")
        connections = [schema.connect() for _ in range(threads)]
        try:
            ops: list[Op] = []
            for worker, connection in enumerate(connections):
                def put(key: str, value: Any, execute: Any = connection.execute) -> None:
                    execute(upsert, (b"s" + key.encode(), msgpack.packb(value)))
                ops.append(cycling_op(put, *workload.slice_for(worker, threads)))
            sample = run_threads(ops, config.trial_seconds, config.warmup_seconds)
        finally:
            for connection in connections:
                connection.close()
        return Sample(sample.value, sample.p50, sample.p99, schema.describe())
    return trial


def _write_back(config: BenchConfig, workload: Workload, scratch: Scratch,
                schema: BenchSchema) -> Callable[[], Sample]:
    threads = config.pg_threads

    def trial() -> Sample:
        backend = wbcache.PostgresBackend(schema.dsn, table=schema.table("write_back"))
        try:
            with scratch.directory("pg-write-back") as path:
                cache = wbcache.open(path / "c", backend=backend, fsync="always")
                try:
                    writers = [_AcknowledgedPuts(cache.put, *workload.slice_for(worker, threads))
                               for worker in range(threads)]
                    sample = run_threads([writer.op for writer in writers],
                                         config.trial_seconds, config.warmup_seconds)
                    stats = cache.stats()
                    started = time.perf_counter()
                    cache.flush()
                    drain = time.perf_counter() - started
                finally:
                    cache.close()
            checked = _read_back(backend, writers)
        finally:
            backend.close()
        per_fsync = stats["writes"] / stats["fsyncs"] if stats["fsyncs"] else 0.0
        return Sample(sample.value, sample.p50, sample.p99,
                      f"{per_fsync:.1f} writes per fsync; final flush {drain * 1e3:.0f} ms; "
                      f"all {checked:,} acknowledged puts read back from PostgreSQL")
    return trial


class _AcknowledgedPuts:
    """A writer thread's op: put(key, value) on the next of its pairs, cycling, counting the
    calls that returned (its first `acknowledged` pairs, all of them once it wrapped)."""

    def __init__(self, put: Callable[[Any, Any], object], keys: list[str],
                 values: list[Any]) -> None:
        self.pairs = list(zip(keys, values, strict=True))
        self.acknowledged = 0
        pairs, size = self.pairs, len(self.pairs)

        def op() -> None:
            done = self.acknowledged
            put(*pairs[done % size])
            self.acknowledged = done + 1
        self.op: Op = op


def _read_back(backend: wbcache.PostgresBackend, writers: list[_AcknowledgedPuts]) -> int:
    """How many acknowledged puts PostgreSQL holds, each with its value; raise if one is
    missing or wrong (the row then fails: a benchmark of a cache that loses writes is void)."""
    expected = {key: value for writer in writers
                for key, value in writer.pairs[:writer.acknowledged]}
    stored = dict(backend.items())
    wrong = [key for key, value in expected.items()
             if key not in stored or msgpack.unpackb(stored[key]) != value]
    if wrong or len(stored) != len(expected):
        raise RuntimeError(f"after the final flush PostgreSQL holds {len(stored):,} keys; "
                           f"{len(wrong):,} of the {len(expected):,} acknowledged puts are "
                           f"missing or wrong (e.g. {wrong[:3]})")
    return len(expected)


def _flush_puts(config: BenchConfig, workload: Workload, scratch: Scratch,
                schema: BenchSchema) -> Callable[[], Sample]:
    keys, values = workload.distinct(config.pg_flush_entries)
    return _flush_trial(config, scratch, schema, "puts", lambda cache: fill(cache, keys, values))


def _flush_increments(config: BenchConfig, workload: Workload, scratch: Scratch,
                      schema: BenchSchema) -> Callable[[], Sample]:
    keys = [f"n:{i:08d}" for i in range(config.pg_flush_entries)]

    def increment(cache: wbcache.Cache) -> None:
        with cache.batch() as batch:
            for key in keys:
                batch.incr(key)
    return _flush_trial(config, scratch, schema, "increments", increment)


def _flush_trial(config: BenchConfig, scratch: Scratch, schema: BenchSchema, kind: str,
                 make_dirty: Callable[[wbcache.Cache], None]) -> Callable[[], Sample]:
    count = config.pg_flush_entries

    def trial() -> Sample:
        backend = wbcache.PostgresBackend(schema.dsn, table=schema.table(f"flush_{kind}"))
        try:
            with scratch.directory(f"pg-flush-{kind}") as path, \
                    wbcache.open(path / "c", backend=backend, **HOLD_OPTIONS,
                                 flush_threshold=count * 10, max_dirty=count * 10) as cache:
                make_dirty(cache)
                cache.flush()  # warm-up: the connection, its prepared statements, the rows
                make_dirty(cache)
                if cache.stats()["dirty"] != count:
                    raise RuntimeError("the cache flushed on its own while being filled")
                started = time.perf_counter()
                cache.flush()
                seconds = time.perf_counter() - started
        finally:
            backend.close()
        return Sample(count / seconds, note=f"{seconds * 1e3:.1f} ms per flush")
    return trial
