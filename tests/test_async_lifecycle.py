"""AsyncCache: open and close when their caller is cancelled; writes whose value waits for a
worker thread (backpressure, a read of the database) store it as it was at the call; and
setdefault and update take what dict's take; a close awaited from another loop than that of
a close under way; the loop's descriptor let go whoever closes the cache."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from controlled import ControlledBackend, wait_until

import wbcache
from wbcache import AsyncCache, CacheClosedError


@asynccontextmanager
async def one_busy_worker() -> AsyncIterator[threading.Event]:
    """The loop's default executor as one worker thread, held until the event yielded is set:
    a job handed to a thread meanwhile is queued, not started (no timing involved)."""
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(1))
    release = threading.Event()
    busy = loop.run_in_executor(None, release.wait, 60)
    try:
        yield release
    finally:
        release.set()
        await busy


def test_a_close_whose_caller_is_cancelled_still_closes(tmp_path: Path) -> None:
    """A timeout around `close()` while the loop's executor is busy: the close goes on (its job
    was queued there and dropped, with the loop no longer listening to the log: the cache stayed
    open and every later write hung)."""
    backend = ControlledBackend(tmp_path / "db")

    async def main() -> None:
        cache = await wbcache.open_async(tmp_path / "c", backend=backend)
        await cache.put("a", 1)
        backend.gate.clear()  # the close's final flush waits in the database: it cannot end
        async with one_busy_worker():
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(cache.close(), 0.05)
        backend.gate.set()
        try:  # before the close ends, or after: acknowledged or refused, never left waiting
            await asyncio.wait_for(cache.put("b", 2), 30)
        except CacheClosedError:
            pass
        await cache.close()  # the same close, waited for
        assert cache.closed
        with pytest.raises(CacheClosedError):
            await cache.put("c", 3)

    try:
        asyncio.run(main())
    finally:
        backend.gate.set()
    with wbcache.open(tmp_path / "c", backend=backend) as cache:
        assert cache.get("a") == 1 and "c" not in cache
    backend.close()


def eventfds() -> int:
    fds = Path("/proc/self/fd")
    count = 0
    for fd in fds.iterdir():
        try:
            count += os.readlink(fd) == "anon_inode:[eventfd]"
        except FileNotFoundError:  # the descriptor listing the directory, closed since
            pass
    return count


def test_a_close_the_loop_ends_before_it_ran_still_closes_and_keeps_no_descriptor(
        tmp_path: Path) -> None:
    """`asyncio.run` ending (it cancels every task left) while `close()` waits for a turn of the
    loop's busy executor: the close still happens, and the loop's notify descriptor is closed
    (the job was dropped, leaving the cache open; then its descriptor was kept open for good)."""
    before = eventfds()
    holder: list[AsyncCache] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(1))
        cache = await wbcache.open_async(tmp_path / "c")
        holder.append(cache)
        await cache.put("a", 1)
        loop.run_in_executor(None, threading.Event().wait, 1)  # the one worker, busy
        asyncio.ensure_future(cache.close())
        await asyncio.sleep(0)  # one loop step: the close has started; main returns

    asyncio.run(main())
    assert holder[0].closed and eventfds() == before  # the close, waited for at the loop's end
    with wbcache.open(tmp_path / "c") as cache:
        assert cache.get("a") == 1


def test_an_open_whose_caller_is_cancelled_does_not_keep_the_directory(tmp_path: Path) -> None:
    """`wait_for(open_async(...))` timing out while recovery replays the log into the database:
    the worker thread still opens the cache; nobody holds it, so it is closed, and the
    directory can be opened again (it stayed locked until the process exited)."""
    path, db = tmp_path / "c", tmp_path / "db"
    subprocess.run([sys.executable, "-c", f"""
import os, wbcache
cache = wbcache.open({str(path)!r}, backend=wbcache.LmdbBackend({str(db)!r}),
                     flush_interval=3600)
cache.put("k", 1)
os._exit(0)  # as a crash: the put is only in the log, replayed at the next open
"""], check=True, timeout=60)
    backend = ControlledBackend(db)
    backend.gate.clear()  # recovery's apply waits

    async def main() -> None:
        opening = asyncio.ensure_future(wbcache.open_async(path, backend=backend))
        assert await asyncio.to_thread(backend.entered.wait, 30)  # replaying
        opening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opening
        backend.gate.set()

    try:
        asyncio.run(main())
    finally:
        backend.gate.set()

    def reopens() -> bool:
        try:
            cache = wbcache.open(path, backend=backend)  # a backend given is not closed
        except wbcache.CacheLockedError:
            return False
        with cache:
            assert cache.get("k") == 1
        return True

    try:
        wait_until(reopens, 30, "the abandoned open's cache closed")
    finally:
        backend.close()


def test_a_put_waiting_for_a_thread_stores_the_value_as_it_was_at_the_call(
        tmp_path: Path) -> None:
    """Under backpressure `put` goes to a worker thread; a list changed after the call (and
    before that thread runs) must not be what is stored, as it is not when memory takes it
    at once."""
    async def main() -> None:
        async with await wbcache.open_async(tmp_path / "c", max_dirty=1) as cache:
            await cache.put("a", 0)  # one dirty entry: the next put meets backpressure
            value = [1]
            async with one_busy_worker():
                writing = asyncio.ensure_future(cache.put("k", value))
                await asyncio.sleep(0)  # one loop step: its job is queued behind the worker
                value.append("changed after the call")
            await writing
            assert await cache.get("k") == [1]

    asyncio.run(main())


def test_setdefault_reading_the_database_stores_the_default_as_it_was_at_the_call(
        tmp_path: Path) -> None:
    with wbcache.open(tmp_path / "c") as cache:
        cache.put("other", 1)  # the cache reopened below holds nothing in memory

    async def main() -> None:
        async with await wbcache.open_async(tmp_path / "c") as cache:
            default = {"n": 1}
            async with one_busy_worker():
                writing = asyncio.ensure_future(cache.setdefault("k", default))
                await asyncio.sleep(0)  # one loop step: it needs a read, queued
                default["n"] = 2
            assert await writing == {"n": 1}
            assert await cache.get("k") == {"n": 1}

    asyncio.run(main())


def test_setdefault_looks_at_its_default_only_when_the_key_is_missing(tmp_path: Path) -> None:
    async def main() -> None:
        async with await wbcache.open_async(tmp_path / "c") as cache:
            await cache.put("a", 1)
            before = (await cache.stats())["next_lsn"]
            assert await cache.setdefault("a", object()) == 1
            with pytest.raises(TypeError):
                await cache.setdefault("new", object())
            assert (await cache.stats())["next_lsn"] == before
            assert await cache.setdefault("t", (1, 2)) == [1, 2]

    asyncio.run(main())


def test_update_takes_what_dict_update_takes(tmp_path: Path) -> None:
    """An object with keys() and [] is read as a mapping, by dict.update and Cache.update."""
    class KeysAndItems:
        def keys(self) -> list[str]:
            return ["k1", "k2"]

        def __getitem__(self, key: str) -> str:
            return key.upper()

    async def main() -> None:
        async with await wbcache.open_async(tmp_path / "c") as cache:
            await cache.update(KeysAndItems(), k3="x")
            assert sorted(await cache.items()) == [("k1", "K1"), ("k2", "K2"), ("k3", "x")]

    asyncio.run(main())


def test_one_busy_worker_queues_a_job_until_released() -> None:
    """The helper the tests above rely on: a job handed to a thread waits for the release."""
    async def main() -> None:
        ran = threading.Event()
        async with one_busy_worker():
            job = asyncio.ensure_future(asyncio.to_thread(ran.set))
            await asyncio.sleep(0)
            assert not ran.is_set()
        await job
        assert ran.is_set()

    asyncio.run(main())



def test_a_cache_opened_for_a_cancelled_open_async_that_fails_to_close_is_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Nobody awaits the close of a cache opened for a cancelled `open_async()`: a failure
    (the database down) is logged under wbcache.aio, not raised into a bare thread (where
    threading.excepthook printed its traceback)."""
    from wbcache.aio import _close_abandoned

    backend = ControlledBackend(tmp_path / "db")
    cache = wbcache.open(tmp_path / "c", backend=backend, flush_interval=3600,
                         flush_timeout=0.2)
    cache.put("a", 1)
    backend.failing = True
    with caplog.at_level(logging.ERROR, logger="wbcache.aio"):
        _close_abandoned(cache)
    assert cache.closed
    assert [(r.name, "opened for a cancelled open_async(), failed" in r.getMessage())
            for r in caplog.records] == [("wbcache.aio", True)]
    backend.failing = False
    with wbcache.open(tmp_path / "c", backend=backend) as reopened:
        assert reopened.get("a") == 1
    backend.close()


def test_close_from_another_event_loop_closes_without_error(tmp_path: Path) -> None:
    """Opened in one `asyncio.run`, closed in the next: the close's own future belonged to
    the first loop, and awaiting it raised RuntimeError once the cache was closed."""
    cache = asyncio.run(wbcache.open_async(tmp_path / "c"))
    asyncio.run(cache.close())
    assert cache.closed


def test_close_from_another_thread_s_loop_leaves_the_own_loop_s_reader_to_that_loop(
        tmp_path: Path) -> None:
    """The cache's loop still running in its thread, the close awaited in another thread's
    loop: the notify descriptor is unregistered from the cache's loop in that loop's own
    thread (a selector is not thread-safe; before, the closing thread did it), and then
    closed."""
    own = asyncio.new_event_loop()
    runner = threading.Thread(target=own.run_forever)
    runner.start()
    removed_in: list[int] = []
    removed = threading.Event()
    try:
        cache = asyncio.run_coroutine_threadsafe(wbcache.open_async(tmp_path / "c"),
                                                 own).result(30)
        asyncio.run_coroutine_threadsafe(cache.put("a", 1), own).result(30)
        remove_reader = own.remove_reader

        def recorded(fd: int) -> bool:
            removed_in.append(threading.get_ident())
            try:
                return remove_reader(fd)
            finally:
                removed.set()

        own.remove_reader = recorded  # type: ignore[method-assign]
        asyncio.run(cache.close())
        assert cache.closed
        assert removed.wait(30)
        assert removed_in == [runner.ident]
    finally:
        own.call_soon_threadsafe(own.stop)
        runner.join(30)
        own.close()
    with wbcache.open(tmp_path / "c") as reopened:
        assert reopened.get("a") == 1


def test_close_from_another_loop_still_closes_the_descriptor_if_the_own_loop_stops_first(
        tmp_path: Path) -> None:
    """The cache's loop stops with the close's work queued in it, never to run it: the
    close, awaited from another thread's loop, does that work itself once the loop has
    stopped (it returned with the notify descriptor left open, and waiters unresolved)."""
    own = asyncio.new_event_loop()
    runner = threading.Thread(target=own.run_forever)
    runner.start()
    try:
        cache = asyncio.run_coroutine_threadsafe(wbcache.open_async(tmp_path / "c"),
                                                 own).result(30)
        asyncio.run_coroutine_threadsafe(cache.put("a", 1), own).result(30)
        fd = cache._notify_fd
        assert fd is not None
        queued = threading.Event()
        call_soon_threadsafe = own.call_soon_threadsafe

        def recorded(callback: Any, *args: Any, **kwargs: Any) -> Any:
            handle = call_soon_threadsafe(callback, *args, **kwargs)
            if callback.__qualname__.endswith("_in_own_loop.<locals>.run"):
                queued.set()
            return handle

        def stop_once_the_close_is_queued() -> None:  # holds the loop, then stops it
            assert queued.wait(30)
            own.stop()

        call_soon_threadsafe(stop_once_the_close_is_queued)
        own.call_soon_threadsafe = recorded  # type: ignore[method-assign]
        asyncio.run(cache.close())
        assert cache.closed and cache._notify_fd is None
        with pytest.raises(OSError):
            os.fstat(fd)
    finally:
        runner.join(30)
        own.close()


def own_loop_in_a_thread(tmp_path: Path) -> tuple[asyncio.AbstractEventLoop, threading.Thread,
                                                  AsyncCache]:
    own = asyncio.new_event_loop()
    runner = threading.Thread(target=own.run_forever)
    runner.start()
    cache = asyncio.run_coroutine_threadsafe(wbcache.open_async(tmp_path / "c"), own).result(30)
    asyncio.run_coroutine_threadsafe(cache.put("a", 1), own).result(30)
    return own, runner, cache


def test_a_close_the_own_loop_waits_for_still_ends(tmp_path: Path) -> None:
    """A callback of the cache's loop waits for the close it handed to another loop: the
    close waited for that loop to run its part, forever. It now does the part itself once
    the loop has not got to it in OWN_LOOP_WAIT."""
    own, runner, cache = own_loop_in_a_thread(tmp_path)
    other = asyncio.new_event_loop()
    other_runner = threading.Thread(target=other.run_forever)
    other_runner.start()
    ended: list[float] = []

    def wait_for_the_close() -> None:  # holds the cache's loop
        started = time.monotonic()
        asyncio.run_coroutine_threadsafe(cache.close(), other).result(30)
        ended.append(time.monotonic() - started)

    try:
        own.call_soon_threadsafe(wait_for_the_close)
        wait_until(lambda: bool(ended), 30, "the close to end while its loop is held")
        assert cache.closed and cache._notify_fd is None
        assert ended[0] < 30
    finally:
        for loop, thread in ((own, runner), (other, other_runner)):
            loop.call_soon_threadsafe(loop.stop)
            thread.join(30)
            loop.close()


def test_a_cancelled_close_leaves_its_part_to_the_own_loop_while_it_runs(
        tmp_path: Path) -> None:
    """`asyncio.run(wait_for(cache.close(), t))` from another thread: at its end asyncio.run
    cancels the close, which then did the part queued in the (busy, running) cache's loop
    in its own thread. It stays queued there, and runs there."""
    own, runner, cache = own_loop_in_a_thread(tmp_path)
    release = threading.Event()
    removed_in: list[int] = []
    remove_reader = own.remove_reader

    def recorded(fd: int) -> bool:
        removed_in.append(threading.get_ident())
        return remove_reader(fd)

    own.remove_reader = recorded  # type: ignore[method-assign]
    try:
        own.call_soon_threadsafe(release.wait, 30)  # busy until released
        with pytest.raises(asyncio.TimeoutError):
            asyncio.run(asyncio.wait_for(cache.close(), 0.3))
        release.set()
        wait_until(lambda: bool(removed_in), 30, "the close's part to run")
        assert removed_in == [runner.ident]
    finally:
        release.set()
        own.call_soon_threadsafe(own.stop)
        runner.join(30)
        own.close()


def test_close_from_another_loop_after_the_own_loop_closed_with_a_write_awaited(
        tmp_path: Path) -> None:
    # The own loop closed with a put's future still pending: the close resolved it, and
    # set_result on a closed loop's future raised "Event loop is closed" out of the close.
    loop = asyncio.new_event_loop()
    cache = loop.run_until_complete(wbcache.open_async(tmp_path / "c"))

    async def start() -> asyncio.Future[int]:
        put = asyncio.ensure_future(cache.put("k", 1))
        await asyncio.sleep(0)  # its first step: queued, in memory, awaiting the log
        return put

    put = loop.run_until_complete(start())
    loop.close()
    asyncio.run(cache.close())

    assert cache.closed and not put.done()  # its loop is gone: no one can await it
    with wbcache.open(tmp_path / "c") as reopened:
        assert reopened.get("k") == 1  # the close made it durable all the same


def test_a_close_from_another_loop_while_the_own_loop_s_close_runs_waits_for_it(
        tmp_path: Path) -> None:
    """The own loop's close under way (its final flush held by the database), a close awaited
    in another thread's loop: it raised RuntimeError ("attached to a different loop"),
    awaiting the first close's future from a loop it does not belong to. Now it closes too,
    once the first is done."""
    backend = ControlledBackend(tmp_path / "db")
    own = asyncio.new_event_loop()
    runner = threading.Thread(target=own.run_forever)
    runner.start()
    try:
        cache = asyncio.run_coroutine_threadsafe(
            wbcache.open_async(tmp_path / "c", backend=backend), own).result(30)
        asyncio.run_coroutine_threadsafe(cache.put("a", 1), own).result(30)
        backend.gate.clear()
        backend.entered.clear()
        first = asyncio.run_coroutine_threadsafe(cache.close(), own)
        assert backend.entered.wait(30)  # the first close is in its final flush

        async def second() -> None:
            closing = asyncio.ensure_future(cache.close())
            await asyncio.sleep(0)  # started; it must wait for the first, not fail
            assert not closing.done()
            backend.gate.set()
            await asyncio.wait_for(closing, 30)

        asyncio.run(second())
        first.result(30)
        assert cache.closed
    finally:
        backend.gate.set()
        own.call_soon_threadsafe(own.stop)
        runner.join(30)
        own.close()
    with wbcache.open(tmp_path / "c", backend=backend) as reopened:
        assert reopened.get("a") == 1
    backend.close()


def test_a_close_begun_in_a_loop_that_closed_before_it_ran_is_done_by_the_next(
        tmp_path: Path) -> None:
    """A fire-and-forget close in a loop that then closed before running it (its task never
    runs): every close from a new loop raised RuntimeError, and the directory stayed locked
    for the rest of the process."""
    loop = asyncio.new_event_loop()
    cache = loop.run_until_complete(wbcache.open_async(tmp_path / "c"))
    loop.run_until_complete(cache.put("a", 1))

    async def shutdown_hook() -> None:
        asyncio.ensure_future(cache.close())  # scheduled, not yet run

    loop.run_until_complete(shutdown_hook())
    abandoned = asyncio.all_tasks(loop)  # the close's tasks, never to run
    loop.close()
    asyncio.run(cache.close())
    assert cache.closed
    asyncio.run(cache.close())  # idempotent
    for task in abandoned:  # else Python warns, when it collects them, of a coroutine
        task.get_coro().close()  # never awaited
    with wbcache.open(tmp_path / "c") as reopened:
        assert reopened.get("a") == 1


@pytest.mark.parametrize("where", ["after its loop ended", "in its loop", "from another thread",
                                   "from another thread, its loop held, then stopped"])
def test_closing_the_cache_underneath_lets_go_of_the_loop_s_descriptor(
        tmp_path: Path, where: str) -> None:
    """`async_cache.cache.close()` instead of `await async_cache.close()`: the eventfd the loop
    watched was never closed, one per cache (an outside hunt: 200 opens, 200 descriptors)."""
    before = eventfds()

    async def open_put() -> AsyncCache:
        cache = await wbcache.open_async(tmp_path / "c", fsync="always")
        await cache.put("a", 1)
        return cache

    if where == "after its loop ended":
        cache = asyncio.run(open_put())
        assert eventfds() == before + 1  # the loop is gone, its descriptor is not
        cache.cache.close()
    elif where == "in its loop":
        async def main() -> AsyncCache:
            cache = await open_put()
            cache.cache.close()
            return cache
        cache = asyncio.run(main())
    else:
        own = asyncio.new_event_loop()
        runner = threading.Thread(target=own.run_forever)
        runner.start()
        try:
            cache = asyncio.run_coroutine_threadsafe(open_put(), own).result(30)
            if where == "from another thread":
                cache.cache.close()  # the descriptor is let go in the loop's thread
            else:  # a review: queued in the loop, which stopped before it ran it
                held, release = threading.Event(), threading.Event()

                def hold_then_stop() -> None:
                    held.set()
                    release.wait(30)
                    own.stop()

                own.call_soon_threadsafe(hold_then_stop)
                assert held.wait(30)
                cache.cache.close()  # waits OWN_LOOP_WAIT for the loop, then does it itself
                release.set()
                runner.join(30)
        finally:
            own.call_soon_threadsafe(own.stop)
            runner.join(30)
            own.close()
    assert cache.closed and eventfds() == before
    with wbcache.open(tmp_path / "c") as reopened:
        assert reopened.get("a") == 1


def test_an_interrupt_in_the_close_hook_leaves_no_descriptor(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A review: a KeyboardInterrupt inside the hook (here, as the pipe is told to stop
    writing to the descriptor) lost the descriptor: the hooks were taken off before they ran,
    and the number was taken before it was closed; neither the next close nor
    AsyncCache.close got to it."""
    before = eventfds()

    async def open_put() -> AsyncCache:
        cache = await wbcache.open_async(tmp_path / "c", fsync="always")
        await cache.put("a", 1)
        return cache

    cache = asyncio.run(open_put())
    committer = cache.cache.sequencer.committer
    drop_notify = committer.drop_notify

    def interrupted() -> None:
        monkeypatch.setattr(committer, "drop_notify", drop_notify)
        raise KeyboardInterrupt

    monkeypatch.setattr(committer, "drop_notify", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cache.cache.close()
    cache.cache.close()  # what an interrupted close left, the next one does
    assert cache.closed and eventfds() == before


def test_a_close_whose_loop_closes_before_it_ends_lets_go_of_the_descriptor(
        tmp_path: Path) -> None:
    """A review: `wait_for(close(), t)` timing out (the final flush is slow), then the loop
    closed (no asyncio.run to wait for the close): the close goes on in its thread, but the
    part left to its coroutine's `finally` never ran, and the descriptor stayed open."""
    before = eventfds()
    backend = ControlledBackend(tmp_path / "db")
    loop = asyncio.new_event_loop()
    cache = loop.run_until_complete(wbcache.open_async(tmp_path / "c", backend=backend))
    loop.run_until_complete(cache.put("a", 1))
    backend.gate.clear()
    backend.entered.clear()
    with pytest.raises(asyncio.TimeoutError):
        loop.run_until_complete(asyncio.wait_for(cache.close(), 0.05))
    assert backend.entered.is_set()  # the close is in its final flush, held there
    abandoned = asyncio.all_tasks(loop)
    loop.close()
    backend.gate.set()
    wait_until(lambda: cache.closed and eventfds() == before, 30,
               "the close to end and let go of the descriptor")
    for task in abandoned:  # the close's coroutine, never to resume
        task.get_coro().close()
    with wbcache.open(tmp_path / "c", backend=backend) as reopened:
        assert reopened.get("a") == 1
    backend.close()
