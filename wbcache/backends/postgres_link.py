"""Connections to PostgreSQL: their settings, a deadline on every round trip, a small pool for
readers, and psycopg errors turned into `PostgresError` messages that name server and table.

A database that is away must turn into an error within seconds, never a hang: a refused or
reset connection fails at once; a server that never answers a connection attempt is bounded by
`connect_timeout`; a network that silently drops packets by `tcp_user_timeout` (unacknowledged
data) and TCP keepalives (an idle wait); and anything that still holds a round trip past
`timeout` (a proxy or middlebox that acknowledges but never forwards, a hung server) by the
`RoundTripTimer`, which shuts the socket down under the waiting call. Server-side, the same
`timeout` is the session's statement_timeout, and the writer's idle-in-transaction limit (a
flush orphaned by a partition lets go of its row locks: `Link.connect`; that limit does not
survive a pipeline, so the backend also ends such flushes itself: `_end_stuck_flushes` in
postgres.py).

Every message made here goes through `redact`: the DSN's password is never in one.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from wbcache.backends.postgres_schema import Statement
from wbcache.backends.postgres_secrets import redact, redact_dsn_complaint
from wbcache.errors import PostgresError

T = TypeVar("T")

Connection = psycopg.Connection[Any]


def parse_dsn(dsn: str, given: str | None = None) -> dict[str, Any]:
    """libpq's reading of `dsn`, or ValueError with its complaint, redacted as `given` (the
    text the user gave, when `dsn` was rebuilt from it: a password a raw '?' cut short is
    whole there only) requires."""
    try:
        return dict(conninfo_to_dict(dsn))
    except psycopg.ProgrammingError as exc:
        complaint = redact_dsn_complaint(_one_line(exc), given or dsn)
    except UnicodeDecodeError:  # libpq read a value psycopg cannot: a byte left as %XX
        complaint = "a percent-encoded value is not UTF-8 text"
    # Raised out of the handler: `from None` hides libpq's complaint from a traceback, but
    # keeps it, password and all, as `__context__` for whatever walks it (an outside hunt).
    raise ValueError(f"invalid PostgreSQL DSN: {complaint}")


@dataclass(frozen=True)
class Endpoint:
    """Where the backend connects: the full conninfo (with wbcache's defaults) and a
    description for messages (never the password). `secrets`: the passwords it holds, hidden
    wherever they appear in a message."""

    conninfo: str = field(repr=False)
    description: str
    connect_timeout: float
    timeout: float
    secrets: tuple[str, ...] = field(default=(), repr=False)

    @classmethod
    def from_dsn(cls, dsn: str, *, connect_timeout: float, timeout: float) -> Endpoint:
        params = parse_dsn(dsn)
        secrets = _passwords(params)
        # The DSN's own settings win; these fill what it leaves out.
        defaults = {
            "connect_timeout": max(2, round(connect_timeout)),  # libpq's minimum is 2 s
            "keepalives": 1,
            "keepalives_idle": 5,  # s of silence before the first probe
            "keepalives_interval": 2,  # s between probes
            "keepalives_count": 3,  # unanswered probes before the connection is dead
            "tcp_user_timeout": int(timeout * 1000),  # ms sent data may stay unacknowledged
            "application_name": "wbcache",
        }
        for name, value in defaults.items():
            params.setdefault(name, value)
        host = params.get("host") or params.get("hostaddr") or "the local socket"
        port = params.get("port") or "5432"
        dbname = params.get("dbname") or params.get("user") or "(default)"
        return cls(make_conninfo(**params), redact(f"{host}:{port} database {dbname}", secrets),
                   connect_timeout, timeout, secrets)


def _passwords(params: dict[str, Any]) -> tuple[str, ...]:
    """The passwords a parsed DSN holds, including those of a DSN given as its dbname (libpq
    reads a dbname with "=" in it as a connection string of its own)."""
    found = [str(params[name]) for name in ("password", "sslpassword") if params.get(name)]
    dbname = str(params.get("dbname") or "")
    if "=" in dbname:
        try:
            found += _passwords(dict(conninfo_to_dict(dbname)))
        except psycopg.ProgrammingError:
            pass  # then libpq will not read it as one either
    return tuple(found)


@dataclass
class _Watch:
    deadline: float
    fd: int
    fired: bool = False


class RoundTripTimer:
    """Shuts down the socket of any connection whose round trip outlives `seconds`, so the
    call waiting on it fails (psycopg sees the connection closed) instead of hanging.

    A duplicate of the socket's descriptor is held while a round trip is watched: shutting down
    a duplicate shuts down the socket itself, and the number can never be reused meanwhile by
    an unrelated file."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._tick = min(0.25, seconds / 4)
        self._lock = threading.Lock()
        self._watches: dict[int, _Watch] = {}
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    @contextmanager
    def bound(self, conn: Connection) -> Iterator[_Watch]:
        watch = _Watch(time.monotonic() + self.seconds, os.dup(conn.fileno()))
        with self._lock:
            self._watches[id(watch)] = watch
            if self._thread is None and not self._stopped.is_set():
                self._thread = threading.Thread(target=self._run, name="wbcache-pg-timer",
                                                daemon=True)
                self._thread.start()
        try:
            yield watch
        finally:
            with self._lock:  # after this the timer cannot fire on it
                del self._watches[id(watch)]
            os.close(watch.fd)

    def rearm(self, watch: _Watch) -> None:
        """A round trip of a longer call completed: the next one gets `seconds` again."""
        with self._lock:
            watch.deadline = time.monotonic() + self.seconds

    def _run(self) -> None:
        while not self._stopped.wait(self._tick):
            now = time.monotonic()
            with self._lock:
                for watch in self._watches.values():
                    if not watch.fired and now >= watch.deadline:
                        watch.fired = True
                        _shut_down(watch.fd)

    def close(self) -> None:
        self._stopped.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()


def _shut_down(fd: int) -> None:
    sock = socket.socket(fileno=os.dup(fd))
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by the peer: the waiting call fails anyway
    finally:
        sock.close()


class Link:
    """Connections to one endpoint, each round trip bounded; errors become `PostgresError`."""

    def __init__(self, endpoint: Endpoint, table: str) -> None:
        self.endpoint = endpoint
        self.where = f"PostgreSQL at {endpoint.description}, table {table}"
        self.timer = RoundTripTimer(endpoint.timeout)

    def connect(self, *, writer: bool = False) -> Connection:
        """A connection whose session gives up on a statement after `timeout`; a `writer`'s
        also on a transaction left idle that long. A flush whose client vanished in a silent
        partition (its COMMIT lost, the socket still open on the server) kept its row locks,
        and every other node's flush and this one's reopen waited behind them, until the
        server's TCP keepalive (two hours by default). (Not after a pipeline, though: psycopg
        ends one with a Flush message, on which PostgreSQL stops the idle timer and never
        restarts it; PostgresBackend ends those sessions itself.) Readers are not limited so:
        a scan's transaction (`wbcache dump` into a pager) waits for its consumer and holds no
        lock a write waits for."""
        try:
            conn = psycopg.connect(self.endpoint.conninfo, autocommit=True)
        except psycopg.Error as exc:
            error = PostgresError(self.redact(f"{self.where}: cannot connect: "
                                              f"{_one_line(exc)}"))
            cause = self._printable(exc)
        else:
            error = None
        if error is not None:  # out of the handler (`_printable`)
            raise error from cause
        limit = str(int(self.endpoint.timeout * 1000))
        # A reader's idle limit is left as the server or the DSN's options set it.
        settings = ["statement_timeout"] + (["idle_in_transaction_session_timeout"] if writer
                                            else [])
        try:  # the server gives up on a statement when we would
            self.call(conn, "setting statement_timeout", lambda c: c.execute(
                "SELECT " + ", ".join(f"set_config('{name}', %s, false)" for name in settings),
                [limit] * len(settings)))
        except BaseException:
            conn.close()
            raise
        return conn

    def call(self, conn: Connection, action: str, work: Callable[[Connection], T]) -> T:
        """`work(conn)` with its round trips bounded. On failure the connection is closed
        unless it is still usable (an error the server reported), and `PostgresError` raised."""
        return self._guarded(conn, action, lambda c, _watch: work(c), None)

    def transaction(self, conn: Connection, action: str, statements: Iterable[Statement],
                    round_trip_bytes: int) -> None:
        """BEGIN, `statements`, COMMIT: ONE transaction in two round trips: the statements,
        pipelined, then, once the server has answered all of them, the COMMIT. A flush larger
        than `round_trip_bytes` is sent in one pipeline per that many bytes, each waiting for
        its answers, so neither side buffers much more than that; each round trip, not the
        whole, is bounded by `timeout`. Statements are made as they are sent.

        Raises `PostgresError`, `ambiguous` only if the connection was lost after the COMMIT
        was sent. Holding the COMMIT back until the statements are answered costs one round
        trip and keeps everything else certain: a statement the server refused, or a session
        it ended (for a message over its limit, a shutdown) is then known to have committed
        nothing -- in a pipeline that already holds the COMMIT, a session closed with an
        error looks just like a connection lost after it."""
        commit_sent = False

        def work(conn: Connection, watch: _Watch) -> None:
            nonlocal commit_sent
            remaining = iter(statements)
            statement = next(remaining, None)
            begun = False
            while not begun or statement is not None:
                # One round trip. Leaving the pipeline sends all of it and waits for every
                # answer (raising the first error); Pipeline.sync() would not do the first
                # when a message outgrows the socket's buffer, and waits forever.
                with conn.pipeline():
                    if not begun:
                        conn.execute("BEGIN")
                        begun = True
                    sent = 0
                    while statement is not None and (
                            not sent or sent + statement.size <= round_trip_bytes):
                        # prepare=False: planned with its parameters' values, an `= ANY`
                        # of an array is a hash lookup, not a scan of the array per row.
                        conn.cursor().execute(statement.sql, statement.params, prepare=False)
                        sent += statement.size
                        statement = next(remaining, None)
                self.timer.rearm(watch)
            commit_sent = True  # every statement succeeded: only now may it commit
            conn.execute("COMMIT")

        self._guarded(conn, action, work, lambda: commit_sent)

    def _guarded(self, conn: Connection, action: str, work: Callable[[Connection, _Watch], T],
                 commit_sent: Callable[[], bool] | None) -> T:
        """`work(conn, watch)` with its round trips bounded, failures turned into
        `PostgresError`; for a transaction, `commit_sent()` says whether its COMMIT went out
        before the failure (then, unless the server answered it with an error, whether it
        committed is unknown: `ambiguous`)."""
        watch: _Watch | None = None
        try:
            with self.timer.bound(conn) as watch:
                return work(conn, watch)
        except psycopg.Error as exc:
            fired = watch is not None and watch.fired
            reported = exc.sqlstate is not None and not fired
            # The server answered with an error and the session lives on: nothing of the
            # transaction, if any, committed.
            rejected = reported and not conn.broken
            if not rejected or not self._rolled_back(conn):
                conn.close()
            ambiguous = commit_sent is not None and commit_sent() and not rejected
            error = self.failure(action, exc, timed_out=fired, ambiguous=ambiguous)
            cause = self._printable(exc)
        except BaseException:
            conn.close()  # interrupted in the middle of who knows what: never reuse it
            raise
        raise error from cause  # out of the handler (`_printable`)

    def failure(self, action: str, exc: BaseException, *, timed_out: bool = False,
                ambiguous: bool = False) -> PostgresError:
        if timed_out:
            reason = f"no answer within {self.endpoint.timeout:g} s; the connection was dropped"
        else:
            reason = f"{type(exc).__name__}: {_one_line(exc)}"
        message = f"{self.where}: {action} failed: {reason}"
        if ambiguous:
            message += ("; the connection broke after COMMIT was sent, so whether it committed "
                        "is settled before the next write")
        return PostgresError(self.redact(message), ambiguous=ambiguous)

    def redact(self, text: str) -> str:
        return redact(text, self.endpoint.secrets)

    def _printable(self, exc: BaseException) -> BaseException | None:
        """`exc` as the cause of ours, unless its text holds a password (a traceback prints
        it): then none. Ours is raised out of the handler of `exc`, which would otherwise be
        kept as its `__context__` (hidden from a traceback, not from what walks it)."""
        text = str(exc)
        return exc if self.redact(text) == text else None

    def _rolled_back(self, conn: Connection) -> bool:
        """Leave a connection that saw a server-reported error outside any transaction; False
        if that is not possible (the caller then closes it)."""
        try:
            if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                with self.timer.bound(conn) as watch:
                    conn.execute("ROLLBACK")
                return not watch.fired
            return True
        except psycopg.Error:
            return False

    def close(self) -> None:
        self.timer.close()


def usable(conn: Connection) -> bool:
    """Whether an idle connection can be used. An idle connection has nothing to read unless
    the server or the network closed it (or it sent a notice; reconnecting then costs little),
    so one poll spares the first call after a restart or an idle cut a certain failure."""
    if conn.closed or conn.broken:
        return False
    poller = select.poll()  # not select(): no limit on the descriptor's number
    poller.register(conn.fileno(), select.POLLIN)
    return not poller.poll(0)


def in_transaction(conn: Connection) -> bool:
    """Whether an open connection is inside a transaction block."""
    return not conn.closed and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class FairSlots:
    """A semaphore that serves its waiters in turn: a slot given back goes to the thread that
    has waited longest. threading's lets the thread that gives it back take it again at once
    (it holds the GIL), so 8 threads reading in a loop kept the pool, and `keys()`, `len()`
    and the flusher's reads, all waiting for a connection with the flusher's mutex held,
    waited up to 14 s: no flush, writers stalled on backpressure (an outside hunt).

    An interrupt anywhere in `__enter__`, or in `__exit__` once it has begun, loses no slot
    and strands no waiter (tests/test_postgres_backend.py). One raised as `__exit__`'s frame
    starts, before its first line, loses the slot given back: no `__exit__` written in
    Python can help that."""

    def __init__(self, size: int) -> None:
        self._lock = threading.Lock()
        self._free = size
        self._waiting: deque[_Turn] = deque()

    # Interrupts (a signal handler's exception) land where CPython checks for them: as a
    # call returns, never between two plain statements. Each step below is ordered so that a
    # slot is never lost or given twice wherever one lands (tests/test_postgres_backend.py).
    RECHECK = 1.0  # s between a waiter's looks at `handed`, should its wake-up have been cut

    def __enter__(self) -> None:
        turn: _Turn | None = None
        took = False
        try:
            with self._lock:
                if self._free and not self._waiting:
                    self._free -= 1
                    took = True  # no interrupt between the two; one as the lock is let go
                    return  # is handled below: the slot goes back
                turn = _Turn()
                self._waiting.append(turn)
            while not turn.lock.acquire(True, self.RECHECK):  # `__exit__` releases it
                with self._lock:
                    if turn.handed:  # handed, its release cut short
                        break
        except BaseException:  # interrupted: give up the place, or the slot if it came
            if turn is not None:
                with self._lock:
                    if turn in self._waiting:
                        self._waiting.remove(turn)
                        turn = None
                took = turn is not None and turn.handed
            if took:
                self.__exit__()
            raise

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            if self._waiting:
                turn = self._waiting[0]
                turn.handed = True  # first: the waiter sees it should what follows be cut
                self._waiting.popleft()
                turn.lock.release()
            else:
                self._free += 1


class _Turn:
    """A thread's place in `FairSlots`' queue: `lock` is held until a slot is `handed`."""

    __slots__ = ("lock", "handed")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()
        self.handed = False


class ReaderPool:
    """Up to `size` autocommit connections shared by reading threads, handed out in turn
    (`FairSlots`); a connection that failed is dropped and replaced on demand."""

    def __init__(self, link: Link, size: int) -> None:
        self._link = link
        self._slots = FairSlots(size)
        self._lock = threading.Lock()
        self._idle: list[Connection] = []
        self._closed = False

    @contextmanager
    def connection(self) -> Iterator[Connection]:
        with self._slots:
            if self._closed:
                raise PostgresError(f"{self._link.where}: the backend is closed")
            conn = None
            while conn is None:
                with self._lock:
                    conn = self._idle.pop() if self._idle else None
                if conn is None:
                    conn = self._link.connect()
                elif not usable(conn):
                    conn.close()
                    conn = None
            try:
                yield conn
            finally:
                with self._lock:
                    keep = not self._closed and not conn.closed and not conn.broken
                    if keep:
                        self._idle.append(conn)
                if not keep:
                    conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
