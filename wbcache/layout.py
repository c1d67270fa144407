"""The cache directory: `DIR/LOCK`, `DIR/wal/` (log segments), `DIR/db/` (LMDB), `DIR/cache_id`
(the directory's identity in a shared database), `DIR/backend` (which kind of database the
directory flushes into, so that it is never recovered into another) and, for PostgreSQL,
`DIR/checkpoint_token` (`TokenFile`: what tells the directory from a copy of it).

Opening is `claim` (check the path, create the root: nothing else, so two first opens racing
meet at the lock), then the lock, then `complete` (create the rest, under the lock).
Directories are created 0700, files 0600, and every creation is followed by an fsync of its
parent, so the layout itself survives power loss.

Hostile directories are refused before anything is created or written in them (the checks are
`wbcache.wal.owned`; each refusal is an `InvalidDirectoryError` saying what to fix):

* The directory, its `wal/` and its `db/` must be owned by the effective user and writable by
  no one else (as ssh requires of ~/.ssh): a directory another user created (say in a shared
  /tmp, waiting for the name we will use) is never used, or its planted links would decide
  where we write. Then nobody else can create, replace or rename anything in it.
* The files are opened relative to the descriptor of the checked directory, with O_NOFOLLOW,
  and checked on the opened descriptor: a symlink, FIFO or device where `LOCK`, `cache_id`,
  `backend` or their `.tmp` should be is refused, never followed or opened; a new file is
  created with O_EXCL.
* `wal/` or `db/` may be a symbolic link (the log on another disk, as PostgreSQL allows for its
  WAL), but only to a directory that passes the same check: owned by you and writable by no one
  else. Such a link can only be yours (nobody else can write in the directory), and its target
  is as private as the directory. No other link inside the directory is ever followed.
* A linked `wal/` or `db/` belongs to one cache directory: `OWNER` in it names the directory
  that uses it (device, inode and path), written by the first open that finds it missing, and
  an open or `wbcache recover` of any other directory that links to it is refused
  (`check_linked_dirs`). A copy made with `cp -a` keeps the link; opening it would replay the
  original's unflushed writes into the copy's database and delete them from the one log both
  use. The same directory by another path (a bind mount), or moved within its file system,
  keeps its identity; one moved elsewhere or restored is told to remove `OWNER` first. A
  shared directory's `db/` is checked so too, by every open (each holding only its lane's
  lock: `OWNER` is written through a temporary file of the writer's own).
* A lane of a shared directory (wbcache/lanes.py): its `wal/` is never a link
  (`complete_lane` refuses one when a cache opens it; `checked_lane_entries` when a command
  such as `wbcache recover` does): a lane's log is replayed into the shared database and then
  deleted, so a link to another cache directory's log would cost that directory its writes.
* The files a library opens by path, which cannot take our descriptor (LMDB's `data.mdb` and
  `lock.mdb` in `db/`), get the same check just before it opens them
  (`check_library_files`): each is absent or a regular file of ours, never a link, FIFO or
  device; `db/` being private, nobody else can put one there between the check and the open.
* The PARENTS of the directory are not checked (a sticky, world-writable /tmp must stay usable
  as a parent); the path given, up to and including its last name, is the user's choice. If
  that last name is a symbolic link, the directory it names is the one checked and used.

About 600 lines: every file of the directory is read and written here, through the
same checked descriptor, so no file escapes the checks above.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from wbcache.errors import InvalidDirectoryError
from wbcache.wal.owned import (
    check_parents,
    check_regular,
    open_private_dir,
    open_private_file,
)
from wbcache.wal.syscalls import SYSCALLS

LOCK_NAME = "LOCK"
WAL_NAME = "wal"
DB_NAME = "db"
# LMDB's own files in db/ (data.mdb absent until the first open made the database): named
# here, not in backends/lmdb.py, so that commands can look at them without importing lmdb
DATA_FILE, LMDB_LOCK_FILE = "data.mdb", "lock.mdb"
CACHE_ID_NAME = "cache_id"
BACKEND_NAME = "backend"
CHECKPOINT_TOKEN_NAME = "checkpoint_token"  # `TokenFile`
QUARANTINE_NAME = "quarantine"  # made by `wbcache recover --salvage` (wbcache.maintenance)
SHARED_NAME = "SHARED"  # a shared directory (wbcache/lanes.py): lanes/ instead of LOCK and wal/
LANES_NAME = "lanes"
LANE_NAME = "LANE"  # in each lane (`complete_lane`): a lane moved or mounted elsewhere is known
EMBEDDED_KIND = "lmdb"  # DIR/backend's kind for the LMDB database in db/ (backends.EMBEDDED)
# What opening creates (wal/ and db/ stay empty until the cache writes). A crash part-way
# through the first open leaves some of these and nothing else: that directory is completed,
# not refused.
_LAYOUT_NAMES = frozenset({WAL_NAME, DB_NAME, LOCK_NAME, CACHE_ID_NAME, f"{CACHE_ID_NAME}.tmp",
                           BACKEND_NAME, f"{BACKEND_NAME}.tmp", CHECKPOINT_TOKEN_NAME,
                           f"{CHECKPOINT_TOKEN_NAME}.tmp", SHARED_NAME, LANES_NAME,
                           LANE_NAME, f"{LANE_NAME}.tmp"})
_FILE_NAMES = _LAYOUT_NAMES - {WAL_NAME, DB_NAME, LANES_NAME}
# In a wal/ or db/ that is a link: the real path of the cache directory that uses it
# (`check_linked_dirs`)
OWNER_NAME = "OWNER"
_PRIVATE_DIRS = (LANES_NAME,)  # must be a private directory, never a link
_LINKABLE_DIRS = (WAL_NAME, DB_NAME)  # may be a link to a private directory (module docstring)


@dataclass(frozen=True)
class Layout:
    root: str

    @property
    def lock(self) -> str:
        return os.path.join(self.root, LOCK_NAME)

    @property
    def wal(self) -> str:
        return os.path.join(self.root, WAL_NAME)

    @property
    def db(self) -> str:
        return os.path.join(self.root, DB_NAME)

    @property
    def cache_id_path(self) -> str:
        return os.path.join(self.root, CACHE_ID_NAME)

    @property
    def backend_path(self) -> str:
        return os.path.join(self.root, BACKEND_NAME)

    def cache_id(self) -> str:
        """The directory's identity, made once (at the first open) and never changed: 32
        hexadecimal digits. Anything else (an empty file, a path) is refused: it names this
        directory's checkpoint in a database, and two directories sharing one would replay
        into each other's."""
        with opened_root(self.root) as root_fd:
            text = _read_file(root_fd, self.root, CACHE_ID_NAME).strip()
        if len(text) != 32 or not all(c in "0123456789abcdef" for c in text):
            raise InvalidDirectoryError(
                f"{self.cache_id_path} is not a file wbcache wrote (it holds {text[:40]!r}, "
                f"not an identity of 32 hexadecimal digits): it names this directory's "
                f"checkpoint in its database, so wbcache will not guess it. Nothing was "
                f"changed; restore the file from a copy of this directory")
        return text

    def backend_kind(self) -> str | None:
        """The kind of database the directory flushes into ("lmdb", "postgresql"), or None
        if no open has recorded one yet."""
        return self.recorded_backend()[0]

    def recorded_backend(self) -> tuple[str | None, str | None]:
        """DIR/backend: the kind of database the directory flushes into (its first line) and,
        for a database many directories share, the table its data goes to, schema included
        (a line "table=public.wbcache"); None for what no open has recorded yet (a table:
        one recorded before tables were)."""
        try:
            with opened_root(self.root) as root_fd:
                text = _read_file(root_fd, self.root, BACKEND_NAME)
        except FileNotFoundError:
            return None, None
        kind, *rest = text.splitlines() or [""]
        tables = [line[len("table="):] for line in rest if line.startswith("table=")]
        return kind.strip() or None, tables[-1].strip() if tables else None

    def tokens(self) -> TokenFile:
        return TokenFile(self.root)


@dataclass(frozen=True)
class TokenFile:
    """DIR/checkpoint_token: the directory's side of the checkpoint tokens of a database
    shared by many directories (`CheckpointTokens` in wbcache/backends/base.py). Two lines:
    "known TOKEN" and "pending TOKEN DEV INO PATH" (each TOKEN "-" if none; PATH in hex),
    the directory's own (st_dev, st_ino) and path when it was saved. A pending token may
    have been written to the database after the directory was copied (a flush sent, then
    the copy made), so it is the saving directory's alone: a copy has another inode. As for
    OWNER (`check_linked_dirs`), a device renumbered (a remount) keeps the identity of the
    same inode at the path recorded."""

    root: str

    def read(self) -> tuple[str | None, str | None]:
        shown = os.path.join(self.root, CHECKPOINT_TOKEN_NAME)
        with opened_root(self.root) as root_fd:
            try:
                text = _read_file(root_fd, self.root, CHECKPOINT_TOKEN_NAME)
            except FileNotFoundError:
                return None, None
            here = os.fstat(root_fd)
        fields = [line.split() for line in text.splitlines()]
        if (len(fields) != 2 or fields[0][:1] != ["known"] or len(fields[0]) != 2
                or fields[1][:1] != ["pending"] or len(fields[1]) != 5
                or not all(f.isdigit() for f in fields[1][2:4])
                or not all(c in "0123456789abcdef" for c in fields[1][4])):
            raise InvalidDirectoryError(f"{shown} is not a file wbcache wrote (see "
                                        f"docs/postgres.md, \"A copied directory\")")
        known = None if fields[0][1] == "-" else fields[0][1]
        token, dev, ino = fields[1][1], int(fields[1][2]), int(fields[1][3])
        same = ino == here.st_ino and (dev == here.st_dev or fields[1][4] == _hex_path(self.root))
        return known, token if token != "-" and same else None

    def save(self, known: str | None, pending: str | None) -> None:
        with opened_root(self.root) as root_fd:
            here = os.fstat(root_fd)
            text = (f"known {known or '-'}\n"
                    f"pending {pending or '-'} {here.st_dev} {here.st_ino} "
                    f"{_hex_path(self.root)}\n")
            _write_durably(root_fd, self.root, CHECKPOINT_TOKEN_NAME, text.encode("ascii"))


@contextmanager
def opened_root(root: str) -> Iterator[int]:
    """A descriptor of the cache directory `root`, checked (owned by you, writable by no one
    else); a link at `root` itself is followed if it is yours (or root's), its target
    checked (module docstring)."""
    root_fd = open_private_dir(root, follow=True)
    try:
        yield root_fd
    finally:
        os.close(root_fd)


def checked_entries(layout: Layout, *, private_dirs: Collection[str] = ()) -> frozenset[str]:
    """The names in the directory, once it and every layout entry it holds passed the checks
    of the module docstring; `private_dirs` names more directories that must be private (and
    not links). Raises `InvalidDirectoryError`, or `PermissionError` naming the directory."""
    with opened_root(layout.root) as root_fd:
        names = frozenset(os.listdir(root_fd))
        _check_entries(root_fd, layout.root, names, private_dirs)
        return names


def checked_lane_entries(lane: Layout) -> frozenset[str]:
    """`checked_entries` for a lane of a shared directory, with the rule `complete_lane`
    applies when a cache opens it: its wal/ (and quarantine/) must be a private directory,
    never a link. A lane's wal/ linked to another cache directory's log would otherwise be
    replayed into the shared database and deleted by whoever recovers the lane."""
    return checked_entries(lane, private_dirs=(WAL_NAME, QUARANTINE_NAME))


def check_library_files(directory: str, writing: Mapping[str, bool]) -> None:
    """Just before a library that opens files by path (LMDB) opens the files named in
    `writing` (name -> whether it will write that file) in `directory`: each must be absent
    or a regular file of ours (and, if written, with no other hard link), checked with
    lstat, as LOCK, cache_id and backend are (module docstring). A FIFO would block the open
    forever, and a link would read or overwrite a file outside the directory. `directory`
    itself must be private (a link to one is followed, as `db/` may be one), so what is
    checked stays what the library opens. A missing `directory` is left to the library."""
    try:
        dir_fd = open_private_dir(directory, follow=True)
    except FileNotFoundError:
        return  # nothing can be planted in it; the library reports it as it always has
    try:
        for name, written in writing.items():
            try:
                info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # the library creates it, in a directory only we can write in
            check_regular(info, os.path.join(directory, name), writing=written)
    finally:
        os.close(dir_fd)


def claim(path: str | os.PathLike[str]) -> Layout:
    """The layout at `path`, its root created if missing (and nothing else yet). An existing
    path must be a wbcache directory, an empty directory or what an interrupted first open
    left, and pass the checks of the module docstring; anything else raises
    `InvalidDirectoryError` and is left untouched."""
    layout = Layout(os.path.abspath(os.fspath(path)))
    root = layout.root
    try:
        root_fd = open_private_dir(root, follow=True)
    except FileNotFoundError:
        check_parents(root)  # before anything is made there
        _make_dir(root)
        root_fd = open_private_dir(root, follow=True)
    except NotADirectoryError:
        raise InvalidDirectoryError(f"{root} cannot be a directory: a parent is a file") from None
    try:  # the directory's own refusal first: it says more. Again once made: a missing parent
        check_parents(root)  # may be made by another user first (an attacker's hunt won that
    except BaseException:  # race in 3 to 21 tries, and the cache was made in their directory)
        os.close(root_fd)
        raise
    try:
        names = frozenset(os.listdir(root_fd))
        _check_entries(root_fd, root, names, ())
        if (names and not _is_cache_dir(names) and not _interrupted_layout(root_fd, root, names)
                # a first shared open marking it meanwhile: lanes/ comes before SHARED, and
                # a lane in it only after SHARED (wbcache/lanes.py), so look once more
                and not _is_cache_dir(frozenset(os.listdir(root_fd)))):
            raise InvalidDirectoryError(
                f"{root} is not empty and not a wbcache directory; refusing to write into it")
    finally:
        os.close(root_fd)
    return layout


def unclaim(layout: Layout) -> None:
    """Lock held, by a first open refused before `complete` (a database it could not reach):
    remove the root `claim` made, if it holds nothing but LOCK, so that a refused open
    leaves no directory behind (its missing parents, made with it, are left). A failure
    here is ignored: the refusal is what the caller reports."""
    try:
        with opened_root(layout.root) as root_fd:
            if os.listdir(root_fd) != [LOCK_NAME]:
                return
            os.unlink(LOCK_NAME, dir_fd=root_fd)
        os.rmdir(layout.root)
        SYSCALLS.fsync_dir(os.path.dirname(layout.root))
    except OSError:
        pass


def complete(layout: Layout) -> None:
    """Lock held: create what the directory still lacks (wal/, db/, cache_id) and make the
    root's entries durable (the LOCK file the lock just created among them)."""
    with opened_root(layout.root) as root_fd:
        for name in (WAL_NAME, DB_NAME):
            try:
                os.mkdir(name, 0o700, dir_fd=root_fd)  # never follows a link
            except FileExistsError:
                pass
            os.close(open_private_dir(name, dir_fd=root_fd, follow=True,
                                      shown=os.path.join(layout.root, name)))
        check_linked_dirs(layout)
        try:
            info = os.stat(CACHE_ID_NAME, dir_fd=root_fd, follow_symlinks=False)
        except FileNotFoundError:
            _write_durably(root_fd, layout.root, CACHE_ID_NAME, f"{uuid.uuid4().hex}\n".encode())
        else:
            check_regular(info, layout.cache_id_path)
    SYSCALLS.fsync_dir(layout.root)


def check_linked_dirs(layout: Layout, *, write: bool = True, shared: bool = False) -> None:
    """Lock held, before the directory is written: each of wal/ and db/ that is a link must be
    this directory's alone (module docstring). `OWNER` there names the directory that uses it
    by its identity (device and inode) and its path. This directory is it if the identities
    match (whatever path reached it, or after a move within its file system: the path is then
    brought up to date); if none is recorded, it becomes it (unless `write` is False: a dry
    run). Raises `InvalidDirectoryError` when another directory is recorded: a copy made with
    `cp -a` (the directory recorded still links there), or one whose link the directory
    recorded had (moved to another file system, restored from a backup, or a copy whose
    original moved away): only the user can tell these apart.

    For a `shared` directory the lock held is a lane's, so other processes may check and write
    `OWNER` at the same time: each writes it through a temporary file of its own, and what
    they write names the same directory."""
    with opened_root(layout.root) as root_fd:
        me = os.fstat(root_fd)
        for name in _LINKABLE_DIRS:
            try:
                target = os.readlink(name, dir_fd=root_fd)
            except OSError:  # not a link (EINVAL), or missing: nobody else's
                continue
            shown = os.path.join(layout.root, name)
            sub_fd = open_private_dir(name, dir_fd=root_fd, follow=True, shown=shown)
            try:
                check_parents(shown)  # the log (or database) elsewhere: its parents too
                owner = os.path.join(target, OWNER_NAME)
                try:
                    text: str | None = _read_file(sub_fd, shown, OWNER_NAME)
                except FileNotFoundError:
                    text = None
                recorded = None if text is None else _parse_owner(text, owner)
                if recorded is None:
                    _refuse_anothers_own(shown, target, name, sub_fd, me)
                ours = f"{me.st_dev} {me.st_ino} {_hex_path(layout.root)}\n"
                if (recorded is not None and recorded[0] != (me.st_dev, me.st_ino)
                        # a device renumbered: the same inode, found at the path recorded
                        and not (recorded[0][1] == me.st_ino and _is_dir(recorded[1], me))):
                    other, what = recorded[1], "log" if name == WAL_NAME else "database"
                    if _links_to(other, name, os.fstat(sub_fd)):
                        raise InvalidDirectoryError(
                            f"{shown} links to {target}, the {what} of {other} (its {name} "
                            f"links there too): two cache directories cannot share one {what}, "
                            f"each would replay and delete the other's writes. A copy made "
                            f"with `cp -a` keeps the link: give this directory a {what} of its "
                            f"own (replace its {name} link by a copy of {target}, made while "
                            f"neither directory is open)")
                    raise InvalidDirectoryError(
                        f"{shown} links to {target}, which the cache directory {other} used "
                        f"(a different directory: {owner} says so). If it is a copy, give it a "
                        f"{what} of its own (replace its {name} link by a copy of {target}). "
                        f"Only if you are sure it is that directory, moved to another file "
                        f"system or restored from a backup, remove {owner} and open it again: "
                        f"a copy opened so replays and deletes the other's unflushed writes")
                if write and text != ours:  # none yet, or this directory by a new path
                    _write_durably(sub_fd, shown, OWNER_NAME, ours.encode(),
                                   temporary=f"{OWNER_NAME}.{uuid.uuid4().hex}.tmp"
                                   if shared else None)
            finally:
                os.close(sub_fd)


def _refuse_anothers_own(shown: str, target: str, name: str, sub_fd: int,
                         me: os.stat_result) -> None:
    """Refuse the linked `name` (open as `sub_fd`) that no OWNER claims if it is another cache
    directory's own wal/ or db/ (not a link there): that directory never looks for OWNER in
    its own, so this one would replay and delete its log, or flush over its database."""
    real = os.path.realpath(shown)
    parent = os.path.dirname(real)
    here = os.fstat(sub_fd)
    try:
        found = os.stat(real, follow_symlinks=False)
        there = os.stat(parent)
    except OSError:  # moved meanwhile: not the directory opened
        return
    if ((found.st_dev, found.st_ino) != (here.st_dev, here.st_ino)
            or (there.st_dev, there.st_ino) == (me.st_dev, me.st_ino)
            or os.path.basename(real) != name):
        return
    if any(os.path.lexists(os.path.join(parent, mark))
           for mark in (CACHE_ID_NAME, SHARED_NAME)):
        what = "log" if name == WAL_NAME else "database"
        raise InvalidDirectoryError(
            f"{shown} links to {target}, the {what} of the cache directory {parent} (its own "
            f"{name}): two cache directories cannot share one {what}, each would replay and "
            f"delete the other's writes. Nothing was changed. Give this directory a {what} of "
            f"its own (remove the link, or point it at a directory no cache uses)")


def _hex_path(path: str) -> str:
    return os.fsencode(path).hex()


def _parse_owner(text: str, shown: str) -> tuple[tuple[int, int], str]:
    """((device, inode), path) from an OWNER file's text (`check_linked_dirs`)."""
    try:
        device, inode, path = text.split()
        return (int(device), int(inode)), os.fsdecode(bytes.fromhex(path))
    except ValueError:
        raise InvalidDirectoryError(f"{shown} is not a file wbcache wrote: remove it") from None


def _is_dir(path: str, here: os.stat_result) -> bool:
    """Whether `path` is the directory `here` (a link followed)."""
    try:
        there = os.stat(path)
    except (OSError, ValueError):  # gone, or not a path at all
        return False
    return (there.st_dev, there.st_ino) == (here.st_dev, here.st_ino)


def _links_to(other_root: str, name: str, here: os.stat_result) -> bool:
    """Whether `other_root`/`name` is the directory `here` (a link followed)."""
    return _is_dir(os.path.join(other_root, name), here)


def complete_lane(layout: Layout) -> None:
    """Lane lock held: create what a lane of a shared directory still lacks (LANE, wal/,
    cache_id; its database is the shared directory's) and make the lane's entries durable.
    A lane's wal/ is never a link. LANE marks it a lane wherever it is reached from (a bind
    mount, a copy, a move): it holds what a single-owner directory holds, and opened as
    one, its log would be replayed into a database of its own (`lanes.refuse_lane`)."""
    with opened_root(layout.root) as root_fd:
        try:
            os.mkdir(WAL_NAME, 0o700, dir_fd=root_fd)
        except FileExistsError:
            pass
        os.close(open_private_dir(WAL_NAME, dir_fd=root_fd, shown=layout.wal))
        for name, text in ((LANE_NAME, "wbcache lane\n"),
                           (CACHE_ID_NAME, f"{uuid.uuid4().hex}\n")):
            try:
                info = os.stat(name, dir_fd=root_fd, follow_symlinks=False)
            except FileNotFoundError:
                _write_durably(root_fd, layout.root, name, text.encode())
            else:
                check_regular(info, os.path.join(layout.root, name))
    SYSCALLS.fsync_dir(layout.root)


def record_backend(layout: Layout, kind: str, table: str | None = None) -> None:
    """Lock held: write DIR/backend, durably and atomically (replacing what it held): the
    directory flushes into a `kind` database, into its `table` if given. What may be
    recorded over what was is wbcache/directory.py's to decide."""
    text = kind if table is None else f"{kind}\ntable={table}"
    with opened_root(layout.root) as root_fd:
        _write_durably(root_fd, layout.root, BACKEND_NAME, f"{text}\n".encode())


def check_backend(root: str, recorded: tuple[str, str | None], kind: str,
                  table: str | None) -> None:
    """Refuse a database of `kind` (its `table`, if known) for the directory at `root`, which
    has `recorded` (kind, table) in DIR/backend, unless they match: its log would be
    replayed into the wrong database, whose right one would never have those writes."""
    recorded_kind, recorded_table = recorded
    if recorded_kind != kind:
        how = ("its own LMDB database in db/: open it without backend="
               if recorded_kind == EMBEDDED_KIND else
               f"a {recorded_kind} database, not {kind}: open it with a backend of that "
               f"database (wbcache.open(path, backend=...))")
        raise InvalidDirectoryError(f"{root} flushes into {how}, or its log would be replayed "
                                    f"into the wrong database")
    if recorded_table is not None and table is not None and recorded_table != table:
        raise InvalidDirectoryError(
            f"{root} flushes into table {recorded_table} of its {kind} database, not "
            f"{table}: open it with table {recorded_table} (table={recorded_table} in a URL), "
            f"or its log would be replayed into the wrong table. To move it to {table}, run "
            f"wbcache recover with the URL of {recorded_table} (that empties its log), then "
            f"open it with {table}, its schema named")


def _check_entries(root_fd: int, root: str, names: frozenset[str],
                   private_dirs: Collection[str]) -> None:
    """Refuse a layout file that is not a regular file of ours, and a wal/, db/ (or one of
    `private_dirs`) that is not a private directory (wal/ and db/: or a link to one, unless
    named in `private_dirs`)."""
    for name in sorted(names & _FILE_NAMES):
        try:
            info = os.stat(name, dir_fd=root_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue  # gone since the listing (a racing first open renamed its .tmp): harmless
        check_regular(info, os.path.join(root, name))
    for name in sorted(names & {*_LINKABLE_DIRS, *_PRIVATE_DIRS, *private_dirs}):
        # one named in private_dirs is never a link, even wal/ or db/ (a lane's wal/)
        follow = name in _LINKABLE_DIRS and name not in private_dirs
        os.close(open_private_dir(name, dir_fd=root_fd, shown=os.path.join(root, name),
                                  follow=follow))


def _is_cache_dir(names: frozenset[str]) -> bool:
    """Whether a checked directory holding `names` is a cache directory, single-owner or shared
    (its entries' kinds were checked by _check_entries)."""
    return (WAL_NAME in names and LOCK_NAME in names) or SHARED_NAME in names


def _interrupted_layout(root_fd: int, root: str, names: frozenset[str]) -> bool:
    """Whether a checked directory holds only what an interrupted first open leaves (see
    _LAYOUT_NAMES), its wal/ and db/ empty."""
    if not names <= _LAYOUT_NAMES:
        return False
    for name in names & {WAL_NAME, DB_NAME, LANES_NAME}:
        sub_fd = open_private_dir(name, dir_fd=root_fd, follow=True,
                                  shown=os.path.join(root, name))
        try:
            if os.listdir(sub_fd):
                return False
        finally:
            os.close(sub_fd)
    return True


def _read_file(root_fd: int, root: str, name: str) -> str:
    """The text of the regular file `name` in the checked directory (never through a link,
    never a FIFO or device). FileNotFoundError if it is missing."""
    fd = open_private_file(name, os.O_RDONLY, dir_fd=root_fd, shown=os.path.join(root, name))
    with os.fdopen(fd, "rb") as file:
        data = file.read(4096)  # a few bytes are expected; a large file is not ours
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise InvalidDirectoryError(
            f"{os.path.join(root, name)} is not a file wbcache wrote (it is not ASCII text): "
            f"remove it") from None


def _write_durably(root_fd: int, root: str, name: str, data: bytes, *,
                   temporary: str | None = None) -> None:
    """Create (or replace) `name` in the checked directory holding `data`, atomically: a
    temporary file (created with O_EXCL, never through a link), fsync, rename, directory
    fsync. The temporary file is `name.tmp` unless named: one writer at a time may use that
    name (a lock held); writers that may run at once each name one of their own."""
    temporary = temporary or f"{name}.tmp"
    shown = os.path.join(root, temporary)
    flags = os.O_WRONLY | os.O_CREAT
    try:
        fd = open_private_file(temporary, flags, dir_fd=root_fd, shown=shown)
    except FileExistsError:
        # Left by a crash between its creation and its rename: replace it, if it is a regular
        # file of ours (anything else is refused, and unlink would never follow it anyway).
        check_regular(os.stat(temporary, dir_fd=root_fd, follow_symlinks=False), shown)
        os.unlink(temporary, dir_fd=root_fd)
        fd = open_private_file(temporary, flags, dir_fd=root_fd, shown=shown)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temporary, name, src_dir_fd=root_fd, dst_dir_fd=root_fd)
    except BaseException:  # a temporary file of its own would otherwise stay for good
        try:
            os.unlink(temporary, dir_fd=root_fd)
        except OSError:
            pass
        raise
    SYSCALLS.fsync_dir(root)


def _make_dir(path: str) -> None:
    """mkdir -p, 0700, fsyncing each parent; another process creating it first is fine. The
    parents are the user's choice: `claim` checks them before and after (module docstring)."""
    parent = os.path.dirname(path)
    if parent and not os.path.isdir(parent):
        _make_dir(parent)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not os.path.isdir(path):
            kind = "a symbolic link to nothing" if os.path.islink(path) else "not a directory"
            raise InvalidDirectoryError(f"{path} exists and is {kind}") from None
    SYSCALLS.fsync_dir(parent or ".")
