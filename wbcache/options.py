"""`Options`: every tunable of a cache, with its unit and default, in one frozen dataclass."""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Literal

from wbcache.wal.format import MAX_FRAME_PAYLOAD, MAX_SEGMENT_SIZE

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# Room a record needs besides one value: LSN, op code, key and msgpack framing.
_RECORD_OVERHEAD = 64 * KiB

FSYNC_MODES = ("always", "interval")
# The most seconds any time option may say: 1e9 (31 years). A wait of more than
# threading.TIMEOUT_MAX, or a deadline past the clock's range, raises OverflowError in the
# background thread that waits it.
MAX_SECONDS = 1e9


@dataclass(frozen=True, kw_only=True)
class Options:
    """How a cache is tuned. Pass the fields as keywords to `wbcache.open`.

    Raises `TypeError` for a field of the wrong type and `ValueError` for one out of range,
    naming the field.
    """

    fsync: Literal["always", "interval"] = "always"
    """"always" (default): a write returns only after the fsync that covers it; it survives
    kill -9 and power loss. "interval": a write returns once the operating system has it (it
    survives kill -9); the log is fsync'd every `fsync_interval` seconds, so power loss can lose
    up to that much."""

    fsync_interval: float = 1.0
    """Seconds between log fsyncs under fsync="interval". Default 1.0 (Redis' everysec)."""

    flush_interval: float = 1.0
    """Seconds between flushes of dirty entries into the database. Default 1.0."""

    flush_threshold: int = 10_000
    """Dirty entries that start a flush before the timer. Default 10,000."""

    max_dirty: int = 100_000
    """Dirty entries (not yet in the database) above which writers wait for a flush.
    Default 100,000. Nothing is ever dropped: this is backpressure."""

    capacity: int = 1_000_000
    """Entries kept in memory. Clean entries beyond it are evicted by CLOCK (oldest first,
    a second chance for those read since it last looked, close to LRU's hit ratio); dirty
    entries stay until they are flushed (a flush is started when they alone exceed it).
    Default 1,000,000."""

    segment_size: int = 64 * MiB
    """Bytes after which the log moves to a new segment file, at most 1 GiB. Default 64 MiB.
    A segment may exceed it by one frame (a group-commit write, at most 64 MiB)."""

    max_key_size: int = 511
    """Largest key in bytes (UTF-8 for str keys). Default 511, LMDB's own limit."""

    max_value_size: int = 16 * MiB
    """Largest msgpack-encoded value in bytes. Default 16 MiB."""

    map_size: int = 1 * GiB
    """Initial LMDB map size in bytes, 64 KiB to 1 TiB; it doubles whenever the database fills
    it. Default 1 GiB."""

    read_ttl: float | None = None
    """Seconds a CLEAN entry (read from the database, or flushed) is served from memory before
    it is read again, so that writes by other caches sharing the database become visible.
    Dirty entries are always served from memory. Default None: the backend decides; forever
    for the embedded LMDB (one owner), 1.0 s for PostgreSQL."""

    flush_timeout: float = 30.0
    """Seconds `flush()` and `close()` wait for the database before raising `FlushError`.
    The flusher itself keeps retrying with backoff; nothing is lost. Default 30.0."""

    shared: bool = False
    """Open a shared directory: one LMDB database that every process of the machine opening
    the directory flushes into, and one lane (a log of its own) per open cache. Increments
    are counted exactly once across processes; puts and deletes are last-flush-wins. A
    directory is shared or single-owner from its first open on; opening it the other way is
    refused. Default False (one owner)."""

    adopt_interval: float = 5.0
    """Shared directories: seconds between sweeps for lanes whose process died, whose log is
    then replayed into the database by this cache (an orphan is also adopted by any open).
    Default 5.0."""

    def __post_init__(self) -> None:
        if self.fsync not in FSYNC_MODES:
            raise ValueError(f"option fsync must be one of {FSYNC_MODES}, not {self.fsync!r}")
        if not isinstance(self.shared, bool):
            raise TypeError(f"option shared must be a bool, not {type(self.shared).__name__}")
        for name in ("fsync_interval", "flush_interval", "flush_timeout", "adopt_interval"):
            _check_seconds(name, getattr(self, name))
        if self.read_ttl is not None:
            _check_seconds("read_ttl", self.read_ttl)
        for name in ("flush_threshold", "max_dirty", "capacity", "segment_size",
                     "max_key_size", "max_value_size", "map_size"):
            _check_positive_int(name, getattr(self, name))
        if not 64 * KiB <= self.map_size <= 1024 * GiB:  # LMDB fails below; it grows as it fills
            raise ValueError(f"option map_size must be between 64 KiB and 1 TiB, not "
                             f"{self.map_size}")
        if not 4 * KiB <= self.segment_size <= MAX_SEGMENT_SIZE:
            raise ValueError(f"option segment_size must be between 4096 bytes and 1 GiB, "
                             f"not {self.segment_size}")
        if self.max_value_size > MAX_FRAME_PAYLOAD - _RECORD_OVERHEAD:
            raise ValueError(
                f"option max_value_size must be at most {MAX_FRAME_PAYLOAD - _RECORD_OVERHEAD} "
                f"bytes (the log's record limit), not {self.max_value_size}"
            )

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> Options:
        """Build options from `wbcache.open`'s keywords, naming any unknown one."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown option(s): {', '.join(unknown)}; "
                            f"known: {', '.join(sorted(known))}")
        return cls(**kwargs)


def _check_seconds(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"option {name} must be a number of seconds, not {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"option {name} must be a positive number of seconds, not {value!r}")
    if value > MAX_SECONDS:  # the background threads' waits take no more (OverflowError)
        raise ValueError(f"option {name} must be at most {MAX_SECONDS:g} seconds (about 31 "
                         f"years), not {value!r}")


def check_timeout(value: object) -> float:
    """A method's `timeout`: a number of seconds from 0 to MAX_SECONDS, else TypeError or
    ValueError naming it (a negative one would wait for good, as `Lock.acquire` takes it)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"timeout must be a number of seconds, not {type(value).__name__}")
    if not 0 <= value <= MAX_SECONDS:  # NaN too
        raise ValueError(f"timeout must be from 0 to {MAX_SECONDS:g} seconds, not {value!r}")
    return float(value)


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"option {name} must be an int, not {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"option {name} must be positive, not {value}")
