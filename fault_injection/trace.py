"""`SyscallRecorder`: journals every file operation of the log, for the power-loss model.

Installed in a worker over `wbcache.wal.syscalls.SYSCALLS` (the one place the log's file
operations go through). Each wrapper performs the real call, then appends its event to the
journal BEFORE returning to the library: whatever the library goes on to rely on (an fsync
that returned, a file it created) is in the trace first, so the trace is never behind the
library. Paths are stored relative to the cache directory, so the parent can rebuild the
state of any copy of it.

In `light` mode only segment creation is journaled (the kill harness uses it to kill during
a rotation), without data.
"""

from __future__ import annotations

import os
from typing import Any

from wbcache.fault_injection.journal import (
    CLOSE,
    DIR_SYNC,
    OPEN,
    RENAME,
    SYNC,
    TRUNCATE,
    UNLINK,
    WRITE,
    Journal,
)
from wbcache.wal.syscalls import SYSCALLS

_WRAPPED = ("open", "close", "write", "fdatasync", "write_sync", "fsync", "ftruncate",
            "rename", "unlink", "fsync_dir")


class SyscallRecorder:
    def __init__(self, journal: Journal, root: str, *, light: bool = False) -> None:
        self._journal = journal
        self._root = os.path.abspath(root)
        self._light = light
        self._real: dict[str, Any] = {}
        self._overridden: dict[str, Any] = {}

    def install(self) -> None:
        """Wrap SYSCALLS (whatever is installed now is what the wrappers call)."""
        for name in _WRAPPED:
            self._real[name] = getattr(SYSCALLS, name)
            if name in vars(SYSCALLS):
                self._overridden[name] = vars(SYSCALLS)[name]
        for name in ("open",) if self._light else _WRAPPED:
            setattr(SYSCALLS, name, getattr(self, f"_{name}"))

    def uninstall(self) -> None:
        """Put back what `install` found."""
        for name in _WRAPPED:
            if name in self._overridden:
                setattr(SYSCALLS, name, self._overridden[name])
            elif name in vars(SYSCALLS):
                delattr(SYSCALLS, name)
        self._real.clear()
        self._overridden.clear()

    def _rel(self, path: str | os.PathLike[str]) -> str:
        return os.path.relpath(os.path.abspath(os.fspath(path)), self._root)

    def _open(self, path: str, flags: int, mode: int = 0o777) -> int:
        existed = not flags & os.O_CREAT or os.path.exists(path)
        fd = int(self._real["open"](path, flags, mode))
        self._journal.emit(OPEN, fd, self._rel(path), not existed, bool(flags & os.O_APPEND))
        return fd

    def _close(self, fd: int) -> None:
        self._real["close"](fd)
        self._journal.emit(CLOSE, fd)

    def _write(self, fd: int, data: bytes | memoryview) -> int:
        written = int(self._real["write"](fd, data))
        self._journal.emit(WRITE, fd, bytes(data[:written]))
        return written

    def _fdatasync(self, fd: int) -> None:
        self._real["fdatasync"](fd)
        self._journal.emit(SYNC, fd)

    def _write_sync(self, fd: int, data: bytes) -> None:
        """A batch's write and its fdatasync in one call (wal/_sync.c): both events, once it
        has returned (a cut between them is a state the journal still gives)."""
        self._real["write_sync"](fd, data)
        if not self._light:
            self._journal.emit(WRITE, fd, bytes(data))
        self._journal.emit(SYNC, fd)

    def _fsync(self, fd: int) -> None:
        self._real["fsync"](fd)
        self._journal.emit(SYNC, fd)

    def _ftruncate(self, fd: int, length: int) -> None:
        self._real["ftruncate"](fd, length)
        self._journal.emit(TRUNCATE, fd, length)

    def _rename(self, src: str, dst: str) -> None:
        self._real["rename"](src, dst)
        self._journal.emit(RENAME, self._rel(src), self._rel(dst))

    def _unlink(self, path: str) -> None:
        self._real["unlink"](path)
        self._journal.emit(UNLINK, self._rel(path))

    def _fsync_dir(self, path: str) -> None:
        self._real["fsync_dir"](path)
        self._journal.emit(DIR_SYNC, self._rel(path))
