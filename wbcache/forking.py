"""`fork()` and open caches: a child process never touches what it inherited.

A cache belongs to the process that opened it. After `os.fork()` (gunicorn's `preload_app`,
`multiprocessing` with the fork start method, Celery's prefork pool) the child holds a copy of
the parent's `Cache`: its memory map, its LSN counter, its open log segment. Writing through
that copy would log records under LSNs the parent also uses, corrupting the directory, and a
lock or a database connection the parent holds may be mid-use at the moment of the fork.

So in the child, right after the fork (`os.register_at_fork`), every open `Cache`, `AsyncCache`
and backend, and every held lock (`wbcache.lock.DirectoryLock`), is *disowned*: the file
descriptors it inherited for the log segment and the directory lock are closed (closing a copy
changes nothing for the parent: its descriptors, its flock and its file offsets are its own),
and a cache's or backend's class becomes a refusing twin whose every use raises
`ForkedCacheError`, before any lock is taken (a lock held by a parent's thread at the fork
stays held forever in the child). `close()` in the child is allowed and does nothing: it
neither flushes nor deletes. The disowned objects are kept alive for the child's
lifetime, so that no finalizer ever runs on what they share with the parent (a PostgreSQL
connection whose socket the parent still uses).

Every flock this process holds is disowned so, not only an open cache's: a lane `wbcache.open`
has claimed or is adopting before the `Cache` exists, an orphan lane the flusher is replaying,
a tool's lock. A lock's descriptor is opened, locked and tracked as one step no fork can fall
between (`no_fork()`), and closed and untracked likewise. The flock belongs to the open file
description parent and child share: the child closes its copy (never LOCK_UN, which would
unlock the parent), so the lock stays the parent's and dies with it, as a dead process's lock
must, or no one could adopt its lane while the child lived.

An object may also prepare for a fork in the parent (`_before_fork`, undone by
`_after_fork_in_parent`): the LMDB backend waits there until no transaction of this process is
open, so that the child can close its copy of the environment without touching the parent's
reader slots or write lock, and open the database again itself (LMDB refuses a second open of
one environment in a process).
"""

from __future__ import annotations

import os
import sys
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from wbcache.errors import ForkedCacheError

# Keyed by id(): a cache is a mapping, compared by content and so not hashable.
_open: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
_forking: list[Any] = []  # the owners prepared for the fork in progress
_inherited: list[Any] = []  # disowned in this (child) process; never finalized here


def track(owner: Any) -> None:
    """Disown `owner` in any child forked while it is open: it has `_disown_after_fork()`
    and may have `_before_fork()` and `_after_fork_in_parent()`."""
    _open[id(owner)] = owner


def untrack(owner: Any) -> None:
    if _open.get(id(owner)) is owner:
        del _open[id(owner)]


# One fork at a time: the owners' preparations (and _forking) belong to the fork in progress,
# and two threads forking at once would undo each other's. Taken before, released after.
_fork_in_progress = threading.Lock()
# Held by the fork from the end of the preparations until just after it, and by `no_fork()`.
# Not _fork_in_progress: the preparations may wait (LMDB, for this process's transactions),
# and a lock taken meanwhile must not wait for them. Reentrant: a signal handler may fork, and
# it runs in the main thread between two bytecodes, possibly inside a `no_fork()` block of
# that same thread, which it cannot wait for. That fork goes ahead mid-step; a descriptor the
# step had opened but not yet tracked stays open in the child until it exits or execs (every
# lock descriptor is close-on-exec). A child forked in a handler should exit or exec there:
# returning from the handler, it would go on with the call the parent was in.
_no_fork = threading.RLock()


@contextmanager
def no_fork() -> Iterator[None]:
    """No fork of this process happens inside the block: for opening a descriptor that must
    be tracked and tracking it (or closing and untracking it) as one step. Keep the block
    to a few system calls: a fork waits for it."""
    with _no_fork:
        yield


def _before_fork() -> None:
    _fork_in_progress.acquire()
    _forking[:] = list(_open.values())
    for owner in _forking:
        prepare = getattr(owner, "_before_fork", None)
        if prepare is not None:
            _each(prepare)
    _no_fork.acquire()  # last: from here, nothing is tracked or untracked until the fork


def _after_fork_in_parent() -> None:
    _no_fork.release()
    owners, _forking[:] = list(_forking), []
    try:
        for owner in owners:
            resume = getattr(owner, "_after_fork_in_parent", None)
            if resume is not None:
                _each(resume)
    finally:
        _fork_in_progress.release()


def _after_fork_in_child() -> None:
    _no_fork.release()  # first: disowning releases locks, which takes it
    # Those prepared, and those tracked since (a lock taken during the preparations).
    owners, _forking[:] = list(_forking), []
    prepared = {id(owner) for owner in owners}
    owners += [owner for owner in _open.values() if id(owner) not in prepared]
    _open.clear()
    try:
        for owner in owners:
            _each(owner._disown_after_fork)
            _inherited.append(owner)
    finally:
        _fork_in_progress.release()  # held by this thread, the only one the child has


def _each(call: Any) -> None:
    """One owner's fork hook: its failure must not skip the other owners' (a child whose
    cache was never disowned could write under its parent's LSNs). Reported as Python
    reports any exception of an at-fork hook, then the next owner goes on."""
    try:
        call()
    except Exception:
        sys.excepthook(*sys.exc_info())


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                    after_in_child=_after_fork_in_child)


def refusal(kind: str, path: str, parent_pid: int, reopenable: bool,
            shared: bool) -> ForkedCacheError:
    if reopenable:
        how = ("call its reopen() in this process (e.g. in gunicorn's post_fork hook): that "
               "opens a lane of this process's own")
    elif shared:  # an AsyncCache: it belongs to an event loop, so it is opened afresh
        how = ("open the shared directory again in this process (await "
               "wbcache.open_async(path, shared=True)): that opens a lane of its own")
    else:
        how = ("a single-owner directory serves one process: open it with shared=True for "
               "several processes, or open it again here once the parent has closed it")
    return ForkedCacheError(
        f"this {kind} of {path} was opened by process {parent_pid} and inherited by process "
        f"{os.getpid()} through fork(); it cannot be used as it is: {how}")


class Disowned:
    """The mixin of a disowned object's class in the child, placed AFTER its own class (a
    class assignment needs the same layout): every attribute lookup goes through
    `__getattribute__` here, which refuses everything but `close()` (a no-op), `closed`
    (True), `path`, `repr` and the exits of `with` blocks. Methods called by syntax (`len`,
    `in`, `[]`, `with`) are looked up on the type and so are the object's own; each touches
    the object's state at once, and that lookup is refused."""

    __slots__ = ()

    def __getattribute__(self, name: str) -> Any:
        own = _OWN.get(name)
        if own is not None:
            # the disowned class may define its own (AsyncCache's close is a coroutine)
            own = type(self).__dict__.get(name, own)
            return own.__get__(self, type(self))
        if name in _STATE:
            return object.__getattribute__(self, name)
        raise object.__getattribute__(self, "_refusal")()

    def _refusal(self) -> ForkedCacheError:
        return refusal(self._forked_kind, self._forked_path, self._forked_from,
                       self._forked_reopen is not None, self._forked_shared)

    def reopen(self) -> Any:
        """Open the directory again in this process, in place: the object becomes a working
        cache (a shared directory only; see `Cache.reopen`)."""
        opener = self._forked_reopen
        if opener is None:
            raise self._refusal()
        fresh = opener()
        state = object.__getattribute__(fresh, "__dict__")
        mine = object.__getattribute__(self, "__dict__")
        mine.clear()
        mine.update(state)
        object.__setattr__(self, "__class__", type(fresh))
        untrack(fresh)
        track(self)
        self._rebind()
        return self

    @property
    def path(self) -> str:
        return str(self._forked_path)

    @property
    def closed(self) -> bool:
        return True

    def close(self) -> None:
        """In a child: nothing to do. The parent's cache is the parent's to close."""

    def _disown_after_fork(self) -> None:
        pass

    def __repr__(self) -> str:
        return (f"<wbcache.{self._forked_kind} {self._forked_path!r} inherited through fork() "
                f"from process {self._forked_from}: unusable>")

    def __exit__(self, *exc_info: object) -> None:
        pass

    async def __aexit__(self, *exc_info: object) -> None:
        pass


_OWN = {name: Disowned.__dict__[name] for name in (
    "_refusal", "path", "closed", "close", "_disown_after_fork", "__repr__", "__exit__",
    "__aexit__", "reopen")}
_STATE = frozenset({"__class__", "__dict__", "_forked_from", "_forked_kind", "_forked_path",
                    "_forked_reopen", "_forked_shared"})


def disown(owner: Any, disowned_class: type, kind: str, path: str, parent_pid: int,
           reopen: Any = None, shared: bool | None = None) -> None:
    """Turn `owner` (in a child) into an instance of `disowned_class` (a subclass of its own
    class, then `Disowned`), remembering where it came from and, if it can be reopened in
    the child, how (`reopen`: a callable that opens a fresh object of the owner's class).
    `shared`: whether its directory is shared (default: whether it can be reopened)."""
    state = object.__getattribute__(owner, "__dict__")
    state.pop("get", None)  # an instance-level override (read_ttl) would shadow the refusal
    state.update(_forked_from=parent_pid, _forked_kind=kind, _forked_path=path,
                 _forked_reopen=reopen,
                 _forked_shared=reopen is not None if shared is None else shared)
    object.__setattr__(owner, "__class__", disowned_class)
