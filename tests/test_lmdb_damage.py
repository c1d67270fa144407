"""A damaged embedded database (DIR/db/data.mdb): a page zeroed.

The library raises `DatabaseError` naming the file (raised from LMDB's own error), the commands
print one `Error:` line and exit 1, and the log keeps every acknowledged write. Commands run
in child processes, so that one killed by the damage fails the test instead of the test run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import lmdb
import pytest
from cli_support import assert_one_line_error, run, tree_state

import wbcache
from wbcache.recovery.verify import survey_log

FLUSHED = 150  # keys flushed into the database (LSNs 1..150)
LOGGED = 300  # acknowledged writes only in the log (LSNs 151..450) when the writer was killed

KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys, wbcache
    cache = wbcache.open(sys.argv[1], flush_interval=3600)
    for i in range(int(sys.argv[2])):
        cache.put(f"logged{i:04d}", i)
    os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.fixture
def cache_with_log(tmp_path: Path) -> Path:
    """A directory whose database holds FLUSHED keys and whose log holds LOGGED more, their
    writer killed before it flushed them."""
    path = tmp_path / "cache"
    cache = wbcache.open(path)
    for i in range(FLUSHED):
        cache.put(f"flushed{i:04d}", "v" * 100)
    cache.flush()
    cache.close()
    child = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path), str(LOGGED)],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert_log_holds_the_acknowledged_writes(path)
    return path


def assert_log_holds_the_acknowledged_writes(path: Path) -> None:
    survey = survey_log(str(path / "wal"), FLUSHED)
    assert not survey.problems
    assert survey.pending == LOGGED and survey.last_lsn == FLUSHED + LOGGED


def data_file(path: Path) -> Path:
    return path / "db" / "data.mdb"


def meta_root_page(path: Path) -> int:
    """The page holding the checkpoints' database (its root, a leaf), read by LMDB in a child
    process: a process may open an environment only once, and the cache may hold it here.
    A named database's record in LMDB's main database is its `MDB_db`; the root is its last
    field."""
    code = ("import lmdb, struct, sys\n"
            "env = lmdb.open(sys.argv[1], readonly=True, lock=False, max_dbs=3)\n"
            "with env.begin() as txn:\n"
            "    print(struct.unpack_from('@N', txn.get(b'meta'), 40)[0])\n")
    child = subprocess.run([sys.executable, "-c", code, str(path / "db")],
                           capture_output=True, text=True, timeout=60, check=True)
    return int(child.stdout)


def zero_page(path: Path, page: int) -> None:
    with open(data_file(path), "r+b") as file:
        file.seek(page * 4096)
        file.write(bytes(4096))
        file.flush()
        os.fsync(file.fileno())


# ---------------------------------------------------------------- a zeroed page


def test_a_zeroed_page_makes_open_raise_database_error_from_lmdbs(
        cache_with_log: Path) -> None:
    zero_page(cache_with_log, meta_root_page(cache_with_log))
    wal_before = tree_state(cache_with_log / "wal")

    with pytest.raises(wbcache.DatabaseError) as raised:
        wbcache.open(cache_with_log)

    assert str(data_file(cache_with_log)) in str(raised.value)
    assert "MDB_CORRUPTED" in str(raised.value)
    assert isinstance(raised.value.__cause__, lmdb.CorruptedError)
    assert tree_state(cache_with_log / "wal") == wal_before
    assert_log_holds_the_acknowledged_writes(cache_with_log)


@pytest.mark.parametrize("command", ["verify", "stats", "recover", "inspect", "dump"])
def test_a_zeroed_page_is_one_error_line_from_each_command(cache_with_log: Path,
                                                           command: str) -> None:
    zero_page(cache_with_log, meta_root_page(cache_with_log))
    wal_before = tree_state(cache_with_log / "wal")

    result = run("script", command, str(cache_with_log))

    assert_one_line_error(result, 1, str(data_file(cache_with_log)), "MDB_CORRUPTED")
    assert tree_state(cache_with_log / "wal") == wal_before
    assert_log_holds_the_acknowledged_writes(cache_with_log)


def test_a_flush_into_a_damaged_database_fails_as_database_error_and_the_log_keeps_it(
        tmp_path: Path) -> None:
    path = tmp_path / "cache"
    cache = wbcache.open(path, flush_interval=3600, flush_timeout=0.3)
    try:
        cache.put("before", 1)
        cache.flush()
        zero_page(path, meta_root_page(path))  # the page the flush writes the checkpoint to
        cache.put("after", 2)

        with pytest.raises(wbcache.FlushError) as raised:
            cache.flush(timeout=0.3)
        assert isinstance(raised.value.__cause__, wbcache.DatabaseError)
        assert isinstance(raised.value.__cause__.__cause__, lmdb.CorruptedError)
        assert cache.get("after") == 2
    finally:
        with pytest.raises(wbcache.FlushError):  # its final flush fails the same way
            cache.close()
    survey = survey_log(str(path / "wal"), 1)
    assert survey.pending == 1 and survey.last_lsn == 2  # "after", still in the log
