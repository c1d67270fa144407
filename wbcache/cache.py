"""`Cache`: the write-back cache over a group-commit log and a database.

This module is longer than the others because it is the one place that keeps the sequencer's
invariants; every one of them is stated where it is kept. Under `self._lock`:
  * `_next_lsn` is the LSN the next write gets; a write's LSN, its log record and its effect on
    memory are assigned in ONE critical section, so log order, LSN order and memory agree.
  * `_map` holds every dirty entry (and clean ones up to `capacity`), newest write per key.
  * `_dirty` holds, per key, the encoded value (None: deleted) written since the last flush took
    it; `_inflight` what the flush in progress is writing. A key in either is never evicted.
  * `_deltas` (and `_inflight_deltas`) hold, for the dirty keys written ONLY by increments
    since, the sum of those increments: a database shared by many caches adds it to its value.
  * every record with LSN <= `_next_lsn - 1` has been applied to `_map` and `_dirty`.
  * `_reads` holds the database reads in progress (`_Read`), per key. Anything that may make
    memory newer than a read's answer, or drop a newer value from memory, marks the key's
    reads stale: a write of the key, a flush that made it clean, its eviction or expiry. A
    stale answer is never kept in memory nor built on; a write retries with a fresh read.
Reads that hit memory take no lock (dict operations are atomic under the GIL). No database call
is ever made with `_lock` held: a write that needs a value memory cannot give raises
`_NeedsRead` and is retried once the read is done.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

import msgpack

from wbcache import forking
from wbcache.backends.base import Backend, Key
from wbcache.backends.lmdb import LmdbBackend
from wbcache.backends.postgres import PostgresBackend
from wbcache.codec import (
    INT64_MAX,
    INT64_MIN,
    Packed,
    check_delta,
    check_key,
    encode_value,
    from_encoded,
    in_memory,
)
from wbcache.errors import CacheClosedError
from wbcache.flusher import Flusher, IntervalSyncer
from wbcache.layout import Layout, claim, complete, record_backend
from wbcache.lock import DirectoryLock
from wbcache.options import Options
from wbcache.recovery import RecoveryReport, replay_into
from wbcache.wal import GroupCommitter, LogWriter, crashpoints
from wbcache.wal.format import MAX_SINGLE_RECORD
from wbcache.wal.records import (
    OP_DELETE,
    OP_INCR,
    OP_PUT,
    delete_item,
    encode_batch,
    encode_delete,
    encode_incr,
    encode_put,
    incr_item,
    put_item,
)

packb = msgpack.packb
unpackb = msgpack.unpackb

_ABSENT: Any = object()  # no value: never written, or deleted
_NOT_KNOWN: Any = object()  # memory cannot tell; the database must be read
T = TypeVar("T")


class WouldBlock(Exception):
    """Internal: a non-blocking write met backpressure (the caller retries in a thread)."""


class _NeedsRead(Exception):
    """Internal: a write needs the current value of keys that memory cannot give; nothing was
    written. The caller reads them from the database (outside the lock) and tries again."""

    def __init__(self, keys: list[Key]) -> None:
        super().__init__(keys)
        self.keys = keys


class _Read:
    """A database read of `key`, registered under the lock before it starts (see `_reads`)."""

    __slots__ = ("key", "encoded", "stale", "failed")

    def __init__(self, key: Key) -> None:
        self.key = key
        self.encoded: bytes | None = None
        self.stale = False  # memory may be newer than this answer: never keep or build on it
        self.failed = False  # the database was away; memory's value may be counted on


Reads = dict[Key, _Read]


class _Tombstone:
    """In memory: the key is deleted (the database may still hold it until the next flush)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<deleted>"


_TOMBSTONE: Any = _Tombstone()

# One batch operation as validated before the lock: (op, key, encoded value | delta | None, held)
Op = tuple[int, Key, Any, Any]
# Its effect on memory: (key, held, encoded | None, delta if an increment)
_Effect = tuple[Key, Any, Any, "int | None"]


class Cache:
    """A crash-durable write-back cache. Open one with `wbcache.open(path, **options)`.

    Every method is thread-safe. Writes return once durable (per `Options.fsync`); reads are
    served from memory, falling back to the database. See README.md for the guarantee.
    """

    def __init__(self, layout: Layout, dir_lock: DirectoryLock, backend: Backend,
                 options: Options, recovery: RecoveryReport, *, owns_backend: bool) -> None:
        self.path = layout.root
        self.options = options
        self.recovery = recovery
        self._layout = layout
        self._dir_lock = dir_lock
        self._backend = backend
        self._owns_backend = owns_backend
        self._max_key_size = options.max_key_size  # for keys written from now on
        # Keys already stored may be longer (an earlier open allowed more): they stay readable
        # and deletable up to what the database itself holds.
        self._stored_key_size = backend.max_key_size
        self._max_value_size = options.max_value_size
        self._capacity = options.capacity
        self._max_dirty = options.max_dirty
        self._flush_threshold = options.flush_threshold

        self._lock = threading.Lock()
        self._space = threading.Condition(self._lock)  # writers waiting out backpressure
        self._closed = False
        self._map: OrderedDict[Key, Any] = OrderedDict()
        self._dirty: dict[Key, bytes | None] = {}
        self._inflight: dict[Key, bytes | None] = {}
        self._deltas: dict[Key, int] = {}
        self._inflight_deltas: dict[Key, int] = {}
        # read_ttl: when clean entries became clean; None when they never expire
        self._read_ttl = (options.read_ttl if options.read_ttl is not None
                          else getattr(backend, "default_read_ttl", None))
        self._clean_since: dict[Key, float] | None = None
        if self._read_ttl is not None:
            self._clean_since = {}
            self.get = self._get_within_ttl  # type: ignore[method-assign]
        self._evict_blocked = False  # every entry over capacity is dirty: wait for a flush
        self._reads: dict[Key, list[_Read]] = {}
        self._flush_woken = False
        self._next_lsn = recovery.checkpoint_after + 1

        self._hits = self._misses = self._writes = self._coalesced = self._evictions = 0

        self._writer = LogWriter(layout.wal, self._next_lsn, options.segment_size,
                                 sync_marks=options.fsync == "interval")
        self._committer = GroupCommitter(self._lock, self._writer, next_lsn=self._next_lsn,
                                         sync_every_batch=options.fsync == "always")
        self._flusher = Flusher(lock=self._lock, take=self._take_dirty, done=self._flushed,
                                backend=backend, writer=self._writer,
                                interval=options.flush_interval,
                                checkpoint_lsn=recovery.checkpoint_after)
        self._syncer = (IntervalSyncer(self._lock, self._committer, options.fsync_interval)
                        if options.fsync == "interval" else None)
        self._pid = os.getpid()
        self._flusher.start()
        if self._syncer is not None:
            self._syncer.start()
        forking.track(self)

    @classmethod
    def open(cls, path: str | os.PathLike[str], options: Options,
             backend: Backend | str | None = None) -> Cache:
        """Lock the directory, recover it, start the background threads. See `wbcache.open`."""
        given: Backend | None
        if isinstance(backend, str):  # a URL: the cache makes the backend and owns it
            given, owns_backend = PostgresBackend.from_url(backend), True
        else:
            given, owns_backend = backend, backend is None
        try:
            layout = claim(path)
            dir_lock = DirectoryLock.acquire(layout.lock)
        except BaseException:
            if owns_backend and given is not None:
                given.close()
            raise
        database: Backend | None = given
        try:
            complete(layout)
            if database is None:
                database = LmdbBackend(layout.db, map_size=options.map_size)
            kind = getattr(database, "kind", None)
            if kind is not None:
                record_backend(layout, kind)
            attach = getattr(database, "attach", None)
            if attach is not None:  # a shared database keeps one checkpoint per directory
                attach(layout.cache_id())
            if options.max_key_size > database.max_key_size:
                raise ValueError(f"option max_key_size ({options.max_key_size}) exceeds the "
                                 f"database's limit of {database.max_key_size} bytes")
            report = replay_into(database, layout.wal)
            return cls(layout, dir_lock, database, options, report, owns_backend=owns_backend)
        except BaseException:
            if owns_backend and database is not None:
                database.close()
            dir_lock.release()
            raise

    # ----------------------------------------------------------------- reads

    def get(self, key: Key, default: Any = None) -> Any:
        """The value stored under `key`, or `default`. Containers come back as fresh copies.

        Served from memory when it can be; otherwise read from the database (and kept).
        Raises `TypeError`/`ValueError` for a bad key, `CacheClosedError`, and the backend's
        own error (e.g. `PostgresError`) if a database read fails."""
        held = self._map.get(key, _ABSENT)
        if held is _ABSENT:
            return self._get_missing(key, default)
        try:
            self._map.move_to_end(key)
        except KeyError:  # evicted meanwhile by another thread; the value we hold is still right
            pass
        if type(held) is Packed:
            self._hits += 1
            return unpackb(held, strict_map_key=False)
        if held is _TOMBSTONE:
            self._misses += 1
            return default
        self._hits += 1
        return held

    def __getitem__(self, key: Key) -> Any:
        value = self.get(key, _ABSENT)
        if value is _ABSENT:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        if self._clean_since is not None:
            return self.get(key, _ABSENT) is not _ABSENT  # type: ignore[arg-type]
        held = self._map.get(key, _ABSENT)  # type: ignore[call-overload]
        if held is not _ABSENT:
            return held is not _TOMBSTONE
        # Not seen in memory, maybe only for a moment (eviction pops and reinserts dirty
        # entries): `_get_missing` looks again under the lock before trusting the database.
        return self._get_missing(key, _ABSENT) is not _ABSENT  # type: ignore[arg-type]

    def _get_missing(self, key: Key, default: Any) -> Any:
        """Not in memory (or stale): read the database, then keep the value as a clean entry,
        unless memory has become newer meanwhile."""
        key = check_key(key, self._stored_key_size)
        with self._lock:
            self._check_open()
            self._misses += 1
            value = self._from_memory(key)
            if value is _NOT_KNOWN:
                reads = self._start_reads([key])
        if value is _NOT_KNOWN:
            self._fill_reads(reads, count_on_memory=False)
            with self._lock:
                try:
                    value = self._from_memory(key)  # a write may have got there first
                    if value is _NOT_KNOWN:
                        value = self._value_read(reads[key])
                finally:
                    self._end_reads(reads)
        return default if value is _ABSENT else value

    def _get_within_ttl(self, key: Key, default: Any = None) -> Any:
        """`get` when clean entries expire after `read_ttl` (a shared database): an expired
        entry is read again, so other caches' writes become visible."""
        if not self._fresh(key):
            return self._get_missing(key, default)
        return Cache.get(self, key, default)

    def _fresh(self, key: Key) -> bool:
        """Whether memory may answer for `key` without consulting the database."""
        if self._clean_since is None:
            return True
        since = self._clean_since.get(key)
        return since is None or time.monotonic() - since <= self._read_ttl  # type: ignore[operator]

    # ------------------------------------------------ reads from the database, and races
    # The rule: no database call under `_lock`, and nothing a read brings back may replace a
    # newer state of its key. A read is registered in `_reads` (under the lock) before it
    # starts; whatever could make memory newer than its answer marks it stale (`_mark_stale`);
    # its answer is used (under the lock again) only if memory still cannot answer and it is
    # not stale. A write that needs a value memory cannot give raises `_NeedsRead` and runs
    # again after the read (`_write_reading`).

    def _from_memory(self, key: Key) -> Any:
        """Lock held. The value memory holds for `key` (decoded; _ABSENT if deleted), or
        _NOT_KNOWN when memory cannot answer: not held, or clean and past read_ttl."""
        held = self._map.get(key, _ABSENT)
        if held is _ABSENT:
            return _NOT_KNOWN
        if key in self._dirty or key in self._inflight or self._fresh(key):
            return _ABSENT if held is _TOMBSTONE else _value_of(held)
        return _NOT_KNOWN

    def _current(self, key: Key, reads: Reads | None) -> Any:
        """Lock held. The value of `key` now (decoded; _ABSENT if none), from memory or from a
        read made for this write; raises `_NeedsRead` when neither can tell."""
        value = self._from_memory(key)
        if value is not _NOT_KNOWN:
            return value
        read = reads.get(key) if reads else None
        if read is None or read.stale:
            raise _NeedsRead([key])
        if read.failed:  # the database is away: count on from what memory holds, if anything
            held = self._map.get(key, _ABSENT)
            if held is _ABSENT:
                raise _NeedsRead([key])
            return _ABSENT if held is _TOMBSTONE else _value_of(held)
        return self._value_read(read)

    def _value_read(self, read: _Read) -> Any:
        """Lock held. The value `read` found (_ABSENT if none), kept in memory unless stale."""
        if read.stale:  # still a right answer for a read: it overlapped the change; not kept
            return _ABSENT if read.encoded is None else from_encoded(read.encoded)[0]
        if read.encoded is None:
            if self._map.pop(read.key, _ABSENT) is not _ABSENT and self._clean_since:
                self._clean_since.pop(read.key, None)  # deleted by another cache
            return _ABSENT
        value, held = from_encoded(read.encoded)
        self._keep_clean(read.key, held)
        return value

    def _start_reads(self, keys: Iterable[Key]) -> Reads:
        """Lock held. Register a read of each key; end them with `_end_reads`."""
        reads = {key: _Read(key) for key in keys}
        for key, read in reads.items():
            self._reads.setdefault(key, []).append(read)
        return reads

    def _end_reads(self, reads: Reads) -> None:
        """Lock held."""
        for key, read in reads.items():
            registered = self._reads[key]
            registered.remove(read)
            if not registered:
                del self._reads[key]

    def _mark_stale(self, key: Key) -> None:
        """Lock held. Memory's state of `key` changed: no read in progress may be kept."""
        for read in self._reads.get(key, ()):
            read.stale = True

    def _fill_reads(self, reads: Reads, *, count_on_memory: bool) -> None:
        """Lock NOT held. Read every key of `reads` from the database. If it fails: with
        `count_on_memory`, a key memory holds (stale) is marked failed and its value counted
        on; otherwise the reads end and the error is raised (`CacheClosedError` if the cache
        was closed under our feet)."""
        try:
            for read in reads.values():
                try:
                    read.encoded = self._backend.get(read.key)
                except Exception:
                    if not (count_on_memory and read.key in self._map):
                        raise
                    read.failed = True
        except BaseException as exc:
            with self._lock:
                self._end_reads(reads)
            if self._closed:
                raise CacheClosedError(f"cache {self.path} is closed") from exc
            raise

    def _write_reading(self, write: Callable[[Reads | None], tuple[int, T]]) -> T:
        """Lock NOT held. Run `write` (lock held: admit, log and apply one write; return its
        LSN and result) and wait for its acknowledgement. When it needs values memory cannot
        give, read them outside the lock and run it again."""
        reads: Reads | None = None
        while True:
            with self._lock:
                try:
                    lsn, result = write(reads)
                except _NeedsRead as need:
                    keys = need.keys
                else:
                    keys = []
                finally:
                    if reads is not None:
                        self._end_reads(reads)
                if not keys:
                    self._committer.wait(lsn)
                    return result
                reads = self._start_reads(keys)
            self._fill_reads(reads, count_on_memory=True)

    # ----------------------------------------------------------------- writes

    def put(self, key: Key, value: Any) -> int:
        """Store `value` under `key`; return the write's LSN once it is durable.

        Raises `TypeError`/`ValueError` for a bad key or value (nothing is written),
        `CacheClosedError`, `LogFailedError`.
        """
        key = check_key(key, self._max_key_size)
        encoded = encode_value(value, self._max_value_size, key)
        held = in_memory(value, encoded)
        with self._lock:
            lsn = self._write_put(key, encoded, held)
            self._committer.wait(lsn)
        if crashpoints.ARMED:
            crashpoints.reached("wal.after_ack")
        return lsn

    def __setitem__(self, key: Key, value: Any) -> None:
        self.put(key, value)

    def delete(self, key: Key) -> int:
        """Delete `key` (a missing key is not an error); return the LSN once durable.

        Raises `TypeError`/`ValueError` for a bad key, `CacheClosedError`, `LogFailedError`."""
        return self._delete(key, must_exist=False)

    def __delitem__(self, key: Key) -> None:
        self._delete(key, must_exist=True)

    def _delete(self, key: Key, *, must_exist: bool) -> int:
        key = check_key(key, self._stored_key_size)
        return self._write_reading(
            lambda reads: _lsn_twice(self._write_delete(key, must_exist, reads)))

    def incr(self, key: Key, delta: int = 1) -> int:
        """Add `delta` to the int under `key` (a missing key counts from 0), atomically;
        return the new value once durable. A non-int value raises `TypeError`; a result
        outside the signed 64-bit range raises `ValueError`. Nothing is written on error."""
        key = check_key(key, self._max_key_size)
        _check_int64(check_delta(delta), "incr delta")
        return self._write_reading(lambda reads: self._write_incr(key, delta, reads))

    def put_many(self, entries: Mapping[Key, Any] | Iterable[tuple[Key, Any]]) -> int:
        """Store every (key, value) atomically: one log record, one fsync. Return its LSN.

        Later duplicates of a key win. Every entry is validated before anything is written:
        `TypeError`/`ValueError` for a bad pair, key or value, or a batch over the log's record
        limit; also `CacheClosedError`, `LogFailedError`.
        An empty `entries` writes nothing and returns the last LSN assigned so far.
        """
        return self._commit(self._put_many_ops(entries))

    def _put_many_ops(self, entries: Mapping[Key, Any] | Iterable[tuple[Key, Any]]) -> list[Op]:
        pairs = entries.items() if isinstance(entries, Mapping) else entries
        ops: list[Op] = []
        for pair in pairs:
            try:
                if isinstance(pair, (str, bytes)):  # "ab" would unpack as ("a", "b")
                    raise TypeError
                key, value = pair
            except (TypeError, ValueError):
                raise TypeError("put_many takes a mapping or an iterable of (key, value) pairs, "
                                f"not an item {pair!r}") from None
            ops.append(self._put_op(key, value))
        return ops

    def batch(self) -> Batch:
        """`with cache.batch() as b: b.put(..); b.delete(..); b.incr(..)`: one atomic write
        on exit; nothing at all if the block raises."""
        self._check_open()
        return Batch(self)

    def _put_op(self, key: Key, value: Any) -> Op:
        key = check_key(key, self._max_key_size)
        encoded = encode_value(value, self._max_value_size, key)
        return (OP_PUT, key, encoded, in_memory(value, encoded))

    def _commit(self, ops: list[Op]) -> int:
        """Log `ops` as ONE record and apply them to memory; return its LSN once durable."""
        return self._write_reading(lambda reads: _lsn_twice(self._write_batch(ops, reads)))

    # ------------------------------------------------- writes, lock held, no waiting
    # Each admits the write (raising if closed or failed; waiting out backpressure, or with
    # block=False raising WouldBlock), logs it, applies it to memory, and returns its LSN
    # without waiting for it to be acknowledged. One that needs a value memory cannot give
    # and `reads` does not hold raises `_NeedsRead` before anything is logged. The sync
    # methods above then wait; the asyncio front end (wbcache/aio.py) awaits a future the
    # group commit resolves.

    def _write_put(self, key: Key, encoded: bytes, held: Any, block: bool = True) -> int:
        lsn = self._admit(block)
        self._queue(lsn, encode_put(lsn, key, encoded))
        self._remember(key, held, encoded)
        self._writes += 1
        self._evict_if_over_capacity()
        return lsn

    def _write_delete(self, key: Key, must_exist: bool, reads: Reads | None,
                      block: bool = True) -> int:
        lsn = self._admit(block)
        if must_exist and self._current(key, reads) is _ABSENT:
            raise KeyError(key)
        self._queue(lsn, encode_delete(lsn, key))
        self._remember(key, _TOMBSTONE, None)
        self._writes += 1
        self._evict_if_over_capacity()
        return lsn

    def _write_incr(self, key: Key, delta: int, reads: Reads | None,
                    block: bool = True) -> tuple[int, int]:
        lsn = self._admit(block)
        result = self._increment(key, delta, self._current(key, reads))
        self._queue(lsn, encode_incr(lsn, key, delta, result))
        self._remember(key, result, packb(result), delta)
        self._writes += 1
        self._evict_if_over_capacity()
        return lsn, result

    def _write_batch(self, ops: list[Op], reads: Reads | None, block: bool = True) -> int:
        if not ops:  # nothing to write; the answer is as durable as what came before it
            self._check_open()
            return self._next_lsn - 1
        lsn = self._admit(block)
        items, effects = self._resolve(ops, reads)
        payload = encode_batch(lsn, items)
        if len(payload) > MAX_SINGLE_RECORD:
            raise ValueError(f"batch of {len(ops)} operations is {len(payload)} bytes "
                             f"encoded; the log's record limit is {MAX_SINGLE_RECORD} bytes")
        self._queue(lsn, payload)
        for key, held, encoded, delta in effects:
            self._remember(key, held, encoded, delta)
        self._writes += len(effects)
        self._evict_if_over_capacity()
        return lsn

    def _resolve(self, ops: list[Op], reads: Reads | None
                 ) -> tuple[list[list[Any]], list[_Effect]]:
        """Log items and memory effects of a batch; increments see the batch's earlier ops.
        Raises `_NeedsRead` for every key whose value neither memory nor `reads` gives."""
        self._check_known(ops, reads)
        items: list[list[Any]] = []
        effects: list[_Effect] = []
        overlay: dict[Key, Any] = {}
        for op, key, arg, held in ops:
            if op == OP_PUT:
                items.append(put_item(key, arg))
                effects.append((key, held, arg, None))
                overlay[key] = held
            elif op == OP_DELETE:
                items.append(delete_item(key))
                effects.append((key, _TOMBSTONE, None, None))
                overlay[key] = _TOMBSTONE
            else:
                current = (_value_of(overlay[key]) if key in overlay
                           else self._current(key, reads))
                result = self._increment(key, arg, current)
                items.append(incr_item(key, arg, result))
                effects.append((key, result, packb(result), arg))
                overlay[key] = result
        return items, effects

    def _check_known(self, ops: list[Op], reads: Reads | None) -> None:
        """Lock held. Raise `_NeedsRead` (all at once) for the keys a batch increments before
        writing them whose value neither memory nor `reads` gives."""
        written: set[Key] = set()
        missing: list[Key] = []
        for op, key, _, _ in ops:
            if (op == OP_INCR and key not in written and key not in missing
                    and self._from_memory(key) is _NOT_KNOWN):
                read = reads.get(key) if reads else None
                if read is None or read.stale:
                    missing.append(key)
            written.add(key)
        if missing:
            raise _NeedsRead(missing)

    # ------------------------------------------------------- sequencer internals

    def _admit(self, block: bool = True) -> int:
        """Lock held. Refuse if closed or the log failed; wait out backpressure (or, with
        `block` False, raise WouldBlock). Return the LSN the write will get (it is consumed
        only by `_queue`)."""
        if self._closed:
            raise CacheClosedError(f"cache {self.path} is closed")
        self._committer.check()
        while len(self._dirty) + len(self._inflight) >= self._max_dirty:
            self._flusher.wake()
            if not block:
                raise WouldBlock
            self._space.wait()
            if self._closed:
                raise CacheClosedError(f"cache {self.path} is closed")
            self._committer.check()  # the log may have failed while we waited
        return self._next_lsn

    def _queue(self, lsn: int, payload: bytes) -> None:
        """Lock held. Hand record `lsn` to the group commit; from here the LSN is used.

        Nothing after this point in a write may raise (short of the log failing in `wait`):
        the record is on its way to disk, so its effects on memory must all be applied."""
        self._committer.append(lsn, payload)
        self._next_lsn = lsn + 1

    def _remember(self, key: Key, held: Any, encoded: bytes | None,
                  delta: int | None = None) -> None:
        """Lock held. The newest write of `key` is `held` in memory, dirty until flushed;
        `delta` is set when the write is an increment."""
        entries = self._map
        entries[key] = held
        entries.move_to_end(key)
        if self._reads:
            self._mark_stale(key)
        dirty = self._dirty
        deltas = self._deltas
        before = len(dirty)
        dirty[key] = encoded
        if len(dirty) == before:  # rewritten before a flush took it
            self._coalesced += 1
            if deltas:
                if delta is not None and key in deltas:
                    deltas[key] += delta  # still increments only
                else:
                    deltas.pop(key, None)
            return
        if delta is not None:
            deltas[key] = delta
        if before + 1 >= self._flush_threshold and not self._flush_woken:
            self._flush_woken = True
            self._flusher.wake()

    def _keep_clean(self, key: Key, held: Any) -> None:
        """Lock held. Cache a value read from the database, unless memory is full of dirty
        entries (then caching reads would grow memory without bound until a flush)."""
        if self._evict_blocked and len(self._map) >= self._capacity:
            return
        self._map[key] = held
        if self._clean_since is not None:
            self._clean_since[key] = time.monotonic()
        self._evict_if_over_capacity()

    @staticmethod
    def _increment(key: Key, delta: int, current: Any) -> int:
        if current is _ABSENT or current is _TOMBSTONE:
            current = 0
        elif type(current) is not int:
            raise TypeError(f"incr: the value under {key!r} is a {type(current).__name__}, "
                            f"not an int")
        return _check_int64(current + delta, f"incr result for {key!r}")

    def _evict_if_over_capacity(self) -> None:
        """Lock held. Drop least-recently-used CLEAN entries until within capacity.

        Only atomic OrderedDict operations (popitem, setitem), never an iterator: `get` moves
        entries to the end without the lock, which would break an iteration. A dirty entry
        popped on the way goes back to the end. If every entry over capacity is dirty, wake the
        flusher and stop trying until a flush has made some clean (so this stays O(1)
        amortized). Meanwhile a reader racing the pop-and-reinsert misses memory, and its
        slow path finds the entry again under the lock.
        """
        entries = self._map
        if len(entries) <= self._capacity or self._evict_blocked:
            return
        dirty, inflight = self._dirty, self._inflight
        budget = len(entries)
        while len(entries) > self._capacity:
            if not budget:
                self._evict_blocked = True
                self._flusher.wake()
                return
            budget -= 1
            key, held = entries.popitem(last=False)
            if key in dirty or key in inflight:
                entries[key] = held
            else:
                self._evictions += 1
                if self._clean_since is not None:
                    self._clean_since.pop(key, None)
                if self._reads:
                    self._mark_stale(key)

    def _take_dirty(self) -> tuple[dict[Key, bytes | None], dict[Key, int], int]:
        """Lock held (flusher). The dirty entries, their deltas and the LSN they reflect; they
        are in flight until `_flushed`. A batch left by a cycle that gave up is taken again,
        newer values winning (a delta stays a delta only if both halves were increments)."""
        batch, deltas = self._inflight, self._inflight_deltas
        if batch:
            newer_deltas = self._deltas
            for key, encoded in self._dirty.items():
                if key in newer_deltas and (key in deltas or key not in batch):
                    deltas[key] = deltas.get(key, 0) + newer_deltas[key]
                else:
                    deltas.pop(key, None)
                batch[key] = encoded
        else:
            batch, deltas = self._dirty, self._deltas
        self._inflight, self._inflight_deltas = batch, deltas
        self._dirty, self._deltas = {}, {}
        self._flush_woken = False
        return batch, deltas, self._next_lsn - 1

    def _flushed(self, lsn: int) -> None:
        """Lock held (flusher). Everything up to `lsn` is committed: in-flight entries are clean."""
        for key in self._reads:
            if key in self._inflight:  # its read may predate this flush
                self._mark_stale(key)
        if self._clean_since is not None:
            now = time.monotonic()
            for key in self._inflight:
                if key not in self._dirty:
                    # A key flushed as a delta holds only this cache's view of the sum, not
                    # what the database now holds: stale at once, so the next read fetches it.
                    self._clean_since[key] = -math.inf if key in self._inflight_deltas else now
        self._inflight, self._inflight_deltas = {}, {}
        self._evict_blocked = False
        self._space.notify_all()
        self._evict_if_over_capacity()

    def _check_open(self) -> None:
        if self._closed:
            raise CacheClosedError(f"cache {self.path} is closed")

    # ------------------------------------------------------------ whole-cache views

    def keys(self) -> list[Key]:
        """Every key, memory and database merged, as a snapshot list. Holds off the flusher
        while it reads; raises `FlushError` if a flush attempt in progress does not end within
        `Options.flush_timeout`, `CacheClosedError`."""
        return [key for key, _ in self._merged(decode=False)]

    def items(self) -> list[tuple[Key, Any]]:
        """Every (key, value), memory and database merged, as a snapshot list (see `keys`)."""
        return self._merged(decode=True)

    def __iter__(self) -> Iterator[Key]:
        return iter(self.keys())

    def __len__(self) -> int:
        """How many keys, memory and database merged (see `keys` for what it waits for)."""
        with self._flusher.paused(self.options.flush_timeout):
            pending = self._pending()
            count = self._backend.count()
            for key, encoded in pending.items():
                stored = self._backend.get(key) is not None
                if encoded is None and stored:
                    count -= 1
                elif encoded is not None and not stored:
                    count += 1
            return count

    def _merged(self, *, decode: bool) -> list[tuple[Key, Any]]:
        with self._flusher.paused(self.options.flush_timeout):
            pending = self._pending()
            merged = [(key, from_encoded(encoded)[0] if decode else None)
                      for key, encoded in self._backend.items() if key not in pending]
        merged.extend((key, from_encoded(encoded)[0] if decode else None)
                      for key, encoded in pending.items() if encoded is not None)
        return merged

    def _pending(self) -> dict[Key, bytes | None]:
        """Flusher paused. Every write not yet in the database, newest per key."""
        with self._lock:
            self._check_open()
            pending = dict(self._inflight)
            pending.update(self._dirty)
            return pending

    # ---------------------------------------------------------------- control

    def flush(self, timeout: float | None = None) -> None:
        """Block until every write acknowledged before the call is in the database and the
        log segments it covered are deleted. Raises `FlushError` once `timeout` seconds
        (default: `Options.flush_timeout`) have passed and the database has not accepted it
        (an attempt already under way is let finish: the backend's own timeout bounds it), or
        if the covered segments could not be deleted; the log keeps every write either way."""
        self._check_open()
        self._flusher.flush(self.options.flush_timeout if timeout is None else timeout)

    def sync(self) -> None:
        """Block until every earlier write is fsync'd (a no-op wait under fsync="always").
        Raises `LogFailedError` if the fsync fails, `CacheClosedError`."""
        with self._lock:
            self._check_open()
            self._committer.wait(self._next_lsn - 1, durable=True)

    def stats(self) -> dict[str, Any]:
        """Counters and state (README, "stats()"). `hits`/`misses`: reads served from memory /
        that needed the database (they are not locked, so concurrent readers may undercount
        slightly). Raises `CacheClosedError`."""
        wal_bytes, wal_segments = self._writer.sizes()
        flusher = self._flusher
        with self._lock:
            self._check_open()
            return {
                "hits": self._hits,
                "misses": self._misses,
                "writes": self._writes,
                "dirty": len(self._dirty) + len(self._inflight),
                "cached": len(self._map),
                "evictions": self._evictions,
                "coalesced": self._coalesced,
                "flushes": flusher.flushes,
                "flushed_entries": flusher.flushed_entries,
                "backend_writes": flusher.flushed_entries + self.recovery.keys,
                "flush_errors": flusher.flush_errors,
                "last_flush_error": (None if flusher.last_error is None
                                     else repr(flusher.last_error)),
                "last_flush_seconds": flusher.last_flush_seconds,
                "wal_bytes": wal_bytes,
                "wal_segments": wal_segments,
                "fsyncs": self._committer.fsyncs,
                "log_batches": self._committer.batches,
                "recovered_records": self.recovery.replayed,
                "torn_bytes_dropped": self.recovery.torn_bytes,
                "checkpoint_lsn": flusher.checkpoint_lsn,
                "durable_lsn": self._committer.durable_lsn,
                "next_lsn": self._next_lsn,
            }

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def cache_id(self) -> str:
        """This directory's identity in a database shared by many caches (DIR/cache_id)."""
        return self._layout.cache_id()

    def close(self) -> None:
        """Flush, fsync the log, release the directory. Idempotent.

        If the database does not accept the final flush within `Options.flush_timeout`, the
        cache still closes (the log keeps every write; the next open replays it) and
        `FlushError` is raised.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._space.notify_all()
        forking.untrack(self)
        failure: BaseException | None = None
        steps = (self._flusher.stop,
                 self._syncer.stop if self._syncer is not None else None,
                 lambda: self._flusher.flush(self.options.flush_timeout),
                 self._close_log,
                 self._backend.close if self._owns_backend else None,
                 self._dir_lock.release)
        for step in steps:
            if step is None:
                continue
            try:
                step()
            except BaseException as exc:  # finish closing, then report the first failure
                failure = failure or exc
        self._map.clear()
        if failure is not None:
            raise failure

    def _disown_after_fork(self) -> None:
        """In a child just forked (wbcache/forking.py): close the descriptors it inherited
        (the parent's stay open: its flock and its log are untouched) and refuse every use."""
        for close in (self._writer.close, self._dir_lock.release):
            try:
                close()
            except OSError:
                pass
        forking.disown(self, _ForkedCache, "Cache", self.path, self._pid)

    def _close_log(self) -> None:
        with self._lock:
            self._committer.close()

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<wbcache.Cache {self.path!r} {'closed' if self._closed else 'open'}>"


class _ForkedCache(forking.Disowned, Cache):
    """A `Cache` inherited through fork(): every use raises `ForkedCacheError`."""


class BatchOperations:
    """Operations collected for one atomic batch record (validated as they are added)."""

    def __init__(self, cache: Cache) -> None:
        self._cache = cache
        self._ops: list[Op] = []
        self._done = False
        self.lsn: int | None = None

    def put(self, key: Key, value: Any) -> None:
        self._check()
        self._ops.append(self._cache._put_op(key, value))

    def delete(self, key: Key) -> None:
        self._check()
        self._ops.append((OP_DELETE, check_key(key, self._cache._stored_key_size), None, None))

    def incr(self, key: Key, delta: int = 1) -> None:
        self._check()
        key = check_key(key, self._cache._max_key_size)
        self._ops.append((OP_INCR, key, _check_int64(check_delta(delta), "incr delta"), None))

    def _check(self) -> None:
        if self._done:
            raise ValueError("this batch has already been committed or discarded")


class Batch(BatchOperations):
    """`with cache.batch() as b:` -- written as one record when the block exits cleanly."""

    def __enter__(self) -> Batch:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self._done = True
        if exc_type is None:
            self.lsn = self._cache._commit(self._ops)
        self._ops = []


def _lsn_twice(lsn: int) -> tuple[int, int]:
    """(LSN, result) for a write whose result is its LSN."""
    return lsn, lsn


def _value_of(held: Any) -> Any:
    return unpackb(held, strict_map_key=False) if type(held) is Packed else held


def _check_int64(value: int, what: str) -> int:
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"{what} {value} is outside the signed 64-bit range")
    return value
