"""The flusher's triggers, and what happens when the database or the log fails."""

from __future__ import annotations

import errno
import fractions
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from controlled import ControlledBackend, wait_until

import wbcache
from wbcache import FlushError, LogFailedError
from wbcache.wal.syscalls import SYSCALLS

OpenCache = Callable[..., wbcache.Cache]


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[ControlledBackend]:
    """Request it BEFORE open_cache, so the cache is closed before the database is."""
    controlled = ControlledBackend(tmp_path / "externaldb")
    yield controlled
    controlled.gate.set()
    controlled.close()


def test_flush_threshold_starts_a_flush_before_the_timer(open_cache: OpenCache) -> None:
    cache = open_cache(flush_interval=3600, flush_threshold=10)
    for i in range(10):
        cache.put(f"k{i}", i)
    wait_until(lambda: cache.stats()["flushes"] >= 1)
    assert cache.stats()["flushed_entries"] >= 10


def test_flush_timer_flushes_without_being_asked(open_cache: OpenCache) -> None:
    cache = open_cache(flush_interval=0.05, flush_threshold=1_000_000)
    cache.put("k", 1)
    wait_until(lambda: cache.stats()["checkpoint_lsn"] >= 1)


def test_capacity_pressure_starts_a_flush_and_evicts_once_clean(open_cache: OpenCache) -> None:
    cache = open_cache(flush_interval=3600, flush_threshold=1_000_000, capacity=10)
    for i in range(50):
        cache.put(f"k{i}", i)
    # every entry is dirty, so none can be evicted until the flusher, woken, has run
    wait_until(lambda: cache.stats()["cached"] <= 10)
    assert cache.stats()["evictions"] >= 40
    assert [cache.get(f"k{i}") for i in range(50)] == list(range(50))


def test_lmdb_map_full_grows_the_map_and_loses_nothing(open_cache: OpenCache) -> None:
    cache = open_cache(map_size=64 * 1024, flush_interval=3600)
    values = {f"k{i}": "v" * 1000 for i in range(1000)}  # ~1 MB into a 64 KiB map
    cache.put_many(values)
    cache.flush()
    assert cache._backend.resizes >= 1  # type: ignore[attr-defined]
    cache.close()
    reopened = open_cache()
    assert len(reopened) == 1000
    assert reopened.get("k999") == "v" * 1000


def test_database_errors_are_retried_counted_and_lose_nothing(
        backend: ControlledBackend, open_cache: OpenCache, cache_dir: Path) -> None:
    cache = open_cache(backend=backend, flush_interval=3600, segment_size=4096)
    backend.failures_left = 3
    for i in range(500):
        cache.put(f"k{i}", i)
    segments_before = len(os.listdir(cache_dir / "wal"))
    cache.flush()  # retries with backoff until the database accepts it
    stats = cache.stats()
    assert stats["flush_errors"] == 3
    assert "database unavailable" in stats["last_flush_error"]
    assert backend.inner.count() == 500
    assert segments_before > 1 and len(os.listdir(cache_dir / "wal")) == 1


def test_log_is_not_truncated_while_the_database_refuses(
        backend: ControlledBackend, open_cache: OpenCache, cache_dir: Path) -> None:
    cache = open_cache(backend=backend, flush_interval=0.01, segment_size=4096)
    backend.failing = True
    for i in range(500):
        cache.put(f"k{i}", i)
    wait_until(lambda: cache.stats()["flush_errors"] >= 3)
    assert len(os.listdir(cache_dir / "wal")) > 1
    assert backend.inner.count() == 0
    backend.failing = False
    wait_until(lambda: backend.inner.count() == 500)
    cache.flush()
    assert len(os.listdir(cache_dir / "wal")) == 1


def test_flush_raises_after_its_timeout_and_keeps_every_write(
        backend: ControlledBackend, open_cache: OpenCache) -> None:
    cache = open_cache(backend=backend, flush_interval=3600)
    backend.failing = True
    cache.put("k", 1)
    with pytest.raises(FlushError, match="log keeps every write"):
        cache.flush(timeout=0.2)
    assert cache.get("k") == 1
    backend.failing = False
    cache.flush()
    assert backend.inner.get("k") is not None


@pytest.mark.parametrize("timeout, error, message", [
    ("1", TypeError, "timeout must be a number of seconds, not str"),
    (True, TypeError, "not bool"),
    (-1, ValueError, "from 0 to"),
    (float("nan"), ValueError, "not nan"),
    (float("inf"), ValueError, "not inf"),
])
def test_a_flush_timeout_that_is_not_a_number_of_seconds_is_refused_clearly(
        open_cache: OpenCache, timeout: object, error: type[Exception], message: str) -> None:
    """Was: `unsupported operand type(s) for +: 'float' and 'str'`, msgpack-like NaN and
    OverflowError messages, and -1 taken by `Lock.acquire` as "wait for good"."""
    cache = open_cache(flush_interval=3600)
    cache.put("k", 1)
    with pytest.raises(error, match=message):
        cache.flush(timeout)  # type: ignore[arg-type]
    cache.flush(fractions.Fraction(1, 2))  # any real number of seconds, as before
    assert cache.stats()["checkpoint_lsn"] == cache.stats()["next_lsn"] - 1


def test_close_with_the_database_down_raises_but_the_log_keeps_everything(
        cache_dir: Path, backend: ControlledBackend) -> None:
    cache = wbcache.open(cache_dir, backend=backend, flush_interval=3600, flush_timeout=0.2)
    backend.failing = True
    cache.put_many({f"k{i}": i for i in range(10)})
    with pytest.raises(FlushError):
        cache.close()
    assert cache.closed
    backend.failing = False
    with wbcache.open(cache_dir, backend=backend) as reopened:
        assert reopened.recovery.replayed == 1
        assert [reopened.get(f"k{i}") for i in range(10)] == list(range(10))


def test_writers_wait_at_max_dirty_and_resume_after_a_flush(
        backend: ControlledBackend, open_cache: OpenCache) -> None:
    cache = open_cache(backend=backend, flush_interval=3600, max_dirty=5, flush_threshold=1000)
    backend.gate.clear()  # the next flush blocks inside the database
    for i in range(5):
        cache.put(f"k{i}", i)
    done = threading.Event()

    def writer() -> None:
        cache.put("k5", 5)
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        assert backend.entered.wait(10)  # backpressure woke the flusher, which is now stuck
        assert not done.wait(0.2)  # the writer waits: nothing is shed, nothing is acknowledged
        assert cache.stats()["dirty"] == 5
    finally:  # a failed assert must not leave the flusher stuck, and the closing cache hung
        backend.gate.set()
    thread.join(10)
    assert done.is_set()
    assert cache.get("k5") == 5


def test_a_key_rewritten_while_its_batch_is_in_flight_counts_once_against_max_dirty(
        backend: ControlledBackend, open_cache: OpenCache) -> None:
    # A batch that failed stays in flight, unmerged with newer writes; a writer rewriting its
    # keys during the outage was counted twice and waited for the whole outage.
    cache = open_cache(backend=backend, flush_interval=3600, max_dirty=10, flush_threshold=1000)
    for i in range(6):
        cache.put(f"k{i}", 0)
    backend.failing = True
    with pytest.raises(FlushError):
        cache.flush(timeout=0.05)  # the 6 keys stay in flight
    for i in range(6):
        writer = threading.Thread(target=cache.put, args=(f"k{i}", 1))
        writer.start()
        writer.join(10)
        assert not writer.is_alive()  # 6 keys not in the database, 10 allowed
    assert cache.stats()["dirty"] == 6
    backend.failing = False
    cache.flush()
    assert cache.stats()["dirty"] == 0
    assert [backend.inner.get(f"k{i}") for i in range(6)] == [b"\x01"] * 6


def test_clear_at_max_dirty_lets_the_flush_it_waits_for_run(open_cache: OpenCache,
                                                             cache_dir: Path) -> None:
    # clear() holds flushes off while it reads the database's keys. Its write used to wait out
    # backpressure right there, for a flush that could never start: clear() and every writer
    # after it hung until close().
    cache = open_cache(flush_interval=3600, max_dirty=3, flush_threshold=1000)
    cache.put("stored", 0)
    cache.flush()  # one key only the database holds: clear() must read it
    for key in ("a", "b", "c"):
        cache.put(key, 1)  # dirty == max_dirty: the next write waits for a flush
    errors: list[BaseException] = []

    def clear() -> None:
        try:
            cache.clear()
        except BaseException as exc:  # pragma: no cover - reported by the assert below
            errors.append(exc)

    thread = threading.Thread(target=clear, daemon=True)
    thread.start()
    thread.join(30)  # a bound on a hang, not a wait for something to happen
    assert not thread.is_alive() and errors == []
    assert list(cache.keys()) == []
    cache.put("after", 2)  # writers go on
    cache.close()
    with wbcache.open(cache_dir) as reopened:
        assert dict(reopened.items()) == {"after": 2}


@pytest.mark.parametrize("segment", ["room", "full"])
def test_clear_at_max_dirty_is_not_held_back_by_writers_waiting_for_room(
        backend: ControlledBackend, open_cache: OpenCache, cache_dir: Path,
        segment: str) -> None:
    """clear() was refused for the lack of room, let flushes run, waited for room and tried
    again; writers already waiting took each room a flush made first, and under steady
    writes with a small max_dirty it never ran (an outside hunt: over 2 minutes on
    PostgreSQL). Here no flush makes room at all (the database refuses every one): it is
    admitted as it is, past max_dirty, as a clear of more keys than that always was. With
    the log's segment full, it starts the next one without waiting for room either (a
    review: the writers held back by it never would)."""
    cache = open_cache(backend=backend, flush_interval=3600, max_dirty=3, flush_threshold=1000,
                       segment_size=4096)
    cache.put("stored", 0)
    cache.flush()  # one key only the database holds: clear() must read it
    backend.failing = True
    for key in ("a", "b", "c"):  # dirty == max_dirty, and no flush will make room
        cache.put(key, "x" * 1400 if segment == "full" else 1)
    assert cache.sequencer.committer.rotation_due() == (segment == "full")
    done: list[BaseException | None] = []

    def clear() -> None:
        try:
            cache.clear()
            done.append(None)
        except BaseException as exc:  # pragma: no cover - reported by the assert below
            done.append(exc)

    thread = threading.Thread(target=clear, daemon=True)
    thread.start()
    thread.join(30)  # a bound on a hang, not a wait for something to happen
    assert done == [None]
    assert list(cache.keys()) == [] and cache.stats()["dirty"] == 4  # "stored" too
    backend.failing = False
    cache.close()
    with wbcache.open(cache_dir, backend=backend.inner) as reopened:
        assert dict(reopened.items()) == {}


def test_a_second_close_returns_only_once_the_first_has_released_the_directory(
        backend: ControlledBackend, open_cache: OpenCache, cache_dir: Path) -> None:
    # It used to return at once, while the first close was still in its final flush: the
    # directory was still locked, and reopening it right after close() failed.
    cache = open_cache(backend=backend, flush_interval=3600)
    cache.put("k", 1)
    backend.gate.clear()  # the final flush blocks inside the database
    first = threading.Thread(target=cache.close)
    first.start()
    second_done = threading.Event()
    second = threading.Thread(target=lambda: (cache.close(), second_done.set()))
    try:
        assert backend.entered.wait(10)
        second.start()
        assert not second_done.wait(0.2)  # the first close is still flushing
    finally:  # a failed assert must not leave the final flush stuck
        backend.gate.set()
    first.join(10)
    second.join(10)
    assert second_done.is_set()
    with wbcache.open(cache_dir, backend=backend) as reopened:
        assert reopened.get("k") == 1


def test_a_failed_fsync_refuses_writes_until_reopened(open_cache: OpenCache,
                                                      cache_dir: Path) -> None:
    cache = open_cache()
    for i in range(10):
        cache.put(f"k{i}", i)

    def failing_fdatasync(fd: int) -> None:
        raise OSError(errno.EIO, "injected fsync failure")

    SYSCALLS.fdatasync = failing_fdatasync  # type: ignore[method-assign]
    try:
        with pytest.raises(LogFailedError):
            cache.put("unacked", 1)
    finally:
        del SYSCALLS.fdatasync
    # the kernel may have dropped the pages: a later fsync proves nothing, so no more writes
    with pytest.raises(LogFailedError):
        cache.put("after", 2)
    with pytest.raises(LogFailedError):
        cache.put_many({"after": 2})
    assert cache.get("k9") == 9  # reads still work
    cache.close()
    reopened = open_cache()
    assert [reopened.get(f"k{i}") for i in range(10)] == list(range(10))
    reopened.put("after", 2)
    assert reopened.get("after") == 2


def test_a_failed_log_write_refuses_writes_and_reopen_recovers(open_cache: OpenCache) -> None:
    cache = open_cache()
    cache.put("before", 1)

    def full_disk(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "injected: no space left on device")

    SYSCALLS.write = full_disk  # type: ignore[method-assign]
    try:
        with pytest.raises(LogFailedError, match="no space"):
            cache.put("unacked", 1)
    finally:
        del SYSCALLS.write
    with pytest.raises(LogFailedError):
        cache.incr("n")
    cache.close()
    assert open_cache().get("before") == 1


def test_a_failed_segment_deletion_is_retried_by_the_next_flush(open_cache: OpenCache,
                                                               cache_dir: Path) -> None:
    cache = open_cache(flush_interval=3600, segment_size=4096)
    for i in range(300):
        cache.put(f"k{i}", "x" * 20)

    def failing_unlink(path: str) -> None:
        raise OSError(errno.EIO, "injected unlink failure")

    SYSCALLS.unlink = failing_unlink  # type: ignore[method-assign]
    try:
        with pytest.raises(FlushError, match="deleting the log segments"):
            cache.flush()  # the data is committed; only the deletion failed, and flush says so
    finally:
        del SYSCALLS.unlink
    assert cache.stats()["flush_errors"] == 1
    assert cache.stats()["checkpoint_lsn"] == 300
    assert len(os.listdir(cache_dir / "wal")) > 1
    cache.flush()  # nothing new to write, but the deletion is retried
    assert len(os.listdir(cache_dir / "wal")) == 1


def test_opening_fsyncs_every_directory_it_creates_files_in(cache_dir: Path) -> None:
    synced: list[str] = []
    real = SYSCALLS.fsync_dir

    def recording(path: str) -> None:
        synced.append(os.path.abspath(path))
        real(path)

    SYSCALLS.fsync_dir = recording  # type: ignore[method-assign]
    try:
        wbcache.open(cache_dir).close()
    finally:
        del SYSCALLS.fsync_dir
    for directory in (cache_dir.parent, cache_dir, cache_dir / "wal", cache_dir / "db"):
        assert str(directory) in synced, directory


def test_reads_of_the_whole_cache_do_not_wait_out_a_database_outage(
        backend: ControlledBackend, open_cache: OpenCache) -> None:
    """The background flusher backs off outside its lock: len() and keys() wait for one
    attempt at most, not for flush_timeout."""
    cache = open_cache(backend=backend, flush_interval=0.01, flush_timeout=30)
    backend.failing = True
    cache.put("k", 1)
    wait_until(lambda: cache.stats()["flush_errors"] >= 3)
    started = time.monotonic()
    assert len(cache) == 1
    assert list(cache.keys()) == ["k"]
    assert time.monotonic() - started < 5  # not the 30 s flush_timeout
    backend.failing = False
    wait_until(lambda: backend.inner.get("k") is not None)


def test_a_writer_that_waited_out_backpressure_is_refused_if_the_log_failed_meanwhile(
        backend: ControlledBackend, open_cache: OpenCache) -> None:
    cache = open_cache(backend=backend, fsync="interval", fsync_interval=3600,
                       flush_interval=3600, max_dirty=2, flush_threshold=1000)
    backend.gate.clear()  # the flush that backpressure starts blocks inside the database
    outcome: list[BaseException | int] = []
    thread = threading.Thread(target=lambda: _put_reporting(cache, "c", 3, outcome))
    try:
        cache.put("a", 1)  # written, not yet fsync'd (interval mode)
        cache.put("b", 2)
        thread.start()
        assert backend.entered.wait(10)  # the writer of "c" now waits for space

        def failing_fdatasync(fd: int) -> None:
            raise OSError(errno.EIO, "injected fsync failure")

        SYSCALLS.fdatasync = failing_fdatasync  # type: ignore[method-assign]
        try:
            with pytest.raises(LogFailedError):
                cache.sync()  # the log fails while the writer waits
        finally:
            del SYSCALLS.fdatasync
    finally:
        backend.gate.set()  # the flush completes and wakes the writer
    thread.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], LogFailedError)
    assert cache.get("c") is None  # refused before anything was logged or remembered


def _put_reporting(cache: wbcache.Cache, key: str, value: int,
                   outcome: list[BaseException | int]) -> None:
    try:
        outcome.append(cache.put(key, value))
    except BaseException as exc:  # reported to the test
        outcome.append(exc)


class _OneApplyAtATime(ControlledBackend):
    """`apply` waits for a permit the test hands out one at a time (`entered` counts arrivals),
    so exactly the cycles the test lets through commit, whatever the threads' timing."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.arrived = threading.Semaphore(0)
        self.permits = threading.Semaphore(0)

    def apply(self, puts: Any, deletes: Any, checkpoint: int, increments: Any = ()) -> None:
        self.arrived.release()
        self.permits.acquire()
        self.inner.apply(puts, deletes, checkpoint, increments)


def test_a_caller_waits_for_the_flush_in_progress_not_for_the_cycles_after_it(
        tmp_path: Path) -> None:
    # len() (like keys(), clear(), flush()) holds the flusher off, waiting for at most the
    # attempt in progress. The background thread used to take its mutex straight back after
    # each cycle while writers kept waking it, so a caller could wait cycle after cycle: with
    # slow commits, into a FlushError against a healthy database.
    # Whether a caller woken as the mutex is let go takes it before the flusher's own next
    # acquire is up to the scheduler, so the mutant that drops the hand-over
    # (mutants/patches/flusher-unfair-mutex.patch) lost that race only most of the time: the
    # scene is played five times, and each must hand the mutex over.
    backend = _OneApplyAtATime(tmp_path / "db")
    cache = wbcache.open(tmp_path / "c", backend=backend, flush_interval=3600,
                         flush_threshold=1)
    counted: list[int] = []
    callers: list[threading.Thread] = []
    try:
        cache.put("k0", 0)  # wakes the flusher, whose cycle now waits inside the database
        for scene in range(5):
            assert backend.arrived.acquire(timeout=10)  # a cycle waits inside the database
            caller = threading.Thread(target=lambda: counted.append(len(cache)))
            callers.append(caller)
            caller.start()
            wait_until(lambda: cache._flusher._waiting == 1,  # noqa: SLF001
                       what="len() waiting for the flusher")
            cache.put(f"k{scene + 1}", scene + 1)  # wakes the flusher: a next cycle at once
            backend.permits.release()  # the cycle in progress, and only it, commits
            wait_until(lambda: len(counted) == scene + 1,  # noqa: B023
                       what="len() returning before the next cycle's commit")
            caller.join(10)
    finally:
        backend.permits.release(1000)
        for caller in callers:
            caller.join(10)
        cache.close()
        backend.close()
    assert counted == [2, 3, 4, 5, 6]
