"""wbcache over PostgreSQL against PostgreSQL alone: same threads, same keys and values, same
run. Every put is durable when it returns, on both sides.

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

The far-link section runs the write-through and write-back rows again with the database
behind `bench/delay_proxy.py` (`far_delay` each way, in a process of its own), at each of
`far_threads`, and a hot-key pair (16 threads over `far_hot_keys` keys) whose write-back row
reports database transactions per client write: each flush is one transaction, so this is
(flushes + failed flush attempts) / acknowledged puts, the final flush included.

Without a server (--pg-dsn or WBCACHE_BENCH_PG_DSN) the rows say "not configured". Each trial
writes a fresh table in the run's own schema (postgres_server.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import msgpack

import wbcache
from bench.config import BenchConfig
from bench.harness import Op, run_threads
from bench.measurement import Measurement, Sample
from bench.peers import cycling_op
from bench.postgres_server import BenchSchema, FarLink, Link
from bench.wbcache_rows import HOLD_OPTIONS, fill
from bench.workload import Scratch, Workload

SECTION = "postgres"
FAR_SECTION = "postgres-far"
NOT_CONFIGURED = "not configured"
HOT_THREADS = 16

Pairs = Callable[[int, int], tuple[list[str], list[Any]]]  # (worker, workers) -> its keys, values
Route = Callable[[], Link]


def measurements(config: BenchConfig, workload: Workload, scratch: Scratch,
                 resources: contextlib.ExitStack) -> list[Measurement]:
    threads, entries = config.pg_threads, config.pg_flush_entries
    specs: list[tuple[str, str, str, Callable[..., Callable[[], Sample]], dict[str, Any]]] = [
        (SECTION, "pg_write_through",
         f"PostgreSQL alone, 1 transaction per put (write-through), {threads} threads",
         _write_through, {"baseline": "pg_write_through", "concurrency": threads,
                          "series": "PostgreSQL alone, 1 txn per put"}),
        (SECTION, "pg_write_back", f"wbcache over PostgreSQL, put, fsync always, {threads} threads",
         _write_back, {"baseline": "pg_write_through", "concurrency": threads,
                       "series": "wbcache over PostgreSQL"}),
        (SECTION, "pg_flush_puts", f"flusher into PostgreSQL, {entries:,} dirty puts per flush",
         _flush_puts, {"unit": "entries/s", "big": True}),
        (SECTION, "pg_flush_incrs",
         f"flusher into PostgreSQL, {entries:,} dirty increments per flush",
         _flush_increments, {"unit": "entries/s", "big": True}),
    ]
    for n in config.far_threads:
        plural = "s" * (n > 1)
        specs += [
            (FAR_SECTION, f"far_write_through_t{n}",
             f"far: PostgreSQL alone, 1 transaction per put (write-through), {n} thread{plural}",
             _write_through, {"baseline": f"far_write_through_t{n}", "far": True, "threads": n}),
            (FAR_SECTION, f"far_write_back_t{n}",
             f"far: wbcache over PostgreSQL, put, fsync always, {n} thread{plural}",
             _write_back, {"baseline": f"far_write_through_t{n}", "far": True, "threads": n}),
        ]
    hot = config.far_hot_keys
    specs += [
        (FAR_SECTION, "far_hot_write_through",
         f"far: write-through, {HOT_THREADS} threads over {hot} hot keys",
         _write_through, {"baseline": "far_hot_write_through", "far": True,
                          "threads": HOT_THREADS, "hot": hot}),
        (FAR_SECTION, "far_hot_write_back",
         f"far: wbcache write-back, {HOT_THREADS} threads over {hot} hot keys",
         _write_back, {"baseline": "far_hot_write_through", "far": True,
                       "threads": HOT_THREADS, "hot": hot}),
    ]
    if not config.pg_dsn:
        return [Measurement(row_id, section, label, None, unavailable=NOT_CONFIGURED,
                            note="" if index else "give a server: --pg-dsn or "
                                                  "WBCACHE_BENCH_PG_DSN")
                for index, (section, row_id, label, _factory, _options) in enumerate(specs)]
    schema = BenchSchema(config.pg_dsn, resources)
    far = FarLink(schema, config.far_delay, resources)
    direct = Link(schema.dsn)
    rows = []
    for section, row_id, label, factory, options in specs:
        options = dict(options)
        route: Route = far.link if options.pop("far", False) else (lambda: direct)
        threads_here = options.pop("threads", threads)
        hot_keys = options.pop("hot", None)
        pairs: Pairs = (workload.slice_for if hot_keys is None
                        else _hot_pairs(workload, hot_keys))
        if factory in (_write_through, _write_back):
            trial = factory(config, scratch, schema, route, threads_here, pairs)
        else:
            trial = factory(config, workload, scratch, schema)
        unavailable = far.unavailable if section == FAR_SECTION else None
        rows.append(Measurement(row_id, section, label, None if unavailable else trial,
                                unavailable=unavailable, **options))
    return rows


def _hot_pairs(workload: Workload, count: int) -> Pairs:
    keys, values = workload.keys[:count], workload.dict_values[:count]

    def pairs(worker: int, workers: int) -> tuple[list[str], list[Any]]:
        return keys[worker::workers], values[worker::workers]
    return pairs


def _write_through(config: BenchConfig, scratch: Scratch, schema: BenchSchema, route: Route,
                   threads: int, pairs: Pairs) -> Callable[[], Sample]:
    def trial() -> Sample:
        link = route()
        table = schema.table("write_through")
        wbcache.PostgresBackend(schema.dsn, table=table).close()  # wbcache's own layout
        upsert = (f"INSERT INTO {table} (key, value) VALUES (%b, %b) "
                  "ON CONFLICT (key) DO UPDATE SET num = NULL, value = EXCLUDED.value")
        connections = [schema.connect(link.dsn) for _ in range(threads)]
        try:
            ops: list[Op] = []
            for worker, connection in enumerate(connections):
                def put(key: str, value: Any, execute: Any = connection.execute) -> None:
                    execute(upsert, (b"s" + key.encode(), msgpack.packb(value)))
                ops.append(cycling_op(put, *pairs(worker, threads)))
            with _ProxyLoad(link) as proxy:
                sample = run_threads(ops, config.trial_seconds, config.warmup_seconds)
        finally:
            for connection in connections:
                connection.close()
        notes = [schema.describe(), "1 transaction per put", link.description, proxy.note]
        return dataclasses.replace(sample, note="; ".join(note for note in notes if note),
                                   extra={"txn_per_write": 1.0})
    return trial


def _write_back(config: BenchConfig, scratch: Scratch, schema: BenchSchema, route: Route,
                threads: int, pairs: Pairs) -> Callable[[], Sample]:
    def trial() -> Sample:
        link = route()
        backend = wbcache.PostgresBackend(link.dsn, table=schema.table("write_back"))
        try:
            with scratch.directory("pg-write-back") as path:
                cache = wbcache.open(path / "c", backend=backend, fsync="always")
                try:
                    writers = [_AcknowledgedPuts(cache.put, *pairs(worker, threads))
                               for worker in range(threads)]
                    with _ProxyLoad(link) as proxy:
                        sample = run_threads([writer.op for writer in writers],
                                             config.trial_seconds, config.warmup_seconds)
                    started = time.perf_counter()
                    cache.flush()
                    drain = time.perf_counter() - started
                    stats = cache.stats()
                finally:
                    cache.close()
            checked = _read_back(backend, writers)
        finally:
            backend.close()
        per_fsync = stats["writes"] / stats["fsyncs"] if stats["fsyncs"] else 0.0
        transactions = stats["flushes"] + stats["flush_errors"]
        per_write = transactions / stats["writes"] if stats["writes"] else 0.0
        notes = [f"{per_fsync:.1f} writes per fsync",
                 f"{per_write:.5f} database transactions per put ({transactions:,} flushes "
                 f"for {stats['writes']:,} puts)",
                 f"final flush {drain * 1e3:.0f} ms",
                 f"all {checked:,} acknowledged keys read back from PostgreSQL",
                 link.description, proxy.note]
        return dataclasses.replace(sample, note="; ".join(note for note in notes if note),
                                   extra={"txn_per_write": per_write})
    return trial


class _ProxyLoad:
    """How busy the far link's proxy was while a trial ran (a fairness check: a proxy short of
    CPU would slow the side that talks to the database most, write-through)."""

    def __init__(self, link: Link) -> None:
        self._cpu = link.cpu_seconds
        self._started = (0.0, 0.0)
        self.note = ""

    def __enter__(self) -> _ProxyLoad:
        if self._cpu is not None:
            self._started = (self._cpu(), time.perf_counter())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._cpu is not None:
            cpu, wall = self._cpu() - self._started[0], time.perf_counter() - self._started[1]
            self.note = f"proxy busy {cpu / wall * 100:.0f}% of a core"


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
    """How many acknowledged keys PostgreSQL holds, each with its value; raise if one is
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
