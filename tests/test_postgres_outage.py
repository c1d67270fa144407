"""The database taken away under writes (a TCP proxy of the test's own between the backend and
the server): writes keep being acknowledged from the log, errors are counted in stats(),
flush() raises FlushError, flushing resumes by itself, and no acknowledged write is lost or
counted twice."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from controlled import wait_until
from pg_support import (  # noqa: F401 (fixtures)
    TcpProxy,
    make_backend_fixture,
    pack,
    pg_dsn_fixture,
    pg_proxy_fixture,
    pg_schema_fixture,
    query,
    stored_ints,
)

import wbcache
from wbcache import FlushError
from wbcache.backends.postgres import PostgresBackend
from wbcache.errors import PostgresError

OUTAGE_SECONDS = 3.0


class Writer:
    """A thread writing batches `k<i> = i` plus one increment of `hits`, until stopped.
    `acked` counts the batches whose call returned (acknowledged, durable)."""

    def __init__(self, cache: wbcache.Cache) -> None:
        self.cache = cache
        self.acked = 0
        self.last_lsn = 0
        self.failure: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        if self.failure is not None:
            raise self.failure

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                with self.cache.batch() as batch:
                    batch.put(f"k{self.acked}", self.acked)
                    batch.incr("hits")
                assert batch.lsn is not None
                self.last_lsn = batch.lsn
                self.acked += 1
        except BaseException as exc:  # reported by stop()
            self.failure = exc


def outage(cache: wbcache.Cache, writer: Writer, take_away: Callable[[], None],
           bring_back: Callable[[], None], error: str) -> None:
    """Take the database away for OUTAGE_SECONDS under writes, check what must hold meanwhile,
    bring it back and wait for the flusher to catch up on its own."""
    wait_until(lambda: cache.stats()["flushes"] >= 3 and writer.acked >= 100, 10, "flushes")
    errors_before = cache.stats()["flush_errors"]
    take_away()
    away_since = time.monotonic()
    acked_before = writer.acked
    wait_until(lambda: cache.stats()["flush_errors"] > errors_before, 10, "a counted flush error")
    with pytest.raises(FlushError, match="the log keeps every write"):
        cache.flush(timeout=0.5)  # may make an attempt of its own: it ends in the same error
    # the outage itself lasts a while: the writer must keep being acknowledged throughout
    wait_until(lambda: time.monotonic() - away_since >= OUTAGE_SECONDS
               and writer.acked >= acked_before + 200, 30, "writes acknowledged while away")
    stats = cache.stats()
    assert stats["dirty"] > 0 and re.search(error, stats["last_flush_error"])
    stuck_at = stats["checkpoint_lsn"]
    bring_back()
    target = writer.last_lsn
    assert target > stuck_at
    wait_until(lambda: cache.stats()["checkpoint_lsn"] >= target, 30,
               "flushing to resume by itself")  # no flush() call: the flusher's own retries


def check_everything_arrived(pg_dsn: str, table: str, acked: int) -> None:
    values = stored_ints(pg_dsn, table, "k")
    missing = [i for i in range(acked) if values.get(f"k{i}") != i]
    assert missing == [] and len(values) == acked
    assert stored_ints(pg_dsn, table, "hits") == {"hits": acked}  # each increment exactly once


@pytest.mark.parametrize("how", ["refused", "silent"])
def test_writes_survive_the_database_going_away_and_flushing_resumes_by_itself(
        tmp_path: Path, pg_dsn: str, pg_schema: str, pg_proxy: TcpProxy, how: str) -> None:
    """refused: every connection closed and new ones refused. silent: connections stay open
    and new ones are accepted, but nothing is forwarded (only timeouts notice)."""
    table = f"{pg_schema}.wbcache"
    backend = PostgresBackend(pg_proxy.dsn, table=table, timeout=1.5, connect_timeout=2.0)
    cache = wbcache.open(tmp_path / "cache", backend=backend, flush_interval=0.05)
    writer = Writer(cache)
    writer.start()
    try:
        if how == "refused":
            outage(cache, writer, pg_proxy.cut, pg_proxy.restore, "refused")
        else:
            # the open connection times out; reconnecting through the stalled proxy, too
            outage(cache, writer, pg_proxy.stall, pg_proxy.unstall,
                   "no answer within 1.5 s|connection timeout expired")
    finally:
        writer.stop()
        cache.close()
        backend.close()
    assert writer.acked > 400
    check_everything_arrived(pg_dsn, table, writer.acked)


def test_a_flush_transaction_its_client_left_idle_is_ended_by_the_server(
        make_backend: Callable[..., PostgresBackend], pg_dsn: str) -> None:
    """A silent partition that swallows a flush's COMMIT leaves the server's session open,
    idle in the transaction, holding its row locks: every other node's flush and this one's
    reopen waited behind them until the server's TCP keepalive (two hours by default). The
    writer's session now ends such a transaction after `timeout`."""
    backend = make_backend(timeout=1.0)
    backend.apply([("k", pack(1))], [], 1)
    with backend._write_lock:
        writer = backend._writer_connection()
    writer.execute("BEGIN")
    writer.execute("SELECT 1")  # and then nothing more: the client gone quiet
    pid = writer.info.backend_pid
    try:
        wait_until(lambda: not query(pg_dsn, "SELECT 1 FROM pg_stat_activity WHERE pid = %s",
                                     (pid,)),
                   timeout=10, what="the idle transaction's session ended by the server")
    finally:
        writer.close()


def test_a_flush_cut_off_after_its_pipeline_holds_no_node_back_for_good(
        make_backend: Callable[..., PostgresBackend], pg_dsn: str, pg_schema: str,
        pg_proxy: TcpProxy) -> None:
    """A partition swallows a flush's COMMIT and keeps the socket open (the proxy holds it):
    the server's session waits inside the transaction, holding its row locks. Its idle limit
    never fired: after a pipeline psycopg sends a Flush message, on which PostgreSQL stops
    that timer. Every flush of the same keys, on every node, timed out behind the locks for
    good, this node's own too once its network was back (an outside hunt). The backends now
    end such sessions once they are idle for twice `timeout`."""
    a = make_backend("node-a", dsn=pg_proxy.dsn, timeout=1.0)
    b = make_backend("node-b", timeout=1.0)
    a.apply([], [], 1, [("n", 1)])
    with a._write_lock:
        orphan = a._writer_connection().info.backend_pid
    pg_proxy.hold_commit()
    with pytest.raises(PostgresError) as cut:
        a.apply([], [], 2, [("n", 1)])
    assert cut.value.ambiguous
    assert query(pg_dsn, "SELECT state FROM pg_stat_activity WHERE pid = %s",
                 (orphan,)) == [("idle in transaction",)]

    def until_it_commits(flush: Callable[[], None]) -> int:
        deadline, failures = time.monotonic() + 30, 0
        while True:  # each failure is a statement_timeout behind the orphan's locks
            try:
                flush()
                return failures
            except PostgresError:
                failures += 1
                assert time.monotonic() < deadline, "still held back by the flush cut off"

    assert until_it_commits(lambda: b.apply([], [], 1, [("n", 10)])) <= 4
    assert query(pg_dsn, "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (orphan,)) == []
    assert until_it_commits(lambda: a.apply([], [], 2, [("n", 1)])) == 0  # settled: not in
    assert stored_ints(pg_dsn, f"{pg_schema}.wbcache", "n") == {"n": 12}


def test_a_readers_idle_limit_stays_what_the_dsn_sets(
        make_backend: Callable[..., PostgresBackend], pg_dsn: str) -> None:
    # Only the flushing session gets `timeout` as its idle limit; a reader's was forced to 0,
    # overriding the server's or the DSN's own.
    dsn = pg_dsn + ("&" if "?" in pg_dsn else "?") + (
        "options=-c%20idle_in_transaction_session_timeout%3D7000")
    backend = make_backend(dsn=dsn, timeout=2.0)
    backend.apply([("k", pack(1))], [], 1)
    with backend._write_lock:
        writer = backend._writer_connection()
        assert writer.execute("SHOW idle_in_transaction_session_timeout").fetchone() == ("2s",)
    with backend._readers.connection() as reader:
        assert reader.execute("SHOW idle_in_transaction_session_timeout").fetchone() == ("7s",)
