"""A batch of wal/_pipe.c is ONE frame (docs/design.md, the log's rules).

Writers hand the pipe their records framed one by one; a batch of several used to go to the
log as several frames in one write. The kernel writes a write's pages back in any order, so a
power cut during it could keep a later frame and lose an earlier one (LazyFS's torn-op cycles
did exactly that): a bad frame followed by valid data, which the reader takes for corruption,
and the next open refused the directory (CorruptLogError) over writes nobody was told were
durable. The pipe now rewrites a batch as one frame (a batch over the frame limit as frames of
at most that size, each fdatasync'd before the next): a torn batch is a torn tail.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path
from typing import Any

import msgpack
import pytest

import wbcache
from wbcache.wal import commit as commit_module
from wbcache.wal.format import FRAME, FRAME_MAGIC, FRAME_SIZE, encode_one_frame
from wbcache.wal.records import encode_put
from wbcache.wal.segments import list_segments

Pipe = commit_module.Pipe
pytestmark = pytest.mark.skipif(Pipe is None, reason="test_pipe.py: the pipe module is built")


def frames_of(data: bytes) -> list[list[Any]]:
    """The records of each frame in `data` (frames only, each intact)."""
    frames = []
    at = 0
    while at < len(data):
        magic, length, crc = FRAME.unpack_from(data, at)
        payload = data[at + FRAME_SIZE:at + FRAME_SIZE + length]
        assert magic == FRAME_MAGIC and len(payload) == length and zlib.crc32(payload) == crc
        frames.append(msgpack.unpackb(payload))
        at += FRAME_SIZE + length
    return frames


def write_batch(path: Path, records: list[bytes], first_lsn: int) -> int:
    """Hand `records` to a pipe, one frame each, in one call, then wait: they are ONE batch
    (a batch takes everything handed over). Returns the batches the pipe counted."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        pipe = Pipe(fd, first_lsn - 1)
        pipe.submit(b"".join(map(encode_one_frame, records)), first_lsn + len(records) - 1)
        durable, error, batches = pipe.wait(first_lsn + len(records) - 1, 10.0)
        pipe.close()
    finally:
        os.close(fd)
    assert (durable, error) == (first_lsn + len(records) - 1, 0)
    return int(batches)


@pytest.mark.parametrize("count", [1, 2, 15, 16, 70_000])  # fixarray, array 16, array 32
def test_a_batch_of_records_is_written_as_one_frame(tmp_path: Path, count: int) -> None:
    records = [encode_put(lsn, f"k{lsn}", msgpack.packb(lsn)) for lsn in range(1, count + 1)]
    assert write_batch(tmp_path / "log", records, 1) == 1
    assert frames_of((tmp_path / "log").read_bytes()) == [
        [msgpack.unpackb(record) for record in records]]


def test_a_batch_over_the_frame_limit_is_cut_into_frames_under_it(tmp_path: Path) -> None:
    # 3 records of 30 MiB: the first two share a frame (60 MiB, under the 64 MiB payload
    # limit), the third is a frame of its own (the chunk of one record, written as it was).
    big = [encode_put(lsn, f"k{lsn}", msgpack.packb(bytes([lsn]) * (30 << 20)))
           for lsn in (1, 2, 3)]
    assert write_batch(tmp_path / "log", big, 1) == 1
    frames = frames_of((tmp_path / "log").read_bytes())
    assert [[record[0] for record in frame] for frame in frames] == [[1, 2], [3]]
    assert frames[1][0][3] == msgpack.packb(bytes([3]) * (30 << 20))


def test_bytes_that_are_not_one_record_frames_are_written_as_they_are(tmp_path: Path) -> None:
    raw = [b"<not a frame>", encode_one_frame(b"\x01"), b"\xc1WBC"]
    fd = os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    pipe = Pipe(fd, 0)
    for lsn, data in enumerate(raw, 1):
        pipe.submit(data, lsn)
    assert pipe.wait(3, 10.0)[:2] == (3, 0)
    pipe.close()
    os.close(fd)
    assert (tmp_path / "log").read_bytes() == b"".join(raw)


KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    import wbcache
    cache = wbcache.open(sys.argv[1], flush_interval=3600)
    print(cache.put("acknowledged", 1), flush=True)  # its LSN
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_batch_torn_by_a_power_cut_is_a_torn_tail_not_corruption(tmp_path: Path) -> None:
    """A writer killed after one acknowledged put; then a batch of three records appended to
    its segment by the pipe (never acknowledged: the power goes during its write), its first
    bytes lost and the rest kept. Before: the next open refused the directory."""
    path = tmp_path / "cache"
    done = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == -9, done.stderr
    last_lsn = int(done.stdout)
    segment = Path(list_segments(str(path / "wal"))[-1].path)
    start = segment.stat().st_size
    records = [encode_put(lsn, f"unacknowledged{lsn}", msgpack.packb(lsn))
               for lsn in range(last_lsn + 1, last_lsn + 4)]
    write_batch(segment, records, last_lsn + 1)
    end = segment.stat().st_size
    with open(segment, "r+b") as torn:  # the write's first 20 bytes never reached the disk
        torn.seek(start)
        torn.write(bytes(20))
    with wbcache.open(path) as cache:
        assert cache.recovery.torn_bytes == end - start  # the whole batch, and only it
        assert cache.get("acknowledged") == 1
        assert all(cache.get(f"unacknowledged{lsn}") is None
                   for lsn in range(last_lsn + 1, last_lsn + 4))
