"""Background work of an open cache: the `Flusher`, and under fsync="interval" the
`IntervalSyncer`.

A flush cycle:
  1. take the dirty set and the LSN S it reflects from the sequencer (every record with
     LSN <= S has been applied to memory; the taken entries are "in flight");
  2. `backend.apply(puts, deletes, S, increments)`: one transaction, retried with backoff on
     error while the log keeps the data;
  3. tell the sequencer: the in-flight entries become clean (unless rewritten meanwhile);
     counters flushed as increments and incremented again meanwhile are read back from the
     database and rebased on its total (`Sequencer.rebase`), at most `REBASE_PER_FLUSH`;
  4. delete the log segments whose last LSN <= S. Never before step 2 has committed.
A batch taken is sent unchanged until step 3 has run for it: one whose attempt failed, or was
interrupted (its commit then unknown: it may have gone through), is sent again alone before
the next is taken (`Sequencer.take_dirty`), and a backend that finds it committed that very
call adds nothing (`Backend.apply`).

Cycles run on the timer, when woken (dirty threshold, backpressure, capacity pressure), and in
the caller's thread for `flush()`; `_mutex` keeps them one at a time (a cycle asked for
inside a cycle of the same thread, by a signal handler, is refused: `paused`). Lock order: `_mutex`,
then the sequencer's lock (taken inside `take_dirty` and `flushed`, never across `apply`).
`_turns` (a condition of its own lock, which takes no other) only counts callers waiting for
`_mutex`, and is last in the order (a caller that got `_mutex` takes it to say so): the
background thread lets those callers go before its next cycle or sweep, since a plain lock is
not fair (the thread releasing it takes it back first, cycle after cycle, while writers keep
waking it).

Nothing is logged in place, under `_mutex` or in the flusher's thread: a logging handler is
the application's code and may write to the cache, which under backpressure waits for a flush.
The reports go to `log_later` (wal/deferred.py), which logs them from a thread of its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from wbcache.backends.base import Backend
from wbcache.errors import FlushError
from wbcache.recovery import apply_changes
from wbcache.sequencer import Changes, Deltas, FlushBatch, Sequencer
from wbcache.wal import LogWriter, crashpoints
from wbcache.wal.commit import Event
from wbcache.wal.deferred import log_later

_FIRST_RETRY_DELAY = 0.01  # seconds; doubles after each failure
_MAX_RETRY_DELAY = 2.0
_STOP_RECHECK = 0.5  # s between looks at `stop` while the thread waits for the mutex
_CALLERS_FIRST = 1.0  # seconds a cycle waits at most for the callers of paused() to go first
OUTAGE_REPORT_EVERY = 30.0  # seconds between summaries while the database keeps failing
# Counters read back per flush (`_rebase_counters`); the rest wait for the next.
REBASE_PER_FLUSH = 256

log = logging.getLogger("wbcache.flusher")


def _say(level: int, message: str, *args: object) -> None:
    """Log from a thread of its own, later (module docstring)."""
    log_later(log, level, message, *args)


class _Outage:
    """Rate-limited reports of database failures: the first at WARNING, then a summary every
    `OUTAGE_REPORT_EVERY` seconds while they last, and the end of the outage at INFO. Without
    this, an operator would learn of a database that refuses flushes only by polling stats."""

    def __init__(self, where: str) -> None:
        self._where = where
        self._since: float | None = None  # start of the outage in progress
        self._reported = 0.0
        self._failures = 0

    def failed(self, error: BaseException) -> None:
        now = time.monotonic()
        self._failures += 1
        if self._since is None:
            self._since = self._reported = now
            _say(logging.WARNING, "flush into %s failed: %s; retrying with backoff (the log "
                 "keeps every write)", self._where, error)
        elif now - self._reported >= OUTAGE_REPORT_EVERY:
            self._reported = now
            _say(logging.WARNING, "flushes into %s failing for %.1f s (%d attempts); last "
                 "error: %s", self._where, now - self._since, self._failures, error)

    def succeeded(self) -> None:
        if self._since is not None:
            _say(logging.INFO, "flush into %s succeeded again after %.1f s and %d failed "
                 "attempts", self._where, time.monotonic() - self._since, self._failures)
            self._since, self._failures = None, 0


class Flusher:
    """Moves dirty entries into the database: a background thread on the timer and when
    woken, and `flush()` in the caller's thread (see the module docstring for one cycle)."""

    def __init__(self, *, sequencer: Sequencer, backend: Backend, writer: LogWriter,
                 interval: float, checkpoint_lsn: int,
                 sweep: Callable[[Callable[..., None]], object] | None = None,
                 sweep_interval: float = 5.0) -> None:
        """`sweep` (a shared directory's adoption of orphan lanes) runs in the flusher's
        thread every `sweep_interval` seconds, between flushes."""
        self._sequencer = sequencer
        self._sweep = sweep
        self._sweep_interval = sweep_interval
        self._last_sweep = time.monotonic()
        self._backend = backend
        self._writer = writer
        self._interval = interval
        # One cycle at a time. Reentrant only so that `paused` can tell it holds it (an
        # interrupt as `acquire` returned): nothing takes it twice.
        self._mutex = threading.RLock()
        # Callers of paused(): waiting, and served. Entered through its lock, whose `with` is
        # C's, not the Condition's (why: wal/commit.py's `Event`).
        self._turns_lock = threading.Lock()
        self._turns = threading.Condition(self._turns_lock)
        self._waiting = 0
        self._served = 0
        # Interrupt-safe events (wal/commit.py): `wake` and `stop` run in callers' threads.
        self._wakeup = Event()
        self._stop = Event()
        self._ended = Event()  # set as the thread's last act (`_join`)
        self._thread = threading.Thread(target=self._run_then_end, name="wbcache-flusher",
                                        daemon=True)
        self.checkpoint_lsn = checkpoint_lsn
        # Set by close() once its final flush is over: a flush still going on (the one a
        # signal handler calling close() interrupted) stops retrying a closed database.
        self.retired = False
        self.flushes = 0
        self.flushed_entries = 0
        self.flush_errors = 0
        self.last_flush_seconds = 0.0
        self.last_error: BaseException | None = None
        self._outage = _Outage(f"the {backend.kind} database")

    def start(self) -> None:
        self._thread.start()

    def retire(self) -> None:
        """Called by close() once its final flush is over (`retired`)."""
        self.retired = True

    def wake(self) -> None:
        self._wakeup.set()

    def flush(self, timeout: float) -> None:
        """Run a cycle in this thread, retrying with backoff; raise `FlushError` if it cannot
        commit (and delete the segments it covers) within `timeout` seconds."""
        torn = self._sequencer.torn
        if torn is not None:  # memory may hold half a write: nothing is flushed from it
            raise FlushError("nothing can be flushed: a write was interrupted after it was "
                             "logged; the log keeps every write, and reopening the cache "
                             "replays it") from torn
        deadline = time.monotonic() + timeout
        with self.paused(timeout):
            self._cycle(deadline)

    @contextmanager
    def paused(self, timeout: float) -> Iterator[None]:
        """Hold off every flush cycle (the database then changes only through us). Waits for
        at most the attempt in progress; raises `FlushError` after `timeout` seconds, or at
        once inside a cycle of this thread."""
        # Interrupt-safe (a KeyboardInterrupt, a signal handler's exception, raised as a call
        # returns or a function starts: tests/test_interrupt_points.py): once the mutex is
        # taken, it is released whatever comes, even as `acquire` returns, before `acquired`
        # is set; the count of waiting callers goes back down whatever comes.
        if self._mutex._is_owned():  # type: ignore[attr-defined]
            # This thread is inside a cycle: a signal handler (or a finalizer) that
            # interrupted it. A nested cycle would take and send the batch the outer one is
            # sending; waiting would wait for ever.
            raise FlushError("called inside a flush, len(), keys() or clear() of this same "
                             "thread (from a signal handler?), which holds the flusher; the "
                             "log keeps every write")
        acquired = False
        try:
            counted = False
            try:
                with self._turns_lock:
                    self._waiting += 1
                    counted = True  # with no call in between: both, or neither
                acquired = self._mutex.acquire(timeout=timeout)
            except BaseException:
                acquired = self._mutex._is_owned()  # type: ignore[attr-defined]
                raise
            finally:
                if counted:
                    with self._turns_lock:
                        self._waiting -= 1
                        self._served += acquired
                        self._turns.notify_all()
            if not acquired:
                raise FlushError(f"timed out after {timeout} s waiting for the flusher (last "
                                 f"database error: {self.last_error!r}); the log keeps every "
                                 f"write")
            yield
        finally:
            if acquired:
                self._mutex.release()

    def stop(self) -> None:
        """Stop the background thread. A batch it could not commit stays in flight and the
        next cycle (close's final flush) sends it again."""
        self._stop.set()
        self._wakeup.set()
        with self._turns_lock:
            self._turns.notify_all()
        _join(self._thread, self._ended)

    def _run_then_end(self) -> None:
        try:
            self._run()
        finally:
            self._ended.set()

    def _run(self) -> None:
        # One attempt per turn, holding the mutex; the backoff after a failure is spent
        # OUTSIDE it, so len(), keys() and flush() wait for one attempt at most, never for a
        # whole database outage.
        delay = _FIRST_RETRY_DELAY
        failing = False
        next_flush = time.monotonic() + self._interval
        while not self._stop.is_set():
            if failing:
                if self._stop.wait(delay):
                    return
                delay = min(delay * 2, _MAX_RETRY_DELAY)
            else:
                woken = self._wakeup.wait(max(0.0, self._next_wake(next_flush)))
                self._wakeup.clear()
                if self._sweep_due():
                    self._run_sweep()
                if not woken and time.monotonic() < next_flush:
                    continue  # woke for the sweep only
            next_flush = time.monotonic() + self._interval
            self._let_callers_go()
            if not self._take_mutex():
                return
            try:
                failing = not self._cycle(None)
            except Exception as exc:  # keep flushing; the error is counted and kept
                self._failed(exc)
                failing = True
            finally:
                self._mutex.release()
            if not failing:
                delay = _FIRST_RETRY_DELAY

    def _take_mutex(self) -> bool:
        """In the background thread: the mutex, or False once `stop` is set. Its holder may be
        the very thread stopping this one: `close()` from a signal handler that interrupted a
        `flush()` in the main thread; a plain wait would then never end."""
        while not self._mutex.acquire(timeout=_STOP_RECHECK):
            if self._stop.is_set():
                return False
        if self._stop.is_set():
            self._mutex.release()
            return False
        return True

    def _let_callers_go(self) -> None:
        """Wait until the callers of `paused()` waiting now have had the mutex (or gave up):
        they wait for the attempt in progress at most, never for the cycles after it. Callers
        that come later do not hold this cycle back."""
        deadline = time.monotonic() + _CALLERS_FIRST
        with self._turns_lock:
            owed = self._served + self._waiting
            while self._waiting and self._served < owed and not self._stop.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:  # a caller woken for the mutex takes it within ms
                    return
                self._turns.wait(remaining)

    def _next_wake(self, next_flush: float) -> float:
        """Seconds until the next flush or, with a sweep, the next sweep."""
        now = time.monotonic()
        if self._sweep is None:
            return next_flush - now
        return min(next_flush, self._last_sweep + self._sweep_interval) - now

    def _sweep_due(self) -> bool:
        return (self._sweep is not None
                and time.monotonic() - self._last_sweep >= self._sweep_interval)

    def _cycle(self, deadline: float | None) -> bool:
        """One flush, mutex held. With a `deadline` (a caller's flush), retry until it passes,
        then raise `FlushError`; without, try once and return whether it committed. A batch
        still in flight from an earlier attempt comes first, alone (`Sequencer.take_dirty`),
        then the writes since."""
        batch = self._sequencer.take_dirty()
        if not self._send(batch, deadline):
            return False
        if batch.again and not self._send(self._sequencer.take_dirty(), deadline):
            return False
        self._delete_covered_segments(strict=deadline is not None)  # also retries a failed one
        return True

    def _send(self, batch: FlushBatch, deadline: float | None) -> bool:
        """Apply `batch`, then mark it flushed. Until it is marked, it stays in flight, and
        its commit is not known here: an interrupt (a KeyboardInterrupt, a signal handler's
        exception) may have left `apply`, or this method, after the database committed it.
        Then it is sent again, unchanged, and the backend, finding that it committed it,
        adds nothing (`Backend.apply`)."""
        started = time.perf_counter()
        changes, deltas, lsn, _ = batch
        if changes or lsn > self.checkpoint_lsn:
            if not self._apply(changes, deltas, lsn, deadline):
                return False
            self._sequencer.flushed()
            self.checkpoint_lsn = lsn
            self.flushes += 1
            self.flushed_entries += len(changes)
            self.last_flush_seconds = time.perf_counter() - started
            self._rebase_counters()
            self._outage.succeeded()
        return True

    def _rebase_counters(self) -> None:
        """Mutex held, a flush just committed: what the database holds for the counters this
        cache incremented during it, for `Sequencer.rebase`. A failed read leaves them as
        they are: they are rebased after a later flush, or read again once clean. A closing
        cache's last flush reads none (close would wait for a database that may be gone)."""
        if self._sequencer.closed:  # nothing reads memory after close: no round trip
            return
        keys = self._sequencer.counters_to_rebase(REBASE_PER_FLUSH)
        if not keys:
            return
        get_many = getattr(self._backend, "get_many", None)  # one round trip (PostgreSQL)
        try:
            if get_many is not None:
                totals = get_many(keys)
            else:
                totals = {key: self._backend.get(key) for key in keys}
        except Exception as exc:  # the flush itself is done
            _say(logging.DEBUG, "reading back %d counters after a flush failed: %s",
                 len(keys), exc)
            return
        self._sequencer.rebase(totals)

    def _delete_covered_segments(self, *, strict: bool) -> None:
        """Delete the log segments the committed checkpoint covers (never before the commit).
        A failure is counted; the next cycle (or recovery) deletes them. `strict` (a caller's
        flush, which promises the deletion) raises it as `FlushError`."""
        try:
            deleted = self._writer.delete_through(self.checkpoint_lsn)
        except OSError as exc:
            self._failed(exc)
            if strict:
                raise FlushError(f"the flush committed, but deleting the log segments it "
                                 f"covers failed: {exc}") from exc
            return
        if deleted and crashpoints.ARMED:
            crashpoints.reached("flush.after_truncate")

    def _apply(self, changes: Changes, deltas: Deltas, lsn: int, deadline: float | None) -> bool:
        delay = _FIRST_RETRY_DELAY
        while True:
            try:
                if crashpoints.ARMED:
                    crashpoints.reached("flush.before_commit")
                apply_changes(self._backend, changes, deltas, lsn)
                if crashpoints.ARMED:
                    crashpoints.reached("flush.after_commit")
                return True
            except Exception as exc:  # any database error: the log still holds the data
                self._failed(exc)
                if deadline is None:
                    return False
                if self.retired:  # closed by a signal handler that interrupted this flush
                    raise FlushError(f"the cache was closed during this flush ({exc!r}); the "
                                     f"log keeps every write") from exc
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise FlushError(f"the database did not accept the flush: {exc!r}; "
                                     f"the log keeps every write") from exc
                time.sleep(min(delay, remaining))
                delay = min(delay * 2, _MAX_RETRY_DELAY)


    def _run_sweep(self) -> None:
        self._last_sweep = time.monotonic()
        assert self._sweep is not None
        self._let_callers_go()
        if not self._take_mutex():
            return
        try:
            self._sweep(log_later)
        except Exception as exc:  # the next sweep (or open) tries again
            _say(logging.WARNING, "adopting orphan lanes failed: %s; the next sweep tries "
                 "again", exc)
        finally:
            self._mutex.release()

    def _failed(self, error: BaseException) -> None:
        # Said first: its thread is running by the time the failure shows in stats, so a
        # process that exits once it sees the failure still logs it (wal/deferred.py).
        self._outage.failed(error)
        self.flush_errors += 1
        self.last_error = error


class IntervalSyncer:
    """Under fsync="interval": fsync the log every `interval` seconds if it has unsynced data."""

    def __init__(self, sequencer: Sequencer, interval: float) -> None:
        self._sequencer = sequencer
        self._interval = interval
        self._stop = Event()
        self._ended = Event()
        self._thread = threading.Thread(target=self._run, name="wbcache-fsync", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        _join(self._thread, self._ended)

    def _run(self) -> None:
        try:
            while not self._stop.wait(self._interval):
                self._sequencer.sync_unsynced()
        finally:
            self._ended.set()


def _join(thread: threading.Thread, ended: Event) -> None:
    """Wait until `thread`, once started, has ended (`ended` is set as its last act). Not
    `is_alive`: a KeyboardInterrupt in `join` makes CPython mark the thread stopped while it
    runs on, and a close run again (wbcache/cache.py) would then go on beside it."""
    if thread.ident is not None:
        ended.wait()
        thread.join()
