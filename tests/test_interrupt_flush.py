"""An interrupt (KeyboardInterrupt, a signal handler's exception) at every point of a flush
(tests/interrupt_support.py), into a database that adds increments itself: a shared
directory's LMDB, PostgreSQL. The flush's commit may have gone through when the interrupt
leaves it; the next flush must not add its increments a second time (the interrupt sweep
found 5 acknowledged increments stored as 10: the batch stayed in flight, and the next flush
sent it again, merged with what came after)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from types import CodeType
from typing import Any

import msgpack
from pg_support import pg_dsn_fixture, pg_schema_fixture, table_fixture  # noqa: F401

import wbcache
from tests.interrupt_support import code_of, every_point
from wbcache.backends.lmdb import LmdbDatabase, SharedLmdbBackend
from wbcache.backends.postgres import PostgresBackend
from wbcache.flusher import Flusher
from wbcache.recovery import apply_changes
from wbcache.sequencer import Sequencer

INCREMENTS = 5  # per point walked

FLUSH = [code_of(function) for function in (
    Flusher.flush, Flusher._cycle, Flusher._send, Flusher._apply, Flusher._rebase_counters,
    Flusher._delete_covered_segments, apply_changes, Sequencer.take_dirty, Sequencer.flushed)]


def _stored(cache: wbcache.Cache, key: str) -> Any:
    encoded = cache._backend.get(key)  # what the database holds, not memory's view of it
    return None if encoded is None else msgpack.unpackb(encoded)


def _walk(cache: wbcache.Cache, codes: list[CodeType]) -> int:
    """Interrupt the flush of 5 increments and a put at each point in turn; after each, one
    more increment and a flush that runs whole leave the database holding every write
    exactly once."""
    points = 0
    for point in every_point(codes):
        for _ in range(INCREMENTS):
            cache.incr("n")
        cache.put("k", points)
        point.run(cache.flush)
        cache.incr("n")  # merged into a batch committed already, it was added twice
        cache.flush()
        assert _stored(cache, "n") == (INCREMENTS + 1) * (points + 1), point.fired_in
        assert _stored(cache, "k") == points, point.fired_in
        assert cache.get("n") == (INCREMENTS + 1) * (points + 1), point.fired_in
        points += 1
    return points


def _check_reopened(reopen: Callable[[], wbcache.Cache], points: int) -> None:
    with reopen() as cache:
        assert cache["n"] == (INCREMENTS + 1) * points
        assert cache["k"] == points - 1


def test_an_interrupted_flush_of_a_shared_directory_adds_its_increments_once(
        tmp_path: Path) -> None:
    path = tmp_path / "shared"
    open_ = functools.partial(wbcache.open, path, shared=True, flush_interval=3600)
    cache = open_()
    points = _walk(cache, FLUSH + [code_of(SharedLmdbBackend.apply),
                                   code_of(LmdbDatabase.write)])
    assert points > 50  # the walk reached past the commit (152 points on 3.11)
    cache.close()
    _check_reopened(open_, points)


def test_an_interrupted_flush_into_postgresql_adds_its_increments_once(
        tmp_path: Path, pg_dsn: str, table: str) -> None:
    def open_() -> wbcache.Cache:
        return wbcache.open(tmp_path / "pg", backend=f"{pg_dsn}?table={table}",
                            flush_interval=3600)

    cache = open_()
    points = _walk(cache, FLUSH + [code_of(function) for function in (
        PostgresBackend.apply, PostgresBackend._settle, PostgresBackend._save_known,
        PostgresBackend._forget_attempts)])
    assert points > 50
    cache.close()
    _check_reopened(open_, points)


def test_a_second_interrupt_in_postgresql_s_handler_for_the_first_loses_nothing(
        tmp_path: Path, pg_dsn: str, table: str, monkeypatch: Any) -> None:
    """The first interrupt arrives once the COMMIT went through (as psycopg returns); the
    second at each point of what `apply` runs after it. The attempt must stay recorded
    whatever the second one skips: it was lost when the second landed in the handler before
    it appended the record, and every later flush met a checkpoint it did not expect."""
    cache = wbcache.open(tmp_path / "pg", backend=f"{pg_dsn}?table={table}",
                         flush_interval=3600)
    link = cache._backend._link
    committed = link.transaction

    firsts: list[int] = []

    def commits_then_interrupted(*args: Any) -> None:
        committed(*args)
        firsts.append(points)
        raise KeyboardInterrupt("the first, as the COMMIT's answer came back")

    points = 0
    for point in every_point([code_of(PostgresBackend.apply)]):
        for _ in range(INCREMENTS):
            cache.incr("n")
        monkeypatch.setattr(link, "transaction", commits_then_interrupted)
        with point:
            try:
                cache.flush()
            except KeyboardInterrupt:
                pass
        monkeypatch.setattr(link, "transaction", committed)
        cache.incr("n")
        cache.flush()
        points += 1
        assert _stored(cache, "n") == (INCREMENTS + 1) * points, point.fired_in
    # Every point up to the transaction, and the runs where the first came with nothing
    # after it to interrupt (none now; 5 points of its handler before the fix, on 3.11).
    assert points > 10 and firsts
    cache.close()
    with wbcache.open(tmp_path / "pg", backend=f"{pg_dsn}?table={table}") as cache:
        assert cache["n"] == (INCREMENTS + 1) * points
