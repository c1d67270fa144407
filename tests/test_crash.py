"""kill -9 a real writing process, reopen, and count every acknowledged write."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import wbcache
from wbcache import CacheLockedError

# Each thread writes <prefix>t<thread>:<seq> = seq (and increments <prefix>n<thread>), in
# order, and reports "<thread> <seq>" on stdout
# (unbuffered) only after put() has returned: every reported write was acknowledged.
WRITER = textwrap.dedent("""
    import os, sys, threading
    import wbcache
    path, threads, fsync, prefix = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    cache = wbcache.open(path, fsync=fsync, flush_interval=0.05, segment_size=64 * 1024)
    lock = threading.Lock()
    def write(thread):
        seq = 0
        while True:
            if seq % 10 == 9:
                with cache.batch() as batch:
                    batch.put(f"{prefix}t{thread}:{seq}", seq)
                    batch.incr(f"{prefix}n{thread}")
            else:
                cache.put(f"{prefix}t{thread}:{seq}", seq)
                cache.incr(f"{prefix}n{thread}")
            with lock:
                os.write(1, f"{thread} {seq}\\n".encode())
            seq += 1
    for thread in range(threads):
        threading.Thread(target=write, args=(thread,), daemon=True).start()
    threading.Event().wait()
""")


def run_and_kill(path: Path, *, threads: int, fsync: str, acks_before_kill: int,
                 prefix: str = "") -> dict[int, int]:
    """Start the writer, SIGKILL it once it has acknowledged enough writes; return, per thread,
    the highest acknowledged sequence number."""
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(threads), fsync, prefix],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert child.stdout is not None
    last: dict[int, int] = {}
    seen = 0
    killed = False
    for line in child.stdout:  # after the kill, read what was already in the pipe, to EOF
        thread, seq = map(int, line.split())
        last[thread] = seq
        seen += 1
        if seen == acks_before_kill and not killed:
            child.send_signal(signal.SIGKILL)
            killed = True
    child.wait()
    assert child.returncode == -signal.SIGKILL, child.stderr.read().decode()  # type: ignore[union-attr]
    return last


def check_every_acknowledged_write(path: Path, last: dict[int, int], threads: int,
                                   prefix: str = "") -> int:
    """Reopen and check each thread's writes 0..last[thread]; return how many were checked."""
    assert len(last) == threads
    checked = 0
    with wbcache.open(path) as cache:
        for thread, top in last.items():
            for seq in range(top + 1):
                assert cache.get(f"{prefix}t{thread}:{seq}") == seq, (thread, seq)
                checked += 1
            # counters count every acknowledged increment; one more may have landed unacked
            assert cache.get(f"{prefix}n{thread}") in (top + 1, top + 2)
            # no holes: nothing newer than the acknowledged prefix is missing in between
            extra = top + 1
            while cache.get(f"{prefix}t{thread}:{extra}") is not None:
                extra += 1
            assert cache.get(f"{prefix}t{thread}:{extra + 1}") is None
    return checked


@pytest.mark.parametrize("fsync", ["always", "interval"])
def test_sigkill_while_8_threads_write_loses_no_acknowledged_write(tmp_path: Path,
                                                                    fsync: str) -> None:
    path = tmp_path / "cache"
    last = run_and_kill(path, threads=8, fsync=fsync, acks_before_kill=3000)
    checked = check_every_acknowledged_write(path, last, threads=8)
    assert checked >= 3000


def test_repeated_kills_and_reopens_accumulate_without_loss(tmp_path: Path) -> None:
    path = tmp_path / "cache"
    rounds = []
    for round_ in range(3):
        prefix = f"r{round_}/"
        rounds.append((prefix, run_and_kill(path, threads=4, fsync="always",
                                            acks_before_kill=500, prefix=prefix)))
        for earlier_prefix, last in rounds:  # earlier rounds' writes survive later kills too
            check_every_acknowledged_write(path, last, threads=4, prefix=earlier_prefix)


HOLDER = textwrap.dedent("""
    import sys, wbcache
    cache = wbcache.open(sys.argv[1])
    cache.put("holder", "was here")
    print("open", flush=True)
    sys.stdin.readline()
""")


def test_a_second_open_from_another_process_is_refused_until_the_owner_dies(
        tmp_path: Path) -> None:
    path = tmp_path / "cache"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert holder.stdout is not None
    assert holder.stdout.readline() == b"open\n"
    with pytest.raises(CacheLockedError, match=f"pid {holder.pid}"):
        wbcache.open(path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with wbcache.open(path) as cache:  # the kernel released the dead owner's lock
        assert cache.get("holder") == "was here"
    assert holder.stdin is not None
    holder.stdin.close()
    holder.stdout.close()


def test_open_from_another_process_while_held_here_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cache"
    with wbcache.open(path):
        probe = subprocess.run(
            [sys.executable, "-c",
             "import sys, wbcache\n"
             "try:\n    wbcache.open(sys.argv[1])\n"
             "except wbcache.CacheLockedError as exc:\n    print('locked:', exc)\n",
             str(path)],
            capture_output=True, text=True, check=True)
    assert probe.stdout.startswith("locked:")
    assert str(os.getpid()) in probe.stdout


RACER = textwrap.dedent("""
    import sys, wbcache
    sys.stdin.readline()  # start together
    try:
        cache = wbcache.open(sys.argv[1])
    except wbcache.CacheLockedError:
        print("locked", flush=True)
    else:
        print("opened", flush=True)
        sys.stdin.readline()
        cache.close()
""")


def test_two_first_opens_of_a_new_directory_racing_give_one_owner_and_one_locked_error(
        tmp_path: Path) -> None:
    for trial in range(10):
        path = tmp_path / f"race{trial}"
        racers = [subprocess.Popen([sys.executable, "-c", RACER, str(path)], text=True,
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE) for _ in range(2)]
        for racer in racers:
            assert racer.stdin is not None
            racer.stdin.write("go\n")
            racer.stdin.flush()
        answers = sorted(racer.stdout.readline().strip() for racer in racers)  # type: ignore[union-attr]
        for racer in racers:
            racer.stdin.close()  # type: ignore[union-attr]
            racer.wait()
        errors = [racer.stderr.read() for racer in racers]  # type: ignore[union-attr]
        assert answers == ["locked", "opened"], errors
        with wbcache.open(path):  # and the directory is whole afterwards
            pass


def test_a_lock_whose_pid_cannot_be_written_is_not_left_held(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    # An EIO while writing our pid into LOCK fails the acquire; the flock taken just before
    # must go with it, or the directory (a shared directory's lane: never adopted) stays
    # locked by a process whose open failed.
    from wbcache import lock as lock_module

    path = str(tmp_path / "LOCK")

    def failing_pwrite(fd: int, data: bytes, offset: int) -> int:
        raise OSError(5, "injected EIO")

    with monkeypatch.context() as patched:
        patched.setattr(lock_module.os, "pwrite", failing_pwrite)
        with pytest.raises(OSError, match="injected EIO"):
            lock_module.DirectoryLock.acquire(path)
    held = lock_module.DirectoryLock.acquire(path)  # CacheLockedError if the first kept it
    held.release()


def test_a_single_owner_directory_with_lanes_left_over_is_in_use_not_shared(
        tmp_path: Path) -> None:
    # A shared first open interrupted after making lanes/, before its SHARED mark; then a
    # single-owner open made wal/. A second single-owner open was told "shared: open it with
    # shared=True", which then said "single-owner: open it without".
    from wbcache.layout import Layout
    from wbcache.lock import DirectoryLock

    root = tmp_path / "c"
    root.mkdir(mode=0o700)
    (root / "lanes").mkdir(mode=0o700)
    first = DirectoryLock.acquire(Layout(str(root)).lock, record_owner=False)
    try:  # a single-owner first open at work (its lock taken, no wal/ yet): in use
        with pytest.raises(wbcache.CacheLockedError):
            wbcache.open(root)
    finally:
        first.release()
    with wbcache.open(root) as cache:
        cache.put("k", 1)
        with pytest.raises(wbcache.CacheLockedError):
            wbcache.open(root)
        with pytest.raises(wbcache.InvalidDirectoryError, match="is a single-owner"):
            wbcache.open(root, shared=True)
    # a shared open checking it (the lock held shared), then refused: in use meanwhile
    checking = DirectoryLock.acquire_shared(Layout(str(root)).lock)
    try:
        with pytest.raises(wbcache.CacheLockedError):
            wbcache.open(root)
    finally:
        checking.release()
    with wbcache.open(root) as cache:
        assert cache.get("k") == 1


def test_a_lock_on_a_lock_file_removed_meanwhile_is_let_go(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A first open refused by its database removes the LOCK it made and its directory
    (`unclaim`). Another open that had opened that LOCK just before, and flocks it just
    after, held a lock on a file nobody else could find, while a third open made the
    directory anew and locked the new LOCK: two owners of one directory (found by a review;
    its script paused the second open between the two calls, as here)."""
    from wbcache import lock as lock_module

    path = tmp_path / "cache"
    wbcache.open(path).close()
    stale = os.open(path / "LOCK", os.O_RDWR)  # opened before the removal ...
    os.close(os.open(path / "LOCK.new", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    os.rename(path / "LOCK.new", path / "LOCK")  # ... which another open then made anew,
    owner = wbcache.open(path)  # and holds
    real_open = lock_module._open_lock_file
    handed = []

    def open_the_removed_one_first(lock_path: str, **kwargs: bool) -> int:
        if not handed:
            handed.append(stale)
            return stale
        return real_open(lock_path, **kwargs)

    monkeypatch.setattr(lock_module, "_open_lock_file", open_the_removed_one_first)
    try:
        with pytest.raises(CacheLockedError, match="is already open in this process"):
            wbcache.open(path)
        assert handed == [stale]  # the removed LOCK was flocked, and let go
    finally:
        owner.close()


def test_a_failed_check_of_the_locked_file_lets_the_lock_go(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check that the LOCK file is still the one at its path ran after the flock and
    outside its cleanup: a stat failing there (EACCES, ESTALE, EIO, an interrupt) kept the
    descriptor open and the directory locked for the life of the process (a review)."""
    import errno

    from wbcache import lock as lock_module

    path = tmp_path / "cache"
    wbcache.open(path).close()
    real_stat = os.stat

    def failing_once(target: str, *args: object, **kwargs: object) -> os.stat_result:
        if str(target).endswith(os.sep + "LOCK") and kwargs.get("follow_symlinks") is False:
            monkeypatch.setattr(lock_module.os, "stat", real_stat)
            raise PermissionError(errno.EACCES, "Permission denied", str(target))
        return real_stat(target, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(lock_module.os, "stat", failing_once)
    with pytest.raises(PermissionError):
        wbcache.open(path)
    wbcache.open(path).close()  # nothing of the failed open holds the lock
