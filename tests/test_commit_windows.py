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

import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import wbcache
from wbcache.errors import LogFailedError
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


def test_an_interrupt_as_a_leader_lets_go_of_the_lock_never_acknowledges_an_unwritten_record(
        ) -> None:
    """Two writers queue records 1 and 2; the writer of record 1 leads their batch and is
    interrupted as it lets go of the lock. Record 2 was never written: its writer must be
    told the log failed (as for any interrupted batch), not acknowledged by a lone fsync."""
    lock = threading.Lock()
    writer = _Recorder()
    committer = GroupCommitter(lock, writer, next_lsn=1,  # type: ignore[arg-type]
                               sync_every_batch=True)
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
    lock = threading.Lock()
    writer = _Recorder()
    committer = GroupCommitter(lock, writer, next_lsn=1,  # type: ignore[arg-type]
                               sync_every_batch=True)
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


RETAKE_RACE = """
import os, signal, sys, threading, time
from wbcache.wal.commit import retake

lock = threading.Lock()
main = threading.main_thread().ident
go, held = threading.Event(), threading.Event()
spins = [0]

def holder():
    while True:
        go.wait()
        go.clear()
        with lock:  # the main thread blocks in retake meanwhile
            held.set()
            time.sleep(0.0005)
        for _ in range(spins[0] % 400):  # a few microseconds, varied
            pass
        spins[0] += 37
        signal.pthread_kill(main, signal.SIGINT)

armed = [False]  # a SIGINT raises only around retake: one landing elsewhere is not the case

def on_sigint(signum, frame):
    if armed[0]:
        raise KeyboardInterrupt

signal.signal(signal.SIGINT, on_sigint)
threading.Thread(target=holder, daemon=True).start()
for _ in range(int(sys.argv[1])):
    go.set()
    held.wait()  # the holder has the lock
    held.clear()
    try:
        armed[0] = True
        retake(lock)
    except KeyboardInterrupt:  # raised as retake returned, the lock taken
        pass
    finally:
        armed[0] = False
    if lock.locked():
        lock.release()
    time.sleep(0.002)  # the signal lands before the next round
print("done")
"""


def test_an_interrupt_just_after_the_lock_is_taken_back_never_hangs_the_thread() -> None:
    """A SIGINT whose handler runs just AFTER the acquire took the lock (at the call's check
    for pending signals) was caught by a retry loop in Python, which then took the lock it
    held: the thread waited for good, and every later Ctrl-C was swallowed the same way
    (found by a review; 5 runs of 5 hung in their first rounds). The loop is in C now."""
    done = subprocess.run([sys.executable, "-c", RETAKE_RACE, "200"], capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.strip() == "done", done.stderr[-2000:]


ROTATE_RACE = """
import signal, sys, threading, time
from wbcache.wal import commit

lock = threading.Lock()
go, held = threading.Event(), threading.Event()
spins = [0]
main = threading.main_thread().ident

class Writer:  # the real rotate(), a writer and a pipe that touch no disk
    def pipe_ready(self): return True
    def rotate_to(self, lsn, set_fd): pass

class Pipe:
    def wait(self, lsn, timeout):
        go.set()  # the holder takes the lock while rotate() waits for the pipe
        held.wait()
        held.clear()
        return (lsn, 0, 1)
    def set_fd(self, fd): pass

def holder():
    while True:
        go.wait()
        go.clear()
        with lock:
            held.set()
            time.sleep(0.0005)
        for _ in range(spins[0] % 400):
            pass
        spins[0] += 37
        signal.pthread_kill(main, signal.SIGINT)  # as rotate() takes the lock back

armed = [False]  # a SIGINT raises only inside rotate(): one landing elsewhere is not the case

def on_sigint(signum, frame):
    if armed[0]:
        raise KeyboardInterrupt

signal.signal(signal.SIGINT, on_sigint)
threading.Thread(target=holder, daemon=True).start()
committer = commit.GroupCommitter.__new__(commit.GroupCommitter)
committer._lock, committer._writer, committer._pipe = lock, Writer(), Pipe()
committer.queued_lsn, committer.durable_lsn, committer.written_lsn = 1, 0, 0
committer.batches = committer.fsyncs = 0
committer.failure, committer._waiting, committer._listeners = None, [], []
committer.rotating, committer._rotated = False, commit.Condition(lock)
stuck = 0
for _ in range(int(sys.argv[1])):
    lock.acquire()
    try:
        armed[0] = True
        committer.rotate()
    except KeyboardInterrupt:
        pass
    finally:
        armed[0] = False
    stuck += committer.rotating
    committer.rotating = False
    if lock.locked():
        lock.release()
    time.sleep(0.002)
print("stuck", stuck)
"""


def test_an_interrupt_as_the_lock_is_taken_back_leaves_no_rotation_behind() -> None:
    """A SIGINT arriving as `retake` returned was raised at its call, the lock taken, and
    skipped the rest of rotate()'s `finally`: `rotating` stayed True, and every writer and
    close() waited for good (a review: 269 rounds of 300). Every caller of `retake` now
    takes such an interrupt as returned."""
    done = subprocess.run([sys.executable, "-c", ROTATE_RACE, "300"], capture_output=True,
                          text=True, timeout=120)
    assert done.stdout.strip() == "stuck 0", done.stdout + done.stderr[-2000:]


BROKEN_LOCK = """
from wbcache.wal.commit import retake

class Broken:  # fails at once, every time: not a wait a signal cut short
    def acquire(self, *args):
        raise RuntimeError("not a signal")

try:
    retake(Broken())
except RuntimeError as exc:
    print("raised", type(exc).__name__, exc.__cause__)
"""


def test_a_lock_whose_acquire_always_fails_is_given_up_on() -> None:
    # Retried without end, with the GIL held: the process froze, Ctrl-C never delivered.
    done = subprocess.run([sys.executable, "-c", BROKEN_LOCK], capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.strip() == "raised RetakeFailed not a signal", done.stderr[-2000:]


# The committer's rotate() alone, with a writer and a pipe that touch no disk
BARE_ROTATION = """
import signal, sys, threading, time
from wbcache.wal import commit

lock = threading.Lock()

class Writer:
    def pipe_ready(self): return True
    def rotate_to(self, lsn, set_fd): pass

def bare(pipe):
    committer = commit.GroupCommitter.__new__(commit.GroupCommitter)
    committer._lock, committer._writer, committer._pipe = lock, Writer(), pipe
    committer.queued_lsn, committer.durable_lsn, committer.written_lsn = 1, 0, 0
    committer.batches = committer.fsyncs = 0
    committer.failure, committer._waiting, committer._listeners = None, [], []
    committer.rotating, committer._rotated = False, commit.Condition(lock)
    return committer
"""

CTRL_C_HELD_DOWN = BARE_ROTATION + """
main = threading.main_thread().ident
inside, leave, stop = threading.Event(), threading.Event(), threading.Event()

def holder():  # another writer, in its critical section for a while
    with lock:
        inside.set()
        leave.wait(10)

def ctrl_c_held_down():
    while not stop.is_set():
        signal.pthread_kill(main, signal.SIGINT)
        time.sleep(0.005)

class Pipe:
    def wait(self, lsn, timeout):
        threading.Thread(target=holder, daemon=True).start()
        inside.wait()
        threading.Timer(1.5, leave.set).start()  # 300 interrupts of the wait, then let go
        threading.Thread(target=ctrl_c_held_down, daemon=True).start()
        return (lsn, 0, 1)
    def set_fd(self, fd): pass

committer = bare(Pipe())
lock.acquire()
try:
    committer.rotate()
except KeyboardInterrupt:
    pass
stop.set()
print("held by the rotation, after the holder let go:", leave.is_set() and lock.locked())
"""


def test_a_wait_interrupted_again_and_again_still_waits_for_the_lock() -> None:
    """Every failed acquire counted towards giving up, interrupted waits too: 100 SIGINTs
    (Ctrl-C held down) while another thread held the lock, and retake raised with the lock
    not taken, which the caller took as held (a third review: the holder's critical section
    shared). It gives up only when an acquire fails by itself, never for a signal."""
    done = subprocess.run([sys.executable, "-c", CTRL_C_HELD_DOWN], capture_output=True,
                          text=True, timeout=60)
    assert "held by the rotation, after the holder let go: True" in done.stdout, (
        done.stdout + done.stderr[-2000:])


SIGNAL_AT = """
def signal_at(name):  # a SIGINT arriving as the first call of `name` starts
    def hook(frame, event, arg):
        if event == "call" and frame.f_code.co_name == name:
            sys.setprofile(None)
            signal.raise_signal(signal.SIGINT)
    sys.setprofile(hook)
"""

NOTIFY_SKIPPED = BARE_ROTATION + SIGNAL_AT + """
def waiter():
    with lock:
        committer.wait_for_rotation()  # as Sequencer._admit and close() do

class Pipe:
    def wait(self, lsn, timeout):
        sleeper.start()
        while not committer._rotated._waiters:
            time.sleep(0.001)
        signal_at("notify_all")  # the rotation's end, telling the waiters
        return (lsn, 0, 1)
    def set_fd(self, fd): pass

committer = bare(Pipe())
sleeper = threading.Thread(target=waiter, daemon=True)
lock.acquire()
try:
    committer.rotate()
except KeyboardInterrupt:
    pass
lock.release()
sleeper.join(5)
print("the waiter woke:", not sleeper.is_alive())
"""


def test_a_waiter_whose_notify_an_interrupt_skipped_wakes_by_itself() -> None:
    # An interrupt raised at the rotation's notify (a SIGINT arriving as the lock was taken
    # back, raised at the next check) left a waiter in wait_for_rotation asleep for good.
    done = subprocess.run([sys.executable, "-c", NOTIFY_SKIPPED], capture_output=True,
                          text=True, timeout=60)
    assert "the waiter woke: True" in done.stdout, done.stdout + done.stderr[-2000:]


CONDITION_ENTRY = SIGNAL_AT + """
import signal, sys, threading
from wbcache.wal import commit

lock = threading.Lock()
condition = commit.Condition(lock)
lock.acquire()
signal_at("_acquire_restore")  # threading's wait takes the lock back through it
try:
    condition.wait(0.05)
except KeyboardInterrupt:
    pass
print("held:", lock.locked(), "waiters left:", len(condition._waiters))
"""


def test_an_interrupt_as_a_condition_wait_takes_the_lock_back_finds_it_held() -> None:
    # threading's wait takes the lock back through a method (_acquire_restore): an interrupt
    # at that method's entry came before retake, and wait raised with the lock not held.
    done = subprocess.run([sys.executable, "-c", CONDITION_ENTRY], capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.strip() == "held: True waiters left: 0", done.stdout + done.stderr


SIGTERM_AS_RETAKE_RETURNS = BARE_ROTATION + """
class Pipe:
    def wait(self, lsn, timeout): return (lsn, 0, 1)
    def set_fd(self, fd): pass

def on_term(signum, frame):
    sys.exit(0)  # a SIGTERM handler's usual exit

def hook(frame, event, arg):  # SIGTERM arriving just as retake returned
    if event == "c_return" and arg is commit.retake:
        sys.setprofile(None)
        signal.raise_signal(signal.SIGTERM)

signal.signal(signal.SIGTERM, on_term)
committer = bare(Pipe())
sys.setprofile(hook)
lock.acquire()
try:
    committer.rotate()
except SystemExit:
    pass
sys.setprofile(None)
print("held:", lock.locked(), "rotating:", committer.rotating)
"""


def test_any_exception_raised_as_retake_returns_leaves_the_state_whole() -> None:
    # Callers took only a KeyboardInterrupt raised at retake's call for "returned": a SIGTERM
    # handler's SystemExit skipped rotate()'s reset, and every writer and close() waited for
    # the rotation for good (a fourth review). Anything but retake's own RetakeFailed is.
    done = subprocess.run([sys.executable, "-c", SIGTERM_AS_RETAKE_RETURNS],
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "held: True rotating: False", done.stdout + done.stderr


UNOWNED_WAIT = """
import threading
from wbcache.wal import commit

lock = threading.Lock()
try:
    commit.Condition(lock).wait(0.01)
except RuntimeError as exc:
    print(exc, "| locked:", lock.locked())
"""


def test_a_wait_without_the_lock_is_refused_and_takes_nothing() -> None:
    # It released the lock it did not hold (caught), then took it back and kept it: a
    # programming mistake became a deadlock on the sequencer's lock (a fourth review).
    done = subprocess.run([sys.executable, "-c", UNOWNED_WAIT], capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.strip() == "cannot wait on un-acquired lock | locked: False", (
        done.stdout + done.stderr)
