"""A planted file never makes wbcache write (or read) outside its directory.

An attacker who can create names where a cache directory lives, or inside it, plants symlinks,
FIFOs, devices or hard links where wbcache will open `LOCK`, `cache_id`, `backend` (and their
.tmp), segments or the quarantine, or pre-creates the whole directory in a shared /tmp. Each
case is refused with an `InvalidDirectoryError` that names the path, what is wrong and how to
fix it, and the file the plant points at keeps its bytes and its mtime.

The tests run as root; another user is uid 65534 (`nobody`), made with `os.chown`. One file
for every plant, so that the list of places wbcache opens is read in one place (its parents
included): about 650 lines for that reason.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from cli_support import (
    DRIVERS,
    NOBODY,
    assert_one_line_error,
    flip_byte,
    frame_offsets,
    kill_writer,
    new_cache_dir,
    run,
    run_all,
    three_segment_log,
)
from plant_support import (
    ALL_COMMANDS,
    READ_COMMANDS,
    argv,
    feed_fifos,
    state_of,
)

import wbcache
from wbcache import layout
from wbcache.errors import InvalidDirectoryError
from wbcache.maintenance import recover_directory
from wbcache.wal.format import encode_header
from wbcache.wal.owned import _lookups as lookups
from wbcache.wal.segments import create_segment, segment_name

ME = os.geteuid()
# ------------------------------------------------------------------ what a plant points at


@pytest.fixture(autouse=True)
def release_blocked_readers(tmp_path: Path) -> Iterator[None]:
    yield
    feed_fifos(tmp_path)


def secret_of(outside: Path) -> Path:
    return outside / "secret"


@contextmanager
def unchanged(*roots: Path) -> Iterator[None]:
    """Assert that nothing under `roots` changed (kind, mode, mtime, bytes, no new entry)."""
    before = [state_of(root) for root in roots]
    yield
    assert [state_of(root) for root in roots] == before


class Blocked(BaseException):
    """Raised by `deadline`; a BaseException, so that no `except OSError` (the CLI has one)
    turns it into an ordinary error message and carries on to the next blocking open."""


@contextmanager
def deadline(seconds: float = 30.0) -> Iterator[None]:
    """Fail instead of hanging when an open blocks (on a planted FIFO, opened for reading)."""
    def expired(signum: int, frame: Any) -> None:
        raise Blocked(f"still blocked after {seconds} s: a planted FIFO was opened")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def plant(path: Path, kind: str, outside: Path) -> None:
    """Put a `kind` entry at `path` in place of whatever is there."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    if kind == "symlink":
        path.symlink_to(secret_of(outside))
    elif kind == "dangling symlink":
        path.symlink_to(outside / "created-through-a-link")
    elif kind == "fifo":
        os.mkfifo(path, 0o600)
    elif kind == "device":  # /dev/null's numbers: opening it is harmless even if it happened
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))
    elif kind == "hard link":
        os.link(secret_of(outside), path)
    else:
        raise AssertionError(kind)


def refused(call: Callable[[], object], *fragments: str) -> str:
    """Run `call`, which must raise InvalidDirectoryError (without blocking) holding
    `fragments`; return the message."""
    with deadline(), pytest.raises(InvalidDirectoryError) as caught:
        call()
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def closed_cache(path: Path, **data: int) -> Path:
    with wbcache.open(path) as cache:
        for key, value in data.items():
            cache.put(key, value)
    return path


# ------------------------------------------------------------------ planted files in DIR


KIND_WORDS = {"symlink": "symbolic link", "dangling symlink": "symbolic link", "fifo": "FIFO",
              "device": "device", "hard link": "hard link"}


@pytest.mark.parametrize("kind", ["symlink", "dangling symlink", "fifo", "device", "hard link"])
def test_a_planted_lock_is_refused_and_its_target_is_untouched(tmp_path: Path, outside: Path,
                                                                kind: str) -> None:
    path = closed_cache(tmp_path / "cache", a=1)
    plant(path / "LOCK", kind, outside)

    with unchanged(outside):
        refused(lambda: wbcache.open(path), str(path / "LOCK"), KIND_WORDS[kind], "remove it")
    assert not (outside / "created-through-a-link").exists()


def test_a_planted_lock_in_a_new_directory_is_refused_before_anything_is_created(
        tmp_path: Path, outside: Path) -> None:
    path = tmp_path / "cache"
    path.mkdir(mode=0o700)
    plant(path / "LOCK", "symlink", outside)

    with unchanged(outside, path):
        refused(lambda: wbcache.open(path), str(path / "LOCK"), "symbolic link")


@pytest.mark.parametrize("name", ["cache_id", "backend"])
@pytest.mark.parametrize("kind", ["symlink", "fifo", "device"])
def test_a_planted_cache_id_or_backend_is_refused_and_never_read(tmp_path: Path, outside: Path,
                                                                 name: str, kind: str) -> None:
    path = closed_cache(tmp_path / "cache", a=1)
    plant(path / name, kind, outside)

    with unchanged(outside):
        message = refused(lambda: wbcache.open(path), str(path / name), KIND_WORDS[kind])
    assert "not-a-real-hash" not in message  # the target's content never reaches a message


@pytest.mark.parametrize("name", ["cache_id.tmp", "backend.tmp"])
@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_a_planted_temporary_file_of_an_interrupted_first_open_is_refused(
        tmp_path: Path, outside: Path, name: str, kind: str) -> None:
    # What a first open killed before it wrote cache_id (or backend) leaves, plus the plant.
    path = tmp_path / "cache"
    for sub in ("wal", "db"):
        (path / sub).mkdir(mode=0o700, parents=True)
    (path / "LOCK").write_bytes(b"")
    if name == "backend.tmp":
        (path / "cache_id").write_text("0123456789abcdef0123456789abcdef\n")
    plant(path / name, kind, outside)

    with unchanged(outside):
        refused(lambda: wbcache.open(path), str(path / name), KIND_WORDS[kind])


@pytest.mark.parametrize("name", ["cache_id.tmp", "backend.tmp"])
def test_a_stale_temporary_file_left_by_a_crash_is_replaced(tmp_path: Path, name: str) -> None:
    path = tmp_path / "cache"
    for sub in ("wal", "db"):
        (path / sub).mkdir(mode=0o700, parents=True)
    (path / "LOCK").write_bytes(b"")
    (path / name).write_bytes(b"half")

    with wbcache.open(path) as cache:
        cache.put("k", 1)

    assert not (path / name).exists()
    assert len((path / "cache_id").read_text().strip()) == 32
    assert (path / "backend").read_text() == "lmdb\n"
    with wbcache.open(path) as cache:
        assert cache.get("k") == 1


# ------------------------------------------------------------------ whose directory it is


def test_a_directory_another_user_created_is_refused_and_its_links_not_followed(
        tmp_path: Path, outside: Path) -> None:
    # The shared-/tmp attack: another user pre-creates the directory the victim will name,
    # with wal/ and db/ pointing at a directory of the victim's.
    path = tmp_path / "cache"
    path.mkdir(mode=0o755)
    (path / "wal").symlink_to(outside)
    (path / "db").symlink_to(outside)
    os.lchown(path / "wal", NOBODY, NOBODY)
    os.lchown(path / "db", NOBODY, NOBODY)
    os.chown(path, NOBODY, NOBODY)

    with unchanged(outside, path):
        refused(lambda: wbcache.open(path), str(path),
                f"owned by uid {NOBODY}, not you (uid {ME})")


def test_a_cache_path_that_is_another_users_link_is_not_followed(tmp_path: Path) -> None:
    """Another user plants, in a shared directory, a link at the path the victim will name,
    pointing at a private, empty directory of the victim's: it was followed (only the
    target was checked), and the cache laid out and written there. A link of your own is
    still followed."""
    target = tmp_path / "mine"
    target.mkdir(mode=0o700)
    planted = tmp_path / "cache"
    planted.symlink_to(target)
    os.lchown(planted, NOBODY, NOBODY)

    with unchanged(target):
        refused(lambda: wbcache.open(planted), str(planted),
                f"symbolic link owned by uid {NOBODY}, not by you")
    own = tmp_path / "own-link"
    own.symlink_to(target)
    with wbcache.open(own) as cache:
        cache.put("k", 1)
    assert (target / "wal").is_dir()


def test_an_empty_directory_another_user_owns_is_refused_and_nothing_is_created(
        tmp_path: Path) -> None:
    path = tmp_path / "cache"
    path.mkdir(mode=0o700)
    os.chown(path, NOBODY, NOBODY)

    with unchanged(path):
        refused(lambda: wbcache.open(path), f"owned by uid {NOBODY}, not you (uid {ME})")
    assert os.listdir(path) == []


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777, 0o1777], ids=oct)
def test_a_group_or_world_writable_directory_is_refused(tmp_path: Path, mode: int) -> None:
    path = closed_cache(tmp_path / "cache", a=1)
    path.chmod(mode)

    # A sticky one is shared by design (/tmp): no hint to change it, which would break it
    # for everyone when it is not a cache (a parent named by mistake).
    hint = "name a new directory inside it" if mode & 0o1000 else "chmod go-w"
    with unchanged(path):
        message = refused(lambda: wbcache.open(path), str(path), f"(mode {mode:04o})", hint)
    assert ("go-w" in message) == (not mode & 0o1000)


@pytest.mark.parametrize("sub", ["wal", "db"])
def test_a_wal_or_db_another_user_owns_is_refused(tmp_path: Path, sub: str) -> None:
    path = closed_cache(tmp_path / "cache", a=1)
    os.chown(path / sub, NOBODY, NOBODY)

    with unchanged(path):
        refused(lambda: wbcache.open(path), str(path / sub),
                f"owned by uid {NOBODY}, not you (uid {ME})")


@pytest.mark.parametrize("sub", ["wal", "db"])
def test_a_group_or_world_writable_wal_or_db_is_refused(tmp_path: Path, sub: str) -> None:
    path = closed_cache(tmp_path / "cache", a=1)
    (path / sub).chmod(0o777)

    with unchanged(path):
        refused(lambda: wbcache.open(path), str(path / sub), "(mode 0777)", "chmod go-w")


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("problem", ["another user's", "world-writable"])
def test_a_parent_another_user_could_rename_the_directory_in_is_refused(
        tmp_path: Path, driver: str, problem: str) -> None:
    """Was taken: another user owning a parent (or anyone, where it is world-writable and
    not sticky) renamed the cache directory away while it ran and put one of their own at
    its path, with wal/ linked to a directory of root's: the writer created its segments
    there and the flusher deleted another file (an attacker's hunt). Refused, with the
    directory it names, by an open (a new directory is not made) and every command."""
    parent = tmp_path / "parent"
    parent.mkdir()
    path = closed_cache(parent / "cache", a=1)
    if problem == "another user's":
        os.chown(parent, NOBODY, NOBODY)
        expected = f"{parent}, on the way to {path}, is owned by uid {NOBODY}"
    else:
        parent.chmod(0o777)
        expected = f"{parent}, on the way to {path}, may be written by everyone (mode 0777)"
    with unchanged(parent):
        refused(lambda: wbcache.open(path), expected)
        refused(lambda: wbcache.open(parent / "new"), f"{parent}, on the way to")
        for command in ("verify", "recover", "dump"):
            assert_one_line_error(run(driver, command, str(path)), 2, expected)


def cache_behind_anothers_link(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A closed cache at tmp_path/real/cache (a=1), and a link `name` to real owned by
    another user."""
    real = tmp_path / "real"
    real.mkdir()
    closed_cache(real / "cache", a=1)
    link = tmp_path / name
    link.symlink_to(real)
    os.chown(link, NOBODY, NOBODY, follow_symlinks=False)
    return real, link


def test_another_users_link_on_the_way_to_the_directory_is_refused(tmp_path: Path) -> None:
    """Its owner could point it elsewhere while the cache runs."""
    real, link = cache_behind_anothers_link(tmp_path, "link")
    refused(lambda: wbcache.open(link / "cache"), f"{link}, on the way to",
            f"owned by uid {NOBODY}")
    with wbcache.open(real / "cache") as cache:  # by a path of its owner's
        assert cache.get("a") == 1


@pytest.mark.parametrize("driver", DRIVERS)
def test_another_users_link_reached_through_a_link_of_your_own_is_refused(
        tmp_path: Path, driver: str) -> None:
    """Was followed: only the names as typed were looked at, so a link of one's own whose
    target went through another user's link let that user choose which directory the cache
    opened, wrote and recovered into (an attacker's hunt switched it between two of the
    victim's caches). Every name a link's target is resolved through is looked at too."""
    real, theirs = cache_behind_anothers_link(tmp_path, "theirs")
    (tmp_path / "sub").mkdir()
    mine = tmp_path / "sub" / "mine"
    mine.symlink_to(Path("..") / "theirs" / "cache")  # relative, through `..`
    expected = f"{theirs}, on the way to {mine}, is a symbolic link owned by uid {NOBODY}"
    with unchanged(real):
        refused(lambda: wbcache.open(mine), expected)
        refused(lambda: wbcache.open(mine / "nested"), f"{theirs}, on the way to")
        assert_one_line_error(run(driver, "dump", str(mine)), 2, expected)
    os.chown(theirs, ME, ME, follow_symlinks=False)  # the same chain, every link yours
    with wbcache.open(mine) as cache:
        assert cache.get("a") == 1


@pytest.mark.parametrize("target", ["../real/./x/..", "/ABS/real", "../hop",
                                    "../real/x/../../real"])
def test_the_walk_of_a_path_ends_where_the_kernel_resolves_it(tmp_path: Path,
                                                             target: str) -> None:
    """`check_parents` looks at every name the kernel looks up; its walk must end where
    `os.path.realpath` does, through relative and absolute links, `.` and `..`."""
    (tmp_path / "real" / "x").mkdir(parents=True)
    (tmp_path / "hop").symlink_to("real")
    (tmp_path / "sub").mkdir()
    link = tmp_path / "sub" / "link"
    link.symlink_to(target.replace("/ABS", str(tmp_path)))
    walk = lookups(str(link / "x"))
    assert walk[-1][1] == os.path.realpath(link / "x")
    assert all(info is not None for _, _, info in walk)


def test_a_missing_parent_another_user_makes_first_is_refused_before_anything_is_made(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Was taken: a first open checked the parents that existed, then made the missing ones
    as `mkdir -p` does, taking one another user made first in a shared place (an attacker's
    hunt won that race in 3 to 21 tries) and making the cache inside it. The parents are
    checked again once made: the open is refused and nothing is made in the cache directory.
    The race is won here every time, at the moment the open makes the directories."""
    make_dir = layout._make_dir
    public = tmp_path / "public"

    def taken_first(path: str) -> None:  # called for each missing directory
        if not public.exists():
            public.mkdir()
            public.chmod(0o777)
            os.chown(public, NOBODY, NOBODY)
        make_dir(path)

    monkeypatch.setattr(layout, "_make_dir", taken_first)
    path = public / "b" / "cache"
    refused(lambda: wbcache.open(path), f"{public}, on the way to {path}, is owned by uid")
    assert list(path.iterdir()) == []


def test_your_own_link_in_a_directory_everyone_may_write_is_refused(tmp_path: Path) -> None:
    """Anyone could rename the link there and put one of their own in its place."""
    public = tmp_path / "public"
    public.mkdir()
    closed_cache(tmp_path / "real" / "cache", a=1)
    (public / "link").symlink_to(tmp_path / "real")
    public.chmod(0o777)
    refused(lambda: wbcache.open(public / "link" / "cache"), f"{public}, on the way to",
            "may be written by everyone")


def test_a_group_writable_parent_is_let_be(tmp_path: Path) -> None:
    """A private group and umask 002 (Debian's default for users) make ~/app 0775: as
    Debian's ssh does, that is no reason to refuse (a review: it was refused)."""
    parent = tmp_path / "app"
    parent.mkdir()
    parent.chmod(0o775)
    with wbcache.open(parent / "cache") as cache:
        cache.put("k", 1)
    assert run("runner", "verify", str(parent / "cache")).exit_code == 0


def test_the_parents_may_be_a_sticky_tmp(tmp_path: Path) -> None:
    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)  # what /tmp is

    with wbcache.open(shared / "cache") as cache:
        cache.put("k", 1)
    with wbcache.open(shared / "cache") as cache:
        assert cache.get("k") == 1


# ------------------------------------------------------------------ wal/ and db/ elsewhere


@pytest.mark.parametrize("sub", ["wal", "db"])
def test_wal_or_db_may_be_a_link_to_a_private_directory_of_your_own(tmp_path: Path,
                                                                    sub: str) -> None:
    # The log on another disk, as PostgreSQL allows for its WAL.
    elsewhere = tmp_path / "other-disk" / sub
    elsewhere.mkdir(mode=0o700, parents=True)
    path = tmp_path / "cache"
    path.mkdir(mode=0o700)
    (path / sub).symlink_to(elsewhere)

    with wbcache.open(path, flush_interval=3600) as cache:
        cache.put("k", 1)
        if sub == "wal":
            assert sorted(entry.name for entry in elsewhere.iterdir()) == [
                segment_name(1), "OWNER"]  # OWNER: tests/test_linked_dirs.py
    if sub == "db":
        assert (elsewhere / "data.mdb").stat().st_size > 0
    with wbcache.open(path) as cache:
        assert cache.get("k") == 1
    assert (path / sub).is_symlink()
    assert run("runner", "verify", str(path)).exit_code == 0


@pytest.mark.parametrize("sub", ["wal", "db"])
@pytest.mark.parametrize("problem", ["another user's", "world-writable", "a file", "nothing"])
def test_wal_or_db_linked_to_a_directory_that_fails_the_check_is_refused(
        tmp_path: Path, outside: Path, sub: str, problem: str) -> None:
    target = outside / "target"
    if problem == "a file":
        target = secret_of(outside)
    elif problem == "nothing":  # was a bare "No such file or directory" naming the link
        pass
    else:
        target.mkdir(mode=0o700)
        if problem == "another user's":
            os.chown(target, NOBODY, NOBODY)
        else:
            target.chmod(0o777)
    path = tmp_path / "cache"
    path.mkdir(mode=0o700)
    (path / sub).symlink_to(target)
    expected = {"another user's": f"owned by uid {NOBODY}, not you (uid {ME})",
                "world-writable": "chmod go-w", "a file": "not a directory",
                "nothing": f"a symbolic link to {target}, which does not exist"}[problem]

    with unchanged(outside):
        refused(lambda: wbcache.open(path), str(path / sub), expected)


# ------------------------------------------------------------------ segments


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_a_planted_segment_is_refused_and_never_read_or_deleted(tmp_path: Path, outside: Path,
                                                                 kind: str) -> None:
    path = closed_cache(tmp_path / "cache", a=1)
    plant(path / "wal" / segment_name(7), kind, outside)

    with unchanged(outside):
        refused(lambda: wbcache.open(path), str(path / "wal" / segment_name(7)),
                KIND_WORDS[kind])
    assert os.path.lexists(path / "wal" / segment_name(7))  # refused, not deleted


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_segment_another_user_owns_is_refused_and_never_read_or_deleted(
        tmp_path: Path, driver: str) -> None:
    """Was read, replayed and deleted by an open, and printed by `wbcache dump` (an outside
    hunt), though every other file of the directory another user owns is refused."""
    path = tmp_path / "cache"
    segments = three_segment_log(path)
    os.chown(segments[1], NOBODY, NOBODY)
    expected = f"owned by uid {NOBODY}, not you (uid {ME})"
    with unchanged(path / "wal"):  # (an open's LMDB lock.mdb takes its reader slots anew)
        refused(lambda: wbcache.open(path), str(segments[1]), expected)
    with unchanged(path):
        for command in ("dump", "recover", "verify"):
            assert_one_line_error(run(driver, command, str(path)), 2, str(segments[1]),
                                  expected)


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_refusal_leaves_the_lock_file_as_it_found_it(tmp_path: Path, driver: str) -> None:
    """A refused `wbcache recover` (a second name for db/lock.mdb, found once it had the
    lock) and a refused shared open (a lane's cache_id another user owns) rewrote LOCK: the
    dead owner's pid it held was gone (an attacker's hunt). The pid is now written only once
    the checks have passed."""
    path = tmp_path / "cache"
    kill_writer(path, flushed=5, acks=10)
    os.link(path / "db" / "lock.mdb", tmp_path / "second-name")
    lock = (path / "LOCK").read_bytes()
    assert lock.strip()  # the dead writer's pid
    assert_one_line_error(run(driver, "recover", str(path)), 2, "hard links")
    assert (path / "LOCK").read_bytes() == lock
    shared = tmp_path / "shared"
    wbcache.open(shared, shared=True).close()
    lane = shared / "lanes" / "00000001"
    (lane / "LOCK").write_bytes(lock)  # as a dead owner left it
    os.chown(lane / "cache_id", NOBODY, NOBODY)
    refused(lambda: wbcache.open(shared, shared=True), f"owned by uid {NOBODY}")
    assert (lane / "LOCK").read_bytes() == lock
    # Refused later, by the lane's own replay (an outside audit): the pid was recorded once
    # the lane was complete, then blanked as the refused open let go.
    os.chown(lane / "cache_id", os.getuid(), os.getgid())
    killed = subprocess.Popen([sys.executable, "-c", SHARED_WRITER_KILLED, str(shared)])
    assert killed.wait() == -signal.SIGKILL
    lock = (lane / "LOCK").read_bytes()
    assert lock.split() == [str(killed.pid).encode()]  # the killed writer's
    [segment] = (lane / "wal").iterdir()
    flip_byte(segment, 100)  # an early record: good ones after it, so damage, not a tear
    with pytest.raises(wbcache.CorruptLogError):
        wbcache.open(shared, shared=True)
    assert (lane / "LOCK").read_bytes() == lock


SHARED_WRITER_KILLED = """
import os, signal, sys, wbcache
cache = wbcache.open(sys.argv[1], shared=True, flush_interval=3600)
for i in range(20):
    cache.put(f"k{i}", i)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("kind", ["symlink", "dangling symlink", "fifo"])
def test_a_new_segment_is_never_created_through_a_planted_name(tmp_path: Path, outside: Path,
                                                               kind: str) -> None:
    wal = tmp_path / "wal"
    wal.mkdir(mode=0o700)
    plant(wal / segment_name(42), kind, outside)

    with unchanged(outside):
        refused(lambda: create_segment(str(wal), 42, encode_header()), str(wal / segment_name(42)),
                KIND_WORDS[kind])
    assert not (outside / "created-through-a-link").exists()


# ------------------------------------------------------------------ the quarantine


def damaged_cache(path: Path) -> Path:
    """Three segments (LSNs 1..300), the second damaged at LSN 150."""
    segments = three_segment_log(path)
    flip_byte(segments[1], frame_offsets(segments[1])[49] + 20)
    return path


def test_links_inside_the_quarantine_are_listed_never_followed(tmp_path: Path,
                                                                 outside: Path) -> None:
    # inspect listed a link to an outside file as a quarantined file of that file's size
    # (stat through the link), and a dangling link failed the command.
    path = closed_cache(tmp_path / "cache", k=1)
    quarantine = path / "quarantine" / "20261207T000000"
    quarantine.mkdir(mode=0o700, parents=True)
    (path / "quarantine").chmod(0o700)
    secret = secret_of(outside)
    (quarantine / "to-a-secret").symlink_to(secret)
    (quarantine / "dangling").symlink_to(tmp_path / "nowhere")

    result = run("runner", "inspect", "--json", str(path))

    assert result.exit_code == 0, result.stderr
    listed = {item["path"]: item["size"] for item in json.loads(result.stdout)["quarantine"]}
    assert listed == {"20261207T000000/dangling": len(str(tmp_path / "nowhere")),
                      "20261207T000000/to-a-secret": len(str(secret))}


@pytest.mark.parametrize("driver", DRIVERS)
def test_salvage_refuses_a_planted_quarantine_link_before_changing_anything(
        tmp_path: Path, outside: Path, driver: str) -> None:
    path = damaged_cache(tmp_path / "cache")
    (path / "quarantine").symlink_to(outside)  # a directory that would pass every check

    with unchanged(outside, path):
        result = run(driver, "recover", "--salvage", "--yes", str(path))
    assert_one_line_error(result, 2, str(path / "quarantine"), "symbolic link")


def test_salvage_never_follows_a_quarantine_link_planted_after_the_directory_was_checked(
        tmp_path: Path, outside: Path) -> None:
    path = damaged_cache(tmp_path / "cache")
    segments = {entry.name: entry.read_bytes() for entry in (path / "wal").iterdir()}

    # runs after the checks, before anything changes
    def plant_now(report: object, lane: object) -> None:
        (path / "quarantine").symlink_to(outside)

    with unchanged(outside):
        refused(lambda: recover_directory(path, salvage=True, confirm=plant_now),
                str(path / "quarantine"), "symbolic link")
    # The log is whole, so once the link is gone the salvage runs to the end.
    assert {entry.name: entry.read_bytes() for entry in (path / "wal").iterdir()} == segments
    (path / "quarantine").unlink()
    outcome = recover_directory(path, salvage=True)
    assert outcome.set_aside is not None and outcome.set_aside.records_set_aside == 150


def test_a_planted_run_directory_name_is_skipped_not_followed(tmp_path: Path, outside: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    path = damaged_cache(tmp_path / "cache")
    stamp = "20300101T000000Z"
    monkeypatch.setattr(time, "strftime", lambda *args: stamp)
    (path / "quarantine").mkdir(mode=0o700)
    (path / "quarantine" / stamp).symlink_to(outside)

    with unchanged(outside):
        outcome = recover_directory(path, salvage=True)

    assert outcome.set_aside is not None
    assert outcome.set_aside.quarantine_dir == str(path / "quarantine" / f"{stamp}-2")
    assert (path / "quarantine" / f"{stamp}-2" / "salvage.json").is_file()


@pytest.mark.parametrize("problem", ["another user's", "world-writable"])
def test_a_quarantine_that_fails_the_check_is_refused(tmp_path: Path, problem: str) -> None:
    path = damaged_cache(tmp_path / "cache")
    (path / "quarantine").mkdir(mode=0o700)
    if problem == "another user's":
        os.chown(path / "quarantine", NOBODY, NOBODY)
    else:
        (path / "quarantine").chmod(0o777)

    with unchanged(path):
        refused(lambda: recover_directory(path, salvage=True), str(path / "quarantine"))


# ------------------------------------------------------------------ the operating commands


@pytest.mark.parametrize("driver", DRIVERS)
def test_every_command_refuses_a_directory_another_user_owns_and_changes_nothing(
        tmp_path: Path, driver: str) -> None:
    path = tmp_path / "cache"
    three_segment_log(path)
    for entry in [path, *path.rglob("*")]:
        os.lchown(entry, NOBODY, NOBODY)

    with unchanged(path):
        results = run_all(driver, [argv(command, path) for command in ALL_COMMANDS],
                          side_by_side=True)  # refused before any lock
    for result in results:
        assert_one_line_error(result, 2, str(path), f"owned by uid {NOBODY}, not you (uid {ME})")


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_the_read_only_commands_refuse_a_planted_lock_without_reading_it(
        tmp_path: Path, outside: Path, driver: str, kind: str) -> None:
    path = tmp_path / "cache"
    three_segment_log(path)
    plant(path / "LOCK", kind, outside)

    with unchanged(outside, path), deadline(60):
        results = run_all(driver, [argv(command, path) for command in READ_COMMANDS],
                          side_by_side=True)
    for result in results:
        assert_one_line_error(result, 2, str(path / "LOCK"), KIND_WORDS[kind])


@pytest.fixture
def reachable(tmp_path: Path) -> Iterator[Path]:
    """A directory uid 65534 can reach (tmp_path's parents are root's, 0700)."""
    where = Path(tempfile.mkdtemp(prefix="wbcache-hostile-", dir="/tmp"))
    where.chmod(0o755)
    yield where
    shutil.rmtree(where)


@pytest.mark.parametrize("driver", DRIVERS)
def test_another_user_is_refused_a_directory_it_can_reach_but_does_not_own(
        reachable: Path, driver: str) -> None:
    path = reachable / "cache"
    three_segment_log(path)
    path.chmod(0o755)  # readable by all: ownership alone refuses

    with unchanged(path):
        results = run_all(driver, [argv(command, path) for command in ALL_COMMANDS],
                          as_nobody=True, side_by_side=True)
    for result in results:
        assert_one_line_error(result, 2, str(path), f"owned by uid 0, not you (uid {NOBODY})")


@pytest.mark.parametrize("driver", DRIVERS)
def test_the_owner_of_a_directory_it_may_not_read_gets_a_permission_error(
        reachable: Path, driver: str) -> None:
    path = reachable / "cache"
    three_segment_log(path)
    for entry in [path, *path.rglob("*")]:
        os.lchown(entry, NOBODY, NOBODY)
    path.chmod(0o000)

    with unchanged(reachable):
        results = run_all(driver, [argv(command, path) for command in ALL_COMMANDS],
                          as_nobody=True, side_by_side=True)
    for result in results:
        assert_one_line_error(result, 1, "Permission denied: ", str(path))


def test_open_snapshot_refuses_a_directory_another_user_owns(tmp_path: Path) -> None:
    path = new_cache_dir(tmp_path / "cache")
    os.chown(path, NOBODY, NOBODY)

    with unchanged(path):
        refused(lambda: wbcache.open_snapshot(path), f"owned by uid {NOBODY}, not you")
