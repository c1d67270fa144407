"""Opening a cache directory and what it holds without going through a path another user
controls: no planted link is followed, no FIFO or device is opened, no directory someone else
can write into is used.

The rule (as ssh applies to ~/.ssh): every directory wbcache uses (the cache directory, its
`wal/`, `db/` and `quarantine/`) is owned by the effective user and writable by no one else.
Then no other user can create, replace or rename an entry in it, so an entry checked stays the
entry used. Files are opened relative to the descriptor of their checked directory (`dir_fd`),
with O_NOFOLLOW, and their type checked on the opened descriptor; creations use O_EXCL.

The PARENTS of a cache directory (and of the directory a linked wal/ or db/ points at) are
checked much as ssh checks theirs (`check_parents`): each owned by the user or root, and not
writable by everyone unless sticky (a sticky /tmp stays usable: there nobody can rename
another's entry; group-writable is let be, as Debian's ssh does for private groups).
Otherwise another user could rename the directory away and put one of their own at its path
while the cache runs, and code that goes by path (the log writer, LMDB) would create and
delete files in it. Links on the way must be the user's or root's too.

Every refusal is an `InvalidDirectoryError` naming the path, what is wrong and how to fix it.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from typing import Any, TypeVar

from wbcache.errors import InvalidDirectoryError

_T = TypeVar("_T")

_KINDS = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"),
          (stat.S_ISREG, "a regular file"))


def describe(mode: int) -> str:
    """What kind of file `mode` (an st_mode) is, for a message: "a symbolic link", ..."""
    return next((name for test, name in _KINDS if test(mode)), "a special file")


def check_parents(path: str) -> None:
    """Raise `InvalidDirectoryError` if another user could rename `path` away and put their
    own in its place: a directory on the way to it (as typed, and as its links resolve, each
    link's target walked as the kernel walks it) owned by another user (root aside), or
    writable by everyone and not sticky; or a link on the way owned by another user. Group-
    writable is let be (a private group and umask 002, Debian's default, as its ssh lets be);
    the cache directory itself is stricter (module docstring). What is missing is not looked
    at (the open makes it, in places checked here; `wbcache/layout.py` checks again once it
    has: another user may make a missing name first)."""
    me = os.geteuid()
    absolute = os.path.abspath(path)
    checked = set()
    for place, entry, info in _lookups(absolute):
        if place not in checked:
            checked.add(place)
            _check_place(place, absolute, me)
        if info is not None and stat.S_ISLNK(info.st_mode) and info.st_uid not in (me, 0):
            raise InvalidDirectoryError(
                f"{entry}, on the way to {absolute}, is a symbolic link owned by uid "
                f"{info.st_uid}, not by you: its owner could point it elsewhere. Use a path "
                f"without another user's link")


_MAX_LINKS = 40  # as Linux's path walk (ELOOP)


def _lookups(absolute: str) -> list[tuple[str, str, os.stat_result | None]]:
    """Every lookup the kernel makes to resolve `absolute`, in order: (the directory looked
    in, the entry's path, its lstat or None when missing or unreadable: the walk ends there).
    Links are followed as the kernel follows them, so the entries of a link's target are
    looked up too (a link of one's own may lead through another user's). The directories
    are physical paths: every one above the last was looked in before it."""
    found: list[tuple[str, str, os.stat_result | None]] = []
    pending = absolute.split(os.sep)[1:]
    pending.reverse()  # a stack: the next name last
    current, links = os.sep, 0
    while pending:
        part = pending.pop()
        if part in ("", "."):
            continue
        if part == "..":
            current = os.path.dirname(current)
            continue
        entry = os.path.join(current, part)
        try:
            info = os.lstat(entry)
        except OSError:  # missing (made by the open) or unreadable (the open says so)
            found.append((current, entry, None))
            break
        found.append((current, entry, info))
        if stat.S_ISLNK(info.st_mode):
            links += 1
            if links > _MAX_LINKS:
                raise InvalidDirectoryError(f"{absolute}: too many levels of symbolic links")
            try:
                target = os.readlink(entry)
            except OSError:  # replaced meanwhile: by its owner, checked above
                break
            if target.startswith(os.sep):
                current = os.sep
            pending.extend(reversed(target.split(os.sep)))
        elif stat.S_ISDIR(info.st_mode):
            current = entry
        else:  # a file where a directory would be looked in: the open says so (ENOTDIR)
            break
    return found


def _check_place(place: str, absolute: str, me: int) -> None:
    try:
        info = os.stat(place)
    except OSError:
        return  # missing: made by the open, in a checked place; unreadable: the open says so
    mode = stat.S_IMODE(info.st_mode)
    if info.st_uid not in (me, 0):
        raise InvalidDirectoryError(
            f"{place}, on the way to {absolute}, is owned by uid {info.st_uid}, not by you "
            f"or root: its owner could rename the cache directory away and put one of their "
            f"own in its place. Use a directory under parents of your own (or root's)")
    if mode & 0o002 and not mode & stat.S_ISVTX:
        raise InvalidDirectoryError(
            f"{place}, on the way to {absolute}, may be written by everyone (mode {mode:04o}) "
            f"and is not sticky: anyone could rename the cache directory away and put one of "
            f"their own in its place. chmod o-w {place} (or +t, as /tmp is)")


def check_private_dir(info: os.stat_result, shown: str) -> None:
    """Raise `InvalidDirectoryError` unless `info` is a directory owned by the effective user
    that neither its group nor others may write into."""
    if not stat.S_ISDIR(info.st_mode):
        raise InvalidDirectoryError(f"{shown} is {describe(info.st_mode)}, not a directory")
    me = os.geteuid()
    if info.st_uid != me:
        raise InvalidDirectoryError(
            f"{shown} is owned by uid {info.st_uid}, not you (uid {me}): another user could "
            f"have planted files in it. Use a directory of your own, or run as its owner")
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o022 and mode & stat.S_ISVTX:  # /tmp, /dev/shm: shared by design, keep it so
        raise InvalidDirectoryError(
            f"{shown} is shared: others may create files in it (mode {mode:04o}), so it "
            f"cannot hold a cache; name a new directory inside it (wbcache creates it, mode "
            f"0700), or, if it is a cache directory, chmod 0700 {shown}")
    if mode & 0o022:
        raise InvalidDirectoryError(
            f"{shown} is group- or world-writable (mode {mode:04o}), so others could plant "
            f"files in it: chmod go-w {shown}")


def open_private_dir(name: str, *, dir_fd: int | None = None, shown: str | None = None,
                     follow: bool = False) -> int:
    """A descriptor of the directory `name` (relative to `dir_fd` when given), checked by
    `check_private_dir`. A symbolic link is refused unless `follow`, and then its target is
    checked. `shown` is the full path for messages. FileNotFoundError if it does not exist."""
    shown = shown or name
    if follow:  # a link is followed only if it is ours (or root's): not one planted for us
        link = _call(os.stat, name, shown, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISLNK(link.st_mode) and link.st_uid not in (os.geteuid(), 0):
            raise InvalidDirectoryError(
                f"{shown} is a symbolic link owned by uid {link.st_uid}, not by you: wbcache "
                f"does not follow another user's link")
    # stat first: a directory we may not read still gets the message about its owner
    try:
        info = _call(os.stat, name, shown, dir_fd=dir_fd, follow_symlinks=follow)
    except FileNotFoundError:
        if follow and stat.S_ISLNK(link.st_mode):  # not missing: the link is there
            raise InvalidDirectoryError(
                f"{shown} is a symbolic link to {os.readlink(name, dir_fd=dir_fd)}, which does "
                f"not exist: if that is a disk not mounted, mount it (what the cache wrote is "
                f"there); make that directory (0700) only for a new cache") from None
        raise
    if stat.S_ISLNK(info.st_mode):
        raise InvalidDirectoryError(
            f"{shown} is a symbolic link; wbcache does not follow links here: replace it "
            f"with a directory")
    check_private_dir(info, shown)
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    fd = _call(os.open, name, shown, flags, dir_fd=dir_fd)
    try:
        opened = os.fstat(fd)
        check_private_dir(opened, shown)  # what we hold, not what the name pointed at before
        if (opened.st_dev, opened.st_ino) != (info.st_dev, info.st_ino):
            raise InvalidDirectoryError(f"{shown} was replaced while it was opened; try again")
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_private_file(name: str, flags: int, *, dir_fd: int, shown: str,
                      mode: int = 0o600) -> int:
    """Open the regular file `name` in the checked directory `dir_fd`, owned by the effective
    user. With O_CREAT it is created (O_EXCL: never an existing entry; FileExistsError if
    there is one). Never follows a link, never opens a FIFO or a device (one that exists is
    refused from its lstat, before any open can block or have an effect), and a file opened
    for writing must have no other hard link, so no other name shares what we write."""
    if flags & os.O_CREAT:
        flags |= os.O_EXCL
    else:
        check_regular(_call(os.stat, name, shown, dir_fd=dir_fd, follow_symlinks=False), shown,
                      writing=flags & os.O_ACCMODE != os.O_RDONLY)
    flags |= os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    fd = _call(os.open, name, shown, flags, mode, dir_fd=dir_fd)
    try:
        check_regular(os.fstat(fd), shown, writing=flags & os.O_ACCMODE != os.O_RDONLY)
        os.set_blocking(fd, True)  # O_NONBLOCK was only for the open
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_regular(info: os.stat_result, shown: str, *, writing: bool = False) -> None:
    """Raise `InvalidDirectoryError` unless `info` is a regular file the effective user owns
    (and, `writing`, with no other hard link)."""
    if not stat.S_ISREG(info.st_mode):
        raise InvalidDirectoryError(
            f"{shown} is {describe(info.st_mode)}, not a regular file; wbcache never follows a "
            f"link or opens a FIFO or device in its directory: remove it")
    me = os.geteuid()
    if info.st_uid != me:
        raise InvalidDirectoryError(
            f"{shown} is owned by uid {info.st_uid}, not you (uid {me}): remove it")
    if writing and info.st_nlink != 1:
        raise InvalidDirectoryError(
            f"{shown} has {info.st_nlink} hard links; writing it would change the same file "
            f"under another name: remove it")


def _call(function: Callable[..., _T], name: str, shown: str, *args: Any, **kwargs: Any) -> _T:
    """`function(name, *args, **kwargs)`, its OSError naming `shown` (the full path) rather than
    `name` (relative to a directory descriptor)."""
    try:
        return function(name, *args, **kwargs)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a link put there since it was checked
            raise InvalidDirectoryError(
                f"{shown} is a symbolic link wbcache will not follow (one put there after it "
                f"was checked, or a loop of links): remove it") from None
        if exc.errno == errno.ENOTDIR and kwargs.get("dir_fd") is not None:
            raise InvalidDirectoryError(f"{shown} is not a directory") from None
        if exc.filename is not None and exc.filename != shown:
            raise type(exc)(exc.errno, exc.strerror, shown) from None
        raise
