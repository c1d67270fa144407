"""A child forked while its parent holds a flock never keeps it: the lock dies with the parent.

flock locks belong to the open file description, which a fork shares between parent and child:
a child that kept its copy of the descriptor would keep the lock after its parent died, and a
dead process's lane would then be adopted by no one while the child lived, its acknowledged
writes out of the database (and skipped by `wbcache recover`). Every lock wbcache takes is
tracked for fork (wbcache/forking.py, wbcache/lock.py), not only an open `Cache`'s: here the
lane `wbcache.open` has claimed before the `Cache` exists, and the orphan lane the flusher's
sweep holds while it replays it. Each of those scenarios forks in a real process (a script run
here), SIGKILLs the parent, and reads what it acknowledged from a fresh open while the child
lives. The tests after them fork here, on a bare lock, to show the flock rule both ways.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import wbcache
from wbcache import forking
from wbcache.errors import CacheLockedError
from wbcache.lock import DirectoryLock

# Forks a child that never touches the cache, from the main thread, while another thread is
# inside `wbcache.open(shared=True)` holding the lane it claimed (held there by a wrapped
# `lanes.claim`); then finishes the open, writes, reports and is SIGKILLed.
FORK_DURING_OPEN = r"""
import os, signal, sys, threading, time
import wbcache
from wbcache import forking
from wbcache import lanes

directory = sys.argv[1]
claimed, forked = threading.Event(), threading.Event()
real_claim = lanes.claim

def claim(root):
    lane = real_claim(root)  # the lane's LOCK is held from here; the Cache comes later
    claimed.set()
    assert forked.wait(30), "the main thread never forked"
    return lane

lanes.claim = claim
opened = {}
opener = threading.Thread(target=lambda: opened.setdefault(
    "cache", wbcache.open(directory, shared=True, flush_interval=3600)))
opener.start()
assert claimed.wait(30), "the open never claimed a lane"
child = os.fork()
if child == 0:  # a worker that never touches the cache, and outlives its parent
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)  # let go of the pipes the test reads to their end
    time.sleep(60)
    os._exit(0)
forked.set()
opener.join()
cache = opened["cache"]
cache.put("important", 42)  # acknowledged: in the lane's log (fsync="always"), not flushed
print(child, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""

# Opens a shared cache; a second process writes into its own lane and is SIGKILLed; this
# process's flusher sweeps that orphan lane up and is held just before replaying it (its LOCK
# held), while the main thread forks a child; then this process is SIGKILLed mid-adoption.
FORK_DURING_SWEEP = r"""
import os, signal, subprocess, sys, threading, time
import wbcache
from wbcache import forking
from wbcache import directory as directory_module

directory = sys.argv[1]
cache = wbcache.open(directory, shared=True, flush_interval=3600, adopt_interval=0.05)
adopting, never = threading.Event(), threading.Event()
real_replay = directory_module.replay_into

def replay_into(database, wal, **options):
    if wal != cache._layout.wal:  # the orphan's log, in the flusher's sweep: its LOCK held
        adopting.set()
        never.wait(30)  # this process dies here, the orphan's log not replayed
    return real_replay(database, wal, **options)

directory_module.replay_into = replay_into
orphan = subprocess.run([sys.executable, "-c", '''
import os, signal, sys, wbcache
c = wbcache.open(sys.argv[1], shared=True, flush_interval=3600)
c.put("orphaned", 7)
os.kill(os.getpid(), signal.SIGKILL)
''', directory])
assert orphan.returncode == -signal.SIGKILL, orphan
assert adopting.wait(30), "the sweep never took the orphan lane"
child = os.fork()
if child == 0:  # a worker that never touches the cache, and outlives its parent
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@contextmanager
def orphaned_child(script: str, directory: Path) -> Iterator[int]:
    """Run `script` (which forks a child, prints its pid and SIGKILLs itself); yield the
    child's pid, the child still alive; kill it afterwards."""
    result = subprocess.run([sys.executable, "-c", script, str(directory)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr
    child = int(result.stdout.split()[0])
    try:
        os.kill(child, 0)  # alive: what follows happens while the child lives
        yield child
        os.kill(child, 0)
    finally:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize(("script", "key", "value"), [(FORK_DURING_OPEN, "important", 42),
                                                      (FORK_DURING_SWEEP, "orphaned", 7)],
                         ids=["during a shared open", "during the adoption sweep"])
def test_a_child_forked_while_a_lane_is_locked_leaves_the_lane_to_adoption(
        tmp_path: Path, script: str, key: str, value: int) -> None:
    directory = tmp_path / "shared"
    with orphaned_child(script, directory):
        with wbcache.open(directory, shared=True) as cache:
            assert cache.get(key) == value


# ---------------------------------------------------------------- the lock itself, both ways


def fork_holding(report: Callable[[], object]) -> tuple[int, int, int]:
    """Fork a child that writes what `report()` returns in it as JSON to a pipe, then waits
    until the parent closes the other pipe. Returns (pid, report pipe, release pipe)."""
    report_read, report_write = os.pipe()
    release_read, release_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(report_read)
            os.close(release_write)
            try:
                answer = report()
            except BaseException as exc:
                answer = {"crashed": repr(exc)}
            os.write(report_write, json.dumps(answer).encode())
            os.close(report_write)
            os.read(release_read, 1)  # until the parent closes its end (or dies)
        finally:
            os._exit(0)
    os.close(report_write)
    os.close(release_read)
    return pid, report_read, release_write


def read_report(fd: int) -> object:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return json.loads(b"".join(chunks))


def lock_is_free(path: str) -> bool:
    """Whether the LOCK at `path` can be taken now (through a descriptor of our own)."""
    try:
        DirectoryLock.acquire(path, record_owner=False).release()
    except CacheLockedError:
        return False
    return True


@pytest.mark.parametrize("shared", [False, True], ids=["exclusive", "shared"])
def test_a_lock_stays_the_parents_in_the_child_and_goes_with_its_release(
        tmp_path: Path, shared: bool) -> None:
    """Both directions of the flock rule: the child's closing its copy does not unlock the
    parent (the child, with a descriptor of its own, finds the LOCK taken), and the parent's
    release frees the LOCK while the child lives (the child kept no copy)."""
    path = str(tmp_path / "LOCK")
    DirectoryLock.acquire(path).release()  # create it
    held = DirectoryLock.acquire_shared(path) if shared else DirectoryLock.acquire(path)
    assert held is not None
    pid, report, release = fork_holding(lambda: lock_is_free(path))
    try:
        assert read_report(report) is False  # the child closed its copy: still the parent's
        assert not lock_is_free(path)  # and so it is, here too
        held.release()
        assert lock_is_free(path)  # the child, alive, holds nothing
    finally:
        os.close(release)
        os.waitpid(pid, 0)


def test_a_lock_taken_while_a_fork_prepares_is_not_kept_by_the_child(tmp_path: Path) -> None:
    """A lock taken after the fork snapshotted its owners, while they prepared (another
    thread's, as LMDB's preparation can wait seconds for transactions): the child closes its
    copy too. Modelled by an owner whose preparation takes the lock itself."""
    path = str(tmp_path / "LOCK")
    taken: list[DirectoryLock] = []

    class TakesALockWhileTheForkPrepares:
        def _before_fork(self) -> None:
            taken.append(DirectoryLock.acquire(path, record_owner=False))

        def _disown_after_fork(self) -> None:
            pass

    owner = TakesALockWhileTheForkPrepares()
    forking.track(owner)
    try:
        pid, report, release = fork_holding(lambda: lock_is_free(path))
    finally:
        forking.untrack(owner)
    try:
        assert read_report(report) is False  # the parent's, as it should be
        taken[0].release()
        assert lock_is_free(path)  # the child, alive, kept no copy
    finally:
        os.close(release)
        os.waitpid(pid, 0)


def test_a_child_forked_while_a_shared_database_is_being_opened_can_reopen(
        tmp_path: Path) -> None:
    """Another thread of the parent inside the registry of shared LMDB databases (opening or
    closing a shared cache) at the fork, modelled by holding its lock: before the fix the
    child's copy stayed held and `reopen()` waited for good."""
    from wbcache.backends import lmdb as lmdb_backend

    cache = wbcache.open(tmp_path / "shared", shared=True)
    cache.put("parent", 1)

    def reopen_and_write() -> object:
        cache.reopen()
        cache.put("child", 2)
        cache.close()
        return "reopened"

    with lmdb_backend._shared_lock:
        pid, report, release = fork_holding(reopen_and_write)
    try:
        done: list[object] = []
        reader = threading.Thread(target=lambda: done.append(read_report(report)), daemon=True)
        reader.start()
        reader.join(30)
        assert done == ["reopened"], "the child's reopen() still waits after 30 s"
    finally:
        os.close(release)
        if not done:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    cache.close()
    with wbcache.open(tmp_path / "shared", shared=True) as reopened:
        assert (reopened.get("parent"), reopened.get("child")) == (1, 2)


def descriptors_of(path: str) -> list[int]:
    """This process's descriptors open on the file at `path`."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == path:
                found.append(int(name))
        except OSError:  # the listing's own descriptor, closed by now
            pass
    return found


def test_a_lock_dropped_unreleased_is_not_kept_by_a_child(tmp_path: Path) -> None:
    """A cache never closed, then collected, leaves its flock held in this process; forking.py
    tracks objects weakly and no longer knows of it. A child forked afterwards must still
    close its copy, or the lock outlives this process for as long as the child lives (a
    directory no one can open, a lane no one can adopt)."""
    path = str(tmp_path / "LOCK")
    DirectoryLock.acquire(path, record_owner=False)  # dropped at once, never released
    gc.collect()
    leaked = descriptors_of(path)
    assert leaked and not lock_is_free(path)
    pid, report, release = fork_holding(lambda: descriptors_of(path))
    try:
        assert read_report(report) == []  # the child kept no copy
    finally:
        os.close(release)
        os.waitpid(pid, 0)
        for fd in leaked:
            os.close(fd)
    assert lock_is_free(path)
