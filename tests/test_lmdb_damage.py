"""A damaged embedded database (DIR/db/data.mdb): a page zeroed, the file cut short or emptied.

The library raises `DatabaseError` naming the file (raised from LMDB's own error), the commands
print one `Error:` line and exit 1, no process dies of a signal, and the log keeps every
acknowledged write. Opens and commands run in child processes where the damage could kill
the process (LMDB maps the file: a page read past a cut-short end is a SIGBUS), so that a
crash fails the test instead of the test run.
"""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import lmdb
import pytest
from cli_support import assert_one_line_error, run, tree_state

import wbcache
from wbcache.backends import lmdb_file
from wbcache.backends.lmdb_file import check_data_file
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

OPEN_IN_CHILD = textwrap.dedent("""
    import json, sys, wbcache
    try:
        wbcache.open(sys.argv[1]).close()
        print(json.dumps(None))
    except Exception as exc:
        cause = exc.__cause__
        print(json.dumps([type(exc).__name__, str(exc),
                          None if cause is None else type(cause).__name__]))
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


def one_meta_page() -> bytes:
    """LMDB's first meta page of a database of 4 KiB pages, alone."""
    page = bytearray(4096)
    struct.pack_into("@NHHI", page, 0, 0, 0, 0x08, 0)  # a page header: P_META
    struct.pack_into("@II", page, 16, 0xBEEFC0DE, 1)  # magic, version
    struct.pack_into("@I", page, 40, 4096)  # the free database's pad: the page size
    return bytes(page)


def open_in_child(path: Path) -> Any:
    """`wbcache.open(path)` in a child: None if it opened, else [error type, message, type of
    its __cause__]. A child killed by a signal fails the test, naming the signal."""
    child = subprocess.run([sys.executable, "-c", OPEN_IN_CHILD, str(path)],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, (child.returncode, child.stderr)
    return json.loads(child.stdout)


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


def flip_last_page_top_bit(path: Path) -> None:
    """Flip the top bit of `mm_last_pg` (offset 136 of a meta page, after the page header and
    two MDB_db records) in the newer meta page (`mm_txnid`, offset 144, the larger)."""
    with open(data_file(path), "r+b") as file:
        pages = file.read(2 * 4096)
        newest = max((0, 1), key=lambda page: struct.unpack_from("<Q", pages, page * 4096 + 144))
        at = newest * 4096 + 136 + 7
        file.seek(at)
        file.write(bytes((pages[at] ^ 0x80,)))
        file.flush()
        os.fsync(file.fileno())


@pytest.mark.parametrize("command", [None, "verify", "stats", "recover", "inspect", "dump"])
def test_a_meta_page_claiming_more_than_its_map_is_database_error_not_lmdbs(
        cache_with_log: Path, command: str | None) -> None:
    # LMDB's open raised MapResizedError, which lmdb_errors lets through for the map growth
    # it handles: a raw lmdb error from open, a traceback from every command.
    flip_last_page_top_bit(cache_with_log)
    wal_before = tree_state(cache_with_log / "wal")

    if command is None:
        failure = open_in_child(cache_with_log)
        assert failure is not None and failure[0] == "DatabaseError", failure
        assert str(data_file(cache_with_log)) in failure[1] and "damaged" in failure[1]
        assert failure[2] == "MapResizedError"
    else:
        result = run("script", command, str(cache_with_log))
        assert_one_line_error(result, 1, str(data_file(cache_with_log)), "damaged")
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


# ---------------------------------------------------------------- cut short, or empty


def test_a_truncated_data_mdb_is_refused_by_open_naming_it_and_changing_nothing(
        cache_with_log: Path) -> None:
    os.truncate(data_file(cache_with_log), 8192)
    before = tree_state(cache_with_log)

    refused = open_in_child(cache_with_log)

    assert refused is not None and refused[0] == "DatabaseError", refused
    assert str(data_file(cache_with_log)) in refused[1]
    assert "8,192 bytes" in refused[1] and "cut short" in refused[1]
    assert "nothing was changed" in refused[1]
    assert tree_state(cache_with_log) == before  # lock.mdb too: refused before LMDB opened
    assert_log_holds_the_acknowledged_writes(cache_with_log)


@pytest.mark.parametrize("command", ["verify", "stats", "recover", "inspect"])
def test_a_truncated_data_mdb_is_one_error_line_from_each_command(cache_with_log: Path,
                                                                  command: str) -> None:
    os.truncate(data_file(cache_with_log), 8192)
    before = tree_state(cache_with_log)

    result = run("script", command, str(cache_with_log))  # a SIGBUS: exit -7, not 1

    assert_one_line_error(result, 1, str(data_file(cache_with_log)), "cut short")
    assert tree_state(cache_with_log) == before
    assert_log_holds_the_acknowledged_writes(cache_with_log)


def test_an_empty_data_mdb_under_a_flushed_log_is_refused_as_the_gap_it_is(
        cache_with_log: Path) -> None:
    # Empty, it reads as a database never made: checkpoint 0, while the log starts past
    # the records flushed into it. Refused, naming them; the log keeps the rest.
    os.truncate(data_file(cache_with_log), 0)

    refused = open_in_child(cache_with_log)

    assert refused is not None and refused[0] == "CorruptLogError", refused
    assert f"records 1..{FLUSHED} are missing (database checkpoint 0)" in refused[1]
    assert_log_holds_the_acknowledged_writes(cache_with_log)
    for command in ("verify", "recover"):  # was "Bad file descriptor"
        result = run("script", command, str(cache_with_log))
        assert result.exit_code == 1, result.stdout + result.stderr
        assert f"records 1..{FLUSHED} are missing" in result.stdout + result.stderr
        assert "Traceback" not in result.stdout + result.stderr


def test_an_empty_data_mdb_of_a_first_open_cut_short_is_made_anew(tmp_path: Path) -> None:
    # LMDB writes a new database's meta pages without an fsync: a power cut during the
    # first open can leave data.mdb empty under a log of acknowledged writes from LSN 1.
    # Nothing was ever flushed into it, so the next open makes it and replays the log.
    path = tmp_path / "cache"
    child = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path), str(LOGGED)],
                           capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr
    os.truncate(data_file(path), 0)

    verified = run("script", "verify", str(path))
    assert verified.exit_code == 0, verified.stdout + verified.stderr
    assert open_in_child(path) is None
    with wbcache.open(path) as cache:
        assert [cache.get(f"logged{i:04d}") for i in range(LOGGED)] == list(range(LOGGED))


def test_a_data_mdb_without_meta_pages_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "db"
    db.mkdir(mode=0o700)
    (db / "data.mdb").write_bytes(b"not lmdb" * 1024)
    with pytest.raises(wbcache.DatabaseError, match="does not start with an LMDB meta page"):
        check_data_file(str(db))
    # one meta page, then nothing where the second belongs
    (db / "data.mdb").write_bytes(one_meta_page() + bytes(4096))
    with pytest.raises(wbcache.DatabaseError, match="no LMDB meta page at page 1"):
        check_data_file(str(db))


def test_an_unfinished_data_mdb_is_left_to_lmdb_where_another_process_may_be_making_it(
        tmp_path: Path) -> None:
    # The processes opening a new shared directory at once: one makes data.mdb (under LMDB's
    # lock), another may see it empty, or with its first meta page only, for a moment.
    db = tmp_path / "db"
    db.mkdir(mode=0o700)
    (db / "data.mdb").write_bytes(b"")
    check_data_file(str(db), others_create=True)
    check_data_file(str(db))  # empty: never made durable, made anew (module docstring)
    (db / "data.mdb").write_bytes(one_meta_page())
    check_data_file(str(db), others_create=True)
    with pytest.raises(wbcache.DatabaseError, match="no LMDB meta page at page 1"):
        check_data_file(str(db))
    # both metas land in one write, which may come between the reads of the pages and of
    # the size: 8 KiB then, no meta found (a review: 1 refusal in 12,000 racing opens)
    (db / "data.mdb").write_bytes(bytes(8192))
    check_data_file(str(db), others_create=True)
    with pytest.raises(wbcache.DatabaseError, match="does not start with an LMDB meta page"):
        check_data_file(str(db))


def test_a_new_directory_and_a_shared_one_still_open(tmp_path: Path) -> None:
    for shared in (False, True):
        path = tmp_path / f"new-{shared}"
        cache = wbcache.open(path, shared=shared)
        cache.put("k", 1)
        cache.close()
        check_data_file(str(path / "db"))  # what LMDB made passes
        cache = wbcache.open(path, shared=shared)
        assert cache.get("k") == 1
        cache.close()


def _meta_end(db: Path) -> int:
    """Bytes up to the end of the last page the newer meta page counts (`mm_last_pg`)."""
    layout = lmdb_file._META  # after the page header
    metas = []
    with open(db / "data.mdb", "rb") as file:
        for page in (0, 1):
            file.seek(page * 4096 + lmdb_file._PAGE_HEADER.size)
            meta = layout.unpack(file.read(layout.size))
            metas.append((meta[-1], (meta[-2] + 1) * meta[4]))
    return max(metas)[1]


def test_a_sound_file_shorter_than_its_last_page_opens(tmp_path: Path) -> None:
    # LMDB counts pages a write transaction allocated and freed again ("loose") in the meta's
    # last page but never writes them: a cache that puts, deletes and flushes can close with
    # data.mdb ending before that page. Checked against it, such caches were refused at
    # their next open as "cut short" (a review found 5 of 7 seeds so).
    for seed in range(1, 17):
        path = tmp_path / f"seed{seed}"
        chance, live = random.Random(seed), set()
        with wbcache.open(path, fsync="interval") as cache:
            for _ in range(6):
                for _ in range(chance.randint(50, 2000)):
                    key = chance.randint(0, 20000)
                    cache.put(f"a{key:06d}", "v" * chance.choice([10, 100, 300]))
                    live.add(key)
                for key in chance.sample(sorted(live), min(len(live), chance.randint(0, 3000))):
                    cache.delete(f"a{key:06d}")
                    live.discard(key)
                cache.flush()
        if data_file(path).stat().st_size < _meta_end(path / "db"):
            break
    else:
        pytest.fail("no seed left data.mdb shorter than its last page: the case is not tested")

    assert run("script", "verify", str(path)).exit_code == 0
    with wbcache.open(path) as cache:
        assert set(cache.keys()) == {f"a{key:06d}" for key in live}
