"""Backends that wrap a real one (`wbcache.LmdbBackend`, `wbcache.PostgresBackend`) to observe
or disturb it.

`JournaledBackend` (in a worker) reports every `apply` to the journal before it starts and
after it returns, with the data when the power-loss harness needs to rebuild the database as of
any moment; it can also SIGKILL its own process part-way through the Nth apply (a crash inside
the database's commit). `SlowReads` (in a worker) makes every `get` take a little while after
its answer is read, as a database across a network does, so that reads of cold keys overlap
writes, flushes and evictions of the same keys. `ControlledBackend` (in-process harnesses)
fails chosen applies, remembers the committed checkpoint (what the log may be truncated to),
and can be frozen for a consistent copy of the database while the cache that uses it keeps
running.

All of them wrap a backend through the public `Backend` protocol only: what they disturb is
what any user's database could do.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any

from wbcache import Backend, CheckpointTokens
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

    def attach(self, cache_id: str, tokens: CheckpointTokens | None = None) -> None:
        self.inner.attach(cache_id, tokens)

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
    [b, checkpoint] after it returned.

    With `kill_in_apply` = n, the nth apply (from 1) SIGKILLs this process part-way through:
    a timer fires after a random fraction of the time the applies before it took (or of
    `first_guess` seconds for the first), so the kill lands inside the database's own commit
    (between its writes, its fsyncs, or two transactions it should not have split), which a
    kill timed from outside the process reaches only by luck."""

    def __init__(self, inner: Backend, journal: Journal, *, with_data: bool,
                 kill_in_apply: int | None = None, seed: int = 0,
                 first_guess: float = 0.001) -> None:
        super().__init__(inner)
        self._journal = journal
        self._with_data = with_data
        self._kill_in_apply = kill_in_apply
        self._rng = random.Random(seed)
        self._applies = 0
        self._slowest = first_guess  # seconds: the longest apply so far

    def apply(self, puts: Collection[tuple[Key, bytes]], deletes: Sequence[Key],
              checkpoint: int, increments: Sequence[tuple[Key, int]] = ()) -> None:
        if self._with_data:
            self._journal.emit(DB_BEGIN, checkpoint, [list(pair) for pair in puts], list(deletes),
                               [list(pair) for pair in increments])
        else:
            self._journal.emit(DB_BEGIN, checkpoint, None, None, None)
        self._applies += 1
        if self._applies == self._kill_in_apply:
            _kill_self_after(self._rng.uniform(0.0, self._slowest))
        started = time.perf_counter()
        self._apply_inner(puts, deletes, checkpoint, increments)
        self._slowest = max(self._slowest, time.perf_counter() - started)
        self._journal.emit(DB_DONE, checkpoint)


def _kill_self_after(seconds: float) -> None:
    """SIGKILL this process `seconds` from now, from a thread of its own."""
    def kill() -> None:
        time.sleep(seconds)  # the delay IS the fault being injected, not a wait for anything
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=kill, name="harness-kill-in-apply", daemon=True).start()


class SlowReads(_Delegating):
    """A backend whose `get` reads its answer, then holds it for a random time up to `delay`
    seconds (0: just yields the GIL) before returning it: the window in which a write, a
    flush or an eviction of the same key overtakes the read. Every other member is the
    wrapped backend's."""

    def __init__(self, inner: Backend, delay: float, seed: int = 0) -> None:
        super().__init__(inner)
        self._delay = delay
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self.reads = 0

    def get(self, key: Key) -> bytes | None:
        value = self.inner.get(key)
        with self._rng_lock:
            self.reads += 1
            pause = self._rng.uniform(0.0, self._delay)
        time.sleep(pause)  # the latency being injected (time.sleep(0) yields the GIL)
        return value

    def apply(self, puts: Collection[tuple[Key, bytes]], deletes: Sequence[Key],
              checkpoint: int, increments: Sequence[tuple[Key, int]] = ()) -> None:
        self._apply_inner(puts, deletes, checkpoint, increments)


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

    def attach(self, cache_id: str, tokens: CheckpointTokens | None = None) -> None:
        super().attach(cache_id, tokens)
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
