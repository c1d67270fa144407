"""`Entries`: what memory holds, per key, and which clean entries to evict.

Memory holds, per key, the newest value written or read (`held`): immutable values as
themselves, mutable ones as their msgpack encoding in a 1-tuple (codec.py), a deleted key as
`TOMBSTONE`. Dirty entries (not yet in the database) are pinned: only clean ones are evicted.

Eviction is CLOCK (second chance): entries sit in insertion order; eviction takes the oldest
entry, and one that was visited since it was last looked at gets a second chance (its mark
cleared, it goes to the back) instead of being evicted. A hit never reorders anything and
takes no lock: it appends the key to `recent`, a bounded deque of the last `RECENT_HITS` hits
(an append is atomic under the GIL, and lands on a cache-warm slot). `evict`, under the lock,
first turns what `recent` holds into visited marks. This is the lossy read buffer of
Caffeine (W-TinyLFU): the hit pays an append instead of a set insert on a cache-cold hashed
slot (a hit of a str value went from 320-354 to 187-224 ns, keys in insertion order), the
marks are paid for only when something is to be evicted (under the lock, by the write or the
miss that evicts: at a 27 % miss ratio, 7 % more CPU per read than marking on the hit; both
in docs/bench.md), and a burst of more than `RECENT_HITS` hits between two evictions keeps the
marks of the newest of them only. Exact LRU order would cost a `move_to_end` per hit; the
hit ratio stays close to LRU's (bench/, the Zipf and scan traces).

With a `read_ttl` (a database shared by many caches), a clean entry is served only while it
is younger than the TTL (`fresh`); `clean_since` says since when each clean entry is clean.

Every method that changes anything is called with the sequencer's lock held; `map`,
`recent` and `fresh` are used without it.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import Any

from wbcache.backends.base import Key


class _Tombstone:
    """In memory: the key is deleted (the database may still hold it until the next flush)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<deleted>"


TOMBSTONE: Any = _Tombstone()

# Hits remembered between two evictions. Turning them into marks is a membership test and a set
# insert each, under the lock: 0.3-0.5 ms for a full buffer of random keys among 100,000.
RECENT_HITS = 1024


class Entries:
    """The in-memory map (see the module docstring)."""

    def __init__(self, capacity: int, read_ttl: float | None) -> None:
        self.map: OrderedDict[Key, Any] = OrderedDict()  # insertion order: the CLOCK's queue
        self.recent: deque[Key] = deque(maxlen=RECENT_HITS)  # hits since the last eviction
        self.visited: set[Key] = set()
        self.capacity = capacity
        self.read_ttl = read_ttl
        # when each clean entry became clean; None when clean entries never expire
        self.clean_since: dict[Key, float] | None = {} if read_ttl is not None else None
        self.evictions = 0
        self.blocked = False  # every entry over capacity is pinned: wait for a flush

    def now(self) -> float:
        """The clock of `clean_since` (a read's start is taken on it: `keep_clean`)."""
        return time.monotonic()

    def fresh(self, key: Key) -> bool:
        """Whether memory may answer for `key` without the database (dirty entries have no
        `clean_since` and are always fresh)."""
        clean_since = self.clean_since
        if clean_since is None:
            return True
        since = clean_since.get(key)
        return since is None or time.monotonic() - since <= self.read_ttl  # type: ignore[operator]

    # ------------------------------------------------------------ lock held

    def write(self, key: Key, held: Any) -> None:
        """A write of `key`: memory holds it (pinned by the caller's dirty set)."""
        entries = self.map
        if key in entries:
            self.visited.add(key)  # written: as good as read
        entries[key] = held
        if held is TOMBSTONE:
            # Deleted keys go to the front: first to be evicted once flushed, and never in
            # the way of a search for a live key from the back (`newest`).
            entries.move_to_end(key, last=False)
        if self.clean_since is not None:
            self.clean_since.pop(key, None)  # dirty: no longer a clean entry that can expire

    def keep_clean(self, key: Key, held: Any, read_at: float) -> bool:
        """Keep a value read from the database as a clean entry, unless memory is full of
        pinned entries (caching reads then would grow memory without bound until a flush).
        Returns whether it was kept. With a read_ttl it is as old as the read's start
        (`read_at`), not its end: a slow read's answer must not outlive a later read's, whose
        entry expired meanwhile (another cache may have changed the key in between)."""
        if self.blocked and len(self.map) >= self.capacity:
            return False
        clean_since = self.clean_since
        if clean_since is None:
            self.map[key] = held
            return True
        # Expired first, aged last: a hit (no lock) between the two steps must find neither
        # the old value made young (it was served, however old: an outside hunt) nor the new
        # one without an age (never expiring, were an interrupt to land there).
        clean_since[key] = -math.inf
        self.map[key] = held
        clean_since[key] = read_at
        return True

    def forget(self, key: Key) -> None:
        """Drop `key` from memory (deleted in the database by another cache)."""
        self.map.pop(key, None)
        if self.clean_since is not None:
            self.clean_since.pop(key, None)
        self.visited.discard(key)

    def now_clean(self, keys: Iterable[Key], stale: Callable[[Key], bool]) -> None:
        """After a flush: `keys` are clean from now on; those `stale` says so are stale at
        once (a key flushed as a delta holds this cache's view of a sum, not the total)."""
        clean_since = self.clean_since
        if clean_since is None:
            return
        now = time.monotonic()
        for key in keys:
            clean_since[key] = -math.inf if stale(key) else now

    def evict(self, pinned: Callable[[Key], bool], evicted: Callable[[Key], None]) -> bool:
        """Drop clean entries, oldest first with a second chance for visited ones, until
        within capacity. Returns False (and stops trying until `unblock`) when every entry
        over capacity is pinned: the caller then has a flush started.

        Each step is one atomic OrderedDict operation (a look at the first key, move_to_end,
        del): hits read the map without the lock. And none takes an entry out that is not
        evicted: a pinned entry popped, to be put back, was lost for good when an interrupt
        (KeyboardInterrupt, a signal handler's exception, raised between two bytecodes) came
        in between, and a later write built on the database's older value (an outside
        hunt). An interrupt now leaves every entry where it was or where it was going."""
        entries = self.map
        if len(entries) <= self.capacity or self.blocked:
            return True
        visited, clean_since, recent = self.visited, self.clean_since, self.recent
        for _ in range(len(recent)):  # popleft, not iteration: hits append meanwhile,
            key = recent.popleft()    # without the lock; what they add now waits its turn
            if key in entries:
                visited.add(key)
        budget = 2 * len(entries) + 1  # each entry: a second chance, then a verdict
        while len(entries) > self.capacity:
            if not budget:
                self.blocked = True
                return False
            budget -= 1
            key = next(iter(entries))
            if pinned(key):
                entries.move_to_end(key)
            elif key in visited:
                entries.move_to_end(key)
                visited.discard(key)
            else:
                evicted(key)  # first: its reads are stale before it leaves
                del entries[key]
                self.evictions += 1
                if clean_since is not None:
                    clean_since.pop(key, None)
        return True

    def newest(self, usable: Callable[[Key], bool]) -> Any:
        """The newest key held that `usable` accepts, or None when there is none."""
        entries = self.map
        for key in reversed(entries):  # deleted keys sit mostly at the front: met last
            if entries[key] is not TOMBSTONE and usable(key):
                return key
        return None

    def unblock(self) -> None:
        """A flush made entries clean: eviction may try again."""
        self.blocked = False

    def clear(self) -> None:
        self.map.clear()
        self.recent.clear()
        self.visited.clear()
        if self.clean_since is not None:
            self.clean_since.clear()
