"""The cache hit: `cache.get` when memory holds the key, its hottest path (no lock).

`hit_path(cache, doc)` builds the function each open `Cache` takes as its own `get`: the C `Hit` of
`wbcache/_hit.c` when it is built (setup.py), else the closure below, the same steps in Python;
tests/test_hit_path.py runs both on the same cases. What a hit reads is the cache's memory
(`Entries.map`) and what it notes is the CLOCK's ring of recent hits (`Entries.recent`); a miss
goes to `Cache._read`, which reads the database through the sequencer.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgpack

from wbcache.backends.base import Key
from wbcache.memory import TOMBSTONE

if TYPE_CHECKING:
    from wbcache.cache import Cache

try:  # the hit path in C (wbcache/_hit.c, built by setup.py); else the closure in hit_path
    from wbcache._hit import Hit as _Hit
except ImportError:  # pragma: no cover - a build without a C compiler
    _Hit = None

unpackb = msgpack.unpackb
_MISSING: Any = object()
_SIGNATURE = inspect.Signature([
    inspect.Parameter("key", inspect.Parameter.POSITIONAL_OR_KEYWORD),
    inspect.Parameter("default", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)])


def hit_path(cache: Cache, doc: str | None) -> tuple[Callable[..., Any], Callable[[], int]]:
    """`cache.get`, and a function that returns its hits so far.

    A hit is the cache's hottest path: a lookup in memory, a note of the hit for the CLOCK
    (`Entries.recent`), the hit count, no lock. Built, it is `wbcache/_hit.c` (`Hit`), the
    steps of `get` below in C; without the extension (no C compiler at install) it is this
    closure: cell variables rather than attributes of `self`, called as a plain function, not
    a bound method (the technique of the pure-Python `functools.lru_cache`, about 16 % fewer
    instructions per hit, docs/bench.md). With a `read_ttl` (a shared database), an entry
    past it is read again, so other caches' writes become visible."""
    entries = cache._entries
    read = cache._read
    if _Hit is not None:
        fast = _Hit(entries.map, entries.recent.append, read, unpackb, TOMBSTONE)
        fast.__name__, fast.__qualname__, fast.__doc__ = "get", "Cache.get", doc
        fast.__signature__ = _SIGNATURE  # what inspect.signature gives for the closure
        return _with_ttl(cache, fast, doc), lambda: fast.hits
    held_in = entries.map.get
    note_hit = entries.recent.append
    hits = 0

    def get(key: Key, default: Any = None) -> Any:
        nonlocal hits
        held = held_in(key, _MISSING)
        if held is _MISSING:
            return read(key, default)
        kind = type(key)
        if kind is not str and kind is not bytes:
            # read checks it and looks up the plain str (or bytes) a subclass stands for: one
            # overriding __eq__ (a case-insensitive str) found another key's entry here
            return read(key, default)
        note_hit(key)
        if type(held) is tuple:  # a mutable value, as its encoding (codec.py)
            hits += 1
            return unpackb(held[0], strict_map_key=False)
        if held is TOMBSTONE:
            return default
        hits += 1
        return held

    def hit_count() -> int:
        return hits

    get.__doc__ = doc
    return _with_ttl(cache, get, doc), hit_count


def _with_ttl(cache: Cache, get: Callable[..., Any], doc: str | None) -> Callable[..., Any]:
    """`get` itself, or with a `read_ttl` a `get` that reads an entry past it again."""
    if cache.read_ttl is None:
        return get
    read = cache._read
    in_memory = cache._sequencer.in_memory

    def get_within_ttl(key: Key, default: Any = None) -> Any:
        if not in_memory(key):
            return read(key, default)
        return get(key, default)

    get_within_ttl.__doc__ = doc
    return get_within_ttl
