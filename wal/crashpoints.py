"""Named crash points at every durable step, armed only by the fault-injection harness.

Call sites read `if crashpoints.ARMED: crashpoints.reached("name")`, so an unarmed process pays
one global lookup. The harness arms a child process through the environment:

    WBCACHE_CRASH_AT="wal.after_fsync:3"   SIGKILL this process the 3rd time that point is reached
    WBCACHE_CRASH_TRACE=/path/file         append the name of every point reached (coverage)
"""

from __future__ import annotations

import os
import signal
import threading

# Every point, in the order a write meets them. The harness enumerates this tuple.
POINTS = (
    "wal.before_write",
    "wal.after_write",
    "wal.before_fsync",
    "wal.after_fsync",
    "wal.before_ack",
    "wal.after_ack",
    "wal.segment.before_create",
    "wal.segment.after_create",
    "wal.segment.after_dir_fsync",
    "wal.segment.before_delete",
    "wal.segment.after_delete",
    "flush.before_commit",
    "flush.after_commit",
    "flush.after_truncate",
    "recovery.before_replay",
    "recovery.after_replay",
    "recovery.after_delete",
)

_TARGET: tuple[str, int] | None = None
_TRACE: str | None = os.environ.get("WBCACHE_CRASH_TRACE") or None
_hits: dict[str, int] = {}
_lock = threading.Lock()


def _parse(spec: str | None) -> tuple[str, int] | None:
    if not spec:
        return None
    name, _, nth = spec.partition(":")
    if name not in POINTS:
        raise ValueError(f"WBCACHE_CRASH_AT names unknown crash point {name!r}")
    return name, int(nth or 1)


_TARGET = _parse(os.environ.get("WBCACHE_CRASH_AT"))
ARMED = _TARGET is not None or _TRACE is not None


def reached(name: str) -> None:
    """Record that `name` was reached; SIGKILL the process if it is the armed hit.

    Under a lock: threads reach points concurrently, and "the Nth hit" must be exact."""
    with _lock:
        count = _hits.get(name, 0) + 1
        _hits[name] = count
        if _TRACE is not None:
            fd = os.open(_TRACE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, f"{name}\n".encode())
            finally:
                os.close(fd)
        if _TARGET is not None and _TARGET == (name, count):
            os.kill(os.getpid(), signal.SIGKILL)
