"""The PostgreSQL tables of a wbcache backend, the SQL that reads and writes them, and how keys
and values are laid out in their columns. Pure Python: nothing here talks to a server.

    CREATE TABLE <table> (
        key   bytea PRIMARY KEY,  -- b"s" + UTF-8 for a str key, b"b" + the bytes for a bytes key
        num   bigint,             -- the value, when it is an int in the signed 64-bit range
        value bytea,              -- the msgpack encoding of any other value
        CHECK ((num IS NULL) <> (value IS NULL))
    );
    CREATE TABLE <table>_checkpoints (
        cache_id   text PRIMARY KEY,  -- one row per cache directory (DIR/cache_id)
        lsn        bigint NOT NULL,   -- every log record <= lsn of that directory is in <table>
        updated_at timestamptz NOT NULL DEFAULT now(),
        token      text               -- who wrote lsn: a token only that directory knows
    );

`token` came after the first tables: an open adds it to a table without it (`add_token`).
Each flush of a directory writes a new random token with its checkpoint, from the one it
read; a copy of the directory, which has the same cache_id but never learns the tokens the
original writes after the copy, is refused instead of taking the original's checkpoint for
its own and dropping its unflushed writes as flushed (wbcache/layout.py, `TokenFile`).

Why a prefix byte rather than a (kind, key) pair: one bytea primary key keeps "a" and b"a"
apart, sorts the same in Python and in PostgreSQL (bytewise), and keeps every statement to a
single array per key column. Why ints in their own column: an increment is then added by
PostgreSQL itself (`num = num + delta`) inside the flush transaction, so increments flushed by
many caches all count, whatever order their transactions commit in.

A flush locks the rows it touches in ONE order, the keys', whatever it does to them: a first
pass upserts every key, sorted (a put stores its value, an increment adds its delta, a delete
locks its row, or inserts one marked with an empty `value`, which no msgpack encoding is, for
a missing key), then those keys are deleted, rows this transaction already holds. Two flushes
that share keys then queue on the first of them instead of each holding a row the other waits
for (a deadlock, when deletes and puts were separate passes). A flush larger than
`STATEMENT_BYTES` is cut into statements by key range, in key order.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, NamedTuple

import msgpack

from wbcache.backends.base import Key

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1

STR_PREFIX = b"s"
BYTES_PREFIX = b"b"

# A btree index entry may hold at most ~2700 bytes (a third of a page); 2000 leaves room for
# the prefix byte and the tuple header whatever the page layout.
MAX_KEY_SIZE = 2000

# Advisory lock class for table creation (the two-int form, whose key space is apart from the
# single-bigint locks applications use): "wbca".
DDL_LOCK_CLASS = 0x77626361

# Starts the error text of a failed checkpoint compare-and-set (see Statements.set_checkpoint).
CHECKPOINT_CONFLICT_MARK = "wbcache checkpoint conflict:"

# The most bytes of keys and values one statement of a flush carries, by default. PostgreSQL
# ends the session on any protocol message over 1 GiB ("invalid message length"), and holds a
# statement's parameters several times over while it runs it: 64 MiB stays far below the
# limit and keeps memory modest on both sides, while a flush of 10,000 ordinary entries
# (~1 MiB) is still one statement. A single entry larger than this goes alone in its own.
STATEMENT_BYTES = 64 << 20

# What a flush does to a key (a FlushRow's kind).
PUT, ADD, DELETE = 0, 1, 2
TOMBSTONE = b""  # the `value` a delete leaves for its second pass: never a msgpack encoding
_ROW_OVERHEAD = 12  # bytes each row adds to a statement besides its data: three array lengths

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_CHECKPOINTS_SUFFIX = "_checkpoints"
_MAX_IDENTIFIER = 63  # PostgreSQL's NAMEDATALEN - 1


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


@dataclass(frozen=True)
class TableNames:
    """The data table and its checkpoints table, from a `table` argument ("name" or
    "schema.name"; letters, digits and underscores)."""

    schema: str | None
    name: str

    @classmethod
    def parse(cls, table: str) -> TableNames:
        if not isinstance(table, str):
            raise TypeError(f"table must be a str, not {type(table).__name__}")
        parts = table.split(".")
        limit = _MAX_IDENTIFIER - len(_CHECKPOINTS_SUFFIX)
        if len(parts) > 2 or not all(_IDENTIFIER.match(part) for part in parts):
            raise ValueError(f"table {table!r} must be 'name' or 'schema.name' made of letters, "
                             f"digits and underscores")
        if len(parts[-1]) > limit:
            raise ValueError(f"table name {parts[-1]!r} is longer than {limit} characters "
                             f"(room is kept for its {_CHECKPOINTS_SUFFIX} table)")
        return cls(parts[0] if len(parts) == 2 else None, parts[-1])

    def _qualified(self, name: str) -> str:
        return name if self.schema is None else f"{self.schema}.{name}"

    def _sql(self, name: str) -> str:
        return _quote(name) if self.schema is None else f"{_quote(self.schema)}.{_quote(name)}"

    @property
    def data(self) -> str:
        """The data table as text, as `to_regclass` reads it."""
        return self._qualified(self.name)

    @property
    def checkpoints(self) -> str:
        return self._qualified(self.name + _CHECKPOINTS_SUFFIX)

    @property
    def data_sql(self) -> str:
        """The data table, quoted for SQL."""
        return self._sql(self.name)

    @property
    def checkpoints_sql(self) -> str:
        return self._sql(self.name + _CHECKPOINTS_SUFFIX)


# ------------------------------------------------------------------ keys and values

def encode_key(key: Key) -> bytes:
    if type(key) is str:
        return STR_PREFIX + key.encode()
    if type(key) is bytes:
        return BYTES_PREFIX + key
    raise TypeError(f"keys must be str or bytes, not {type(key).__name__}")


def decode_key(stored: bytes) -> Key:
    prefix, raw = stored[:1], bytes(stored[1:])
    if prefix == STR_PREFIX:
        return raw.decode()
    if prefix == BYTES_PREFIX:
        return raw
    raise ValueError(f"stored key {stored!r} starts with neither {STR_PREFIX!r} "
                     f"nor {BYTES_PREFIX!r}")


def split_value(encoded: bytes) -> tuple[int | None, bytes | None]:
    """(num, value) columns for a msgpack-encoded value: an int in the signed 64-bit range goes
    to `num`, anything else (uint64 above it included) stays encoded in `value`."""
    if not encoded:
        raise ValueError("an encoded value is never empty (the empty bytea marks a delete)")
    first = encoded[0]
    # msgpack int formats: positive fixint, negative fixint, uint8..64, int8..64
    if first <= 0x7F or first >= 0xE0 or 0xCC <= first <= 0xD3:
        number = msgpack.unpackb(encoded)
        if INT64_MIN <= number <= INT64_MAX:
            return number, None
    return None, encoded


def join_value(num: int | None, value: bytes | None) -> bytes:
    """The msgpack encoding of a stored row's value."""
    if num is not None:
        return msgpack.packb(num)  # type: ignore[no-any-return]
    assert value is not None, "the table's CHECK keeps exactly one of num, value"
    return bytes(value)


def clamp_int64(number: int) -> int:
    return min(max(number, INT64_MIN), INT64_MAX)


# ------------------------------------------------------------------ a flush's rows

# One key of a flush as its first pass sends it: (stored key, num, value, kind). For ADD, num
# is the delta (held to int64); for DELETE, value is TOMBSTONE. Plain tuples: a flush makes
# one per entry, 100,000 of them at a time.
FlushRow = tuple[bytes, int | None, bytes | None, int]


def flush_rows(puts: Collection[tuple[Key, bytes]], deletes: Sequence[Key],
               increments: Sequence[tuple[Key, int]]
               ) -> tuple[list[FlushRow], list[list[FlushRow]]]:
    """Every key a flush touches, once, sorted as PostgreSQL sorts bytea; and the part of any
    delta beyond int64, to add in later passes (ADD rows, sorted, each key once per pass).

    A key named more than once counts as if each list were applied in turn (deletes, then
    puts, then increments): a put wins over a delete, and an increment of a key put or
    deleted in the same flush is stored as the resulting value."""
    rows: list[FlushRow] = [(encode_key(key), None, TOMBSTONE, DELETE) for key in deletes]
    rows += [(encode_key(key), *split_value(value), PUT) for key, value in puts]
    rows += [(encode_key(key), delta, None, ADD) for key, delta in increments]
    rows.sort(key=itemgetter(0))  # stable: a key's rows stay in the order above
    if len({row[0] for row in rows}) < len(rows):  # never from the cache, which coalesces
        rows = _merge_repeated(rows)
    beyond: list[list[FlushRow]] = []
    if increments:
        for index, (stored, num, _value, kind) in enumerate(rows):
            if kind != ADD or num is None or INT64_MIN <= num <= INT64_MAX:
                continue
            # A coalesced delta is the difference of two int64 values, so it can reach past
            # int64 itself: what is beyond is added in later passes (never in practice).
            rows[index] = (stored, clamp_int64(num), None, ADD)
            rest, layer = num - clamp_int64(num), 0
            while rest:
                if layer == len(beyond):
                    beyond.append([])
                beyond[layer].append((stored, clamp_int64(rest), None, ADD))
                rest, layer = rest - clamp_int64(rest), layer + 1
    return rows, beyond


def _merge_repeated(rows: list[FlushRow]) -> list[FlushRow]:
    """`rows`, sorted by key, with each run of one key's rows made one row (see flush_rows)."""
    merged: list[FlushRow] = []
    for row in rows:
        if not merged or merged[-1][0] != row[0]:
            merged.append(row)
            continue
        stored, num, _value, kind = merged[-1]
        if row[3] != ADD:  # a put after a delete, or a later put: it wins
            merged[-1] = row
        elif kind == ADD:
            assert num is not None and row[1] is not None
            merged[-1] = (stored, num + row[1], None, ADD)
        else:  # a non-int (or no value) counts from 0, as it does in the database
            assert row[1] is not None
            merged[-1] = (stored, clamp_int64((num or 0) + row[1]), None, PUT)
    return merged


class Statement(NamedTuple):
    sql: str
    params: tuple[Any, ...]
    size: int  # bytes of data it carries (the budget counts these)


Columns = tuple[list[bytes], list[int | None], list[bytes | None], list[int]]


def _runs(rows: Sequence[FlushRow], budget: int) -> Iterator[tuple[Columns, int]]:
    """Consecutive runs of `rows` of at most `budget` bytes each (a larger row alone), as
    columns (keys, nums, values, kinds), with their size: the bytes they add to an upsert."""
    if not rows:
        return
    columns = _columns(rows)
    total = _size(*columns)
    if total <= budget:  # the usual flush: one run, measured without a loop in Python
        yield columns, total
        return
    start = size = 0
    for end, (key, _num, value, kind) in enumerate(rows):  # _size, one row at a time
        row_size = len(key) + (8 if value is None else len(value)) + _ROW_OVERHEAD
        if kind == ADD:
            row_size += len(key) + 4
        if end > start and size + row_size > budget:
            yield _columns(rows[start:end]), size
            start, size = end, 0
        size += row_size
    yield _columns(rows[start:]), size


def _columns(rows: Sequence[FlushRow]) -> Columns:
    keys, nums, values, kinds = map(list, zip(*rows, strict=True))
    return keys, nums, values, kinds


def _size(keys: list[bytes], nums: list[int | None], values: list[bytes | None],
          kinds: list[int]) -> int:
    """The bytes rows add to an upsert: keys, values (8 for an int), and each ADD row's key
    once more (in the array of keys whose delta is added)."""
    size = (sum(map(len, keys)) + sum(map(len, filter(None, values))) + 8 * values.count(None)
            + _ROW_OVERHEAD * len(keys))
    if ADD in kinds:
        size += sum(len(key) + 4 for key, kind in zip(keys, kinds, strict=True) if kind == ADD)
    return size


# ------------------------------------------------------------------ statements

class Statements:
    """Every SQL statement the backend runs, rendered once for one pair of tables."""

    def __init__(self, names: TableNames, *, tokens: bool = True) -> None:
        """`tokens`: whether the checkpoints table has its `token` column (a table made before
        it, which this session could not alter, has not: tokens are then neither read nor
        written)."""
        data, checkpoints = names.data_sql, names.checkpoints_sql
        self.names = names
        # Sessions of this role idle inside a transaction that wrote to these tables (a
        # flush whose client was cut off), for longer than the given seconds: ended, so their
        # row locks go. Never another role's (an administrator's transaction, say), which
        # a superuser could end, and which, unless it may, fails the whole statement.
        self.end_stuck_flushes = (
            "SELECT a.pid, pg_terminate_backend(a.pid) FROM pg_stat_activity a "
            "WHERE a.pid <> pg_backend_pid() AND a.datname = current_database() "
            "AND a.usename = current_user "
            "AND a.state IN ('idle in transaction', 'idle in transaction (aborted)') "
            "AND a.state_change < clock_timestamp() - make_interval(secs => %s) "
            "AND EXISTS (SELECT FROM pg_locks l WHERE l.pid = a.pid AND l.granted "
            "AND l.mode = 'RowExclusiveLock' "
            "AND l.relation IN (to_regclass(%s), to_regclass(%s)))")
        self.create_data = (
            f"CREATE TABLE IF NOT EXISTS {data} (key bytea PRIMARY KEY, num bigint, value bytea, "
            f"CHECK ((num IS NULL) <> (value IS NULL)))")
        self.create_checkpoints = (
            f"CREATE TABLE IF NOT EXISTS {checkpoints} (cache_id text PRIMARY KEY, "
            f"lsn bigint NOT NULL, updated_at timestamptz NOT NULL DEFAULT now(), token text)")
        self.add_token = f"ALTER TABLE {checkpoints} ADD COLUMN IF NOT EXISTS token text"
        self.lock_ddl = "SELECT pg_advisory_xact_lock(%s, hashtext(%s))"
        self.exists = "SELECT to_regclass(%s) IS NOT NULL AND to_regclass(%s) IS NOT NULL"
        self.columns = ("SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
                        "WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped")
        # The single columns a unique index (whole, valid, on no expression) covers: what
        # `ON CONFLICT (key)` and `ON CONFLICT (cache_id)` need to find their row.
        self.unique_columns = (
            "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
            "AND a.attnum = i.indkey[0] WHERE i.indrelid = to_regclass(%s) AND i.indisunique "
            "AND i.indisvalid AND i.indimmediate AND i.indnkeyatts = 1 AND i.indpred IS NULL "
            "AND i.indexprs IS NULL")
        # The NOT NULL columns, each with whether an insert that leaves it out fills it (a
        # default, an identity column): one of your own that it does not, wbcache never
        # fills; one of wbcache's own that it stores NULL in (`NULLABLE`) it cannot write.
        self.not_null_columns = (
            "SELECT attname, atthasdef OR attidentity <> '' FROM pg_attribute "
            "WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped "
            "AND attnotnull")
        self.schema_of = ("SELECT n.nspname FROM pg_class c JOIN pg_namespace n "
                          "ON n.oid = c.relnamespace WHERE c.oid = to_regclass(%s)")
        self.get = f"SELECT num, value FROM {data} WHERE key = %b"
        self.get_many = f"SELECT key, num, value FROM {data} WHERE key = ANY(%b::bytea[])"
        self.count = f"SELECT count(*) FROM {data}"
        self.items = f"SELECT key, num, value FROM {data}"
        self.checkpoint = (f"SELECT lsn, {'token' if tokens else 'NULL::text'} "
                           f"FROM {checkpoints} WHERE cache_id = %s")
        # The first pass of a flush: every key in one statement (per run), sorted, and unnest
        # keeps array order, so rows are locked in key order. An increment's key is also in
        # the last array: the conflict branch adds its delta to what the row holds (a delta on
        # an int adds to it; on any other value or a missing key it counts from 0). The sum is
        # taken in numeric and held to the bigint range: increments acknowledged by several
        # caches cannot be refused here, so a total beyond 64 bits stays at the bound rather
        # than failing every later flush. `= ANY` of an array parameter is a hash lookup (the
        # statement is planned with its values: see `prepare=False` where it runs). A delete's
        # existing row fails the WHERE, so it is locked (as ON CONFLICT DO UPDATE locks every
        # row it meets) but not rewritten: the second pass deletes it.
        self.upsert = (
            f"INSERT INTO {data} AS t (key, num, value) "
            f"SELECT * FROM unnest(%b::bytea[], %b::bigint[], %b::bytea[]) "
            f"ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value, num = CASE "
            f"WHEN EXCLUDED.key = ANY(%b::bytea[]) THEN "
            f"LEAST(GREATEST(COALESCE(t.num, 0)::numeric + EXCLUDED.num, {INT64_MIN}), "
            f"{INT64_MAX})::bigint ELSE EXCLUDED.num END "
            f"WHERE EXCLUDED.value IS DISTINCT FROM ''::bytea")  # not a TOMBSTONE
        # The second pass: the tombstoned keys, whose rows this transaction holds already.
        self.delete = f"DELETE FROM {data} WHERE key = ANY(%b::bytea[])"
        # Compare-and-set: the checkpoint moves from the value this backend knows is stored
        # (`known`) to a larger one, or the statement fails with a message (a text that is not
        # a bigint), which aborts the whole transaction before its COMMIT is sent -- the check
        # has to stop the data too. It keeps the checkpoint growing
        # and, with it, exactly-once: of several transactions sent from the same `known` (a
        # flush whose answer was lost, then its retry), at most one can ever commit. With
        # tokens, the stored token must be the one known too (unless the check is off: a
        # backend used without a directory), and the new one replaces it.
        token_check, token_set, token_column, token_value = (
            ("(NOT %s::boolean OR c.token IS NOT DISTINCT FROM %s::text) AND ",
             ", token = EXCLUDED.token", ", token", ", %s") if tokens else ("", "", "", ""))
        self.set_checkpoint = (
            f"INSERT INTO {checkpoints} AS c (cache_id, lsn{token_column}) "
            f"VALUES (%s, %s{token_value}) "
            f"ON CONFLICT (cache_id) DO UPDATE SET updated_at = now(){token_set}, lsn = CASE "
            f"WHEN c.lsn = %s::bigint AND {token_check}c.lsn < EXCLUDED.lsn THEN EXCLUDED.lsn "
            f"ELSE ('{CHECKPOINT_CONFLICT_MARK} the stored checkpoint is ' || c.lsn)::bigint END")
        self.tokens = tokens

    def flush(self, rows: Sequence[FlushRow], beyond: Sequence[Sequence[FlushRow]], cache_id: str,
              checkpoint: int, known: int, budget: int,
              tokens: tuple[str | None, str] | None = None) -> Iterator[Statement]:
        """The statements of one flush transaction (without BEGIN and COMMIT), made as they
        are sent: for each run of `rows` (from `flush_rows`) of at most `budget` bytes, its
        upsert, then the delete of its tombstones; the deltas `beyond` int64; last, the
        checkpoint moving from `known` to `checkpoint` (and, given `tokens`, the token from the
        first to the second; without, the stored one is not checked and is cleared). Every
        statement holds keys in order, and each run follows the one before it, so the rows
        are locked in key order."""
        for (keys, nums, values, kinds), size in _runs(rows, budget):
            yield self._upsert(keys, nums, values, kinds, size)
            if DELETE in kinds:
                doomed = [key for key, kind in zip(keys, kinds, strict=True) if kind == DELETE]
                yield Statement(self.delete, (doomed,), sum(map(len, doomed)))
        for layer in beyond:  # keys this transaction holds already
            for columns, size in _runs(layer, budget):
                yield self._upsert(*columns, size)
        if not self.tokens:
            parameters: tuple[Any, ...] = (cache_id, checkpoint, known)
        elif tokens is None:
            parameters = (cache_id, checkpoint, None, known, False, None)
        else:
            parameters = (cache_id, checkpoint, tokens[1], known, True, tokens[0])
        yield Statement(self.set_checkpoint, parameters, len(cache_id) + 80)

    def _upsert(self, keys: list[bytes], nums: list[int | None], values: list[bytes | None],
                kinds: list[int], size: int) -> Statement:
        added = ([key for key, kind in zip(keys, kinds, strict=True) if kind == ADD]
                 if ADD in kinds else [])
        return Statement(self.upsert, (keys, nums, values, added), size)


EXPECTED_COLUMNS = {
    "data": {"key": "bytea", "num": "bigint", "value": "bytea"},
    "checkpoints": {"cache_id": "text", "lsn": "bigint",
                    "updated_at": "timestamp with time zone"},  # set by every flush
}
# Columns added since the first tables: an open adds the missing one (`Statements.add_token`).
ADDED_COLUMNS = {"checkpoints": {"token": "text"}}
# wbcache's columns that hold NULL in some rows: an int's value, any other value's num; a
# checkpoint written without a token.
NULLABLE = {"data": ("num", "value"), "checkpoints": ("token",)}
# The column each table's rows are found by: a unique index on it alone (ON CONFLICT).
UNIQUE_COLUMN = {"data": "key", "checkpoints": "cache_id"}
