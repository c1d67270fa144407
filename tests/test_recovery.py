"""Recovery: replay exactly what the database lacks, refuse gaps and damage, report torn tails.

Logs are built by hand with `wbcache.wal.format` (or written by a real cache and copied before
it closes), replayed into an `LmdbBackend` in a temporary directory, and the database, the
report and the bytes left on disk are checked against what the contract says. Just over 500
lines: every rule of the replay (the checkpoint, gaps, damage, torn tails, chunks) in one file.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from log_bytes import flip_byte, frame, record_offsets, truncate

import wbcache
from wbcache.backends.lmdb import LmdbBackend
from wbcache.errors import CorruptLogError
from wbcache.recovery import replay_into, walk_log
from wbcache.wal import list_segments
from wbcache.wal.format import (
    FRAME_SIZE,
    encode_header,
)
from wbcache.wal.records import OP_BATCH, OP_DELETE, OP_INCR, OP_PUT
from wbcache.wal.segments import segment_name

OpenCache = Callable[..., wbcache.Cache]

# ------------------------------------------------------------------ helpers


def put(lsn: int, key: str | bytes, value: Any) -> list[Any]:
    return [lsn, OP_PUT, key, msgpack.packb(value)]


def delete(lsn: int, key: str | bytes) -> list[Any]:
    return [lsn, OP_DELETE, key]


def incr(lsn: int, key: str | bytes, delta: int, result: int) -> list[Any]:
    return [lsn, OP_INCR, key, delta, result]


def puts(first_lsn: int, last_lsn: int) -> list[list[Any]]:
    return [put(lsn, f"key-{lsn}", lsn) for lsn in range(first_lsn, last_lsn + 1)]


def write_segment(wal_dir: Path, records: list[list[Any]], *, first_lsn: int | None = None
                  ) -> Path:
    """A segment holding `records`, named after the first one (or `first_lsn`)."""
    wal_dir.mkdir(parents=True, exist_ok=True)
    name_lsn = first_lsn if first_lsn is not None else records[0][0]
    path = wal_dir / segment_name(name_lsn)
    path.write_bytes(encode_header() + b"".join(frame(record) for record in records))
    return path








def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` (relative path -> bytes)."""
    return {str(path.relative_to(root)): path.read_bytes()
            for path in sorted(root.rglob("*")) if path.is_file()}


def stored(backend: LmdbBackend) -> dict[Any, Any]:
    return {key: msgpack.unpackb(value, strict_map_key=False) for key, value in backend.items()}


def segment_names(wal_dir: Path) -> list[str]:
    return [Path(segment.path).name for segment in list_segments(str(wal_dir))]


@pytest.fixture
def wal_dir(tmp_path: Path) -> Path:
    path = tmp_path / "wal"
    path.mkdir()
    return path


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[LmdbBackend]:
    db = LmdbBackend(str(tmp_path / "db"), map_size=1 << 24)
    yield db
    db.close()


def seed(backend: LmdbBackend, entries: dict[Any, Any], checkpoint: int) -> None:
    backend.apply([(key, msgpack.packb(value)) for key, value in entries.items()], [],
                  checkpoint)


# ------------------------------------------------------------------ what is replayed


def test_replay_applies_only_records_newer_than_the_checkpoint(
        backend: LmdbBackend, wal_dir: Path) -> None:
    seed(backend, {"a": "db", "kept": "db"}, checkpoint=3)
    write_segment(wal_dir, [
        put(1, "a", "log-1"),
        put(2, "old", "log-2"),
        delete(3, "kept"),
        put(4, "b", "log-4"),
        put(5, "a", "log-5"),
    ])

    report = replay_into(backend, str(wal_dir))

    assert stored(backend) == {"a": "log-5", "kept": "db", "b": "log-4"}
    assert (report.records, report.replayed, report.keys) == (5, 2, 2)
    assert (report.checkpoint_before, report.checkpoint_after) == (3, 5)


def test_replay_coalesces_puts_deletes_increments_and_batches_to_the_final_state(
        backend: LmdbBackend, wal_dir: Path) -> None:
    seed(backend, {"gone": 1, "stays": "x", "c": "db"}, checkpoint=0)
    write_segment(wal_dir, [
        put(1, "a", 1),
        put(2, "a", 2),
        incr(3, "n", 5, 5),
        incr(4, "n", 2, 7),
        delete(5, "gone"),
        [6, OP_BATCH, [[OP_PUT, "b", msgpack.packb("b1")], [OP_DELETE, "a"],
                       [OP_INCR, "n", 3, 10], [OP_PUT, "c", msgpack.packb([1, 2])]]],
    ])
    write_segment(wal_dir, [
        put(7, "a", "a-again"),
        delete(8, "c"),
        put(9, b"a", b"bytes key"),
        delete(10, "never-existed"),
    ])

    report = replay_into(backend, str(wal_dir))

    assert stored(backend) == {"a": "a-again", "n": 10, "stays": "x", "b": "b1",
                               b"a": b"bytes key"}
    assert (report.records, report.replayed) == (10, 10)
    assert report.keys == len({"a", "n", "gone", "b", "c", b"a", "never-existed"})


def test_checkpoint_after_replay_is_the_last_lsn_of_the_log(
        backend: LmdbBackend, wal_dir: Path) -> None:
    write_segment(wal_dir, puts(1, 4))
    write_segment(wal_dir, puts(5, 9))
    write_segment(wal_dir, puts(10, 12))

    report = replay_into(backend, str(wal_dir))

    assert report.last_lsn == report.checkpoint_after == backend.checkpoint() == 12
    assert report.segments == 3
    assert stored(backend) == {f"key-{lsn}": lsn for lsn in range(1, 13)}


def test_checkpoint_is_kept_when_the_log_is_older_than_the_database(
        backend: LmdbBackend, wal_dir: Path) -> None:
    seed(backend, {"a": "db"}, checkpoint=20)
    write_segment(wal_dir, puts(1, 5))

    report = replay_into(backend, str(wal_dir))

    assert (report.replayed, report.checkpoint_after, backend.checkpoint()) == (0, 20, 20)
    assert stored(backend) == {"a": "db"}


def test_every_segment_is_deleted_after_replay_and_other_files_are_left(
        backend: LmdbBackend, wal_dir: Path) -> None:
    write_segment(wal_dir, puts(1, 3))
    write_segment(wal_dir, puts(4, 6))
    (wal_dir / "notes.txt").write_text("not a segment")

    replay_into(backend, str(wal_dir))

    assert segment_names(wal_dir) == []
    assert sorted(path.name for path in wal_dir.iterdir()) == ["notes.txt"]


def test_dry_run_changes_no_byte_and_reports_what_a_replay_would_do(
        tmp_path: Path, backend: LmdbBackend, wal_dir: Path) -> None:
    seed(backend, {"a": "db"}, checkpoint=2)
    write_segment(wal_dir, puts(1, 4))
    last = write_segment(wal_dir, puts(5, 7))
    truncate(last, last.stat().st_size - 3)  # a torn tail, which a dry run must not cut
    before = snapshot(tmp_path)

    dry = replay_into(backend, str(wal_dir), dry_run=True)

    assert snapshot(tmp_path) == before
    assert backend.checkpoint() == 2
    assert stored(backend) == {"a": "db"}
    assert dry.dry_run is True

    real = replay_into(backend, str(wal_dir))

    for field in ("segments", "records", "replayed", "keys", "torn_bytes", "torn_segment",
                  "checkpoint_before", "checkpoint_after", "last_lsn"):
        assert getattr(dry, field) == getattr(real, field), field
    assert real.checkpoint_after == 6


# ------------------------------------------------------------------ gaps


@pytest.mark.parametrize("checkpoint", [0, 2, 3])
def test_gap_above_the_checkpoint_is_corruption_and_nothing_changes(
        tmp_path: Path, backend: LmdbBackend, wal_dir: Path, checkpoint: int) -> None:
    seed(backend, {"a": "db"}, checkpoint=checkpoint)
    write_segment(wal_dir, puts(1, 3))
    after_gap = write_segment(wal_dir, puts(5, 6))  # LSN 4 is missing
    before = snapshot(tmp_path)

    with pytest.raises(CorruptLogError) as info:
        replay_into(backend, str(wal_dir))

    assert (info.value.path, info.value.offset) == (str(after_gap), 0)
    assert "4..4" in info.value.reason
    assert snapshot(tmp_path) == before
    assert backend.checkpoint() == checkpoint
    assert stored(backend) == {"a": "db"}


@pytest.mark.parametrize("checkpoint", [5, 6, 7])
def test_gap_at_or_below_the_checkpoint_is_tolerated(
        backend: LmdbBackend, wal_dir: Path, checkpoint: int) -> None:
    seed(backend, {}, checkpoint=checkpoint)
    write_segment(wal_dir, puts(1, 3))
    write_segment(wal_dir, puts(6, 8))  # 4 and 5 are missing, but the database has them

    report = replay_into(backend, str(wal_dir))

    assert report.replayed == 8 - checkpoint
    assert report.checkpoint_after == backend.checkpoint() == 8
    assert stored(backend) == {f"key-{lsn}": lsn for lsn in range(checkpoint + 1, 9)}
    assert segment_names(wal_dir) == []


@pytest.mark.parametrize(("checkpoint", "first_lsn"), [(0, 2), (2, 5), (10, 12)])
def test_log_starting_above_checkpoint_plus_one_is_corruption(
        tmp_path: Path, backend: LmdbBackend, wal_dir: Path, checkpoint: int,
        first_lsn: int) -> None:
    seed(backend, {}, checkpoint=checkpoint)
    path = write_segment(wal_dir, puts(first_lsn, first_lsn + 2))
    before = snapshot(tmp_path)

    with pytest.raises(CorruptLogError) as info:
        replay_into(backend, str(wal_dir))

    assert (info.value.path, info.value.offset) == (str(path), 0)
    assert f"{checkpoint + 1}..{first_lsn - 1}" in info.value.reason
    assert snapshot(tmp_path) == before
    assert backend.checkpoint() == checkpoint


def test_log_starting_at_checkpoint_plus_one_is_replayed(
        backend: LmdbBackend, wal_dir: Path) -> None:
    seed(backend, {}, checkpoint=4)
    write_segment(wal_dir, puts(5, 7))

    report = replay_into(backend, str(wal_dir))

    assert (report.replayed, backend.checkpoint()) == (3, 7)


def test_overlapping_segments_are_corruption(
        tmp_path: Path, backend: LmdbBackend, wal_dir: Path) -> None:
    write_segment(wal_dir, puts(1, 5))
    overlapping = write_segment(wal_dir, puts(4, 6))
    before = snapshot(tmp_path)

    with pytest.raises(CorruptLogError) as info:
        replay_into(backend, str(wal_dir))

    assert (info.value.path, info.value.offset) == (str(overlapping), 0)
    assert snapshot(tmp_path) == before


def test_flipped_byte_mid_log_is_corruption_and_nothing_changes(
        tmp_path: Path, backend: LmdbBackend, wal_dir: Path) -> None:
    first = write_segment(wal_dir, puts(1, 5))
    write_segment(wal_dir, puts(6, 8))
    bad = record_offsets(first.read_bytes())[2]
    flip_byte(first, bad + FRAME_SIZE + 1)
    before = snapshot(tmp_path)

    with pytest.raises(CorruptLogError) as info:
        replay_into(backend, str(wal_dir))

    assert (info.value.path, info.value.offset) == (str(first), bad)
    assert snapshot(tmp_path) == before
    assert (backend.checkpoint(), backend.count()) == (0, 0)


# ------------------------------------------------------------------ idempotence


def test_second_replay_replays_nothing(backend: LmdbBackend, wal_dir: Path) -> None:
    write_segment(wal_dir, puts(1, 4) + [incr(5, "n", 1, 1)])
    first = replay_into(backend, str(wal_dir))
    after_first = stored(backend)

    second = replay_into(backend, str(wal_dir))

    assert (first.replayed, first.checkpoint_after) == (5, 5)
    assert (second.segments, second.records, second.replayed, second.keys) == (0, 0, 0, 0)
    assert (second.checkpoint_before, second.checkpoint_after) == (5, 5)
    assert stored(backend) == after_first


def test_log_left_by_a_crash_after_the_replay_committed_is_only_deleted(
        backend: LmdbBackend, wal_dir: Path) -> None:
    # A crash between the database commit and the segment deletion leaves the log behind;
    # meanwhile the database may have moved on. The old records must not be applied again.
    path = write_segment(wal_dir, [put(1, "a", "old"), incr(2, "n", 1, 1), delete(3, "b")])
    log = path.read_bytes()
    replay_into(backend, str(wal_dir))
    backend.apply([("a", msgpack.packb("newer")), ("b", msgpack.packb("back")),
                   ("n", msgpack.packb(41))], [], 10)
    path.write_bytes(log)

    report = replay_into(backend, str(wal_dir))

    assert (report.records, report.replayed) == (3, 0)
    assert stored(backend) == {"a": "newer", "b": "back", "n": 41}
    assert backend.checkpoint() == 10
    assert segment_names(wal_dir) == []


def test_empty_log_replays_nothing(backend: LmdbBackend, wal_dir: Path) -> None:
    seed(backend, {"a": 1}, checkpoint=7)

    report = replay_into(backend, str(wal_dir))

    assert (report.segments, report.records, report.replayed) == (0, 0, 0)
    assert (report.last_lsn, report.checkpoint_after, report.torn_bytes) == (0, 7, 0)
    assert report.torn_segment is None
    assert stored(backend) == {"a": 1}


# ------------------------------------------------------------------ torn tails


def test_torn_tail_is_dropped_and_reported(backend: LmdbBackend, wal_dir: Path) -> None:
    write_segment(wal_dir, puts(1, 3))
    last = write_segment(wal_dir, puts(4, 5) + [put(6, "key-1", "torn")])
    size = last.stat().st_size
    start = record_offsets(last.read_bytes())[-1]
    truncate(last, size - 4)

    report = replay_into(backend, str(wal_dir))

    assert report.torn_bytes == size - 4 - start
    assert report.torn_segment == str(last)
    assert (report.records, report.last_lsn, backend.checkpoint()) == (5, 5, 5)
    assert stored(backend) == {f"key-{lsn}": lsn for lsn in range(1, 6)}  # key-1 not "torn"
    assert segment_names(wal_dir) == []


def test_scan_reports_the_torn_tail_of_the_last_segment_only(wal_dir: Path) -> None:
    write_segment(wal_dir, puts(1, 2))
    last = write_segment(wal_dir, puts(3, 4))
    with last.open("ab") as file:
        file.write(b"\x00" * 9)

    records: list[list[Any]] = []
    end = walk_log(str(wal_dir), 0, records.extend)

    assert [record[0] for record in records] == [1, 2, 3, 4]
    assert end.torn_bytes == 9 and end.problem is None
    assert [segment.torn_bytes for segment in end.segments] == [0, 9]


# ------------------------------------------------------------------ through wbcache.open


def _copy_segments(source: Path, target: Path) -> None:
    """Replace the segments of cache directory `target` with those of `source`."""
    for segment in (target / "wal").iterdir():
        segment.unlink()
    for segment in (source / "wal").iterdir():
        shutil.copy2(segment, target / "wal" / segment.name)


def _fresh_cache_dir(open_cache: OpenCache, path: Path) -> None:
    open_cache(path).close()


def test_open_recovers_every_complete_record_and_reports_the_torn_tail(
        tmp_path: Path, open_cache: OpenCache) -> None:
    writer = open_cache(tmp_path / "writer", segment_size=4096, flush_interval=3600.0)
    for index in range(150):
        writer.put(f"key-{index}", {"index": index, "pad": "p" * 20})
    writer.delete("key-3")
    writer.incr("counter", 5)
    writer.put_many({"batch-a": 1, "batch-b": 2})
    last_acknowledged = writer.put("key-0", "overwritten")
    torn_lsn = writer.put("key-1", "the write that is torn")
    target = tmp_path / "target"
    _fresh_cache_dir(open_cache, target)
    _copy_segments(tmp_path / "writer", target)  # while the writer is still open
    writer.close()
    segments = list_segments(str(target / "wal"))
    last = Path(segments[-1].path)
    start = record_offsets(last.read_bytes())[-1]
    cut = start + (last.stat().st_size - start) // 2
    truncate(last, cut)

    cache = open_cache(target)

    assert len(segments) > 1
    assert torn_lsn == last_acknowledged + 1
    assert cache.recovery.torn_bytes == cut - start
    assert cache.recovery.torn_segment == str(last)
    assert cache.recovery.replayed == last_acknowledged
    assert cache.recovery.checkpoint_after == last_acknowledged
    assert cache.get("key-0") == "overwritten"
    assert cache.get("key-1") == {"index": 1, "pad": "p" * 20}
    assert "key-3" not in cache
    assert cache.get("counter") == 5
    assert (cache.get("batch-a"), cache.get("batch-b")) == (1, 2)
    assert all(cache.get(f"key-{index}") == {"index": index, "pad": "p" * 20}
               for index in range(4, 150))
    assert cache.put("next", 1) == torn_lsn  # LSNs continue after the last valid record
    cache.close()

    reopened = open_cache(target)

    assert reopened.recovery.torn_bytes == 0
    assert reopened.get("key-0") == "overwritten"
    assert reopened.get("next") == 1


@pytest.mark.parametrize("damage", ["payload byte mid-segment", "cut end of earlier segment"])
def test_open_refuses_mid_log_damage_and_leaves_the_segments_byte_identical(
        tmp_path: Path, open_cache: OpenCache, damage: str) -> None:
    writer = open_cache(tmp_path / "writer", segment_size=4096, flush_interval=3600.0)
    for index in range(150):
        writer.put(f"key-{index}", "v" * 30)
    target = tmp_path / "target"
    _fresh_cache_dir(open_cache, target)
    _copy_segments(tmp_path / "writer", target)
    writer.close()
    segments = [Path(segment.path) for segment in list_segments(str(target / "wal"))]
    first = segments[0]
    offsets = record_offsets(first.read_bytes())
    if damage == "payload byte mid-segment":
        bad = offsets[len(offsets) // 2]
        flip_byte(first, bad + FRAME_SIZE + 2)
    else:
        bad = offsets[-1]
        truncate(first, first.stat().st_size - 1)
    before = snapshot(target / "wal")
    (target / "LOCK").write_bytes(b"4242\n")  # the pid of an owner long gone
    lock_before = (target / "LOCK").read_bytes()
    data_before = (target / "db" / "data.mdb").read_bytes()

    with pytest.raises(CorruptLogError) as info:
        open_cache(target)

    assert len(segments) > 1
    assert (info.value.path, info.value.offset) == (str(first), bad)
    assert snapshot(target / "wal") == before
    # Nor the owner's pid nor the data: only LMDB's reader table (db/lock.mdb), which every
    # open of the database rewrites (README, "Opening a damaged directory").
    assert (target / "LOCK").read_bytes() == lock_before
    assert (target / "db" / "data.mdb").read_bytes() == data_before
    # The failed open released the directory: trying again meets the damage, not the lock.
    with pytest.raises(CorruptLogError):
        open_cache(target)
    assert snapshot(target / "wal") == before


def test_batches_and_the_puts_over_them_are_applied_in_chunks_of_bounded_bytes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Only plain puts counted towards a chunk's bytes: a log of `put_many` batches was
    chunked by key count alone (recovery held 1.1 GB where the same values as single puts
    held 110 MB, an outside hunt), and a put over a batch's value took off bytes never
    counted. Here each batch of 10 values of 4 KB is followed by puts over the same keys."""
    monkeypatch.setattr(wbcache.recovery.replay, "CHUNK_BYTES", 64 * 1024)
    chunks: list[int] = []
    stored: dict[str, bytes] = {}

    class Recording:  # the backend calls a replay makes
        applies_increments = False

        def apply(self, puts: Any, deletes: list[Any], checkpoint: int) -> None:
            chunk = dict(puts)
            chunks.append(sum(map(len, chunk.values())))
            stored.update(chunk)

    replay = wbcache.recovery.replay.Replay(Recording(), 0)  # type: ignore[arg-type]
    value = msgpack.packb(b"v" * 4000)
    lsn = 0
    for batch in range(40):
        keys = [f"b{batch}:{i}" for i in range(10)]
        lsn += 1
        replay.frame([[lsn, OP_BATCH, [[OP_PUT, key, value] for key in keys]]])
        for key in keys:
            lsn += 1
            replay.frame([put(lsn, key, b"w" * 4000)])
    replay.finish(lsn)
    assert stored == {f"b{batch}:{i}": msgpack.packb(b"w" * 4000)
                      for batch in range(40) for i in range(10)}  # every key, its last value
    assert len(chunks) >= 20 and max(chunks) <= 64 * 1024 + 10 * 4010, chunks
