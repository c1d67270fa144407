"""How fast wbcache flushes into PostgreSQL, and what write-back buys over write-through.

Run the full measurement (the numbers in docs/postgres.md) with

    WBCACHE_TEST_PG_DSN=postgresql://postgres@127.0.0.1:5432/test \\
        .venv/bin/python tests/test_postgres_speed.py

Under pytest, a short run of the same code checks that it works and loses nothing; how fast
is for the benchmark to say, not a test.

* flush: a cache holding 10,000 dirty entries (puts, or increments) runs `flush()`; timed from
  the call to its return: coalescing, ONE transaction in PostgreSQL, log truncation.
* write-back vs write-through, same 16 threads, same keys and values, same run: wbcache over
  PostgreSQL (fsync="always": every put durable in the log when it returns; the flusher writes
  PostgreSQL behind) against each put written straight to PostgreSQL in its own transaction
  (an upsert in autocommit, one connection per thread; durable when it returns, since the
  server runs with synchronous_commit=on).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg
from pg_support import pg_dsn_fixture, pg_schema_fixture, query, stored_ints  # noqa: F401

import wbcache
from wbcache.backends.postgres import PostgresBackend

VALUE = {"name": "Ada Lovelace", "langs": ["en", "fr"], "visits": 12345, "pad": "x" * 40}


@dataclass
class FlushTiming:
    kind: str
    entries: int
    seconds: list[float]

    @property
    def rate(self) -> float:
        return self.entries / statistics.median(self.seconds)


def measure_flush(dsn: str, table: str, workdir: Path, *, kind: str, entries: int = 10_000,
                  rounds: int = 5) -> FlushTiming:
    """Time `flush()` of `entries` dirty entries (`kind`: "puts" or "increments")."""
    backend = PostgresBackend(dsn, table=table)
    cache = wbcache.open(workdir / f"flush-{kind}", backend=backend, flush_interval=3600,
                         flush_threshold=entries * 10, max_dirty=entries * 10)
    seconds = []
    try:
        for round_ in range(rounds + 1):  # the first round warms up (table, prepared statements)
            if kind == "puts":
                cache.put_many((f"p{i}", dict(VALUE, visits=round_)) for i in range(entries))
            else:
                with cache.batch() as batch:
                    for i in range(entries):
                        batch.incr(f"n{i}")
            started = time.perf_counter()
            cache.flush()
            if round_:
                seconds.append(time.perf_counter() - started)
    finally:
        cache.close()
        backend.close()
    return FlushTiming(kind, entries, seconds)


@dataclass
class Throughput:
    name: str
    puts: int
    seconds: float
    drain_seconds: float = 0.0  # write-back: the flush of what was still dirty at the end

    @property
    def rate(self) -> float:
        return self.puts / self.seconds


def run_threads(threads: int, seconds: float, put: Callable[[int, int], None]) -> int:
    """`put(thread, i)` from `threads` threads for `seconds`; how many puts returned."""
    stop = threading.Event()
    counts = [0] * threads
    failures: list[BaseException] = []

    def work(thread: int) -> None:
        try:
            i = 0
            while not stop.is_set():
                put(thread, i)
                i += 1
            counts[thread] = i
        except BaseException as exc:  # reported below
            failures.append(exc)

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    stop.wait(seconds)
    stop.set()
    for worker in workers:
        worker.join()
    if failures:
        raise failures[0]
    return sum(counts)


def measure_write_back(dsn: str, table: str, workdir: Path, threads: int,
                       seconds: float) -> Throughput:
    backend = PostgresBackend(dsn, table=table)
    cache = wbcache.open(workdir / "write-back", backend=backend, fsync="always")
    try:
        started = time.perf_counter()
        puts = run_threads(threads, seconds, lambda thread, i: cache.put(
            f"wb{thread}:{i}", dict(VALUE, visits=i)))
        elapsed = time.perf_counter() - started
        draining = time.perf_counter()
        cache.flush()
        drain = time.perf_counter() - draining
    finally:
        cache.close()
        backend.close()
    return Throughput("wbcache over PostgreSQL (write-back)", puts, elapsed, drain)


def measure_write_through(dsn: str, table: str, threads: int, seconds: float) -> Throughput:
    import msgpack

    upsert = (f"INSERT INTO {table} (key, value) VALUES (%b, %b) "
              "ON CONFLICT (key) DO UPDATE SET num = NULL, value = EXCLUDED.value")
    connections = [psycopg.connect(dsn, autocommit=True) for _ in range(threads)]
    try:
        def put(thread: int, i: int) -> None:
            connections[thread].execute(upsert, (f"swt{thread}:{i}".encode(),
                                                 msgpack.packb(dict(VALUE, visits=i))))

        started = time.perf_counter()
        puts = run_threads(threads, seconds, put)
        elapsed = time.perf_counter() - started
    finally:
        for conn in connections:
            conn.close()
    return Throughput("each put in its own PostgreSQL transaction (write-through)", puts,
                      elapsed)


def measure_all(dsn: str, table: str, workdir: Path, *, rounds: int, threads: int,
                seconds: float) -> tuple[list[FlushTiming], Throughput, Throughput]:
    flushes = [measure_flush(dsn, table, workdir, kind=kind, rounds=rounds)
               for kind in ("puts", "increments")]
    through = measure_write_through(dsn, table, threads, seconds)
    back = measure_write_back(dsn, table, workdir, threads, seconds)
    return flushes, back, through


def report(flushes: list[FlushTiming], back: Throughput, through: Throughput) -> str:
    lines = ["flush of 10,000 dirty entries into PostgreSQL (median of rounds):"]
    for timing in flushes:
        lines.append(f"  {timing.kind:<11} {statistics.median(timing.seconds) * 1000:7.1f} ms  "
                     f"{timing.rate:>10,.0f} entries/s")
    lines.append("16 threads putting for the same time, same run:")
    for result in (back, through):
        lines.append(f"  {result.name:<60} {result.rate:>9,.0f} puts/s")
    lines.append(f"  write-back / write-through: {back.rate / through.rate:.1f}x "
                 f"(write-back then flushed its last {back.drain_seconds * 1000:.0f} ms "
                 f"of dirty entries in one flush)")
    return "\n".join(lines)


def test_the_measurement_runs_and_every_acknowledged_put_reaches_postgresql(
        tmp_path: Path, pg_dsn: str, pg_schema: str) -> None:
    table = f"{pg_schema}.speed"
    flushes, back, through = measure_all(pg_dsn, table, tmp_path, rounds=1, threads=16,
                                         seconds=0.5)
    print(report(flushes, back, through))
    assert stored_ints(pg_dsn, table, "n") == {f"n{i}": 2 for i in range(10_000)}
    assert query(pg_dsn, f"SELECT count(*) FROM {table} WHERE key >= 'swb' AND key < 'swc'") \
        == [(back.puts,)]  # every acknowledged write-back put reached PostgreSQL
    assert through.puts > 0  # the write-through side ran (its speed is the benchmark's business)


def main() -> None:
    dsn = os.environ.get("WBCACHE_TEST_PG_DSN")
    if not dsn:
        sys.exit("set WBCACHE_TEST_PG_DSN, e.g. postgresql://postgres@127.0.0.1:5432/test")
    schema = f"wbbench_{uuid.uuid4().hex[:12]}"
    query(dsn, f'CREATE SCHEMA "{schema}"')
    try:
        with tempfile.TemporaryDirectory() as workdir:
            results = measure_all(dsn, f"{schema}.speed", Path(workdir), rounds=9, threads=16,
                                  seconds=5.0)
        print(report(*results))
    finally:
        query(dsn, f'DROP SCHEMA "{schema}" CASCADE')


if __name__ == "__main__":
    main()
