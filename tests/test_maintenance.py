"""The operator's way into an existing directory, called as functions (the commands are tested in
tests/test_cli_*.py): `wbcache.directory` (find_directory, open_database, count_after_recovery)
and `wbcache.maintenance` (recover_directory, open_snapshot), on single-owner directories,
shared ones with a live lane and orphan lanes (the live cache open in this process, the
orphans left by writer processes killed with SIGKILL), and PostgreSQL directories (a fresh
schema per test).

Over 500 lines (some 620): the three kinds of directory share their fixtures here, and the
snapshot's races with a live flush sit beside the snapshot's other cases.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
from cli_support import (
    after_shared_recovery,
    flip_byte,
    frame_offsets,
    new_cache_dir,
    pg_url,
    put,
    puts,
    start_shared_writer,
    tree_state,
    write_segment,
)
from pg_support import pg_dsn_fixture, pg_schema_fixture, query  # noqa: F401 (fixtures)

import wbcache
import wbcache.recovery.replay
from wbcache.backends import Key, backend_class
from wbcache.directory import (
    NoDatabase,
    count_after_recovery,
    find_directory,
    key_order,
    open_database,
)
from wbcache.errors import ConcurrentChangeError, CorruptLogError, InvalidDirectoryError
from wbcache.maintenance import open_snapshot, recover_directory
from wbcache.wal.records import OP_INCR

DEAD = (30, 40)  # puts (each with an increment of "hits") left in each orphan lane's log
LIVE = 5  # puts of the live cache, flushed


def decoded(items: Iterator[tuple[object, bytes]]) -> dict[object, object]:
    return {key: msgpack.unpackb(value) for key, value in items}


# ------------------------------------------------------------------ recognising a directory


def test_find_directory_tells_a_single_owner_directory_from_a_shared_one(tmp_path: Path) -> None:
    single = new_cache_dir(tmp_path / "single")
    wbcache.open(tmp_path / "shared", shared=True).close()

    found = find_directory(single)
    shared = find_directory(tmp_path / "shared")

    assert (found.root, found.shared, found.kind, found.lanes()) == (str(single), False, "lmdb",
                                                                     [])
    assert (shared.shared, shared.kind) == (True, "lmdb")
    assert [lane.root for lane in shared.lanes()] == [str(tmp_path / "shared" / "lanes" /
                                                          "00000001")]


def test_find_directory_refuses_a_kind_of_database_it_cannot_open(tmp_path: Path) -> None:
    path = new_cache_dir(tmp_path / "cache")
    (path / "backend").write_text("redis\n")
    before = tree_state(path)

    with pytest.raises(InvalidDirectoryError, match="flushes into a redis database"):
        find_directory(path)
    with pytest.raises(InvalidDirectoryError, match="flushes into a redis database"):
        recover_directory(path)
    assert tree_state(path) == before


def test_a_directory_whose_database_was_never_made_reads_as_empty_and_stays_so(
        tmp_path: Path) -> None:
    path = new_cache_dir(tmp_path / "cache")
    for name in os.listdir(path / "db"):  # as a crash right after the first open leaves it
        os.unlink(path / "db" / name)
    write_segment(path / "wal", puts(1, 3))
    before = tree_state(path)

    database = open_database(find_directory(path), None)
    with open_snapshot(path) as snapshot:
        seen = decoded(snapshot.items())

    assert isinstance(database, NoDatabase) and database.checkpoint() == 0
    assert seen == {"key-1": 1, "key-2": 2, "key-3": 3}
    assert tree_state(path) == before


def test_reading_a_single_owner_database_changes_no_byte(tmp_path: Path) -> None:
    path = new_cache_dir(tmp_path / "cache")
    with wbcache.open(path) as cache:
        cache.put("a", 1)
    before = tree_state(path)

    database = open_database(find_directory(path), None, still=True)
    try:
        assert (database.checkpoint(), database.get("a"), database.count()) == (
            1, msgpack.packb(1), 1)
    finally:
        database.close()
    assert tree_state(path) == before


def test_a_url_is_refused_for_an_lmdb_directory_and_the_snapshot_says_how(tmp_path: Path) -> None:
    path = new_cache_dir(tmp_path / "cache")
    with pytest.raises(InvalidDirectoryError, match="drop --backend"):
        open_snapshot(path, backend="postgresql://u:secret@h/db")
    with pytest.raises(InvalidDirectoryError, match="drop --backend"):
        recover_directory(path, backend="postgresql://u:secret@h/db")


def test_count_after_recovery_applies_pending_states_in_order(tmp_path: Path) -> None:
    with wbcache.open(tmp_path / "cache") as cache:
        cache.put_many([("kept", 1), ("deleted", 2)])
    database = open_database(find_directory(tmp_path / "cache"), None, still=True)
    try:
        first: dict[Key, bytes | None] = {"deleted": None, "new": b"\x01", "gone": b"\x02"}
        second: dict[Key, bytes | None] = {"gone": None, "deleted": b"\x03"}
        assert count_after_recovery(database, []) == 2
        assert count_after_recovery(database, [first]) == 3  # kept, new, gone
        assert count_after_recovery(database, [first, second]) == 3  # kept, new, deleted
    finally:
        database.close()


def test_key_order_is_str_keys_then_bytes_keys_as_the_embedded_database_keeps_them(
        tmp_path: Path) -> None:
    keys: list[Key] = ["b", "a", b"a", "é", b"\x00", "Z"]
    with wbcache.open(tmp_path / "cache") as cache:
        cache.put_many([(key, 0) for key in keys])
    database = backend_class("lmdb")(str(tmp_path / "cache" / "db"), readonly=True)
    try:
        stored = [key for key, _ in database.items()]
    finally:
        database.close()
    assert stored == sorted(keys, key=key_order) == ["Z", "a", "b", "é", b"\x00", b"a"]


# ------------------------------------------------------------------ a refusal changes no byte


def test_a_refused_recovery_changes_no_byte_though_the_damage_is_past_the_first_chunk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wbcache.recovery.replay, "CHUNK_KEYS", 10)
    path = new_cache_dir(tmp_path / "cache")
    segments = [write_segment(path / "wal", puts(first, first + 99)) for first in (1, 101, 201)]
    flip_byte(segments[2], frame_offsets(segments[2])[50] + 20)  # valid frames follow: damage
    control = tmp_path / "control"
    shutil.copytree(path, control)
    before = tree_state(path)

    for dry_run in (True, False):
        with pytest.raises(CorruptLogError, match="checksum mismatch"):
            recover_directory(path, dry_run=dry_run)
    assert tree_state(path) == before

    # The control: replayed directly, as opening does, the same log commits its first chunks
    # before the damage is found -- the reason recover reads it all first.
    database = open_database(find_directory(control), None, write=True)
    try:
        with pytest.raises(CorruptLogError):
            wbcache.recovery.replay_into(database, str(control / "wal"))
        assert database.checkpoint() >= 10
    finally:
        database.close()


# ------------------------------------------------------------------ shared directories


@pytest.fixture
def shared_dir(tmp_path: Path) -> Iterator[tuple[Path, wbcache.Cache]]:
    """A shared directory: lane 1 held by a live cache in this process (LIVE puts and
    increments, flushed), lanes 2 and 3 orphans of writers killed with DEAD puts in their
    logs."""
    path = tmp_path / "shared"
    live = wbcache.open(path, shared=True, flush_interval=3600, adopt_interval=3600)
    try:
        for i in range(LIVE):
            live.put(f"live:{i}", i)
            live.incr("hits")
        live.flush()
        writers = [start_shared_writer(path, f"dead{index}", count, flush=False)
                   for index, count in enumerate(DEAD, 1)]
        for writer in writers:
            writer.kill()
        yield path, live
    finally:
        live.close()


def beside_the_reader_table(path: Path) -> dict[str, object]:
    """The whole shared directory but LMDB's lock.mdb: every process that reads a shared
    database registers in its reader table, and clears the slots dead processes left."""
    state = tree_state(path)
    del state["db/lock.mdb"]
    return state


def test_a_shared_snapshot_sees_the_live_lane_in_use_and_the_orphans_free(
        shared_dir: tuple[Path, wbcache.Cache]) -> None:
    path, live = shared_dir
    with open_snapshot(path) as snapshot:
        lanes = [(log.lane, log.in_use, log.owner_pid, log.checkpoint) for log in snapshot.logs]
        replayed = [log.lane for log in snapshot.replayed_logs]
        pending = [snapshot.pending_summary(log).records for log in snapshot.replayed_logs]
        surveys = [snapshot.survey(log).pending for log in snapshot.logs]

    assert lanes == [("00000001", True, os.getpid(), 2 * LIVE),
                     ("00000002", False, None, 0), ("00000003", False, None, 0)]
    assert snapshot.shared and snapshot.live_owner and snapshot.owner_pid is None
    assert replayed == ["00000002", "00000003"]
    assert pending == [2 * count for count in DEAD]
    assert surveys == [0, *pending]


# A live cache in a process of its own (LMDB opens a database once per process): it writes,
# then flushes when told to, and writes one more.
LIVE_WRITER = """
import sys, wbcache
cache = wbcache.open(sys.argv[1], shared=sys.argv[2] == "shared", flush_interval=3600,
                     segment_size=4096, adopt_interval=3600)
for i in range(300):
    cache.put(f"k{i}", "x" * 40)
print("written", flush=True)
sys.stdin.readline()
cache.flush()
cache.put("later", 1)
print("flushed", flush=True)
sys.stdin.readline()
cache.close()
"""


@pytest.mark.parametrize("kind", ["single-owner", "shared"])
def test_a_live_cache_flushing_after_the_snapshot_opened_is_not_damage(
        tmp_path: Path, kind: str) -> None:
    """The snapshot reads a live log's checkpoint when it opens. The cache then flushed and
    deleted the segments its new checkpoint covers: the survey, judging the log against the
    old checkpoint, reported "records 1..N are missing" (`inspect`/`verify` exit 1 and a
    salvage hint) for a healthy log."""
    path = tmp_path / "cache"
    live = subprocess.Popen([sys.executable, "-c", LIVE_WRITER, str(path), kind],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert live.stdin is not None and live.stdout is not None
    try:
        assert live.stdout.readline() == "written\n"
        with open_snapshot(path) as snapshot:
            log = snapshot.logs[0]
            assert log.in_use and log.checkpoint == 0
            live.stdin.write("flush\n")
            live.stdin.flush()
            assert live.stdout.readline() == "flushed\n"  # the covered segments are gone
            survey = snapshot.survey(log)
        live.stdin.write("close\n")
        live.stdin.flush()
        assert live.wait(30) == 0
    finally:
        if live.poll() is None:
            live.kill()
            live.wait()

    assert survey.problems == []
    assert survey.pending == 1


@pytest.mark.parametrize("kind", ["single-owner", "shared"])
def test_reading_a_live_log_the_cache_flushed_meanwhile_says_run_again_not_damage(
        tmp_path: Path, kind: str) -> None:
    """The same race for every other read of a live log (`wbcache get`, `dump`, `dump
    --pending`, `stats`): they reported "corrupt log segment ...: records 1..N are missing"
    with a `--salvage` hint, for 2-3 % of the commands run beside a cache flushing often (an
    outside hunt). They now say what a segment vanishing under them says: run it again."""
    path = tmp_path / "cache"
    live = subprocess.Popen([sys.executable, "-c", LIVE_WRITER, str(path), kind],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert live.stdin is not None and live.stdout is not None
    refusals: list[str] = []
    try:
        assert live.stdout.readline() == "written\n"
        with open_snapshot(path) as snapshot:
            log = snapshot.logs[0]
            assert log.in_use and log.checkpoint == 0
            live.stdin.write("flush\n")
            live.stdin.flush()
            assert live.stdout.readline() == "flushed\n"  # the covered segments are gone
            reads = [lambda: snapshot.pending_summary(log),
                     lambda: list(snapshot.pending_records(log))]
            if kind == "single-owner":  # a live lane's log is not part of a shared view
                reads += [lambda: snapshot.get("k1"), lambda: list(snapshot.items())]
            for read in reads:
                with pytest.raises(ConcurrentChangeError) as refused:
                    read()
                refusals.append(str(refused.value))
        live.stdin.write("close\n")
        live.stdin.flush()
        assert live.wait(30) == 0
    finally:
        if live.poll() is None:
            live.kill()
            live.wait()

    assert all("run the command again" in refusal for refusal in refusals), refusals


def test_a_gap_in_a_live_log_whose_checkpoint_did_not_move_is_still_damage(
        tmp_path: Path) -> None:
    path = tmp_path / "cache"
    live = subprocess.Popen([sys.executable, "-c", LIVE_WRITER, str(path), "single-owner"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert live.stdin is not None and live.stdout is not None
    try:
        assert live.stdout.readline() == "written\n"
        segments = sorted((path / "wal").iterdir())
        assert len(segments) > 2
        segments[1].unlink()  # records the database never had, gone: damage
        with open_snapshot(path) as snapshot:
            log = snapshot.logs[0]
            assert log.in_use
            for read in (lambda: snapshot.get("k1"), lambda: snapshot.pending_summary(log)):
                with pytest.raises(CorruptLogError, match="missing"):
                    read()
    finally:
        live.kill()
        live.wait()


ONE_SEGMENT_WRITER = LIVE_WRITER.replace("segment_size=4096, ", "").replace(
    "cache.close()", "os._exit(0)  # its damaged log left as it is").replace(
    "import sys, wbcache", "import os, sys, wbcache")


@pytest.mark.parametrize("flush_meanwhile", [False, True])
def test_damage_in_a_live_log_is_damage_even_if_the_cache_flushed_meanwhile(
        tmp_path: Path, flush_meanwhile: bool) -> None:
    """A review: only records missing below the moved checkpoint are a flush's doing; a bad
    frame followed by good ones is corruption whatever the checkpoint did."""
    path = tmp_path / "cache"
    live = subprocess.Popen([sys.executable, "-c", ONE_SEGMENT_WRITER, str(path), "single"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert live.stdin is not None and live.stdout is not None
    try:
        assert live.stdout.readline() == "written\n"
        [segment] = sorted((path / "wal").iterdir())
        flip_byte(segment, segment.stat().st_size // 3)  # a bad frame, good ones after it
        with open_snapshot(path) as snapshot:
            log = snapshot.logs[0]
            assert log.in_use and log.checkpoint == 0
            if flush_meanwhile:
                live.stdin.write("flush\n")
                live.stdin.flush()
                assert live.stdout.readline() == "flushed\n"
                assert segment.exists()  # the active segment, damaged, stays
            with pytest.raises(CorruptLogError):
                snapshot.get("k1")
    finally:
        live.kill()
        live.wait()


def test_a_shared_snapshot_shows_what_the_caches_see_once_the_orphans_are_adopted(
        shared_dir: tuple[Path, wbcache.Cache]) -> None:
    path, live = shared_dir
    before = beside_the_reader_table(path)
    with open_snapshot(path) as snapshot:
        seen = decoded(snapshot.items())
        hits = snapshot.get("hits")
        count = snapshot.entries_after_recovery(
            snapshot.pending_summary(log).state for log in snapshot.replayed_logs)
    assert beside_the_reader_table(path) == before

    expected = after_shared_recovery(DEAD, LIVE)
    assert seen == expected
    # the increments were added to what the live cache had flushed, lane after lane
    assert (msgpack.unpackb(hits.value), hits.source, hits.lane) == (
        LIVE + sum(DEAD), "log", "00000003")
    assert count == len(expected)
    live.close()
    with wbcache.open(path, shared=True) as fresh:  # adopts both orphans
        assert dict(fresh.items()) == expected and len(fresh) == count


def test_recover_adopts_every_free_lane_and_leaves_the_live_one_alone(
        shared_dir: tuple[Path, wbcache.Cache]) -> None:
    path, live = shared_dir
    live_lane = tree_state(path / "lanes" / "00000001")

    outcome = recover_directory(path)

    assert [(lane.lane, lane.in_use, lane.owner_pid) for lane in outcome.lanes or []] == [
        ("00000001", True, os.getpid()), ("00000002", False, None),
        ("00000003", False, None)]
    assert [lane.lane for lane in outcome.skipped] == ["00000001"]
    assert [lane.report.replayed for lane in outcome.lanes or [] if lane.report] == [
        2 * count for count in DEAD]
    for lane in ("00000002", "00000003"):
        assert os.listdir(path / "lanes" / lane / "wal") == []
    assert tree_state(path / "lanes" / "00000001") == live_lane
    assert live.get("hits") == LIVE + sum(DEAD)  # the live cache reads what was adopted
    live.put("after", 1)  # and goes on


def test_recover_of_a_shared_directory_with_every_lane_free_adopts_them_all(
        shared_dir: tuple[Path, wbcache.Cache]) -> None:
    path, live = shared_dir
    live.close()

    dry = recover_directory(path, dry_run=True)
    outcome = recover_directory(path)
    again = recover_directory(path)

    assert not outcome.skipped and all(lane.report for lane in outcome.lanes or [])
    assert [lane.report.replayed for lane in dry.lanes or [] if lane.report] == [
        0, *(2 * count for count in DEAD)]
    assert [lane.report.replayed for lane in outcome.lanes or [] if lane.report] == [
        0, *(2 * count for count in DEAD)]
    assert [lane.report.replayed for lane in again.lanes or [] if lane.report] == [0, 0, 0]
    with open_snapshot(path) as snapshot:
        assert snapshot.replayed_logs == [] or all(
            snapshot.pending_summary(log).records == 0 for log in snapshot.replayed_logs)
    with wbcache.open(path, shared=True) as fresh:
        assert dict(fresh.items()) == after_shared_recovery(DEAD, LIVE)


def test_a_damaged_lane_refuses_the_whole_recovery_and_nothing_changes_in_any_lane(
        shared_dir: tuple[Path, wbcache.Cache], monkeypatch: pytest.MonkeyPatch) -> None:
    path, live = shared_dir
    live.close()
    monkeypatch.setattr(wbcache.recovery.replay, "CHUNK_KEYS", 10)
    segment = next((path / "lanes" / "00000003" / "wal").iterdir())
    flip_byte(segment, frame_offsets(segment)[60] + 20)  # lane 3, past its first chunks
    before = beside_the_reader_table(path)

    with pytest.raises(CorruptLogError, match="00000003"):
        recover_directory(path)
    # lane 2, before it in order, was not recovered either; the database did not change
    assert beside_the_reader_table(path) == before

    outcome = recover_directory(path, salvage=True)  # lane 3's damage set aside in lane 3
    assert outcome.lanes is not None
    damaged = outcome.lanes[2]
    assert damaged.set_aside is not None and damaged.report is not None
    assert damaged.set_aside.quarantine_dir is not None
    assert damaged.set_aside.quarantine_dir.startswith(str(path / "lanes" / "00000003" /
                                                           "quarantine"))
    assert outcome.lanes[1].report is not None and outcome.lanes[1].report.replayed == 60


# ------------------------------------------------------------------ PostgreSQL directories


@pytest.fixture
def table(pg_schema: str) -> str:
    return f"{pg_schema}.cache"


def pg_directory(path: Path, url: str, flushed: dict[str, int], logged: int) -> int:
    """A directory flushing into `url`'s table: `flushed` in the database, then `logged`
    increments of "n" (by 5) only in its log; returns its checkpoint."""
    with wbcache.open(path, backend=url) as cache:
        for key, value in flushed.items():
            cache.put(key, value)
        cache.incr("n", 100)
        cache.flush()
        checkpoint = cache.stats()["checkpoint_lsn"]
    for segment in (path / "wal").iterdir():
        segment.unlink()
    records = [[checkpoint + 1 + i, OP_INCR, "n", 5, 100 + 5 * (i + 1)] for i in range(logged)]
    records.append(put(checkpoint + 1 + logged, "logged", "yes"))
    write_segment(path / "wal", records)
    return checkpoint


def test_a_postgresql_directory_is_read_through_its_url_attached_to_its_own_id(
        tmp_path: Path, pg_dsn: str, table: str) -> None:
    url = pg_url(pg_dsn, table)
    checkpoint = pg_directory(tmp_path / "a", url, {"a": 1}, logged=3)
    with wbcache.open(tmp_path / "b", backend=url) as other:  # shares the table
        other.put_many([(f"b{i}", i) for i in range(20)])
        other.incr("n", 1000)
    before = tree_state(tmp_path / "a")

    with pytest.raises(InvalidDirectoryError, match="--backend URL or in the environment"):
        open_snapshot(tmp_path / "a")
    with open_snapshot(tmp_path / "a", backend=url) as snapshot:
        found = snapshot.found
        own = snapshot.checkpoint()
        n = snapshot.get("n")
        seen = decoded(snapshot.items())
        count = snapshot.entries_after_recovery([snapshot.pending_summary().state])

    assert (found.kind, found.shared) == ("postgresql", False)
    assert own == checkpoint  # a's own, not b's (which flushed 21 records more)
    assert (msgpack.unpackb(n.value), n.source) == (1100 + 15, "log")  # deltas on the stored
    assert seen == {"a": 1, "n": 1115, "logged": "yes", **{f"b{i}": i for i in range(20)}}
    assert count == len(seen)
    assert tree_state(tmp_path / "a") == before


def test_recover_replays_a_postgresql_directory_into_its_database(
        tmp_path: Path, pg_dsn: str, table: str) -> None:
    url = pg_url(pg_dsn, table, password="Zq7xK9w")
    checkpoint = pg_directory(tmp_path / "a", url, {"a": 1}, logged=3)

    dry = recover_directory(tmp_path / "a", backend=url, dry_run=True)
    outcome = recover_directory(tmp_path / "a", backend=url)

    assert outcome.report is not None and dry.report is not None
    assert (dry.report.replayed, outcome.report.replayed) == (4, 4)
    assert outcome.report.checkpoint_after == checkpoint + 4
    assert os.listdir(tmp_path / "a" / "wal") == []
    assert query(pg_dsn, f"SELECT num FROM {table} WHERE key = %s", (b"sn",)) == [(115,)]
    for name in os.listdir(tmp_path / "a"):  # nothing of the URL but its table (DIR/backend)
        if (tmp_path / "a" / name).is_file():
            text = (tmp_path / "a" / name).read_bytes()
            assert b"Zq7xK9w" not in text
            assert (table.encode() in text) == (name == "backend")
    with wbcache.open(tmp_path / "a", backend=url) as cache:
        assert cache.recovery.replayed == 0 and cache.get("n") == 115


def test_a_refused_postgresql_recovery_writes_nothing_into_the_database(
        tmp_path: Path, pg_dsn: str, table: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wbcache.recovery.replay, "CHUNK_KEYS", 1)
    url = pg_url(pg_dsn, table)
    pg_directory(tmp_path / "a", url, {"a": 1}, logged=30)
    segment = next((tmp_path / "a" / "wal").iterdir())
    flip_byte(segment, frame_offsets(segment)[20] + 20)
    rows = f"SELECT key, num, value FROM {table} ORDER BY key"
    checkpoints = f"SELECT cache_id, lsn FROM {table}_checkpoints"
    before = (tree_state(tmp_path / "a"), query(pg_dsn, rows), query(pg_dsn, checkpoints))

    with pytest.raises(CorruptLogError):
        recover_directory(tmp_path / "a", backend=url)

    assert (tree_state(tmp_path / "a"), query(pg_dsn, rows),
            query(pg_dsn, checkpoints)) == before


def test_a_url_naming_another_table_is_refused_before_anything_is_written(
        tmp_path: Path, pg_dsn: str, pg_schema: str, table: str) -> None:
    """A table= naming no table is refused, and not made (reading made it: a dry run printed
    "nothing changed" over two new tables); one naming another directory's tables is refused
    as not the table recorded in DIR/backend, or, for a directory that recorded none (made
    before tables were recorded), as holding no checkpoint for this one."""
    pg_directory(tmp_path / "a", pg_url(pg_dsn, table), {"a": 1}, logged=3)
    pg_directory(tmp_path / "b", pg_url(pg_dsn, f"{pg_schema}.other"), {"b": 1}, logged=1)
    missing, other = pg_url(pg_dsn, f"{pg_schema}.typo"), pg_url(pg_dsn, f"{pg_schema}.other")
    before = tree_state(tmp_path / "a")
    not_its_table = f"flushes into table {table} of its postgresql database, not"

    for salvage, dry_run in ((False, False), (True, False), (False, True)):
        with pytest.raises(InvalidDirectoryError, match="there is no table"):
            recover_directory(tmp_path / "a", backend=missing, salvage=salvage,
                              dry_run=dry_run)
        with pytest.raises(InvalidDirectoryError, match=not_its_table):
            recover_directory(tmp_path / "a", backend=other, salvage=salvage, dry_run=dry_run)
    with pytest.raises(InvalidDirectoryError, match="is table= the one"):
        open_snapshot(tmp_path / "a", backend=missing)
    with pytest.raises(InvalidDirectoryError, match=not_its_table):
        open_snapshot(tmp_path / "a", backend=other)
    assert tree_state(tmp_path / "a") == before

    (tmp_path / "a" / "backend").write_text("postgresql\n")  # recorded before tables were
    before = tree_state(tmp_path / "a")
    for salvage, dry_run in ((False, False), (True, False), (False, True)):
        with pytest.raises(InvalidDirectoryError, match="holds no checkpoint for it"):
            recover_directory(tmp_path / "a", backend=other, salvage=salvage, dry_run=dry_run)
    with pytest.raises(InvalidDirectoryError, match="is the URL's table= the one"):
        open_snapshot(tmp_path / "a", backend=other)

    assert tree_state(tmp_path / "a") == before
    assert query(pg_dsn, "SELECT to_regclass(%s), to_regclass(%s)",
                 (f"{pg_schema}.typo", f"{pg_schema}.typo_checkpoints")) == [(None, None)]


def test_an_old_directory_is_not_opened_on_another_table_which_it_would_then_record(
        tmp_path: Path, pg_dsn: str, pg_schema: str, table: str) -> None:
    """A directory recorded before tables were ("postgresql" alone) gets its table at its
    next open: opened with another directory's table, it replayed its log there and
    recorded that one, refusing its own from then on."""
    path = tmp_path / "a"
    pg_directory(path, pg_url(pg_dsn, table), {"a": 1}, logged=3)  # log from LSN > 1
    pg_directory(tmp_path / "b", pg_url(pg_dsn, f"{pg_schema}.other"), {"b": 1}, logged=1)
    (path / "backend").write_text("postgresql\n")
    before = tree_state(path)

    with pytest.raises(InvalidDirectoryError, match="holds no checkpoint for it"):
        wbcache.open(path, backend=pg_url(pg_dsn, f"{pg_schema}.other"))
    assert tree_state(path) == before
    with wbcache.open(path, backend=pg_url(pg_dsn, table)) as cache:
        assert cache.get("logged") == "yes"
    assert (path / "backend").read_text() == f"postgresql\ntable={table}\n"


def test_a_live_lane_whose_lock_file_was_removed_is_read_as_in_use(tmp_path: Path) -> None:
    """A LOCK unlinked under a live cache (which still holds the file): the lane must not be
    read as free, or its increments would be counted without the guard a live log gets, and
    its checkpoint judged stale (a missing LOCK with a log is read as a live cache's)."""
    path = tmp_path / "shared"
    with wbcache.open(path, shared=True, flush_interval=3600) as live:
        live.put("k", 1)
        (Path(live._layout.root) / "LOCK").unlink()
        with open_snapshot(path) as snapshot:
            (log,) = snapshot.logs
            assert (log.in_use, log.has_log) == (True, True)
            assert snapshot.survey(log).pending == 1
