"""The log reader: a torn tail is dropped and measured, anything else damaged is refused.

In the manner of LevelDB's log_test.cc: segments are built with the real writer or by hand
with `wbcache.wal.format`, bytes are damaged with tiny helpers, and each test asserts exactly
which records survived and how many bytes were dropped, or exactly where corruption was found.
One file for the one walker's damage rule (over 1,000 lines): each case sits beside its
neighbours, so a gap in the rule shows.
"""

from __future__ import annotations

import os
import random
import threading
import time
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import msgpack
import pytest
from log_bytes import (
    flip_byte,
    frame,
    in_a_thread,
    record_offsets,
    segment_records,
    truncate,
)

from wbcache.errors import CorruptLogError, UnsupportedFormatError
from wbcache.recovery import LogEnd, walk_log
from wbcache.wal import GroupCommitter, LogWriter, SegmentEnd, list_segments, read_segment
from wbcache.wal.format import (
    FORMAT_VERSION,
    FRAME,
    FRAME_MAGIC,
    FRAME_SIZE,
    HEADER_SIZE,
    MARK_MAGIC,
    MAX_FRAME_PAYLOAD,
    encode_frame,
    encode_header,
    encode_mark,
    encode_records,
)
from wbcache.wal.reader import intact_frames, mapped
from wbcache.wal.records import OP_BATCH, OP_DELETE, OP_INCR, OP_PUT, encode_put
from wbcache.wal.segments import segment_name
from wbcache.wal.syscalls import SYSCALLS

# ------------------------------------------------------------------ building segments


def put_record(lsn: int, key: str | bytes = "k", value: Any = "v") -> list[Any]:
    return [lsn, OP_PUT, key, msgpack.packb(value)]




def segment_data(records: list[list[Any]], *, version: int = FORMAT_VERSION) -> bytes:
    return encode_header(version=version) + b"".join(frame(record) for record in records)


def write_segment(wal_dir: Path, first_lsn: int, records: list[list[Any]], *,
                  version: int = FORMAT_VERSION) -> Path:
    wal_dir.mkdir(parents=True, exist_ok=True)
    path = wal_dir / segment_name(first_lsn)
    path.write_bytes(segment_data(records, version=version))
    return path


def puts(first_lsn: int, count: int) -> list[list[Any]]:
    """`count` put records from `first_lsn`, each with its own key and a value of varying size."""
    return [put_record(lsn, f"key-{lsn}", "x" * (lsn % 7) + str(lsn))
            for lsn in range(first_lsn, first_lsn + count)]




# ------------------------------------------------------------------ damaging bytes






def append(path: Path, data: bytes) -> None:
    with path.open("ab") as file:
        file.write(data)


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as file:
        file.seek(offset)
        file.write(data)


# ------------------------------------------------------------------ reading


def read(path: Path, *, first_lsn: int = 1, is_last: bool = True
         ) -> tuple[list[list[Any]], SegmentEnd]:
    """Every record of the segment, and what the walker returned; its damage raised."""
    records: list[list[Any]] = []
    reading = read_segment(str(path), first_lsn=first_lsn, is_last=is_last)
    while True:
        try:
            records.extend(next(reading))
        except StopIteration as stop:
            end: SegmentEnd = stop.value
            break
    end.check()
    return records, end


def scan(wal_dir: Path, checkpoint: int = 0) -> tuple[list[list[Any]], LogEnd]:
    """Every record of the log, and what reading it found; a problem raised."""
    records: list[list[Any]] = []
    end = walk_log(str(wal_dir), checkpoint, records.extend)
    end.check()
    return records, end


T = TypeVar("T")


def traced(call: Callable[[], T]) -> tuple[T, int, float]:
    """(what `call` returns, the peak of Python's allocations meanwhile, its seconds)."""
    started = time.perf_counter()
    tracemalloc.start()
    try:
        result = call()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return result, peak, time.perf_counter() - started


def corruption(path: Path, *, first_lsn: int = 1, is_last: bool = True) -> CorruptLogError:
    with pytest.raises(CorruptLogError) as info:
        read(path, first_lsn=first_lsn, is_last=is_last)
    return info.value


def lsns(records: list[list[Any]]) -> list[int]:
    return [record[0] for record in records]


# ------------------------------------------------------------------ clean logs


def test_clean_segment_returns_every_record_and_no_torn_bytes(tmp_path: Path) -> None:
    records = puts(1, 5) + [
        [6, OP_DELETE, b"bytes-key"],
        [7, OP_INCR, "counter", 3, 3],
        [8, OP_BATCH, [[OP_PUT, "a", msgpack.packb(1)], [OP_DELETE, "b"],
                       [OP_INCR, "c", -2, -2]]],
    ]
    path = write_segment(tmp_path, 1, records)

    got, reader = read(path)

    assert got == records
    assert reader.records == 8
    assert reader.last_lsn == 8
    assert reader.torn_bytes == 0
    assert reader.torn_reason is None
    assert reader.end == reader.size == path.stat().st_size


def test_header_only_segment_has_no_records_and_is_clean(tmp_path: Path) -> None:
    path = write_segment(tmp_path, 7, [])

    got, reader = read(path, first_lsn=7)

    assert got == []
    assert (reader.records, reader.last_lsn, reader.torn_bytes) == (0, 6, 0)
    assert reader.end == HEADER_SIZE


def _write_with_group_commit(wal_dir: Path, count: int, segment_size: int) -> list[list[Any]]:
    lock = threading.Lock()
    writer = LogWriter(str(wal_dir), 1, segment_size)
    committer = GroupCommitter(lock, writer, next_lsn=1, sync_every_batch=True)
    written = puts(1, count)
    with lock:
        for record in written:
            if committer.rotation_due():  # as Sequencer._admit: the pipe's segment is full
                committer.rotate()
            committer.append(record[0], msgpack.packb(record))
            committer.wait(record[0])
        committer.close()
    return written


def test_segments_written_by_the_group_committer_read_back_in_lsn_order(tmp_path: Path) -> None:
    written = _write_with_group_commit(tmp_path, 40, segment_size=200)

    segments = list_segments(str(tmp_path))
    got, end = scan(tmp_path)

    assert len(segments) > 2  # the small segment size made the writer rotate
    assert got == written
    assert end.last_lsn == 40
    assert end.torn_bytes == 0
    # Each segment is named after its first record and continues the previous one.
    assert [summary.first_lsn for summary in end.segments] == [s.first_lsn for s in segments]
    for before, after in zip(end.segments, end.segments[1:], strict=False):
        assert after.first_lsn == before.last_lsn + 1


# ------------------------------------------------------------------ torn tails


@pytest.mark.parametrize("records_back", [0, 1, 2])
def test_torn_tail_at_every_offset_drops_only_the_cut_record_and_those_after(
        tmp_path: Path, records_back: int) -> None:
    records = puts(1, 6)
    data = segment_data(records)
    offsets = record_offsets(data)
    cut_index = len(records) - 1 - records_back
    start = offsets[cut_index]
    stop = offsets[cut_index + 1] if cut_index + 1 < len(offsets) else len(data)
    path = tmp_path / segment_name(1)

    for cut in range(start + 1, stop):
        path.write_bytes(data[:cut])

        got, reader = read(path)

        assert got == records[:cut_index], f"cut at byte {cut}"
        assert reader.torn_bytes == cut - start, f"cut at byte {cut}"
        assert reader.end == start
        assert reader.last_lsn == cut_index
        assert reader.torn_reason is not None


def test_truncation_at_a_record_boundary_is_a_clean_end(tmp_path: Path) -> None:
    records = puts(1, 4)
    data = segment_data(records)
    path = tmp_path / segment_name(1)

    for index, offset in enumerate(record_offsets(data)):
        path.write_bytes(data[:offset])

        got, reader = read(path)

        assert got == records[:index]
        assert reader.torn_bytes == 0
        assert reader.torn_reason is None


@pytest.mark.parametrize("zeros", [1, FRAME_SIZE - 1, FRAME_SIZE, 4096])
def test_zero_filled_tail_is_torn_and_measured(tmp_path: Path, zeros: int) -> None:
    records = puts(1, 3)
    path = write_segment(tmp_path, 1, records)
    clean_size = path.stat().st_size
    append(path, b"\x00" * zeros)

    got, reader = read(path)

    assert got == records
    assert reader.torn_bytes == zeros
    assert reader.end == clean_size


def test_zeroed_last_record_is_torn(tmp_path: Path) -> None:
    # After a crash a filesystem may show the extended size of a file but zeros for its data.
    records = puts(1, 3)
    path = write_segment(tmp_path, 1, records)
    last = record_offsets(path.read_bytes())[-1]
    size = path.stat().st_size
    overwrite(path, last, b"\x00" * (size - last))

    got, reader = read(path)

    assert got == records[:2]
    assert reader.torn_bytes == size - last


def test_zeroed_payload_under_an_intact_frame_header_is_torn(tmp_path: Path) -> None:
    records = puts(1, 3)
    path = write_segment(tmp_path, 1, records)
    last = record_offsets(path.read_bytes())[-1]
    size = path.stat().st_size
    overwrite(path, last + FRAME_SIZE, b"\x00" * (size - last - FRAME_SIZE))

    got, reader = read(path)

    assert got == records[:2]
    assert reader.torn_bytes == size - last


@pytest.mark.parametrize("seed", range(5))
def test_random_garbage_tail_is_torn_and_measured(tmp_path: Path, seed: int) -> None:
    garbage = random.Random(seed).randbytes(777)
    records = puts(1, 3)
    path = write_segment(tmp_path, 1, records)
    clean_size = path.stat().st_size
    append(path, garbage)

    got, reader = read(path)

    assert got == records
    assert reader.torn_bytes == len(garbage)
    assert reader.end == clean_size


def test_garbage_holding_frame_magic_is_still_a_torn_tail(tmp_path: Path) -> None:
    # Frame markers with bad checksums after the damage are not valid records.
    records = puts(1, 2)
    path = write_segment(tmp_path, 1, records)
    garbage = (FRAME_MAGIC + b"\x05\x00\x00\x00" + b"\xde\xad\xbe\xef" + b"hello") * 3
    append(path, garbage)

    got, reader = read(path)

    assert got == records
    assert reader.torn_bytes == len(garbage)


def test_stale_record_at_or_below_the_last_lsn_after_damage_is_a_torn_tail(tmp_path: Path) -> None:
    # A valid-looking record that is not newer than the last good one cannot be live data.
    records = puts(1, 3)
    path = write_segment(tmp_path, 1, records)
    stale = frame(put_record(2, "old", "old"))
    append(path, b"\x00" * 5 + stale)

    got, reader = read(path)

    assert got == records
    assert reader.torn_bytes == 5 + len(stale)


def test_checksum_mismatch_in_the_last_record_is_a_torn_tail(tmp_path: Path) -> None:
    records = puts(1, 3)
    path = write_segment(tmp_path, 1, records)
    last = record_offsets(path.read_bytes())[-1]
    size = path.stat().st_size
    flip_byte(path, size - 1)

    got, reader = read(path)

    assert got == records[:2]
    assert reader.torn_bytes == size - last
    assert reader.torn_reason is not None and "checksum" in reader.torn_reason


def test_torn_record_whose_value_embeds_a_log_record_is_still_a_torn_tail(tmp_path: Path) -> None:
    # A user value may itself hold log bytes (say, a backup of another cache's segment). When
    # the write holding it is cut off, the frame inside the value must not pass for a valid
    # record following the damage: the cut record is a torn tail, like any other.
    records = puts(1, 3)
    embedded = frame(put_record(1000, "inner", "inner"))
    outer = put_record(4, "backup", embedded + b"\x00" * 64)
    path = tmp_path / segment_name(1)
    data = segment_data(records + [outer])
    start = record_offsets(data)[-1]
    cut = len(data) - 10  # past the embedded frame, short of the end of the outer record
    path.write_bytes(data[:cut])

    got, reader = read(path)

    assert got == records
    assert reader.torn_bytes == cut - start


def test_a_torn_value_full_of_frame_headers_is_read_in_one_pass(tmp_path: Path) -> None:
    """Frame-shaped headers inside a torn value, each claiming 1 MiB inside the file, are not
    the writer's unless the bytes before them match the torn frame's checksum: judging them
    must not cost a checksum of 1 MiB per header (hours: an open that seems to hang), but one
    pass. The read runs in a thread so that a regression fails here instead of hanging."""
    records = puts(1, 3)
    value = FRAME.pack(FRAME_MAGIC, 1 << 20, 0) * ((4 << 20) // FRAME_SIZE)
    data = segment_data(records + [put_record(4, "backup", value)])
    start = record_offsets(data)[-1]
    cut = start + (len(data) - start) * 9 // 10  # the write cut off: a torn tail
    path = tmp_path / segment_name(1)
    path.write_bytes(data[:cut])
    result = in_a_thread(lambda: read(path))

    assert result, "still reading after 60 s"
    got, end = result[0]
    assert got == records
    assert end.torn_bytes == cut - start


def test_span_checksums_equal_zlib_s(monkeypatch: pytest.MonkeyPatch) -> None:
    """`_Checksums.of` against zlib.crc32 of the span itself, with the shift of wal/_walk.c
    (zlib's crc32_combine) where it is built, and with the pure-Python one."""
    from wbcache.wal import reader

    shifts = {reader._shift, reader._python_shift}  # one of them when _walk.c is not built
    rng = random.Random(7)
    data = rng.randbytes(200_000)
    for shift in shifts:
        monkeypatch.setattr(reader, "_shift", shift)
        checksums = reader._Checksums(data, 1000)
        for _ in range(500):
            a = rng.randrange(1000, len(data))
            b = min(len(data), a + rng.choice([0, 1, 255, 256, 257, 1024, 5000, 150_000]))
            assert checksums.of(a, b) == zlib.crc32(data[a:b]), (shift, a, b)


def test_a_torn_value_full_of_frame_headers_after_a_damaged_frame_is_read_in_one_pass(
        tmp_path: Path) -> None:
    """One batch, two frames, cut by a power loss: the first whole but with a lost sector (its
    checksum wrong), the second cut off inside a value of frame-shaped headers each claiming
    1 MiB. Those headers lie past the first frame's extent: each was checksummed in full
    (hours). Each header's checksum is now computed from running checksums (`_Checksums`)."""
    records = puts(1, 3)
    value = FRAME.pack(FRAME_MAGIC, 1 << 20, 0) * ((4 << 20) // FRAME_SIZE)
    data = segment_data(records + [put_record(4, "a", "x" * 1024),
                                   put_record(5, "backup", value)])
    first, second = record_offsets(data)[-2:]
    damaged = bytearray(data[:second + (len(data) - second) * 9 // 10])
    damaged[first + FRAME_SIZE + 600] ^= 0x01  # a lost sector in the first frame
    path = tmp_path / segment_name(1)
    path.write_bytes(bytes(damaged))

    result = in_a_thread(lambda: read(path))

    assert result, "still reading after 60 s"
    got, end = result[0]
    assert got == records
    assert end.torn_bytes == len(damaged) - first


def test_the_resync_rule_costs_one_pass_over_frame_headers_claiming_long_payloads() -> None:
    """`intact_frames` (verify's further damage, salvage's count of records set aside) on
    4 MiB of headers each claiming 1 MiB, no frame of them intact: no checksum of 1 MiB per
    header. And it still finds the intact frame after them."""
    junk = FRAME.pack(FRAME_MAGIC, 1 << 20, 0) * ((4 << 20) // FRAME_SIZE)
    tail = frame(put_record(9, "after", "junk"))
    data = junk + tail + bytes(1 << 20)

    result = in_a_thread(lambda: [(at, list(lsns), end)
                                  for at, lsns, end in intact_frames(data, 0, len(data))])

    assert result, "still searching after 60 s"
    assert result[0] == [(len(junk), [9], len(junk) + len(tail))]


# ------------------------------------------------------------------ mid-log corruption


def _middle_record(tmp_path: Path) -> tuple[Path, int, int]:
    """A segment of 5 records; returns (path, offset of record 3, its size)."""
    data = segment_data(puts(1, 5))
    offsets = record_offsets(data)
    path = tmp_path / segment_name(1)
    path.write_bytes(data)
    return path, offsets[2], offsets[3] - offsets[2]


@pytest.mark.parametrize("mask", [0x01, 0x80])
def test_flipped_byte_anywhere_in_a_record_before_valid_ones_is_corruption(
        tmp_path: Path, mask: int) -> None:
    path, start, size = _middle_record(tmp_path)
    clean = path.read_bytes()
    fields = {"frame magic": range(0, 4), "length": range(4, 8), "checksum": range(8, 12),
              "payload": range(FRAME_SIZE, size)}

    for field, positions in fields.items():
        for position in positions:
            path.write_bytes(clean)
            flip_byte(path, start + position, mask)

            error = corruption(path)

            where = f"{field} byte {position}"
            assert error.path == str(path), where
            assert error.offset == start, where
            assert str(path) in str(error) and str(start) in str(error), where


def test_bad_length_before_valid_records_is_corruption_not_a_torn_tail(tmp_path: Path) -> None:
    path, start, _ = _middle_record(tmp_path)
    overwrite(path, start + 4, (1 << 20).to_bytes(4, "little"))  # points past the end of file

    error = corruption(path)

    assert (error.path, error.offset) == (str(path), start)


def test_zeroed_record_before_valid_records_is_corruption(tmp_path: Path) -> None:
    path, start, size = _middle_record(tmp_path)
    overwrite(path, start, b"\x00" * size)

    error = corruption(path)

    assert (error.path, error.offset) == (str(path), start)


def test_damaged_header_followed_by_records_is_corruption(tmp_path: Path) -> None:
    path = write_segment(tmp_path, 1, puts(1, 3))
    clean = path.read_bytes()

    for position in range(HEADER_SIZE):
        path.write_bytes(clean)
        flip_byte(path, position)

        error = corruption(path)

        assert (error.path, error.offset) == (str(path), 0), f"header byte {position}"


@pytest.mark.parametrize("size", [0, 1, 8, HEADER_SIZE - 1])
def test_cut_header_of_the_last_segment_is_torn(tmp_path: Path, size: int) -> None:
    path = tmp_path / segment_name(1)
    path.write_bytes(encode_header()[:size])

    got, reader = read(path)

    assert got == []
    assert reader.torn_bytes == size
    assert reader.end == 0
    assert reader.last_lsn == 0
    assert reader.torn_reason is not None


def test_empty_last_segment_is_torn_with_no_records(tmp_path: Path) -> None:
    path = tmp_path / segment_name(4)
    path.write_bytes(b"")

    got, reader = read(path, first_lsn=4)

    assert got == []
    assert (reader.records, reader.last_lsn, reader.torn_bytes) == (0, 3, 0)
    assert reader.torn_reason is not None


# ------------------------------------------------------------------ non-last segments


@pytest.mark.parametrize("damage", ["cut last record", "zeros after", "garbage after",
                                    "flipped last byte", "cut header", "empty"])
def test_damage_at_the_end_of_a_non_last_segment_is_corruption(tmp_path: Path,
                                                              damage: str) -> None:
    path = write_segment(tmp_path, 1, puts(1, 3))
    size = path.stat().st_size
    last = record_offsets(path.read_bytes())[-1]
    expected_offset = {"cut last record": last, "zeros after": size, "garbage after": size,
                       "flipped last byte": last, "cut header": 0, "empty": 0}[damage]
    if damage == "cut last record":
        truncate(path, size - 1)
    elif damage == "zeros after":
        append(path, b"\x00" * 16)
    elif damage == "garbage after":
        append(path, random.Random(1).randbytes(100))
    elif damage == "flipped last byte":
        flip_byte(path, size - 1)
    elif damage == "cut header":
        truncate(path, HEADER_SIZE - 1)
    else:
        truncate(path, 0)

    error = corruption(path, is_last=False)

    assert (error.path, error.offset) == (str(path), expected_offset)


def test_torn_end_of_an_earlier_segment_is_corruption_in_a_scan(tmp_path: Path) -> None:
    first = write_segment(tmp_path, 1, puts(1, 3))
    write_segment(tmp_path, 4, puts(4, 3))
    last = record_offsets(first.read_bytes())[-1]
    truncate(first, first.stat().st_size - 2)

    with pytest.raises(CorruptLogError) as info:
        scan(tmp_path)

    assert (info.value.path, info.value.offset) == (str(first), last)


def test_torn_end_of_the_last_of_several_segments_is_a_torn_tail_in_a_scan(
        tmp_path: Path) -> None:
    write_segment(tmp_path, 1, puts(1, 3))
    second = write_segment(tmp_path, 4, puts(4, 3))
    size = second.stat().st_size
    last = record_offsets(second.read_bytes())[-1]
    truncate(second, size - 2)

    got, end = scan(tmp_path)

    assert lsns(got) == [1, 2, 3, 4, 5]
    assert end.torn_bytes == size - 2 - last
    assert [summary.torn_bytes for summary in end.segments] == [0, size - 2 - last]


# ------------------------------------------------------------------ format version


def test_unknown_format_version_is_refused_naming_it(tmp_path: Path) -> None:
    path = write_segment(tmp_path, 1, puts(1, 2), version=FORMAT_VERSION + 1)

    with pytest.raises(UnsupportedFormatError) as info:
        read(path)

    assert info.value.version == FORMAT_VERSION + 1
    assert info.value.path == str(path)
    assert f"version {FORMAT_VERSION + 1}" in str(info.value)
    assert str(path) in str(info.value)


def test_unknown_format_version_is_refused_even_in_an_otherwise_empty_segment(
        tmp_path: Path) -> None:
    path = write_segment(tmp_path, 1, [], version=0xFFFF)

    with pytest.raises(UnsupportedFormatError) as info:
        read(path)

    assert info.value.version == 0xFFFF


# ------------------------------------------------------------------ bad lengths


def _frame_with_length(length: int) -> bytes:
    return FRAME.pack(FRAME_MAGIC, length, 0)


@pytest.mark.parametrize("length", [MAX_FRAME_PAYLOAD + 1, 0xFFFFFFFF, MAX_FRAME_PAYLOAD])
def test_huge_length_at_the_tail_is_torn_without_allocating_it(tmp_path: Path,
                                                               length: int) -> None:
    records = puts(1, 2)
    path = write_segment(tmp_path, 1, records)
    clean_size = path.stat().st_size
    append(path, _frame_with_length(length) + b"payload")

    (got, reader), peak, seconds = traced(lambda: read(path))

    assert got == records
    assert reader.torn_bytes == FRAME_SIZE + len(b"payload")
    assert reader.end == clean_size
    assert peak < 1 << 20  # never the record's claimed size
    assert seconds < 2.0


@pytest.mark.parametrize("length", [MAX_FRAME_PAYLOAD + 1, 0xFFFFFFFF])
def test_huge_length_before_valid_records_is_corruption_without_allocating_it(
        tmp_path: Path, length: int) -> None:
    path, start, _ = _middle_record(tmp_path)
    overwrite(path, start + 4, length.to_bytes(4, "little"))

    error, peak, _ = traced(lambda: corruption(path))

    assert (error.path, error.offset) == (str(path), start)
    assert str(length) in error.reason
    assert peak < 1 << 20


def test_zero_length_record_before_valid_records_is_corruption(tmp_path: Path) -> None:
    path, start, _ = _middle_record(tmp_path)
    overwrite(path, start + 4, (0).to_bytes(4, "little"))

    error = corruption(path)

    assert (error.path, error.offset) == (str(path), start)


# ------------------------------------------------------------------ valid checksum, wrong content


@pytest.mark.parametrize("sequence", [[1, 2, 4], [1, 2, 2], [1, 3, 4], [1, 2, 1], [2, 3, 4]])
def test_lsn_out_of_sequence_with_a_valid_checksum_is_corruption(tmp_path: Path,
                                                                 sequence: list[int]) -> None:
    # Even as the very last record: a torn write cannot produce a valid checksum.
    path = write_segment(tmp_path, 1, [put_record(lsn) for lsn in sequence])
    offsets = record_offsets(path.read_bytes())
    bad = next(index for index, lsn in enumerate(sequence) if lsn != index + 1)

    error = corruption(path)

    assert (error.path, error.offset) == (str(path), offsets[bad])
    assert f"LSN {sequence[bad]}" in error.reason


def test_segment_name_not_matching_its_first_record_is_corruption(tmp_path: Path) -> None:
    path = tmp_path / segment_name(5)
    path.write_bytes(segment_data(puts(1, 3)))  # holds LSNs 1..3, named for 5

    with pytest.raises(CorruptLogError) as info:
        scan(tmp_path, checkpoint=4)

    assert (info.value.path, info.value.offset) == (str(path), HEADER_SIZE)
    assert "LSN 1" in info.value.reason and "5" in info.value.reason


@pytest.mark.parametrize("payload", [
    msgpack.packb([1, 99, "k", b"v"]),           # unknown operation
    msgpack.packb([1, OP_PUT, "k"]),             # missing value
    msgpack.packb([1, OP_PUT, 5, b"v"]),         # key neither str nor bytes
    msgpack.packb([1, OP_PUT, "k", "not-bin"]),  # value not msgpack bin
    msgpack.packb([0, OP_DELETE, "k"]),          # LSN 0
    msgpack.packb([1, OP_BATCH, []]),            # empty batch
    msgpack.packb({"lsn": 1}),                   # not an array
    b"\xc1",                                     # not msgpack at all
    msgpack.packb([1, OP_DELETE, "k"]) + b"\x00",  # trailing bytes
], ids=["unknown-op", "missing-value", "int-key", "str-value", "lsn-0", "empty-batch",
        "map", "undecodable", "trailing-bytes"])
def test_malformed_record_with_a_valid_checksum_is_corruption(tmp_path: Path,
                                                              payload: bytes) -> None:
    path = tmp_path / segment_name(1)
    path.write_bytes(encode_header() + encode_frame(encode_records([payload])))

    error = corruption(path)

    assert (error.path, error.offset) == (str(path), HEADER_SIZE)


# ------------------------------------------------------------ group-commit frames


def test_a_frame_of_several_records_reads_back_in_order(tmp_path: Path) -> None:
    records = puts(1, 5)
    data = encode_header() + encode_frame(encode_records([msgpack.packb(r) for r in records]))
    path = tmp_path / segment_name(1)
    path.write_bytes(data)
    got, reader = read(path)
    assert got == records
    assert (reader.records, reader.last_lsn, reader.torn_bytes) == (5, 5, 0)


def test_a_hole_inside_the_last_group_commit_frame_is_a_torn_tail(tmp_path: Path) -> None:
    """Power loss may keep later pages of an unsynced write and lose an earlier one: the
    frame fails as a whole, and none of its records can pass for valid data after damage."""
    first = frame(puts(1, 1)[0])
    batch = [[lsn, OP_PUT, f"key{lsn}", msgpack.packb("v" * 300)] for lsn in range(2, 40)]
    last = encode_frame(encode_records([msgpack.packb(r) for r in batch]))
    data = bytearray(encode_header() + first + last)
    hole = HEADER_SIZE + len(first) + 100
    data[hole:hole + 4096] = bytes(4096)  # one lost page in the middle of the last write
    path = tmp_path / segment_name(1)
    path.write_bytes(bytes(data))
    got, reader = read(path)
    assert [r[0] for r in got] == [1]
    assert reader.torn_bytes == len(last)


@pytest.mark.parametrize("payload", [
    encode_records([msgpack.packb(put_record(1)), msgpack.packb(put_record(2))[:-3]]),
    msgpack.packb(put_record(1)),  # a bare record, not a list of them
    encode_records([]),
], ids=["ends-inside-a-record", "bare-record", "empty"])
def test_a_frame_that_is_not_a_whole_list_of_records_is_corrupt(tmp_path: Path,
                                                                 payload: bytes) -> None:
    path = tmp_path / segment_name(1)
    path.write_bytes(encode_header() + encode_frame(payload) + frame(put_record(1)))
    with pytest.raises(CorruptLogError):
        read(path)


def test_a_write_larger_than_the_frame_limit_is_split_into_frames(tmp_path: Path) -> None:
    big = "x" * (MAX_FRAME_PAYLOAD // 3)
    records = [put_record(lsn, f"k{lsn}", big) for lsn in range(1, 5)]
    writer = LogWriter(str(tmp_path), 1, segment_size=1 << 30)
    writer.append([msgpack.packb(record) for record in records], 1, 4)
    writer.close()
    path = tmp_path / segment_name(1)
    assert len(record_offsets(path.read_bytes())) == 2  # 4 records of a third each: 2 frames
    assert read(path)[0] == records


def test_the_frames_of_a_synced_write_over_the_limit_are_each_synced_before_the_next(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Written back to back and synced once, a power cut could keep the second and lose the
    # first: a bad frame followed by valid data, refused as corruption at the next open.
    calls: list[str] = []
    write, fdatasync = SYSCALLS.write, SYSCALLS.fdatasync
    monkeypatch.setattr(SYSCALLS, "write", lambda fd, data: calls.append("write") or write(
        fd, data))
    monkeypatch.setattr(SYSCALLS, "fdatasync", lambda fd: calls.append("fdatasync") or
                        fdatasync(fd))
    big = "x" * (MAX_FRAME_PAYLOAD // 3)
    records = [put_record(lsn, f"k{lsn}", big) for lsn in range(1, 5)]
    writer = LogWriter(str(tmp_path), 1, segment_size=1 << 30)
    calls.clear()  # the segment's creation
    writer.append([msgpack.packb(record) for record in records], 1, 4, sync=True)
    writer.close()
    assert calls[:4] == ["write", "fdatasync", "write", "fdatasync"]


# ------------------------------------------------ sync marks (fsync="interval")


def marked_segment(path: Path, parts: list[bytes]) -> tuple[bytes, list[int]]:
    """A sync-marked segment of `parts` (frames or marks); returns its bytes and each part's
    offset."""
    data = encode_header(sync_marks=True)
    offsets = []
    for part in parts:
        offsets.append(len(data))
        data += part
    path.write_bytes(data)
    return data, offsets


def test_damage_past_the_last_sync_mark_is_a_torn_tail_even_with_valid_frames_after(
        tmp_path: Path) -> None:
    """Power loss under fsync="interval": unsynced pages reach the disk in any order, so a hole
    with intact frames after it is what a cut leaves, not corruption."""
    path = tmp_path / segment_name(1)
    synced = [frame(record) for record in puts(1, 3)]
    unsynced = [frame(record) for record in puts(4, 3)]
    synced_end = len(encode_header(sync_marks=True)) + sum(map(len, synced))
    data, offsets = marked_segment(path, [*synced, encode_mark(synced_end), *unsynced])
    hole = offsets[4]  # the first unsynced frame: lost; the two after it survived
    damaged = bytearray(data)
    damaged[hole:hole + len(unsynced[0])] = bytes(len(unsynced[0]))
    path.write_bytes(bytes(damaged))

    got, end = read(path)

    assert lsns(got) == [1, 2, 3]
    assert end.torn_bytes == len(data) - hole and end.synced_to == synced_end
    assert end.torn_reason is not None and "fsync" in end.torn_reason


def test_damage_before_the_last_sync_mark_is_corruption(tmp_path: Path) -> None:
    path = tmp_path / segment_name(1)
    frames = [frame(record) for record in puts(1, 4)]
    synced_end = len(encode_header(sync_marks=True)) + sum(map(len, frames))
    data, offsets = marked_segment(path, [*frames, encode_mark(synced_end)])
    flip_byte(path, offsets[1] + FRAME_SIZE + 2)  # inside fsync'd data

    error = corruption(path)

    assert error.offset == offsets[1]
    assert f"before offset {synced_end}, which was fsync'd" in error.reason


def test_an_intact_mark_after_the_damage_that_covers_it_makes_it_corruption(
        tmp_path: Path) -> None:
    """A mark is written only after the fsync it reports: if one past the damage says the
    damaged bytes were fsync'd, they were."""
    path = tmp_path / segment_name(1)
    frames = [frame(record) for record in puts(1, 4)]
    synced_end = len(encode_header(sync_marks=True)) + sum(map(len, frames))
    data, offsets = marked_segment(path, [*frames, encode_mark(synced_end)])
    flip_byte(path, offsets[2] + FRAME_SIZE + 2)

    assert corruption(path).offset == offsets[2]


def test_a_segment_without_sync_marks_keeps_the_strict_rule(tmp_path: Path) -> None:
    path = write_segment(tmp_path, 1, puts(1, 4))
    offsets = record_offsets(path.read_bytes())
    flip_byte(path, offsets[1] + FRAME_SIZE + 2)
    assert "a valid record follows" in corruption(path).reason


@pytest.mark.parametrize("zeros", [1, FRAME_SIZE - 1, FRAME_SIZE, 4096, (1 << 20) + 3])
def test_zeros_after_the_last_frame_under_interval_are_the_clean_end(tmp_path: Path,
                                                                     zeros: int) -> None:
    """Under fsync="interval" the writer reserves space ahead of its map (wal/writer.py): the
    zeros it had not reached end the log, they are not a torn tail (under "always" they are:
    test_zero_filled_tail_is_torn_and_measured)."""
    path = tmp_path / segment_name(1)
    records = puts(1, 3)
    clean, _ = marked_segment(path, [frame(record) for record in records])
    append(path, bytes(zeros))

    got, end = read(path)

    assert got == records
    assert (end.torn_bytes, end.torn_reason, end.end) == (0, None, len(clean))


@pytest.mark.parametrize("after", [1, 4096, (1 << 20) + 5])
def test_zeros_then_anything_under_interval_are_judged_as_damage(tmp_path: Path,
                                                                 after: int) -> None:
    """Only zeros to the very end are the clean end: one other byte after them, however far
    (past the first chunk read), makes them a hole, judged by the damage rule."""
    path = tmp_path / segment_name(1)
    records = puts(1, 3)
    clean, _ = marked_segment(path, [frame(record) for record in records])
    append(path, bytes(after) + b"\x01")

    got, end = read(path)

    assert got == records
    assert end.torn_bytes == after + 1 and end.torn_reason is not None
    assert corruption(path, is_last=False).offset == len(clean)


def test_a_zero_tail_in_an_earlier_interval_segment_is_its_end_and_a_hole_is_a_gap(
        tmp_path: Path) -> None:
    """A segment is cut to its size when closed, but a zero tail left (a crash mid-rotation)
    reads as its end; records zeroed there are then missing, which the next segment's first
    LSN shows: a gap, corruption."""
    wal = tmp_path / "wal"
    wal.mkdir()
    first = wal / segment_name(1)
    marked_segment(first, [frame(record) for record in puts(1, 3)])
    append(first, bytes(5000))
    marked_segment(wal / segment_name(4), [frame(record) for record in puts(4, 2)])
    got, end = scan(wal)
    assert lsns(got) == [1, 2, 3, 4, 5] and end.problem is None

    (wal / segment_name(4)).unlink()  # as if record 4, at the end of the first, were zeroed
    marked_segment(wal / segment_name(5), [frame(puts(5, 1)[0])])
    records: list[Any] = []
    problem = walk_log(str(wal), 0, records.extend).problem
    assert problem is not None and "records 4..4 are missing" in problem.reason
    assert lsns(records) == [1, 2, 3]


def test_the_writer_marks_every_interval_fsync(tmp_path: Path) -> None:
    writer = LogWriter(str(tmp_path), 1, segment_size=1 << 20, sync_marks=True)
    writer.append([msgpack.packb(r) for r in puts(1, 2)], 1, 2)
    writer.mark(writer.sync())  # as the group commit does, its lock held
    writer.append([msgpack.packb(r) for r in puts(3, 1)], 3, 3)
    writer.close()
    path = tmp_path / segment_name(1)
    got, end = read(path)
    assert lsns(got) == [1, 2, 3] and end.torn_bytes == 0
    data = path.read_bytes()
    assert end.synced_to == data.index(MARK_MAGIC)  # everything before the mark was fsync'd


# ------------------------------------------------ what a segment file may be


def test_a_fifo_named_like_a_segment_is_refused_without_blocking(tmp_path: Path) -> None:
    path = tmp_path / segment_name(1)
    os.mkfifo(path)
    error = corruption(path)
    assert (error.path, error.offset) == (str(path), 0) and "FIFO" in error.reason


def test_a_symlink_named_like_a_segment_is_refused_not_followed(tmp_path: Path) -> None:
    target = write_segment(tmp_path / "elsewhere", 1, puts(1, 2))
    path = tmp_path / segment_name(1)
    path.symlink_to(target)
    assert "symbolic link" in corruption(path).reason


@pytest.mark.parametrize("header", ["intact", "unreadable"])
def test_no_frame_is_searched_for_in_a_huge_sparse_segment(tmp_path: Path, header: str) -> None:
    """Before, a 20 GiB sparse segment took a minute and 20 GB of memory to be refused; one
    whose header cannot be read was searched for frames (is it a torn tail?) before its size
    was checked, and `wbcache verify`, `inspect` and salvage searched every oversized segment
    after its damage: 8 GiB of holes took 25 s and 8.6 GB of memory."""
    path = write_segment(tmp_path, 1, puts(1, 2))
    if header == "unreadable":
        flip_byte(path, 3)
    os.truncate(path, 20 << 30)

    def refuse_and_search() -> tuple[CorruptLogError, list[Any]]:
        with mapped(str(path)) as (data, size):
            return corruption(path), list(intact_frames(data, 0, size))

    (error, found), peak, seconds = traced(refuse_and_search)
    assert seconds < 1.0 and peak < 1 << 20
    assert error.offset == 0 and "larger than any its writer leaves" in error.reason
    assert found == []


def test_a_crafted_value_is_checked_without_being_built(tmp_path: Path) -> None:
    """Values of the frames the Python walk reads (here a batch) were checked by decoding
    them: 4 MiB of nested one-entry maps decode to some 450 MB of dicts. wal/_walk.c's proof,
    exact since, builds nothing."""
    element = b"\x81\xc0" * 100 + b"\x80"  # {None: {None: ... {}}}, 100 deep
    count = 20_000
    value = b"\xdd" + count.to_bytes(4, "big") + element * count
    path = write_segment(tmp_path, 1, [[1, OP_BATCH, [[OP_PUT, "k", value]]]])
    records, peak, _ = traced(lambda: [
        record for batch in read_segment(str(path), first_lsn=1, is_last=True)
        for record in batch])
    assert records == [[1, OP_BATCH, [[OP_PUT, "k", value]]]]
    assert peak < 5 * len(value), f"{peak / len(value):.0f}x the value"


def _crafted(element: bytes, tail: bytes = b"") -> Callable[[], bytes]:
    """A frame payload of some 16 MiB, built when asked: an array of `element` repeated, then
    `tail` (one element more)."""
    count = (16 << 20) // len(element)
    return lambda: (b"\xdd" + (count + bool(tail)).to_bytes(4, "big") + element * count
                    + tail)


def _after(head: bytes, crafted: Callable[[], bytes]) -> Callable[[], bytes]:
    return lambda: head + crafted()


def _swapped(record: Callable[[int], list[Any]]) -> Callable[[], bytes]:
    """A frame payload of some 16 MiB of usable records, their LSNs from 3 in pairs swapped
    (4, 3, 6, 5...), built when asked."""
    count = (16 << 20) // len(msgpack.packb(record(3))) // 2 * 2
    return lambda: (b"\xdd" + count.to_bytes(4, "big")
                    + b"".join(msgpack.packb(record(3 + (i ^ 1))) for i in range(count)))


@pytest.mark.parametrize("payload, why", [
    (_crafted(b"\x80"), "undecodable frame (a map"),
    (_crafted(b"\x91\x01"), "not a record"),
    (_crafted(b"\x91\x91\x01"), "not a record"),
    (_crafted(b"\x92\x03\x02"), "not a record"),
    (_crafted(msgpack.packb([3, OP_DELETE, "k", 1, 1, 1])), "a delete of the wrong length"),
    (_crafted(b"\x93\xa2ab\xa2ab\xa2ab"), "a bad LSN 'ab'"),
    (_crafted(b"\xa2ab"), "not a record"),
    (_crafted(b"\x91" * 1000 + b"\x01"), "not a record"),
    (_crafted(msgpack.packb([3, OP_PUT, "kk", b"\xc1"])), "a value that does not decode"),
    (_after(b"\x91\x93\x03\x04", _crafted(b"\x91\x01")),
     "a batch item that is not an operation"),
    (_after(b"\x91\x95\x03\x02\xa1k\x01", _crafted(b"\x01")),
     "too big to decode to say why"),
    (_crafted(msgpack.packb([3, OP_DELETE, "k"]), b"\x91\x01"), "not a record"),
    (_crafted(msgpack.packb([3, OP_PUT, "k", b"\x01"])), "LSN 3 where 4 was expected"),
    (_crafted(msgpack.packb([3, OP_DELETE, "k"])), "LSN 3 where 4 was expected"),
    (_crafted(msgpack.packb([3, OP_BATCH, [[OP_DELETE, "k"]]])), "LSN 3 where 4 was expected"),
    (_crafted(msgpack.packb([5, OP_INCR, "k", 1, 1])), "LSN 5 where 3 was expected"),
    (_swapped(lambda lsn: [lsn, OP_PUT, "k", b"\x01"]), "LSN 4 where 3 was expected"),
    (_swapped(lambda lsn: [lsn, OP_BATCH, [[OP_DELETE, "k"]]]), "LSN 4 where 3 was expected"),
], ids=["maps", "one-element arrays", "arrays of arrays", "two-element arrays", "six fields",
        "strs", "tiny items", "nested 1000 deep", "bad values", "batch of one-element arrays",
        "a record of 16M fields", "usable records, then one that is not", "puts of one LSN",
        "deletes of one LSN", "batches of one LSN", "increments skipping two",
        "puts in pairs swapped", "batches in pairs swapped"])
def test_a_frame_of_crafted_records_is_refused_at_the_first(
        tmp_path: Path, payload: Callable[[], bytes], why: str) -> None:
    """No usable record decodes to much more than its size, but a crafted frame of records of
    any other shape was decoded in full before its records were judged: 65 times its size for
    arrays nested deep, 45 for one-element arrays, 15 to 28 for records of the wrong length or
    types. wal/_walk.c judges the records before anything is decoded; only the first one that
    is not usable is, to say why. (Maps, ext types and empty arrays were refused at the first
    already: no frame holds one.) A frame of usable records out of sequence was decoded whole
    before the walker compared their LSNs: 11 to 29 times its size; the same C judges their
    order. The frames before it are read as ever."""
    path = write_segment(tmp_path, 1, puts(1, 2))
    at = path.stat().st_size
    append(path, encode_frame(payload()))
    size = path.stat().st_size
    (records, end), peak, _ = traced(lambda: segment_records(path))
    assert lsns(records) == [1, 2]
    assert peak < 1.25 * size, f"{peak / size:.2f}x the segment"  # its payload, sliced once
    assert end.damage is not None and end.damage.offset == at and why in end.damage.reason


@pytest.mark.parametrize("record", [
    lambda lsn: [lsn, OP_DELETE, "k"],
    lambda lsn: [lsn, OP_BATCH, [[OP_DELETE, "k"]]],
    lambda lsn: [lsn, OP_PUT, "k", b"\x01"],
], ids=["deletes", "batches", "puts"])
@pytest.mark.parametrize("swapped", [False, True], ids=["in sequence", "pairs swapped"])
def test_a_big_intact_frame_after_damage_is_judged_without_being_decoded(
        tmp_path: Path, record: Callable[[int], list[Any]], swapped: bool) -> None:
    """After damage the reader asks the next intact frame for its first LSN (a valid record
    after damage is corruption, not a torn tail), and verify and salvage ask every later one.
    The frame was decoded whole to answer: 15 times its size for 16 MiB of deletes. Its
    records in sequence are now judged by wal/_walk.c, undecoded; out of sequence (crafted:
    a review's 28 MiB frame of deletes swapped in pairs peaked at 15 times the segment), the
    same walk lists their LSNs, 8 bytes each."""
    path = write_segment(tmp_path, 1, puts(1, 2))
    damaged = bytearray(frame(put_record(3, "k", "v")))
    damaged[-1] ^= 0xFF  # its checksum no longer matches
    append(path, bytes(damaged))
    count = (16 << 20) // len(msgpack.packb(record(4))) // 2 * 2
    order = [4 + (i ^ 1 if swapped else i) for i in range(count)]  # 5, 4, 7, 6...
    after = path.stat().st_size
    append(path, encode_frame(b"\xdd" + count.to_bytes(4, "big")
                              + b"".join(msgpack.packb(record(lsn)) for lsn in order)))
    size = path.stat().st_size

    def judge() -> tuple[tuple[list[list[Any]], Any], list[tuple[int, int, int, int]]]:
        with mapped(str(path)) as (data, length):
            frames = [(at, lsns[0], len(lsns), end)
                      for at, lsns, end in intact_frames(data, after, length)]
        return segment_records(path), frames

    ((records, end), frames), peak, _ = traced(judge)
    assert lsns(records) == [1, 2]
    assert end.damage is not None and "a valid record follows" in end.damage.reason
    assert frames == [(after, order[0], count, size)]
    listed = 8 * count if swapped else 0  # the LSNs out of sequence, 8 bytes each
    assert peak < 1.25 * size + listed, f"{(peak - listed) / size:.2f}x the segment"


def test_a_segment_may_exceed_its_size_by_one_frame_only(tmp_path: Path) -> None:
    """The writer starts a new segment between frames, so the reader's bound holds."""
    writer = LogWriter(str(tmp_path), 1, segment_size=4096)
    for lsn in range(1, 200):
        writer.append([msgpack.packb(put_record(lsn, f"k{lsn}", "v" * 100))], lsn, lsn)
    writer.close()
    segments = list_segments(str(tmp_path))
    assert len(segments) > 3
    for segment in segments:
        assert os.path.getsize(segment.path) <= 4096 + FRAME_SIZE + 200


def _mapped_file_kib() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssFile:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc (Linux)")
def test_the_pages_of_a_log_of_big_values_are_released_as_it_is_read(tmp_path: Path) -> None:
    """A segment of 192 values of 256 KiB (48 MiB, far fewer records than a batch): the reader
    releases what it has read every 8 MiB, so the mapped pages it holds stay far below the
    segment. A batch cut only by its record count kept all 48 MiB resident."""
    big = b"x" * (256 << 10)
    write_segment(tmp_path, 1, [put_record(lsn, f"k{lsn}", big) for lsn in range(1, 193)])
    before = _mapped_file_kib()
    highest = 0

    def on_batch(records: list[list[Any]]) -> None:
        nonlocal highest
        highest = max(highest, _mapped_file_kib() - before)

    end = walk_log(str(tmp_path), 0, on_batch)
    assert end.records == 192 and end.last_lsn == 192
    assert highest < 24 << 10, f"{highest} KiB of the 48 MiB segment stayed mapped"


@pytest.mark.parametrize("sync_marks", [False, True], ids=["always", "interval"])
def test_closing_a_log_writer_twice_closes_its_descriptor_once(tmp_path: Path,
                                                               sync_marks: bool) -> None:
    """An interrupted Cache.close runs its steps again: a second close of the segment's
    descriptor raised EBADF, or closed a file that had since taken its number."""
    writer = LogWriter(str(tmp_path), 1, 1 << 20, sync_marks=sync_marks)
    writer.append([encode_put(1, "k", msgpack.packb(1))], 1, 1, sync=True)
    writer.close()
    reused = os.open(os.devnull, os.O_RDONLY)  # likely the number just freed
    try:
        writer.close()
        os.fstat(reused)  # still open
    finally:
        os.close(reused)
