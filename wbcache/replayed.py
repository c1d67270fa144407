"""The data a database will hold once pending logs are replayed into it, worked out without
writing anything: what `wbcache dump` and `wbcache get` show (`wbcache.snapshot`).

Each log's records newer than its checkpoint are folded as recovery folds them
(`wbcache.wal.records.fold_frame`): per key, its newest value (None: deleted) and, for a key
the log only incremented, the sum of the increments. The logs are then applied over the
database in order (a shared directory's lanes, in lane order), as recovery applies them
(`wbcache.recovery.apply_changes`): a database that adds increments itself (a shared one:
`applies_increments`) gets such a key as a delta added to what it stores, where an int counts
on, anything else (or nothing) counts from 0, and the sum is held to the int64 range, as
`SharedLmdbBackend` and `PostgresBackend` add it; any other database gets the value the log
recorded.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from wbcache.backends import Backend, Key
from wbcache.codec import added, packb
from wbcache.directory import key_order
from wbcache.recovery.scan import walk_log
from wbcache.wal.records import Deltas, Record, State, fold_frame

__all__ = ["Found", "Replayed", "fold_log"]


class Found(NamedTuple):
    """A value after recovery: its encoding (None: absent), where it comes from ("log",
    "database", or None), and for a shared directory the lane whose log last wrote it."""

    value: bytes | None
    source: str | None
    lane: str | None = None


def fold_log(wal_dir: str, checkpoint: int, max_key_size: int) -> tuple[State, Deltas]:
    """The records of the log in `wal_dir` newer than `checkpoint`, folded as recovery folds
    them. Raises `CorruptLogError` where recovery would refuse the log."""
    state: State = {}
    deltas: Deltas = {}

    def on_frame(records: list[Record]) -> None:
        fold_frame(state, records, checkpoint, deltas)

    walk_log(wal_dir, checkpoint, on_frame, max_key_size=max_key_size).check()
    return state, deltas


class Replayed:
    """What logs add to a database once replayed into it, in the order added (module
    docstring)."""

    def __init__(self, applies_increments: bool) -> None:
        self._applies_increments = applies_increments
        self._values: dict[Key, tuple[bytes | None, str | None]] = {}  # None: deleted
        self._deltas: dict[Key, tuple[list[int], str | None]] = {}  # added to what is stored

    def add(self, lane: str | None, state: State, deltas: Deltas) -> None:
        for key, encoded in state.items():
            if self._applies_increments and key in deltas:
                if key in self._values:
                    self._values[key] = (packb(added(self._values[key][0], deltas[key])), lane)
                else:
                    earlier = self._deltas.get(key, ([], None))[0]
                    self._deltas[key] = ([*earlier, deltas[key]], lane)
            else:
                self._values[key] = (encoded, lane)
                self._deltas.pop(key, None)

    def touches(self, key: Key) -> bool:
        return key in self._values or key in self._deltas

    def has_delta(self, key: Key) -> bool:
        """Whether `key`'s value is the database's with increments added."""
        return key in self._deltas

    def items(self, database: Backend, *, ordered: bool) -> Iterator[tuple[Key, bytes]]:
        """Every (key, encoded value) after the replay, in `key_order`. `ordered`: the
        database yields its items in that order (LMDB does), so they are merged as they come;
        otherwise they are sorted in memory first."""
        from_logs = sorted(self.final(database), key=lambda item: key_order(item[0]))
        stored: Iterable[tuple[Key, bytes]] = database.items()
        if not ordered:
            stored = sorted(stored, key=lambda item: key_order(item[0]))
        from_database = ((key, value) for key, value in stored if not self.touches(key))
        return heapq.merge(from_database, from_logs, key=lambda item: key_order(item[0]))

    def get(self, key: Key, database: Backend) -> Found:
        if key in self._values:
            value, lane = self._values[key]
            return Found(value, "log", lane) if value is not None else Found(None, None)
        stored = database.get(key)
        if key in self._deltas:
            return Found(self._resolve(key, stored), "log", self._deltas[key][1])
        return Found(stored, "database") if stored is not None else Found(None, None)

    def final(self, database: Backend) -> Iterator[tuple[Key, bytes]]:
        """Every key the logs leave present, with its value (a delta's read from `database`)."""
        for key, (value, _) in self._values.items():
            if value is not None:
                yield key, value
        for key in self._deltas:
            yield key, self._resolve(key, database.get(key))

    def _resolve(self, key: Key, stored: bytes | None) -> bytes:
        for delta in self._deltas[key][0]:  # one per lane, each added (and held) in turn
            stored = packb(added(stored, delta))
        assert stored is not None
        return stored
