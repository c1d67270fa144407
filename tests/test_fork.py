"""A cache inherited through fork() is refused in the child, and the child changes nothing.

Before this was enforced, a child's `put` was acknowledged under an LSN the parent then used
again, and the next open failed with `CorruptLogError ... record has LSN 2 where 3 was
expected`. Each test forks a real child and has it report through a pipe. Over 500 lines:
every way into an inherited cache (sync, async, shared, mid-transaction, descriptors past
1023, a signal handler forking) is checked beside the others, on the same helpers.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import wbcache
from wbcache import ForkedCacheError

# Every use a child might try; each must raise ForkedCacheError.
USES: dict[str, Callable[[wbcache.Cache], Any]] = {
    "put": lambda c: c.put("child", 1),
    "setitem": lambda c: c.__setitem__("child", 1),
    "get": lambda c: c.get("k0"),
    "getitem": lambda c: c["k0"],
    "contains": lambda c: "k0" in c,
    "len": lambda c: len(c),
    "iter": lambda c: list(c),
    "keys": lambda c: c.keys(),
    "items": lambda c: c.items(),
    "delete": lambda c: c.delete("k0"),
    "delitem": lambda c: c.__delitem__("k0"),
    "incr": lambda c: c.incr("n"),
    "put_many": lambda c: c.put_many({"a": 1}),
    "batch": lambda c: c.batch(),
    "flush": lambda c: c.flush(),
    "sync": lambda c: c.sync(),
    "stats": lambda c: c.stats(),
    "enter": lambda c: c.__enter__(),
}


def in_child(body: Callable[[], dict[str, Any]], timeout: float = 20.0) -> dict[str, Any]:
    """Fork; run `body` in the child and return what it reported (as JSON through a pipe).
    A child that does not finish within `timeout` is killed and the test fails."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        os.close(read_end)
        try:
            report = body()
        except BaseException as exc:  # reported to the parent, which fails the test
            report = {"crashed": repr(exc)}
        try:
            os.write(write_end, json.dumps(report).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    deadline = time.monotonic() + timeout
    chunks = []
    while True:
        finished, status = os.waitpid(pid, os.WNOHANG)
        if finished:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the child did not finish within {timeout} s (blocked on a lock?)")
        time.sleep(0.01)  # polling the child's exit, not standing in for synchronisation
    while chunk := os.read(read_end, 65536):
        chunks.append(chunk)
    os.close(read_end)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    report: dict[str, Any] = json.loads(b"".join(chunks))
    assert "crashed" not in report, report["crashed"]
    return report


def refusals(cache: Any, uses: dict[str, Callable[[Any], Any]]) -> dict[str, str]:
    """For each use: "refused" if it raised ForkedCacheError, else what happened."""
    outcome = {}
    for name, use in uses.items():
        try:
            use(cache)
        except ForkedCacheError as exc:
            outcome[name] = "refused" if "fork" in str(exc) else f"unclear message: {exc}"
        except BaseException as exc:
            outcome[name] = f"raised {exc!r}"
        else:
            outcome[name] = "accepted"
    return outcome


def directory_state(path: Path) -> dict[str, str]:
    """Every file under `path` (lock.mdb aside: LMDB's reader table changes with any reader,
    the parent's included) with a hash of its bytes."""
    state = {}
    for file in sorted(path.rglob("*")):
        if file.is_file() and file.name != "lock.mdb":
            state[str(file.relative_to(path))] = hashlib.sha256(file.read_bytes()).hexdigest()
    return state


def test_a_forked_child_is_refused_every_use_and_changes_nothing(cache_dir: Path) -> None:
    cache = wbcache.open(cache_dir, flush_interval=3600, segment_size=4096)
    cache.put_many({f"k{i}": "x" * 100 for i in range(100)})  # several segments, unflushed
    cache.flush()
    cache.put("dirty", 1)  # not yet in the database when the child closes its copy
    before = directory_state(cache_dir)

    def child() -> dict[str, Any]:
        outcome = refusals(cache, USES)
        cache.close()  # allowed: neither flushes nor deletes
        with cache:  # leaving a `with` block is allowed too ...
            pass
        return {"uses": outcome, "closed": cache.closed, "repr": repr(cache)}

    # ... but entering one is a use, refused above; `with` on the disowned cache must raise
    # before the body runs, which the "enter" use checks. Here, exit alone:
    USES_WITHOUT_ENTER = dict(USES)
    del USES_WITHOUT_ENTER["enter"]

    def child_exit_only() -> dict[str, Any]:
        outcome = refusals(cache, USES_WITHOUT_ENTER)
        cache.__exit__(None, None, None)
        cache.close()
        return {"uses": outcome, "closed": cache.closed, "repr": repr(cache)}

    report = in_child(child_exit_only)
    assert report["uses"] == {name: "refused" for name in USES_WITHOUT_ENTER}
    assert report["closed"] is True
    # the disowned repr, not Cache's "<wbcache.Cache '...' closed>" (this test's own path
    # holds "fork": a check for that word alone passed either way)
    assert report["repr"] == (f"<wbcache.Cache {str(cache_dir)!r} inherited through fork() "
                              f"from process {os.getpid()}: unusable>")
    assert directory_state(cache_dir) == before  # the child changed no byte

    # The parent is unaffected: it writes on, and the directory reopens with everything.
    cache.put("after", 2)
    assert cache.get("dirty") == 1
    cache.close()
    with wbcache.open(cache_dir) as reopened:
        assert reopened.get("after") == 2 and reopened.get("dirty") == 1
        assert len(reopened) == 102


@pytest.mark.parametrize("shared", [False, True], ids=["single-owner", "shared"])
def test_a_get_saved_before_the_fork_is_refused_in_the_child_and_reads_fresh_after_reopen(
        tmp_path: Path, shared: bool) -> None:
    """`g = cache.get` is the cache's own hit path (a closure over its memory), not a bound
    method the refusal sees: before, the child read the parent's memory through it, and went
    on reading it after `reopen()`."""
    cache = wbcache.open(tmp_path / "c", shared=shared)
    cache.put("k", "parent-value")
    saved = cache.get

    def child() -> dict[str, Any]:
        report: dict[str, Any] = refusals(cache, {"saved get": lambda _: saved("k")})
        if shared:
            cache.reopen()
            cache.put("k", "child-value")
            report["after reopen"] = saved("k")
            cache.close()
        return report

    expected: dict[str, Any] = {"saved get": "refused"}
    if shared:
        expected["after reopen"] = "child-value"
    assert in_child(child) == expected
    assert saved("k") == "parent-value"  # the parent's own reference is untouched
    cache.close()


def test_entering_an_inherited_cache_in_a_with_block_is_refused(cache_dir: Path) -> None:
    cache = wbcache.open(cache_dir)

    def child() -> dict[str, Any]:
        try:
            with cache:
                return {"entered": True}
        except ForkedCacheError:
            return {"entered": False}

    assert in_child(child) == {"entered": False}
    cache.close()


def test_a_child_forked_while_a_writer_holds_the_lock_is_refused_at_once(
        cache_dir: Path) -> None:
    """A parent's thread mid-write holds the cache lock at the moment of the fork; in the child
    that lock stays held forever, so a refusal must come before any lock is taken."""
    cache = wbcache.open(cache_dir, fsync="interval")
    stop = threading.Event()

    def write() -> None:
        n = 0
        while not stop.is_set():
            cache.put(f"w{n % 100}", n)
            n += 1

    writer = threading.Thread(target=write)
    writer.start()
    try:
        for _ in range(20):
            report = in_child(lambda: refusals(cache, {"put": USES["put"], "get": USES["get"],
                                                       "flush": USES["flush"]}), timeout=10)
            assert report == {"put": "refused", "get": "refused", "flush": "refused"}
    finally:
        stop.set()
        writer.join()
    cache.close()
    with wbcache.open(cache_dir) as reopened:
        assert len(reopened) == 100


def test_the_child_can_open_the_directory_once_the_parent_has_closed_it(
        cache_dir: Path) -> None:
    cache = wbcache.open(cache_dir)
    cache.put("k", 1)
    gate_read, gate_write = os.pipe()

    def child() -> dict[str, Any]:
        os.close(gate_write)
        os.read(gate_read, 1)  # the parent has closed its cache
        with wbcache.open(cache_dir) as own:  # the inherited LOCK descriptor was closed
            own.put("from-child", 2)
            return {"k": own.get("k")}

    # The child waits on the pipe; the parent closes first, then lets it go.
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            result = child()
            os.write(write_end, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    os.close(gate_read)
    cache.close()
    os.write(gate_write, b"x")
    os.close(gate_write)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert json.loads(os.read(read_end, 4096)) == {"k": 1}
    os.close(read_end)
    with wbcache.open(cache_dir) as reopened:
        assert reopened.get("from-child") == 2


def _put_in_child(cache: wbcache.Cache, results: Any) -> None:
    try:
        cache.put("child", 1)
        results.put("accepted")
    except ForkedCacheError:
        results.put("refused")


def test_multiprocessing_with_the_fork_start_method_is_refused(cache_dir: Path) -> None:
    context = multiprocessing.get_context("fork")
    cache = wbcache.open(cache_dir)
    cache.put("k", 1)
    results = context.Queue()
    process = context.Process(target=_put_in_child, args=(cache, results))
    process.start()
    assert results.get(timeout=20) == "refused"
    process.join(20)
    assert process.exitcode == 0
    cache.put("k2", 2)  # the parent's LSNs were never reused by the child
    cache.close()
    with wbcache.open(cache_dir) as reopened:
        assert reopened.get("k") == 1 and reopened.get("k2") == 2
        assert reopened.get("child") is None


def test_an_inherited_async_cache_is_refused(cache_dir: Path) -> None:
    async def main() -> dict[str, Any]:
        cache = await wbcache.open_async(cache_dir)
        await cache.put("k", 1)

        def child() -> dict[str, Any]:
            outcome = refusals(cache, {"put": lambda c: c.put("child", 1),
                                       "get": lambda c: c.get("k"),
                                       "underlying": lambda c: c.cache.put("child", 1)})
            asyncio.run(cache.close())  # awaitable, and does nothing in the child
            return {"uses": outcome, "closed": cache.closed, "repr": repr(cache)}

        report = in_child(child)
        await cache.put("k2", 2)
        await cache.close()
        return report

    report = asyncio.run(main())
    assert report == {"uses": {"put": "refused", "get": "refused", "underlying": "refused"},
                      "closed": True,
                      "repr": f"<wbcache.AsyncCache {str(cache_dir)!r} inherited through "
                              f"fork() from process {os.getpid()}: unusable>"}
    with wbcache.open(cache_dir) as reopened:
        assert reopened.get("k2") == 2 and reopened.get("child") is None


def test_an_inherited_shared_async_cache_says_to_open_a_lane_of_its_own(tmp_path: Path) -> None:
    # The refusal told the child that its directory, opened with shared=True, was
    # single-owner and to "open it with shared=True". The advice it now gives works.
    directory = tmp_path / "shared"

    async def main() -> dict[str, Any]:
        cache = await wbcache.open_async(directory, shared=True)
        await cache.put("k", 1)
        await cache.flush()

        def child() -> dict[str, Any]:
            try:
                asyncio.run(cache.get("k"))
            except ForkedCacheError as exc:
                message = str(exc)

            async def own_lane() -> Any:
                async with await wbcache.open_async(directory, shared=True) as mine:
                    return await mine.get("k")
            return {"message": message, "own lane": asyncio.run(own_lane())}

        report = in_child(child)
        await cache.close()
        return report

    report = asyncio.run(main())
    assert "single-owner" not in report["message"], report
    assert "wbcache.open_async(path, shared=True)" in report["message"], report
    assert report["own lane"] == 1


def test_a_child_forked_during_a_long_transaction_is_told_why_it_cannot_reopen(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A fork waits _FORK_WAIT for the parent's transactions to end; past it, the child must
    # leave its copy of the database open for good, and LMDB refuses a second open in that
    # process. The child was told to "close the cache that holds it first": there is none.
    from wbcache.backends import lmdb as lmdb_backend
    monkeypatch.setattr(lmdb_backend, "_FORK_WAIT", 0.2)
    directory = tmp_path / "shared"
    cache = wbcache.open(directory, shared=True)
    cache.put("a", 1)
    cache.flush()
    scanning, stop = threading.Event(), threading.Event()

    def long_scan() -> None:  # a scan of a big database, a slow flush
        for _ in cache._backend.database.items():  # type: ignore[attr-defined]
            scanning.set()
            stop.wait(30)

    scanner = threading.Thread(target=long_scan)
    scanner.start()
    try:
        assert scanning.wait(10)

        def child() -> dict[str, Any]:
            try:
                cache.reopen()
            except wbcache.DatabaseError as exc:
                return {"refused": str(exc)}
            return {"refused": None}

        report = in_child(child)
    finally:
        stop.set()
        scanner.join(10)
    cache.close()
    assert "forked while its parent had a transaction" in report["refused"], report


def test_fork_returns_in_the_parent_only_after_the_child_closed_its_lmdb_copy(
        tmp_path: Path) -> None:
    # LMDB's close clears the reader-table slots recorded under the pid that opened the
    # environment: the parent's. A read the parent began while the child was still closing
    # would lose its slot, and a writer could then reuse the pages it reads (the shared
    # torture saw counters counted twice when forks raced reads). So the parent reads again
    # only once the child has closed its copy: by then the child maps no data.mdb.
    from wbcache.backends.lmdb import LmdbDatabase

    path = tmp_path / "db"
    database = LmdbDatabase(str(path))
    try:
        database.write([("k", b"v")], [], [], b"checkpoint", 1)
        for _ in range(5):
            hold, release = os.pipe()
            pid = os.fork()
            if pid == 0:  # waits, mapping nothing of the database once disowned
                os.close(release)
                os.read(hold, 1)
                os._exit(0)
            os.close(hold)
            try:
                with open(f"/proc/{pid}/maps") as maps:
                    mapped = [line for line in maps if str(path / "data.mdb") in line]
            finally:
                os.write(release, b"go")
                os.close(release)
                os.waitpid(pid, 0)
            assert mapped == []
            assert database.get("k") == b"v"
    finally:
        database.close()


def _reads_within(database: Any, seconds: float) -> bool:
    """Whether a read of "k" ends within `seconds` (a read gate left shut hangs for good)."""
    done = threading.Event()

    def read() -> None:
        if database.get("k") == b"v":
            done.set()

    threading.Thread(target=read, daemon=True).start()
    return done.wait(seconds)


def _fork_and_reap(body: Callable[[], None] = lambda: None) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            body()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_the_fork_handshake_works_with_descriptors_past_1023(tmp_path: Path) -> None:
    # select() refuses descriptor numbers >= 1024 (a busy server reaches them); the failure
    # also stopped the other databases' hooks, leaving their reads shut for good.
    import resource

    from wbcache.backends.lmdb import LmdbDatabase

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.fail(f"the descriptor limit ({hard}) is too low for this test")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    filler = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    databases = [LmdbDatabase(str(tmp_path / name)) for name in ("a", "b")]
    try:
        for database in databases:
            database.write([("k", b"v")], [], [], b"checkpoint", 1)
        assert _fork_and_reap() == 0
        assert all(_reads_within(database, 10) for database in databases)
    finally:
        for database in databases:
            database.close()
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_fork_without_a_descriptor_for_the_handshake_still_disowns_and_reads_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # os.pipe() failing (EMFILE) used to leave stale descriptor numbers for the parent to
    # close (someone else's files) and its read gate shut.
    import errno

    from wbcache.backends import lmdb as lmdb_module

    database = lmdb_module.LmdbDatabase(str(tmp_path / "db"))
    try:
        database.write([("k", b"v")], [], [], b"checkpoint", 1)

        def no_descriptors() -> tuple[int, int]:
            raise OSError(errno.EMFILE, "Too many open files")

        report_read, report_write = os.pipe()  # the test's own, made before the failure
        monkeypatch.setattr(lmdb_module.os, "pipe", no_descriptors)

        def child() -> None:
            try:
                database.get("k")
                outcome = b"used"
            except ForkedCacheError:
                outcome = b"refused"
            os.write(report_write, outcome)

        assert _fork_and_reap(child) == 0
        monkeypatch.undo()
        os.close(report_write)
        assert os.read(report_read, 16) == b"refused"
        os.close(report_read)
        assert _reads_within(database, 10)
    finally:
        database.close()


# Run in a process of its own: the fork it makes used to deadlock that process for good.
FORK_IN_A_HANDLER = """
import os, signal, sys
import wbcache
from wbcache import lock

children = []

def fork_and_exit(signum, frame):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    children.append(pid)

signal.signal(signal.SIGUSR1, fork_and_exit)
opened = lock._open_lock_file

def open_then_signal(path, *, writable):
    fd = opened(path, writable=writable)
    signal.raise_signal(signal.SIGUSR1)  # its handler runs before the flock and the tracking
    return fd

lock._open_lock_file = open_then_signal
cache = wbcache.open(sys.argv[1])
lock._open_lock_file = opened
cache.put("k", "v")
_, status = os.waitpid(children[0], 0)
cache.close()
print(len(children), os.waitstatus_to_exitcode(status), wbcache.open(sys.argv[1])["k"])
"""


def test_a_signal_handler_forking_while_a_lock_is_being_taken_does_not_deadlock(
        tmp_path: Path) -> None:
    # A fork waits for `no_fork()` blocks; one in the very thread the handler interrupted
    # would never end, so that fork goes ahead mid-step (wbcache/forking.py).
    import subprocess
    import sys

    try:
        done = subprocess.run([sys.executable, "-c", FORK_IN_A_HANDLER, str(tmp_path / "c")],
                              capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("the process forking in its signal handler did not finish in 30 s")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no at-fork hook failed, in the parent or the child
    assert done.stdout.split() == ["1", "0", "v"]


# A child that holds a copy of the LOCK descriptor and has not run its after-fork hooks: one
# forked in C (ctypes.pydll: CPython's hooks never run), waiting on a pipe.
CHILD_HOLDING_THE_LOCK = """
import ctypes, os, sys
import wbcache

cache = wbcache.open(sys.argv[1])
cache.put("k", "v")
read_end, write_end = os.pipe()
pid = ctypes.pydll.LoadLibrary(None).fork()
if pid == 0:
    os.read(read_end, 1)
    os._exit(0)
try:
    cache.close()
    try:
        with wbcache.open(sys.argv[1]) as again:
            print("reopened:", again["k"])
    except wbcache.CacheLockedError as exc:
        print("refused:", exc)
finally:
    os.write(write_end, b"x")
    os.waitpid(pid, 0)
"""


def test_a_closed_directory_reopens_at_once_whatever_children_hold_a_copy_of_its_lock(
        tmp_path: Path) -> None:
    # close() only closed its LOCK descriptor; a child's copy kept the flock until the child
    # ran its hooks (or exited), and an open just after close() returned was refused as "in
    # use". close() promises that reopening next works.
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", CHILD_HOLDING_THE_LOCK, str(tmp_path / "c")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "reopened: v", done.stdout + done.stderr


# A child forked in C (its hooks never ran) releasing the lock it inherited, as its close()
# does last: the flock is the open file description's, shared with the parent.
C_CHILD_RELEASES = """
import ctypes, os, subprocess, sys
import wbcache

cache = wbcache.open(sys.argv[1])
pid = ctypes.pydll.LoadLibrary(None).fork()
if pid == 0:
    try:
        cache._dir_lock.release()
    finally:
        os._exit(0)
os.waitpid(pid, 0)
probe = subprocess.run([sys.executable, "-c", "import sys, wbcache\\n"
                        "try:\\n    wbcache.open(sys.argv[1]).close(); print('opened')\\n"
                        "except wbcache.CacheLockedError: print('refused')", sys.argv[1]],
                       capture_output=True, text=True)
print(probe.stdout.strip() or probe.stderr)
from wbcache.lock import owner_pid
print("pid kept:", owner_pid(sys.argv[1] + "/LOCK") == os.getpid())
cache.close()
"""


def test_a_child_forked_in_c_releasing_the_lock_leaves_the_parent_its_owner(
        tmp_path: Path) -> None:
    # Only the process that took the lock unlocks it (LOCK_UN); a copy elsewhere only closes.
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", C_CHILD_RELEASES, str(tmp_path / "c")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["refused", "pid kept: True"], (
        done.stdout + done.stderr)
