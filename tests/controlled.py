"""What many tests share: a backend the test can hold, slow down or fail, and polling with a
deadline.

`ControlledBackend` wraps a real backend (LMDB by default) through the public `Backend`
protocol, so what it disturbs is exactly what any user's database could do:
  * `apply` can fail (`failing`, `failures_left`) or block on `gate` (`entered` says it is
    inside);
  * `get` can block on `read_gate` (`reading` says a read is inside, holding its answer) or
    take `read_delay` seconds, as a database across a network does.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import wbcache
from wbcache.backends.base import CheckpointTokens, Key


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0,
               what: str = "condition") -> Any:
    """Poll an observable condition (never a sleep standing in for one); fail on timeout.
    Returns the predicate's first truthy value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.005)


class ControlledBackend:
    """A backend wrapping `inner` (an `LmdbBackend` at `path` if not given); see the module
    docstring for what a test can do to it."""

    def __init__(self, path: Path | None = None, *, inner: Any = None) -> None:
        if inner is None:
            assert path is not None
            inner = wbcache.LmdbBackend(str(path))
        self.inner = inner
        self.failures_left = 0
        self.failing = False
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.applied = 0
        self.read_gate = threading.Event()
        self.read_gate.set()
        self.reading = threading.Event()
        self.read_delay = 0.0
        self.reads = 0

    # What the cache reads off the backend besides the methods: forwarded, so wrapping
    # changes nothing the cache decides on.
    @property
    def kind(self) -> str:
        return str(self.inner.kind)

    @property
    def applies_increments(self) -> bool:
        return bool(self.inner.applies_increments)

    @property
    def default_read_ttl(self) -> float | None:
        ttl: float | None = self.inner.default_read_ttl
        return ttl

    @property
    def max_key_size(self) -> int:
        return int(self.inner.max_key_size)

    def attach(self, cache_id: str, tokens: CheckpointTokens | None = None) -> None:
        self.inner.attach(cache_id, tokens)

    def apply(self, puts: Collection[tuple[Key, bytes]], deletes: Sequence[Key],
              checkpoint: int, increments: Sequence[tuple[Key, int]] = ()) -> None:
        self.entered.set()
        self.gate.wait()
        if self.failing or self.failures_left > 0:
            self.failures_left -= 1
            raise OSError(errno.ECONNREFUSED, "database unavailable (test)")
        self.inner.apply(puts, deletes, checkpoint, increments)
        self.applied += 1

    def get(self, key: Key) -> bytes | None:
        value = self.inner.get(key)  # the answer is read first, then held back
        self.reads += 1
        self.reading.set()
        self.read_gate.wait()
        if self.read_delay:
            time.sleep(self.read_delay)  # latency of a database across a network
        return value  # type: ignore[no-any-return]

    def checkpoint(self) -> int:
        return int(self.inner.checkpoint())

    def count(self) -> int:
        return int(self.inner.count())

    def items(self) -> Iterator[tuple[Key, bytes]]:
        return self.inner.items()  # type: ignore[no-any-return]

    def close(self) -> None:
        self.inner.close()


def flush_writing_meanwhile(cache: wbcache.Cache, write: Callable[[wbcache.Cache], Any]) -> None:
    """`cache.flush()`, with `write(cache)` run once its transaction has committed and
    before the flush ends: a write served while the flush ran."""
    backend = cache._backend
    apply = backend.apply

    def apply_then_write(*args: Any, **kwargs: Any) -> None:
        apply(*args, **kwargs)
        write(cache)

    backend.apply = apply_then_write  # type: ignore[method-assign]
    try:
        cache.flush()
    finally:
        del backend.apply  # the class's again
