"""`DirectoryLock`: one owner per cache directory (docs/design.md, guarantee 6).

An exclusive, non-blocking `flock` on `DIR/LOCK`. flock locks belong to the open file
description, so a second open in the SAME process conflicts too (fcntl record locks would not),
and the kernel drops the lock when the owner dies, even by SIGKILL. Read-only tools take the
lock SHARED: several may read at once, and no cache can open (and change the directory) while
they do.
"""

from __future__ import annotations

import fcntl
import os

from wbcache.errors import CacheLockedError


class DirectoryLock:
    """A held flock on a cache directory's LOCK file; `release()` drops it."""

    def __init__(self, fd: int, path: str) -> None:
        self._fd: int | None = fd
        self.path = path

    @classmethod
    def acquire(cls, path: str, *, record_owner: bool = True,
                writable: bool = True) -> DirectoryLock:
        """Lock `path` (the LOCK file, created if missing) exclusively, or raise
        `CacheLockedError` at once. With `record_owner`, write our pid into it (for humans and
        `wbcache inspect`; the lock itself is the flock); otherwise call `record_owner()` once
        the holder starts changing the directory. `writable=False` opens the existing file
        read-only (a dry run needs no write permission) and can never record an owner."""
        flags = os.O_RDWR | os.O_CREAT if writable else os.O_RDONLY
        fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = owner_pid(path)
            owner = f" (pid {pid})" if pid is not None else ""
            raise CacheLockedError(
                f"{os.path.dirname(path)} is in use by another cache{owner}"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        lock = cls(fd, path)
        if record_owner:
            lock.record_owner()
        return lock

    @classmethod
    def acquire_shared(cls, path: str) -> DirectoryLock | None:
        """A shared lock on the existing LOCK file at `path`, or None while an owner holds it
        exclusively. Opens read-only: a reader needs no write permission."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, path)

    def record_owner(self) -> None:
        """Write this process's pid into the (exclusively held) LOCK file."""
        assert self._fd is not None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None


def owner_pid(path: str) -> int | None:
    """The pid recorded in the LOCK file at `path` if that process is alive, else None."""
    try:
        with open(path, "rb") as file:
            text = file.read(32).decode().strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not text.isdigit():
        return None
    pid = int(text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # alive, owned by another user
        pass
    return pid
