"""`AsyncCache`: the cache for asyncio, with one event-loop wake-up per fsync batch.

A write is validated, logged and applied to memory in the loop thread, under the sequencer
lock, exactly as `Cache` does it, but without waiting: it gets an asyncio future instead. A
background thread leads the group commit (write + fdatasync, never in the loop), and after each
batch one `call_soon_threadsafe` resolves every future the batch covered. So 1,000 concurrent
tasks cost one fsync and one loop wake-up per batch, not one per write, and the event loop is
never blocked by an fsync.

What may block goes to a worker thread instead: a read that misses memory (it reads the
database), an increment or `del` of a key not in memory, a write that meets backpressure,
flush, sync, close and the whole-cache views.

Cancellation: once a write call has started, its record is in the log queue and its effect in
memory; cancelling the awaiting task does not take it back. The write becomes durable like any
other (or fails with the log); it is never applied twice. A cancelled write is therefore like a
write whose acknowledgement was lost: it may be there afterwards, and usually is.

An AsyncCache belongs to the event loop that opened it.
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from wbcache import forking
from wbcache.backends.base import Backend, Key
from wbcache.cache import BatchOperations, Cache, Op, WouldBlock, _check_int64, _NeedsRead
from wbcache.codec import check_delta, check_key, encode_value, in_memory
from wbcache.errors import CacheClosedError, LogFailedError
from wbcache.options import Options

T = TypeVar("T")


def _lsn_twice(lsn: int) -> tuple[int, int]:
    """(LSN, result) for a write whose result is its LSN."""
    return lsn, lsn


class AsyncCache:
    """The asyncio face of a `Cache`. Open with `await wbcache.open_async(path, **options)`."""

    def __init__(self, cache: Cache, loop: asyncio.AbstractEventLoop) -> None:
        self._cache = cache
        self._loop = loop
        # (lsn, future, result) in LSN order: appended under the cache lock in the loop thread
        self._waiters: deque[tuple[int, asyncio.Future[Any], Any]] = deque()
        self._resolve_scheduled = False
        cache._committer.add_listener(self._on_batch)
        cache._committer.start_background_leader()
        self._pid = os.getpid()
        forking.track(self)

    @classmethod
    async def open(cls, path: str | os.PathLike[str], *, backend: Backend | str | None = None,
                   **options: Any) -> AsyncCache:
        """Open and recover the directory in a worker thread (recovery reads the whole log)."""
        parsed = Options.from_kwargs(options)
        cache = await asyncio.to_thread(Cache.open, path, parsed, backend)
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
        """Called by the group-commit leader after each batch (its thread, lock held)."""
        if self._resolve_scheduled:
            return
        try:
            covered = self._waiters[0][0] <= acknowledged_lsn
        except IndexError:  # no waiter
            return
        if covered or self._cache._committer.failure is not None:
            self._resolve_scheduled = True
            try:
                self._loop.call_soon_threadsafe(self._resolve)
            except RuntimeError:  # the loop is closed; nobody is waiting any more
                pass

    def _resolve(self) -> None:
        """In the loop: complete every future the log has acknowledged (or failed)."""
        self._resolve_scheduled = False  # first: a batch acknowledged from here on reschedules
        committer = self._cache._committer
        acknowledged = committer.acknowledged_lsn
        waiters = self._waiters
        while waiters and waiters[0][0] <= acknowledged:
            _, future, result = waiters.popleft()
            if not future.done():  # a cancelled waiter's write still happened
                future.set_result(result)
        failure = committer.failure
        if failure is not None:
            while waiters:
                _, future, _ = waiters.popleft()
                if not future.done():
                    error = LogFailedError(f"the log failed ({failure}); this write may or may "
                                           f"not be durable")
                    error.__cause__ = failure
                    future.set_exception(error)

    def _expect(self, lsn: int, result: Any) -> asyncio.Future[Any]:
        """Lock held. A future that resolves to `result` once record `lsn` is acknowledged."""
        future = self._loop.create_future()
        committer = self._cache._committer
        if committer.acknowledged_lsn >= lsn:
            future.set_result(result)
        else:
            self._waiters.append((lsn, future, result))
            committer.kick()
        return future

    # ------------------------------------------------------------------- reads

    async def get(self, key: Key, default: Any = None) -> Any:
        cache = self._cache
        if key in cache._map and cache._fresh(key):  # served from memory: no I/O, no thread
            return cache.get(key, default)
        return await asyncio.to_thread(cache.get, key, default)

    async def contains(self, key: Key) -> bool:
        cache = self._cache
        if key in cache._map and cache._fresh(key):
            return key in cache
        return await asyncio.to_thread(cache.__contains__, key)

    async def keys(self) -> list[Key]:
        return await asyncio.to_thread(self._cache.keys)

    async def items(self) -> list[tuple[Key, Any]]:
        return await asyncio.to_thread(self._cache.items)

    async def count(self) -> int:
        """`len()` of the cache (memory and database merged)."""
        return await asyncio.to_thread(self._cache.__len__)

    # ------------------------------------------------------------------ writes

    async def put(self, key: Key, value: Any) -> int:
        """Store `value` under `key`; return its LSN once durable (see `Cache.put`)."""
        cache = self._cache
        key = check_key(key, cache._max_key_size)
        encoded = encode_value(value, cache._max_value_size, key)
        held = in_memory(value, encoded)
        return await self._write(
            lambda: _lsn_twice(cache._write_put(key, encoded, held, block=False)),
            lambda: cache.put(key, value))

    async def delete(self, key: Key) -> int:
        """Delete `key` (a missing key is not an error); return the LSN once durable."""
        return await self._delete(key, must_exist=False)

    async def delete_existing(self, key: Key) -> int:
        """Like `del cache[key]`: raise `KeyError` if the key is missing."""
        return await self._delete(key, must_exist=True)

    async def _delete(self, key: Key, *, must_exist: bool) -> int:
        cache = self._cache
        key = check_key(key, cache._stored_key_size)
        return await self._write(
            lambda: _lsn_twice(cache._write_delete(key, must_exist, None, block=False)),
            lambda: cache._delete(key, must_exist=must_exist))

    async def incr(self, key: Key, delta: int = 1) -> int:
        """Add `delta` atomically; return the new value once durable (see `Cache.incr`)."""
        cache = self._cache
        key = check_key(key, cache._max_key_size)
        _check_int64(check_delta(delta), "incr delta")
        return await self._write(
            lambda: cache._write_incr(key, delta, None, block=False),
            lambda: cache.incr(key, delta))

    async def put_many(self, entries: Mapping[Key, Any] | Iterable[tuple[Key, Any]]) -> int:
        """Store every entry atomically, one record and one fsync; return its LSN."""
        return await self._commit(self._cache._put_many_ops(entries))

    def batch(self) -> AsyncBatch:
        """`async with cache.batch() as b: b.put(..); b.delete(..); b.incr(..)`."""
        if self._cache.closed:
            raise CacheClosedError(f"cache {self.path} is closed")
        return AsyncBatch(self)

    async def _commit(self, ops: list[Op]) -> int:
        cache = self._cache
        return await self._write(
            lambda: _lsn_twice(cache._write_batch(ops, None, block=False)),
            lambda: cache._commit(ops))

    async def _write(self, fast: Callable[[], tuple[int, T]], slow: Callable[[], T]) -> T:
        """Run `fast` (a non-blocking write, lock held: its (LSN, result)) in the loop thread
        and await its acknowledgement. When it meets backpressure or needs a value from the
        database, run `slow` (the blocking `Cache` call) in a worker thread instead."""
        future = None
        with self._cache._lock:
            try:
                lsn, result = fast()
            except (WouldBlock, _NeedsRead):
                pass
            else:
                future = self._expect(lsn, result)
        if future is None:
            return await asyncio.to_thread(slow)
        return await future  # type: ignore[no-any-return]

    # ----------------------------------------------------------------- control

    async def flush(self, timeout: float | None = None) -> None:
        await asyncio.to_thread(self._cache.flush, timeout)

    async def sync(self) -> None:
        await asyncio.to_thread(self._cache.sync)

    async def stats(self) -> dict[str, Any]:
        return self._cache.stats()

    async def close(self) -> None:
        """Flush, fsync, release the directory (in a worker thread). Idempotent."""
        forking.untrack(self)
        await asyncio.to_thread(self._cache.close)
        self._resolve()  # the final fsync covered every write; fail any that it did not

    async def __aenter__(self) -> AsyncCache:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<wbcache.AsyncCache {self.path!r} {'closed' if self.closed else 'open'}>"

    def _disown_after_fork(self) -> None:
        """In a child just forked: refuse every use (the `Cache` underneath is disowned too)."""
        forking.disown(self, _ForkedAsyncCache, "AsyncCache", self._cache.path, self._pid)


class _ForkedAsyncCache(forking.Disowned, AsyncCache):
    """An `AsyncCache` inherited through fork(): every use raises `ForkedCacheError`."""


class AsyncBatch(BatchOperations):
    """Operations collected by `AsyncCache.batch()`, written as one record on exit."""

    def __init__(self, owner: AsyncCache) -> None:
        super().__init__(owner.cache)
        self._owner = owner

    async def __aenter__(self) -> AsyncBatch:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self._done = True
        if exc_type is None:
            self.lsn = await self._owner._commit(self._ops)
        self._ops = []


async def open_async(path: str | os.PathLike[str], *, backend: Backend | str | None = None,
                     **options: Any) -> AsyncCache:
    """`await wbcache.open_async(path, **options)`: `wbcache.open` for asyncio."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, not {type(path).__name__}")
    return await AsyncCache.open(path, backend=backend, **options)


__all__ = ["AsyncBatch", "AsyncCache", "open_async"]
