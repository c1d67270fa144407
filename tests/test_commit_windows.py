"""The group commit's release-then-try windows (wal/commit.py) under a KeyboardInterrupt.

A thread that lets go of the sequencer's lock and retakes it in a `finally` must let go of it
INSIDE that `try`: CPython raises a pending KeyboardInterrupt at the check that follows a C
call, so a SIGINT that arrives while the main thread runs the few bytecodes up to
`self._lock.release()` is raised as that call returns, with the lock already released. With
the release before the `try`, the `finally` that retakes the lock (and resets the state the
thread set up before letting go) never runs:

  * `rotate`: `rotating` stays True for good; every later writer waits at admission, and so
    does `close()`, forever;
  * `_lead`: the records the batch took are neither written nor counted as a failure; the
    next batch (`_pending_first_lsn` moved past them) acknowledges their writers;
  * and the caller's `with sequencer.lock:` then releases a lock it does not hold.

And the other way round: a KeyboardInterrupt raised while such a thread waits to take the
lock back (CPython runs signal handlers in a blocking acquire) leaves it not taken, unless the
retake goes on (`retake`, and `Condition` for the waits on conditions of that lock).

The interrupt is forced, not timed: the committer's view of the lock (`_lock`) is the same
lock, whose release returns into a KeyboardInterrupt where the test says, as that signal
would.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import wbcache
from wbcache.errors import CacheClosedError, LogFailedError
from wbcache.wal import commit as commit_module
from wbcache.wal.commit import Condition, GroupCommitter

needs_pipe = pytest.mark.skipif(commit_module.Pipe is None, reason="no wal/_pipe.c")


class _InterruptedRelease:
    """`lock`, except that the first release made while `when()` is true returns into a
    KeyboardInterrupt, the lock released (a SIGINT raised at the check after the call)."""

    def __init__(self, lock: Any, when: Callable[[], bool]) -> None:
        self._lock, self._when = lock, when
        self.fired = False

    def acquire(self, *args: Any) -> bool:
        return bool(self._lock.acquire(*args))

    def release(self) -> None:
        self._lock.release()
        if not self.fired and self._when():
            self.fired = True
            raise KeyboardInterrupt

    def locked(self) -> bool:
        return bool(self._lock.locked())


class _InterruptedRetake:
    """`lock`, except that the first blocking acquire made while `when()` is true raises a
    KeyboardInterrupt without taking it: what CPython's acquire does when a SIGINT's handler
    raises while it waits (on POSIX the wait runs signal handlers)."""

    def __init__(self, lock: Any, when: Callable[[], bool] = lambda: True) -> None:
        self._lock, self._when = lock, when
        self.fired = False

    def acquire(self, *args: Any) -> bool:
        if not args and not self.fired and self._when():
            self.fired = True
            raise KeyboardInterrupt
        return bool(self._lock.acquire(*args))

    def release(self) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return bool(self._lock.locked())

    def __enter__(self) -> bool:
        return bool(self._lock.acquire())

    def __exit__(self, *exc_info: object) -> None:
        self._lock.release()


def _in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)  # daemon: a hang must not hang pytest
    thread.start()
    return thread, outcome


@needs_pipe
def test_an_interrupt_as_a_rotation_lets_go_of_the_lock_leaves_no_rotation_behind(
        tmp_path: Path) -> None:
    cache = wbcache.open(tmp_path / "c", segment_size=4096)
    sequencer = cache._sequencer
    committer = sequencer._committer
    assert committer._pipe is not None
    committer._lock = _InterruptedRelease(sequencer.lock,  # type: ignore[assignment]
                                          lambda: committer.rotating)
    done = 0
    interrupted: BaseException | None = None
    while interrupted is None:
        try:
            cache.put(f"k{done}", "v" * 100)
            done += 1
        except BaseException as exc:  # noqa: BLE001 - the rotation's interrupt, asserted below
            interrupted = exc
    committer._lock = sequencer.lock  # type: ignore[assignment]
    # The writer that started the rotation gets its KeyboardInterrupt (not the RuntimeError
    # of a `with` releasing a lock nobody holds), and the rotation is over.
    assert not committer.rotating, (
        f"an interrupted rotation ({interrupted!r}) left every writer, and close, shut out")
    assert isinstance(interrupted, KeyboardInterrupt), repr(interrupted)
    assert not sequencer.lock.locked()
    late, outcome = _in_thread(lambda: cache.put("late", 1))
    late.join(10)
    assert not late.is_alive() and isinstance(outcome[0], int), outcome
    closer, _ = _in_thread(cache.close)
    closer.join(10)
    assert not closer.is_alive() and cache.closed
    with wbcache.open(tmp_path / "c") as reopened:
        assert all(reopened.get(f"k{i}") == "v" * 100 for i in range(done))
        assert reopened.get("late") == 1


class _Recorder:
    """A log writer for the group commit in Python: records what it is asked to do."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def append(self, records: list[bytes], first_lsn: int, last_lsn: int, *,
               sync: bool = False) -> int:
        self.calls.append(f"append {first_lsn}..{last_lsn}")
        return self.sync() if sync else 0

    def sync(self) -> int:
        self.calls.append("sync")
        return 0

    def pipe_ready(self) -> bool:
        return False

    def write_mapped(self, record: bytes, lsn: int) -> bool:
        return False

    def close(self) -> None:
        self.calls.append("close")


def _python_committer() -> tuple[threading.Lock, _Recorder, GroupCommitter]:
    """A group commit in Python (no pipe) over a recording writer, fsyncing every batch."""
    lock = threading.Lock()
    writer = _Recorder()
    committer = GroupCommitter(lock, writer, next_lsn=1,  # type: ignore[arg-type]
                               sync_every_batch=True)
    return lock, writer, committer


def test_an_interrupt_as_a_leader_lets_go_of_the_lock_never_acknowledges_an_unwritten_record(
        ) -> None:
    """Two writers queue records 1 and 2; the writer of record 1 leads their batch and is
    interrupted as it lets go of the lock. Record 2 was never written: its writer must be
    told the log failed (as for any interrupted batch), not acknowledged by a lone fsync."""
    lock, writer, committer = _python_committer()
    interrupting = _InterruptedRelease(lock, lambda: committer._leader_active)
    with lock:
        committer.append(1, b"one")
        committer.append(2, b"two")
    committer._lock = interrupting  # type: ignore[assignment]
    leader: list[BaseException] = []
    try:
        with lock:
            committer.wait(1)
    except BaseException as exc:  # noqa: BLE001 - asserted below
        leader.append(exc)
    committer._lock = lock
    assert interrupting.fired and not lock.locked()
    second, outcome = _in_thread(lambda: _wait(lock, committer, 2))
    second.join(10)
    assert not second.is_alive()
    acknowledged_unwritten = outcome == [None] and "append 1..2" not in writer.calls
    assert not acknowledged_unwritten, (
        f"record 2 acknowledged, never written (the leader got {leader!r}): the writer was "
        f"asked {writer.calls}")
    assert len(outcome) == 1 and isinstance(outcome[0], LogFailedError), (outcome, writer.calls)
    assert len(leader) == 1 and isinstance(leader[0], KeyboardInterrupt), leader


def _wait(lock: threading.Lock, committer: GroupCommitter, lsn: int) -> None:
    with lock:
        committer.wait(lsn)


def test_an_interrupt_while_a_leader_retakes_the_lock_is_raised_with_the_lock_held() -> None:
    """The leader's batch is written; the interrupt comes as it waits to take the lock back.
    It was raised with the lock not taken: the batch's end (waking the waiters, telling
    `close`) raised RuntimeError on a lock not held, and the caller's `with` released a lock
    nobody held (another thread's hold, had there been one)."""
    lock, writer, committer = _python_committer()
    interrupting = _InterruptedRetake(lock, lambda: committer._leader_active)
    with lock:
        committer.append(1, b"one")
    committer._lock = interrupting  # type: ignore[assignment]
    with pytest.raises(KeyboardInterrupt):
        with lock:
            committer.wait(1)
    committer._lock = lock
    assert interrupting.fired and not lock.locked()
    # The batch is whole: written, fsync'd, counted; the log has not failed
    assert writer.calls == ["append 1..1", "sync"]
    assert (committer.durable_lsn, committer.failure, committer._leader_active) == (1, None, False)
    with lock:
        committer.append(2, b"two")
    _wait(lock, committer, 2)
    assert writer.calls[-2:] == ["append 2..2", "sync"]


def test_an_interrupted_condition_wait_returns_with_the_lock_held() -> None:
    """threading.Condition.wait retakes its lock in a `finally`, and raised an interrupt of
    that with the lock not taken: the `with` around it then released a lock nobody held."""
    lock = threading.Lock()
    interrupting = _InterruptedRetake(lock)
    condition = Condition(interrupting)  # type: ignore[arg-type]
    with pytest.raises(KeyboardInterrupt):
        with condition:
            condition.wait(0.001)  # times out, then retakes the lock: interrupted there
    assert interrupting.fired and not lock.locked()
    with condition:  # a later wait is an ordinary one
        assert condition.wait(0.001) is False



class _DonePipe:
    """A pipe whose `kick` makes every queued record durable at once (wal/_pipe.c's job)."""

    def __init__(self, committer: GroupCommitter) -> None:
        self._committer, self.durable = committer, 0

    def kick(self) -> None:
        self.durable = self._committer.queued_lsn

    def wait(self, lsn: int, timeout: float) -> tuple[int, int, int]:
        return self.durable, 0, self.durable

    def close(self) -> None:
        pass


@pytest.mark.parametrize("pipe", [False, True], ids=["python", "pipe"])
def test_a_background_leader_whose_kick_an_interrupt_cut_short_still_takes_the_records(
        pipe: bool) -> None:
    """AsyncCache queues a record and kicks the background leader (`kick`: lock held, then
    a notify). An interrupt raised before the notify left the leader asleep for good, and the
    record's future unresolved until another write kicked it."""
    lock, writer, committer = _python_committer()
    if pipe:
        committer._pipe = _DonePipe(committer)
    told = threading.Event()
    committer.add_listener(lambda acknowledged, durable: acknowledged >= 1 and told.set())
    committer.start_background_leader()
    asleep = False
    assert committer._background is not None
    while not asleep and committer._background.is_alive():  # idle, waiting to be kicked
        with lock:
            asleep = bool(committer._kick._waiters)  # type: ignore[attr-defined]
    kicks: list[str] = []

    def interrupted_notify(n: int = 1) -> None:
        kicks.append("skipped")
        raise KeyboardInterrupt

    committer._kick.notify = interrupted_notify  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt), lock:
        if pipe:
            committer.queued_lsn = 1  # as `_submit` leaves it
        else:
            committer.append(1, b"one")
        committer.kick()
    del committer._kick.notify
    assert kicks == ["skipped"]
    assert told.wait(5 * commit_module.FOLLOWER_RECHECK), "record 1 was never taken in"
    with lock:
        committer.close()
    committer._background.join(5)
    assert not committer._background.is_alive()


def test_a_writer_waiting_out_backpressure_sees_a_close_whose_notify_was_cut_short(
        tmp_path: Path) -> None:
    """A writer waits for room (max_dirty reached, the flusher held off); close() sets the
    cache closed and is interrupted before it tells the waiters. The writer slept for good;
    it must find the cache closed by itself and raise CacheClosedError."""
    cache = wbcache.open(tmp_path / "c", max_dirty=1, flush_interval=3600)
    sequencer = cache._sequencer
    wake_flusher, sequencer.wake_flusher = sequencer.wake_flusher, lambda: None
    try:
        cache.put("a", 1)  # the one dirty entry allowed
        writer, outcome = _in_thread(lambda: cache.put("b", 2))
        waiting = False
        while not waiting and writer.is_alive():
            with sequencer.lock:
                waiting = bool(sequencer._space._waiters)  # type: ignore[attr-defined]
        assert waiting, outcome

        def interrupted_notify() -> None:
            raise KeyboardInterrupt

        sequencer._space.notify_all = interrupted_notify  # type: ignore[method-assign]
        with pytest.raises(KeyboardInterrupt):
            sequencer.close()
        del sequencer._space.notify_all
        writer.join(5 * commit_module.FOLLOWER_RECHECK)
        assert not writer.is_alive(), "the writer still waits for room in a closed cache"
        assert len(outcome) == 1 and isinstance(outcome[0], CacheClosedError), outcome
    finally:
        sequencer.wake_flusher = wake_flusher
        cache.close()  # the rest of the close: what the interrupted one left
