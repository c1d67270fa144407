"""`Sequencer`: the write path's one lock, and everything that lock keeps.

Every write goes through here: it is admitted (refused if the cache is closed or its log
failed; made to wait, or told `WouldBlock`, under backpressure), given the next LSN, queued
for the group commit as ONE log record (encoded by `wal/records.py`), and applied to memory
(`Entries`) and to the dirty set, all in one critical section, so that log order, LSN order
and memory agree. `Cache`, `AsyncCache`, the flusher and the interval syncer talk only to it.

Invariants, under `lock`:
  * `_next_lsn` is the LSN the next write gets; every record with LSN < `_next_lsn` has been
    applied to memory and to `_dirty`.
  * memory holds every dirty entry (and clean ones up to `capacity`), newest write per key.
  * `_dirty` holds, per key, the encoded value (None: deleted) written since the last flush
    took it; `_inflight` what the flush in progress is writing. A key in either is pinned.
  * `_deltas` (and `_inflight_deltas`) hold, for the dirty keys written ONLY by increments
    since, the sum of those increments: a database shared by many caches adds it.
  * `_rebase` holds the counters flushed as increments and incremented again (only) while
    that flush ran: their value in memory is built on a total read from the database before
    it, which other caches' increments may have passed since. The flusher, its mutex still
    held (so none of `_deltas` is in the database), reads their totals and `rebase` adds
    `_deltas` to them. Without it, a counter this cache kept incrementing never showed
    another cache's increments: dirty entries are never read again. Kept only for a database
    that applies increments (`rebase_counters`): one this cache alone writes holds nothing
    memory lacks. A counter written otherwise since it was found is dropped when taken.
  * `_reads` holds the database reads in progress, per key. Anything that may make memory
    newer than a read's answer, or drop a newer value from memory, marks the key's reads
    stale: a write of it, a flush that made it clean, its eviction; and so does another
    answer shown by a read of the key answered after it asked (`_supersede`). A stale answer
    is never kept in memory nor built on; a write retries with a fresh read.

**A write interrupted once its LSN is taken** (a KeyboardInterrupt, raised between two
bytecodes, in `_queue` or while its effects are applied): its record may or may not be
queued, and memory may hold part of it. Flushing that memory would put half a batch in the
database and let the log that holds it whole be deleted; another write would leave a hole in
the LSNs. So the sequencer is torn (`_torn`): it refuses writes, and flushes take nothing
(the flusher's `flush` raises), until the cache is reopened; the log holds every acknowledged
write, and the next open replays it whole. Reads from memory may show part of the
interrupted write meanwhile.

**No database call with `lock` held.** A write that needs a value memory cannot give (an
increment, a `del`, a `pop` of a key not in memory) raises `NeedsRead` before anything is
logged; `submit` reads those keys outside the lock (the backend's `get`, given as `fetch`)
and runs the write again.

**Lock order** (docs/design.md): the flusher's mutex, then `lock`. The group committer's
conditions are conditions of `lock` itself; its leader releases `lock` while it writes and
fsyncs, writers waiting for the log release it (for wal/_pipe.c's thread, in C), and so does
the writer that starts the pipe's next segment at admission while every other writer waits.
Nothing here takes another lock while holding `lock`: not the backend's (it is never called),
not the flusher's; the pipe's mutex is a leaf, held for no system call that can block.

Longer than the usual ~400 lines on purpose: everything `lock` guards is in this one file, so
the invariants above can be checked by reading one file (the plans each write runs are in
`writes.py`, memory in `memory.py`).
"""

from __future__ import annotations

import itertools
import logging
import sys
import threading
from collections.abc import Callable, Collection, Iterable
from types import CodeType
from typing import Any, NamedTuple, TypeVar

import msgpack

from wbcache.backends.base import Key
from wbcache.codec import added, from_encoded, increment, value_of
from wbcache.errors import CacheClosedError, LogFailedError, WbcacheError
from wbcache.memory import TOMBSTONE, Entries
from wbcache.wal import GroupCommitter, LogWriter, commit, crashpoints
from wbcache.wal.commit import FOLLOWER_RECHECK, Condition
from wbcache.wal.deferred import log_later
from wbcache.wal.format import MAX_SINGLE_RECORD
from wbcache.wal.records import delete_item, encode_items, encode_put, incr_item, put_item

T = TypeVar("T")
log = logging.getLogger("wbcache.sequencer")

ABSENT: Any = object()  # no value: never written, or deleted
NOT_KNOWN: Any = object()  # memory cannot tell; the database must be read
_MISSING: Any = object()

packb = msgpack.packb

# Where a thread may hold `lock`: this module, the group commit it calls, and the few front-end
# functions that take it themselves (`holds_lock`). Looked at only by `refuse_own_hold`.
_HOLDER_FILES = frozenset({__file__, commit.__file__})
_HOLDERS: set[CodeType] = set()
# How long `refuse_own_hold` waits for `lock` before it looks whether this thread holds it
# (no critical section lasts near as long: the leader lets go of it for its I/O).
OWN_HOLD_WAIT = 1.0

F = TypeVar("F", bound=Callable[..., Any])


def holds_lock(function: F) -> F:
    """Mark a function outside this module that takes `Sequencer.lock` (no wrapper: nothing
    is added to its calls)."""
    _HOLDERS.add(function.__code__)
    return function

Changes = dict[Key, "bytes | None"]  # key -> newest encoded value, None: deleted
Deltas = dict[Key, int]


class WouldBlock(Exception):
    """A non-blocking write met backpressure; nothing was written."""


class NeedsRead(Exception):
    """A write needs the current value of keys that memory cannot give; nothing was
    written. `keys` are read from the database (outside the lock) before it runs again."""

    def __init__(self, keys: list[Key]) -> None:
        super().__init__(keys)
        self.keys = keys


class FlushBatch(NamedTuple):
    """What a flush writes: the entries, the increments among them, and the LSN they reflect
    (every record with LSN <= `lsn` is in them). `again`: taken before, by a flush that
    failed or was interrupted, and handed out unchanged."""

    changes: Changes
    deltas: Deltas
    lsn: int
    again: bool = False


# Ticks of the reads' questions and answers (`_Read.asked`, `.answered`): their order is the
# order in which the database was asked and answered (`next` is atomic).
_ticks = itertools.count(1)
_UNSEEN: Any = object()  # `_Read.newer` before any answer was shown


class _Read:
    """A database read of `key`, registered under the lock before it starts."""

    __slots__ = ("key", "started", "encoded", "_stale", "failed", "asked", "answered", "newer")

    def __init__(self, key: Key, started: float) -> None:
        self.key = key
        self.started = started  # on the entries' clock: how old its answer may be
        self.encoded: bytes | None = None
        self._stale = False  # memory changed meanwhile (a write, a flush, an eviction)
        self.failed = False  # the database was away; memory's value may be counted on
        self.asked = 0  # a tick taken just before the database was asked (0: not yet)
        self.answered = 0  # a tick taken once it answered
        # The answer shown by every read answered after this one asked (`_supersede`; stale
        # if two differ), which this answer may be older than; _UNSEEN while none was
        self.newer: Any = _UNSEEN

    @property
    def stale(self) -> bool:
        """Memory may be newer than this answer: never keep or build on it. So when memory
        changed meanwhile, or a read that may be newer showed another answer. A newer answer
        that is the same is no reason: a write's read of a key readers poll was made stale by
        each of theirs, and retried for good (a review: 59,142 reads for one incr)."""
        return self._stale or (self.newer is not _UNSEEN and self.newer != self.encoded)

    @stale.setter
    def stale(self, value: bool) -> None:
        self._stale = value


Reads = dict[Key, _Read]


class Transaction:
    """What a write plan may do, lock held, to build ONE log record: read the current value
    of a key (`current`; raises `NeedsRead` when memory cannot give it), and put, delete or
    increment keys. Later operations see earlier ones."""

    def __init__(self, sequencer: Sequencer, reads: Reads | None) -> None:
        self._sequencer = sequencer
        self._reads = reads
        self._overlay: dict[Key, Any] = {}
        self.items: list[list[Any]] = []  # log items (wal/records.py)
        self.effects: list[tuple[Key, Any, bytes | None, int | None]] = []

    def current(self, key: Key) -> Any:
        """The value of `key` now (a fresh copy; ABSENT if none)."""
        held = self._overlay.get(key, _MISSING)
        if held is _MISSING:
            return self._sequencer._current(key, self._reads)
        return ABSENT if held is TOMBSTONE else value_of(held)

    def known(self, key: Key) -> Any:
        """What memory knows of `key` (a fresh copy; ABSENT if deleted), or NOT_KNOWN: never
        asks the database."""
        held = self._overlay.get(key, _MISSING)
        if held is _MISSING:
            return self._sequencer._from_memory(key)
        return ABSENT if held is TOMBSTONE else value_of(held)

    def memory_keys(self, others: Iterable[Key]) -> list[Key]:
        """`others` and every key memory holds, each once."""
        return list(dict.fromkeys([*others, *self._sequencer._entries.map]))

    def put(self, key: Key, encoded: bytes, held: Any) -> None:
        self.items.append(put_item(key, encoded))
        self.effects.append((key, held, encoded, None))
        self._overlay[key] = held

    def delete(self, key: Key) -> None:
        self.items.append(delete_item(key))
        self.effects.append((key, TOMBSTONE, None, None))
        self._overlay[key] = TOMBSTONE

    def incr(self, key: Key, delta: int) -> int:
        result = increment(key, delta, self.current(key), ABSENT)
        self.items.append(incr_item(key, delta, result))
        self.effects.append((key, result, packb(result), delta))
        self._overlay[key] = result
        return result


Plan = Callable[[Transaction], T]


class Sequencer:
    """The write path of one open cache (see the module docstring)."""

    def __init__(self, *, writer: LogWriter, next_lsn: int, entries: Entries,
                 fetch: Callable[[Key], bytes | None], sync_every_batch: bool,
                 max_dirty: int, flush_threshold: int, name: str,
                 rebase_counters: bool = False) -> None:
        self.lock = threading.Lock()
        self._space = Condition(self.lock)  # writers waiting out backpressure
        self._committer = GroupCommitter(self.lock, writer, next_lsn=next_lsn,
                                         sync_every_batch=sync_every_batch)
        self._entries = entries
        self._fetch = fetch
        self._max_dirty = max_dirty
        self._flush_threshold = flush_threshold
        self._name = name  # for messages: the cache directory
        self._next_lsn = next_lsn
        self._closed = False
        self._dirty: Changes = {}
        self._inflight: Changes = {}
        self._deltas: Deltas = {}
        self._inflight_deltas: Deltas = {}
        self._inflight_lsn = 0  # the LSN the batch in flight reflects
        # Keys in both `_dirty` and `_inflight` (rewritten while in flight), counted once
        # against `max_dirty`: a batch in flight is no longer merged with newer writes.
        self._overlap = 0
        self._rebase: dict[Key, None] = {}  # in the order they were found (module docstring)
        self._rebase_counters = rebase_counters
        self._reads: dict[Key, list[_Read]] = {}
        self._flush_woken = False
        self._torn: BaseException | None = None  # a write interrupted mid-way (docstring)
        self.wake_flusher: Callable[[], None] = lambda: None  # set by the cache
        self.writes = 0
        self.coalesced = 0
        self.misses = 0

    # ------------------------------------------------------------------ writes

    def put(self, key: Key, encoded: bytes, held: Any) -> int:
        """Log and apply a put; return its LSN once acknowledged. The common write, so it
        has its own path. Raises `CacheClosedError`, `LogFailedError`."""
        with self.lock:
            lsn = self._put(key, encoded, held, True)
            self._committer.wait(lsn)
        if crashpoints.ARMED:
            crashpoints.reached("wal.after_ack")
        return lsn

    def put_nowait(self, key: Key, encoded: bytes, held: Any) -> int:
        """`put` without waiting: the LSN to wait for. Raises `WouldBlock` under backpressure
        (nothing written)."""
        with self.lock:
            lsn = self._put(key, encoded, held, False)
            self._committer.kick()
            return lsn

    def submit(self, plan: Plan[T], needs: Collection[Key] = ()) -> tuple[int, T]:
        """Run `plan` (lock held) on a `Transaction`, log what it wrote as ONE record, apply
        it, and once the record is acknowledged return its LSN and the plan's result.
        `needs`: keys whose current value the plan reads (read from the database first, all
        at once, when memory cannot give them). A plan that writes nothing logs nothing; the
        LSN returned is then the last one before it, acknowledged like every earlier write.
        What the plan raises propagates, with nothing written. Also raises
        `CacheClosedError`, `LogFailedError`, `ValueError` for a record over the log's
        limit."""
        # Every read made is kept until the write is logged: a pass that drops them reads only
        # the keys its own NeedsRead named, so while one key was read another could expire
        # from memory (read_ttl; a counter flushed as a delta), then the first again: the
        # write read the database for good (an outside hunt, PostgreSQL batches of incr).
        reads: Reads = {}
        try:
            while True:
                with self.lock:
                    try:
                        lsn, result = self._log(plan, needs, reads, True)
                    except NeedsRead as need:
                        fresh = self._more_reads(reads, need.keys)
                    else:
                        ended, reads = reads, {}
                        self._end_reads(ended)
                        self._committer.wait(lsn)
                        return lsn, result
                self._fill_reads(fresh, count_on_memory=True)  # ends them if it fails
        finally:
            if reads:  # ending a read twice is harmless (`_end_reads`)
                with self.lock:
                    self._end_reads(reads)

    def submit_nowait(self, plan: Plan[T], needs: Collection[Key] = (), *,
                      backpressure: bool = True) -> tuple[int, T]:
        """`submit` without reading the database or waiting: (the LSN to wait for, the plan's
        result). Raises `WouldBlock` under backpressure and `NeedsRead` when the plan needs a
        value memory cannot give (nothing written either way). Without `backpressure`,
        admitted however many entries are dirty (only `Cache.clear`: it holds flushes off, so
        no room it waited for would be left to it, below)."""
        with self.lock:
            lsn, result = self._log(plan, needs, None, False, backpressure)
            self._committer.kick()
            return lsn, result

    def wait_for_room(self, *, backpressure: bool = True) -> None:
        """Return once a write would be admitted at once: backpressure waited out (unless
        told not to), a full segment under the pipe started (lock released meanwhile). For a
        caller that holds what a flush needs, and so must not wait in `submit`
        (`Cache.clear`). Raises `CacheClosedError`, `LogFailedError`."""
        with self.lock:
            self._admit(True, backpressure)

    def wait(self, lsn: int) -> None:
        """Return once record `lsn` (from a `*_nowait` call) is acknowledged. Raises
        `LogFailedError`."""
        with self.lock:
            self._committer.wait(lsn)

    def sync(self) -> None:
        """Wait until every write so far is fsync'd. Raises `LogFailedError`,
        `CacheClosedError`."""
        with self.lock:
            self.check_open()
            # Torn, the last LSN taken may never reach the log: up to the last record queued.
            last = self._next_lsn - 1 if self._torn is None else self._committer.queued_lsn
            self._committer.wait(last, durable=True)

    @property
    def torn(self) -> BaseException | None:
        """The interruption that tore the sequencer (module docstring), or None."""
        return self._torn

    def sync_unsynced(self) -> None:
        """Under fsync="interval", on the interval: fsync the log if it has unsynced records.
        A failed log is left as it is (writes are refused already)."""
        committer = self._committer
        with self.lock:
            if committer.failure is None and committer.durable_lsn < committer.queued_lsn:
                try:
                    committer.wait(committer.queued_lsn, durable=True)
                except Exception:  # LogFailedError: the cache now refuses writes
                    pass

    # ------------------------------------------------------------------ reads

    def in_memory(self, key: Key) -> bool:
        """Lock-free: whether memory can answer for `key` without the database."""
        return self._from_memory(key) is not NOT_KNOWN

    def read(self, key: Key) -> Any:
        """The value of `key` (a fresh copy; ABSENT if none): from memory, else from the
        database, then kept as a clean entry unless memory has become newer meanwhile.
        Raises the backend's error if the read fails, `CacheClosedError`."""
        with self.lock:
            self.check_open()
            self.misses += 1
            value = self._from_memory(key)
            if value is not NOT_KNOWN:  # a write or another read got there first
                return value
            reads = self._start_reads([key])
        self._fill_reads(reads, count_on_memory=False)
        with self.lock:
            try:
                value = self._from_memory(key)
                if value is NOT_KNOWN:
                    value = self._value_read(reads[key])
            finally:
                self._end_reads(reads)
        return value

    def newest_key(self) -> Any:
        """The newest key memory holds a value for (answerable without the database), or
        ABSENT when it holds none."""
        with self.lock:
            self.check_open()
            key = self._entries.newest(lambda key: self._from_memory(key) is not NOT_KNOWN)
            return ABSENT if key is None else key

    def pending(self) -> Changes:
        """Every write not yet in the database, newest per key (a copy)."""
        with self.lock:
            self.check_open()
            pending = dict(self._inflight)
            pending.update(self._dirty)
            return pending

    # ------------------------------------------------------------------ the flusher's side

    def take_dirty(self) -> FlushBatch:
        """The dirty entries, their deltas and the LSN they reflect; they are in flight until
        `flushed`. While a batch is in flight (its flush failed, or was interrupted after the
        database may have committed it), that batch, unchanged (`again`): merged with newer
        writes, a database that adds increments would add its increments twice if it had
        committed it (wbcache/flusher.py)."""
        with self.lock:
            if self._torn is not None:  # memory may hold half a write: the log has it whole
                return FlushBatch({}, {}, 0)
            if self._inflight:
                return FlushBatch(self._inflight, self._inflight_deltas, self._inflight_lsn,
                                  again=True)
            # No call between these stores: an interrupt leaves all or none of them.
            self._inflight, self._inflight_deltas, self._inflight_lsn = \
                self._dirty, self._deltas, self._next_lsn - 1
            self._dirty, self._deltas, self._overlap = {}, {}, 0
            self._flush_woken = False
            return FlushBatch(self._inflight, self._inflight_deltas, self._inflight_lsn)

    def flushed(self) -> None:
        """The batch in flight is committed: its entries are clean (unless rewritten)."""
        with self.lock:
            inflight, deltas, dirty = self._inflight, self._inflight_deltas, self._dirty
            for key in self._reads:
                if key in inflight:  # its read may predate this flush
                    self._mark_stale(key)
            self._entries.now_clean((key for key in inflight if key not in dirty),
                                    deltas.__contains__)
            if self._rebase_counters:
                newer_deltas = self._deltas
                for key in deltas:
                    if key in newer_deltas:  # incremented again, only, while the flush ran
                        self._rebase[key] = None
            self._inflight, self._inflight_deltas, self._overlap = {}, {}, 0
            self._entries.unblock()
            self._space.notify_all()
            self._evict()

    def counters_to_rebase(self, limit: int) -> list[Key]:
        """After `flushed`, the flusher's mutex held: up to `limit` counters of `_rebase`
        (module docstring), the longest waiting first, taken out of it. Those written
        otherwise since (a put, a delete, flushed: no longer in `_deltas`) are dropped on the
        way, so they neither take a read nor pile up ahead of the counters still waiting."""
        with self.lock:
            waiting, deltas = self._rebase, self._deltas
            keys, seen = [], []
            for key in waiting:
                seen.append(key)
                if key in deltas:
                    keys.append(key)
                    if len(keys) == limit:
                        break
            for key in seen:
                del waiting[key]
            return keys

    def rebase(self, totals: dict[Key, bytes | None]) -> None:
        """The flusher's mutex held since `counters_to_rebase`, so no increment of this cache
        reached the database meanwhile: `totals` (each key's encoded value there, read
        since) hold none of `_deltas`. A counter still written only by increments since the
        last flush becomes its total plus them, as the database will add them; one written
        otherwise since (a put, a delete) is left as it is."""
        with self.lock:
            if self._torn is not None:
                return
            deltas, dirty = self._deltas, self._dirty
            for key, stored in totals.items():
                delta = deltas.get(key)
                if delta is None or key in self._inflight:
                    continue
                value = added(stored, delta)
                self._entries.write(key, value)
                dirty[key] = packb(value)
                if self._reads:
                    self._mark_stale(key)

    # ------------------------------------------------------------------ state

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def last_lsn(self) -> int:
        """The LSN of the last write assigned (0 before any)."""
        return self._next_lsn - 1

    @property
    def dirty(self) -> int:
        """Keys not yet in the database (one both in flight and rewritten since counts once)."""
        return len(self._dirty) + len(self._inflight) - self._overlap

    @property
    def committer(self) -> GroupCommitter:
        """The group commit, for a front end that waits on its own terms (AsyncCache): its
        `acknowledged_lsn`, `failure`, `add_listener`, `start_background_leader`."""
        return self._committer

    def close(self) -> bool:
        """Refuse every write from now on (`claim_close`) and tell the waiters (`closed_now`).
        Returns False if it was closed already."""
        if not self.claim_close():
            return False
        self.closed_now()
        return True

    def refuse_own_hold(self, call: str) -> None:
        """Before `call` takes `lock` from where it may have interrupted this very thread
        with `lock` held (a signal handler's `close()`, which ran while the main thread was in
        the middle of a write: `lock` is not reentrant, and the handler waited for itself for
        ever, an outside hunt): raise `WbcacheError` if `lock` has not come free within
        OWN_HOLD_WAIT and a frame of this thread is where `lock` is held, or if this thread
        leads the group commit's batch (the lock let go for its write, which the close waits
        for: a review). Otherwise return, and the caller takes it as usual."""
        if self.lock.acquire(True, OWN_HOLD_WAIT):
            try:  # the lock is free while a leader writes: the handler may have cut it short
                if not self._committer.led_here():
                    return
                where = "the group commit's write"
            finally:
                self.lock.release()
        else:
            where = self._holder_below()
            if where is None:
                return
        raise WbcacheError(
            f"{call} of cache {self._name} was called from a signal handler that interrupted "
            f"this thread inside a cache operation ({where}), which the cache waits for: it "
            f"cannot run there. Raise from the handler instead (SystemExit, "
            f"KeyboardInterrupt) and close the cache in a `with` block or a `finally`; the "
            f"log keeps every acknowledged write")

    @staticmethod
    def _holder_below() -> str | None:
        """The name of a function of this thread's stack (below the caller's caller) where
        `lock` is held, or None."""
        frame = sys._getframe(2)
        while frame is not None:
            code = frame.f_code
            if code.co_filename in _HOLDER_FILES or code in _HOLDERS:
                return code.co_name
            frame = frame.f_back
        return None

    def claim_close(self) -> bool:
        """Refuse every write from now on; False if it was closed already. Only that: the
        caller that gets True must finish the close, so nothing here may be interrupted
        between the claim and its return (a KeyboardInterrupt there would leave a closed
        cache nobody finishes closing, and every later `Cache.close` waiting for it)."""
        with self.lock:
            if self._closed:
                return False
            self._closed = True
            return True

    def closed_now(self) -> None:
        """After `claim_close`: wake writers waiting out backpressure (refused), and make
        every read in flight keep nothing (a hit on a closed cache must raise, not answer)."""
        with self.lock:
            self._space.notify_all()
            for reads in self._reads.values():
                for read in reads:
                    read.stale = True

    def close_log(self) -> None:
        """Write and fsync whatever is queued, then close the log."""
        with self.lock:
            self._committer.close()

    def check_open(self) -> None:
        """Raise `CacheClosedError` once the cache is closed (for its front ends too)."""
        if self._closed:
            raise CacheClosedError(f"cache {self._name} is closed")

    # ------------------------------------------------------------------ lock held

    def _admit(self, block: bool, backpressure: bool = True) -> int:
        """Refuse if closed or the log failed; wait out backpressure (unless told not to),
        and start the pipe's next log segment when this one is full (or, with `block` False,
        raise WouldBlock). Return the LSN the write will get (consumed only by `_queue`). The
        rotation is here, before the LSN is taken, because it lets go of the lock: in the
        middle of a write, the flusher could take a dirty set and checkpoint without it."""
        committer = self._committer
        if self._closed or self._torn is not None or committer.failure is not None:
            self._check_writable()  # raises
        while True:
            if backpressure and (len(self._dirty) + len(self._inflight) - self._overlap
                                 >= self._max_dirty):
                self.wake_flusher()
                if not block:
                    raise WouldBlock
                # A backstop, as a follower's: an interrupt may skip the notify of close() or
                # of a tear (raised between setting the state and telling the waiters).
                self._space.wait(FOLLOWER_RECHECK)
            elif committer.rotation_due():  # the pipe's segment is full: start the next
                if not block:
                    raise WouldBlock  # an event loop does not wait for the fdatasync in it
                if committer.rotating:
                    committer.wait_for_rotation()
                else:
                    committer.rotate()  # lock released meanwhile, writers kept out
            else:
                return self._next_lsn
            self._check_writable()  # the log may have failed while we waited

    def _check_writable(self) -> None:
        self.check_open()
        if self._torn is not None:
            raise LogFailedError(
                f"a write to {self._name} was interrupted ({self._torn!r}) after it was "
                f"logged: writes and flushes are refused until the cache is reopened, which "
                f"replays the log") from self._torn
        self._committer.check()

    def _tear(self, interruption: BaseException, lsn: int) -> None:
        """A write interrupted once its LSN `lsn` was taken (module docstring)."""
        if self._torn is None:
            self._torn = interruption
            log_later(log, logging.ERROR, "a write to %s (LSN %d) was interrupted (%r) after "
                      "it was logged: writes and flushes are refused until the cache is "
                      "reopened, which replays the log", self._name, lsn, interruption)
        self._space.notify_all()  # writers waiting for room: refused, not left waiting

    def _queue(self, lsn: int, payload: bytes) -> None:
        """Hand record `lsn` to the group commit; from here the LSN is used. Nothing after
        this point in a write may raise (short of the log failing in `wait`, or an interrupt in
        `append`, which fails the log): the record is on its way to disk, so its effects on
        memory must all be applied."""
        self._next_lsn = lsn + 1  # first: an interrupt in `append` must not reuse the LSN
        try:
            self._committer.append(lsn, payload)
        except BaseException as exc:  # only an interrupt: `append` keeps a failure
            self._tear(exc, lsn)
            raise

    def _put(self, key: Key, encoded: bytes, held: Any, block: bool) -> int:
        lsn = self._admit(block)
        self._queue(lsn, encode_put(lsn, key, encoded))
        try:
            self._remember(key, held, encoded, None)
        except BaseException as exc:
            self._tear(exc, lsn)
            raise
        self.writes += 1
        self._evict()
        return lsn

    def _log(self, plan: Plan[T], needs: Collection[Key], reads: Reads | None,
             block: bool, backpressure: bool = True) -> tuple[int, T]:
        lsn = self._admit(block, backpressure)
        if needs:
            self._check_known(needs, reads)
        transaction = Transaction(self, reads)
        result = plan(transaction)
        if not transaction.items:  # nothing to write: as durable as what came before it
            return self._next_lsn - 1, result
        payload = encode_items(lsn, transaction.items)
        if len(payload) > MAX_SINGLE_RECORD:
            raise ValueError(f"a write of {len(transaction.items)} operations is "
                             f"{len(payload)} bytes encoded; the log's record limit is "
                             f"{MAX_SINGLE_RECORD} bytes")
        self._queue(lsn, payload)
        try:
            for key, held, encoded, delta in transaction.effects:
                self._remember(key, held, encoded, delta)
        except BaseException as exc:
            self._tear(exc, lsn)
            raise
        self.writes += len(transaction.effects)
        self._evict()
        return lsn, result

    def _remember(self, key: Key, held: Any, encoded: bytes | None, delta: int | None) -> None:
        """The newest write of `key` is `held` in memory, dirty until flushed; `delta` is set
        when the write is an increment."""
        self._entries.write(key, held)
        if self._reads:
            self._mark_stale(key)
        dirty = self._dirty
        deltas = self._deltas
        before = len(dirty)
        dirty[key] = encoded
        if len(dirty) == before:  # rewritten before a flush took it
            self.coalesced += 1
            if deltas:
                if delta is not None and key in deltas:
                    deltas[key] += delta  # still increments only
                else:
                    deltas.pop(key, None)
            return
        if delta is not None:
            deltas[key] = delta
        if self._inflight and key in self._inflight:
            self._overlap += 1
        if before + 1 >= self._flush_threshold and not self._flush_woken:
            self._flush_woken = True
            self.wake_flusher()

    def _evict(self) -> None:
        entries = self._entries  # within capacity (every write but a few): no call at all
        if len(entries.map) > entries.capacity and not entries.evict(self._pinned,
                                                                      self._evicted):
            self.wake_flusher()  # every entry over capacity is dirty: a flush makes room

    def _pinned(self, key: Key) -> bool:
        return key in self._dirty or key in self._inflight

    def _evicted(self, key: Key) -> None:
        if self._reads:
            self._mark_stale(key)

    # -------------------------------------------- reads from the database, and their races

    def _from_memory(self, key: Key) -> Any:
        """The value memory holds for `key` (a fresh copy; ABSENT if deleted), or NOT_KNOWN
        when memory cannot answer: not held, or clean and past read_ttl. Safe without the
        lock (dict reads are atomic); exact with it."""
        held = self._entries.map.get(key, _MISSING)
        if held is _MISSING:
            return NOT_KNOWN
        if key in self._dirty or key in self._inflight or self._entries.fresh(key):
            return ABSENT if held is TOMBSTONE else value_of(held)
        return NOT_KNOWN

    def _current(self, key: Key, reads: Reads | None) -> Any:
        """The value of `key` now (a fresh copy; ABSENT if none), from memory or from a read
        made for this write; raises `NeedsRead` when neither can tell."""
        value = self._from_memory(key)
        if value is not NOT_KNOWN:
            return value
        read = reads.get(key) if reads else None
        if read is None or read.stale:
            raise NeedsRead([key])
        if read.failed:  # the database is away: count on from what memory holds, if anything
            held = self._entries.map.get(key, _MISSING)
            if held is _MISSING:
                raise NeedsRead([key])
            return ABSENT if held is TOMBSTONE else value_of(held)
        return self._value_read(read)

    def _check_known(self, keys: Iterable[Key], reads: Reads | None) -> None:
        """Raise `NeedsRead` (all at once) for the keys whose value neither memory nor
        `reads` gives."""
        missing = []
        for key in keys:
            if key not in missing and self._from_memory(key) is NOT_KNOWN:
                read = reads.get(key) if reads else None
                if read is None or read.stale:
                    missing.append(key)
        if missing:
            raise NeedsRead(missing)

    def _value_read(self, read: _Read) -> Any:
        """The value `read` found (ABSENT if none), kept in memory unless stale."""
        self._supersede(read)  # kept or not, its caller is shown it
        if read.stale:  # still a right answer for a read: it overlapped the change; not kept
            return ABSENT if read.encoded is None else from_encoded(read.encoded, read.key)[0]
        if read.encoded is None:
            self._entries.forget(read.key)  # deleted by another cache
            return ABSENT
        value, held = from_encoded(read.encoded, read.key)
        if self._entries.keep_clean(read.key, held, read.started):
            self._evict()
        return value

    def _supersede(self, read: _Read) -> None:
        """`read`'s answer is shown (and kept, unless stale): every read of its key that
        asked the database before that answer came is stale unless its answer is the same
        as every answer so shown (`_Read.newer`; two that differ make it stale at once), as
        it may be older (a write may keep its reads for long, `submit`; once memory's entry
        expired, one of them would otherwise put its older answer over this one). Not the
        reads registered before it: one may ask the database after another registered
        later has its answer (waiting for a connection), and the older answer went over
        the newer one, which a reader had seen (an outside hunt, with two caches on one
        database). A read that has not asked yet will have a newer answer."""
        answered, encoded = read.answered, read.encoded
        for other in self._reads.get(read.key, ()):
            if other is not read and 0 < other.asked < answered:
                if other.newer is _UNSEEN:
                    other.newer = encoded
                elif other.newer != encoded:
                    # two answers shown since it asked differ: its own differs from one of
                    # them, which may be the newer (the one shown last need not be: a stale
                    # read of an older answer, shown after, turned it back: a review)
                    other.stale = True

    def _start_reads(self, keys: Iterable[Key]) -> Reads:
        """Register a read of each key; end them with `_end_reads`."""
        now = self._entries.now()
        reads = {key: _Read(key, now) for key in keys}
        for key, read in reads.items():
            self._reads.setdefault(key, []).append(read)
        return reads

    def _more_reads(self, reads: Reads, keys: Iterable[Key]) -> Reads:
        """Register a read of each of `keys`, in place of any stale one `reads` holds, add
        them to `reads` and return them (to be filled)."""
        for key in keys:
            stale = reads.get(key)
            if stale is not None:
                self._end_reads({key: stale})
        fresh = self._start_reads(keys)
        reads.update(fresh)
        return fresh

    def _end_reads(self, reads: Reads) -> None:
        """Unregister `reads`; one already ended is passed over (an interrupt in `submit` may
        leave it to be ended again)."""
        for key, read in reads.items():
            registered = self._reads.get(key)
            if registered is not None and read in registered:
                registered.remove(read)
                if not registered:
                    del self._reads[key]

    def _mark_stale(self, key: Key) -> None:
        """Memory's state of `key` changed: no read in progress may be kept."""
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
                    read.asked = next(_ticks)
                    read.encoded = self._fetch(read.key)
                    read.answered = next(_ticks)
                except Exception:
                    if not (count_on_memory and read.key in self._entries.map):
                        raise
                    read.failed = True
        except BaseException as exc:
            with self.lock:
                self._end_reads(reads)
            if self._closed:
                raise CacheClosedError(f"cache {self._name} is closed") from exc
            raise
