"""`DirectoryLock`: one owner per cache directory (docs/design.md, guarantee 6).

An exclusive, non-blocking `flock` on `DIR/LOCK`. flock locks belong to the open file
description, so a second open in the SAME process conflicts too (fcntl record locks would not),
and the kernel drops the lock when the owner dies, even by SIGKILL. Read-only tools take the
lock SHARED: several may read at once, and no cache can open (and change the directory) while
they do.

The LOCK file is opened relative to the checked directory (`wbcache.layout.opened_root`: owned
by you, writable by no one else), with O_NOFOLLOW, and must be a regular file of ours with one
link: a planted symlink, FIFO, device or hard link is refused (`InvalidDirectoryError`), so the
pid we write into it can never land in another file.

A held lock is tracked by wbcache/forking.py: a child forked while it is held closes its copy
at once, so the lock stays its holder's alone and dies with it (a lane nobody can adopt while
some child of its dead owner lives would strand that owner's acknowledged writes). The
descriptors are also kept here, strongly (`_held`), and it is here that a child closes them:
a lock dropped unreleased (a cache never closed, then collected) still holds its flock in
the parent, and forking.py, which tracks objects weakly, no longer knows of it.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from wbcache import forking
from wbcache.errors import CacheLockedError, InvalidDirectoryError
from wbcache.layout import opened_root
from wbcache.wal.owned import open_private_file


class DirectoryLock:
    """A held flock on a cache directory's LOCK file; `release()` drops it."""

    def __init__(self, fd: int, path: str) -> None:
        self._fd: int | None = fd
        self._pid = os.getpid()  # the holder: only it may unlock (`release`)
        self.path = path
        self._recorded = False  # our pid is in the file: blanked as the lock is let go

    @classmethod
    def acquire(cls, path: str, *, record_owner: bool = True,
                writable: bool = True) -> DirectoryLock:
        """Lock `path` (the LOCK file, created if missing) exclusively, or raise
        `CacheLockedError` at once. With `record_owner`, write our pid into it (for humans and
        `wbcache inspect`; the lock itself is the flock); otherwise call `record_owner()` once
        the holder starts changing the directory. `writable=False` opens the existing file
        read-only (a dry run needs no write permission) and can never record an owner.
        Raises `InvalidDirectoryError` for a hostile directory or LOCK (module docstring)."""
        lock = cls._take(path, fcntl.LOCK_EX, writable=writable)
        if lock is None:
            pid = owner_pid(path)
            if pid == os.getpid():
                raise CacheLockedError(
                    f"{os.path.dirname(path)} is already open in this process (pid {pid}): "
                    f"close that cache first (`with wbcache.open(...) as cache:` closes it)")
            owner = f" (pid {pid})" if pid is not None else ""
            raise CacheLockedError(f"{os.path.dirname(path)} is in use by another cache{owner}")
        if record_owner:
            try:
                lock.record_owner()
            except BaseException:  # EIO, ENOSPC: no flock may outlive a failed acquire
                lock.release()
                raise
        return lock

    @classmethod
    def acquire_shared(cls, path: str, *, create: bool = False) -> DirectoryLock | None:
        """A shared lock on the LOCK file at `path`, or None while an owner holds it
        exclusively. Opens the existing file read-only (a reader needs no write permission);
        `create` makes it if missing (the first open of a shared directory, which must
        exclude a single-owner first open of the same directory: wbcache/directory.py)."""
        return cls._take(path, fcntl.LOCK_SH, writable=create)

    @classmethod
    def _take(cls, path: str, operation: int, *, writable: bool) -> DirectoryLock | None:
        """The LOCK file at `path` opened and flocked (`operation`, without blocking), or None
        if another holder's lock conflicts. Tracked for fork() as it is opened: a child
        forked between the open and the tracking would keep a copy of the descriptor, and
        with it the flock taken on it, the parent's or not (module docstring).

        The file locked must still be the one at `path`: a first open refused by its
        database removes the LOCK it made, and the directory (wbcache/layout.py, `unclaim`);
        an open that had opened that LOCK before and flocks it after would hold a lock on a
        file nobody else can find, while another open makes the directory anew. Such a lock
        is let go and the file at `path` taken instead (or its absence reported)."""
        for _ in range(_LOCK_FILE_TRIES):
            with forking.no_fork():
                fd = _open_lock_file(path, writable=writable)
                lock = None
                try:
                    fcntl.flock(fd, operation | fcntl.LOCK_NB)
                    if _still_at(fd, path):
                        lock = cls(fd, path)
                        _held.add(fd)
                        forking.track(lock)
                        _listed(lock)
                        return lock
                except BlockingIOError:
                    os.close(fd)
                    return None
                except BaseException:  # no flock may outlive a failed take
                    if lock is None:
                        os.close(fd)
                    else:
                        lock.release()
                    raise
                os.close(fd)
        raise CacheLockedError(f"{os.path.dirname(path)} is being made and removed again by "
                               f"other opens; try again")

    def record_owner(self) -> None:
        """Write this process's pid into the (exclusively held) LOCK file, as one fixed-width
        line: it covers whatever an earlier owner wrote, so no truncate is needed (one syscall
        fewer, and LazyFS's truncate of a file it has just created can fail with ENOENT)."""
        assert self._fd is not None
        os.pwrite(self._fd, f"{os.getpid():<{_PID_WIDTH}}\n".encode(), 0)
        self._recorded = True

    def release(self) -> None:
        # Closed and untracked as one step: a child forked in between would keep an untracked
        # copy (the lock outliving us), or close a number since reused for another file.
        with forking.no_fork():
            if self._fd is not None:
                holder = os.getpid() == self._pid  # not a child forked in C (no hooks ran)
                if self._recorded and holder:  # the next holder writes its pid only once opened:
                    try:  # meanwhile "in use" must not name us (alive, or our pid reused)
                        os.pwrite(self._fd, b" " * _PID_WIDTH + b"\n", 0)
                    except OSError:
                        pass
                    self._recorded = False  # once: run again, it would blank the next holder's
                # Unlocked, not only closed: a child forked before the release drops its
                # copy of the descriptor only once it runs its after-fork hooks (or never,
                # forked in C), and the flock lives as long as any copy does. The child
                # never unlocks (`_disown_after_fork`); the holder letting go does.
                if holder:  # a child's unlock would be the parent's
                    try:
                        fcntl.flock(self._fd, fcntl.LOCK_UN)
                    except OSError:
                        pass
                self._close()
                forking.untrack(self)

    def _disown_after_fork(self) -> None:
        """In a child just forked (wbcache/forking.py): forget the copy inherited, which
        `_close_held_in_child` closes with every other. Closing drops the flock only with the
        last descriptor of the open file description, which the parent still holds: the lock
        stays the parent's. Never LOCK_UN: it would unlock the parent's too."""
        self._fd = None

    def _close(self) -> None:
        assert self._fd is not None
        fd, self._fd = self._fd, None  # first: a release run again never reaches a number
        _held.discard(fd)  # that may since be another file's
        os.close(fd)


@contextmanager
def taking() -> Iterator[None]:
    """Every lock this thread takes inside the block is let go if the block raises. A lock is
    handed up through calls, and an interrupt (a KeyboardInterrupt, a signal handler's
    exception) as one of them returns it, before a caller has bound it, would leave the
    flock held for the rest of the process, the directory (or a shared directory's lane,
    with the writes in its log) refused to every later open in it. The caller binds what it
    keeps inside the block, in its own `try`, and releases it there."""
    scopes = _taking.__dict__.setdefault("scopes", [])
    taken: list[DirectoryLock] = []
    scopes.append(taken)
    try:
        yield
    except BaseException:
        for lock in taken:
            lock.release()  # a lock its taker released already: a no-op
        raise
    finally:
        for at in range(len(scopes) - 1, -1, -1):  # by identity: empty scopes are all equal
            if scopes[at] is taken:
                del scopes[at]
                break


def _listed(lock: DirectoryLock) -> None:
    """`lock` just taken, in the innermost `taking()` block of this thread, if any."""
    scopes = getattr(_taking, "scopes", None)
    if scopes:
        scopes[-1].append(lock)


_taking = threading.local()
_LOCK_FILE_TRIES = 10  # LOCK files found removed under us (`_take`) before giving up
_PID_WIDTH = 20  # wider than any pid Linux hands out (pid_max is at most 2**22)
_PID_MAX = 2**22  # Linux's largest pid_max

# Every lock descriptor this process holds (module docstring); changed inside `no_fork()`.
_held: set[int] = set()


def _close_held_in_child() -> None:
    """In a child just forked: close the copy of every lock descriptor the parent held."""
    for fd in _held:
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


def _open_lock_file(path: str, *, writable: bool) -> int:
    """The LOCK file at `path`, opened in its checked directory (module docstring); created
    (O_EXCL) when missing and `writable`."""
    directory, name = os.path.split(path)
    with opened_root(directory) as dir_fd:
        if writable:
            try:
                return open_private_file(name, os.O_RDWR | os.O_CREAT, dir_fd=dir_fd, shown=path)
            except FileExistsError:  # the usual case: it stays from the first open
                return open_private_file(name, os.O_RDWR, dir_fd=dir_fd, shown=path)
        return open_private_file(name, os.O_RDONLY, dir_fd=dir_fd, shown=path)


def _still_at(fd: int, path: str) -> bool:
    """Whether the file open at `fd` is the one at `path` (neither removed nor replaced)."""
    try:
        at_path = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (at_path.st_dev, at_path.st_ino)


def owner_pid(path: str) -> int | None:
    """The pid recorded in the LOCK file at `path` if that process is alive, else None."""
    try:
        fd = _open_lock_file(path, writable=False)
    except (OSError, InvalidDirectoryError):
        return None
    try:
        text = os.read(fd, 32).decode().strip()
    except (OSError, UnicodeDecodeError):
        return None
    finally:
        os.close(fd)
    # isascii: str.isdigit takes '²' (int() refuses it); a pid past what kill takes is none
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) <= _PID_MAX:
        return None
    pid = int(text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # alive, owned by another user
        pass
    return pid
