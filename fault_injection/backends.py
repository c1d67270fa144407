"""Backends that wrap a real one (`wbcache.LmdbBackend`, `wbcache.PostgresBackend`) to observe
or disturb it.

`JournaledBackend` (in a worker) reports every `apply` to the journal before it starts and
after it returns, with the data when the power-loss harness needs to rebuild the database as of
any moment. `ControlledBackend` (in-process harnesses) fails chosen applies, remembers the
committed checkpoint (what the log may be truncated to), and can be frozen for a consistent
copy of the database while the cache that uses it keeps running.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any

from wbcache import Backend
from wbcache.fault_injection.journal import DB_BEGIN, DB_DONE, Journal

Key = Any  # str | bytes


class _Delegating:
    """Everything but `apply` goes straight to the wrapped backend, the declared members of the
    protocol included (`kind`, `applies_increments`, `default_read_ttl`, `attach`): a wrapper
    that hid them would change what it observes (a `PostgresBackend` would never learn its
    directory's `cache_id`, increments would arrive as puts, entries would never expire)."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner

    @property
    def kind(self) -> str:
        return self.inner.kind

    @property
    def applies_increments(self) -> bool:
        return self.inner.applies_increments

    @property
    def default_read_ttl(self) -> float | None:
        return self.inner.default_read_ttl

    def attach(self, cache_id: str) -> None:
        self.inner.attach(cache_id)

    @property
    def max_key_size(self) -> int:
        return self.inner.max_key_size

    def _apply_inner(self, puts: Collection[tuple[Key, bytes]], deletes: Sequence[Key],
                     checkpoint: int, increments: Sequence[tuple[Key, int]]) -> None:
        # Increments only reach a wrapper whose inner backend applies them (apply_changes
        # asks `applies_increments`, forwarded above); without any, the three-argument call
        # also suits a backend written before `increments` existed, as apply_changes does.
        if increments:
            self.inner.apply(puts, deletes, checkpoint, increments)
        else:
            self.inner.apply(puts, deletes, checkpoint)

    def get(self, key: Key) -> bytes | None:
        return self.inner.get(key)

    def checkpoint(self) -> int:
        return self.inner.checkpoint()

    def count(self) -> int:
        return self.inner.count()

    def items(self) -> Iterator[tuple[Key, bytes]]:
        return self.inner.items()

    def close(self) -> None:
        self.inner.close()


class JournaledBackend(_Delegating):
    """Reports each apply: [B, checkpoint, puts, deletes, increments] before it starts,
    [b, checkpoint] after it returned."""

    def __init__(self, inner: Backend, journal: Journal, *, with_data: bool) -> None:
        super().__init__(inner)
        self._journal = journal
        self._with_data = with_data

    def apply(self, puts: Collection[tuple[Key, bytes]], deletes: Sequence[Key],
              checkpoint: int, increments: Sequence[tuple[Key, int]] = ()) -> None:
        if self._with_data:
            self._journal.emit(DB_BEGIN, checkpoint, [list(pair) for pair in puts], list(deletes),
                               [list(pair) for pair in increments])
        else:
            self._journal.emit(DB_BEGIN, checkpoint, None, None, None)
        self._apply_inner(puts, deletes, checkpoint, increments)
        self._journal.emit(DB_DONE, checkpoint)


class InjectedDatabaseError(OSError):
    """The error a `ControlledBackend` raises on purpose."""


class ControlledBackend(_Delegating):
    """A backend whose applies can be made to fail, and whose commits can be held off.

    `fail_when(n)` decides, for the n-th apply (from 1), whether it raises instead of
    committing. `committed` is the checkpoint of the last apply that returned. `frozen()`
    holds every apply off while the caller copies the database.
    """

    def __init__(self, inner: Backend, fail_when: Callable[[int], bool] | None = None) -> None:
        super().__init__(inner)
        self.fail_when = fail_when
        self.applies = 0
        self.failures = 0
        # Known at `attach` (a database shared by many caches keeps one per cache).
        self.committed = 0
        self._lock = threading.Lock()

    def attach(self, cache_id: str) -> None:
        super().attach(cache_id)
        self.committed = self.inner.checkpoint()

    def apply(self, puts: Collection[tuple[Key, bytes]], deletes: Sequence[Key],
              checkpoint: int, increments: Sequence[tuple[Key, int]] = ()) -> None:
        with self._lock:
            self.applies += 1
            if self.fail_when is not None and self.fail_when(self.applies):
                self.failures += 1
                raise InjectedDatabaseError(errno.EIO, f"injected database failure on apply "
                                                       f"{self.applies}")
            self._apply_inner(puts, deletes, checkpoint, increments)
            self.committed = checkpoint

    def frozen(self) -> threading.Lock:
        """`with backend.frozen():` no apply runs (or is half done) inside the block."""
        return self._lock
