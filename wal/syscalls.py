"""The file operations the log performs, in one replaceable place.

Every open, write, fsync, truncate, rename and unlink under `wal/` goes through `SYSCALLS`, so
the fault-injection harness can record what reached the disk (to simulate power loss) or make
the Nth call fail with ENOSPC or EIO. In normal use these are the plain `os` functions. The one
exception is the log's writes and fdatasyncs under fsync="always", made by wal/_pipe.c's thread
in C; replacing `write`, `fdatasync` or `write_sync` here (or on the class) retires that thread,
so the harness sees every call from then on (wal/commit.py).
"""

from __future__ import annotations

import ctypes
import errno
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


_LIBC = ctypes.CDLL(None, use_errno=True)
# 64-bit offsets whatever the build (`fallocate` takes an off_t, 32 bits on a 32-bit one).
_fallocate = getattr(_LIBC, "fallocate64", None) or _LIBC.fallocate
_fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


def _reserve(fd: int, start: int, end: int) -> None:
    """Allocate bytes `start..end` of the file on disk (read as zeros; the size grows to
    `end`), so that a full disk is an error now, not a SIGBUS on a memory-mapped write.

    fallocate(2) itself, not `os.posix_fallocate`: where the file system cannot allocate
    (FUSE, as LazyFS; NFS before 4.2; ext2 and ext3) glibc's posix_fallocate writes a zero
    byte per block, 2,048 calls for a 1 MiB window on LazyFS. Here the zeros are written
    instead, one call for the window (more after a short write): a local file system
    allocates its blocks then, so a full disk fails this call (extending the file alone left
    a hole that ext2/ext3 allocate at the mapped write: a SIGBUS at the put), and a FUSE or
    NFS file system when it writes the pages back (a full disk then fails that fsync). `fd`
    must not append."""
    while _fallocate(fd, 0, start, end - start) != 0:
        error = ctypes.get_errno()
        if error == errno.EINTR:
            continue
        if error not in (errno.EOPNOTSUPP, errno.ENOSYS):
            raise OSError(error, os.strerror(error))
        zeros = memoryview(bytes(end - start))
        while zeros:  # a short write (a signal, the disk filling): the rest, or ENOSPC
            written = os.pwrite(fd, zeros, start)
            if written == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            zeros = zeros[written:]
            start += written
        return


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
    reserve = staticmethod(_reserve)


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
