"""`PostgresBackend`: many cache directories (one per process or node) flushing into one
PostgreSQL database, each write applied exactly once.

Each directory has a `cache_id` (DIR/cache_id, attached by `wbcache.open`) and its own row in
`<table>_checkpoints`. A flush is ONE transaction (its statements, pipelined, with the
checkpoint last; once they are all answered, its COMMIT): every log record of that directory
with LSN <= its checkpoint is in the table, and no other. Its rows are written in key order,
deletes, puts and increments in one pass, so flushes of many caches queue rather than deadlock
(postgres_schema); a flush of more than `statement_bytes` goes as several statements of that
one transaction, since PostgreSQL refuses a message over 1 GiB. Recovery replays only what the
checkpoint lacks, so a crash between COMMIT and log truncation replays nothing twice.
Increments arrive as coalesced deltas and are added by PostgreSQL to what the row holds, so
increments of one counter by many caches all count; puts are last-flush-wins.

One hole remains that a checkpoint alone cannot close: the connection breaking after COMMIT was
sent (an *ambiguous* commit; any failure before it, the COMMIT being sent only after every
statement was answered, is certain to have committed nothing). The flusher then retries
the same batch, or, after `flush()` gave up, a newer batch that still contains it; re-adding
its deltas would count them twice, and the lost transaction may even still be on its way and
commit later. Two things close it:
  * every flush moves the checkpoint by compare-and-set, from the value this backend knows is
    stored (`_known`) to the new one, so of the transactions sent from one known value at most
    one ever commits, however late it arrives;
  * the backend remembers what each unanswered transaction sent, and before its next write
    reads the checkpoint: if one of them committed, its deltas count as settled and are
    subtracted from what is sent next (a retry of that very transaction becomes a no-op).
`attach()`, called at every open before recovery, starts afresh; `checkpoint()` only reads.

A copy of a directory (`cp -a`) has the same cache_id. Once the original has flushed past the
copy's unflushed writes, the stored checkpoint covers their LSNs, and the copy's recovery
would take them for flushed. So each flush also moves a random token, stored beside the
checkpoint, from the one it read to a new one that the directory saved first (DIR/
checkpoint_token, wbcache/layout.py `TokenFile`); a directory that meets a token it never
saved is refused at `checkpoint()` and at every flush (`_stored`). A backend used
without a directory (`cache_id=` given, no `attach` tokens) checks no token and clears it.

Layout of the tables and the SQL: `postgres_schema`. Connections, timeouts and the readers'
pool: `postgres_link` (imported on first use, so `wbcache` imports without psycopg). About 780
lines: the flush's state (the checkpoint known, the flushes whose answer was lost, the
tokens) is one state machine under one lock, read in one place; and the URL's reading
(libpq's rules, what is ours) stays beside the constructor it feeds, so what reaches libpq
can be checked in one place.
"""

from __future__ import annotations

import logging
import math
import os
import re
import secrets
import threading
import time
from collections.abc import Collection, Generator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes

from wbcache import forking
from wbcache.backends.base import CheckpointTokens, Key
from wbcache.backends.postgres_schema import (
    ADDED_COLUMNS,
    CHECKPOINT_CONFLICT_MARK,
    DDL_LOCK_CLASS,
    EXPECTED_COLUMNS,
    MAX_KEY_SIZE,
    NULLABLE,
    STATEMENT_BYTES,
    UNIQUE_COLUMN,
    Statements,
    TableNames,
    decode_key,
    encode_key,
    flush_rows,
    join_value,
)
from wbcache.backends.postgres_secrets import redact, redact_dsn_complaint
from wbcache.errors import (
    CheckpointConflictError,
    PostgresError,
    SchemaMismatchError,
    WbcacheError,
)

if TYPE_CHECKING:
    from wbcache.backends.postgres_link import Connection

__all__ = ["STATEMENT_BYTES", "CheckpointConflictError", "PostgresBackend", "PostgresError",
           "SchemaMismatchError", "redact", "redact_dsn_complaint"]

log = logging.getLogger("wbcache.postgres")

_DEFAULT_TABLE = "wbcache"
MAX_TIMEOUT = 2_000_000  # s: libpq takes tcp_user_timeout in ms, a 32-bit int (2**31 ms)
_ITEMS_CHUNK = 5000  # rows per FETCH when iterating the table
_OWNER_READS = 5  # reads of a stored token missing from the directory's file (`_stored`)
_ALTER_LOCK_TIMEOUT = "100ms"  # the ALTER's wait for the checkpoints table (`_add_token_column`)
_ALTER_AGAIN = 60.0  # s before a flush tries an ALTER that failed again
URL_PREFIXES = ("postgresql://", "postgres://")  # libpq's
_URL_OPTIONS = {"table": str, "cache_id": str, "timeout": float, "read_connections": int}


@dataclass
class _Attempt:
    """A flush sent from the current known checkpoint whose answer was lost with the connection:
    it may have committed, may yet commit, or never will."""

    checkpoint: int
    increments: dict[Key, int] = field(default_factory=dict)


def _summed(pending: Sequence[tuple[Key, int]]) -> dict[Key, int]:
    """The increments a flush sends, per key."""
    sent: dict[Key, int] = {}
    for key, delta in pending:
        sent[key] = sent.get(key, 0) + delta
    return sent


def _link_module() -> Any:
    """wbcache.backends.postgres_link, imported on first use (it imports psycopg)."""
    try:
        from wbcache.backends import postgres_link
    except ImportError as exc:
        raise ImportError("the PostgreSQL backend needs psycopg 3: "
                          "pip install 'wbcache[postgres]'") from exc
    return postgres_link


def _url_user_info_end(url: str) -> int:
    """Where the host part of `url` (starting with one of `URL_PREFIXES`) starts, as libpq
    reads it: after the user info, which ends at the first '@' met before any '/'. Refuses,
    naming no part of it, a URL whose password such a reading would cut short: a raw '/',
    '?' or '#' in the password makes the rest of it the database, a parameter or (for other
    readers of URLs) a fragment, printed as such; a raw '@' ends the user info at the first
    '@' for libpq (at the last for others), and the rest would be printed as the host."""
    start = len(next(prefix for prefix in URL_PREFIXES if url.startswith(prefix)))
    at = url.find("@", start)
    if at != -1 and (url.count("@") > 1 or any(c in url[start:at] for c in "/?#")):
        raise ValueError("the URL has an '@' after its host, or more than one before it: "
                         "percent-encode a password's '/', '?', '#' and '@' (%2F, %3F, %23, "
                         "%40), and an '@' in a parameter (%40)")
    return start if at == -1 else at + 1


def url_query_at(url: str) -> int:
    """Where the query of `url` (starting with one of `URL_PREFIXES`) starts: its '?', the
    first after the user info, as libpq reads it; -1 without one. ValueError as
    `_url_user_info_end`."""
    return url.find("?", _url_user_info_end(url))


def _url_value(name: str, text: str) -> str:
    """A URL parameter's value, percent-decoded as libpq decodes it (a '+' is itself)."""
    if re.search(r"%(?![0-9A-Fa-f]{2})|%00| ", text) is None:
        try:
            return unquote_to_bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            pass
    raise ValueError(f"URL parameter {name}: not a percent-encoded UTF-8 text without spaces "
                     f"(%20) or %00")


class PostgresBackend:
    """A PostgreSQL database shared by many caches. See docs/postgres.md.

    `dsn`: a libpq connection string or URL. `table`: the data table, "name" or "schema.name"
    (the checkpoints go in `<table>_checkpoints`); both are created if missing. `cache_id`:
    normally left None for `wbcache.open` to attach the directory's own; if given, opening a
    directory with another id raises `ValueError`. `timeout` (s, default 10.0): the longest any
    call waits for the server (also its statement_timeout); `connect_timeout` (s, default 5.0,
    at least 2): the longest a connection attempt takes; `read_connections` (default 4): the
    connections `get`/`count`/`items` share across threads. Writes use one more connection.
    `statement_bytes` (default `STATEMENT_BYTES`, 64 MiB): the most bytes of keys and values
    one statement of a flush carries; a larger flush is sent as several statements of its one
    transaction (PostgreSQL refuses any message over 1 GiB), waiting for the server's answers
    after each such amount. Nothing but tests needs to change it. `create_tables` (default
    True): False to only use tables that exist (a use that must change nothing, as the CLI's
    commands: a mistyped table then raises `SchemaMismatchError` rather than being made).

    Raises `PostgresError` (a `WbcacheError`) when the server cannot be reached or reports an
    error, `SchemaMismatchError` if the table exists with other columns, `ImportError` without
    psycopg (`pip install 'wbcache[postgres]'`).
    """

    kind = "postgresql"  # recorded in DIR/backend
    applies_increments = True  # increments arrive as deltas and are added in the database
    default_read_ttl = 1.0  # s a clean entry is served from memory before it is read again

    def __init__(self, dsn: str, table: str = _DEFAULT_TABLE, cache_id: str | None = None, *,
                 timeout: float = 10.0, connect_timeout: float = 5.0,
                 read_connections: int = 4, statement_bytes: int = STATEMENT_BYTES,
                 create_tables: bool = True) -> None:
        link = _link_module()
        Endpoint, Link, ReaderPool = link.Endpoint, link.Link, link.ReaderPool  # noqa: N806
        if not isinstance(dsn, str):
            raise TypeError(f"dsn must be a str, not {type(dsn).__name__}")
        if dsn.startswith(URL_PREFIXES):  # a URL, not key=value pairs
            _url_user_info_end(dsn)
        for name, value in (("timeout", timeout), ("connect_timeout", connect_timeout)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
            if value > MAX_TIMEOUT:  # passed on to libpq in ms, as a 32-bit int
                raise ValueError(f"{name} must be at most {MAX_TIMEOUT:,} seconds (about 23 "
                                 f"days), not {value!r}")
        if not isinstance(create_tables, bool):  # "no" would count as True
            raise TypeError(f"create_tables must be True or False, not {create_tables!r}")
        for name, count in (("read_connections", read_connections),
                            ("statement_bytes", statement_bytes)):
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"{name} must be a positive int, not {count!r}")
        self._statement_bytes = statement_bytes
        self._explicit_id = _check_cache_id(cache_id) if cache_id is not None else None
        self._cache_id = self._explicit_id
        self._names = TableNames.parse(table)  # schema-qualified once the server resolves it
        self._sql = Statements(self._names)
        self._link = Link(Endpoint.from_dsn(dsn, connect_timeout=connect_timeout,
                                            timeout=timeout), self._names.data)
        self._readers = ReaderPool(self._link, read_connections)
        self._write_lock = threading.Lock()  # the writer connection and the attempt state
        self._writer: Connection | None = None
        # Under the write lock: the checkpoint known to be stored (None: read it first); the
        # flushes sent from it whose answer was lost; the deltas of the batch in flight that
        # one of those committed (so they are in the database already).
        self._known: int | None = None
        # With `_known`: the token stored with it, and the one the next flush writes (saved
        # in the directory first).
        self._tokens: CheckpointTokens | None = None
        self._token: str | None = None
        self._pending: str | None = None
        # A table without the token column: whether this attach looked for it again (another
        # node may have added it), and when a flush may next try to add it.
        self._column_looked = False
        self._alter_at = 0.0
        self._uncertain: list[_Attempt] = []
        self._settled: dict[Key, int] = {}
        # The last checkpoint a flush of this attach committed (a flush sent again after an
        # interrupt hid its commit is recognised by it; a copy's flush is still refused).
        self._committed: int | None = None
        # A flush failed since the last that committed: the next looks for flushes cut off
        # first (`_end_stuck_flushes`), whose row locks may be what it failed on.
        self._retrying = False
        self._closed = False
        self._pid = os.getpid()
        try:
            with self._write_lock:
                self._ensure_tables(create_tables)
        except BaseException:
            self.close()
            raise
        forking.track(self)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> PostgresBackend:
        """A backend from one URL: `postgresql://user@host:5432/db?table=wbcache`. The query
        parameters `table`, `cache_id`, `timeout` and `read_connections` are this class's;
        any other goes to libpq (e.g. `sslmode=require`). Keyword `options` win over the URL."""
        dsn, ours = cls.split_url(url)
        ours.update(options)
        return cls(dsn, **ours)

    @classmethod
    def url_table(cls, url: str) -> str:
        """The data table a backend made from `url` would use (as `table` reads it), without
        connecting. ValueError for a URL `from_url` would refuse."""
        return TableNames.parse(cls.split_url(url)[1].get("table", _DEFAULT_TABLE)).data

    @staticmethod
    def split_url(url: str) -> tuple[str, dict[str, Any]]:
        """`url` as the DSN for libpq (the URL as written, this class's parameters taken out
        of it) and this class's keyword arguments from it. ValueError as `from_url`."""
        if not isinstance(url, str):
            raise TypeError(f"url must be a str, not {type(url).__name__}")
        if not url.startswith(URL_PREFIXES):  # libpq's prefixes, in lower case
            raise ValueError("not a PostgreSQL URL: one starts with postgresql:// or "
                             "postgres://, in lower case")  # never the URL
        # Only this class's parameters are taken out of the query; everything else is left
        # as written, for libpq to read (and refuse) as it reads any URL.
        query_at = url_query_at(url)
        kept: list[str] = []
        ours: dict[str, Any] = {}
        for piece in url[query_at + 1:].split("&") if query_at != -1 else ():
            raw_name, equals, raw_value = piece.partition("=")
            try:
                name = _url_value("name", raw_name)
            except ValueError:
                name = None  # not one of ours: libpq refuses it
            kind = _URL_OPTIONS.get(name) if equals and name is not None else None
            if kind is None:
                kept.append(piece)
                continue
            value = _url_value(name, raw_value)
            try:
                ours[name] = kind(value)
            except ValueError:
                raise ValueError(f"URL parameter {name}={value!r} is not "
                                 f"a {kind.__name__}") from None
        dsn = url if query_at == -1 or not ours else (
            url[:query_at] + ("?" + "&".join(kept) if kept else ""))
        # Read by libpq now, its complaint redacted as the URL given requires.
        _link_module().parse_dsn(dsn, given=url)
        return dsn, ours

    # ---------------------------------------------------------------- identity

    def attach(self, cache_id: str, tokens: CheckpointTokens | None = None) -> None:
        """Called by `wbcache.open` with the directory's id and token file: from here on,
        `checkpoint` and `apply` read and write that directory's checkpoint, and refuse one
        a copy of the directory wrote (module docstring). One backend serves one
        directory."""
        cache_id = _check_cache_id(cache_id)
        if self._explicit_id is not None and cache_id != self._explicit_id:
            raise ValueError(f"this PostgresBackend was made with cache_id={self._explicit_id!r} "
                             f"but the cache directory's id is {cache_id!r}")
        with self._write_lock:
            if self._cache_id is not None and cache_id != self._cache_id:
                raise ValueError(f"this PostgresBackend is attached to cache {self._cache_id!r}; "
                                 f"use one backend per cache directory (not {cache_id!r})")
            self._cache_id = cache_id
            self._known = self._committed = None
            self._tokens, self._token, self._pending = tokens, None, None
            self._column_looked, self._alter_at = False, 0.0
            self._forget_attempts()

    @property
    def cache_id(self) -> str | None:
        return self._cache_id

    @property
    def max_key_size(self) -> int:
        return MAX_KEY_SIZE

    @property
    def table(self) -> str:
        """The data table, schema included as the server resolved it when the backend was
        made ("public.wbcache" for table="wbcache"), which every statement names: what
        DIR/backend records."""
        return self._names.data

    # ---------------------------------------------------------------- reads

    def get(self, key: Key) -> bytes | None:
        stored = encode_key(key)
        with self._readers.connection() as conn:
            row = self._link.call(conn, f"reading key {key!r}", lambda c: c.cursor(
                binary=True).execute(self._sql.get, (stored,)).fetchone())
        return None if row is None else join_value(*row)

    def get_many(self, keys: Collection[Key]) -> dict[Key, bytes | None]:
        """`get` of each of `keys`, in one statement: one round trip, however many keys (the
        flusher reads counters back after a flush: wbcache/flusher.py)."""
        stored = {encode_key(key): key for key in keys}
        with self._readers.connection() as conn:
            rows = self._link.call(conn, f"reading {len(stored)} keys", lambda c: c.cursor(
                binary=True).execute(self._sql.get_many, (list(stored),)).fetchall())
        found: dict[Key, bytes | None] = dict.fromkeys(keys)
        for key, num, value in rows:
            found[stored[bytes(key)]] = join_value(num, value)
        return found

    def count(self) -> int:
        with self._readers.connection() as conn:
            row = self._link.call(conn, "counting keys",
                                  lambda c: c.execute(self._sql.count).fetchone())
        assert row is not None
        return int(row[0])

    def items(self) -> Generator[tuple[Key, bytes], None, None]:
        """Every (key, encoded value), from one snapshot (one server-side cursor), fetched
        in chunks of 5,000 rows."""
        from wbcache.backends.postgres_link import in_transaction

        action = "reading every entry"
        with self._readers.connection() as conn:
            cursor = conn.cursor(name="wbcache_items", binary=True)
            try:
                self._link.call(conn, action, lambda c: (c.execute("BEGIN"),
                                                         cursor.execute(self._sql.items)))
                while True:
                    rows = self._link.call(conn, action, lambda c: cursor.fetchmany(_ITEMS_CHUNK))
                    for stored, num, value in rows:
                        yield decode_key(stored), join_value(num, value)
                    if len(rows) < _ITEMS_CHUNK:
                        break
                self._link.call(conn, action, lambda c: c.execute("COMMIT"))
            finally:
                if in_transaction(conn):  # left mid-way (an error, or the caller stopped)
                    conn.close()

    def checkpoint(self) -> int:
        """This cache's checkpoint LSN as stored now (0 if it never flushed). A flush whose
        answer was lost stays remembered until a later flush settles it (it may still commit
        after this read); `attach`, at every open, is where a cache starts afresh. The first
        read after `attach` is what recovery replays from, so the first flush starts from it
        too: a flush of an earlier open that commits after it (its answer lost, the process
        gone) then refuses that flush, and the next open settles it, where a flush from the
        value found later would have added the replayed increments on top of it."""
        cache_id = self._require_cache_id()
        with self._readers.connection() as conn:
            lsn, token = self._stored(conn, f"reading the checkpoint of cache {cache_id}")
        if self._known is None:
            with self._write_lock:
                if self._known is None:
                    self._start_from(lsn, token)
        return lsn

    # ---------------------------------------------------------------- the flush

    def apply(self, puts: Collection[tuple[Key, bytes]], deletes: Sequence[Key], checkpoint: int,
              increments: Sequence[tuple[Key, int]] = ()) -> None:
        """Store `puts`, remove `deletes`, add `increments` and set this cache's checkpoint,
        in one transaction: its statements (a round trip per `statement_bytes`), then its
        COMMIT. Raises `PostgresError` (nothing committed, or an ambiguous commit that the next
        call settles), `CheckpointConflictError`."""
        cache_id = self._require_cache_id()
        with self._write_lock:
            conn = self._writer_connection()
            if self._retrying:
                self._end_stuck_flushes(conn)
            pending = self._settle(conn, checkpoint, increments)
            if pending is None:
                self._retrying = False
                return  # this very transaction had committed before the connection broke
            assert self._known is not None
            if checkpoint == self._committed:  # sent again (`Backend.apply`): it is in
                self._forget_attempts()
                return
            rows, beyond = flush_rows(puts, deletes, pending)  # bad keys raise before any I/O
            statements = self._sql.flush(rows, beyond, cache_id, checkpoint, self._known,
                                         self._statement_bytes, self._next_tokens())
            action = (f"flush of {len(puts)} puts, {len(deletes)} deletes and {len(pending)} "
                      f"increments up to LSN {checkpoint} of cache {cache_id}")
            # Recorded as a lost answer before it is sent, and forgotten only once known
            # not to have committed: an interrupt (KeyboardInterrupt) anywhere from here on,
            # a second one inside the handling of a first included, leaves it to be settled
            # (one that never commits is harmless to keep). Recorded in a handler, after the
            # COMMIT, a second interrupt could skip it, and every later flush met a
            # checkpoint it did not expect until a reopen.
            attempt = _Attempt(checkpoint, _summed(pending))
            self._uncertain.append(attempt)
            self._retrying = True  # until it is known to have committed
            try:
                self._link.transaction(conn, action, statements, self._statement_bytes)
            except PostgresError as exc:
                if not exc.ambiguous:  # refused or never sent: it did not commit
                    self._uncertain.remove(attempt)
                cause = str(exc.__cause__)
                if CHECKPOINT_CONFLICT_MARK not in cause:
                    raise
                detail = cause.partition(CHECKPOINT_CONFLICT_MARK)[2].strip(' "')
                if self._uncertain:  # one of ours, thought lost, got there first
                    raise PostgresError(f"{self._link.where}: {action} was refused: an earlier "
                                        f"flush whose answer was lost has committed ({detail}); "
                                        f"the next attempt settles it") from exc.__cause__
                raise self._conflict(checkpoint, detail) from exc.__cause__
            # Committed. Interrupted in what follows, the next flush settles it as a lost
            # answer (it is still recorded).
            if self._pending is not None:
                self._save_known(self._pending)
                self._token, self._pending = self._pending, None
            self._known = self._committed = checkpoint
            self._forget_attempts()  # the batch in flight is all in the database now

    def _save_known(self, token: str) -> None:
        """Write lock held, the flush that wrote `token` committed, and nothing of it noted
        yet (so an interrupt here leaves it to be settled as a lost answer): the token saved
        as known, so that neither a reopen nor a copy made from here on depends on the
        pending token's inode rule. The flush is done whatever happens here: a failure is
        logged, and until a later save the directory still knows the token as pending."""
        assert self._tokens is not None
        try:
            self._tokens.save(token, None)
        except (OSError, WbcacheError) as exc:
            log.warning("%s: could not record the checkpoint token of cache %s in the cache "
                        "directory (%s); the flush itself is done", self._link.where,
                        self._cache_id, exc)

    def _settle(self, conn: Connection, checkpoint: int,
                increments: Sequence[tuple[Key, int]]) -> list[tuple[Key, int]] | None:
        """Write lock held. The increments this flush still has to send, once the stored
        checkpoint is known and any flush whose answer was lost is settled; None if this flush
        is one of those and it committed."""
        if (self._tokens is not None and not self._sql.tokens and not self._uncertain
                and time.monotonic() >= self._alter_at):
            self._add_token_column(conn)
        if self._known is None or self._uncertain:
            stored, token = self._stored(conn, "reading the checkpoint before a flush")
            if self._known is None:
                self._start_from(stored, token)
            elif stored != self._known:
                committed = next((attempt for attempt in self._uncertain
                                  if attempt.checkpoint == stored), None)
                if committed is None or (self._checks and token != self._pending):
                    raise self._conflict(checkpoint, f"the stored checkpoint is {stored}, "
                                                     f"this cache last knew {self._known}")
                if self._checks:
                    assert token is not None
                    self._save_known(token)  # first: an interrupt leaves all to settle again
                for key, delta in committed.increments.items():
                    self._settled[key] = self._settled.get(key, 0) + delta
                self._known, self._token, self._pending = stored, token, None
                self._committed = stored
                self._uncertain = []  # sent from the old known value: none can commit now
                if checkpoint == stored:
                    self._settled = {}
                    return None
            # else none has committed yet; ours goes from the same known value, so at most
            # one of them ever will, and a refusal sends us back here
        settled = self._settled
        if not settled:
            return list(increments)
        return [(key, delta - settled.get(key, 0)) for key, delta in increments
                if delta != settled.get(key, 0)]

    def _start_from(self, stored: int, token: str | None) -> None:
        """Write lock held, the first checkpoint read since `attach` (and its token, found
        ours): what the first flush moves from. With the pending token the directory saved,
        if that flush must write it again: flushes of an earlier open may have been sent with
        it and not answered, from the token still stored, and may yet commit; a new token
        would leave the directory unable to recognise theirs. Read before anything is set,
        so that a failure here leaves it all to the next read."""
        pending = None
        if self._checks:
            assert self._tokens is not None
            pending = self._tokens.read()[1]
        self._known, self._token = stored, token
        self._pending = pending if pending is not None and pending != token else None

    def _next_tokens(self) -> tuple[str | None, str] | None:
        """Write lock held, just before a flush is sent: (the token stored, the one this
        flush writes), the latter saved in the directory first; None without tokens."""
        if not self._checks:
            return None
        assert self._tokens is not None
        if self._pending is None:
            pending = secrets.token_hex(16)
            self._tokens.save(self._token, pending)
            self._pending = pending
        return self._token, self._pending

    @property
    def _checks(self) -> bool:
        """Whether tokens are read and written: a directory's token file given, and the
        table has the column."""
        return self._tokens is not None and self._sql.tokens

    def _owns(self, token: str | None) -> bool:
        """Whether the stored `token` is one this directory wrote (or there is none to
        check). Read without the lock by `checkpoint`: a flush moving the tokens meanwhile
        sends it to the file, and `_stored` reads a token missing there again."""
        if not self._checks or token is None or token in (self._token, self._pending):
            return True
        assert self._tokens is not None
        return token in self._tokens.read()

    def _add_token_column(self, conn: Connection) -> None:
        """Write lock held, a flush with no answer outstanding, on a table made before tokens:
        add the column (under the lock table creation takes). The ALTER waits for the table
        at most `_ALTER_LOCK_TIMEOUT`: queued, it would hold up every other node's reads and
        flushes behind it. If it fails (busy, or a role that may not), the flushes go on
        without tokens, as before them, it says so, and a flush tries again after
        `_ALTER_AGAIN`. The switch is safe between flushes: this directory's row has no
        token yet, which is what `_token` (None) says."""
        names = self._names

        def alter(c: Connection) -> None:
            with c.transaction():
                c.execute(self._sql.lock_ddl, (DDL_LOCK_CLASS, names.data_sql))
                c.execute(f"SET LOCAL lock_timeout = '{_ALTER_LOCK_TIMEOUT}'")
                c.execute(self._sql.add_token)

        try:
            self._link.call(conn, f"adding the column token to {names.checkpoints}", alter)
        except PostgresError as exc:
            self._alter_at = time.monotonic() + _ALTER_AGAIN
            log.warning("%s; until it is added this directory cannot be told from a copy of "
                        "it (docs/postgres.md, \"A copied directory\"): the table's owner can "
                        "run %s", " ".join(str(exc).split()), self._sql.add_token)
            return
        self._sql = Statements(names)

    def _look_for_column(self, conn: Connection) -> None:
        """Once per `attach`, before a checkpoint read on a table that had no token column
        when this backend was made: another node (or an earlier open) may have added it
        since, and a read that ignored it would let a copy's recovery through."""
        self._column_looked = True
        columns = self._link.call(conn, "looking for the token column", lambda c: dict(
            c.execute(self._sql.columns, (self._names.checkpoints_sql,)).fetchall()))
        if "token" in columns:
            self._sql = Statements(self._names)

    def _forget_attempts(self) -> None:
        """The batch in flight is committed (or a new attach): nothing to settle or retry."""
        self._uncertain = []
        self._settled = {}
        self._retrying = False

    def _conflict(self, checkpoint: int, detail: str) -> CheckpointConflictError:
        return CheckpointConflictError(
            f"{self._link.where}: refusing to write checkpoint {checkpoint} of cache "
            f"{self._cache_id} ({detail}): another cache directory with the same cache_id "
            f"(a copy of this one?) flushes into {self._names.checkpoints}, or a flush whose "
            f"answer was lost before this cache was reopened committed late (then opening it "
            f"again settles it); nothing was written")

    # ---------------------------------------------------------------- plumbing

    def _stored(self, conn: Connection, action: str) -> tuple[int, str | None]:
        """The stored checkpoint (0 if none) and its token, refused if another directory
        wrote them (a copy of this one, or its original), which this directory's recovery
        would take for its own. A token missing from the directory's file is read again:
        a flush of this directory may have committed and saved a newer one between the two
        reads (a command reading beside the live cache), and then the stored one changed."""
        if self._tokens is not None and not self._sql.tokens and not self._column_looked:
            self._look_for_column(conn)
        refused: str | None = None
        for _ in range(_OWNER_READS):
            row = self._link.call(conn, action, lambda c: c.execute(
                self._sql.checkpoint, (self._cache_id,)).fetchone())
            lsn, token = (0, None) if row is None else (int(row[0]), row[1])
            if self._owns(token):
                return lsn, token
            if token == refused:
                break  # unchanged while the file did not hold it: not this directory's
            refused = token
        raise CheckpointConflictError(
            f"{self._link.where}: the checkpoint of cache {self._cache_id} in "
            f"{self._names.checkpoints} (LSN {lsn}) was written by another directory with the "
            f"same cache_id, a copy of this one or its original (this directory never saved "
            f"the token stored with it); this directory's log would be taken as flushed up to "
            f"LSN {lsn}, so nothing was replayed, dropped or written: its log keeps every "
            f"write it holds. Run one directory per cache_id. Only if every write of its log "
            f"up to LSN {lsn} is in the database (a backup of this very directory, restored), "
            f"clear the token and open it again: UPDATE "
            f"{self._names.checkpoints} SET token = NULL WHERE cache_id = '{self._cache_id}'")

    def _require_cache_id(self) -> str:
        if self._cache_id is None:
            raise ValueError("this PostgresBackend has no cache_id yet: wbcache.open attaches "
                             "the directory's; pass cache_id= to use the backend on its own")
        return self._cache_id

    def _writer_connection(self) -> Connection:
        """Write lock held. The writer connection, (re)connected if needed."""
        if self._closed:
            raise PostgresError(f"{self._link.where}: the backend is closed")
        from wbcache.backends.postgres_link import usable

        conn = self._writer
        if conn is None or not usable(conn):
            if conn is not None:
                conn.close()
            self._writer = None
            self._writer = conn = self._link.connect(writer=True)
        return conn

    def _end_stuck_flushes(self, conn: Connection) -> None:
        """Write lock held: end the server sessions left idle inside a flush of these tables
        for twice `timeout` (their client cut off by a partition, its COMMIT lost), whose
        row locks every later flush of the same keys waits behind, this node's own included.
        The writer's idle-in-transaction limit does not end them: after a pipeline psycopg
        sends a Flush message, on which PostgreSQL stops that timer and never restarts it
        (an outside hunt: a node's sessions stuck for good, every node's flush timing out).
        Run only before a flush that follows a failed one (never by a use that must change
        nothing: inspect, dump), and only on sessions of this role. What the server refuses
        is logged, and the flush goes on."""
        twice = 2 * self._link.endpoint.timeout
        names = self._names
        try:
            ended = self._link.call(conn, "ending flushes cut off", lambda c: c.execute(
                self._sql.end_stuck_flushes,
                (twice, names.data_sql, names.checkpoints_sql)).fetchall())
        except PostgresError as exc:
            if conn.closed:
                raise
            log.warning("%s", exc)
            return
        if ended:
            log.warning("%s: ended %d server sessions left idle for over %g s inside a flush "
                        "whose client was cut off (process ids %s): their row locks held "
                        "every flush of the same keys back", self._link.where, len(ended),
                        twice, ", ".join(str(pid) for pid, _ in ended))

    def _ensure_tables(self, create_tables: bool) -> None:
        """Write lock held. Create the tables if missing (several nodes may start at once: the
        DDL runs under a transaction-scoped advisory lock, so one creates and the others find
        them), or without `create_tables` refuse; then check their columns. A checkpoints
        table made before tokens (`ADDED_COLUMNS`) gets the column at the first flush
        (`_add_token_column`); until then tokens are neither read nor written."""
        names, sql = self._names, self._sql

        def create(conn: Connection) -> dict[str, dict[str, str]] | None:
            nonlocal names, sql
            row = conn.execute(sql.exists, (names.data_sql, names.checkpoints_sql)).fetchone()
            if not (row and row[0]):
                if not create_tables:
                    return None
                with conn.transaction():
                    conn.execute(sql.lock_ddl, (DDL_LOCK_CLASS, names.data_sql))
                    conn.execute(sql.create_data)
                    conn.execute(sql.create_checkpoints)
            # From here on every statement names the schema search_path found the table in
            # now: that is the table DIR/backend records, whatever search_path says later.
            row = conn.execute(sql.schema_of, (names.data_sql,)).fetchone()
            if row and names.schema is None:
                names = TableNames(row[0], names.name)
                sql = Statements(names)
            return {kind: (dict(conn.execute(sql.columns, (table,)).fetchall()),
                           dict(conn.execute(sql.not_null_columns, (table,)).fetchall()),
                           {row[0] for row in conn.execute(sql.unique_columns, (table,))})
                    for kind, table in (("data", names.data_sql),
                                        ("checkpoints", names.checkpoints_sql))}

        conn = self._writer_connection()
        found = self._link.call(conn, "creating the tables", create)
        if found is not None and "token" not in found["checkpoints"][0]:
            sql = Statements(names, tokens=False)
        self._names, self._sql = names, sql
        if found is None:
            raise SchemaMismatchError(
                f"{self._link.where}: there is no table {names.data} (with "
                f"{names.checkpoints}); nothing was created: is table= the one the cache "
                f"opens the database with?")
        for kind, expected in EXPECTED_COLUMNS.items():
            table = names.data if kind == "data" else names.checkpoints
            added = ADDED_COLUMNS.get(kind, {})
            columns, not_null, unique = found[kind]
            required = {name for name, filled in not_null.items() if not filled}
            wrong = {name: columns.get(name) for name, type_ in {**expected, **added}.items()
                     if columns.get(name) != type_ and (name not in added or name in columns)}
            if wrong:
                raise SchemaMismatchError(
                    f"{self._link.where}: table {table} exists but is not a wbcache table: "
                    f"expected columns {expected}, found {columns}")
            other = sorted(required - set(expected) - set(added))
            if other:  # a column of its own (NOT NULL, no default) would stop every flush
                raise SchemaMismatchError(
                    f"{self._link.where}: table {table} exists but is not a wbcache table: "
                    f"its column(s) {', '.join(other)} must be given a value (NOT NULL, no "
                    f"default), which wbcache never writes. Columns of your own may stand "
                    f"beside wbcache's if they may be NULL or have a default")
            if UNIQUE_COLUMN[kind] not in unique:
                raise SchemaMismatchError(
                    f"{self._link.where}: table {table} exists but is not a wbcache table: "
                    f"its column {UNIQUE_COLUMN[kind]} is not its primary key (no unique "
                    f"index on it alone), which every flush needs to find its rows")
            refused = [name for name in NULLABLE[kind] if name in not_null]
            if refused:  # every flush that stores a NULL there would fail
                raise SchemaMismatchError(
                    f"{self._link.where}: table {table} exists but is not a wbcache table: "
                    f"its column(s) {', '.join(refused)} are NOT NULL, where wbcache stores "
                    f"NULL in some rows (an int goes in num with value NULL, any other value "
                    f"in value with num NULL; token may be NULL): drop the NOT NULL")

    def close(self) -> None:
        """Close every connection; idempotent."""
        forking.untrack(self)
        with self._write_lock:
            self._closed = True
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        self._readers.close()
        self._link.close()

    def __repr__(self) -> str:
        return f"<PostgresBackend {self._link.where}, cache_id={self._cache_id!r}>"

    def _disown_after_fork(self) -> None:
        """In a child just forked (wbcache/forking.py): the connections' sockets are the
        parent's; the child must neither use nor close them (closing sends a Terminate the
        server would act on for the parent). Every use is refused; close() does nothing."""
        forking.disown(self, _ForkedPostgresBackend, "PostgresBackend", self._link.where,
                       self._pid)


class _ForkedPostgresBackend(PostgresBackend, forking.Disowned):
    """A `PostgresBackend` inherited through fork(): every use raises `ForkedCacheError`."""


def _check_cache_id(cache_id: object) -> str:
    if not isinstance(cache_id, str) or not cache_id:
        raise ValueError(f"cache_id must be a non-empty str, not {cache_id!r}")
    return cache_id
