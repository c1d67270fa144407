"""The worker's journal: a stream of small msgpack events, each framed by its length.

The worker appends one event per `os.write` (under a lock, so threads never interleave), before
an operation starts and after it is acknowledged, and (in power-loss runs) for every file
operation of the log and every database commit. Nothing is buffered in the process: whatever a
SIGKILL interrupts, every event written before it is in the pipe or the file.

    frame = payload length u32 LE | msgpack array [tag, ...]

A kill can cut the very last frame short; `read_events` stops at the first incomplete frame.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterator
from typing import Any

import msgpack

_LENGTH = struct.Struct("<I")

# Event tags. Worker lifecycle and operations:
READY = "R"  # [R, pid, replayed records, torn bytes, checkpoint after recovery]
START = "S"  # [S, thread, seq]            before operation `seq` of `thread` is called
ACK = "A"  # [A, thread, seq, result]      after it returned (result: LSN or counter value)
ERROR = "E"  # [E, thread, seq, type, message]  it raised
MARKER = "M"  # [M, thread, n]  a node worker's thread found its marker at n (nodes.py)
FORK = "F"  # [F, index, child pid, exit code, {use: outcome}]  a forked child's report (forks.py)
REOPENED = "O"  # [O, round]  the worker closed its cache and opened it again (cold memory)
# File operations of the log (power-loss runs; paths relative to the cache directory):
OPEN = "o"  # [o, fd, path, created, append]
WRITE = "w"  # [w, fd, data]  (data: the bytes written, or their count when not recorded)
SYNC = "f"  # [f, fd]        fdatasync or fsync returned
SYNC_BEGIN = "g"  # [g, fd]  one is called (lazyfs_worker.py only)
CLOSE = "c"  # [c, fd]
TRUNCATE = "t"  # [t, fd, length]
RENAME = "r"  # [r, src, dst]
UNLINK = "u"  # [u, path]
DIR_SYNC = "d"  # [d, dir]  fsync of a directory returned
SYNCING = "Y"  # [Y, n]  the worker's n-th `cache.sync()` began (lazyfs_worker.py)
SYNCED = "y"  # [y, n]   it returned: every write acknowledged before its SYNCING is durable
# Database commits:
DB_BEGIN = "B"  # [B, checkpoint, puts, deletes, increments] (None: not recorded), before apply
DB_DONE = "b"  # [b, checkpoint]                                 after it returned


def encode_event(event: list[Any]) -> bytes:
    payload = msgpack.packb(event, use_bin_type=True)
    return _LENGTH.pack(len(payload)) + payload


class Journal:
    """Appends events to file descriptor `fd`, one `write` each, in causal order."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()

    def emit(self, *event: Any) -> None:
        frame = encode_event(list(event))
        with self._lock:
            view = memoryview(frame)
            while view:
                view = view[os.write(self._fd, view):]


def read_events(data: bytes) -> Iterator[list[Any]]:
    """Every complete event in `data`, in order; a frame cut short by the kill ends the stream."""
    pos, size = 0, len(data)
    while pos + _LENGTH.size <= size:
        (length,) = _LENGTH.unpack_from(data, pos)
        end = pos + _LENGTH.size + length
        if end > size:
            return
        yield msgpack.unpackb(data[pos + _LENGTH.size:end], raw=False, strict_map_key=False)
        pos = end


class EventBuffer:
    """Decodes a journal arriving in chunks (from a pipe): `feed` returns the complete events."""

    def __init__(self) -> None:
        self._pending = bytearray()

    def feed(self, chunk: bytes) -> list[list[Any]]:
        self._pending += chunk
        events, pos, size = [], 0, len(self._pending)
        while pos + _LENGTH.size <= size:
            (length,) = _LENGTH.unpack_from(self._pending, pos)
            end = pos + _LENGTH.size + length
            if end > size:
                break
            events.append(msgpack.unpackb(bytes(self._pending[pos + _LENGTH.size:end]),
                                          raw=False, strict_map_key=False))
            pos = end
        del self._pending[:pos]
        return events
