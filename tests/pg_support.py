"""What the PostgreSQL tests share: the server's DSN, a throw-away schema per test, backends on
tables in it, a TCP proxy that can take the database away (and report what crossed it), and
polling with a deadline.

Tests talk to a real server. The DSN comes from WBCACHE_TEST_PG_DSN, or is the usual local
server (postgresql://postgres@127.0.0.1:5432/test) when one answers there; without either the
tests skip (`require_service`, saying how to enable them), and CI, which sets
WBCACHE_REQUIRE_SERVICES=1, fails instead. Every test
works in its own schema `wbt_<random>`, dropped (CASCADE) when it ends, so nothing else on the
server is ever touched.
"""

from __future__ import annotations

import os
import select
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import psycopg
import pytest
from conftest import require_service
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import wbcache
from wbcache import FlushError
from wbcache.backends.postgres import PostgresBackend

DSN_VARIABLE = "WBCACHE_TEST_PG_DSN"
MakeBackend = Callable[..., PostgresBackend]
OpenCache = Callable[..., wbcache.Cache]


LOCAL_DSN = "postgresql://postgres@127.0.0.1:5432/test"
_probed: list[str | None] = []


def local_server() -> str | None:
    """LOCAL_DSN if a PostgreSQL server answers there (probed once per run), else None."""
    if not _probed:
        try:
            psycopg.connect(LOCAL_DSN, connect_timeout=2).close()
            _probed.append(LOCAL_DSN)
        except psycopg.Error:
            _probed.append(None)
    return _probed[0]


def server_dsn() -> str:
    """The test server's DSN: WBCACHE_TEST_PG_DSN, or the usual local server when one answers
    there; skips (fails under WBCACHE_REQUIRE_SERVICES=1) without either."""
    dsn = os.environ.get(DSN_VARIABLE) or local_server()
    if not dsn:
        require_service("PostgreSQL", f"no server at {LOCAL_DSN} and {DSN_VARIABLE} is not "
                                      f"set: set it to a server's DSN to run these tests")
    assert dsn is not None
    return dsn


# The fixtures are named `*_fixture` so that a test module imports them (which registers them
# under their `name`) without its test parameters shadowing an imported name.

@pytest.fixture(name="pg_dsn")
def pg_dsn_fixture() -> str:
    return server_dsn()


@pytest.fixture(name="pg_schema")
def pg_schema_fixture(pg_dsn: str) -> Iterator[str]:
    """A fresh schema for this test alone; dropped with everything in it afterwards."""
    schema = f"wbt_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield schema
    finally:
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture(name="make_backend")
def make_backend_fixture(pg_dsn: str, pg_schema: str) -> Iterator[MakeBackend]:
    """Backends on tables in this test's schema; all closed before the schema is dropped."""
    made: list[PostgresBackend] = []

    def make(cache_id: str | None = "node-a", table: str = "wbcache", dsn: str | None = None,
             **options: Any) -> PostgresBackend:
        backend = PostgresBackend(dsn or pg_dsn, table=f"{pg_schema}.{table}", cache_id=cache_id,
                                  **options)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


@pytest.fixture(name="table")
def table_fixture(pg_schema: str) -> str:
    return f"{pg_schema}.wbcache"


@pytest.fixture(name="open_pg")
def open_pg_fixture(tmp_path: Path, pg_dsn: str, table: str) -> Iterator[OpenCache]:
    """Open a cache directory `name` over the test's table (through `dsn` if given); every
    cache and backend is closed at teardown, before the schema is dropped."""
    opened: list[tuple[wbcache.Cache, PostgresBackend]] = []

    def open_(name: str, dsn: str | None = None, backend_options: dict[str, Any] | None = None,
              **options: Any) -> wbcache.Cache:
        backend = PostgresBackend(dsn or pg_dsn, table=table, **(backend_options or {}))
        try:
            cache = wbcache.open(tmp_path / name, backend=backend, **options)
        except BaseException:
            backend.close()
            raise
        opened.append((cache, backend))
        return cache

    yield open_
    for cache, backend in opened:
        try:
            cache.close()
        except FlushError:  # a test that left the database away, or a refused copy's original:
            pass  # the log keeps the data
        backend.close()


def pack(value: Any) -> bytes:
    return msgpack.packb(value)  # type: ignore[no-any-return]


def value_of(backend: PostgresBackend, key: str | bytes) -> Any:
    encoded = backend.get(key)
    return None if encoded is None else msgpack.unpackb(encoded)


def query(dsn: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows of one statement on a connection of its own (the tests' view of the server)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        cursor = conn.execute(sql, params)  # type: ignore[arg-type]
        return cursor.fetchall() if cursor.description is not None else []


def stored_ints(dsn: str, table: str, prefix: str) -> dict[str, int]:
    """{str key: int} of every int row whose (str) key starts with `prefix`, read with SQL."""
    rows = query(dsn, f"SELECT key, num FROM {table} WHERE key >= %s AND key < %s "
                      "AND num IS NOT NULL",
                 (b"s" + prefix.encode(), b"s" + prefix.encode() + b"\xff"))
    return {bytes(key)[1:].decode(): num for key, num in rows}


def with_address(dsn: str, host: str, port: int) -> str:
    params: dict[str, Any] = dict(conninfo_to_dict(dsn))
    params.pop("hostaddr", None)
    params.update(host=host, port=str(port))
    return make_conninfo(**params)


class TcpProxy:
    """Forwards 127.0.0.1:<port> to the server and can take it away in four ways:

    * `cut()`: close every connection and stop listening (new connections are refused);
      `restore()` listens on the same port again.
    * `stall()`: keep connections (and accept new ones) but forward nothing either way, like
      a network that acknowledges and never delivers; `unstall()` resumes forwarding.
    * `hold_commit()`: the next request that holds a COMMIT is held back, and its connection
      forwards nothing more either way (others work); `thaw()` forwards it -- a COMMIT
      delivered late -- or `cut()` drops it.
    * `swallow_commit_reply()`: the reply to the next COMMIT is dropped and both sides of that
      connection closed -- the COMMIT went through, its answer is lost.

    `record_turns()` then `turns()` count request/reply alternations (round trips) since;
    `record_messages()` then `messages()` list the protocol messages clients sent since, as
    (type, length) -- e.g. ("B", n) for each statement's Bind with its parameters. (A client
    that negotiates TLS cannot be read: give those tests a DSN with sslmode=disable.)
    """

    def __init__(self, dsn: str) -> None:
        params = conninfo_to_dict(dsn)
        self._target = (str(params.get("hostaddr") or params.get("host") or "127.0.0.1"),
                        int(params.get("port") or 5432))
        self.dsn = with_address(dsn, "127.0.0.1", 0)
        self._lock = threading.Lock()
        self._pipes: set[_Pipe] = set()
        self._stalled = threading.Event()
        self._hold_commit = False
        self._swallow_commit_reply = False
        self._cut_after_swallow = False
        self._directions: list[str] | None = None
        self._messages: list[tuple[str, int]] | None = None
        self._listener: socket.socket | None = None
        self.port = 0
        self._listen()
        self.dsn = with_address(dsn, "127.0.0.1", self.port)

    # ------------------------------------------------------------ control

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            pipes, self._pipes = self._pipes, set()
        if listener is not None:
            try:  # wakes the accepting thread and stops listening (close alone does neither)
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        for pipe in pipes:
            pipe.close()

    def restore(self) -> None:
        self._listen()

    def stall(self) -> None:
        self._stalled.set()

    def unstall(self) -> None:
        self._stalled.clear()

    def hold_commit(self) -> None:
        with self._lock:
            self._hold_commit = True

    def thaw(self) -> None:
        with self._lock:
            for pipe in self._pipes:
                pipe.frozen.clear()

    def swallow_commit_reply(self, *, then_cut: bool = False) -> None:
        """With `then_cut`, the proxy also `cut()`s itself right after, so a retry is refused."""
        with self._lock:
            self._swallow_commit_reply = True
            self._cut_after_swallow = then_cut

    def record_turns(self) -> None:
        with self._lock:
            self._directions = []

    def turns(self) -> int:
        """Request/reply round trips since `record_turns` (consecutive data one way is one)."""
        with self._lock:
            directions = list(self._directions or [])
        return sum(1 for before, after in zip(directions, directions[1:], strict=False)
                   if before == "request" and after == "reply")

    def record_messages(self) -> None:
        with self._lock:
            self._messages = []

    def messages(self) -> list[tuple[str, int]]:
        """(type, length) of each message clients sent since `record_messages`."""
        with self._lock:
            return list(self._messages or [])

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._pipes)

    def close(self) -> None:
        self.cut()

    # ------------------------------------------------------------ machinery

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut: the listener was closed
            try:
                server = socket.create_connection(self._target)
            except OSError:
                client.close()
                continue
            pipe = _Pipe(self, client, server)
            with self._lock:
                cut = self._listener is not listener  # cut meanwhile: the pipe ends at once
                if cut:
                    pipe.close()
                else:
                    self._pipes.add(pipe)
            threading.Thread(target=pipe.run, daemon=True).start()

    def _take_flag(self, name: str) -> bool:
        with self._lock:
            value: bool = getattr(self, name)
            setattr(self, name, False)
            return value

    def _note(self, direction: str) -> None:
        with self._lock:
            directions = self._directions
            if directions is not None and (not directions or directions[-1] != direction):
                directions.append(direction)

    def _note_messages(self, found: list[tuple[str, int, bool]]) -> None:
        with self._lock:
            if self._messages is not None:
                self._messages.extend((kind, length) for kind, length, _commit in found)

    def _forget(self, pipe: _Pipe) -> None:
        with self._lock:
            self._pipes.discard(pipe)


class _Pipe:
    def __init__(self, proxy: TcpProxy, client: socket.socket, server: socket.socket) -> None:
        self._proxy = proxy
        self._client = client
        self._server = server
        self._closed = threading.Event()
        self.frozen = threading.Event()  # forward nothing either way (see hold_commit)
        self.held: bytes | None = None  # a request held back, sent on thaw
        self._requests = _MessageHeaders()
        self._swallow_reply = False

    def run(self) -> None:
        proxy = self._proxy
        try:
            while not self._closed.is_set():
                # Frozen, the pipe reads neither side: it does not even notice the client
                # hang up, so the server keeps the session (and its open transaction).
                if proxy._stalled.is_set() or self.frozen.is_set():
                    self._closed.wait(0.02)
                    continue
                if self.held is not None:
                    held, self.held = self.held, None
                    self._server.sendall(held)
                ready, _, _ = select.select([self._client, self._server], [], [], 0.02)
                for source in ready:
                    data = source.recv(65536)
                    if not data:
                        return
                    if source is self._client:
                        self._request(data)
                    else:
                        if self._swallow_reply:
                            if proxy._take_flag("_cut_after_swallow"):
                                proxy.cut()
                            return
                        proxy._note("reply")
                        self._client.sendall(data)
        except OSError:
            pass  # a side went away (or cut() shut the sockets down under us)
        finally:
            self.close()
            proxy._forget(self)
            self._client.close()
            self._server.close()

    def _request(self, data: bytes) -> None:
        proxy = self._proxy
        found = self._requests.feed(data)
        proxy._note("request")
        proxy._note_messages(found)
        if any(commit for _kind, _length, commit in found):
            if proxy._take_flag("_hold_commit"):
                self.held = data
                self.frozen.set()
                return
            if proxy._take_flag("_swallow_commit_reply"):
                self._swallow_reply = True
        self._server.sendall(data)

    def close(self) -> None:
        """Shut both sides down; the pipe's own thread closes the sockets (so no descriptor
        is closed while it may still be selecting on it)."""
        self._closed.set()
        for sock in (self._client, self._server):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class _MessageHeaders:
    """Splits what a client sends into protocol messages, noting each one's type, length and
    whether it runs a COMMIT: a simple Query, or a Parse, of text starting so, or a Bind of a
    statement prepared from such a Parse. The startup packets, which have no type byte, are
    skipped: an SSL or GSS encryption request (answered "no" by a server without TLS) and then
    the StartupMessage."""

    _ENCRYPTION_REQUESTS = (80877103, 80877104)  # SSLRequest, GSSENCRequest codes
    _PEEK = 64  # body bytes read of a Query, Parse or Bind: names and the statement's start

    def __init__(self) -> None:
        self._typed = False  # past the StartupMessage: every message starts with its type
        self._header = b""
        self._skip = 0  # body bytes of the current message still to pass over
        self._peeking: tuple[str, int] | None = None  # a Q, P or B, until _PEEK bytes are in
        self._peek = b""
        self._commit_statements: set[bytes] = set()  # prepared statements that COMMIT

    def feed(self, data: bytes) -> list[tuple[str, int, bool]]:
        found: list[tuple[str, int, bool]] = []
        pos = 0
        while pos < len(data):
            if self._skip:
                step = min(self._skip, len(data) - pos)
                if self._peeking is not None:
                    self._peek += data[pos:pos + min(step, self._PEEK - len(self._peek))]
                    if len(self._peek) == self._PEEK or step == self._skip:
                        kind, length = self._peeking
                        found.append((kind, length, self._commits(kind, self._peek)))
                        self._peeking, self._peek = None, b""
                self._skip -= step
                pos += step
                continue
            size = 5 if self._typed else 8  # type + length, or length + request code
            taken = data[pos:pos + size - len(self._header)]
            self._header += taken
            pos += len(taken)
            if len(self._header) < size:
                break
            if self._typed:
                kind = chr(self._header[0])
                length = int.from_bytes(self._header[1:5], "big")  # counts itself, not the type
                self._skip = length - 4
                if kind in "QPB" and self._skip:
                    self._peeking = (kind, length)
                else:
                    found.append((kind, length, False))
            else:
                length = int.from_bytes(self._header[:4], "big")
                self._skip = length - 8
                self._typed = int.from_bytes(self._header[4:8], "big") \
                    not in self._ENCRYPTION_REQUESTS
            self._header = b""
        return found

    def _commits(self, kind: str, body: bytes) -> bool:
        if kind == "Q":  # the query text
            return body.upper().startswith(b"COMMIT")
        first, _, rest = body.partition(b"\0")
        if kind == "P":  # statement name, query text
            commit = rest.upper().startswith(b"COMMIT")
            if commit and first:
                self._commit_statements.add(first)
            return commit
        return rest.partition(b"\0")[0] in self._commit_statements  # Bind: portal, statement


@pytest.fixture(name="pg_proxy")
def pg_proxy_fixture(pg_dsn: str) -> Iterator[TcpProxy]:
    proxy = TcpProxy(pg_dsn)
    yield proxy
    proxy.close()
