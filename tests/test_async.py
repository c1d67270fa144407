"""AsyncCache: every method, concurrency, cancellation and errors. One file (over 500 lines)
for the cancellation cases, which share their scenario helpers; opening and closing under
cancellation, and what a write keeps of the caller's objects, are in test_async_lifecycle.py."""

from __future__ import annotations

import asyncio
import errno
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from controlled import ControlledBackend

import wbcache
from wbcache import AsyncCache, CacheClosedError, LogFailedError
from wbcache.wal.syscalls import SYSCALLS

T = TypeVar("T")


def run(path: Path, body: Callable[[AsyncCache], Awaitable[T]], **options: Any) -> T:
    """Open an AsyncCache at `path` in a fresh event loop, run `body`, close it."""

    async def main() -> T:
        async with await wbcache.open_async(path, **options) as cache:
            return await body(cache)

    return asyncio.run(main())


def test_every_method_of_cache_is_a_coroutine_of_async_cache() -> None:
    """README: "AsyncCache has Cache's methods as coroutines". popitem was missing (an outside
    hunt). What Cache has that AsyncCache does not, each for a reason: its identity, limits
    and read_ttl are the Cache's (`.cache`), reopen() is for a Cache inherited through fork,
    and sequencer is for the harness."""
    def public(cls: type) -> set[str]:
        return {name for name in dir(cls) if not name.startswith("_")}

    assert public(wbcache.Cache) - public(AsyncCache) == {
        "cache_id", "limits", "read_ttl", "reopen", "sequencer"}
    assert asyncio.iscoroutinefunction(AsyncCache.popitem)


def test_popitem_removes_every_pair_once_then_raises_key_error(cache_dir: Path) -> None:
    with wbcache.open(cache_dir) as cache:
        cache.put_many({"stored": 1, "also": 2})  # flushed at close: only in the database

    async def body(cache: AsyncCache) -> None:
        await cache.put("new", 3)
        assert await cache.popitem() == ("new", 3)  # the newest key memory holds first
        popped = {await cache.popitem(), await cache.popitem()}
        assert popped == {("stored", 1), ("also", 2)}
        with pytest.raises(KeyError):
            await cache.popitem()
        assert await cache.count() == 0

    run(cache_dir, body)
    with wbcache.open(cache_dir) as cache:
        assert len(cache) == 0


def test_put_get_delete_incr_round_trip(cache_dir: Path) -> None:
    async def body(cache: AsyncCache) -> None:
        first = await cache.put("a", {"x": [1]})
        assert await cache.put(b"a", "bytes") == first + 1
        assert await cache.get("a") == {"x": [1]}
        assert await cache.get(b"a") == "bytes"
        assert await cache.get("missing", 7) == 7
        assert await cache.incr("n") == 1
        assert await cache.incr("n", 41) == 42
        assert await cache.delete("a") > first
        assert await cache.get("a") is None
        assert not await cache.contains("a") and await cache.contains("n")

    run(cache_dir, body)
    with wbcache.open(cache_dir) as cache:  # and it was all durable
        assert cache.get("n") == 42 and cache.get(b"a") == "bytes" and cache.get("a") is None


def test_reads_and_increments_of_keys_only_in_the_database(cache_dir: Path) -> None:
    with wbcache.open(cache_dir) as cache:
        cache.put_many({"stored": "value", "counter": 10})

    async def body(cache: AsyncCache) -> None:
        assert await cache.get("stored") == "value"  # a miss: read in a worker thread
        assert await cache.incr("counter", 5) == 15
        await cache.delete_existing("stored")
        with pytest.raises(KeyError):
            await cache.delete_existing("stored")

    run(cache_dir, body)


def test_put_many_and_batch_are_atomic(cache_dir: Path) -> None:
    async def body(cache: AsyncCache) -> None:
        before = (await cache.stats())["next_lsn"]
        lsn = await cache.put_many({f"k{i}": i for i in range(100)})
        assert lsn == before
        async with cache.batch() as batch:
            batch.put("x", 1)
            batch.incr("x", 2)
            batch.delete("k0")
        assert batch.lsn == lsn + 1
        assert await cache.get("x") == 3 and await cache.get("k0") is None
        with pytest.raises(RuntimeError):
            async with cache.batch() as failed:
                failed.put("never", 1)
                raise RuntimeError("abort")
        assert await cache.get("never") is None
        outside = cache.batch()  # never entered: never written, so refused
        with pytest.raises(ValueError, match="`async with` for AsyncCache"):
            outside.put("outside", 1)
        assert (await cache.stats())["next_lsn"] == lsn + 2

    run(cache_dir, body)


def test_keys_items_count_flush_sync(cache_dir: Path) -> None:
    async def body(cache: AsyncCache) -> None:
        await cache.put_many({"a": 1, "b": 2})
        await cache.flush()
        await cache.put("c", 3)
        await cache.sync()
        assert sorted(await cache.keys()) == ["a", "b", "c"]
        assert sorted(await cache.items()) == [("a", 1), ("b", 2), ("c", 3)]
        assert await cache.count() == 3
        stats = await cache.stats()
        assert stats["checkpoint_lsn"] >= 1 and stats["durable_lsn"] == stats["next_lsn"] - 1

    run(cache_dir, body, fsync="interval")


def test_a_task_that_only_writes_lets_the_other_tasks_run(cache_dir: Path) -> None:
    """Under fsync="interval" a write is acknowledged as it is made, and awaiting a future
    already done does not yield: a task that only wrote kept every other task, and a signal
    handler's callback, waiting until it stopped (12 s in a shutdown hunt)."""
    async def body(cache: AsyncCache) -> None:
        turns, writing = 0, True

        async def other() -> None:
            nonlocal turns
            while writing:
                turns += 1
                await asyncio.sleep(0)

        other_task = asyncio.ensure_future(other())
        await asyncio.sleep(0)  # it has started
        before = turns
        for i in range(20_000):  # a few hundred milliseconds of writes
            await cache.put(f"k{i}", i)
            await cache.put_many({f"m{i}": i})
        during = turns - before
        writing = False
        await other_task
        assert during >= 5, f"the other task ran {during} times in 40,000 writes"
        assert await cache.get("k19999") == 19_999 and await cache.get("m19999") == 19_999

    run(cache_dir, body, fsync="interval")


def test_many_tasks_share_fsyncs_and_each_gets_its_own_result(cache_dir: Path) -> None:
    async def body(cache: AsyncCache) -> None:
        async def worker(task: int) -> list[int]:
            results = []
            for i in range(20):
                await cache.put(f"t{task}:{i}", i)
                results.append(await cache.incr("shared"))
            return results

        results = await asyncio.gather(*(worker(task) for task in range(256)))
        every = sorted(value for task_results in results for value in task_results)
        assert every == list(range(1, 256 * 20 + 1))  # each increment saw its own value
        stats = await cache.stats()
        assert stats["writes"] == 256 * 20 * 2
        # shared: with wal/_pipe.c a batch is what queued during the fsync before it, so
        # how many share one follows the disk (4 to 17 writes on the machines we run on);
        # one fsync each would fail
        assert stats["fsyncs"] < stats["writes"] / 2
        assert await cache.get("t255:19") == 19

    run(cache_dir, body)


def test_the_event_loop_thread_never_fsyncs_and_wakes_once_per_batch(cache_dir: Path) -> None:
    fsync_threads: set[int] = set()
    real = SYSCALLS.fdatasync

    def recording(fd: int) -> None:
        fsync_threads.add(threading.get_ident())
        real(fd)

    async def body(cache: AsyncCache) -> None:
        wakeups = 0
        resolve = cache._resolve

        def counting_resolve() -> None:
            nonlocal wakeups
            wakeups += 1
            resolve()

        cache._resolve = counting_resolve  # type: ignore[method-assign]
        SYSCALLS.fdatasync = recording  # type: ignore[method-assign]
        try:
            await asyncio.gather(*(cache.put(f"k{i}", i) for i in range(2000)))
        finally:
            del SYSCALLS.fdatasync
        batches = (await cache.stats())["log_batches"]
        assert threading.get_ident() not in fsync_threads
        assert fsync_threads  # the background leader did fsync
        assert 1 <= wakeups <= batches

    run(cache_dir, body)


def test_cancelling_a_waiting_write_neither_undoes_nor_repeats_it(cache_dir: Path) -> None:
    async def body(cache: AsyncCache) -> int:
        before = (await cache.stats())["next_lsn"]
        task = asyncio.create_task(cache.put("cancelled", "still written"))
        await asyncio.sleep(0)  # let the task queue its record and await the group commit
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await cache.sync()
        assert await cache.get("cancelled") == "still written"
        assert await cache.put("next", 1) == before + 1  # the write got exactly one LSN
        return before

    before = run(cache_dir, body)
    with wbcache.open(cache_dir) as cache:
        assert cache.get("cancelled") == "still written"
        assert cache.put("after-reopen", 1) == before + 2


def test_bad_input_raises_before_anything_is_logged(cache_dir: Path) -> None:
    async def body(cache: AsyncCache) -> None:
        before = await cache.stats()
        with pytest.raises(TypeError):
            await cache.put(1, "x")  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            await cache.put("k", object())
        with pytest.raises(ValueError):
            await cache.put("", "x")
        with pytest.raises(TypeError):
            await cache.incr("k", 1.5)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            await cache.put_many([("ok", 1), ("bad", {1, 2})])
        await cache.put("s", "text")
        with pytest.raises(TypeError, match="not an int"):
            await cache.incr("s")
        after = await cache.stats()
        assert after["next_lsn"] == before["next_lsn"] + 1

    run(cache_dir, body)


def test_calls_after_close_raise_cache_closed(cache_dir: Path) -> None:
    async def main() -> None:
        cache = await wbcache.open_async(cache_dir)
        await cache.close()
        await cache.close()  # idempotent
        for call in (lambda: cache.put("a", 1), lambda: cache.get("a"), lambda: cache.incr("n"),
                     lambda: cache.delete("a"), lambda: cache.put_many({"a": 1}),
                     lambda: cache.pop(1, "d"), lambda: cache.pop(""),
                     cache.flush, cache.keys, cache.count, cache.popitem):
            with pytest.raises(CacheClosedError):
                await call()
        with pytest.raises(CacheClosedError):
            cache.batch()

    asyncio.run(main())


def test_a_failed_fsync_fails_every_waiting_write(cache_dir: Path) -> None:
    async def body(cache: AsyncCache) -> None:
        await cache.put("before", 1)

        def failing(fd: int) -> None:
            raise OSError(errno.EIO, "injected fsync failure")

        SYSCALLS.fdatasync = failing  # type: ignore[method-assign]
        try:
            results = await asyncio.gather(*(cache.put(f"k{i}", i) for i in range(50)),
                                           return_exceptions=True)
        finally:
            del SYSCALLS.fdatasync
        assert results and all(isinstance(result, LogFailedError) for result in results)
        with pytest.raises(LogFailedError):
            await cache.put("after", 1)

    run(cache_dir, body)
    with wbcache.open(cache_dir) as cache:
        assert cache.get("before") == 1


def test_backpressure_moves_the_write_to_a_thread_and_still_completes(cache_dir: Path) -> None:
    async def body(cache: AsyncCache) -> None:
        # max_dirty=4: most of these writes meet backpressure and wait in worker threads
        await asyncio.gather(*(cache.put(f"k{i}", i) for i in range(40)))
        assert [await cache.get(f"k{i}") for i in range(40)] == list(range(40))
        assert (await cache.stats())["flushes"] >= 1

    run(cache_dir, body, max_dirty=4, flush_interval=3600)


def test_a_second_open_is_refused(cache_dir: Path) -> None:
    async def body(cache: AsyncCache) -> None:
        with pytest.raises(wbcache.CacheLockedError):
            await wbcache.open_async(cache_dir)

    run(cache_dir, body)


def test_awaiting_from_another_event_loop_is_refused_before_anything_is_written(
        cache_dir: Path) -> None:
    """Before, a raw asyncio RuntimeError came up and the write was applied anyway."""
    holder: dict[str, wbcache.AsyncCache] = {}

    async def open_it() -> None:
        holder["cache"] = await wbcache.open_async(cache_dir)

    loop = asyncio.new_event_loop()
    loop.run_until_complete(open_it())
    cache = holder["cache"]
    try:
        lsn_before = cache.cache.stats()["next_lsn"]
        with pytest.raises(wbcache.LoopMismatchError, match="belongs to the event loop"):
            asyncio.run(cache.put("k", 1))  # another loop
        assert cache.cache.stats()["next_lsn"] == lsn_before  # nothing logged
        assert cache.cache.get("k") is None
    finally:
        loop.run_until_complete(cache.close())
        loop.close()


async def cancelled_while_reading(path: Path, backend: ControlledBackend,
                                  write: Callable[[AsyncCache], Awaitable[Any]], *,
                                  every_task: bool = False) -> AsyncCache:
    """An AsyncCache over `path` whose "k" (5) only the database holds, once `write(cache)` (a
    `pop` or `incr` of "k", which reads it in a worker thread) was cancelled while its read
    is held: until `backend.read_gate` is set. `every_task`: as `asyncio.run` does at its end,
    every other task is cancelled too, the worker thread's task first."""
    async with await wbcache.open_async(path, backend=backend) as cache:
        await cache.put("k", 5)
    cache = await wbcache.open_async(path, backend=backend)  # "k" in the database only
    backend.reading.clear()
    backend.read_gate.clear()
    task = asyncio.ensure_future(write(cache))
    assert await asyncio.to_thread(backend.reading.wait, 30)  # its thread is reading
    left = asyncio.all_tasks() - {asyncio.current_task(), task} if every_task else set()
    assert left or not every_task  # the worker thread's task
    for other in left:
        other.cancel()
    await asyncio.gather(*left, return_exceptions=True)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    return cache


def run_then_find_100(path: Path, backend: ControlledBackend,
                      scenario: Callable[[], Awaitable[None]]) -> None:
    """Run `scenario`, then reopen: "k" is 100, the later write's."""
    try:
        asyncio.run(scenario())  # type: ignore[arg-type]
        with wbcache.open(path, backend=backend) as reopened:
            assert reopened.get("k") == 100
    finally:
        backend.read_gate.set()
        backend.close()


@pytest.mark.parametrize("first", ["pop", "incr"])
def test_a_cancelled_write_still_in_its_worker_thread_never_lands_after_a_later_one(
        tmp_path: Path, first: str) -> None:
    """`pop`/`incr` of a key only the database holds runs in a worker thread, which reads it.
    Its task cancelled meanwhile (a timeout), the thread goes on; a later `put` of the key,
    acknowledged, must not be undone when that thread's write lands after it."""
    backend = ControlledBackend(tmp_path / "db")
    path = tmp_path / "cache"

    async def scenario() -> None:
        try:
            cache = await cancelled_while_reading(
                path, backend, lambda cache: cache.pop("k") if first == "pop"
                else cache.incr("k"))
            later = asyncio.ensure_future(cache.put("k", 100))
            await asyncio.sleep(0)  # one loop step, no timing: the later write starts (logs)
        finally:
            backend.read_gate.set()
        await later
        assert await cache.get("k") == 100
        await cache.close()

    run_then_find_100(path, backend, scenario)


@pytest.mark.parametrize("first", [None, "its task", "its thread's task"])
def test_a_cancelled_write_never_lands_after_a_later_one_through_another_async_cache(
        tmp_path: Path, first: str | None) -> None:
    """The cancelled `pop`'s thread still reads the database when a second AsyncCache over the
    same Cache, in another thread's event loop, writes the key: that acknowledged write must
    not be undone either. (Each AsyncCache kept its own orphans: the second did not wait.)

    `first`: as `asyncio.run` does at its end, every task left is cancelled too, in either
    order, the `pop`'s worker-thread task among them. (The thread's task's end ended the
    orphan, or, cancelled first, kept it from being registered: the later write was undone.)"""
    backend = ControlledBackend(tmp_path / "db")
    path = tmp_path / "cache"
    started = threading.Event()

    def later_write(cache: wbcache.Cache) -> int:
        async def write() -> int:
            other = AsyncCache(cache, asyncio.get_running_loop())
            later = asyncio.ensure_future(other.put("k", 100))
            await asyncio.sleep(0)  # one loop step, no timing: the write starts
            started.set()
            return await later

        return asyncio.run(write())

    async def scenario() -> None:
        try:
            cache = await cancelled_while_reading(path, backend, lambda cache: cache.pop("k"),
                                                  every_task=first == "its thread's task")
            left = asyncio.all_tasks() - {asyncio.current_task()} if first else set()
            for task in left:  # cancelled after the pop's task, if not before
                task.cancel()
            await asyncio.gather(*left, return_exceptions=True)
            later = asyncio.ensure_future(asyncio.to_thread(later_write, cache.cache))
            assert await asyncio.to_thread(started.wait, 30)
        finally:
            backend.read_gate.set()
        await later
        assert await cache.get("k") == 100
        await cache.close()

    run_then_find_100(path, backend, scenario)


def test_a_cancelled_write_holds_up_only_writes_of_its_own_keys(tmp_path: Path) -> None:
    """While the cancelled `pop` of a cold key still reads the database, a write of another
    key (in memory: no I/O) is acknowledged without waiting for it; one slow read must not
    hold up the cache. A `put_many` that writes the popped key does wait."""
    backend = ControlledBackend(tmp_path / "db")
    path = tmp_path / "cache"

    async def scenario() -> None:
        async with await wbcache.open_async(path, backend=backend) as cache:
            await cache.put("cold", 5)
        cache = await wbcache.open_async(path, backend=backend)
        await cache.put("hot", 1)
        backend.reading.clear()
        backend.read_gate.clear()
        try:
            write = asyncio.ensure_future(cache.pop("cold"))
            assert await asyncio.to_thread(backend.reading.wait, 30)
            write.cancel()
            with pytest.raises(asyncio.CancelledError):
                await write
            await asyncio.wait_for(cache.put("hot", 2), 30)  # the read is still held
            both = asyncio.ensure_future(cache.put_many({"hot": 3, "cold": 100}))
            await asyncio.sleep(0)  # one loop step, no timing: it starts while the read is held
        finally:
            backend.read_gate.set()
        await both
        assert (await cache.get("hot"), await cache.get("cold")) == (3, 100)
        await cache.close()

    try:
        asyncio.run(scenario())
    finally:
        backend.close()


def test_close_does_not_wait_for_a_cancelled_write_that_a_database_outage_holds_back(
        tmp_path: Path) -> None:
    """The cancelled write waits out backpressure, and with the database down only closing
    ends that: `close` must give up after `flush_timeout` (FlushError, the log keeps every
    write) as the blocking close does, not wait for the write first."""
    backend = ControlledBackend(tmp_path / "db")

    async def scenario() -> None:
        cache = await wbcache.open_async(tmp_path / "cache", backend=backend, max_dirty=2,
                                         flush_timeout=1.0)
        backend.failing = True  # a database outage: nothing flushes, so no room comes
        await cache.put("a", 1)
        await cache.put("b", 2)
        write = asyncio.ensure_future(cache.put("c", 3))
        await asyncio.sleep(0)  # one loop step, no timing: it meets backpressure, a thread
        write.cancel()
        with pytest.raises(asyncio.CancelledError):
            await write
        try:
            with pytest.raises(wbcache.FlushError):
                await asyncio.wait_for(cache.close(), 30)
        finally:
            backend.failing = False  # a failing test's held write goes on: the test ends
        assert cache.closed

    try:
        asyncio.run(scenario())
    finally:
        backend.close()
    database = wbcache.LmdbBackend(str(tmp_path / "db"))
    try:
        with wbcache.open(tmp_path / "cache", backend=database) as reopened:
            assert (reopened.get("a"), reopened.get("b")) == (1, 2)  # the log kept them
    finally:
        database.close()


class ReadThreads(ControlledBackend):
    """Notes the thread of every database read."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.read_in: list[int] = []

    def get(self, key: Any) -> bytes | None:
        self.read_in.append(threading.get_ident())
        return super().get(key)


class SteppingClock:
    """`time` as wbcache.memory sees it: once `step` is set, each look moves it on by that
    much, so an entry fresh at one look has expired at the next."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.step = 0.0

    def monotonic(self) -> float:
        now = self.now
        self.now += self.step
        return now


def test_a_get_never_reads_the_database_in_the_event_loop(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """`get` and `contains` looked at memory, then asked `Cache.get`, which looked again: an
    entry that expired (read_ttl) or was evicted between the two looks was read from the
    database in the loop thread, blocking the loop for the whole read."""
    clock = SteppingClock()
    monkeypatch.setattr("wbcache.memory.time", clock)
    backend = ReadThreads(tmp_path / "db")

    async def scenario() -> None:
        cache = await wbcache.open_async(tmp_path / "cache", backend=backend,
                                         flush_interval=3600, read_ttl=5.0)
        try:
            await cache.put("k", "v")
            await cache.flush()  # clean: it can expire
            loop_thread = threading.get_ident()
            clock.step = 10.0  # each look at the entry's age finds it 10 s older
            assert await cache.get("k") == "v"
            assert await cache.contains("k")
            assert backend.read_in and loop_thread not in backend.read_in
        finally:
            clock.step = 0.0
            await cache.close()

    try:
        asyncio.run(scenario())
    finally:
        backend.close()
