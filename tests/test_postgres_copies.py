"""A copy of a directory that flushes into a shared PostgreSQL table (`cp -a`: the same
cache_id) is refused once its original has flushed, instead of taking the original's
checkpoint for its own and dropping its unflushed writes as flushed: the checkpoint tokens
(wbcache/backends/postgres.py, wbcache/layout.py `TokenFile`). Also: the token column is added
to tables made before it, and the way out the error gives for a directory restored from a
backup works as written. About 600 lines: every order in which a directory, its copy, a
lost COMMIT, an interrupt and a table made before tokens can meet sits beside the others,
so a case the tokens miss shows."""

from __future__ import annotations

import errno
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psycopg
import pytest
from cli_support import assert_one_line_error, pg_url, run
from controlled import wait_until
from pg_support import (  # noqa: F401 (fixtures)
    OpenCache,
    TcpProxy,
    open_pg_fixture,
    pg_dsn_fixture,
    pg_proxy_fixture,
    pg_schema_fixture,
    query,
    table_fixture,
    value_of,
)

import wbcache
from wbcache import FlushError
from wbcache.backends.postgres import CheckpointConflictError, PostgresBackend, PostgresError
from wbcache.layout import Layout, TokenFile

# A copy's own writes, acknowledged, then kill -9 before any flush.
COPY_WRITER = textwrap.dedent("""
    import os, signal, sys, wbcache
    from wbcache.backends.postgres import PostgresBackend
    path, dsn, table = sys.argv[1:4]
    cache = wbcache.open(path, backend=PostgresBackend(dsn, table=table), flush_interval=3600,
                         flush_threshold=10**9)
    for i in range(20):
        cache.put(f"copy:{i}", i)
    print("acked", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.fixture(name="open_quiet")
def open_quiet_fixture(open_pg: OpenCache) -> OpenCache:
    """`open_pg` with the flusher held off: flushes happen where the test says."""
    return lambda name, **options: open_pg(name, flush_interval=3600, flush_threshold=10**9,
                                           **options)


def copy_dir(source: Path, target: Path) -> None:
    subprocess.run(["cp", "-a", str(source), str(target)], check=True)


def log_bytes(path: Path) -> dict[str, bytes]:
    return {entry.name: entry.read_bytes() for entry in sorted((path / "wal").iterdir())}


def test_a_copy_is_refused_once_its_original_flushed_past_its_writes_and_keeps_them(
        tmp_path: Path, pg_dsn: str, table: str, open_quiet: OpenCache) -> None:
    original = open_quiet("a")
    original.put("base", 0)
    original.flush()
    copy_dir(tmp_path / "a", tmp_path / "b")
    # The copy runs (the stored checkpoint is still one both know), acknowledges writes
    # of its own and is killed before it flushes them.
    child = subprocess.run([sys.executable, "-c", COPY_WRITER, str(tmp_path / "b"), pg_dsn,
                            table], capture_output=True, text=True, timeout=60)
    assert child.returncode == -signal.SIGKILL and child.stdout == "acked\n", child.stderr
    # The original writes more than the copy did, and flushes past the copy's LSNs.
    for i in range(40):
        original.put(f"original:{i}", i)
    original.flush()
    kept = log_bytes(tmp_path / "b")
    assert b"copy:19" in b"".join(kept.values())

    with pytest.raises(CheckpointConflictError, match=r"written by another directory with the "
                                                      r"same cache_id.*nothing was replayed"):
        open_quiet("b")
    assert log_bytes(tmp_path / "b") == kept  # the copy's acknowledged writes are all there
    assert query(pg_dsn, f"SELECT count(*) FROM {table} WHERE key >= %s AND key < %s",
                 (b"scopy:", b"scopy;")) == [(0,)]
    # The original is not disturbed: it goes on flushing, and reopens.
    original.put("after", 1)
    original.flush()
    original.close()
    with open_quiet("a") as again:
        assert again.get("after") == 1 and again.recovery.replayed == 0


def test_a_copy_made_while_a_flush_was_failing_is_refused_after_that_flush_commits(
        tmp_path: Path, pg_dsn: str, table: str, open_quiet: OpenCache) -> None:
    """The token a flush writes is saved in the directory before it is sent, so a copy made
    while it is unanswered (or failing) has it too: only the directory that saved it may
    take it for its own (the file records that directory's inode)."""
    original = open_quiet("a", backend_options={"timeout": 1.0}, flush_timeout=2.0)
    original.put("held", 0)
    original.flush()
    with psycopg.connect(pg_dsn) as blocker:  # holds the row: the next flush times out
        blocker.execute(f"SELECT 1 FROM {table} WHERE key = %s FOR UPDATE", (b"sheld",))
        original.put("held", 1)
        with pytest.raises(FlushError):
            original.flush()
        copy_dir(tmp_path / "a", tmp_path / "b")
    original.flush()  # the same token, from the same stored one: it commits now
    original.close()
    with pytest.raises(CheckpointConflictError, match="written by another directory"):
        open_quiet("b")
    with open_quiet("a") as again:  # and the directory that saved it opens, whatever it finds
        assert again.get("held") == 1


# Killed at a step of the token's life: "sent" after the pending token is saved, before the
# flush is sent; "committed" between the commit and the token's save as known.
KILLED_AT = textwrap.dedent("""
    import os, signal, sys, wbcache
    from wbcache.backends.postgres import PostgresBackend
    from wbcache.layout import TokenFile
    path, dsn, table, step = sys.argv[1:5]
    save = TokenFile.save
    saves = []

    def save_then_die(self, known, pending):
        saves.append(pending)
        if step == "committed" and len(saves) == 4:  # the 2nd flush's known save
            os.kill(os.getpid(), signal.SIGKILL)
        save(self, known, pending)
        if step == "sent" and len(saves) == 3:  # the 2nd flush's pending save
            os.kill(os.getpid(), signal.SIGKILL)

    TokenFile.save = save_then_die
    cache = wbcache.open(path, backend=PostgresBackend(dsn, table=table), flush_interval=3600,
                         flush_threshold=10**9)
    for round in range(3):
        cache.put("n", round)
        cache.flush()
""")


@pytest.mark.parametrize("step", ["sent", "committed"])
@pytest.mark.parametrize("remount", [False, True])
def test_the_original_killed_around_a_commit_reopens(
        tmp_path: Path, pg_dsn: str, table: str, open_quiet: OpenCache, step: str,
        remount: bool) -> None:
    """Killed with its new token saved but not sent, or committed but not yet saved as known:
    the directory finds the stored token among its own, even if its file system comes back
    with another device number (a remount: NFS, overlayfs, a re-attached volume)."""
    path = tmp_path / "a"
    child = subprocess.run([sys.executable, "-c", KILLED_AT, str(path), pg_dsn, table, step],
                           capture_output=True, text=True, timeout=60)
    assert child.returncode == -signal.SIGKILL, child.stderr
    token_file = path / "checkpoint_token"
    known, pending = token_file.read_text().splitlines()
    assert pending.split()[1] != "-"  # the window: the token saved as pending only
    if remount:
        fields = pending.split()
        fields[2] = str(int(fields[2]) + 1)
        token_file.write_text(f"{known}\n{' '.join(fields)}\n")
    with open_quiet("a") as cache:
        assert cache.get("n") == 1
        cache.put("n", 5)
    with open_quiet("a") as cache:
        assert cache.get("n") == 5


def test_a_token_not_saved_as_known_after_its_commit_is_still_the_directory_s(
        tmp_path: Path, open_quiet: OpenCache, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The window between a flush's commit and its token's save as known (a crash there, or a
    full disk): the directory that saved the token as pending takes it for its own."""
    save = TokenFile.save

    def no_space_once_committed(self: TokenFile, known: str | None,
                                pending: str | None) -> None:
        if pending is None:
            raise OSError(errno.ENOSPC, "No space left on device")
        save(self, known, pending)

    monkeypatch.setattr(TokenFile, "save", no_space_once_committed)
    with open_quiet("a") as cache:
        cache.put("k", 1)
        cache.flush()  # done, though its token stays saved as pending only
        assert Layout(str(tmp_path / "a")).tokens().read()[1] is not None
    assert "could not record the checkpoint token" in caplog.text
    monkeypatch.undo()
    with open_quiet("a") as cache:
        assert cache.get("k") == 1 and cache.recovery.replayed == 0
        cache.put("k", 2)
    with open_quiet("a") as cache:
        assert cache.get("k") == 2


def test_a_restored_directory_opens_once_the_token_is_cleared_as_the_error_says(
        tmp_path: Path, pg_dsn: str, table: str, open_quiet: OpenCache) -> None:
    with open_quiet("a") as cache:
        cache.put("k", "old")
    copy_dir(tmp_path / "a", tmp_path / "backup")
    with open_quiet("a") as cache:
        cache.put("k", "new")
    subprocess.run(["rm", "-rf", str(tmp_path / "a")], check=True)
    (tmp_path / "backup").rename(tmp_path / "a")
    with pytest.raises(CheckpointConflictError) as refused:
        open_quiet("a")
    statement = re.search(r"UPDATE \S+ SET token = NULL WHERE cache_id = '[0-9a-f]+'",
                          str(refused.value))
    assert statement is not None, refused.value
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(statement.group(0).encode())
    with open_quiet("a") as cache:
        assert cache.get("k") == "new"  # the database's: the restored log held nothing newer
        cache.put("k", "after")
    with open_quiet("a") as cache:
        assert cache.get("k") == "after"


@pytest.mark.parametrize("driver", ["runner", "script"])
def test_recover_of_a_copy_is_refused_in_one_line(tmp_path: Path, pg_dsn: str, pg_schema: str,
                                                  open_quiet: OpenCache, driver: str) -> None:
    with open_quiet("a") as cache:
        cache.put("k", 1)
        copy_dir(tmp_path / "a", tmp_path / "b")
        cache.put("k", 2)
    kept = log_bytes(tmp_path / "b")
    url = pg_url(pg_dsn, f"{pg_schema}.wbcache")
    result = run(driver, "recover", str(tmp_path / "b"), env={"WBCACHE_BACKEND": url})
    assert_one_line_error(result, 1, "written by another directory with the same cache_id")
    assert log_bytes(tmp_path / "b") == kept


def test_a_table_made_before_tokens_gets_the_column_and_a_reader_does_without(
        tmp_path: Path, pg_dsn: str, pg_schema: str) -> None:
    old = f"{pg_schema}.old"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:  # the tables of wbcache 0.1
        conn.execute(f"CREATE TABLE {old} (key bytea PRIMARY KEY, num bigint, value bytea, "
                     f"CHECK ((num IS NULL) <> (value IS NULL)))")
        conn.execute(f"CREATE TABLE {old}_checkpoints (cache_id text PRIMARY KEY, lsn bigint "
                     f"NOT NULL, updated_at timestamptz NOT NULL DEFAULT now())")
        conn.execute(f"INSERT INTO {old}_checkpoints (cache_id, lsn) VALUES ('x', 5)")
    reader = PostgresBackend(pg_dsn, table=old, cache_id="x", create_tables=False)
    try:  # no column, and not allowed to add it: read and write without tokens
        assert reader.checkpoint() == 5
        reader.apply([], [], 6)
        assert reader.checkpoint() == 6
    finally:
        reader.close()
    assert "token" not in dict(query(pg_dsn, "SELECT attname, 1 FROM pg_attribute WHERE "
                                             f"attrelid = '{old}_checkpoints'::regclass"))
    path = tmp_path / "a"
    with wbcache.open(path, backend=PostgresBackend(pg_dsn, table=old)) as cache:
        cache.put("k", 1)
    rows = query(pg_dsn, f"SELECT cache_id, lsn, token FROM {old}_checkpoints "
                         f"WHERE cache_id <> 'x'")
    assert len(rows) == 1 and rows[0][1] >= 1 and rows[0][2] is not None
    assert Layout(str(path)).tokens().read() == (rows[0][2], None)  # saved once committed


def test_a_backend_used_without_a_directory_clears_the_token_and_the_directory_takes_it(
        tmp_path: Path, pg_dsn: str, table: str, open_quiet: OpenCache) -> None:
    with open_quiet("a") as cache:
        cache.put("k", 1)
        cache_id = Layout(str(tmp_path / "a")).cache_id()
    alone = PostgresBackend(pg_dsn, table=table, cache_id=cache_id)
    try:
        checkpoint = alone.checkpoint()
        alone.apply([], [], checkpoint + 1)
    finally:
        alone.close()
    assert query(pg_dsn, f"SELECT token FROM {table}_checkpoints WHERE cache_id = %s",
                 (cache_id,)) == [(None,)]
    with open_quiet("a") as cache:
        assert cache.get("k") == 1
        cache.put("k", 2)


def test_a_directory_reopened_by_a_url_without_its_schema_gets_the_column_and_refuses_a_copy(
        tmp_path: Path, pg_dsn: str, pg_schema: str) -> None:
    """DIR/backend records the table with its schema, so a reopen by a URL naming it without
    (the documented default) makes its backend with create_tables=False: the column is added
    at the first flush, not with the tables, or the table of an upgraded node stayed
    tokenless and its copies went on dropping writes."""
    url = pg_url(pg_dsn, "wbcache") + f"&options=-csearch_path%3D{pg_schema}"
    a, b = tmp_path / "a", tmp_path / "b"
    with wbcache.open(a, backend=url) as cache:
        cache.put("base", 0)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:  # the table as 0.1 made it
        conn.execute(f"ALTER TABLE {pg_schema}.wbcache_checkpoints DROP COLUMN token")
    original = wbcache.open(a, backend=url, flush_interval=3600, flush_threshold=10**9)
    try:
        original.put("base", 1)
        original.flush()
        assert query(pg_dsn, f"SELECT token IS NOT NULL FROM {pg_schema}.wbcache_checkpoints"
                     ) == [(True,)]
        copy_dir(a, b)
        child = subprocess.run([sys.executable, "-c", COPY_WRITER, str(b), pg_dsn,
                                f"{pg_schema}.wbcache"], capture_output=True, text=True,
                               timeout=60)
        assert child.returncode == -signal.SIGKILL, child.stderr
        for i in range(40):
            original.put(f"original:{i}", i)
        original.flush()
    finally:
        original.close()
    with pytest.raises(CheckpointConflictError, match="written by another directory"):
        wbcache.open(b, backend=url)


def test_a_column_that_cannot_be_added_leaves_the_flushes_tokenless_and_exactly_once(
        tmp_path: Path, pg_dsn: str, pg_schema: str, pg_proxy: TcpProxy,
        caplog: pytest.LogCaptureFixture) -> None:
    """The ALTER waits past `timeout` (another session holds the table; a role that may not
    alter it fails the same way): the open goes on as before tokens, says so, and a lost
    answer that committed is settled, not refused for the token it could not write."""
    old = f"{pg_schema}.old"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {old} (key bytea PRIMARY KEY, num bigint, value bytea, "
                     f"CHECK ((num IS NULL) <> (value IS NULL)))")
        conn.execute(f"CREATE TABLE {old}_checkpoints (cache_id text PRIMARY KEY, lsn bigint "
                     f"NOT NULL, updated_at timestamptz NOT NULL DEFAULT now())")
    directory = tmp_path / "d"
    directory.mkdir(mode=0o700)
    backend = PostgresBackend(pg_proxy.dsn, table=old, timeout=1.0)
    truth = PostgresBackend(pg_dsn, table=old, cache_id="x")
    try:
        backend.attach("x", TokenFile(str(directory)))
        with psycopg.connect(pg_dsn) as holder:  # an open transaction that read the table
            holder.execute(f"SELECT * FROM {old}_checkpoints")
            backend.apply([], [], 1, [("n", 5)])
        assert "cannot be told from a copy" in caplog.text and "ADD COLUMN" in caplog.text
        pg_proxy.swallow_commit_reply()
        with pytest.raises(PostgresError) as lost:
            backend.apply([], [], 2, [("n", 3)])
        assert lost.value.ambiguous and truth.checkpoint() == 2  # it committed
        backend.apply([], [], 3, [("n", 3 + 4)])  # the retry, merged with a newer delta
        assert value_of(truth, "n") == 12 and truth.checkpoint() == 3
    finally:
        backend.close()
        truth.close()


@pytest.mark.parametrize("where", ["after the commit", "while settling a lost answer"])
def test_an_interrupt_while_the_token_is_saved_counts_every_increment_once(
        tmp_path: Path, pg_dsn: str, pg_schema: str, pg_proxy: TcpProxy,
        monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """Ctrl-C in the token's save as known, after its flush committed: the flush is settled
    as a lost answer is, so the batch sent again adds nothing twice, and is not refused."""
    directory = tmp_path / "d"
    directory.mkdir(mode=0o700)
    backend = PostgresBackend(pg_proxy.dsn, table=f"{pg_schema}.t")
    truth = PostgresBackend(pg_dsn, table=f"{pg_schema}.t", cache_id="x")
    save = TokenFile.save
    armed = [False]

    def interrupted(self: TokenFile, known: str | None, pending: str | None) -> None:
        if pending is None and armed[0]:
            armed[0] = False
            signal.raise_signal(signal.SIGINT)
        save(self, known, pending)

    monkeypatch.setattr(TokenFile, "save", interrupted)
    try:
        backend.attach("x", TokenFile(str(directory)))
        backend.apply([], [], 1, [("n", 5)])
        if where == "while settling a lost answer":
            pg_proxy.swallow_commit_reply()
            with pytest.raises(PostgresError):
                backend.apply([], [], 2, [("n", 3)])
        armed[0] = True
        with pytest.raises(KeyboardInterrupt):
            backend.apply([], [], 2, [("n", 3)])
        assert not armed[0] and truth.checkpoint() == 2  # interrupted; it had committed
        backend.apply([], [], 2, [("n", 3)])  # the flusher sends the same batch again
        backend.apply([], [], 3, [("n", 1)])
        assert value_of(truth, "n") == 9 and truth.checkpoint() == 3
    finally:
        backend.close()
        truth.close()


def test_a_command_reading_beside_the_live_cache_is_not_refused_when_a_flush_lands_between(
        tmp_path: Path, pg_dsn: str, table: str, open_quiet: OpenCache,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`stats` or `inspect` beside the live cache reads the stored token, then the
    directory's file: a flush that commits and saves its token as known in between left
    the reader with a token the file no longer holds, refused as a copy's."""
    cache = open_quiet("a")
    cache.put("k", 0)
    cache.flush()
    read = TokenFile.read
    flushed = []

    def flush_first(self: TokenFile) -> tuple[str | None, str | None]:
        if not flushed:  # the reader's first look at the file: a flush lands just before
            flushed.append(True)
            cache.put("k", len(flushed))
            cache.flush()
            cache.put("k", 2)
            cache.flush()
        return read(self)

    reader = PostgresBackend(pg_dsn, table=table)
    try:
        reader.attach(Layout(str(tmp_path / "a")).cache_id(),
                      Layout(str(tmp_path / "a")).tokens())
        monkeypatch.setattr(TokenFile, "read", flush_first)
        assert reader.checkpoint() == 3 and flushed
    finally:
        reader.close()


# ------------------------------------------------------------------ a second review's cases

def make_old_tables(dsn: str, old: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:  # the tables of wbcache 0.1
        conn.execute(f"CREATE TABLE {old} (key bytea PRIMARY KEY, num bigint, value bytea, "
                     f"CHECK ((num IS NULL) <> (value IS NULL)))")
        conn.execute(f"CREATE TABLE {old}_checkpoints (cache_id text PRIMARY KEY, lsn bigint "
                     f"NOT NULL, updated_at timestamptz NOT NULL DEFAULT now())")


def test_a_backend_made_before_the_column_was_added_still_refuses_a_copy(
        tmp_path: Path, pg_dsn: str, pg_schema: str) -> None:
    """The backend saw no token column when it was made; another open added it since. The
    copy's recovery reads the checkpoint before any flush (and replays nothing, the copy's
    LSNs being covered), so a check switched on only by a flush never ran."""
    old = f"{pg_schema}.old"
    make_old_tables(pg_dsn, old)
    early = PostgresBackend(pg_dsn, table=old)
    try:
        with wbcache.open(tmp_path / "a", backend=PostgresBackend(pg_dsn, table=old),
                          flush_interval=3600, flush_threshold=10**9) as original:
            original.put("base", 0)
            original.flush()  # adds the column
            copy_dir(tmp_path / "a", tmp_path / "b")
            child = subprocess.run([sys.executable, "-c", COPY_WRITER, str(tmp_path / "b"),
                                    pg_dsn, old], capture_output=True, text=True, timeout=60)
            assert child.returncode == -signal.SIGKILL, child.stderr
            for i in range(40):
                original.put(f"original:{i}", i)
        kept = log_bytes(tmp_path / "b")
        with pytest.raises(CheckpointConflictError, match="written by another directory"):
            wbcache.open(tmp_path / "b", backend=early)
        assert log_bytes(tmp_path / "b") == kept
    finally:
        early.close()


def test_a_late_commit_of_the_last_open_after_recovery_read_the_checkpoint_adds_nothing_twice(
        tmp_path: Path, pg_dsn: str, pg_schema: str, pg_proxy: TcpProxy) -> None:
    """Records 1 (n += 5), 2 (n += 3), 3 (n += 1). The flush of record 2 loses its answer
    and its process is gone; the reopen's recovery reads checkpoint 1, then that COMMIT
    lands. Replaying records 2-3 from 2 added record 2's delta twice: the first flush now
    moves from what recovery read, is refused, and the next open replays only record 3."""
    table = f"{pg_schema}.t"
    directory = tmp_path / "d"
    directory.mkdir(mode=0o700)
    gone = PostgresBackend(pg_proxy.dsn, table=table, timeout=1.0)
    reopened = PostgresBackend(pg_dsn, table=table)
    truth = PostgresBackend(pg_dsn, table=table, cache_id="x")
    try:
        gone.attach("x", TokenFile(str(directory)))
        gone.apply([], [], 1, [("n", 5)])
        pg_proxy.hold_commit()
        with pytest.raises(PostgresError, match="no answer within") as lost:
            gone.apply([], [], 2, [("n", 3)])
        assert lost.value.ambiguous
        reopened.attach("x", TokenFile(str(directory)))
        assert reopened.checkpoint() == 1  # what recovery replays from
        pg_proxy.thaw()
        wait_until(lambda: truth.checkpoint() == 2, 10, "the late commit")
        with pytest.raises(CheckpointConflictError, match="stored checkpoint is 2"):
            reopened.apply([], [], 3, [("n", 3 + 1)])  # recovery's replay of records 2-3
        assert value_of(truth, "n") == 8
        reopened.attach("x", TokenFile(str(directory)))  # the next open
        assert reopened.checkpoint() == 2  # the late token is this directory's
        reopened.apply([], [], 3, [("n", 1)])
        assert value_of(truth, "n") == 9 and truth.checkpoint() == 3
    finally:
        gone.close()
        reopened.close()
        truth.close()


def test_a_failed_read_of_the_token_file_at_the_first_read_keeps_the_pending_token(
        tmp_path: Path, pg_dsn: str, pg_schema: str, pg_proxy: TcpProxy,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The reopen's first read meets an error reading DIR/checkpoint_token (EMFILE, EIO, an
    interrupt). Its state was set before that read, so the next flush saved a new pending
    token over the one a late COMMIT of the last open carries: that COMMIT then made the
    directory refuse itself."""
    table = f"{pg_schema}.t"
    directory = tmp_path / "d"
    directory.mkdir(mode=0o700)
    gone = PostgresBackend(pg_proxy.dsn, table=table, timeout=1.0)
    reopened = PostgresBackend(pg_dsn, table=table, timeout=10.0)
    try:
        gone.attach("x", TokenFile(str(directory)))
        gone.apply([], [], 1, [("n", 5)])
        pg_proxy.hold_commit()
        with pytest.raises(PostgresError, match="no answer within"):
            gone.apply([], [], 2, [("n", 3)])  # its COMMIT held: it lands later
        reopened.attach("x", TokenFile(str(directory)))
        read = TokenFile.read
        calls: list[str] = []

        def fails_second(self: TokenFile) -> tuple[str | None, str | None]:
            calls.append("read")
            if len(calls) == 2:  # after the ownership check: the pending token's read
                raise OSError(errno.EMFILE, "Too many open files")
            return read(self)

        monkeypatch.setattr(TokenFile, "read", fails_second)
        with pytest.raises(OSError, match="Too many open files"):
            reopened.checkpoint()
        monkeypatch.undo()
        failures: list[BaseException] = []

        def flush() -> None:  # waits for the row the held transaction locked
            try:
                reopened.apply([], [], 3, [("n", 3 + 1)])
            except BaseException as exc:  # noqa: BLE001 (reported below)
                failures.append(exc)

        flusher = threading.Thread(target=flush)
        flusher.start()
        wait_until(lambda: query(pg_dsn, "SELECT count(*) FROM pg_stat_activity WHERE "
                                         "wait_event_type = 'Lock' AND query LIKE %s",
                                 (f"%{pg_schema}%",))[0][0] > 0, 10, "the flush waiting")
        pg_proxy.thaw()  # the late COMMIT lands first
        flusher.join(30)
        assert [type(exc) for exc in failures] == [CheckpointConflictError]
        again = PostgresBackend(pg_dsn, table=table)
        try:
            again.attach("x", TokenFile(str(directory)))
            assert again.checkpoint() == 2  # not refused: the late token is still known
        finally:
            again.close()
    finally:
        gone.close()
        reopened.close()


def test_the_column_added_while_another_node_s_flush_holds_the_table_waits_briefly(
        tmp_path: Path, pg_dsn: str, pg_schema: str) -> None:
    """An ALTER queued behind another node's open transaction held up every read and flush
    of every node behind it, up to `timeout`: it now gives up after a moment and tries
    again later, and the other nodes never wait for it."""
    old = f"{pg_schema}.old"
    make_old_tables(pg_dsn, old)
    directory = tmp_path / "d"
    directory.mkdir(mode=0o700)
    migrating = PostgresBackend(pg_dsn, table=old, timeout=5.0)
    other = PostgresBackend(pg_dsn, table=old, cache_id="c", timeout=5.0)
    try:
        migrating.attach("b", TokenFile(str(directory)))
        with psycopg.connect(pg_dsn) as holder:  # node a's flush, under way
            holder.execute(f"INSERT INTO {old}_checkpoints (cache_id, lsn) VALUES ('a', 1)")
            started = time.monotonic()
            migrating.apply([], [], 1, [("n", 1)])  # its ALTER gives up: a tokenless flush
            assert time.monotonic() - started < 2.5
            assert other.checkpoint() == 0  # nobody queues behind an ALTER
        assert query(pg_dsn, f"SELECT lsn FROM {old}_checkpoints WHERE cache_id = 'b'"
                     ) == [(1,)]  # flushed without a token, the column still missing
    finally:
        migrating.close()
        other.close()
