"""`AsyncCache`: the cache for asyncio, with one event-loop wake-up per fsync batch. One module
(over 500 lines) because the orphans, the close and the group-commit plumbing below share one
object's state and one set of rules about which thread may touch it.

A write is validated, logged and applied to memory in the loop thread by the sequencer's
non-blocking calls (`put_nowait`, `submit_nowait`), exactly as `Cache` does it but without
waiting: it gets an asyncio future instead. Under fsync="always" the log's own thread
(wal/_pipe.c, no Python, no GIL) writes and fdatasyncs each batch and then writes to an
eventfd the loop watches (`_on_pipe`), which resolves every future the batch covered; under
fsync="interval" (or the fault-injection harness) a background thread leads the group commit
in Python and, after each batch, one `call_soon_threadsafe` does the same. So 1,000
concurrent tasks cost one fsync and one loop wake-up per batch, not one per write, and the
event loop is never blocked by an fsync: a write that would start the next log segment (which
waits for the batch in flight) goes to a worker thread, like one meeting backpressure. A write
acknowledged as it is made (fsync="interval": copied into the mapped log) gives the loop a
turn once every `YIELD_EVERY` (2 ms), so that a task that only writes does not starve the rest. (The
pipe has one eventfd: a second AsyncCache over the same Cache is told of batches by a
background thread instead.)

What may block goes to a worker thread instead, as the blocking `Cache` call: a read that
misses memory (it reads the database), a write that needs a value memory cannot give
(`NeedsRead`: an increment or `pop` of a key not in memory), a write that meets backpressure
(`WouldBlock`), flush, sync, close and the whole-cache views.

Cancellation: once a write call has started, its record is in the log queue and its effect in
memory, or it runs in a worker thread; cancelling the awaiting task does not take it back. The
write becomes durable like any other (or fails with the log); it is never applied twice. A
cancelled write is therefore like a write whose acknowledgement was lost: it may be there
afterwards, and usually is. It never lands after a later write: a write still running in its
worker thread when its task was cancelled (waiting out backpressure, or reading the database
for a `pop` or `incr`) is kept (an orphan, with the keys it writes), and every write of one
of those keys started after the cancellation reached it (its `CancelledError` raised), from
any task of any AsyncCache over the same `Cache` (the orphans are kept per `Cache`, by its
sequencer: `_ORPHANS`),
first waits for it to end (its thread's end, not its task's: `asyncio.run` cancels every task
left at its end, while such a thread may still be writing); `clear` waits for all, and all
for a `clear`. (Otherwise `put(k, 1)` timed out, then `put(k, 2)` acknowledged, could leave
1.) Writes of other keys do not wait: one slow database read must not hold up the cache.
`close` does not wait either: the orphan then lands before the final flush or is refused.
Writes made through the thread-safe `Cache` itself (`.cache`) do not wait for orphans.

An AsyncCache belongs to the event loop that opened it: awaiting it from another loop raises
`LoopMismatchError` before anything is written.

This module uses `Cache`'s public API, the sequencer's (`Cache.sequencer`),
`Cache._get_nowait` (a get answered by memory alone) and `Cache._when_closed` (the loop's
eventfd let go however the cache is closed), nothing else.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, InvalidStateError
from typing import Any, NoReturn, TypeVar

from wbcache import forking
from wbcache.backends.base import Backend, Key
from wbcache.cache import Cache, not_sendable
from wbcache.errors import CacheClosedError, LogFailedError, LoopMismatchError
from wbcache.options import Options
from wbcache.sequencer import NeedsRead, Sequencer, WouldBlock, holds_lock
from wbcache.writes import (
    BatchOperations,
    Op,
    delete_plan,
    ops_plan,
    pop_plan,
    setdefault_plan,
    update_items,
)

T = TypeVar("T")
log = logging.getLogger("wbcache.aio")
# The running loop or None (asyncio exports it): no exception to set up where none runs.
_running_loop = asyncio._get_running_loop
# How long a close awaited from another loop waits for the cache's own loop, still running, to
# run the close's part there (`AsyncCache._in_own_loop`): a loop runs a callback in far less.
OWN_LOOP_WAIT = 1.0
# How long writes acknowledged as they are made (fsync="interval") may keep the loop before
# one gives it back (`_expect`): awaiting a future already done does not yield, and a task
# that only wrote kept every other task and callback (a signal handler's) waiting for seconds.
YIELD_EVERY = 0.002
_NO_DEFAULT: Any = object()


class AsyncCache:
    """The asyncio face of a `Cache`. Open with `await wbcache.open_async(path, **options)`."""

    def __init__(self, cache: Cache, loop: asyncio.AbstractEventLoop) -> None:
        self._cache = cache
        self._sequencer = cache.sequencer
        self._committer = cache.sequencer.committer
        self._limits = cache.limits
        self._loop = loop
        self._create_future = loop.create_future
        # (lsn, future, result) in LSN order, appended in the loop thread
        self._waiters: deque[tuple[int, asyncio.Future[Any], Any]] = deque()
        self._resolve_scheduled = False
        self._yield_at = 0.0  # `time.monotonic()` from which a write gives the loop back
        self._closing: asyncio.Future[None] | None = None
        self._orphans = _orphans_of(cache.sequencer)
        self._committer.add_listener(self._on_batch)
        # Taken by one thread only (`_close_notify_fd`): a close queues that in the loop's
        # thread and may also run it in its own, when the loop is stuck.
        self._notify_lock = threading.Lock()
        self._closing_loop: asyncio.AbstractEventLoop | None = None  # `_close`'s (its hook)
        self._notify_fd = self._committer.notify_fd()
        if self._notify_fd is not None:
            loop.add_reader(self._notify_fd, self._on_pipe)
            # `.cache.close()` (not this close) kept the descriptor open for good, one per
            # cache (an outside hunt of descriptors over many opens and closes).
            cache._when_closed(self._cache_closed)
        else:
            self._committer.start_background_leader()
        self._pid = os.getpid()
        # read here: in a child, the `Cache` may be disowned before this is
        self._path, self._shared = cache.path, cache.options.shared
        forking.track(self)

    @classmethod
    async def open(cls, path: str | os.PathLike[str], *, backend: Backend | str | None = None,
                   **options: Any) -> AsyncCache:
        """Open and recover the directory in a worker thread (recovery reads the whole log)."""
        parsed = Options.from_kwargs(options)
        opening = _Opening()
        future = asyncio.ensure_future(asyncio.to_thread(opening.open, path, parsed, backend))
        try:
            cache = await asyncio.shield(future)
        except asyncio.CancelledError:  # a timeout: what the thread opens, nobody will close
            future.add_done_callback(_retrieve)
            opening.abandon()
            raise
        return cls(cache, asyncio.get_running_loop())

    @property
    def cache(self) -> Cache:
        """The underlying thread-safe `Cache` (for use from other threads)."""
        return self._cache

    @property
    def path(self) -> str:
        return self._cache.path

    @property
    def closed(self) -> bool:
        return self._cache.closed

    # ---------------------------------------------------------- group-commit plumbing

    def _on_batch(self, acknowledged_lsn: int, durable_lsn: int) -> None:
        """Called after each batch by whoever takes it in (the Python leader, a writer
        thread waiting for the pipe, or `_on_pipe`), lock held."""
        if self._resolve_scheduled:
            return
        try:
            covered = self._waiters[0][0] <= acknowledged_lsn
        except IndexError:  # no waiter
            return
        if covered or self._committer.failure is not None:
            self._resolve_scheduled = True
            try:
                self._loop.call_soon_threadsafe(self._resolve)
            except RuntimeError:  # the loop is closed; nobody is waiting any more
                pass

    @holds_lock
    def _on_pipe(self) -> None:
        """In the loop: the log's pipe finished a batch (wal/_pipe.c)."""
        self._resolve_scheduled = True  # resolved right here, not through call_soon
        try:
            with self._sequencer.lock:
                self._committer.poll()
        finally:
            self._resolve()

    def _resolve(self) -> None:
        """In the loop: complete every future the log has acknowledged (or failed)."""
        self._resolve_scheduled = False  # first: a batch acknowledged from here on reschedules
        acknowledged = self._committer.acknowledged_lsn
        waiters = self._waiters
        while waiters and waiters[0][0] <= acknowledged:
            _, future, result = waiters.popleft()
            if not future.done():  # a cancelled waiter's write still happened
                future.set_result(result)
        failure = self._committer.failure
        if failure is not None:
            while waiters:
                _, future, _ = waiters.popleft()
                if not future.done():
                    error = LogFailedError(f"the log failed ({failure}); this write may or may "
                                           f"not be durable")
                    error.__cause__ = failure
                    future.set_exception(error)

    def _expect(self, lsn: int, result: Any) -> asyncio.Future[Any]:
        """A future that resolves to `result` once record `lsn` is acknowledged. Appended
        first, checked second: a batch acknowledged in between either sees the waiter or is
        seen here, so no acknowledgement is missed. One already acknowledged is resolved at
        once, except once every `YIELD_EVERY` s (a turn of the loop later)."""
        future = self._create_future()
        self._waiters.append((lsn, future, result))
        committer = self._committer
        # written_lsn first: a plain attribute, never below what is acknowledged, and below
        # a record just queued nearly always, so the property is rarely read
        if (committer.written_lsn >= lsn and committer.acknowledged_lsn >= lsn
                or committer.failure is not None):
            now = time.monotonic()
            if now < self._yield_at:
                self._resolve()
            else:  # resolved in the loop's next turn: the writer's task lets the others run
                self._yield_at = now + YIELD_EVERY
                self._loop.call_soon(self._resolve)
        return future

    def _check_loop(self) -> None:
        if _running_loop() is not self._loop:
            raise LoopMismatchError(f"this AsyncCache of {self.path} belongs to the event loop "
                                    f"that opened it; use its .cache (a thread-safe Cache) "
                                    f"from other threads or loops")

    async def _write(self, fast: Callable[[], tuple[int, T]], slow: Callable[[], T],
                     keys: frozenset[Key]) -> T:
        """Run `fast` (a non-blocking write of `keys`: its (LSN, result)) in the loop thread
        and await its acknowledgement. When it meets backpressure or needs a value from the
        database, run `slow` (the blocking `Cache` call) in a worker thread instead."""
        self._check_loop()
        if self._orphans:
            await self._after_orphans(keys)
        try:
            lsn, result = fast()
        except (WouldBlock, NeedsRead):
            return await self._in_thread(slow, keys)
        return await self._expect(lsn, result)  # type: ignore[no-any-return]

    async def _in_thread(self, write: Callable[[], T], keys: frozenset[Key] | None) -> T:
        """Run the blocking write `write` of `keys` (None: every key) in a worker thread and
        return what it returns. If the awaiting task is cancelled meanwhile, the thread goes
        on: its write is kept as an orphan, which later writes of its keys wait for
        (`_after_orphans`; module docstring)."""
        ended: Future[None] = Future()  # any loop can wait for it (`asyncio.wrap_future`)
        # Taken once, for good: by `run` as it starts, or by `_abandon` for a `run` that never
        # will (its task cancelled before the thread took it up, as `asyncio.run` does to
        # every task at its end). A started `run` ends the orphan when its write is over.
        turn = threading.Lock()

        def run() -> T:
            if not turn.acquire(False):
                raise asyncio.CancelledError  # abandoned before it started: writes nothing
            try:
                return write()
            finally:
                _end(ended)

        future = asyncio.ensure_future(asyncio.to_thread(run))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            if future.done():  # its own task cancelled first (`asyncio.run` ends in any order)
                _retrieve(future)
                _abandon(turn, ended)
            else:
                future.add_done_callback(_retrieve)  # its task, cancelled, never looks
                future.add_done_callback(lambda _: _abandon(turn, ended))
            if not ended.done():  # its thread writes, or may yet
                with _ORPHANS_LOCK:
                    self._orphans[ended] = keys
                ended.add_done_callback(self._orphan_ended)  # at once if ended meanwhile
            raise

    def _orphan_ended(self, ended: Future[None]) -> None:
        with _ORPHANS_LOCK:
            del self._orphans[ended]

    async def _after_orphans(self, keys: frozenset[Key] | None) -> None:
        """Return once every orphan that writes any of `keys` (None: any key) has ended."""
        while True:
            with _ORPHANS_LOCK:
                overlapping = [orphan for orphan, written in self._orphans.items()
                               if keys is None or written is None
                               or not keys.isdisjoint(written)]
            if not overlapping:
                return
            await asyncio.wait([asyncio.wrap_future(orphan) for orphan in overlapping])

    # ------------------------------------------------------------------- reads

    async def get(self, key: Key, default: Any = None) -> Any:
        self._check_loop()
        try:
            return self._cache._get_nowait(key, default)  # served from memory: no I/O
        except WouldBlock:
            return await asyncio.to_thread(self._cache.get, key, default)

    async def contains(self, key: Key) -> bool:
        """`key in cache`."""
        self._check_loop()
        try:
            return self._cache._get_nowait(key, _NO_DEFAULT) is not _NO_DEFAULT
        except WouldBlock:
            return await asyncio.to_thread(self._cache.__contains__, key)

    async def keys(self) -> list[Key]:
        self._check_loop()
        return list(await asyncio.to_thread(self._cache.keys))

    async def items(self) -> list[tuple[Key, Any]]:
        self._check_loop()
        return list(await asyncio.to_thread(self._cache.items))

    async def values(self) -> list[Any]:
        self._check_loop()
        return list(await asyncio.to_thread(self._cache.values))

    async def count(self) -> int:
        """`len()` of the cache (memory and database merged)."""
        self._check_loop()
        return await asyncio.to_thread(self._cache.__len__)

    # ------------------------------------------------------------------ writes

    async def put(self, key: Key, value: Any) -> int:
        """Store `value` under `key`; return its LSN once durable (see `Cache.put`)."""
        # `_write` inlined: the common write, so it has its own path (no closures, one
        # coroutine), as `Sequencer.put` has.
        _, key, encoded, held = self._limits.put_op(key, value)
        self._check_loop()
        if self._orphans:
            await self._after_orphans(frozenset((key,)))
        try:
            lsn = self._sequencer.put_nowait(key, encoded, held)
        except (WouldBlock, NeedsRead):
            # the value as encoded at the call, not as it may be by the time a thread runs
            return await self._in_thread(lambda: self._sequencer.put(key, encoded, held),
                                         frozenset((key,)))
        return await self._expect(lsn, lsn)  # type: ignore[no-any-return]

    async def delete(self, key: Key) -> int:
        """Delete `key` (a missing key is not an error); return the LSN once durable."""
        key = self._limits.delete_op(key)[1]
        return await self._write(
            lambda: _lsn_twice(self._sequencer.submit_nowait(delete_plan(key))[0]),
            lambda: self._cache.delete(key), frozenset((key,)))

    async def delete_existing(self, key: Key) -> None:
        """Like `del cache[key]`: raise `KeyError` if the key is missing."""
        await self.pop(key)

    async def pop(self, key: Key, default: Any = _NO_DEFAULT) -> Any:
        """`Cache.pop`: remove `key` and return its value, atomically."""
        self._check_loop()
        try:
            key = self._limits.delete_op(key)[1]
        except (TypeError, ValueError):  # a key that cannot be stored is not there
            self._sequencer.check_open()  # as for every other call on a closed cache
            if default is _NO_DEFAULT:
                raise KeyError(key) from None
            return default
        plan = pop_plan(key) if default is _NO_DEFAULT else pop_plan(key, default)
        slow = ((lambda: self._cache.pop(key)) if default is _NO_DEFAULT
                else (lambda: self._cache.pop(key, default)))
        return await self._write(lambda: self._sequencer.submit_nowait(plan, (key,)), slow,
                                 frozenset((key,)))

    async def popitem(self) -> tuple[Key, Any]:
        """`Cache.popitem`: remove and return some (key, value) pair, atomically; KeyError
        when the cache is empty. Which key may take a scan of the database: in a worker
        thread, after every write still running in one (its key is not known before)."""
        self._check_loop()
        if self._orphans:
            await self._after_orphans(None)
        return await self._in_thread(self._cache.popitem, None)

    async def setdefault(self, key: Key, default: Any = None) -> Any:
        """`Cache.setdefault`, atomically."""
        key, op = self._limits.setdefault_op(key, default)
        plan = setdefault_plan(key, op)  # the default as encoded at the call
        return await self._write(lambda: self._sequencer.submit_nowait(plan, (key,)),
                                 lambda: self._sequencer.submit(plan, (key,))[1],
                                 frozenset((key,)))

    async def incr(self, key: Key, delta: int = 1) -> int:
        """Add `delta` atomically; return the new value once durable (see `Cache.incr`)."""
        _, key, delta, _ = self._limits.incr_op(key, delta)
        return await self._write(
            lambda: self._sequencer.submit_nowait(lambda tx: tx.incr(key, delta), (key,)),
            lambda: self._cache.incr(key, delta), frozenset((key,)))

    async def put_many(self, entries: Mapping[Key, Any] | Iterable[tuple[Key, Any]]) -> int:
        """Store every entry atomically, one record and one fsync; return its LSN."""
        return await self._commit(self._limits.put_many_ops(entries))

    async def update(self, other: Any = (), /, **kwargs: Any) -> None:
        """`Cache.update`, atomically."""
        await self.put_many(update_items(other, kwargs))

    async def clear(self) -> None:
        """`Cache.clear` (reads the whole database: in a worker thread)."""
        self._check_loop()
        if self._orphans:
            await self._after_orphans(None)
        await self._in_thread(self._cache.clear, None)

    def batch(self) -> AsyncBatch:
        """`async with cache.batch() as b: b.put(..); b.delete(..); b.incr(..)`."""
        if self._cache.closed:
            raise CacheClosedError(f"cache {self.path} is closed")
        return AsyncBatch(self)

    async def _commit(self, ops: list[Op]) -> int:
        plan, needs = ops_plan(ops)
        return await self._write(
            lambda: _lsn_twice(self._sequencer.submit_nowait(plan, needs)[0]),
            lambda: self._cache.sequencer.submit(plan, needs)[0],
            frozenset(key for _, key, _, _ in ops))

    # ----------------------------------------------------------------- control

    async def flush(self, timeout: float | None = None) -> None:
        self._check_loop()
        await asyncio.to_thread(self._cache.flush, timeout)

    async def sync(self) -> None:
        self._check_loop()
        await asyncio.to_thread(self._cache.sync)

    async def stats(self) -> dict[str, Any]:
        return self._cache.stats()

    async def close(self) -> None:
        """Flush, fsync, release the directory (in a thread of its own). Idempotent. Once
        called, the close goes on whatever happens to its caller: cancelled (a timeout), or
        the loop ending. Awaited in a loop other than the one of a close under way, it runs a
        close of its own instead of waiting for that one, whose loop it cannot await (and
        which may never run again: stopped, closed): `Cache.close` lets one close run at a
        time, so it returns once the first is done, without that one's error if it had one
        (its own caller gets it)."""
        closing = self._closing
        if (closing is None or closing.done()
                or closing.get_loop() is not asyncio.get_running_loop()):
            closing = self._closing = asyncio.ensure_future(self._close())
            closing.add_done_callback(_retrieve)  # a caller that timed out no longer looks
        await asyncio.shield(closing)

    async def _close(self) -> None:
        # Not waiting for orphans first: one may wait out backpressure that a database
        # outage keeps up, which only closing ends (it is refused, or lands before the final
        # flush: as a cancelled write may). A thread of its own, not the loop's executor: a
        # job queued there is dropped if its task is cancelled before it runs.
        loop = asyncio.get_running_loop()  # awaited here, whichever loop this one is
        closed = loop.create_future()
        self._closing_loop = loop  # while it runs, `_finish_close` is left to the `finally`

        def close() -> None:
            failure: BaseException | None = None
            try:
                self._cache.close()
            except BaseException as exc:  # handed to the loop, raised by `close()`
                failure = exc
            try:
                loop.call_soon_threadsafe(_settle, closed, failure)
            except RuntimeError:  # the loop is closed: nobody waits, so the failure is logged
                self._let_go_of_the_loop()  # and the `finally` below never runs
                if failure is not None:
                    log.error("closing %s failed after its event loop ended: %s",
                              self._cache.path, failure)

        thread = threading.Thread(target=close, name="wbcache-async-close")
        thread.start()
        try:
            await closed
        except asyncio.CancelledError:
            # Only the loop cancels this task (`close` shields it), as `asyncio.run` does at
            # its end: the close is waited for here, so that the directory is released by the
            # time the loop is gone (as the loop's executor would be waited for).
            thread.join()
            raise
        finally:
            forking.untrack(self)
            await self._in_own_loop(self._finish_close)

    def _cache_closed(self) -> None:
        """The `Cache`'s log is closed (its close hook), in whichever thread. Under this
        close, while its loop runs, nothing: `_close` runs `_finish_close` itself once
        `Cache.close` returns. Otherwise (a caller of `.cache.close()`, or this close's loop
        stopped or closed before its end) `_let_go_of_the_loop`: without it, the loop's
        descriptor stayed open for good."""
        closing = self._closing_loop
        if closing is None or not closing.is_running():
            self._let_go_of_the_loop()

    def _let_go_of_the_loop(self) -> None:
        """`_finish_close` as `_in_own_loop` runs it, waited for here."""
        ran = self._queue_in_own_loop(self._finish_close)
        if ran is None:
            return
        deadline = time.monotonic() + OWN_LOOP_WAIT
        while True:
            try:
                ran.result(0.1)
                return
            except concurrent.futures.TimeoutError:
                if self._gave_up_on_own_loop(ran, deadline):
                    self._finish_close()
                    return

    def _finish_close(self) -> None:
        self._close_notify_fd()
        if not self._loop.is_closed():  # a closed loop's futures are awaited by no one, and
            self._resolve()  # cannot be resolved; else: the final fsync covered every write

    async def _in_own_loop(self, call: Callable[[], None]) -> None:
        """Run `call` (it touches the loop's reader and futures, which are not thread-safe)
        here if this is the cache's loop or that loop is not running; else in that loop,
        running in another thread (a close awaited from another loop), waited for. If that
        loop stops first, `call` runs here after all: no other thread is in the loop then.
        If it runs but does not get to `call` within OWN_LOOP_WAIT (it is blocked, perhaps
        waiting for this very close), `call` runs here too, as a lesser harm than a hang."""
        ran = self._queue_in_own_loop(call)
        if ran is None:
            return
        waited = asyncio.wrap_future(ran)
        deadline = time.monotonic() + OWN_LOOP_WAIT
        try:
            # a stop is seen by looking: a loop tells no one (a few looks, in a close only)
            while not (await asyncio.wait({waited}, timeout=0.1))[0]:
                if self._gave_up_on_own_loop(ran, deadline):
                    call()
                    return
        except asyncio.CancelledError:  # queued there, it runs there, unless that loop stopped
            if not self._loop.is_running() and ran.cancel():
                call()
            raise
        waited.result()

    def _queue_in_own_loop(self, call: Callable[[], None]
                           ) -> concurrent.futures.Future[None] | None:
        """`_in_own_loop`'s start: `call` run here (None), or queued in the cache's loop,
        running in another thread: the future of that run, which the waiter cancels to run
        `call` itself instead (`_gave_up_on_own_loop`)."""
        own = self._loop
        if _running_loop() is own or not own.is_running():
            call()
            return None
        ran: concurrent.futures.Future[None] = concurrent.futures.Future()

        def run() -> None:
            if ran.set_running_or_notify_cancel():  # not run here instead
                try:
                    call()
                except BaseException as exc:
                    ran.set_exception(exc)
                else:
                    ran.set_result(None)

        try:
            own.call_soon_threadsafe(run)
        except RuntimeError:  # closed meanwhile
            call()
            return None
        return ran

    def _gave_up_on_own_loop(self, ran: concurrent.futures.Future[None],
                             deadline: float) -> bool:
        """Whether the waiter for `ran` runs the call itself now: the loop stopped, or it
        has not got to it by `deadline`, and it has not started it (cancelled)."""
        return ((not self._loop.is_running() or time.monotonic() > deadline)
                and ran.cancel())

    def _close_notify_fd(self) -> None:
        """The pipe is told first (another thread may still be closing the cache, its pipe
        still writing batches): a closed number may be reused by any open in the process."""
        with self._notify_lock:
            fd, self._notify_fd = self._notify_fd, None
        if fd is not None:
            try:
                self._loop.remove_reader(fd)
                self._committer.drop_notify()
            finally:  # taken: nobody else will close it (an interrupt above included)
                os.close(fd)

    async def __aenter__(self) -> AsyncCache:
        if self._cache.closed:
            raise CacheClosedError(f"cache {self.path} is closed")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<wbcache.AsyncCache {self.path!r} {'closed' if self.closed else 'open'}>"

    def __reduce__(self) -> NoReturn:
        raise not_sendable("AsyncCache", self.path)

    def _disown_after_fork(self) -> None:
        """In a child just forked: refuse every use (the `Cache` underneath is disowned too)."""
        fd = self._notify_fd
        try:
            forking.disown(self, _ForkedAsyncCache, "AsyncCache", self._path, self._pid,
                           shared=self._shared)
        finally:
            if fd is not None:  # the parent's pipe writes to it; not ours to watch
                os.close(fd)


class _ForkedAsyncCache(AsyncCache, forking.Disowned):
    """An `AsyncCache` inherited through fork(): every use raises `ForkedCacheError`."""

    __repr__ = forking.Disowned.__repr__  # repr() looks on the type: AsyncCache's comes first

    async def close(self) -> None:  # type: ignore[override]  # AsyncCache's, awaitable
        """In a child: nothing to do (awaitable, as `AsyncCache.close` is)."""


class AsyncBatch(BatchOperations):
    """Operations collected by `AsyncCache.batch()`, written as one record on exit."""

    def __init__(self, owner: AsyncCache) -> None:
        super().__init__(owner.cache.limits, lambda ops: None)
        self._owner = owner

    async def __aenter__(self) -> AsyncBatch:
        self._entered = True
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        ops = self._take(exc_type)
        if ops is not None:
            self.lsn = await self._owner._commit(ops)


class _Opening:
    """A `Cache.open` in a worker thread whose caller may stop waiting (cancelled): the cache
    it opens is then closed, by the thread if it opens it after that, else by `abandon`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._abandoned = False
        self._opened: Cache | None = None

    def open(self, path: str | os.PathLike[str], options: Options,
             backend: Backend | str | None) -> Cache:
        cache = Cache.open(path, options, backend)
        with self._lock:
            if not self._abandoned:
                self._opened = cache
                return cache
        _close_abandoned(cache)
        raise asyncio.CancelledError

    def abandon(self) -> None:
        """In the loop, its caller cancelled: close what was opened (in a thread: it flushes)."""
        with self._lock:
            self._abandoned = True
            cache, self._opened = self._opened, None
        if cache is not None:
            threading.Thread(target=_close_abandoned, args=(cache,),
                             name="wbcache-abandoned-open").start()


def _close_abandoned(cache: Cache) -> None:
    """Close a cache opened for an `open_async` whose caller was cancelled: nobody is there to
    be told if that fails (a database outage), so it is logged."""
    try:
        cache.close()
    except Exception as exc:  # noqa: BLE001 - logged: the caller is gone
        log.error("closing %s, opened for a cancelled open_async(), failed: %s", cache.path,
                  exc)


# Per `Cache` (keyed by its sequencer: a Cache, a mapping, is not hashable), the writes
# whose task was cancelled while their worker thread ran (module docstring): when it ends ->
# the keys it writes, None for every key (`clear`). Shared by every AsyncCache over that
# Cache, whichever loop it belongs to; a forked child starts with none (the threads that
# would end them are not in the child).
_ORPHANS: weakref.WeakKeyDictionary[Sequencer, dict[Future[None], frozenset[Key] | None]] = (
    weakref.WeakKeyDictionary())
_ORPHANS_LOCK = threading.Lock()


def _orphans_of(sequencer: Sequencer) -> dict[Future[None], frozenset[Key] | None]:
    with _ORPHANS_LOCK:
        return _ORPHANS.setdefault(sequencer, {})


def _forget_orphans_in_child() -> None:
    global _ORPHANS_LOCK
    _ORPHANS_LOCK = threading.Lock()  # another thread may have held it at the fork
    _ORPHANS.clear()


os.register_at_fork(after_in_child=_forget_orphans_in_child)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: not logged as "never retrieved"


def _end(ended: Future[None]) -> None:
    try:
        ended.set_result(None)
    except InvalidStateError:  # ended already
        pass


def _settle(future: asyncio.Future[None], failure: BaseException | None) -> None:
    if not future.done():
        if failure is None:
            future.set_result(None)
        else:
            future.set_exception(failure)


def _abandon(turn: threading.Lock, ended: Future[None]) -> None:
    """An orphan's task is done: if its `run` has not started, it never writes (`_in_thread`)."""
    if turn.acquire(False):
        _end(ended)


def _lsn_twice(lsn: int) -> tuple[int, int]:
    """(LSN, result) for a write whose result is its LSN."""
    return lsn, lsn


async def open_async(path: str | os.PathLike[str], *, backend: Backend | str | None = None,
                     **options: Any) -> AsyncCache:
    """`await wbcache.open_async(path, **options)`: `wbcache.open` for asyncio."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, not {type(path).__name__}")
    return await AsyncCache.open(path, backend=backend, **options)


__all__ = ["AsyncBatch", "AsyncCache", "open_async"]
