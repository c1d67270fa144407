"""Caches over one PostgreSQL database: increments from many caches add up, puts are
last-flush-wins, read_ttl shows other caches' writes, and a crash at any step of a flush or a
recovery (SIGKILL at a named crash point) replays nothing twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import msgpack
import psycopg
import pytest
from cli_support import pg_url
from controlled import flush_writing_meanwhile, wait_until
from pg_support import (  # noqa: F401 (fixtures)
    OpenCache,
    TcpProxy,
    open_pg_fixture,
    pg_dsn_fixture,
    pg_proxy_fixture,
    pg_schema_fixture,
    query,
    stored_ints,
    table_fixture,
)

import wbcache
from wbcache import FlushError
from wbcache.backends.postgres import PostgresBackend, PostgresError
from wbcache.snapshot import open_snapshot


def test_values_and_keys_round_trip_through_the_database(open_pg: OpenCache) -> None:
    values: dict[Any, Any] = {"dict": {"a": [1, 2.5, None]}, b"bytes": b"\x00\xff", "int": 42,
                              "big": (1 << 64) - 1, "k": "text", b"k": "bytes twin"}
    with open_pg("a", flush_interval=3600) as cache:
        cache.put_many(values)
        cache.put("gone", 1)
        cache.flush()
        cache.delete("gone")
        cache.flush()
    with open_pg("b", flush_interval=3600) as other:  # a fresh cache reads them back
        assert {key: other.get(key) for key in values} == values
        assert "gone" not in other
        assert len(other) == len(values)
        assert sorted(other.keys(), key=repr) == sorted(values, key=repr)


def test_increments_from_two_caches_add_up_and_puts_are_last_flush_wins(
        open_pg: OpenCache, pg_dsn: str, table: str) -> None:
    first = open_pg("a", flush_interval=3600)
    second = open_pg("b", flush_interval=3600)
    assert first.cache_id != second.cache_id
    for _ in range(7):
        first.incr("hits")
    second.incr("hits", 5)
    with second.batch() as batch:
        batch.incr("hits", 100)
    first.put("owner", "first")
    second.put("owner", "second")
    second.flush()
    first.flush()  # flushed last: its put wins
    assert stored_ints(pg_dsn, table, "hits") == {"hits": 112}
    assert PostgresBackend(pg_dsn, table=table, cache_id="reader").get("owner") == b"\xa5first"
    assert dict(query(pg_dsn, f"SELECT cache_id, lsn FROM {table}_checkpoints")) == {
        first.cache_id: first.stats()["checkpoint_lsn"],
        second.cache_id: second.stats()["checkpoint_lsn"]}


def test_a_counter_incremented_during_every_flush_shows_the_other_nodes_increments(
        open_pg: OpenCache, pg_dsn: str, table: str) -> None:
    # tests/test_shared.py has the story: a node that kept counting never saw another's.
    mine = open_pg("a", flush_interval=3600)
    other = open_pg("b", flush_interval=3600)
    assert mine.incr("hits") == 1
    other.incr("hits", 1_000_000)
    other.flush()
    for flushes in range(1, 3):
        flush_writing_meanwhile(mine, lambda cache: cache.incr("hits"))
        assert mine.get("hits") == 1_000_001 + flushes
    mine.flush()
    assert stored_ints(pg_dsn, table, "hits") == {"hits": 1_000_003}
    mine.put("name", "x")
    mine.put(b"raw", [1, 2])
    mine.flush()
    reader = PostgresBackend(pg_dsn, table=table, cache_id="reader")
    try:  # the flusher's read back: one statement for every counter
        keys = ["hits", "name", b"raw", "missing", b"hits"]
        assert reader.get_many(keys) == {key: reader.get(key) for key in keys}
        assert reader.get_many(keys)["hits"] == msgpack.packb(1_000_003)
        assert reader.get_many(keys)[b"hits"] is None  # bytes keys are keys of their own
    finally:
        reader.close()


def test_a_snapshot_of_a_live_cache_never_counts_a_flushed_increment_twice(
        open_pg: OpenCache, tmp_path: Path, pg_dsn: str, table: str) -> None:
    # A snapshot folds the live cache's log once (+5 on top of the database's value) and
    # reads the database when asked. A flush in between used to make it add the +5 to a
    # database value that already held it: 110, a value the counter never had.
    cache = open_pg("a", flush_interval=3600)
    cache.incr("k", 100)
    cache.flush()
    cache.incr("k", 5)  # in the log only
    with open_snapshot(tmp_path / "a", backend=pg_url(pg_dsn, table)) as snapshot:
        assert msgpack.unpackb(snapshot.get("k").value) == 105
        cache.flush()
        with pytest.raises(wbcache.ConcurrentChangeError, match="run the command again"):
            snapshot.get("k")
        with pytest.raises(wbcache.ConcurrentChangeError):
            list(snapshot.items())
    with open_snapshot(tmp_path / "a", backend=pg_url(pg_dsn, table)) as snapshot:
        assert msgpack.unpackb(snapshot.get("k").value) == 105  # read again: right


def test_another_caches_write_becomes_visible_after_read_ttl(open_pg: OpenCache) -> None:
    writer = open_pg("a", flush_interval=3600)
    reader = open_pg("b", flush_interval=3600, read_ttl=0.2)
    default = open_pg("c", flush_interval=3600)
    assert default.read_ttl == 1.0  # PostgresBackend.default_read_ttl
    writer.put("k", "old")
    writer.flush()
    assert reader.get("k") == "old"
    writer.put("k", "new")
    writer.flush()
    wait_until(lambda: reader.get("k") == "new", 5, "the other cache's write")


def test_a_directory_opened_with_another_cache_id_is_refused(tmp_path: Path, pg_dsn: str,
                                                            table: str) -> None:
    backend = PostgresBackend(pg_dsn, table=table, cache_id="not-this-directory")
    try:
        with pytest.raises(ValueError, match="cache_id='not-this-directory'"):
            wbcache.open(tmp_path / "a", backend=backend)
    finally:
        backend.close()
    right = PostgresBackend(pg_dsn, table=table)
    with wbcache.open(tmp_path / "a", backend=right) as cache:  # the lock was released
        cache.put("k", 1)
    right.close()


def test_opening_while_the_database_is_away_fails_clearly_and_leaves_the_directory_usable(
        tmp_path: Path, pg_proxy: TcpProxy, table: str) -> None:
    backend = PostgresBackend(pg_proxy.dsn, table=table)
    pg_proxy.cut()
    with pytest.raises(PostgresError, match="cannot connect.*refused"):
        wbcache.open(tmp_path / "a", backend=backend)
    pg_proxy.restore()
    with wbcache.open(tmp_path / "a", backend=backend) as cache:
        cache.put("k", 1)
    backend.close()


def test_a_first_open_whose_database_is_out_of_reach_leaves_no_directory(
        tmp_path: Path) -> None:
    # The URL's backend is made once the directory is claimed and locked: the refused open
    # left a new directory holding LOCK behind.
    away = "postgresql://nobody@127.0.0.1:1/none?connect_timeout=2"
    with pytest.raises(PostgresError, match="cannot connect"):
        wbcache.open(tmp_path / "new", backend=away)
    assert not (tmp_path / "new").exists()
    (tmp_path / "made").mkdir()  # one the user made is theirs: left
    with pytest.raises(PostgresError, match="cannot connect"):
        wbcache.open(tmp_path / "made", backend=away)
    assert (tmp_path / "made").is_dir()


def test_a_commit_whose_answer_is_lost_counts_once(open_pg: OpenCache, pg_proxy: TcpProxy,
                                                  pg_dsn: str, table: str) -> None:
    cache = open_pg("a", dsn=pg_proxy.dsn, flush_interval=3600)
    for _ in range(5):
        cache.incr("n")
    pg_proxy.swallow_commit_reply()
    cache.flush()  # the lost answer, then the retry finds it committed
    assert stored_ints(pg_dsn, table, "n") == {"n": 5}
    assert cache.stats()["flush_errors"] == 1

    cache.incr("n", 3)
    pg_proxy.swallow_commit_reply(then_cut=True)  # committed, answer lost, then refused
    with pytest.raises(FlushError, match="refused"):
        cache.flush(timeout=0.5)
    assert stored_ints(pg_dsn, table, "n") == {"n": 8}
    pg_proxy.restore()
    cache.incr("n", 4)
    cache.flush()  # the batch that committed, merged with the newer increment
    assert stored_ints(pg_dsn, table, "n") == {"n": 12}


def test_a_counter_flushed_before_an_outage_can_still_be_incremented_during_it(
        open_pg: OpenCache, pg_proxy: TcpProxy, pg_dsn: str, table: str) -> None:
    cache = open_pg("a", dsn=pg_proxy.dsn, flush_interval=3600)
    cache.incr("n")
    cache.flush()  # flushed as a delta: this cache's view is stale from now on
    pg_proxy.cut()
    assert cache.incr("n") == 2  # acknowledged from the log, counted on from the view
    with cache.batch() as batch:
        batch.incr("n")
    pg_proxy.restore()
    cache.flush()
    assert stored_ints(pg_dsn, table, "n") == {"n": 3}


# ------------------------------------------------------------------ crashes

CRASHER = textwrap.dedent("""
    import os, signal, sys
    import wbcache
    from wbcache.backends.postgres import PostgresBackend
    path, dsn, table, then = sys.argv[1:5]
    cache = wbcache.open(path, backend=PostgresBackend(dsn, table=table), flush_interval=3600,
                         segment_size=4096)
    pad = "x" * 600  # the log rolls segments, so flushes delete some
    for i in range(10):
        cache.incr("hits")
        cache.put(f"pad{i}", pad)
    cache.put("p", "first")
    cache.flush()
    for i in range(7):
        cache.incr("hits")
        cache.put(f"pad{i}", pad + "y")
    with cache.batch() as batch:
        batch.incr("hits", 100)
        batch.put("p", "second")
    print("acked", flush=True)
    if then == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    cache.flush()
    print("survived", flush=True)
""")

OPENER = textwrap.dedent("""
    import sys
    import wbcache
    from wbcache.backends.postgres import PostgresBackend
    path, dsn, table = sys.argv[1:4]
    wbcache.open(path, backend=PostgresBackend(dsn, table=table))
    print("survived", flush=True)
""")


def run_child(script: str, args: list[str], crash_at: str | None) -> str:
    env = dict(os.environ)
    env.pop("WBCACHE_CRASH_AT", None)
    if crash_at is not None:
        env["WBCACHE_CRASH_AT"] = crash_at
    child = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True,
                           text=True, timeout=60)
    assert child.returncode == -signal.SIGKILL, child.stderr
    return child.stdout


@pytest.mark.parametrize("crash_at, replays", [
    ("flush.before_commit:2", True),
    ("flush.after_commit:2", False),  # committed, log not yet truncated
    ("flush.after_truncate:2", False),
    ("recovery.after_replay:1", False),  # recovery committed, log not yet deleted
])
def test_a_crash_at_any_step_of_a_flush_or_recovery_replays_nothing_twice(
        tmp_path: Path, pg_dsn: str, table: str, crash_at: str, replays: bool) -> None:
    path = str(tmp_path / "a")
    if crash_at.startswith("recovery."):
        out = run_child(CRASHER, [path, pg_dsn, table, "die"], None)
        assert out == "acked\n"
        assert run_child(OPENER, [path, pg_dsn, table], crash_at) == ""
    else:
        assert run_child(CRASHER, [path, pg_dsn, table, "flush"], crash_at) == "acked\n"
    backend = PostgresBackend(pg_dsn, table=table)
    with wbcache.open(path, backend=backend) as cache:
        assert cache.recovery.records > 0  # the log was still there
        assert (cache.recovery.replayed > 0) == replays
        assert cache.get("p") == "second"
    backend.close()
    assert stored_ints(pg_dsn, table, "hits") == {"hits": 117}


def test_a_url_backend_is_made_owned_and_closed_by_the_cache(tmp_path: Path, pg_dsn: str,
                                                             pg_schema: str, table: str) -> None:
    name = f"{pg_schema}_url"
    params = psycopg.conninfo.conninfo_to_dict(pg_dsn)
    url = (f"postgresql://{params.get('user', 'postgres')}@{params.get('host', '127.0.0.1')}:"
           f"{params.get('port', 5432)}/{params.get('dbname', 'test')}"
           f"?table={table}&application_name={name}")
    sessions = "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
    with wbcache.open(tmp_path / "a", backend=url, flush_interval=3600) as cache:
        assert isinstance(cache._backend, wbcache.PostgresBackend)
        cache.incr("n")
        cache.flush()
        assert query(pg_dsn, sessions, (name,))[0][0] >= 1
    assert stored_ints(pg_dsn, table, "n") == {"n": 1}
    wait_until(lambda: query(pg_dsn, sessions, (name,)) == [(0,)], 10, "closed with the cache")
    with pytest.raises(ValueError, match="is not one wbcache knows"):
        wbcache.open(tmp_path / "b", backend="mysql://nope")
    with wbcache.open(tmp_path / "b"):  # the failed open released the directory
        pass


def test_a_refused_open_with_a_url_creates_no_table(tmp_path: Path, pg_dsn: str,
                                                   pg_schema: str, table: str) -> None:
    """The URL's backend (which creates its tables) used to be made before the directory
    was looked at: an LMDB directory, a file, or a PostgreSQL directory given another
    table= were refused, with two new tables left in the database."""
    with wbcache.open(tmp_path / "lmdb") as cache:
        cache.put("k", 1)
    (tmp_path / "file").write_text("not a directory")
    with wbcache.open(tmp_path / "pg", backend=pg_url(pg_dsn, table)) as cache:
        cache.put("k", 1)
    with wbcache.open(tmp_path / "old", segment_size=4096) as cache:
        cache.put_many((f"k{i}", i) for i in range(200))  # its log: past LSN 1 at the next open
    (tmp_path / "old" / "backend").unlink()  # made before DIR/backend was: LMDB, as its db/ says

    own = "flushes into its own LMDB database in db/: open it without backend="
    for name, expected in (("lmdb", own), ("old", own), ("file", "not a directory"),
                           ("pg", f"flushes into table {table}")):
        new_table = f"{pg_schema}.made_for_{name}"
        with pytest.raises(wbcache.InvalidDirectoryError, match=expected):
            wbcache.open(tmp_path / name, backend=pg_url(pg_dsn, new_table))
        assert query(pg_dsn, "SELECT to_regclass(%s), to_regclass(%s)",
                     (new_table, f"{new_table}_checkpoints")) == [(None, None)]
    # A table named without its schema is known only once resolved: nothing is made for it.
    found_in_schema = f"{pg_url(pg_dsn, 'typo')}&options=-csearch_path%3D{pg_schema}"
    with pytest.raises(wbcache.SchemaMismatchError, match="there is no table"):
        wbcache.open(tmp_path / "pg", backend=found_in_schema)
    assert query(pg_dsn, "SELECT to_regclass(%s)", (f"{pg_schema}.typo",)) == [(None,)]
    with wbcache.open(tmp_path / "pg", backend=pg_url(pg_dsn, table)) as cache:
        assert cache.get("k") == 1
    assert not (tmp_path / "old" / "backend").exists()  # the refused open recorded nothing
    with wbcache.open(tmp_path / "old") as cache:
        assert len(cache) == 200
    assert (tmp_path / "old" / "backend").read_text() == "lmdb\n"


def test_a_forked_child_neither_uses_nor_closes_the_parents_connections(
        open_pg: OpenCache) -> None:
    """Closing a psycopg connection sends a Terminate message; from a child it would end the
    parent's session. The child is refused every use and its close() does nothing."""
    import json
    import os

    from wbcache import ForkedCacheError

    cache = open_pg("a")
    cache.put("k", 1)
    backend = cache._backend  # the PostgresBackend the test made
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        outcome = {}
        try:
            backend.get("k")
            outcome["get"] = "accepted"
        except ForkedCacheError:
            outcome["get"] = "refused"
        backend.close()
        cache.close()
        os.write(write_end, json.dumps(outcome).encode())
        os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    outcome = json.loads(os.read(read_end, 4096))
    os.close(read_end)
    assert outcome == {"get": "refused"}
    cache.put("k", 2)
    cache.flush()  # the parent's writer connection still works
    assert cache._backend.get("k") is not None


def test_popitem_of_keys_only_the_database_holds_never_waits_for_a_second_reader(
        open_pg: OpenCache, tmp_path: Path, pg_dsn: str, table: str) -> None:
    """With memory empty, popitem scans the database for a key; it read each one again, on a
    second reader connection, while the scan held one: with one reader, for good. In a child
    process, so that a regression fails here rather than hanging the suite."""
    with open_pg("a", flush_interval=3600) as cache:
        cache.put_many({"k1": 1, "k2": 2})
        cache.flush()
    script = textwrap.dedent("""
        import sys, wbcache
        from wbcache.backends.postgres import PostgresBackend
        backend = PostgresBackend(sys.argv[2], table=sys.argv[3], read_connections=1)
        with wbcache.open(sys.argv[1], backend=backend, flush_interval=3600) as cache:
            print(cache.popitem(), len(cache))
        backend.close()
    """)
    try:
        result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "a"), pg_dsn,
                                 table], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("popitem still waits for a reader connection after 60 s")
    assert result.returncode == 0, result.stderr
    assert result.stdout in ("('k1', 1) 1\n", "('k2', 2) 1\n")
