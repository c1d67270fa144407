"""The API's writes as plans for the sequencer, shared by `Cache` and `AsyncCache`.

Each write is validated before anything is locked (a bad key or value raises TypeError or
ValueError and nothing is written), then becomes a *plan*: a function the sequencer runs with
its lock held on a `Transaction`, which reads current values and puts, deletes or increments
keys. Whatever one plan writes is ONE log record: `put_many`, `update`, `pop`, `setdefault`,
`clear` and `batch()` are atomic and cost one fsync. A plan that writes nothing logs nothing
(`delete` of a key memory knows is gone, `pop` of a missing key with a default).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from wbcache.backends.base import Key
from wbcache.codec import (
    check_delta,
    check_int64,
    check_key,
    encode_value,
    in_memory,
    value_of,
)
from wbcache.sequencer import ABSENT, Plan, Transaction
from wbcache.wal.records import OP_DELETE, OP_INCR, OP_PUT

# One operation of a batch as validated before the lock:
# (op, key, encoded value | delta | None, held value | None)
Op = tuple[int, Key, Any, Any]

_NO_DEFAULT: Any = object()


class Limits:
    """What a write may hold: keys up to `max_key_size` bytes (new writes), keys up to the
    database's own limit (reads and deletes of keys already stored), values up to
    `max_value_size` bytes encoded."""

    __slots__ = ("max_key_size", "stored_key_size", "max_value_size")

    def __init__(self, max_key_size: int, stored_key_size: int, max_value_size: int) -> None:
        self.max_key_size = max_key_size
        self.stored_key_size = stored_key_size
        self.max_value_size = max_value_size

    def put_op(self, key: Key, value: Any) -> Op:
        key = check_key(key, self.max_key_size)
        encoded = encode_value(value, self.max_value_size, key)
        return (OP_PUT, key, encoded, in_memory(value, encoded))

    def setdefault_op(self, key: Key, default: Any) -> tuple[Key, Op | Exception]:
        """`key` checked as a stored key's, and the put storing `default` under it, or why it
        cannot: raised only if the key turns out missing (`dict.setdefault` never looks at
        the default of a key it holds)."""
        key = check_key(key, self.stored_key_size)
        try:
            return key, self.put_op(key, default)
        except (TypeError, ValueError) as refusal:
            return key, refusal

    def delete_op(self, key: Key) -> Op:
        return (OP_DELETE, check_key(key, self.stored_key_size), None, None)

    def incr_op(self, key: Key, delta: int) -> Op:
        key = check_key(key, self.max_key_size)
        return (OP_INCR, key, check_int64(check_delta(delta), "incr delta"), None)

    def put_many_ops(self, entries: Mapping[Key, Any] | Iterable[tuple[Key, Any]]) -> list[Op]:
        """Ops of a mapping, or of an iterable of (key, value) pairs (as `dict.update`)."""
        pairs = entries.items() if isinstance(entries, Mapping) else entries
        ops: list[Op] = []
        for index, pair in enumerate(pairs):
            try:
                if isinstance(pair, (str, bytes)):  # "ab" would unpack as ("a", "b")
                    raise TypeError
                key, value = pair
            except TypeError:
                raise TypeError("takes a mapping or an iterable of (key, value) pairs, "
                                f"not an item {pair!r}") from None
            except ValueError:  # as dict.update: a sequence of the wrong length
                raise ValueError(f"item #{index} ({pair!r}) is not a (key, value) "
                                 f"pair") from None
            ops.append(self.put_op(key, value))
        return ops


def update_items(other: Any, kwargs: Mapping[str, Any]) -> list[tuple[Key, Any]]:
    """The (key, value) pairs of `dict.update(other, **kwargs)`, in its order: `other` a
    mapping, an object with `keys()` and `[]` (as dict takes it), or an iterable of pairs."""
    items: list[tuple[Key, Any]] = []
    if isinstance(other, Mapping):
        items.extend(other.items())
    elif hasattr(other, "keys"):
        items.extend((key, other[key]) for key in other.keys())
    else:
        items.extend(other)
    items.extend(kwargs.items())
    return items


def ops_plan(ops: list[Op]) -> tuple[Plan[None], list[Key]]:
    """The plan writing `ops` in order as one record, and the keys it needs read first (those
    incremented before the batch writes them)."""
    needs: list[Key] = []
    written: set[Key] = set()
    for op, key, _, _ in ops:
        if op == OP_INCR and key not in written:
            needs.append(key)
        written.add(key)

    def plan(tx: Transaction) -> None:
        for op, key, arg, held in ops:
            if op == OP_PUT:
                tx.put(key, arg, held)
            elif op == OP_DELETE:
                tx.delete(key)
            else:
                tx.incr(key, arg)

    return plan, needs


def delete_plan(key: Key) -> Plan[None]:
    """`delete`: a key memory knows is gone needs no record; any other is logged as deleted
    (whether the database has it is not asked: a read could cost more than the record)."""
    def plan(tx: Transaction) -> None:
        if tx.known(key) is not ABSENT:
            tx.delete(key)
    return plan


def pop_plan(key: Key, default: Any = _NO_DEFAULT) -> Plan[Any]:
    """`pop` (and `del`, which discards the value): the value, deleted; `default` or KeyError
    when there is none."""
    def plan(tx: Transaction) -> Any:
        value = tx.current(key)
        if value is ABSENT:
            if default is _NO_DEFAULT:
                raise KeyError(key)
            return default
        tx.delete(key)
        return value
    return plan


def setdefault_plan(key: Key, op: Op | Exception) -> Plan[Any]:
    """`setdefault` (`op` from `Limits.setdefault_op`): the current value, or the default
    stored and returned as `get` would then return it (a fresh copy of a mutable value)."""
    def plan(tx: Transaction) -> Any:
        value = tx.current(key)
        if value is not ABSENT:
            return value
        if isinstance(op, Exception):
            raise op
        held = op[3]
        tx.put(key, op[2], held)
        return value_of(held)
    return plan


def delete_all_plan(keys: Iterable[Key]) -> Plan[int]:
    """`clear`: delete `keys` (the database's, read beforehand) and every key memory holds;
    return how many were deleted."""
    def plan(tx: Transaction) -> int:
        deleted = 0
        for key in tx.memory_keys(keys):
            if tx.known(key) is not ABSENT:
                tx.delete(key)
                deleted += 1
        return deleted
    return plan


class BatchOperations:
    """Operations collected for one atomic batch record (validated as they are added)."""

    def __init__(self, limits: Limits, commit: Callable[[list[Op]], Any]) -> None:
        self._limits = limits
        self._commit_ops = commit
        self._ops: list[Op] = []
        self._entered = False  # by its `with` (`async with`): nothing else ever commits it
        self._done = False
        self.lsn: int | None = None

    def put(self, key: Key, value: Any) -> None:
        self._check()
        self._ops.append(self._limits.put_op(key, value))

    def delete(self, key: Key) -> None:
        self._check()
        self._ops.append(self._limits.delete_op(key))

    def incr(self, key: Key, delta: int = 1) -> None:
        self._check()
        self._ops.append(self._limits.incr_op(key, delta))

    def _check(self) -> None:
        if self._done:
            raise ValueError("this batch has already been committed or discarded")
        if not self._entered:
            raise ValueError("a batch is written when its block exits: add to it inside "
                             "`with cache.batch() as b:` (`async with` for AsyncCache)")

    def _take(self, exc_type: type[BaseException] | None) -> list[Op] | None:
        """The ops to commit when the block exits (None if it raised: nothing is written)."""
        self._done = True
        ops, self._ops = self._ops, []
        return ops if exc_type is None else None
