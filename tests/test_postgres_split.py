"""A flush or a recovery larger than one statement may carry: PostgreSQL refuses any protocol
message over 1 GiB, so the backend sends it as several statements of at most `statement_bytes`
each -- still ONE transaction, all of it or nothing. And only a connection lost after COMMIT
was sent is an ambiguous commit: a flush the server turned down before its COMMIT is not."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from controlled import wait_until
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
from psycopg.conninfo import make_conninfo

import wbcache
from wbcache import FlushError
from wbcache.backends.postgres import PostgresBackend, PostgresError

BUDGET = 4096  # bytes of keys and values per statement in these tests (the default is 64 MiB)
MiB = 1 << 20
# What a Bind message carries besides the rows: its names, the parameters' formats and
# lengths, the arrays' headers. Generous: the point is "near the budget", not "near 1 GiB".
BIND_OVERHEAD = 256
WAITING = ("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
           "AND wait_event_type = 'Lock'")


def binds(proxy: TcpProxy) -> list[int]:
    """The length of each Bind message (one per statement, with its parameters) since
    `record_messages`."""
    return [length for kind, length in proxy.messages() if kind == "B"]


def test_a_flush_over_the_statement_budget_is_sent_as_small_statements_of_one_transaction(
        make_backend: MakeBackend, pg_proxy: TcpProxy) -> None:
    backend = make_backend(dsn=f"{pg_proxy.dsn} sslmode=disable", statement_bytes=BUDGET)
    backend.apply([(f"old{i:03}", pack(i)) for i in range(100)], [], 1)
    puts = {f"k{i:04}": pack(f"value {i} " + "x" * 100) for i in range(300)}
    increments = {**{f"old{i:03}": 1000 for i in range(1, 100, 2)},
                  **{f"new{i:03}": i for i in range(100)}}
    deletes = [f"old{i:03}" for i in range(0, 100, 2)]
    pg_proxy.record_messages()
    backend.apply(list(puts.items()), deletes, 2, list(increments.items()))

    sent = binds(pg_proxy)
    largest_row = max(len(key) + len(value) for key, value in puts.items())
    assert len(sent) >= 10, sent  # ~45 KB of rows, 4 KB per statement
    assert max(sent) <= BUDGET + largest_row + BIND_OVERHEAD, sent
    assert backend.checkpoint() == 2
    expected = {**{key: value for key, value in puts.items()},
                **{f"old{i:03}": pack(i + 1000) for i in range(1, 100, 2)},
                **{f"new{i:03}": pack(i) for i in range(100)}}
    assert dict(backend.items()) == expected


def test_a_value_larger_than_the_budget_goes_alone_in_its_statement(
        make_backend: MakeBackend, pg_proxy: TcpProxy) -> None:
    backend = make_backend(dsn=f"{pg_proxy.dsn} sslmode=disable", statement_bytes=BUDGET)
    backend.apply([], [], 1)
    big = pack(b"B" * (3 * BUDGET))
    pg_proxy.record_messages()
    backend.apply([("a", pack(1)), ("big", big), ("c", pack(3))], [], 2)
    sent = binds(pg_proxy)
    assert len([length for length in sent if length > BUDGET]) == 1
    assert max(sent) <= len(big) + BIND_OVERHEAD  # the big one, and nothing beside it
    assert [backend.get(key) for key in ("a", "big", "c")] == [pack(1), big, pack(3)]


@pytest.mark.parametrize("failure", ["connection terminated", "connection cut", "lock timeout"])
def test_a_split_flush_that_fails_midway_commits_nothing_and_is_not_ambiguous(
        failure: str, make_backend: MakeBackend, pg_proxy: TcpProxy, pg_dsn: str,
        pg_schema: str) -> None:
    """Statements before the failure have run inside the transaction; none of it may stay."""
    name = f"{pg_schema}_mid"
    options = " options='-c lock_timeout=500'" if failure == "lock timeout" else ""
    backend = make_backend(dsn=f"{pg_proxy.dsn} sslmode=disable application_name={name}"
                               f"{options}", statement_bytes=BUDGET)
    truth = make_backend()
    backend.apply([("k0200", pack("before")), ("gone", pack(1)), ("n", pack(5))], [], 1)
    puts = [(f"k{i:04}", pack(f"{i} " + "x" * 100)) for i in range(300)]
    failed: list[BaseException] = []

    def flush() -> None:
        try:
            backend.apply(puts, ["gone"], 2, [("n", 3)])
        except PostgresError as exc:
            failed.append(exc)

    with psycopg.connect(pg_dsn) as blocker:  # holds row k0200, a third of the way in
        blocker.execute(f"SELECT 1 FROM {backend.table} WHERE key = %s FOR UPDATE",
                        (b"sk0200",))
        pg_proxy.record_messages()
        flushing = threading.Thread(target=flush)
        flushing.start()
        if failure != "lock timeout":
            wait_until(lambda: query(pg_dsn, WAITING, (name,)) == [(1,)], 10,
                       "the flush waiting for row k0200")
            assert len(binds(pg_proxy)) >= 5  # earlier statements of the transaction ran
        if failure == "connection terminated":  # the server reports it, then hangs up
            query(pg_dsn, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE application_name = %s", (name,))
        elif failure == "connection cut":  # the client sees the connection go, nothing else
            pg_proxy.cut()
        flushing.join(15)
        assert not flushing.is_alive()
    if failure == "connection cut":
        pg_proxy.restore()
    assert len(failed) == 1, failed
    assert not failed[0].ambiguous, failed[0]  # COMMIT was never sent
    assert truth.checkpoint() == 1 and truth.count() == 3
    assert [value_of(truth, key) for key in ("k0000", "k0199", "k0200", "gone", "n")] \
        == [None, None, "before", 1, 5]

    backend.apply(puts, ["gone"], 2, [("n", 3)])  # the flusher's retry: all of it, once
    assert truth.checkpoint() == 2 and truth.count() == 301
    assert value_of(truth, "k0200") == "200 " + "x" * 100
    assert truth.get("gone") is None and value_of(truth, "n") == 8


def test_a_flush_the_server_ended_before_its_commit_is_not_ambiguous(
        make_backend: MakeBackend, pg_dsn: str, pg_schema: str) -> None:
    """The server ends the session while a statement waits (as it does for a message over
    its limit): the COMMIT was never sent, so nothing is left to settle."""
    name = f"{pg_schema}_ended"
    backend = make_backend(dsn=make_conninfo(pg_dsn, application_name=name))
    truth = make_backend()
    backend.apply([("held", pack(0))], [], 1)
    failed: list[PostgresError] = []

    def flush() -> None:
        try:
            backend.apply([("held", pack(1)), ("other", pack(2))], [], 2, [("n", 1)])
        except PostgresError as exc:
            failed.append(exc)

    with psycopg.connect(pg_dsn) as blocker:
        blocker.execute(f"SELECT 1 FROM {backend.table} WHERE key = %s FOR UPDATE", (b"sheld",))
        flushing = threading.Thread(target=flush)
        flushing.start()
        wait_until(lambda: query(pg_dsn, WAITING, (name,)) == [(1,)], 10, "the waiting flush")
        query(pg_dsn, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                      "WHERE application_name = %s", (name,))
        flushing.join(15)
    assert len(failed) == 1 and "server closed the connection" in str(failed[0]), failed
    assert not failed[0].ambiguous
    assert truth.checkpoint() == 1 and value_of(truth, "held") == 0
    backend.apply([("held", pack(1)), ("other", pack(2))], [], 2, [("n", 1)])
    assert [value_of(truth, key) for key in ("held", "other", "n")] == [1, 2, 1]


def test_a_recovery_larger_than_the_statement_budget_replays_in_small_statements(
        tmp_path: Path, pg_dsn: str, pg_schema: str, pg_proxy: TcpProxy) -> None:
    """Recovery sends what the log holds with the same `apply`: split the same way."""
    table = f"{pg_schema}.wbcache"
    backend = PostgresBackend(pg_proxy.dsn, table=table)
    try:
        cache = wbcache.open(tmp_path / "c", backend=backend, flush_timeout=0.5)
        pg_proxy.cut()  # from here on every flush fails: the log keeps it all
        written = {f"k{i:04}": f"{i} " + "v" * 150 for i in range(400)}
        cache.put_many(written)
        with pytest.raises(FlushError):
            cache.close()  # closes anyway
    finally:
        backend.close()
    pg_proxy.restore()

    backend = PostgresBackend(f"{pg_proxy.dsn} sslmode=disable", table=table,
                              statement_bytes=BUDGET)
    try:
        pg_proxy.record_messages()
        with wbcache.open(tmp_path / "c", backend=backend) as cache:
            assert cache.recovery.replayed == 1
        sent = binds(pg_proxy)
        assert len(sent) >= 15 and max(sent) <= BUDGET + 200 + BIND_OVERHEAD, sent
        assert backend.count() == 400
        assert {key: value_of(backend, key) for key in written} == written
    finally:
        backend.close()


# ------------------------------------------------------------------ the real size (--soak)

HUGE_VALUES = 70
HUGE = 16 * MiB - 5  # bytes whose msgpack encoding is 16 MiB, the default max_value_size


def huge_value(i: int) -> bytes:
    """A distinct incompressible value (PostgreSQL stores it as it is sent)."""
    return i.to_bytes(4, "big") + os.urandom(HUGE - 4)


@pytest.mark.soak
def test_soak_70_values_of_16_mib_flush_close_and_reopen(tmp_path: Path, pg_dsn: str,
                                                        pg_schema: str) -> None:
    """1.1 GiB in one flush: above PostgreSQL's 1 GiB per message, so only a split flush
    commits. Timed; the defaults (64 MiB per statement, timeout 10 s) as they are."""
    table = f"{pg_schema}.huge"
    backend = PostgresBackend(pg_dsn, table=table)
    try:
        with wbcache.open(tmp_path / "c", backend=backend, flush_interval=3600,
                          flush_threshold=1000) as cache:
            heads = {}
            for i in range(HUGE_VALUES):
                value = huge_value(i)
                heads[f"huge{i:02}"] = value[:64]
                cache.put(f"huge{i:02}", value)
            del value
            assert cache.stats()["flushes"] == 0
            started = time.monotonic()
            cache.flush()
            seconds = time.monotonic() - started
            assert cache.stats()["flush_errors"] == 0
        print(f"\n70 x 16 MiB: flush {seconds:.1f} s")
        started = time.monotonic()
        with wbcache.open(tmp_path / "c", backend=backend) as cache:
            assert cache.recovery.replayed == 0  # the checkpoint covers the whole log
            assert backend.count() == HUGE_VALUES
            for key in ("huge00", "huge35", "huge69"):
                stored = cache.get(key)
                assert len(stored) == HUGE and stored[:64] == heads[key]
        print(f"70 x 16 MiB: reopen and read back {time.monotonic() - started:.1f} s")
    finally:
        backend.close()


WRITER = textwrap.dedent("""
    import os, sys
    import wbcache
    directory, dsn, table, count, size = sys.argv[1], sys.argv[2], sys.argv[3], \\
        int(sys.argv[4]), int(sys.argv[5])
    backend = wbcache.PostgresBackend(dsn, table=table)
    cache = wbcache.open(directory, backend=backend, flush_interval=3600, flush_threshold=1000)
    for i in range(count):
        cache.put(f"huge{i:02}", i.to_bytes(4, "big") + os.urandom(size - 4))
    print("acknowledged", flush=True)
    sys.stdin.readline()  # killed while waiting: nothing was flushed
""")


@pytest.mark.soak
def test_soak_70_values_of_16_mib_are_recovered_after_a_kill(tmp_path: Path, pg_dsn: str,
                                                            pg_schema: str) -> None:
    """The same 1.1 GiB, acknowledged and then SIGKILLed before any flush: the reopen replays
    it all in one recovery `apply` (split), where it once failed on every attempt."""
    table = f"{pg_schema}.huge"
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "c"), pg_dsn, table,
                              str(HUGE_VALUES), str(HUGE)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "acknowledged\n"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    backend = PostgresBackend(pg_dsn, table=table)
    try:
        started = time.monotonic()
        with wbcache.open(tmp_path / "c", backend=backend) as cache:
            seconds = time.monotonic() - started
            assert cache.recovery.replayed == HUGE_VALUES
        print(f"\n70 x 16 MiB: recovery after SIGKILL {seconds:.1f} s")
        assert backend.count() == HUGE_VALUES
        assert {int.from_bytes(value_head(backend, f"huge{i:02}"), "big")
                for i in range(HUGE_VALUES)} == set(range(HUGE_VALUES))
    finally:
        backend.close()


def value_head(backend: PostgresBackend, key: str) -> Any:
    encoded = backend.get(key)
    assert encoded is not None and len(encoded) == 16 * MiB
    return encoded[5:9]  # after msgpack's bin32 header: the value's index
