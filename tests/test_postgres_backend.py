"""`PostgresBackend` on its own, against a real server: the protocol, the table layout, table
creation racing, two round trips per flush, ambiguous commits, timeouts and server errors,
and the readers' pool. About 700 lines: every way a flush's commit can end (answered, lost,
late, interrupted) sits beside the others, so a case the settling misses shows."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack
import psycopg
import pytest
from controlled import wait_until
from interrupt_support import code_of, every_point
from pg_support import (  # noqa: F401 (fixtures)
    MakeBackend,
    TcpProxy,
    make_backend_fixture,
    pack,
    pg_dsn_fixture,
    pg_proxy_fixture,
    pg_schema_fixture,
    query,
    value_of,
)

from wbcache.backends import postgres_link
from wbcache.backends.postgres import (
    CheckpointConflictError,
    PostgresBackend,
    PostgresError,
    SchemaMismatchError,
)

INT64_MAX = (1 << 63) - 1
INT64_MIN = -(1 << 63)


def rows(dsn: str, table: str) -> dict[bytes, tuple[int | None, bytes | None]]:
    return {bytes(key): (num, None if value is None else bytes(value))
            for key, num, value in query(dsn, f"SELECT key, num, value FROM {table}")}


# ------------------------------------------------------------------ the protocol

def test_puts_deletes_and_the_checkpoint_commit_together_and_read_back(
        make_backend: MakeBackend) -> None:
    backend = make_backend()
    assert backend.checkpoint() == 0 and backend.count() == 0
    backend.apply([("a", pack(1)), ("b", pack({"x": [1, 2]})), ("c", pack("see"))], [], 3)
    assert backend.checkpoint() == 3
    assert value_of(backend, "a") == 1 and value_of(backend, "b") == {"x": [1, 2]}
    backend.apply([("a", pack("one"))], ["b", "never-there"], 5)
    assert backend.checkpoint() == 5
    assert value_of(backend, "a") == "one" and backend.get("b") is None
    assert backend.count() == 2
    assert sorted(backend.items()) == [("a", pack("one")), ("c", pack("see"))]


def test_str_and_bytes_keys_stay_distinct(make_backend: MakeBackend) -> None:
    backend = make_backend()
    backend.apply([("k", pack("text key")), (b"k", pack("bytes key"))], [], 1,
                  [("n", 1), (b"n", 2)])
    assert value_of(backend, "k") == "text key" and value_of(backend, b"k") == "bytes key"
    assert value_of(backend, "n") == 1 and value_of(backend, b"n") == 2
    backend.apply([], [b"k"], 2)
    assert value_of(backend, "k") == "text key" and backend.get(b"k") is None
    assert sorted(backend.items(), key=repr) == [("k", pack("text key")), ("n", pack(1)),
                                                 (b"n", pack(2))]


def test_the_largest_key_fits_the_index(make_backend: MakeBackend) -> None:
    backend = make_backend()
    random_bytes = os.urandom(backend.max_key_size)  # incompressible: the index's worst case
    random_text = random_bytes.hex()[:backend.max_key_size]
    backend.apply([(random_text, pack("text")), (random_bytes, pack("bytes"))], [], 1)
    assert value_of(backend, random_text) == "text" and value_of(backend, random_bytes) == "bytes"


def test_ints_live_in_num_and_other_values_stay_msgpack(make_backend: MakeBackend,
                                                        pg_dsn: str) -> None:
    backend = make_backend()
    values = {"small": 7, "negative": -5, "min": INT64_MIN, "max": INT64_MAX,
              "uint64": (1 << 64) - 1, "bool": True, "float": 2.5, "none": None, "text": "7"}
    backend.apply([(key, pack(value)) for key, value in values.items()], [], 1)
    stored = rows(pg_dsn, backend.table)
    for key, value in values.items():
        num, encoded = stored[b"s" + key.encode()]
        if type(value) is int and INT64_MIN <= value <= INT64_MAX:
            assert (num, encoded) == (value, None), key
        else:  # bool is not an int here, and a uint64 beyond int64 stays encoded
            assert (num, encoded) == (None, pack(value)), key
        assert backend.get(key) == pack(value), key


def test_increments_add_to_ints_create_missing_keys_and_count_non_ints_from_zero(
        make_backend: MakeBackend) -> None:
    backend = make_backend()
    backend.apply([("int", pack(10)), ("text", pack("hello")), ("flag", pack(False))], [], 1)
    backend.apply([], [], 2, [("int", 5), ("text", 3), ("flag", -2), ("new", 4)])
    assert [value_of(backend, key) for key in ("int", "text", "flag", "new")] == [15, 3, -2, 4]
    backend.apply([], [], 3, [("int", -20)])
    assert value_of(backend, "int") == -5


def test_a_key_named_more_than_once_counts_as_deletes_then_puts_then_increments(
        make_backend: MakeBackend) -> None:
    """One statement can touch a row only once: repeats are merged before it is sent."""
    backend = make_backend()
    backend.apply([("d", pack(100))], [], 1)
    backend.apply([("a", pack(1)), ("a", pack(2)), ("b", pack("x")), ("c", pack(5))],
                  ["a", "d", "d"], 2, [("b", 3), ("c", 4), ("c", 1), ("d", 7), ("e", 1)])
    assert {key: value_of(backend, key) for key in "abcde"} \
        == {"a": 2, "b": 3, "c": 10, "d": 7, "e": 1}


def test_a_total_beyond_64_bits_stays_at_the_bound_and_flushing_goes_on(
        make_backend: MakeBackend) -> None:
    first, second = make_backend("node-a"), make_backend("node-b")
    first.apply([], [], 1, [("n", INT64_MAX - 1)])
    second.apply([], [], 1, [("n", 5)])  # both acknowledged: neither can be refused
    assert value_of(first, "n") == INT64_MAX
    first.apply([("other", pack(1))], [], 2, [("n", -10)])
    assert value_of(first, "n") == INT64_MAX - 10 and value_of(first, "other") == 1


def test_a_coalesced_delta_wider_than_64_bits_is_added_whole(make_backend: MakeBackend) -> None:
    backend = make_backend()
    backend.apply([("n", pack(INT64_MIN))], [], 1)
    backend.apply([], [], 2, [("n", INT64_MAX - INT64_MIN)])  # min -> max in one coalesced delta
    assert value_of(backend, "n") == INT64_MAX


def test_each_cache_id_keeps_its_own_checkpoint(make_backend: MakeBackend, pg_dsn: str,
                                               pg_schema: str) -> None:
    first, second = make_backend("node-a"), make_backend("node-b")
    first.apply([], [], 7, [("hits", 7)])
    second.apply([], [], 5, [("hits", 5)])
    assert (first.checkpoint(), second.checkpoint()) == (7, 5)
    assert value_of(first, "hits") == 12
    assert dict(query(pg_dsn, f"SELECT cache_id, lsn FROM {pg_schema}.wbcache_checkpoints")) \
        == {"node-a": 7, "node-b": 5}


def test_a_checkpoint_that_would_not_grow_is_refused_and_nothing_is_written(
        make_backend: MakeBackend) -> None:
    original, copy = make_backend("same-id"), make_backend("same-id")
    original.apply([], [], 10, [("n", 1)])
    with pytest.raises(CheckpointConflictError, match="stored checkpoint is 10.*another cache "
                                                      "directory with the same cache_id"):
        copy.apply([("p", pack(1))], ["n"], 4, [("n", 100)])
    assert value_of(original, "n") == 1 and original.get("p") is None
    assert original.checkpoint() == 10
    copy.apply([], [], 11, [("n", 1)])  # the connection stays usable
    assert value_of(original, "n") == 2


def test_items_reads_every_row_across_chunks_and_count_agrees(make_backend: MakeBackend) -> None:
    backend = make_backend()
    entries = {f"key{i:05}": pack(i if i % 2 else [i]) for i in range(12_000)}
    backend.apply(list(entries.items()), [], 1)
    assert backend.count() == 12_000
    assert dict(backend.items()) == entries
    iterator = backend.items()  # a reader that stops early leaves the pool healthy
    next(iterator)
    iterator.close()
    assert backend.get("key00003") == pack(3)


def test_reads_from_many_threads_are_served_concurrently(make_backend: MakeBackend) -> None:
    backend = make_backend(read_connections=3)
    backend.apply([(f"k{i}", pack(i)) for i in range(50)], [], 1)
    wrong: list[Any] = []

    def read(thread: int) -> None:
        for i in range(200):
            key = f"k{(thread + i) % 50}"
            if backend.get(key) != pack((thread + i) % 50):
                wrong.append(key)

    threads = [threading.Thread(target=read, args=(n,)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []


def test_attach_takes_the_directorys_id_unless_another_was_given(make_backend: MakeBackend) -> None:
    given = make_backend("dir-1")
    given.attach("dir-1")
    with pytest.raises(ValueError, match="cache_id='dir-1'.*'dir-2'"):
        given.attach("dir-2")
    free = make_backend(None)
    with pytest.raises(ValueError, match="no cache_id"):
        free.checkpoint()
    free.attach("dir-3")
    assert free.cache_id == "dir-3" and free.checkpoint() == 0
    with pytest.raises(ValueError, match="one backend per cache directory"):
        free.attach("dir-4")


# ------------------------------------------------------------------ the tables

def test_tables_are_created_once_when_many_threads_start_together(make_backend: MakeBackend,
                                                                 pg_dsn: str,
                                                                 pg_schema: str) -> None:
    start = threading.Barrier(8)
    made: list[PostgresBackend] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def open_one(n: int) -> None:
        start.wait()
        try:
            backend = make_backend(f"node-{n}", table="racy")
            with lock:
                made.append(backend)
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_one, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(made) == 8
    for backend in made:
        backend.apply([], [], 1, [("n", 1)])
    assert value_of(made[0], "n") == 8
    assert query(pg_dsn, "SELECT count(*) FROM pg_tables WHERE schemaname = %s",
                 (pg_schema,)) == [(2,)]


RACER = textwrap.dedent("""
    import sys
    from wbcache.backends.postgres import PostgresBackend
    dsn, table, name = sys.argv[1:4]
    print("ready", flush=True)
    sys.stdin.readline()
    backend = PostgresBackend(dsn, table=table, cache_id=name)
    backend.apply([], [], 1, [("n", 1)])
    backend.close()
    print("done", flush=True)
""")


def test_tables_are_created_once_when_many_processes_start_together(pg_dsn: str,
                                                                   pg_schema: str) -> None:
    table = f"{pg_schema}.racy"
    children = [subprocess.Popen([sys.executable, "-c", RACER, pg_dsn, table, f"p{n}"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for n in range(4)]
    for child in children:  # all imported and waiting: release them at once
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
    for child in children:
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
    for child in children:
        out, err = child.communicate(timeout=30)
        assert child.returncode == 0 and out == "done\n", err
    assert query(pg_dsn, f"SELECT num FROM {table} WHERE key = %s", (b"sn",)) == [(4,)]


def test_an_existing_table_with_other_columns_is_refused(pg_dsn: str, pg_schema: str) -> None:
    query(pg_dsn, f"CREATE TABLE {pg_schema}.taken (key text PRIMARY KEY, value jsonb)")
    with pytest.raises(SchemaMismatchError, match=f"{pg_schema}.taken exists but is not a "
                                                  "wbcache table"):
        PostgresBackend(pg_dsn, table=f"{pg_schema}.taken")


CHECKPOINTS = ("CREATE TABLE {t}_checkpoints (cache_id text PRIMARY KEY, lsn bigint NOT NULL, "
               "updated_at timestamptz NOT NULL DEFAULT now(), token text)")


@pytest.mark.parametrize("data, checkpoints, refusal", [
    ("CREATE TABLE {t} (key bytea PRIMARY KEY, num bigint, value bytea, owner text NOT NULL)",
     CHECKPOINTS, r"column\(s\) owner must be given a value"),
    ("CREATE TABLE {t} (key bytea, num bigint, value bytea)", CHECKPOINTS,
     "its column key is not its primary key"),
    ("CREATE TABLE {t} (key bytea, num bigint, value bytea, PRIMARY KEY (key, num))",
     CHECKPOINTS, "its column key is not its primary key"),
    ("CREATE TABLE {t} (key bytea, num bigint, value bytea, PRIMARY KEY (key) DEFERRABLE)",
     CHECKPOINTS, "its column key is not its primary key"),
    ("CREATE TABLE {t} (key bytea PRIMARY KEY, num bigint, value bytea)",
     "CREATE TABLE {t}_checkpoints (cache_id text, lsn bigint NOT NULL, "
     "updated_at timestamptz NOT NULL DEFAULT now(), token text)",
     "its column cache_id is not its primary key"),
    ("CREATE TABLE {t} (key bytea PRIMARY KEY, num bigint, value bytea)",
     "CREATE TABLE {t}_checkpoints (cache_id text PRIMARY KEY, lsn bigint NOT NULL)",
     "expected columns"),
    ("CREATE TABLE {t} (key bytea PRIMARY KEY, num bigint, value bytea NOT NULL)",
     CHECKPOINTS, r"column\(s\) value are NOT NULL, where wbcache stores NULL"),
    ("CREATE TABLE {t} (key bytea PRIMARY KEY, num bigint NOT NULL DEFAULT 0, value bytea)",
     CHECKPOINTS, r"column\(s\) num are NOT NULL"),
    ("CREATE TABLE {t} (key bytea PRIMARY KEY, num bigint, value bytea)",
     CHECKPOINTS.replace("token text", "token text NOT NULL DEFAULT ''"),
     r"column\(s\) token are NOT NULL"),
], ids=["extra-not-null", "no-primary-key", "wider-primary-key", "deferrable-primary-key",
        "checkpoints-without-primary-key", "checkpoints-without-updated-at", "value-not-null",
        "num-not-null", "token-not-null"])
def test_an_existing_table_every_flush_would_fail_on_is_refused_at_open(
        pg_dsn: str, pg_schema: str, data: str, checkpoints: str, refusal: str) -> None:
    """Such tables were taken: the open returned, writes were acknowledged (kept by the log),
    then every flush failed (a NOT NULL column wbcache never fills, or one of its own where it
    stores NULL, as every int's value; ON CONFLICT (key) with no unique index to find the row
    by) until close raised FlushError (outside hunts). The docs say a table with other
    columns is refused: at open, nothing written."""
    table = f"{pg_schema}.foreign"
    query(pg_dsn, data.format(t=table))
    query(pg_dsn, checkpoints.format(t=table))
    with pytest.raises(SchemaMismatchError, match=refusal):
        PostgresBackend(pg_dsn, table=table)
    assert query(pg_dsn, f"SELECT count(*) FROM {table}") == [(0,)]
    assert query(pg_dsn, f"SELECT count(*) FROM {table}_checkpoints") == [(0,)]


def test_columns_of_your_own_that_may_be_null_or_have_a_default_are_kept(
        pg_dsn: str, pg_schema: str) -> None:
    """A DBA's column beside wbcache's (nullable, defaulted, an identity) is no obstacle to a
    flush, and so no reason to refuse the table (a review: an open refused every such table,
    and with it the recovery of a directory's unflushed log)."""
    table = f"{pg_schema}.annotated"
    query(pg_dsn, f"CREATE TABLE {table} (key bytea PRIMARY KEY, num bigint, value bytea, "
                  f"note text, touched timestamptz NOT NULL DEFAULT now(), "
                  f"id bigint GENERATED ALWAYS AS IDENTITY)")
    query(pg_dsn, CHECKPOINTS.format(t=table).replace("token text", "token text, note text"))
    backend = PostgresBackend(pg_dsn, table=table, cache_id="annotated")
    try:
        backend.apply([("k", msgpack.packb(1))], [], 1, [("n", 2)])
        assert backend.checkpoint() == 1
        assert msgpack.unpackb(backend.get("k")) == 1
    finally:
        backend.close()


@pytest.mark.parametrize("table", ["", "a.b.c", "drop table x;", "1abc", "x" * 60, "sch.\"q\""])
def test_a_bad_table_name_is_refused_before_connecting(table: str) -> None:
    with pytest.raises(ValueError, match="table"):
        PostgresBackend("postgresql://nobody@127.0.0.1:1/none", table=table)


def test_from_url_takes_its_own_parameters_and_passes_the_rest_to_libpq(
        pg_dsn: str, pg_schema: str) -> None:
    params = psycopg.conninfo.conninfo_to_dict(pg_dsn)
    url = (f"postgresql://{params.get('user', 'postgres')}@{params.get('host', '127.0.0.1')}:"
           f"{params.get('port', 5432)}/{params.get('dbname', 'test')}"
           f"?table={pg_schema}.fromurl&cache_id=u1&timeout=3&application_name=wb%20test")
    backend = PostgresBackend.from_url(url)
    try:
        assert backend.table == f"{pg_schema}.fromurl" and backend.cache_id == "u1"
        backend.apply([], [], 1, [("n", 1)])
        assert backend.checkpoint() == 1
        # a space, %20: libpq reads no "+" as one
        assert query(pg_dsn, "SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                             "'wb test'")[0][0] >= 1
    finally:
        backend.close()
    with pytest.raises(ValueError, match="not a PostgreSQL URL"):
        PostgresBackend.from_url("mysql://x/y")
    with pytest.raises(ValueError, match="timeout='soon' is not a float"):
        PostgresBackend.from_url("postgresql://x/y?timeout=soon")


@pytest.mark.parametrize("make", [
    lambda: PostgresBackend("host=x", timeout=3e6),  # libpq refused it as "cannot connect"
    lambda: PostgresBackend.from_url("postgresql://x/y?timeout=1e300"),
    lambda: PostgresBackend("host=x", connect_timeout=3e6),
], ids=["timeout", "timeout-in-url", "connect_timeout"])
def test_a_timeout_libpq_cannot_take_is_refused_before_connecting(make: Any) -> None:
    """Over 2**31 ms, libpq's tcp_user_timeout fails the connection ("invalid integer
    value"), reported as a server that cannot be reached (an outside hunt of bad input)."""
    with pytest.raises(ValueError, match="must be at most 2,000,000 seconds"):
        make()


def test_create_tables_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="create_tables must be True or False, not 'no'"):
        PostgresBackend("host=x", create_tables="no")  # type: ignore[arg-type]


# ------------------------------------------------------------------ the wire

def test_a_flush_of_10000_entries_is_two_round_trips_its_statements_then_its_commit(
        make_backend: MakeBackend, pg_proxy: TcpProxy) -> None:
    backend = make_backend(dsn=f"{pg_proxy.dsn} sslmode=disable")
    backend.apply([(f"old{i}", pack(i)) for i in range(100)], [], 1)  # connected, warmed up
    pg_proxy.record_turns()
    pg_proxy.record_messages()
    backend.apply([(f"k{i}", pack({"i": i})) for i in range(5_000)] +
                  [(f"n{i}", pack(i)) for i in range(2_000)],
                  [f"old{i}" for i in range(100)], 2,
                  [(f"c{i}", i) for i in range(2_900)])
    assert pg_proxy.turns() == 2
    # BEGIN, every row in one statement, the delete of the marked rows, the checkpoint; COMMIT
    # (each run by a Bind of its parameters, or a simple Query without any)
    assert len([kind for kind, _ in pg_proxy.messages() if kind in ("B", "Q")]) == 5
    assert backend.count() == 9_900 and value_of(backend, "c7") == 7


def test_an_ambiguous_commit_that_went_through_is_not_applied_twice(
        make_backend: MakeBackend, pg_proxy: TcpProxy, pg_dsn: str) -> None:
    backend = make_backend(dsn=pg_proxy.dsn)
    truth = make_backend()  # straight to the server
    backend.apply([], [], 1, [("n", 5)])

    pg_proxy.swallow_commit_reply()  # COMMIT goes through, its answer is lost
    with pytest.raises(PostgresError, match="whether it committed is settled") as lost:
        backend.apply([("p", pack(1))], [], 2, [("n", 3)])
    assert lost.value.ambiguous
    assert value_of(truth, "n") == 8 and truth.checkpoint() == 2  # it did commit
    backend.apply([("p", pack(1))], [], 2, [("n", 3)])  # the flusher's retry: same batch
    assert value_of(truth, "n") == 8

    pg_proxy.swallow_commit_reply()
    with pytest.raises(PostgresError):
        backend.apply([], [], 3, [("n", 2), ("m", 1)])
    # flush() gave up; the next cycle sends that batch merged with newer increments
    backend.apply([], [], 4, [("n", 2 + 10), ("m", 1), ("fresh", 1)])
    assert [value_of(truth, key) for key in ("n", "m", "fresh")] == [8 + 12, 1, 1]
    assert truth.checkpoint() == 4


def test_an_ambiguous_commit_that_did_not_go_through_is_applied_by_the_retry(
        make_backend: MakeBackend, pg_proxy: TcpProxy) -> None:
    backend = make_backend(dsn=f"{pg_proxy.dsn} sslmode=disable", timeout=1.0)
    truth = make_backend()
    backend.apply([], [], 1, [("n", 5)])
    pg_proxy.hold_commit()  # the statements go through; the proxy holds the COMMIT ...
    with pytest.raises(PostgresError, match="no answer within") as lost:
        backend.apply([], [], 2, [("n", 3)])
    assert lost.value.ambiguous
    pg_proxy.cut()  # ... and drops it: the transaction never commits
    pg_proxy.restore()
    assert value_of(truth, "n") == 5 and truth.checkpoint() == 1
    backend.apply([], [], 3, [("n", 3 + 4)])
    assert value_of(truth, "n") == 12 and truth.checkpoint() == 3


def test_reading_the_checkpoint_after_a_lost_answer_leaves_the_retry_settled(
        make_backend: MakeBackend, pg_proxy: TcpProxy) -> None:
    """`checkpoint()` is only a read: the flush whose answer was lost is still remembered, so
    its retry is recognised as committed, neither refused as a conflict nor applied twice."""
    backend = make_backend(dsn=f"{pg_proxy.dsn} sslmode=disable")
    truth = make_backend()
    backend.apply([], [], 1, [("n", 5)])
    pg_proxy.swallow_commit_reply()
    with pytest.raises(PostgresError) as lost:
        backend.apply([("p", pack(1))], [], 2, [("n", 3)])
    assert lost.value.ambiguous
    assert backend.checkpoint() == 2  # it did commit
    backend.apply([("p", pack(1))], [], 2, [("n", 3)])  # the flusher's retry of that batch
    assert value_of(truth, "n") == 8 and truth.checkpoint() == 2
    backend.apply([], [], 3, [("n", 1)])
    assert value_of(truth, "n") == 9 and truth.checkpoint() == 3


def test_a_checkpoint_read_before_a_lost_commit_lands_leaves_it_to_be_settled(
        make_backend: MakeBackend, pg_proxy: TcpProxy) -> None:
    backend = make_backend(dsn=f"{pg_proxy.dsn} sslmode=disable", timeout=1.0)
    truth = make_backend()
    backend.apply([], [], 1, [("n", 5)])
    pg_proxy.hold_commit()
    with pytest.raises(PostgresError, match="no answer within") as lost:
        backend.apply([], [], 2, [("n", 3)])
    assert lost.value.ambiguous
    assert backend.checkpoint() == 1  # not committed yet ...
    pg_proxy.thaw()  # ... and now it is
    wait_until(lambda: truth.checkpoint() == 2, 10, "the late commit")
    backend.apply([], [], 3, [("n", 3 + 4)])  # that batch merged with a newer increment
    assert value_of(truth, "n") == 12 and truth.checkpoint() == 3


def test_a_server_error_is_reported_clearly_and_the_next_flush_works(
        make_backend: MakeBackend, pg_dsn: str) -> None:
    backend = make_backend(timeout=1.0)
    backend.apply([("held", pack(0))], [], 1)
    with psycopg.connect(pg_dsn) as blocker:  # holds the row lock in an open transaction
        blocker.execute(f"SELECT 1 FROM {backend.table} WHERE key = %s FOR UPDATE", (b"sheld",))
        started = time.monotonic()
        with pytest.raises(PostgresError, match="table .*wbcache: flush of 1 puts.*"
                                                "QueryCanceled.*statement timeout") as failed:
            backend.apply([("held", pack(1))], [], 2)
        assert time.monotonic() - started < 5
        assert not failed.value.ambiguous  # the server said it rolled back
    backend.apply([("held", pack(2))], [], 3)
    assert value_of(backend, "held") == 2 and backend.checkpoint() == 3


def test_a_silent_server_becomes_an_error_within_the_timeout(make_backend: MakeBackend,
                                                             pg_proxy: TcpProxy) -> None:
    backend = make_backend(dsn=pg_proxy.dsn, timeout=1.0, connect_timeout=2.0)
    truth = make_backend()
    backend.apply([], [], 1, [("n", 1)])
    pg_proxy.stall()
    started = time.monotonic()
    with pytest.raises(PostgresError, match="no answer within 1 s") as silent:
        backend.apply([], [], 2, [("n", 1)])
    assert time.monotonic() - started < 4
    assert not silent.value.ambiguous  # its statements went unanswered: no COMMIT was sent
    with pytest.raises(PostgresError, match="cannot connect|no answer"):  # a new connection
        backend.get("n")
    pg_proxy.unstall()  # the stalled statements may now reach the server, never a COMMIT
    # the flusher's next cycle: that batch merged with a newer increment
    wait_until(lambda: _succeeds(lambda: backend.apply([], [], 3, [("n", 1 + 1)])), 15,
               "a flush after the stall")
    assert value_of(truth, "n") == 3 and truth.checkpoint() == 3


def test_a_lost_commit_arriving_late_commits_at_most_once_with_its_retry(
        make_backend: MakeBackend, pg_proxy: TcpProxy, pg_dsn: str, pg_schema: str) -> None:
    """The worst order: the lost COMMIT reaches the server after its retry read the
    checkpoint, and commits first. The retry must then be refused, and the next attempt
    settle it."""
    name = f"{pg_schema}_late"
    backend = make_backend(dsn=f"{pg_proxy.dsn} sslmode=disable application_name={name}",
                           timeout=3.0)
    truth = make_backend()
    backend.apply([], [], 1, [("n", 1)])
    pg_proxy.hold_commit()  # the statements run (row n is locked), the COMMIT is held
    with pytest.raises(PostgresError, match="no answer within") as held:
        backend.apply([], [], 2, [("n", 10)])
    assert held.value.ambiguous
    refused: list[BaseException] = []

    def retry() -> None:  # the flusher's next cycle: that batch merged with a newer one
        try:
            backend.apply([], [], 3, [("n", 10 + 100)])
        except PostgresError as exc:
            refused.append(exc)

    retrying = threading.Thread(target=retry)
    retrying.start()  # reads checkpoint 1, then queues for row n behind the lost transaction
    waiting = ("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
               "AND wait_event_type = 'Lock'")
    wait_until(lambda: query(pg_dsn, waiting, (name,)) == [(1,)], 10, "the retry")
    pg_proxy.thaw()  # the lost COMMIT arrives: it commits first, then the retry meets its CAS
    retrying.join()
    assert len(refused) == 1 and "an earlier flush whose answer was lost has committed" \
        in str(refused[0])
    assert value_of(truth, "n") == 11 and truth.checkpoint() == 2
    backend.apply([], [], 3, [("n", 10 + 100)])
    assert value_of(truth, "n") == 111 and truth.checkpoint() == 3


def _succeeds(call: Callable[[], Any]) -> bool:
    try:
        call()
        return True
    except PostgresError:
        return False


def test_a_closed_backend_refuses_work_and_closes_twice(make_backend: MakeBackend) -> None:
    backend = make_backend()
    backend.close()
    backend.close()
    with pytest.raises(PostgresError, match="closed"):
        backend.apply([], [], 1)
    with pytest.raises(PostgresError, match="closed"):
        backend.get("k")


def test_a_flush_interrupted_after_its_commit_is_settled_like_a_lost_answer(
        make_backend: MakeBackend) -> None:
    """Ctrl-C while a flush's COMMIT is under way: psycopg waits for it (it commits), then
    raises KeyboardInterrupt. The attempt was not kept as one whose answer was lost, so every
    later flush met a checkpoint it did not expect (CheckpointConflictError, for good)."""
    backend = make_backend()
    backend.apply([], [], 1, [("n", 5)])
    transaction = backend._link.transaction

    def committed_then_interrupted(*args: object) -> None:
        transaction(*args)
        raise KeyboardInterrupt

    backend._link.transaction = committed_then_interrupted  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        backend.apply([("p", pack(1))], [], 2, [("n", 3)])
    backend._link.transaction = transaction  # type: ignore[method-assign]
    backend.apply([("p", pack(1))], [], 2, [("n", 3)])  # the flusher's retry: same batch
    backend.apply([], [], 3, [("n", 1)])
    assert value_of(backend, "n") == 5 + 3 + 1 and backend.checkpoint() == 3


# ------------------------------------------------------------------ the readers' pool


class _Conn:  # what the pool looks at: open, not broken, nothing to read on its socket
    closed = broken = False

    def __init__(self) -> None:
        self._sockets = socket.socketpair()

    def fileno(self) -> int:
        return self._sockets[0].fileno()

    def close(self) -> None:
        self.closed = True
        for end in self._sockets:
            end.close()


def _blocked_in_acquire(thread: threading.Thread) -> bool:
    frame = sys._current_frames().get(thread.ident or 0)
    return frame is not None and frame.f_code.co_name in ("__enter__", "acquire", "wait")


def test_the_readers_pool_hands_a_connection_back_to_the_thread_that_waited_longest() -> None:
    """threading's semaphore let the thread that gave a connection back take it again at
    once: 8 threads reading in a loop kept the pool, and `keys()` or a flush's read waited up
    to 14 s for one (an outside hunt on PostgreSQL). A slot given back goes to the thread
    that has waited longest."""
    class OneLink:  # a link whose connections are dummies
        where = "test"

        def connect(self) -> _Conn:
            return _Conn()

    pool = postgres_link.ReaderPool(OneLink(), 1)  # type: ignore[arg-type]
    order: list[str] = []
    inside, release = threading.Event(), threading.Event()

    def greedy() -> None:
        with pool.connection():
            inside.set()
            assert release.wait(10)
        with pool.connection():  # again at once, as a reading loop does
            order.append("greedy")

    def patient() -> None:
        with pool.connection():
            order.append("patient")

    first = threading.Thread(target=greedy)
    second = threading.Thread(target=patient)
    first.start()
    assert inside.wait(10)
    second.start()
    deadline = time.monotonic() + 10
    while not _blocked_in_acquire(second):  # it waits for the one connection
        assert time.monotonic() < deadline
        time.sleep(0.001)
    release.set()
    first.join(10)
    second.join(10)
    pool.close()
    assert order == ["patient", "greedy"]


def test_a_reader_interrupted_while_it_waits_for_a_slot_takes_none_away() -> None:
    """Its place in the queue is given up: the slot given back later is free, not handed to
    a thread no longer waiting (the pool would shrink by one for good)."""
    slots = postgres_link.FairSlots(1)
    slots.__enter__()  # held by another reader

    class Interrupted(Exception):
        pass

    def interrupt(*_: object) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(Interrupted), slots:
            pytest.fail("the slot is held")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    slots.__exit__()  # given back: nobody waits
    assert (slots._free, len(slots._waiting)) == (1, 0)
    with slots:
        assert slots._free == 0


def test_a_reader_interrupted_anywhere_in_taking_a_slot_leaves_the_pool_whole() -> None:
    """An interrupt at each point CPython raises one in `FairSlots.__enter__` (the suite's
    harness), with a slot free and while it waits for one another reader gives back:
    afterwards one slot is free and nobody is queued. A place taken in the queue just before
    the wait had no handler around it, and the slot given back then went to nobody, for
    good; nor had a slot taken at once, interrupted as the lock was let go (two reviews)."""
    def give_back(slots: postgres_link.FairSlots, ended: threading.Event) -> None:
        wait_until(lambda: slots._waiting or ended.is_set(), what="a reader waiting")
        slots.__exit__()

    def take(slots: postgres_link.FairSlots, ended: threading.Event) -> None:
        try:
            with slots:
                pass
        finally:
            ended.set()

    points = 0
    for held in (False, True):
        for point in every_point([code_of(postgres_link.FairSlots.__enter__)]):
            slots = postgres_link.FairSlots(1)
            ended = threading.Event()
            holder = None
            if held:  # by another reader, who gives it back once we wait, or gave up
                slots.__enter__()
                holder = threading.Thread(target=give_back, args=(slots, ended))
                holder.start()
            point.run(take, slots, ended)
            if holder is not None:
                holder.join(10)
            assert (slots._free, len(slots._waiting)) == (1, 0), (held, point)
            points += 1
    assert points >= 7


def test_a_slot_handed_over_by_an_interrupted_reader_still_reaches_its_waiter(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An interrupt at each point of `FairSlots.__exit__` while a reader waits: the waiter
    gets the slot (its wake-up cut short, it sees it was handed on its next look), or it
    stays queued with the slot for the next to give back. Handed but never woken, it waited
    for good (a review). Left out: the point as `__exit__`'s frame starts, as for any
    `__exit__` written in Python."""
    monkeypatch.setattr(postgres_link.FairSlots, "RECHECK", 0.05)
    points = 0
    for point in every_point([code_of(postgres_link.FairSlots.__exit__)]):
        slots = postgres_link.FairSlots(1)
        slots.__enter__()
        got = threading.Event()

        def wait_for_it(slots: postgres_link.FairSlots, got: threading.Event) -> None:
            with slots:
                got.set()

        waiter = threading.Thread(target=wait_for_it, args=(slots, got), daemon=True)
        waiter.start()
        wait_until(lambda: slots._waiting, what="a reader waiting")  # noqa: B023
        point.run(slots.__exit__)
        points += 1
        if points == 1:  # as the frame starts: nothing done, the slot still held
            slots.__exit__()
        assert got.wait(10), point
        waiter.join(10)
        assert (slots._free, len(slots._waiting)) == (1, 0), point
    assert points >= 3
