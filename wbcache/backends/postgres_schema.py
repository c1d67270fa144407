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
        updated_at timestamptz NOT NULL DEFAULT now()
    );

Why a prefix byte rather than a (kind, key) pair: one bytea primary key keeps "a" and b"a"
apart, sorts the same in Python and in PostgreSQL (bytewise), and keeps every statement to a
single array per key column. Why ints in their own column: an increment is then added by
PostgreSQL itself (`num = num + delta`) inside the flush transaction, so increments flushed by
many caches all count, whatever order their transactions commit in.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

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


# ------------------------------------------------------------------ statements

class Statements:
    """Every SQL statement the backend runs, rendered once for one pair of tables."""

    def __init__(self, names: TableNames) -> None:
        data, checkpoints = names.data_sql, names.checkpoints_sql
        self.names = names
        self.create_data = (
            f"CREATE TABLE IF NOT EXISTS {data} (key bytea PRIMARY KEY, num bigint, value bytea, "
            f"CHECK ((num IS NULL) <> (value IS NULL)))")
        self.create_checkpoints = (
            f"CREATE TABLE IF NOT EXISTS {checkpoints} (cache_id text PRIMARY KEY, "
            f"lsn bigint NOT NULL, updated_at timestamptz NOT NULL DEFAULT now())")
        self.lock_ddl = "SELECT pg_advisory_xact_lock(%s, hashtext(%s))"
        self.exists = "SELECT to_regclass(%s) IS NOT NULL AND to_regclass(%s) IS NOT NULL"
        self.columns = ("SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
                        "WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped")
        self.get = f"SELECT num, value FROM {data} WHERE key = %b"
        self.count = f"SELECT count(*) FROM {data}"
        self.items = f"SELECT key, num, value FROM {data}"
        self.checkpoint = f"SELECT lsn FROM {checkpoints} WHERE cache_id = %s"
        # Keys arrive sorted, and unnest keeps array order, so every cache locks the rows of one
        # statement in the same (key) order: two flushes over the same keys queue, not deadlock.
        self.delete = f"DELETE FROM {data} WHERE key = ANY(%b::bytea[])"
        self.put = (
            f"INSERT INTO {data} (key, num, value) "
            f"SELECT * FROM unnest(%b::bytea[], %b::bigint[], %b::bytea[]) "
            f"ON CONFLICT (key) DO UPDATE SET num = EXCLUDED.num, value = EXCLUDED.value")
        # A delta on a missing key inserts it; on an int adds to it; on any other value counts
        # from 0 (as a missing key does). The sum is taken in numeric and held to the bigint
        # range: increments acknowledged by several caches cannot be refused here, so a total
        # beyond 64 bits stays at the bound rather than failing every later flush.
        self.increment = (
            f"INSERT INTO {data} AS t (key, num) "
            f"SELECT * FROM unnest(%b::bytea[], %b::bigint[]) "
            f"ON CONFLICT (key) DO UPDATE SET value = NULL, num = "
            f"LEAST(GREATEST(COALESCE(t.num, 0)::numeric + EXCLUDED.num, {INT64_MIN}), "
            f"{INT64_MAX})::bigint")
        # Compare-and-set: the checkpoint moves from the value this backend knows is stored
        # (`known`) to a larger one, or the statement fails with a message (a text that is not
        # a bigint), which aborts the whole transaction before its COMMIT -- the check has to
        # stop the data too, within the same single round trip. It keeps the checkpoint growing
        # and, with it, exactly-once: of several transactions sent from the same `known` (a
        # flush whose answer was lost, then its retry), at most one can ever commit.
        self.set_checkpoint = (
            f"INSERT INTO {checkpoints} AS c (cache_id, lsn) VALUES (%s, %s) "
            f"ON CONFLICT (cache_id) DO UPDATE SET updated_at = now(), lsn = CASE "
            f"WHEN c.lsn = %s::bigint AND c.lsn < EXCLUDED.lsn THEN EXCLUDED.lsn "
            f"ELSE ('{CHECKPOINT_CONFLICT_MARK} the stored checkpoint is ' || c.lsn)::bigint END")

    def flush(self, puts: Collection[tuple[Key, bytes]], deletes: Sequence[Key],
              increments: Sequence[tuple[Key, int]], cache_id: str, checkpoint: int,
              known: int) -> list[tuple[str, tuple[Any, ...]]]:
        """The statements of one flush transaction (without BEGIN and COMMIT), keys sorted;
        the checkpoint moves from `known` to `checkpoint`."""
        statements: list[tuple[str, tuple[Any, ...]]] = []
        if deletes:
            statements.append((self.delete, (sorted(encode_key(key) for key in deletes),)))
        if puts:
            stored = sorted((encode_key(key), *split_value(value)) for key, value in puts)
            statements.append((self.put, tuple(map(list, zip(*stored, strict=True)))))
        if increments:
            # A coalesced delta is the difference of two int64 values, so it can reach past
            # int64 itself: what is beyond goes in further statements (never in practice).
            rows = sorted((encode_key(key), delta) for key, delta in increments)
            while rows:
                part = [(key, clamp_int64(delta)) for key, delta in rows]
                statements.append((self.increment, tuple(map(list, zip(*part, strict=True)))))
                rows = [(key, delta - clamped)
                        for (key, delta), (_, clamped) in zip(rows, part, strict=True)
                        if delta != clamped]
        statements.append((self.set_checkpoint, (cache_id, checkpoint, known)))
        return statements


EXPECTED_COLUMNS = {
    "data": {"key": "bytea", "num": "bigint", "value": "bytea"},
    "checkpoints": {"cache_id": "text", "lsn": "bigint"},
}
