"""Log records: the one place that encodes, validates, folds and describes each operation.

A record is a msgpack array [lsn, op, ...data]; a frame holds a list of them (format.py):

    [lsn, OP_PUT, key, value]             value: the msgpack encoding of the user's value (bin)
    [lsn, OP_DELETE, key]
    [lsn, OP_INCR, key, delta, result]    result: the counter's value after the increment
    [lsn, OP_BATCH, [item, ...]]          one atomic batch; an item is an op without its LSN:
                                          [OP_PUT, key, value] | [OP_DELETE, key]
                                          | [OP_INCR, key, delta, result]

Keys are msgpack str or bin, which keeps "a" and b"a" apart: non-empty, at most the database's
`max_key_size` bytes (UTF-8 for str). A record is *usable* only if everything downstream can
apply it: a key the database can store, a value that decodes. A record with a right checksum
that is not usable is corruption (the writer never writes one), refused where it is read, so
it can never stop a recovery half-way or surface later as a raw decoding error.

Adding an operation touches this file (its code, encoder, `problem` and `fold` branches,
`describe`), wal/_walk.c (`operation_ok`, which checks records before they are decoded), their
tests, and the API method that writes it.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

OP_PUT = 1
OP_DELETE = 2
OP_INCR = 3
OP_BATCH = 4

OP_NAMES = {OP_PUT: "put", OP_DELETE: "delete", OP_INCR: "incr"}

Key = Any  # str | bytes
Record = list[Any]  # a decoded record, as the reader yields it
State = dict[Key, "bytes | None"]  # key -> encoded value (None: deleted)
Deltas = dict[Key, int]  # key -> sum of its increments, while it has seen nothing else

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
DEFAULT_MAX_KEY_SIZE = 511  # LMDB's; a reader given no database limit applies it

packb = msgpack.packb
_unpackb = msgpack.unpackb
# What msgpack raises for input it cannot decode (ExtraData, FormatError, StackError and
# UnicodeDecodeError are ValueErrors; TypeError: an unhashable map key; OutOfData). Only these
# are caught as "does not decode": anything else, such as a signal handler's TimeoutError
# raised as msgpack returns, goes through as itself, not as damage.
UNDECODABLE = (ValueError, TypeError, msgpack.UnpackException)
_DECODED_FOR_REASON = 64 * 1024  # a value that does not decode, up to this size: msgpack says why
try:  # the exact proofs that a value decodes and a frame's records are usable (wal/_walk.c)
    from wbcache.wal._walk import decodes as _decodes
    from wbcache.wal._walk import unusable as _unusable
except ImportError:  # not built: msgpack decides, by decoding
    _decodes = _unusable = None
try:  # a frame's LSNs, whatever their order (`frame_lsns`)
    from wbcache.wal._walk import lsns as _lsns
except ImportError:  # not built, or built before it
    _lsns = None
# What decoding a record that is not usable may build to say why (objects, slots, characters:
# `bounded_end` in wal/_walk.c); a bigger one is refused without decoding.
_BUILT_FOR_REASON = 64 * 1024
# The encoders below pack what the sequencer builds: ints, exact str or bytes keys, bytes
# values, lists of those. Packing them runs no Python code, so the GIL is never released inside
# one call and one Packer serves every thread (msgpack.packb builds a Packer per call: 0.9 us
# of a put record's 1.2 us here). A Packer keeps the largest buffer it ever needed, so it only
# packs records that fit its initial buffer (256 KiB in msgpack 1.1, 1 MiB in 1.0): values
# under _SMALL bytes. Bigger ones, and batches, get a Packer of their own. Only the C Packer
# under a GIL is shared: msgpack's pure-Python one (PyPy, MSGPACK_PUREPYTHON=1, an install
# without the C extension) is Python code, where a thread switch can come in the middle of a
# pack and splice two threads' records into one buffer (tests/test_records.py), and without a
# GIL (free-threaded CPython) two threads can pack into one C Packer at the same time.
SHARE_PACKER = (msgpack.Packer.__module__ == "msgpack._cmsgpack"
                and getattr(sys, "_is_gil_enabled", lambda: True)())
_pack = msgpack.Packer().pack if SHARE_PACKER else packb
_SMALL = 128 * 1024


# ------------------------------------------------------------------ encoding

def encode_put(lsn: int, key: Key, value: bytes) -> bytes:
    if len(value) < _SMALL:
        return _pack([lsn, OP_PUT, key, value])  # type: ignore[no-any-return]
    return packb([lsn, OP_PUT, key, value])  # type: ignore[no-any-return]


def encode_delete(lsn: int, key: Key) -> bytes:
    return _pack([lsn, OP_DELETE, key])  # type: ignore[no-any-return]


def encode_incr(lsn: int, key: Key, delta: int, result: int) -> bytes:
    return _pack([lsn, OP_INCR, key, delta, result])  # type: ignore[no-any-return]


def encode_batch(lsn: int, items: list[list[Any]]) -> bytes:
    """`items` from `put_item`, `delete_item` and `incr_item`, in the order applied."""
    return packb([lsn, OP_BATCH, items])  # type: ignore[no-any-return]


def put_item(key: Key, value: bytes) -> list[Any]:
    return [OP_PUT, key, value]


def delete_item(key: Key) -> list[Any]:
    return [OP_DELETE, key]


def incr_item(key: Key, delta: int, result: int) -> list[Any]:
    return [OP_INCR, key, delta, result]


# ------------------------------------------------------------------ validation

def _key_problem(key: object, max_key_size: int) -> str | None:
    if type(key) is str:
        try:
            size = len(key.encode())  # type: ignore[union-attr]
        except UnicodeEncodeError:
            return "a key that is not valid UTF-8"
    elif type(key) is bytes:
        size = len(key)  # type: ignore[arg-type]
    else:
        return f"a key of type {type(key).__name__}"
    if size == 0:
        return "an empty key"
    if size > max_key_size:
        return f"a key of {size} bytes, over the database's limit of {max_key_size}"
    return None


def _value_problem(value: object) -> str | None:
    if type(value) is not bytes:
        return f"a value of type {type(value).__name__}"
    if _decodes is not None:  # exact, and builds nothing (decoding one can cost 100x its size)
        if _decodes(value):
            return None
        if len(value) > _DECODED_FOR_REASON:
            return "a value that does not decode"
    try:
        _unpackb(value, strict_map_key=False)  # limits follow len(value)
    except UNDECODABLE as exc:
        return f"a value that does not decode ({type(exc).__name__}: {exc})"
    return None


def _int64(value: object) -> bool:
    return type(value) is int and INT64_MIN <= value <= INT64_MAX  # type: ignore[operator]


def _item_problem(item: list[Any], start: int, max_key_size: int) -> str | None:
    """Why item[start:] is not a usable operation (op code first), or None."""
    size = len(item) - start
    op = item[start]
    if op == OP_PUT:
        if size != 3:
            return "a put of the wrong length"
        return _key_problem(item[start + 1], max_key_size) or _value_problem(item[start + 2])
    if op == OP_DELETE:
        if size != 2:
            return "a delete of the wrong length"
        return _key_problem(item[start + 1], max_key_size)
    if op == OP_INCR:
        if size != 4:
            return "an increment of the wrong length"
        if not (_int64(item[start + 2]) and _int64(item[start + 3])):
            return "an increment whose delta or result is not a 64-bit int"
        return _key_problem(item[start + 1], max_key_size)
    return f"an unknown operation {op!r}"


def problem(record: object, max_key_size: int = DEFAULT_MAX_KEY_SIZE) -> str | None:
    """Why a decoded record is not a usable [lsn, op, ...] record, or None if it is."""
    if type(record) is not list or len(record) < 3:  # type: ignore[arg-type]
        return "not a record (a list of at least 3 fields)"
    lsn = record[0]  # type: ignore[index]
    if type(lsn) is not int or lsn < 1:
        return f"a bad LSN {lsn!r}"
    if record[1] == OP_BATCH:  # type: ignore[index]
        items = record[2]  # type: ignore[index]
        if len(record) != 3 or type(items) is not list or not items:  # type: ignore[arg-type]
            return "a batch that is not a non-empty list of operations"
        for item in items:
            if type(item) is not list or len(item) < 2:
                return "a batch item that is not an operation"
            found = _item_problem(item, 0, max_key_size)
            if found is not None:
                return f"a batch holding {found}"
        return None
    return _item_problem(record, 1, max_key_size)  # type: ignore[arg-type]


def frame_problem(records: object, max_key_size: int = DEFAULT_MAX_KEY_SIZE) -> str | None:
    """Why a decoded frame payload is not a non-empty list of usable records, or None.

    Where wal/_walk.c is not built, this is the reader's hot path (`read_frame`): a plain
    put, the common record, is checked inline. wal/_walk.c mirrors these rules: its `scan`
    takes a subset of what this accepts (plain puts), its `unusable` exactly what this
    accepts; a change here must be made there too (tests/test_wal_fastpath.py and
    tests/test_wal_record_check.py read every case both ways)."""
    if type(records) is not list or not records:
        return "a frame that is not a list of records"
    for record in records:
        if type(record) is list and len(record) == 4:
            lsn, op, key, value = record
            kind = type(key)
            if (op == OP_PUT and type(lsn) is int and lsn > 0 and type(value) is bytes
                    and (kind is str or kind is bytes) and 0 < len(key)
                    and (len(key) * 4 <= max_key_size or _key_problem(key, max_key_size) is None)):
                if _decodes is not None:
                    if _decodes(value):
                        continue
                else:
                    try:
                        _unpackb(value, strict_map_key=False)
                        continue
                    except UNDECODABLE:  # reported with its reason below
                        pass
        found = problem(record, max_key_size)
        if found is not None:
            return f"malformed record: {found}"
    return None


def read_frame(payload: bytes, max_key_size: int = DEFAULT_MAX_KEY_SIZE,
               expected: int | None = None) -> tuple[list[Record], str | None]:
    """(the records of a frame payload, None) if it is a non-empty list of usable records
    (and, given `expected`, their LSNs are expected, expected + 1...: the walker's rule, a
    batch taking one), else ([], why not: "undecodable frame (...)", "malformed record: ..."
    or, every record usable, "record has LSN ... where ... was expected").

    The reader's hot path for frames that are not plain puts. Where wal/_walk.c is built, its
    check (`unusable`, exact: tests/test_wal_record_check.py) judges the records before anything
    is decoded, and where one is not usable, only that record (or the batch's operation) is
    decoded, to say why: a crafted frame of records of any other shape (arrays of one element,
    of the wrong length or types, nested deep, many tiny ones) cost up to 65 times its size
    decoded whole before its first record was judged. So the first record that is not usable
    is reported even where a later one does not decode at all. A frame of usable records out
    of sequence is refused by the same check, before anything is decoded."""
    if _unusable is not None:
        found = _unusable(payload, min(max_key_size, len(payload)), _BUILT_FOR_REASON,
                          expected)
        if found is None:  # every record is usable (and in sequence): this cannot fail
            return decode_frame(payload), None
        if expected is not None and len(found) == 2:  # (index, lsn): all usable, that one
            return [], _out_of_sequence(found[1], expected + found[0])  # out of sequence
        reason = _unusable_reason(payload, *found, max_key_size)
        if reason is not None:
            return [], reason
    try:
        records = decode_frame(payload)
    except UNDECODABLE as exc:
        return [], f"undecodable frame ({exc})"
    reason = frame_problem(records, max_key_size)
    if reason is None and expected is not None:
        for index, record in enumerate(records):
            if record[0] != expected + index:
                reason = _out_of_sequence(record[0], expected + index)
                break
    return ([], reason) if reason is not None else (records, None)


def frame_lsns(payload: bytes, max_key_size: int = DEFAULT_MAX_KEY_SIZE) -> Sequence[int] | None:
    """The LSNs of a frame payload's records if every one is usable (whatever their order),
    else None. The resync rule asks this of each frame it meets after damage. Where
    wal/_walk.c is built, records in sequence (as the writer writes every frame) are judged
    without decoding anything: decoded, a 16 MiB frame of small records cost 15 times its
    size. Out of sequence (crafted), the same check lists their LSNs, 8 bytes each, still
    undecoded (a module built before it had `lsns` decodes them)."""
    head = _first_lsn(payload) if _unusable is not None else None
    if head is not None:
        count, first = head
        if _unusable(payload, min(max_key_size, len(payload)), _BUILT_FOR_REASON,
                     first) is None:
            return range(first, first + count)
    if _unusable is not None and _lsns is not None:  # out of sequence (crafted): undecoded
        found = _lsns(payload, min(max_key_size, len(payload)))
        return None if found is None else memoryview(found).cast("Q")
    records, reason = read_frame(payload, max_key_size)  # refused undecoded if not usable
    return None if reason is not None else [record[0] for record in records]


def _first_lsn(payload: bytes) -> tuple[int, int] | None:
    """(how many records, the first one's LSN) from a frame payload's first bytes, or None
    where they are not an array of arrays whose first element is a positive int."""
    unpacker = msgpack.Unpacker(max_buffer_size=32)  # its default buffer is 1 MiB
    unpacker.feed(payload[:32])  # two array headers and an int: 19 bytes at most
    try:
        count = unpacker.read_array_header()
        unpacker.read_array_header()
        lsn = unpacker.unpack()
    except UNDECODABLE:
        return None
    return (count, lsn) if count and type(lsn) is int and lsn > 0 else None


def _out_of_sequence(lsn: int, expected: int) -> str:
    return f"record has LSN {lsn} where {expected} was expected"


def _unusable_reason(payload: bytes, start: int, stop: int, in_batch: bool,
                     max_key_size: int) -> str | None:
    """Why payload[start:stop], the first record that is not usable (or that batch's first
    operation that is not), is not; None to judge the whole payload by decoding it (start 0:
    it is not one array of records, and small)."""
    if not stop:  # decoding it would build too much to say more
        if start == 0:
            return "malformed record: a frame that is not a list of records"
        what = "a batch holding an operation" if in_batch else "a record"
        return f"malformed record: {what} that is not usable, too big to decode to say why"
    if start == 0:
        return None
    try:
        unit = decode_frame(memoryview(payload)[start:stop])
    except UNDECODABLE as exc:
        return f"undecodable frame ({exc})"
    # A batch's record is sound when its operation is not (the LSN a stand-in: _walk.c took it).
    found = problem([1, OP_BATCH, [unit]] if in_batch else unit, max_key_size)
    return None if found is None else f"malformed record: {found}"


def decode_frame(payload: bytes) -> Any:
    """msgpack-decode a frame payload (limits follow len(payload), itself capped). A frame
    holds arrays, ints, str and bin alone (values are bin, checked by `_decodes`): a map, an
    ext type or an empty array is refused as met, so a crafted frame cannot make the decoder
    build many objects out of few bytes (an empty map is 64 bytes of memory for one byte)."""
    return _unpackb(payload, raw=False, strict_map_key=False, use_list=True,
                    list_hook=_no_empty_list, object_pairs_hook=_no_map, ext_hook=_no_ext)


def _no_empty_list(items: list[Any]) -> list[Any]:
    if not items:
        raise ValueError("an empty array, which no frame holds")
    return items


def _no_map(pairs: object) -> None:
    raise ValueError("a map, which no frame holds")


def _no_ext(code: int, data: bytes) -> None:
    raise ValueError("an ext type, which no frame holds")


# ------------------------------------------------------------------ folding

def fold(state: State, record: Record, deltas: Deltas | None = None) -> None:
    """Apply one usable record to `state` (key -> newest encoded value, None: deleted) and,
    if given, `deltas` (per key, the sum of its increments while it has seen nothing but
    increments since the fold began: what a database shared by many caches adds)."""
    if record[1] == OP_BATCH:
        for item in record[2]:
            _fold_op(state, item, 0, deltas)
    else:
        _fold_op(state, record, 1, deltas)


def _fold_op(state: State, item: list[Any], start: int, deltas: Deltas | None) -> None:
    op, key = item[start], item[start + 1]
    if op == OP_INCR:  # [op, key, delta, result]
        if deltas is not None and (key in deltas or key not in state):
            deltas[key] = deltas.get(key, 0) + item[start + 2]
        state[key] = packb(item[start + 3])
        return
    state[key] = item[start + 2] if op == OP_PUT else None
    if deltas:
        deltas.pop(key, None)


def fold_frame(state: State, records: list[Record], after: int,
               deltas: Deltas | None = None) -> int:
    """Fold every record of a frame whose LSN is above `after`; return how many were folded.
    Recovery spends its time here: a plain put is folded inline."""
    folded = 0
    for record in records:
        if record[0] <= after:
            continue
        if record[1] == OP_PUT:
            key = record[2]
            state[key] = record[3]
            if deltas:
                deltas.pop(key, None)
        else:
            fold(state, record, deltas)
        folded += 1
    return folded


# ------------------------------------------------------------------ describing

@dataclass(frozen=True)
class LoggedOp:
    """One operation of a log record, with its op code spelled out."""

    op: str  # "put", "delete" or "incr"
    key: Key
    value: bytes | None  # msgpack encoding of the value after the op (put, incr); None: delete
    delta: int | None = None  # incr only


@dataclass(frozen=True)
class LoggedRecord:
    """One log record: a single operation, or an atomic batch of them (`batch` True)."""

    lsn: int
    batch: bool
    ops: tuple[LoggedOp, ...]


def describe(record: Record) -> LoggedRecord:
    """A usable record as a `LoggedRecord` (for tools that show the log)."""
    if record[1] == OP_BATCH:
        return LoggedRecord(record[0], True, tuple(_describe_op(item, 0) for item in record[2]))
    return LoggedRecord(record[0], False, (_describe_op(record, 1),))


def _describe_op(item: list[Any], start: int) -> LoggedOp:
    op, key = item[start], item[start + 1]
    if op == OP_PUT:
        return LoggedOp("put", key, item[start + 2])
    if op == OP_DELETE:
        return LoggedOp("delete", key, None)
    return LoggedOp("incr", key, packb(item[start + 3]), item[start + 2])


def count_ops(record: Record, counts: dict[str, int]) -> None:
    """Add the record's operations to `counts` ("put", "delete", "incr")."""
    items: list[tuple[list[Any], int]] = (
        [(item, 0) for item in record[2]] if record[1] == OP_BATCH else [(record, 1)])
    for item, start in items:
        name = OP_NAMES[item[start]]
        counts[name] = counts.get(name, 0) + 1



def encode_items(lsn: int, items: list[list[Any]]) -> bytes:
    """ONE record holding `items` (from `put_item`, `delete_item`, `incr_item`): the single
    operation's own record when there is one, else a batch."""
    if len(items) == 1:
        return packb([lsn, *items[0]])  # type: ignore[no-any-return]
    return encode_batch(lsn, items)
