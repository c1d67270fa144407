"""`GroupCommitter`: one write and one fdatasync for every record queued meanwhile.

Leader/follower, with no background thread and no fixed delay: a writer that finds no I/O in
progress becomes the leader, takes everything queued so far, drops the lock, writes it with one
`write` and (when asked) one `fdatasync`, then wakes the waiters its batch covers. Writers
that queue while the leader is busy wait, each on a lock of its own; the leader also wakes the
first of those still not covered, which leads the next batch, and leaves the rest asleep (a
waiter woken only to find its record not yet covered costs a thread switch and the GIL for
nothing). A lone writer therefore pays exactly one write + fdatasync, and under load the
batches grow by themselves. Under fsync="interval" batches are not fsync'd; a writer that needs its
record fsync'd (`wait(durable=True)`: the interval syncer, `sync`, `close`) and finds a leader
busy asks the next batch to fsync, whoever leads it. There, too, a record is not queued at all
while no batch is being written: it is copied into the segment's memory map at once
(`LogWriter.write_mapped`, lock held), which is as far as a `write` would take it; a leader's
lone fsync may run meanwhile, and its sync mark is written once it returned, lock held. A
leader writing records (`_writing`) keeps such copies out, so that they stay in LSN order.

Under fsync="always", where wal/_pipe.c is built, the writing is not done here at all: each
record is framed on its own and handed to a `Pipe`. A writer that waits for its record and finds
the pipe idle writes and fdatasyncs everything handed over itself, in C with the GIL released (a
lone writer pays exactly its own write and fdatasync); records handed over while a batch is in
flight are taken by the pipe's thread (no Python, no GIL) the moment it ends, and so are those
of writers that do not wait (`kick`: asyncio). A Python leader had to take the GIL back after
each fdatasync before it could start the next batch, while the writers ran Python; the pipe
starts it at once. Writers wait in C (`wait`), an event loop through an eventfd (`notify_fd`,
`poll`), and whoever sees a batch end tells the listeners (`_advance`). The harness replacing
a system call, or a crash point armed, retires the pipe for good (`_retire_pipe`), so that it
sees every call from then on.

The committer shares the sequencer's lock: records are queued in LSN order under that lock, and
every method here except `add_listener`, `start_background_leader`, `notify_fd` and
`drop_notify` must be called with it held.

Invariants (under the lock): durable_lsn <= written_lsn <= queued_lsn; every record with
LSN <= written_lsn has been handed to the OS, every record with LSN <= durable_lsn is fsync'd.
Once an I/O error is seen, `failure` is set for good: after a failed fsync the kernel may have
dropped the dirty pages, so a later fsync that succeeds proves nothing (the "fsyncgate" lesson).

Over 500 lines: every place that lets go of the sequencer's lock and takes it back
(leader, follower, pipe, rotation, `retake`) is in this one file, where the lock order and the
interrupt windows can be checked together; so are the interrupt-safe `Condition` and `Event`
the rest of wbcache waits on (tests/test_interrupt_points.py).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from wbcache.errors import LogFailedError
from wbcache.wal import crashpoints
from wbcache.wal.deferred import log_later
from wbcache.wal.writer import LogWriter

try:  # the log's writes and fdatasyncs in a thread without the GIL (wal/_pipe.c)
    from wbcache.wal._pipe import Pipe
except ImportError:  # pragma: no cover - a build without a C compiler
    Pipe = None

Listener = Callable[[int, int], None]
_allocate_lock = threading.Lock
# Seconds a waiter on the sequencer's lock sleeps at most before it looks again by itself
# (followers, the rotation's waiters, backpressure, the background leader): a backstop for a
# wake-up a KeyboardInterrupt cut short; wake-ups come from notifies, not from this.
FOLLOWER_RECHECK = 1.0

log = logging.getLogger("wbcache.wal")


# `retake(lock) -> BaseException | None`: take `lock` back, whatever interrupts the wait, and
# return the interruption (None if none). On POSIX a blocking `acquire` lets signal handlers
# run while it waits, and a KeyboardInterrupt raised there leaves the lock NOT taken, where
# every caller assumes it holds it: its `with lock:` would then release a lock it does not
# hold (another thread's hold). The caller raises the interruption once its state is whole.
# The loop is in C (wal/_sync.c): in Python, a handler may also run just after acquire() has
# taken the lock, still inside the loop's try, which would then wait for good on a lock it
# holds. A signal arriving as `retake` returns is raised at its call, the lock taken: every
# caller catches that too (whatever the handler raised: KeyboardInterrupt, SystemExit from a
# SIGTERM handler...), in a `try` of its own around the call, and treats it as returned.
# `RetakeFailed` is `retake` giving up, the lock not taken: let through. That `try` is written
# out at each call, not kept in a helper: a Python function's entry is itself a check for
# pending signals, where an interrupt would escape with the lock not yet taken back.
try:
    from wbcache.wal._sync import RetakeFailed, retake
except ImportError:  # pragma: no cover - a build without a C compiler

    class RetakeFailed(RuntimeError):  # type: ignore[no-redef]
        """Never raised here: the plain acquire below raises what stopped it."""

    def retake(lock: Any) -> BaseException | None:
        """Take `lock` back; interrupted, it is left not taken, as before `retake` was."""
        lock.acquire()
        return None


class Condition(threading.Condition):
    """`threading.Condition` on a plain lock whose `wait` always returns (or raises) with the
    lock held: the lock is taken back by `retake`, and an interruption raised once it is held
    again (`threading.Condition` raises one of its retake with the lock not held). Its `wait`
    is threading's own, with that retake called in place: through a method of its own
    (`_acquire_restore`), an interrupt at that method's entry would still come first. For a
    plain `threading.Lock` only (the sequencer's)."""

    def wait(self, timeout: float | None = None) -> bool:
        if not self._is_owned():  # type: ignore[attr-defined]
            raise RuntimeError("cannot wait on un-acquired lock")
        waiter = _allocate_lock()
        waiter.acquire()
        self._waiters.append(waiter)  # type: ignore[attr-defined]
        notified = False
        interrupted: BaseException | None = None
        try:  # released inside the try (`rotate`)
            self._lock.release()  # type: ignore[attr-defined]
            if timeout is None:
                notified = waiter.acquire()
            elif timeout > 0:
                notified = waiter.acquire(True, timeout)
            else:
                notified = waiter.acquire(False)
        except BaseException as exc:  # noqa: BLE001 - raised below, the lock held
            interrupted = exc
        try:
            late = retake(self._lock)  # type: ignore[attr-defined]
        except RetakeFailed:
            raise
        except BaseException as exc:  # raised as it returned: the lock is ours
            late = exc
        if not notified:
            try:
                self._waiters.remove(waiter)  # type: ignore[attr-defined]
            except ValueError:  # notified meanwhile
                pass
        interrupted = interrupted or late
        if interrupted is not None:
            raise interrupted
        return notified


class Event:
    """`threading.Event` entered through its plain lock (C's `with`): threading's enters
    its Condition through `Condition.__enter__`, a Python function, and an interrupt
    (KeyboardInterrupt, a signal handler's exception) at its return, or at `__exit__`'s
    start, left the lock held for good, so that every later `set` and `wait` blocked: a
    write waking the flusher under backpressure held the sequencer's lock meanwhile, and
    close() waited for ever (an outside hunt). An interrupt may skip `set`'s notify, never
    the flag: waiters that must not sleep long wait with a timeout."""

    def __init__(self) -> None:
        self._lock = _allocate_lock()
        self._cond = Condition(self._lock)
        self._flag = False

    def is_set(self) -> bool:
        return self._flag

    def set(self) -> None:
        with self._lock:
            self._flag = True
            self._cond.notify_all()

    def clear(self) -> None:
        with self._lock:
            self._flag = False

    def wait(self, timeout: float | None = None) -> bool:
        with self._lock:
            if not self._flag:
                self._cond.wait(timeout)
            return self._flag


def _log_failure(error: BaseException, first_lsn: int, last_lsn: int) -> None:
    """Lock held: log that the log failed, from a thread of its own (wal/deferred.py). A
    logging handler is the application's code, with its own lock, and may even read the
    cache: run under lock 2 it would stall every writer and reader for as long as it takes,
    or deadlock on lock 2 itself (docs/design.md, the lock rule)."""
    log_later(log, logging.ERROR, "the log failed (%s): writes are refused until the cache is "
              "reopened; writes %d..%d were not acknowledged", error, first_lsn, last_lsn)


class GroupCommitter:
    """Writes and fsyncs the log for every writer, one batch at a time (module docstring)."""

    def __init__(self, lock: threading.Lock, writer: LogWriter, *, next_lsn: int,
                 sync_every_batch: bool) -> None:
        self._lock = lock
        # Writers waiting for a batch to cover them: [lsn, durable, a lock held until woken].
        # The leader wakes only those its batch covers, and one more to lead the next batch
        # (`_wake`): with a Condition's notify_all, 40 % of the wake-ups at 16 and 64 writers
        # found their record not yet covered and went back to sleep.
        self._waiting: list[list[Any]] = []
        self._writer = writer
        self._sync_every_batch = sync_every_batch
        self._pending: list[bytes] = []
        self._pending_first_lsn = next_lsn
        self.queued_lsn = next_lsn - 1
        self.written_lsn = next_lsn - 1
        self.durable_lsn = next_lsn - 1
        self._leader_active = False
        self._leader_ident = 0  # the thread leading, while `_leader_active` (`led_here`)
        self._writing = False  # a leader is writing records (lock released): none is mapped
        self._sync_wanted = False  # the next batch must fsync: a durable waiter asked
        self._syncing_through = next_lsn - 1  # what the batch in flight will have fsync'd
        self.failure: BaseException | None = None
        self._listeners: list[Listener] = []
        self._kick = Condition(lock)  # wakes the background leader
        self._background: threading.Thread | None = None
        self._closing = False
        self.fsyncs = 0
        self.batches = 0
        self._pipe: Any = None
        if Pipe is not None and sync_every_batch and writer.pipe_ready():
            try:
                self._pipe = Pipe(writer.fd, next_lsn - 1)
            except OSError as error:  # no thread to be had (a container's pids limit)
                log.warning("the log is written without wal/_pipe.c's thread: %s", error)
        self._advancer_idle = False
        self.rotating = False  # a writer is starting the next segment for the pipe
        self._rotated = Condition(lock)
        self._led = Condition(lock)  # a leader's batch ended (`close` waits for it)
        self._notify_fd: int | None = None

    @property
    def acknowledged_lsn(self) -> int:
        """Highest LSN whose writer may return: fsync'd, or written under fsync="interval"."""
        return self.durable_lsn if self._sync_every_batch else self.written_lsn

    def check(self) -> None:
        """Raise `LogFailedError` if the log has failed. Lock held."""
        if self.failure is not None:
            raise LogFailedError(
                f"the log failed ({self.failure}); writes are refused until the cache is reopened"
            ) from self.failure

    def append(self, lsn: int, record: bytes) -> None:
        """Queue the encoded record `lsn` (the next LSN in order). Lock held."""
        if self._pipe is not None:
            self._submit(lsn, record)
            return
        if not self._pending and not self._writing and self.failure is None:
            # fsync="interval": written at once into the mapped segment (wal/writer.py), so
            # acknowledged, unless the segment is full or the map is retired
            try:
                mapped = self._writer.write_mapped(record, lsn)
            except BaseException as exc:
                self.queued_lsn = lsn
                self._fail(exc, lsn)
                if not isinstance(exc, Exception):
                    raise
                return
            if mapped:
                self.queued_lsn = self.written_lsn = lsn
                self._pending_first_lsn = lsn + 1
                return
        self._pending.append(record)
        self.queued_lsn = lsn

    def _submit(self, lsn: int, record: bytes) -> None:
        """Hand record `lsn` to the pipe's thread. A failure is kept, and raised by `wait`;
        an interrupt (KeyboardInterrupt) fails the log too, as in `_lead`, and propagates."""
        if self.failure is not None:
            self.queued_lsn = lsn
            return
        writer = self._writer
        if not writer.pipe_ready():  # the harness replaced a call, or armed a crash point
            self._retire_pipe()
            self._pending.append(record)
            self.queued_lsn = lsn
            return
        self.queued_lsn = lsn
        try:  # the segment has room: `Sequencer._admit` rotated it if it had none
            self._pipe.submit(writer.frame_one(record, lsn), lsn)
        except BaseException as exc:
            self._fail(exc, lsn)
            if not isinstance(exc, Exception):
                raise

    def rotation_due(self) -> bool:
        """Lock held: the pipe writes the log, and the next record starts a new segment (or
        a writer is starting it: the segment is no longer full before the pipe has it)."""
        return self._pipe is not None and (self.rotating or self._writer.full())

    def rotate(self) -> None:
        """Lock held, released meanwhile: once the pipe has made every record handed to it
        durable, start the next segment and switch the pipe to it before the old one is
        closed. The caller keeps every writer out until this returns (`Sequencer._admit`,
        `rotating`): no record may reach the pipe before then, and only the newest segment
        may end in a torn frame. An interrupt while waiting for the pipe leaves the log as it
        was (nothing was written); one while the segment is made fails it, as in `_lead`."""
        if not self._writer.pipe_ready():  # the harness arrived: it sees this rotation too
            self._retire_pipe()
            return
        pipe, writer, last = self._pipe, self._writer, self.queued_lsn
        self.rotating = True
        state = (self.durable_lsn, 0, self.batches)
        error: BaseException | None = None
        creating = False
        try:  # released inside the try: an interrupt as it returns must find the finally
            self._lock.release()
            state = pipe.wait(last, FOLLOWER_RECHECK)  # asked even if all is durable: a
            while state[0] < last and not state[1]:  # failure since is seen here
                state = pipe.wait(last, FOLLOWER_RECHECK)
            if not state[1]:
                creating = True
                writer.rotate_to(last + 1, pipe.set_fd)
        except BaseException as exc:
            error = exc
        finally:
            try:
                interrupted = retake(self._lock)
            except RetakeFailed:
                raise
            except BaseException as exc:  # raised as it returned: the lock is ours
                interrupted = exc
            self.rotating = False
            self._rotated.notify_all()
        self._advance(*state)
        if error is not None:
            if creating and self.failure is None:
                self._fail(error, last + 1)
            if not isinstance(error, Exception) or not creating:
                raise error
        if interrupted is not None:  # once the rotation is done: it changed nothing
            raise interrupted

    def wait_for_rotation(self) -> None:
        """Lock held: sleep (lock released) until the rotation in progress is done."""
        while self.rotating:
            # A backstop, as a follower's (FOLLOWER_RECHECK): an interrupt landing just after
            # the rotation's end took the lock back can skip its notify
            self._rotated.wait(FOLLOWER_RECHECK)

    def _retire_pipe(self) -> None:
        """Lock held: from here on, the group commit in Python (wal/_pipe.c's thread is
        stopped once everything handed to it is durable), so that the fault-injection
        harness sees every call from now on. Only the harness gets here; it waits, lock
        held, for what the pipe has in flight."""
        while self.durable_lsn < self.queued_lsn and self.failure is None:
            self._advance(*self._pipe.wait(self.queued_lsn, FOLLOWER_RECHECK))
        pipe, self._pipe = self._pipe, None
        pipe.set_notify(-1)
        pipe.close()
        self._pending_first_lsn = self.queued_lsn + 1
        if self._background is not None:
            self._kick.notify()  # it leads from now on
        elif self._notify_fd is not None:  # an event loop waits for batches: lead for it
            thread = threading.Thread(target=self._lead_in_background, name="wbcache-commit",
                                      daemon=True)
            thread.start()
            self._background = thread

    def _advance(self, durable: int, error: int, batches: int) -> None:
        """Lock held: take in how far the pipe has got, and tell the listeners."""
        if durable > self.durable_lsn:
            self.durable_lsn = self.written_lsn = durable
            self.batches = self.fsyncs = batches  # batches that fsync'd: a failed one ends it
        elif not error:
            return
        if error and self.failure is None:
            self._fail(OSError(error, os.strerror(error)), self.durable_lsn + 1)
        if self._waiting:
            self._wake()
        for listener in self._listeners:
            listener(self.acknowledged_lsn, self.durable_lsn)

    def _fail(self, error: BaseException, first_lsn: int) -> None:
        self.failure = error
        _log_failure(error, first_lsn, self.queued_lsn)

    def add_listener(self, listener: Listener) -> None:
        """Call `listener(acknowledged_lsn, durable_lsn)` after every batch, lock held."""
        self._listeners.append(listener)

    def led_here(self) -> bool:
        """Lock held: whether this thread is leading a batch (its write and fsync under way,
        the lock released): a signal handler it runs must not wait for that batch."""
        return self._leader_active and self._leader_ident == threading.get_ident()

    def notify_fd(self) -> int | None:
        """Lock NOT held. With a pipe: an eventfd it writes to after every batch (for an
        event loop to watch, then call `poll`), or None if another took it already or there
        is no pipe. The caller closes it, once the cache is closed (the pipe's thread is
        gone by then)."""
        with self._lock:
            if self._pipe is None or self._notify_fd is not None:
                return None
            self._notify_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._pipe.set_notify(self._notify_fd)
            return self._notify_fd

    def drop_notify(self) -> None:
        """Lock NOT held: the pipe writes to its eventfd no more (the caller closes it next)."""
        with self._lock:
            if self._pipe is not None:
                self._pipe.set_notify(-1)
            self._notify_fd = None

    def poll(self) -> None:
        """Lock held: take in the batches the pipe has finished (after its eventfd fired)."""
        if self._pipe is not None:
            self._advance(*self._pipe.poll())
        else:  # retired: the Python leader tells the listeners; clear what the pipe wrote
            try:
                os.eventfd_read(self._notify_fd)
            except BlockingIOError:
                pass

    def start_background_leader(self) -> None:
        """Lock NOT held. Start a thread that leads whenever records wait and nobody leads,
        for writers that queue a record and return without waiting (asyncio)."""
        with self._lock:
            if self._background is not None:
                return
            self._background = threading.Thread(target=self._lead_in_background,
                                                name="wbcache-commit", daemon=True)
        self._background.start()

    def kick(self) -> None:
        """Lock held. Records were queued by a writer that will not lead: have them written."""
        if self._pipe is not None:
            self._pipe.kick()
            if self._advancer_idle:
                self._kick.notify()
        elif not self._leader_active:
            self._kick.notify()

    def _lead_in_background(self) -> None:
        """With a pipe, take in every batch it finishes and tell the listeners; without,
        lead whenever records wait and nobody leads."""
        with self._lock:
            while not self._closing:
                pipe = self._pipe
                if pipe is not None:
                    if self.queued_lsn > self.durable_lsn and self.failure is None:
                        self._wait_for_pipe(pipe, self.durable_lsn + 1)
                    else:
                        self._advancer_idle = True
                        self._kick.wait(FOLLOWER_RECHECK)  # a backstop: an interrupt may
                        self._advancer_idle = False  # cut `kick` short before its notify
                elif self._pending and not self._leader_active and self.failure is None:
                    self._lead()
                else:
                    self._kick.wait(FOLLOWER_RECHECK)  # the same backstop

    def _wait_for_pipe(self, pipe: Any, lsn: int) -> None:
        """Lock held, released meanwhile: sleep in C until `pipe` has made record `lsn`
        durable (or failed, or FOLLOWER_RECHECK has passed), then take in how far it got."""
        try:  # released inside the try (`rotate`)
            self._lock.release()
            state = pipe.wait(lsn, FOLLOWER_RECHECK)
        finally:
            try:
                interrupted = retake(self._lock)
            except RetakeFailed:
                raise
            except BaseException as exc:  # raised as it returned: the lock is ours
                interrupted = exc
        self._advance(*state)
        if interrupted is not None:
            raise interrupted

    def wait(self, lsn: int, *, durable: bool = False) -> None:
        """Return once record `lsn` is acknowledged (or fsync'd, if `durable`). Lock held.

        Raises `LogFailedError` if the log fails before that.
        """
        while self.durable_lsn < lsn:
            pipe = self._pipe  # under the lock: it may be retired while we sleep
            if pipe is None:
                break
            self.check()
            self._wait_for_pipe(pipe, lsn)
        while (self.durable_lsn if durable else self.acknowledged_lsn) < lsn:
            self.check()
            if durable and self._syncing_through < lsn:
                # Asked of whoever leads next, not only of ourselves: a writer that leads
                # batch after batch retakes the lock before a woken follower can, so a
                # durable waiter that only ever follows would wait for good (the interval
                # syncer behind one busy writer: no fsync at all).
                self._sync_wanted = True
            if self._leader_active:
                self._follow(lsn, durable)
            else:
                self._lead()
        # A failure after our record was covered does not concern this write.

    def _follow(self, lsn: int, durable: bool) -> None:
        """Sleep until the leader wakes us (`_wake`), with the lock released meanwhile, or
        for `FOLLOWER_RECHECK` seconds at most; `wait` then looks again. The limit is a
        backstop, not the mechanism: a KeyboardInterrupt in the main thread can cut a wake-up
        short (between the leader's releases, or in a follower woken to lead, before it
        retakes the lock), and a waiter must not sleep for good on it."""
        woken = _allocate_lock()
        woken.acquire()
        entry = [lsn, durable, woken]  # the waker sets entry[2] to None as it wakes us
        self._waiting.append(entry)
        try:  # released inside the try (`rotate`)
            self._lock.release()
            woken.acquire(True, FOLLOWER_RECHECK)  # positional: a keyword costs 0.2 µs more
        except BaseException:  # interrupted (KeyboardInterrupt): leave, and hand on the wake
            try:
                retake(self._lock)
            except RetakeFailed:
                raise
            except BaseException:  # noqa: BLE001 - raised as it returned: the lock is ours
                pass  # the first interruption is the one raised
            self._leave(entry)
            if self._waiting and not self._leader_active:
                self._wake()  # we may have been the one woken to lead: someone must
            raise
        try:
            interrupted = retake(self._lock)
        except RetakeFailed:
            raise
        except BaseException as exc:  # raised as it returned: the lock is ours
            interrupted = exc
        self._leave(entry)
        if interrupted is not None:
            if self._waiting and not self._leader_active:
                self._wake()
            raise interrupted

    def _leave(self, entry: list[Any]) -> None:
        """Lock held: take a waiter nobody woke (timed out, interrupted) out of the list."""
        if entry[2] is not None:
            try:
                self._waiting.remove(entry)
            except ValueError:  # an interrupted `_wake` had taken it out already
                pass

    def _wake(self) -> None:
        """After a batch, lock held: wake every waiter it covers (all of them once the log has
        failed), and the first of the rest, which leads the next batch unless a writer that
        did not wait leads it first (then it waits again, and the end of that batch wakes
        one). The list is settled before anyone is woken, so an interruption between two
        wake-ups leaves it whole (those not woken then look again after FOLLOWER_RECHECK)."""
        acknowledged, durable_lsn = self.acknowledged_lsn, self.durable_lsn
        failed = self.failure is not None
        wake: list[list[Any]] = []
        rest: list[list[Any]] = []
        for entry in self._waiting:
            lsn, durable, _ = entry
            if failed or lsn <= (durable_lsn if durable else acknowledged):
                wake.append(entry)
            else:
                rest.append(entry)
        if rest:
            wake.append(rest.pop(0))
        self._waiting = rest
        for entry in wake:
            woken, entry[2] = entry[2], None
            woken.release()

    def _lead(self) -> None:
        """Write (and maybe fsync) everything queued, with the lock released meanwhile."""
        records, self._pending = self._pending, []
        first_lsn, last_lsn = self._pending_first_lsn, self.queued_lsn
        self._pending_first_lsn = last_lsn + 1
        do_sync = self._sync_every_batch or self._sync_wanted
        self._sync_wanted = False
        self._syncing_through = last_lsn if do_sync else self.durable_lsn
        error: BaseException | None = None
        interrupted: BaseException | None = None
        synced = 0
        try:
            self._leader_active = True  # in the try: its finally is what clears it
            self._leader_ident = threading.get_ident()
            self._writing = bool(records)
            try:  # released inside the try (`rotate`): an interrupt fails the log
                self._lock.release()
                if records:
                    synced = self._writer.append(records, first_lsn, last_lsn, sync=do_sync)
                elif do_sync:
                    synced = self._writer.sync()
            except BaseException as exc:  # an interrupted write leaves the log unknown too
                error = exc
            finally:
                try:  # raised last: the batch itself is whole
                    interrupted = retake(self._lock)
                except RetakeFailed:
                    raise
                except BaseException as exc:  # raised as it returned: the lock is ours
                    interrupted = exc
            if synced and error is None and self.failure is None:
                # Lock held: mapped writers may have appended meanwhile. Not after a failure
                # (another thread's): the log is unknown, and `close` may be under way.
                try:
                    self._writer.mark(synced)
                except BaseException as exc:
                    error = exc
        finally:
            self._leader_active = self._writing = False
            self._leader_ident = 0
            self._led.notify_all()
        self.batches += 1
        if error is None:
            # not back: mapped writes may have gone past what this batch took (a lone fsync)
            self.written_lsn = max(self.written_lsn, last_lsn)
            if do_sync:
                self.durable_lsn = last_lsn
                self.fsyncs += 1
        else:
            self.failure = error
            _log_failure(error, first_lsn, last_lsn)
        if crashpoints.ARMED:
            crashpoints.reached("wal.before_ack")
        if self._waiting:
            self._wake()
        if self._pending:  # queued meanwhile by writers that do not lead
            self._kick.notify()
        for listener in self._listeners:
            listener(self.acknowledged_lsn, self.durable_lsn)
        if error is not None and not isinstance(error, Exception):
            raise error
        if interrupted is not None:
            raise interrupted

    def close(self) -> None:
        """Write and fsync whatever is queued, then close the writer. Lock held. Interrupted
        (KeyboardInterrupt) before the fsync, it leaves the writer open: `Cache.close` runs
        it again, and the tail must still be fsync'd then."""
        self.wait_for_rotation()  # its writer is using the segments (lock released)
        try:
            if self.failure is None:
                self.wait(self.queued_lsn, durable=True)
        except Exception:
            self._close_writer()
            raise
        self._close_writer()

    def _close_writer(self) -> None:
        """Lock held: once no leader is writing, stop the pipe and close the writer."""
        while self._leader_active:  # a lone fsync of a failed log: its segment is in use
            self._led.wait(FOLLOWER_RECHECK)  # a backstop, as in `wait_for_rotation`
        self._closing = True
        self._kick.notify_all()
        if self._pipe is not None:
            self._pipe.close()
        self._writer.close()
