"""The file operations the log performs, in one replaceable place.

Every open, write, fsync, truncate, rename and unlink under `wal/` goes through `SYSCALLS`, so
the fault-injection harness can record what reached the disk (to simulate power loss) or make
the Nth call fail with ENOSPC or EIO. In normal use these are the plain `os` functions. The one
exception is the log's writes and fdatasyncs under fsync="always", made by wal/_pipe.c's thread
in C; replacing `write`, `fdatasync` or `write_sync` here (or on the class) retires that thread,
so the harness sees every call from then on (wal/commit.py).
"""

from __future__ import annotations

import os


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_then_sync(fd: int, data: bytes) -> None:
    """`write_sync` where wal/_sync.c is not built: the two calls."""
    write_all(fd, data)
    SYSCALLS.fdatasync(fd)


try:  # a batch's last write and its fdatasync, letting go of the GIL once (wal/_sync.c)
    from wbcache.wal._sync import write_sync as _write_sync
except ImportError:  # pragma: no cover - a build without a C compiler
    _write_sync = _write_then_sync


class Syscalls:
    """Plain `os` calls; an instance attribute set by the harness overrides one of them.

    `write_sync(fd, data)` is `write_all` then `fdatasync` in one C call (wal/_sync.c). The
    log writer takes it only when the harness has replaced neither `write` nor `fdatasync`
    (it would not see them), or has replaced `write_sync` itself (it sees the one call)."""

    open = staticmethod(os.open)
    close = staticmethod(os.close)
    write = staticmethod(os.write)
    fdatasync = staticmethod(os.fdatasync)
    write_sync = staticmethod(_write_sync)
    fsync = staticmethod(os.fsync)
    ftruncate = staticmethod(os.ftruncate)
    rename = staticmethod(os.rename)
    unlink = staticmethod(os.unlink)
    fsync_dir = staticmethod(_fsync_dir)


SYSCALLS = Syscalls()


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of `data` (os.write may write less than asked)."""
    written = SYSCALLS.write(fd, data)
    if written == len(data):  # the usual case, without a memoryview
        return
    view = memoryview(data)[written:]
    while view:
        written = SYSCALLS.write(fd, view)
        view = view[written:]
