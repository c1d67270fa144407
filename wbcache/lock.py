"""`DirectoryLock`: one owner per cache directory (DESIGN.md, guarantee 6).

An exclusive, non-blocking `flock` on `DIR/LOCK`. flock locks belong to the open file
description, so a second open in the SAME process conflicts too (fcntl record locks would not),
and the kernel drops the lock when the owner dies, even by SIGKILL.
"""

from __future__ import annotations

import fcntl
import os

from wbcache.errors import CacheLockedError


class DirectoryLock:
    def __init__(self, fd: int, path: str) -> None:
        self._fd: int | None = fd
        self.path = path

    @classmethod
    def acquire(cls, path: str) -> DirectoryLock:
        """Lock `path` (the LOCK file) or raise `CacheLockedError` at once."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(fd)
            os.close(fd)
            raise CacheLockedError(
                f"{os.path.dirname(path)} is in use by another cache{owner}"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        # The owner's pid, for humans and `wbcache inspect`; the lock itself is the flock.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(fd, path)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None


def is_locked(path: str) -> bool:
    """Whether a live owner holds the lock at `path` (probes with a shared, non-blocking flock)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _read_owner(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""
