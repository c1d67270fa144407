"""The file operations the log performs, in one replaceable place.

Every open, write, fsync, truncate, rename and unlink under `wal/` goes through `SYSCALLS`, so
the fault-injection harness can record what reached the disk (to simulate power loss) or make
the Nth call fail with ENOSPC or EIO. In normal use these are the plain `os` functions.
"""

from __future__ import annotations

import os


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Syscalls:
    """Plain `os` calls; an instance attribute set by the harness overrides one of them."""

    open = staticmethod(os.open)
    close = staticmethod(os.close)
    write = staticmethod(os.write)
    fdatasync = staticmethod(os.fdatasync)
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
