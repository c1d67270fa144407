"""The database's own durability, proven from the system calls LMDB really makes.

A writer is SIGKILLed with its writes only in the log; a second process, run under strace,
recovers the directory (recovery commits, then deletes the segments), writes more, flushes
with `flush()` and by the background flusher thread (segments deleted both ways), and closes.
`check_syscall_order` (wbcache.fault_injection.syscall_order) then proves from the strace log
that every segment unlink came after LMDB's fsyncs of the commit that covers it.

The same run with a mutation patched into the child only must be caught:
  * LMDB opened with sync=False: no fdatasync at all; the page and meta writes are pending
    at every unlink (db-not-synced).
  * metasync=False: LMDB still fdatasyncs the pages, but writes the meta page through its
    ordinary descriptor instead of the O_DSYNC one and does not sync it: the meta write (the
    commit itself) is pending at the unlink (db-not-synced). Distinguishable only because the
    checker tracks which descriptor was opened with O_DSYNC.
  * writemap=True, map_async=True: pages and meta are stores into a writable shared map
    (invisible to strace) and msync(MS_ASYNC) is no sync: the map is a change that never
    returns (db-not-synced), and no commit is seen, so the checkpoint is unknown
    (checkpoint-behind). writemap=True alone (msync(MS_SYNC)) is refused the same way: what
    strace cannot see, the checker does not take on trust.
  * the flusher deleting segments before its commit: every write before the unlink was
    synced (that of the previous flush), so only the checkpoint read from LMDB's pages shows
    that the commit covering the segment had not happened (checkpoint-behind).
  * segment deletion without the fsync of DIR/wal (wal-dir-not-synced) and LMDB's data.mdb
    creation without the fsync of DIR/db (db-dir-not-synced).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import require_service

import wbcache
from wbcache.fault_injection.syscall_order import (
    OrderReport,
    check_syscall_order,
    strace_command,
)

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
KILLED_PUTS = 200  # LSNs 1..200 are only in the log when the writer is killed
ROUNDS, PUTS_PER_ROUND = 4, 80  # LSNs 201..520 in the traced child
FINAL_LSN = KILLED_PUTS + ROUNDS * PUTS_PER_ROUND

# Acknowledges its puts on stdout, then waits to be killed: nothing reaches the database.
KILLED_WRITER = textwrap.dedent(f"""
    import sys, threading
    import wbcache
    cache = wbcache.open(sys.argv[1], segment_size=4096, flush_interval=3600)
    for i in range({KILLED_PUTS}):
        cache.put(f"k{{i % {PUTS_PER_ROUND}}}", f"killed-{{i}}" + "y" * 40)
    print("acknowledged", flush=True)
    threading.Event().wait()
""")

# Run under strace. Mutations are patched here, in the child, before the cache is opened.
TRACED_CHILD = textwrap.dedent(f"""
    import os, sys
    import lmdb
    path, mutation, tests_dir = sys.argv[1], sys.argv[2], sys.argv[3]
    sys.path.insert(0, tests_dir)
    LMDB_FLAGS = {{"sync-off": {{"sync": False}}, "metasync-off": {{"metasync": False}},
                  "writemap-async": {{"writemap": True, "map_async": True}},
                  "writemap": {{"writemap": True}}}}
    if mutation in LMDB_FLAGS:
        real_open = lmdb.open
        def open_mutated(*args, **kwargs):
            return real_open(*args, **{{**kwargs, **LMDB_FLAGS[mutation]}})
        lmdb.open = open_mutated

    import wbcache
    from controlled import wait_until
    from wbcache.fault_injection.syscall_order import acknowledge

    if mutation == "delete-before-commit":
        from wbcache import flusher
        real_apply = flusher.Flusher._apply
        def apply_after_deleting(self, changes, deltas, lsn, deadline):
            self._writer.delete_through(lsn)
            return real_apply(self, changes, deltas, lsn, deadline)
        flusher.Flusher._apply = apply_after_deleting
    elif mutation == "wal-dir-fsync-dropped":
        from wbcache.recovery import replay
        from wbcache.wal import writer
        def delete_without_dir_fsync(wal_dir, paths):
            for segment in paths:
                os.unlink(segment)
        writer.delete_segments = replay.delete_segments = delete_without_dir_fsync
    elif mutation == "db-dir-fsync-dropped":
        from wbcache.backends import lmdb as lmdb_backend
        class WithoutDirFsync:
            def __init__(self, real):
                self.real = real
            def __getattr__(self, name):
                return getattr(self.real, name)
            def fsync_dir(self, path):
                pass
        lmdb_backend.SYSCALLS = WithoutDirFsync(lmdb_backend.SYSCALLS)

    cache = wbcache.open(path, segment_size=4096, flush_interval=0.02)
    acknowledge(path, "recovered")
    for round in range({ROUNDS}):
        for i in range({PUTS_PER_ROUND}):
            cache.put(f"k{{i}}", f"r{{round}}" + "x" * 50)
        if round % 2 == 0:
            cache.flush()
            acknowledge(path, f"flushed-{{round}}")
        else:  # only the background flusher thread deletes segments in this round
            # stats() counts a segment as gone once its deletion is durable (wal/ fsync'd);
            # the directory listing would show it gone before that.
            wait_until(lambda: cache.stats()["wal_segments"] == 1,
                       what="the background flusher deleting the covered segments")
            acknowledge(path, f"background-{{round}}")
    cache.close()
    acknowledge(path, "closed")
""")


def _strace() -> str:
    found = shutil.which("strace")
    if found is None:
        require_service("strace", "these tests read the system calls LMDB makes")
    return str(found)


def _kill_writer(cache_dir: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(cache_dir)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert child.stdout is not None and child.stderr is not None
    line = child.stdout.readline()
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    child.stdout.close()
    stderr = child.stderr.read().decode()
    child.stderr.close()
    assert line == b"acknowledged\n", stderr
    segments = os.listdir(cache_dir / "wal")
    assert len(segments) >= 3, segments  # recovery will have several segments to delete


def _traced_run(tmp_path: Path, mutation: str) -> OrderReport:
    """Kill a writer, then recover and flush under strace; the checker's report of the log."""
    cache_dir = tmp_path / "cache"
    _kill_writer(cache_dir)
    log = tmp_path / "strace.log"
    argv = [sys.executable, "-c", TRACED_CHILD, str(cache_dir), mutation, TESTS_DIR]
    done = subprocess.run(strace_command(argv, str(log), _strace()), capture_output=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    with open(log) as lines:
        return check_syscall_order(lines, str(cache_dir))


def test_every_segment_unlink_follows_lmdbs_fsyncs_of_the_commit_covering_it(
        tmp_path: Path) -> None:
    report = _traced_run(tmp_path, "none")

    assert report.ok, "\n".join(map(str, report.violations))
    # Not vacuous: recovery deleted segments (before its acknowledgement), so did flush()
    # and the background flusher thread; LMDB wrote and synced; the checkpoints read from
    # LMDB's pages end at the last LSN written.
    assert report.unlink_phases.count("") >= 3
    assert any(phase.startswith("flushed-") for phase in report.unlink_phases)
    assert len(report.unlink_threads) >= 2
    assert report.db_writes > 0 and report.db_syncs > 0 and report.wal_dir_syncs > 0
    known = [checkpoint for checkpoint in report.checkpoints if checkpoint is not None]
    assert known == sorted(known) and known[-1] == FINAL_LSN
    assert KILLED_PUTS in known  # the checkpoint recovery committed
    with wbcache.open(tmp_path / "cache") as cache:
        assert {cache.get(f"k{i}") for i in range(PUTS_PER_ROUND)} == {"r3" + "x" * 50}


@pytest.mark.parametrize(("mutation", "rules", "in_recovery"), [
    ("sync-off", {"db-not-synced"}, True),
    ("metasync-off", {"db-not-synced"}, True),
    ("writemap-async", {"db-not-synced", "checkpoint-behind"}, True),
    # writemap alone msyncs with MS_SYNC, which may well be durable, but its stores are
    # invisible to strace: the checker refuses what it cannot prove.
    ("writemap", {"db-not-synced", "checkpoint-behind"}, True),
    ("delete-before-commit", {"checkpoint-behind"}, False),
    # At open, the new segment's creation fsyncs DIR/wal after recovery's unlinks and before
    # open returns: those unlinks ARE durable, and the checker rightly says nothing.
    ("wal-dir-fsync-dropped", {"wal-dir-not-synced"}, False),
    ("db-dir-fsync-dropped", {"db-dir-not-synced"}, True),
])
def test_the_checker_catches_a_database_or_log_that_is_not_durable_first(
        tmp_path: Path, mutation: str, rules: set[str], in_recovery: bool) -> None:
    report = _traced_run(tmp_path, mutation)

    assert report.segment_unlinks > 0
    assert report.rules() == rules, "\n".join(map(str, report.violations))
    phases = {violation.phase for violation in report.violations}
    # "" is recovery at open (before its acknowledgement); every mutation is also caught
    # once the cache runs.
    assert ("" in phases) == in_recovery, phases
    assert phases - {""}, phases


def test_the_cache_opens_lmdb_with_sync_and_metasync_and_without_writemap(
        tmp_path: Path) -> None:
    with wbcache.open(tmp_path / "cache") as cache:
        flags = cache._backend.database.env.flags()  # type: ignore[attr-defined]
    assert (flags["sync"], flags["metasync"]) == (True, True)
    assert (flags["writemap"], flags["map_async"]) == (False, False)


# Hand-written logs: thread 101 (a thread of 100, through the clone) writes data.mdb through
# the descriptors 100 opened; 100 syncs and unlinks. Does the order prove the write durable?
_HEAD = (
    '100 openat(AT_FDCWD</>, "{c}/db/data.mdb", O_RDWR|O_CREAT, 0600) = 5<{c}/db/data.mdb>',
    '100 openat(AT_FDCWD</>, "{c}/db/data.mdb", O_WRONLY|O_DSYNC|O_CLOEXEC) = 6<{c}/db/data.mdb>',
    "100 fsync(7<{c}/db>) = 0",
    "100 clone3({{flags=CLONE_VM|CLONE_FILES|CLONE_THREAD, child_tid=0x7f}} => "
    "{{parent_tid=[101]}}, 88) = 101",
)
_WRITE = '101 pwrite64(5<{c}/db/data.mdb>, ""..., 4096, 8192'
_SYNC = "100 fdatasync(5<{c}/db/data.mdb>"
_UNLINK = '100 unlink("{c}/wal/00000000000000000001.log") = 0'
_TAIL = ("100 fsync(8<{c}/wal>) = 0",)


@pytest.mark.parametrize(("body", "durable"), [
    ((_WRITE + ") = 4096", _SYNC + ") = 0", _UNLINK), True),
    ((_WRITE + " <unfinished ...>", "101 <... pwrite64 resumed>) = 4096", _SYNC + ") = 0",
      _UNLINK), True),
    # the sync began before the write returned: it need not cover it
    ((_WRITE + " <unfinished ...>", _SYNC + " <unfinished ...>",
      "101 <... pwrite64 resumed>) = 4096", "100 <... fdatasync resumed>) = 0", _UNLINK), False),
    # the unlink began before the sync returned
    ((_WRITE + ") = 4096", "101 fdatasync(5<{c}/db/data.mdb> <unfinished ...>", _UNLINK,
      "101 <... fdatasync resumed>) = 0"), False),
    ((_WRITE + ") = 4096", _SYNC + ") = -1 EIO (Input/output error)", _UNLINK), False),
    ((_WRITE + ") = 4096", _UNLINK), False),
    # the meta page through the O_DSYNC descriptor needs no sync (LMDB with metasync)...
    (('101 pwrite64(6<{c}/db/data.mdb>, ""..., 120, 4128) = 120', _UNLINK), True),
    # ...through the plain one it does (LMDB with metasync=False)
    (('101 pwrite64(5<{c}/db/data.mdb>, ""..., 120, 4128) = 120', _UNLINK), False),
])
def test_a_database_write_is_durable_only_if_a_sync_begun_after_it_returned_before_the_unlink(
        body: tuple[str, ...], durable: bool) -> None:
    log = [line.format(c="/c") + "\n" for line in (*_HEAD, *body, *_TAIL)]
    report = check_syscall_order(log, "/c", checkpoint_before=10**6)

    assert report.segment_unlinks == 1 and report.db_writes == 1
    assert ("db-not-synced" in report.rules()) == (not durable), report.violations
