"""Sync marks inside a torn frame's payload are a user's bytes, not the writer's word.

Under fsync="interval" a value may itself hold log bytes (an application caching a copy of
another wbcache segment), so intact, mark-shaped runs of bytes claiming "fsync'd up to X" sit
inside its frame. When a kill -9 cuts off the copy of such a value, the frame is a torn tail
past the last real mark (docs/design.md, the damage rule): the marks inside it must not make
it corruption. A mark the writer wrote after real damage still must."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import msgpack
import pytest
from log_bytes import in_a_thread, segment_records

import wbcache
from wbcache.wal import LogWriter
from wbcache.wal.format import (
    FRAME,
    FRAME_MAGIC,
    FRAME_SIZE,
    HEADER_SIZE,
    MARK_MAGIC,
    decode_mark,
    encode_mark,
)
from wbcache.wal.records import OP_PUT
from wbcache.wal.segments import segment_name


def put(lsn: int, key: str, value: Any) -> bytes:
    """An encoded put record, as the cache hands it to the writer."""
    return msgpack.packb([lsn, OP_PUT, key, msgpack.packb(value)])


def marked_log(wal_dir: Path, frames: int = 60, value_size: int = 500) -> bytes:
    """A real sync-marked segment (fsync="interval"): a frame then a mark after each fsync.
    Its marks claim offsets up to its own size, far past the victim segments' damage below."""
    wal_dir.mkdir(parents=True, exist_ok=True)
    writer = LogWriter(str(wal_dir), 1, segment_size=64 << 20, sync_marks=True)
    for lsn in range(1, frames + 1):
        writer.append([put(lsn, f"d{lsn}", os.urandom(value_size))], lsn, lsn)
        writer.mark(writer.sync())
    writer.close()
    data = (wal_dir / segment_name(1)).read_bytes()
    return data[:last_frame(data)[1]]


def last_frame(data: bytes) -> tuple[int, int]:
    """(offset, end) of a written segment's last frame or mark: the writer leaves the zeros it
    reserved after it (wal/writer.py), which the walk stops at."""
    at = end = HEADER_SIZE
    while data[end:end + 4] in (FRAME_MAGIC, MARK_MAGIC):
        at, end = end, end + FRAME_SIZE + FRAME.unpack_from(data, end)[1]
    return at, end


def forged_marks(data: bytes, start: int) -> list[tuple[int, int]]:
    """(offset, synced_end) of every intact mark-shaped run of bytes at or after `start`."""
    found, at = [], data.find(MARK_MAGIC, start)
    while at != -1:
        mark = decode_mark(data, at, len(data))
        if mark is not None:
            found.append((at, mark[0]))
        at = data.find(MARK_MAGIC, at + 1)
    return found


def victim(tmp_path: Path, value: bytes) -> tuple[Path, int, int, int]:
    """A sync-marked segment written by the real writer: records 1..3 fsync'd and marked,
    record 4 acknowledged (copied, not fsync'd), then record 5 holding `value`. Returns its
    path, the offset of record 5's frame (where a cut of it is the damage), the frame's end,
    and the last real mark's synced_end."""
    wal = tmp_path / "victim"
    wal.mkdir()
    writer = LogWriter(str(wal), 1, segment_size=64 << 20, sync_marks=True)
    writer.append([put(lsn, f"k{lsn}", lsn) for lsn in (1, 2, 3)], 1, 3)
    synced = writer.sync()
    writer.mark(synced)
    writer.append([put(4, "acked", 4)], 4, 4)
    writer.append([put(5, "backup", value)], 5, 5)
    writer.close()
    path = wal / segment_name(1)
    damage, end = last_frame(path.read_bytes())
    return path, damage, end, synced


@pytest.fixture(scope="module")
def donor(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return marked_log(tmp_path_factory.mktemp("donor"))


# ------------------------------------------------ a torn copy of a mark-bearing value


@pytest.mark.parametrize("cut", ["file-ends-inside-the-frame", "zeros-after-the-cut"])
def test_marks_inside_a_torn_value_do_not_make_it_corruption(
        tmp_path: Path, donor: bytes, cut: str) -> None:
    """The copy stopped two thirds into the value: `file-ends-inside-the-frame` is a write cut
    short (the frame claims bytes past the end of the file), `zeros-after-the-cut` is the
    mapped segment, whose reserved window reads as zeros where the copy had not reached (the
    frame's checksum fails)."""
    path, damage, frame_end, synced = victim(tmp_path, donor)
    data = path.read_bytes()
    stop = damage + (frame_end - damage) * 2 // 3
    forged = forged_marks(data[:stop], damage)
    assert forged and max(end for _, end in forged) > damage  # they claim the damage fsync'd
    if cut == "file-ends-inside-the-frame":
        path.write_bytes(data[:stop])
    else:
        path.write_bytes(data[:stop] + bytes(len(data) - stop + 4096))

    records, end = segment_records(path)

    assert end.damage is None
    assert [record[0] for record in records] == [1, 2, 3, 4]  # record 4 was acknowledged
    assert (end.end, end.torn_bytes, end.synced_to) == (damage, path.stat().st_size - damage,
                                                        synced)


def test_a_cut_just_past_the_frame_header_is_a_torn_tail_too(tmp_path: Path,
                                                             donor: bytes) -> None:
    """The smallest cut holding a forged mark: the frame's header and the value's bytes up to
    the end of its first mark."""
    path, damage, _, _ = victim(tmp_path, donor)
    data = path.read_bytes()
    first, claims = forged_marks(data, damage)[0]
    assert claims > damage
    path.write_bytes(data[:first + FRAME_SIZE + 9])

    records, end = segment_records(path)

    assert end.damage is None and [record[0] for record in records] == [1, 2, 3, 4]


# ------------------------------------------------ real marks after real damage still count


def test_a_real_mark_after_a_damaged_value_still_makes_it_corruption(tmp_path: Path,
                                                                    donor: bytes) -> None:
    """The frame holding the value was fsync'd and marked, then one of its bytes (before the
    value's forged marks) was damaged: the writer's mark, after the frame, states that the
    damaged bytes were fsync'd."""
    path, damage, frame_end, _ = victim(tmp_path, donor)
    data = bytearray(path.read_bytes()[:frame_end] + encode_mark(frame_end))
    data[damage + FRAME_SIZE + 100] ^= 0x01
    path.write_bytes(bytes(data))

    _, end = segment_records(path)

    assert end.damage is not None and end.damage.offset == damage
    assert f"before offset {frame_end}, which was fsync'd" in end.damage.reason


@pytest.mark.parametrize("longer_by", [7, 1 << 24], ids=["inside-the-file", "past-its-end"])
def test_a_real_mark_inside_a_frame_whose_length_was_damaged_still_counts(
        tmp_path: Path, donor: bytes, longer_by: int) -> None:
    """The frame is intact but its length field was damaged to claim more: the writer's mark
    after its real end lies inside the claimed extent, and the bytes before it match the
    claimed checksum, so it is the writer's, and the damage is corruption."""
    path, damage, frame_end, _ = victim(tmp_path, donor)
    data = bytearray(path.read_bytes()[:frame_end] + encode_mark(frame_end) + bytes(4096))
    _, length, crc = FRAME.unpack_from(data, damage)
    FRAME.pack_into(data, damage, FRAME_MAGIC, length + longer_by, crc)
    path.write_bytes(bytes(data))

    _, end = segment_records(path)

    assert end.damage is not None and end.damage.offset == damage
    assert f"before offset {frame_end}, which was fsync'd" in end.damage.reason


@pytest.mark.parametrize("longer_by", [1 << 16, 1 << 24], ids=["inside-the-file",
                                                              "past-its-end"])
def test_a_mark_after_several_frames_past_a_damaged_length_still_counts(
        tmp_path: Path, longer_by: int) -> None:
    """As above, with the writer's own output: one fsync covers frames 2 to 4, so its mark
    comes after three frames, and the bytes before it are not the damaged frame's payload.
    The writer's frame at that payload's real end is what shows the length was damaged; the
    records after it were fsync'd and acknowledged, and must not be dropped as a torn tail."""
    writer = LogWriter(str(tmp_path), 1, segment_size=64 << 20, sync_marks=True)
    writer.append([put(1, "k1", 1)], 1, 1)
    writer.mark(writer.sync())
    for lsn in (2, 3, 4):
        writer.append([put(lsn, f"k{lsn}", lsn)], lsn, lsn)
    writer.mark(writer.sync())
    writer.close()
    path = tmp_path / segment_name(1)
    data = bytearray(path.read_bytes())
    offsets = [at for at in range(HEADER_SIZE, last_frame(bytes(data))[1])
               if data[at:at + 4] == FRAME_MAGIC]
    assert len(offsets) == 4
    damage = offsets[1]
    _, length, crc = FRAME.unpack_from(data, damage)
    FRAME.pack_into(data, damage, FRAME_MAGIC, length + longer_by, crc)
    path.write_bytes(bytes(data))

    records, end = segment_records(path)

    assert end.damage is not None and end.damage.offset == damage, (records, end)
    assert "which was fsync'd" in end.damage.reason


def test_a_torn_value_full_of_frame_headers_is_read_in_one_pass(tmp_path: Path) -> None:
    """Frame starts inside a torn value are candidates for the damaged frame's real end. A
    value made of frame headers, each claiming 1 MiB (inside the file), must not cost a
    checksum of 1 MiB per header (hours: an open that seems to hang): it is read, as the torn
    tail it is, in one pass. The read runs in a thread so that a regression fails here
    instead of hanging."""
    value = FRAME.pack(FRAME_MAGIC, 1 << 20, 0) * ((4 << 20) // FRAME_SIZE)
    path, damage, frame_end, synced = victim(tmp_path, value)
    data = path.read_bytes()
    cut = damage + (frame_end - damage) * 9 // 10  # kill -9 mid-copy; the mapped zeros after
    path.write_bytes(data[:cut] + bytes(len(data) - cut))
    read = in_a_thread(lambda: segment_records(path))

    assert read, "still reading after 60 s"
    records, end = read[0]
    assert end.damage is None and end.torn_bytes == len(data) - damage
    assert [record[0] for record in records] == [1, 2, 3, 4]


# ------------------------------------------------ a real kill -9 mid-copy

# The child copies `value` (a file holding a real sync-marked segment) as one put under
# fsync="interval". The writer maps the segment a 1 MiB window at a time, reserving each
# first: its small writes fit the first window, so the next reserve is mid-copy of the value,
# with the part in the first window copied and the rest not. There the child reports
# "copying" and waits for the kill: no timing involved.
CHILD = textwrap.dedent("""
    import os, sys, threading
    import wbcache
    from wbcache.wal.syscalls import SYSCALLS
    path, value_path = sys.argv[1], sys.argv[2]
    value = open(value_path, "rb").read()
    cache = wbcache.open(path, fsync="interval", fsync_interval=3600, flush_interval=3600)
    for i in range(20):
        cache.put(f"k{i}", i)
    cache.sync()
    cache.put("acked-after-sync", 1)  # acknowledged: must survive the kill
    def reserve(fd, start, end):
        os.write(1, b"copying\\n")
        threading.Event().wait()
    SYSCALLS.reserve = reserve
    cache.put("backup", value)
    os.write(1, b"done\\n")
""")


def test_kill_9_mid_copy_of_a_mark_bearing_value_reopens(tmp_path: Path) -> None:
    wal = tmp_path / "donor"
    value = marked_log(wal, frames=400, value_size=3000)  # 1.2 MiB: it spans two windows
    assert len(value) > 1 << 20 and len(forged_marks(value, 0)) == 400
    value_path = tmp_path / "value"
    value_path.write_bytes(value)
    path = tmp_path / "cache"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(value_path)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert child.stdout is not None
    try:
        line = child.stdout.readline()  # blocks until the child stops mid-copy (or dies)
        assert line == b"copying\n", child.stderr.read().decode()  # type: ignore[union-attr]
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()

    with wbcache.open(path, fsync="interval") as cache:
        assert cache.get("acked-after-sync") == 1
        assert cache.get("k19") == 19
        assert cache.get("backup") is None
        assert cache.recovery.torn_bytes > 0
