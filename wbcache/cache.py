"""`Cache`: the write-back cache over a group-commit log and a database, as a mapping.

`Cache` is the thread-safe front end. What it holds: memory (`memory.Entries`), the write path
(`sequencer.Sequencer`: the one lock, LSNs, the log queue, the dirty set), the flusher and, under
fsync="interval", the interval syncer (`flusher.py`), and the database. Every write is a plan
run by the sequencer (`writes.py`); a hit reads memory without any lock.

It is a `collections.abc.MutableMapping`, with these differences from `dict`, each deliberate:
  * keys are `str` or `bytes` (distinct: "a" and b"a" are two keys); values are what msgpack
    encodes, and come back as fresh copies (tuples as lists);
  * a key that can never be stored (another type, empty, too long) is simply not there: `in`
    is False, `get` gives the default, `[]`, `del` and `pop` raise KeyError, as with `dict`;
    writing one raises TypeError or ValueError;
  * `keys()`, `values()`, `items()` and iteration are snapshots (memory and database merged,
    taken at the call), in one order: str keys sorted, then bytes keys sorted. They and `len`
    and `==` read the whole database: O(n);
  * every write is durable when it returns; `update`, `pop`, `popitem`, `setdefault` and
    `clear` are atomic, one log record and one fsync each.

About 600 lines: the whole public mapping API in one place; each method is a few lines over
the sequencer and the directory, and nothing here would be simpler split across files.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from typing import Any, NoReturn

from wbcache import forking
from wbcache.backends.base import Backend, Key
from wbcache.codec import check_key, from_encoded
from wbcache.directory import OpenedDirectory, count_after_recovery, key_order, open_directory
from wbcache.errors import CacheClosedError
from wbcache.flusher import Flusher, IntervalSyncer
from wbcache.hit_path import hit_path
from wbcache.layout import Layout
from wbcache.lock import DirectoryLock, taking
from wbcache.memory import Entries
from wbcache.options import Options, check_timeout
from wbcache.recovery import RecoveryReport
from wbcache.sequencer import ABSENT, Sequencer, WouldBlock, holds_lock
from wbcache.wal import LogWriter
from wbcache.writes import (
    BatchOperations,
    Limits,
    Op,
    delete_all_plan,
    delete_plan,
    ops_plan,
    pop_plan,
    setdefault_plan,
    update_items,
)

_MISSING: Any = object()
_NO_DEFAULT: Any = object()


class _MemoryOnly(threading.local):
    """Set by `_get_nowait` in its thread, for the call: a miss must not read the database."""

    on = False


_memory_only = _MemoryOnly()


class Cache(MutableMapping[Key, Any]):
    """A crash-durable write-back cache. Open one with `wbcache.open(path, **options)`.

    Every method is thread-safe. Writes return once durable (per `Options.fsync`); reads are
    served from memory, falling back to the database. See README.md for the guarantee and the
    module docstring for how it differs from `dict`.
    """

    _ready = False  # set once built whole: `open` closes it if interrupted as it returns

    def __init__(self, layout: Layout, dir_lock: DirectoryLock, backend: Backend,
                 options: Options, recovery: RecoveryReport, *, owns_backend: bool,
                 root: str | None = None) -> None:
        """Use `wbcache.open`. `layout` is the directory's (a shared directory's lane's, then
        `root` is the directory)."""
        self.path = root or layout.root
        self.options = options
        self.recovery = recovery
        self._layout = layout
        self._dir_lock = dir_lock
        self._backend = backend
        self._owns_backend = owns_backend
        self._limits = Limits(options.max_key_size, backend.max_key_size, options.max_value_size)
        read_ttl = options.read_ttl if options.read_ttl is not None else backend.default_read_ttl
        self._entries = Entries(options.capacity, read_ttl)
        next_lsn = recovery.checkpoint_after + 1
        self._writer = LogWriter(layout.wal, next_lsn, options.segment_size,
                                 sync_marks=options.fsync == "interval")
        self._flusher = self._syncer = None  # type: ignore[assignment]
        try:
            self._start(layout, backend, options, recovery, next_lsn)
        except BaseException:
            self._abandon()
            raise
        self._ready = True

    def _start(self, layout: Layout, backend: Backend, options: Options,
               recovery: RecoveryReport, next_lsn: int) -> None:
        """The rest of `__init__`, once the log's writer holds its descriptors."""
        self._sequencer = Sequencer(writer=self._writer, next_lsn=next_lsn,
                                    entries=self._entries, fetch=backend.get,
                                    sync_every_batch=options.fsync == "always",
                                    max_dirty=options.max_dirty,
                                    flush_threshold=options.flush_threshold, name=self.path,
                                    rebase_counters=backend.applies_increments)
        self._flusher = Flusher(sequencer=self._sequencer, backend=backend, writer=self._writer,
                                interval=options.flush_interval,
                                checkpoint_lsn=recovery.checkpoint_after,
                                sweep=self._adopt_orphans if options.shared else None,
                                sweep_interval=options.adopt_interval)
        self._sequencer.wake_flusher = self._flusher.wake
        self._syncer = (IntervalSyncer(self._sequencer, options.fsync_interval)
                        if options.fsync == "interval" else None)
        self._rebind()
        self._pid = os.getpid()
        self._close_lock = threading.Lock()  # one close() at a time
        self._closing_in: int | None = None  # the thread running close(), while it does
        # what close() has left: (step, run again if an interruption stopped it)
        self._close_steps: list[tuple[Callable[[], object], bool]] | None = None
        self._closed_hooks: list[Callable[[], None]] = []  # `_when_closed`
        self._flusher.start()
        if self._syncer is not None:
            self._syncer.start()
        forking.track(self)

    def _abandon(self) -> None:
        """`__init__` failed after the writer was made (a thread that could not start, an
        interrupt): stop what started and close the log's descriptors, so that nothing
        leaks and nothing runs on; `Cache.open` then releases the directory and database."""
        for thread in (self._flusher, self._syncer):
            if thread is not None:
                thread.stop()
        self._writer.close()

    @classmethod
    def open(cls, path: str | os.PathLike[str], options: Options,
             backend: Backend | str | None = None) -> Cache:
        """Lock the directory, recover it, start the background threads. See `wbcache.open`."""
        # An interrupt (KeyboardInterrupt, a signal handler's exception) may land as any call
        # here returns. As the directory's lock is handed up, before it is bound: `taking`
        # lets it go. As the cache is returned, built: the cache is closed, not only what
        # the open took (its threads would run on beside the next open of the directory).
        opened: OpenedDirectory | None = None
        cache: Cache | None = None
        try:
            with taking():
                opened = open_directory(path, options, backend)
            cache = cls.__new__(cls)
            cache.__init__(opened.layout, opened.lock, opened.backend,  # type: ignore[misc]
                           options, opened.recovery, owns_backend=opened.owns_backend,
                           root=opened.root)
            return cache
        except BaseException:
            if cache is not None and cache._ready:
                try:
                    cache.close()
                except Exception:  # FlushError (the log keeps every write): raise the first
                    pass
            elif opened is not None:
                opened.close()
            raise

    def _adopt_orphans(self, say: Callable[..., None]) -> None:
        """Shared directories, from the flusher every `adopt_interval`: replay the logs of
        lanes whose process died into the database; what to log goes to `say`."""
        from wbcache.directory import adopt_orphans

        adopt_orphans(self.path, self.options, mine=self._layout.root, say=say)

    def reopen(self) -> Cache:
        """In a child process after `os.fork()`: open this shared cache again, on a lane of
        the child's own, in place (the object the child inherited becomes usable, with empty
        memory). Anywhere else it does nothing. A single-owner directory cannot be reopened
        in a child (its parent holds it): that raises `ForkedCacheError`. Returns the cache.

        The gunicorn recipe (`preload_app = True`): open the cache at import, then in
        `post_fork(server, worker)` call `cache.reopen()`."""
        return self

    def _rebind(self) -> None:
        """Bind the hit path (`hit_path.py`) to this object: at `__init__`, and again after
        `reopen` moved a fresh cache's state into it."""
        self._get, self._hits = hit_path(self, Cache.get.__doc__)
        if type(self).get is Cache.get:  # a subclass's own `get` is left in charge
            self.get = self._get  # type: ignore[method-assign]

    @property
    def sequencer(self) -> Sequencer:
        """The write path, for front ends built on this cache (`AsyncCache`)."""
        return self._sequencer

    @property
    def read_ttl(self) -> float | None:
        """Seconds a clean entry is served from memory (the option, else the backend's
        default); None: forever."""
        return self._entries.read_ttl

    @property
    def limits(self) -> Limits:
        """The key and value limits writes are validated against."""
        return self._limits

    # ----------------------------------------------------------------- reads

    def get(self, key: Key, default: Any = None) -> Any:
        """The value stored under `key`, or `default`. Containers come back as fresh copies.

        Served from memory when it can be; otherwise read from the database (and kept).
        Raises `CacheClosedError`, and the backend's own error (e.g. `PostgresError`) if a
        database read fails. A key that cannot be stored is not there: `default`."""
        # The hit path made for this cache (hit_path.py); it is the instance's own `get` too
        # (a plain function call), unless a subclass defines `get`.
        return self._get(key, default)

    def _get_nowait(self, key: Key, default: Any = None) -> Any:
        """`get` answered by memory alone: raises `WouldBlock` where `get` would read the
        database (for `AsyncCache.get` in its event loop, which then reads in a worker
        thread). Memory is asked once: an entry evicted or expired after a look at
        `in_memory` must not turn into a read in the caller's thread."""
        outer, _memory_only.on = _memory_only.on, True
        try:
            return self._get(key, default)
        finally:
            _memory_only.on = outer

    def _read(self, key: Key, default: Any) -> Any:
        """Not answerable from memory: the sequencer reads the database (no lock held)."""
        try:
            plain = check_key(key, self._limits.stored_key_size)
        except (TypeError, ValueError):
            if self._sequencer.closed:
                raise CacheClosedError(f"cache {self.path} is closed") from None
            return default  # a key that cannot be stored is not there
        if plain is not key:  # a subclass (a StrEnum): the hit path, with the key it stands for
            return self._get(plain, default)
        if _memory_only.on:
            raise WouldBlock
        value = self._sequencer.read(plain)
        return default if value is ABSENT else value

    def __getitem__(self, key: Key) -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        return self.get(key, _MISSING) is not _MISSING  # type: ignore[arg-type]

    # ----------------------------------------------------------------- writes

    def put(self, key: Key, value: Any) -> int:
        """Store `value` under `key`; return the write's LSN once it is durable.

        Raises `TypeError`/`ValueError` for a bad key or value (nothing is written),
        `CacheClosedError`, `LogFailedError`.
        """
        _, key, encoded, held = self._limits.put_op(key, value)
        return self._sequencer.put(key, encoded, held)

    def __setitem__(self, key: Key, value: Any) -> None:
        self.put(key, value)

    def delete(self, key: Key) -> int:
        """Delete `key` (a missing key is not an error); return the LSN once durable. A key
        memory knows is deleted writes nothing. Raises `TypeError`/`ValueError` for a bad key,
        `CacheClosedError`, `LogFailedError`."""
        key = self._limits.delete_op(key)[1]
        return self._sequencer.submit(delete_plan(key))[0]

    def __delitem__(self, key: Key) -> None:
        self.pop(key)

    def pop(self, key: Key, default: Any = _NO_DEFAULT) -> Any:
        """Remove `key` and return its value, atomically (one record). Missing: `default`, or
        KeyError without one."""
        try:
            key = check_key(key, self._limits.stored_key_size)
        except (TypeError, ValueError):  # a key that cannot be stored is not there
            self._sequencer.check_open()  # as for every other call on a closed cache
            if default is _NO_DEFAULT:
                raise KeyError(key) from None
            return default
        plan = pop_plan(key) if default is _NO_DEFAULT else pop_plan(key, default)
        return self._sequencer.submit(plan, (key,))[1]

    def popitem(self) -> tuple[Key, Any]:
        """Remove and return some (key, value) pair, atomically: the newest key memory holds,
        else the first the database holds. KeyError when the cache is empty."""
        while True:
            key = self._any_key()
            if key is _MISSING:
                raise KeyError("popitem(): the cache is empty")
            value = self._sequencer.submit(pop_plan(key, _MISSING), (key,))[1]
            if value is not _MISSING:  # else removed meanwhile: pick again
                return key, value

    def _any_key(self) -> Any:
        key = self._sequencer.newest_key()
        if key is not ABSENT:
            return key
        # Memory holds none: the database's first key that memory has not deleted. Memory is
        # asked alone: a read of the database inside this scan would wait for a second
        # connection of a pool the scan holds one of (PostgreSQL's: for good, at one).
        for key in self._stored_keys():
            try:
                if self._get_nowait(key, _MISSING) is not _MISSING:
                    return key
            except WouldBlock:  # not in memory: the database's value is the cache's
                return key
        return _MISSING

    def _stored_keys(self) -> Iterator[Key]:
        """The database's keys. A scan that fails because close() closed the database under
        it raises `CacheClosedError`, not the database's error (which reads like damage)."""
        try:
            for key, _ in self._backend.items():
                yield key
        except Exception as exc:
            if self._sequencer.closed:
                raise CacheClosedError(f"cache {self.path} is closed") from exc
            raise

    def setdefault(self, key: Key, default: Any = None) -> Any:
        """The value of `key`; if there is none, store `default` and return it (atomically).
        The value returned is a copy, as from `get`: mutating it does not change the cache.
        A default that cannot be stored raises `TypeError`/`ValueError` only if `key` is
        missing."""
        key, op = self._limits.setdefault_op(key, default)
        return self._sequencer.submit(setdefault_plan(key, op), (key,))[1]

    def incr(self, key: Key, delta: int = 1) -> int:
        """Add `delta` to the int under `key` (a missing key counts from 0), atomically;
        return the new value once durable. A non-int value raises `TypeError`; a result
        outside the signed 64-bit range raises `ValueError`. Nothing is written on error."""
        _, key, delta, _ = self._limits.incr_op(key, delta)
        return self._sequencer.submit(lambda tx: tx.incr(key, delta), (key,))[1]

    def put_many(self, entries: Mapping[Key, Any] | Iterable[tuple[Key, Any]]) -> int:
        """Store every (key, value) atomically: one log record, one fsync. Return its LSN.

        Takes a mapping or an iterable of (key, value) pairs; later duplicates of a key win.
        Every entry is validated before anything is written: `TypeError`/`ValueError` for a
        bad pair, key or value, or a batch over the log's record limit; also
        `CacheClosedError`, `LogFailedError`. An empty `entries` writes nothing and returns
        the last LSN assigned so far."""
        return self._commit(self._limits.put_many_ops(entries))

    def update(self, other: Any = (), /, **kwargs: Any) -> None:  # type: ignore[override]
        """`dict.update`, atomically: every entry in one record (see `put_many`)."""
        self.put_many(update_items(other, kwargs))

    def clear(self) -> None:
        """Delete every key, atomically: one record deleting each key memory and the database
        hold (read with the flusher held off, so none is missed). With a database shared by
        other caches, keys they add meanwhile survive. Raises `ValueError` if the keys do not
        fit one log record (about 3 million keys of 20 bytes), `CacheClosedError`."""
        if self._sequencer.closed:  # before the database, which closing closed
            raise CacheClosedError(f"cache {self.path} is closed")
        while True:
            with self._flusher.paused(self.options.flush_timeout):
                # Checked again here: a close that began while we waited for the pause has
                # flushed and may be closing the database now.
                self._sequencer.check_open()
                stored = list(self._stored_keys())
                # Never waits for room: only a flush makes it, and flushes are held off. Nor
                # is it refused for the lack of it: the room it then waited for went to the
                # writers waiting already, and under steady writes it never ran (an outside
                # hunt: 2 minutes and counting, max_dirty 2). It may go past max_dirty, as
                # any clear of more keys than that does.
                try:
                    lsn = self._sequencer.submit_nowait(delete_all_plan(stored),
                                                        backpressure=False)[0]
                    break
                except WouldBlock:  # the pipe's segment is full: started outside the pause
                    pass
            # (not waiting for room either: writers held back by it never start the segment)
            self._sequencer.wait_for_room(backpressure=False)  # then the keys read afresh
        self._sequencer.wait(lsn)

    def batch(self) -> Batch:
        """`with cache.batch() as b: b.put(..); b.delete(..); b.incr(..)`: one atomic write
        on exit; nothing at all if the block raises."""
        self._sequencer.check_open()
        return Batch(self._limits, self._commit)

    def _commit(self, ops: list[Op]) -> int:
        """Log `ops` as ONE record and apply them to memory; return its LSN once durable."""
        plan, needs = ops_plan(ops)
        return self._sequencer.submit(plan, needs)[0]

    # ------------------------------------------------------------ whole-cache views

    def keys(self) -> Any:  # a KeysView of a snapshot
        """Every key, memory and database merged, as a view of a snapshot taken now (str keys
        sorted, then bytes keys sorted). Holds off the flusher while it reads; raises
        `FlushError` if a flush attempt in progress does not end within
        `Options.flush_timeout`, `CacheClosedError`."""
        return dict.fromkeys(key for key, _ in self._merged(decode=False)).keys()

    def items(self) -> Any:  # an ItemsView of a snapshot
        """Every (key, value), as a view of a snapshot (see `keys`)."""
        return dict(self._merged(decode=True)).items()

    def values(self) -> Any:  # a ValuesView of a snapshot
        """Every value, in key order, as a view of a snapshot (see `keys`)."""
        return dict(self._merged(decode=True)).values()

    def __iter__(self) -> Iterator[Key]:
        return iter(list(self.keys()))

    def __len__(self) -> int:
        """How many keys, memory and database merged (see `keys` for what it waits for)."""
        with self._flusher.paused(self.options.flush_timeout):
            return count_after_recovery(self._backend, [self._sequencer.pending()])

    def _merged(self, *, decode: bool) -> list[tuple[Key, Any]]:
        with self._flusher.paused(self.options.flush_timeout):
            pending = self._sequencer.pending()
            merged = {key: encoded for key, encoded in self._backend.items()
                      if key not in pending}
        merged.update((key, encoded) for key, encoded in pending.items() if encoded is not None)
        ordered = sorted(merged, key=key_order)
        if not decode:
            return [(key, None) for key in ordered]
        return [(key, from_encoded(merged[key], key)[0]) for key in ordered]

    # ---------------------------------------------------------------- control

    def flush(self, timeout: float | None = None) -> None:
        """Block until every write acknowledged before the call is in the database and the
        log segments it covered are deleted. Raises `FlushError` once `timeout` seconds
        (default: `Options.flush_timeout`) have passed and the database has not accepted it
        (an attempt already under way is let finish: the backend's own timeout bounds it), or
        if the covered segments could not be deleted; the log keeps every write either way.
        A `timeout` that is not a number of seconds from 0 raises `TypeError`/`ValueError`."""
        self._sequencer.check_open()
        self._flusher.flush(self.options.flush_timeout if timeout is None
                            else check_timeout(timeout))

    def sync(self) -> None:
        """Block until every earlier write is fsync'd (a no-op wait under fsync="always").
        Raises `LogFailedError` if the fsync fails, `CacheClosedError`."""
        self._sequencer.sync()

    @holds_lock
    def stats(self) -> dict[str, Any]:
        """Counters and state (README, "stats()"). `hits`/`misses`: reads served from memory /
        that needed the database (hits are not locked, so concurrent readers may undercount
        slightly). Raises `CacheClosedError`."""
        wal_bytes, wal_segments = self._writer.sizes()
        flusher, sequencer = self._flusher, self._sequencer
        committer = sequencer.committer
        with sequencer.lock:
            sequencer.check_open()
            return {
                "hits": self._hits(),
                "misses": sequencer.misses,
                "writes": sequencer.writes,
                "dirty": sequencer.dirty,
                "cached": len(self._entries.map),
                "evictions": self._entries.evictions,
                "coalesced": sequencer.coalesced,
                "flushes": flusher.flushes,
                "flushed_entries": flusher.flushed_entries,
                "backend_writes": flusher.flushed_entries + self.recovery.keys,
                "flush_errors": flusher.flush_errors,
                "last_flush_error": (None if flusher.last_error is None
                                     else repr(flusher.last_error)),
                "last_flush_seconds": flusher.last_flush_seconds,
                "wal_bytes": wal_bytes,
                "wal_segments": wal_segments,
                "fsyncs": committer.fsyncs,
                "log_batches": committer.batches,
                "recovered_records": self.recovery.replayed,
                "torn_bytes_dropped": self.recovery.torn_bytes,
                "checkpoint_lsn": flusher.checkpoint_lsn,
                "durable_lsn": committer.durable_lsn,
                "next_lsn": sequencer.last_lsn + 1,
            }

    @property
    def closed(self) -> bool:
        return self._sequencer.closed

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
        self._sequencer.refuse_own_hold("close()")  # a signal handler's, inside a write
        self._sequencer.claim_close()  # every write refused from here on
        if self._closing_in == threading.get_ident():
            return  # called inside this thread's own close (a signal handler): that one ends it
        # One close at a time; a second waits for the first, as a close that returns promises
        # the directory released (reopening it next must work). A KeyboardInterrupt may end a
        # close anywhere (Python raises it at any check): the steps left stay in the list,
        # and the next close() carries them out. Each may run twice (interrupted just after
        # it ran): each is idempotent. Untracked last: a child forked before the close is
        # done must still be disowned, not left to carry out the parent's steps.
        with self._close_lock:
            self._closing_in = threading.get_ident()
            try:
                self._close_steps_left()
            finally:
                self._closing_in = None

    def _close_steps_left(self) -> None:
        """Carry out the steps of the close still to do (`close`). An ordinary failure is
        reported once every step has run. An interruption (KeyboardInterrupt, SystemExit) is
        raised at once, its step left first in the list for the next close(), since it may
        have stopped half-way (an LMDB environment still open); except the final flush,
        which is dropped: the log keeps every write, and a close that is asked to stop
        waiting for the database must not wait for it again."""
        if self._close_steps is None:
            self._close_steps = [(step, again) for step, again in (
                (self._sequencer.closed_now, True),
                (self._flusher.stop, True),
                (self._syncer.stop if self._syncer is not None else None, True),
                (lambda: self._flusher.flush(self.options.flush_timeout), False),
                (self._flusher.retire, True),
                (self._sequencer.close_log, True),
                (self._run_closed_hooks, True),
                (self._backend.close if self._owns_backend else None, True),
                (self._dir_lock.release, True),
                (self._entries.clear, True),
                (lambda: forking.untrack(self), True)) if step is not None]
        steps, failure = self._close_steps, None
        while steps:
            step, again = steps[0]
            try:
                step()
            except Exception as exc:  # finish closing, then report the first failure
                failure = failure or exc
            except BaseException as exc:
                if again:
                    raise
                failure = failure or exc
            del steps[0]
        if failure is not None:
            raise failure

    def _when_closed(self, hook: Callable[[], None]) -> None:
        """Run `hook` once the log is closed, in the thread that closes the cache (the front
        ends': AsyncCache lets go of its loop's descriptor so, whoever closes the `Cache`)."""
        self._closed_hooks.append(hook)

    def _run_closed_hooks(self) -> None:
        hooks = self._closed_hooks
        while hooks:  # each taken off once run: an interrupted one runs at the next close
            hooks[0]()
            del hooks[0]

    def _disown_after_fork(self) -> None:
        """In a child just forked (wbcache/forking.py): close the descriptors it inherited
        (the parent's stay open: its flock and its log are untouched) and refuse every use."""
        for close in (self._writer.close, self._dir_lock.release):
            try:
                close()
            except OSError:
                pass
        # A `get` saved before the fork (`g = cache.get`) is a closure over this memory, which
        # the refusal below cannot reach: emptied, every call of it goes to `_read`, refused.
        self._entries.clear()
        path, options = self.path, self.options
        reopen = (lambda: Cache.open(path, options)) if options.shared else None
        forking.disown(self, _ForkedCache, "Cache", self.path, self._pid, reopen)

    def __enter__(self) -> Cache:
        self._sequencer.check_open()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<wbcache.Cache {self.path!r} {'closed' if self.closed else 'open'}>"

    def __reduce__(self) -> NoReturn:
        raise not_sendable("Cache", self.path)


def not_sendable(kind: str, path: str) -> TypeError:
    """Why a cache cannot be pickled (sent to a pool's worker) or copied: pickle's own
    message named py-lmdb's Environment, deep inside (an outside hunt of process pools)."""
    return TypeError(f"a wbcache.{kind} cannot be pickled or copied: it is this process's open "
                     f"directory {path}. Open the directory in the other process instead, "
                     f"with shared=True for many processes (a pool's initializer can open it "
                     f"once per worker)")


class _ForkedCache(Cache, forking.Disowned):
    """A `Cache` inherited through fork(): every use raises `ForkedCacheError`."""

    __repr__ = forking.Disowned.__repr__  # repr() looks on the type, where Cache's comes first


class Batch(BatchOperations):
    """`with cache.batch() as b:` -- written as one record when the block exits cleanly."""

    def __enter__(self) -> Batch:
        self._entered = True
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        ops = self._take(exc_type)
        if ops is not None:
            self.lsn = self._commit_ops(ops)
