"""The mapped segment (fsync="interval", wal/writer.py): a put is a copy into a shared memory
map of the active segment, reserved a window (`_WINDOW`, 1 MiB) at a time.

What these tests prove, each against real files: a `kill -9` loses no acknowledged put, frames
that straddle a window boundary and segment rotations included, and the zeros reserved after
the last frame read as the clean end of the log; a segment is never shrunk, so a reader in
another process keeps its map across rotation and close; the fault-injection harness
replacing `SYSCALLS.write` retires the map for good, every byte after written over the
reserved zeros and seen by it; a file system that refuses the map gets the records written;
a forked child's exit leaves the parent's reservation (and so its map) alone; sync marks
copied through the map, one of them across a window boundary, are read back. The log is read
with the reader itself (`wbcache.wal.read_segment`), the files' sizes with `os.stat`.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import random
import select
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from log_bytes import segment_records

import wbcache
from wbcache.errors import LogFailedError
from wbcache.wal import SegmentEnd, list_segments
from wbcache.wal.format import MARK_MAGIC, decode_mark, encode_mark
from wbcache.wal.reader import intact_frames
from wbcache.wal.syscalls import SYSCALLS, Syscalls
from wbcache.wal.writer import _WINDOW, MAPPED_RECORD_LIMIT

REPO = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
MARK_BYTES = len(encode_mark(0))
# Neither the fsync interval nor the flush interval ever comes in these tests: what is on
# disk is what the put path and `sync()` wrote, nothing a timer did.
INTERVAL = {"fsync": "interval", "fsync_interval": 3600, "flush_interval": 3600}
CHILD_TIMEOUT = 60.0  # seconds; a child is expected to take well under one


def value(i: int, size: int) -> bytes:
    """The value of key i: the same bytes in every process (a child computes them too)."""
    return random.Random(i).randbytes(size)


def read_back(path: str | Path, first_lsn: int, *, is_last: bool) -> tuple[list[int], SegmentEnd]:
    """The LSNs of every record of the segment, and what the reader returned."""
    records, end = segment_records(path, first_lsn, is_last=is_last)
    return [record[0] for record in records], end


def child_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO))


# ------------------------------------------------------------------ kill -9

# Puts key k<i> = value(i, SIZES[i % len(SIZES)]) for i < count, then says "acknowledged"
# (unbuffered: only once the last put has returned) and blocks until it is killed.
WRITER = textwrap.dedent("""
    import os, random, sys, threading
    import wbcache
    path, segment_size, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    sizes = [int(size) for size in sys.argv[4].split(",")]
    cache = wbcache.open(path, fsync="interval", fsync_interval=3600, flush_interval=3600,
                         segment_size=segment_size)
    for i in range(count):
        cache.put(f"k{i}", random.Random(i).randbytes(sizes[i % len(sizes)]))
    os.write(1, b"acknowledged\\n")
    threading.Event().wait()
""")
# Values of 300 KiB make frames straddle the 1 MiB window boundaries; the others (an empty
# one included) leave frames at every kind of offset. 32 puts write about 3.2 MiB.
SIZES = [300 * 1024 + 7, 0, 1_000, 70_000, 13, 300 * 1024 - 5, 4_096, 150_000]
COUNT = 32


def straddling(path: str) -> list[int]:
    """LSNs of the frames of the segment that cross a window boundary (end past it)."""
    data = Path(path).read_bytes()
    return [lsns[0] for at, lsns, end in intact_frames(data, 0, len(data))
            if at // _WINDOW != (end - 1) // _WINDOW]


@pytest.mark.parametrize("segment_size", [64 * MiB, 3 * MiB // 2], ids=["one-segment",
                                                                        "rotating"])
def test_kill_9_loses_no_put_acknowledged_through_the_map(cache_dir: Path,
                                                         segment_size: int) -> None:
    """A process killed right after its last put returned (nothing fsync'd, nothing
    flushed) loses none of its puts: they were in the page cache through the map. Before the
    kill, the active segment is seen reserved past its last frame (the map was in use) and
    frames straddle a window boundary; after it, the reserved zeros read as the clean end."""
    child = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(cache_dir), str(segment_size), str(COUNT),
         ",".join(map(str, SIZES))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env())
    assert child.stdout is not None and child.stderr is not None
    try:
        ready, _, _ = select.select([child.stdout], [], [], CHILD_TIMEOUT)
        if not ready:  # stuck: killed, so that what it said can be read to its end
            child.kill()
        line = child.stdout.readline()
        assert line == b"acknowledged\n", (line, child.stderr.read().decode())
        # The child is alive, blocked, holding the map: what the files show now is its state.
        segments = list_segments(str(cache_dir / "wal"))
        if segment_size < 64 * MiB:
            assert len(segments) >= 2, "the log did not rotate"
        else:
            assert len(segments) == 1
        active = segments[-1]
        lsns, end = read_back(active.path, active.first_lsn, is_last=True)
        size = os.stat(active.path).st_size
        assert (end.damage, end.torn_bytes) == (None, 0)
        assert lsns and lsns[-1] == COUNT
        assert end.end < size <= end.end + _WINDOW  # reserved ahead: written through the map
        assert any(straddling(segment.path) for segment in segments)
        child.send_signal(signal.SIGKILL)
        assert child.wait(CHILD_TIMEOUT) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
        child.stderr.close()

    with wbcache.open(cache_dir, **INTERVAL) as cache:
        assert cache.recovery.torn_bytes == 0  # the zeros were no torn tail
        assert cache.recovery.replayed == COUNT
        wrong = [i for i in range(COUNT)
                 if cache.get(f"k{i}") != value(i, SIZES[i % len(SIZES)])]
        assert wrong == []


# ------------------------------------------------------------------ cut to size

# Maps a segment as `wbcache inspect` or `verify` would (read_segment), reads its first batch,
# says "mapped", waits for a line on stdin, then reads the rest and prints how many records.
READER = textwrap.dedent("""
    import sys
    from wbcache.wal import read_segment
    path, first_lsn = sys.argv[1], int(sys.argv[2])
    reading = read_segment(path, first_lsn=first_lsn, is_last=True)
    count = len(next(reading))
    print("mapped", flush=True)
    sys.stdin.readline()
    while True:
        try:
            count += len(next(reading))
        except StopIteration as stop:
            stop.value.check()
            break
    print(count, flush=True)
""")


def test_a_segment_is_never_shrunk_so_a_reader_mapping_it_outlives_rotation_and_close(
        open_cache: Callable[..., Any], cache_dir: Path) -> None:
    """Other processes map segments while the cache writes (`wbcache inspect`, `verify`, `get`);
    a file shrunk under such a map is a SIGBUS in that process. So the reserved zeros stay when
    a segment is rotated or closed (at most one window of them), and read as its clean end."""
    cache = open_cache(segment_size=64 * 1024, **INTERVAL)
    for i in range(12):
        cache.put(f"k{i}", value(i, 20_000))
    segments = list_segments(str(cache_dir / "wal"))
    assert len(segments) >= 3
    read: list[int] = []
    for segment in segments[:-1]:  # rotated away from
        lsns, end = read_back(segment.path, segment.first_lsn, is_last=False)
        read += lsns
        data = Path(segment.path).read_bytes()
        assert (end.torn_bytes, end.damage) == (0, None) and not any(data[end.end:])
        assert 0 < len(data) - end.end <= 64 * 1024  # reserved, never cut: one window at most
    active = segments[-1]
    lsns, end = read_back(active.path, active.first_lsn, is_last=True)
    assert read + lsns == list(range(1, 13))
    assert os.stat(active.path).st_size > end.end  # reserved ahead
    sizes = {segment.path: os.stat(segment.path).st_size for segment in segments}

    reader = subprocess.Popen([sys.executable, "-c", READER, active.path,
                               str(active.first_lsn)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, env=child_env())
    assert reader.stdout is not None and reader.stdout.readline() == b"mapped\n"
    cache.close()  # its fsync, mark and unmap happen under the reader's map
    out, _ = reader.communicate(b"go\n", timeout=CHILD_TIMEOUT)
    assert reader.returncode == 0, f"the reader died: {reader.returncode}"  # -7: SIGBUS
    assert int(out) == len(lsns)

    for segment in list_segments(str(cache_dir / "wal")):  # close flushed the others away
        assert os.stat(segment.path).st_size == sizes[segment.path]
        _, end = read_back(segment.path, segment.first_lsn, is_last=True)
        assert (end.torn_bytes, end.damage) == (0, None)
        # the active segment ends in the mark of close's fsync, which covers all before it
        assert end.synced_to == end.end - MARK_BYTES
    reopened = open_cache(**INTERVAL)
    assert [reopened.get(f"k{i}") == value(i, 20_000) for i in range(12)] == [True] * 12


# ------------------------------------------------------------------ the harness retires it

def test_the_harness_replacing_write_retires_the_map_for_good(
        open_cache: Callable[..., Any], cache_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Once `SYSCALLS.write` is replaced, each record reaches the file through it, written
    right after the mapped frames, over the reserved zeros (not after them); the map stays
    retired once the harness is gone; the segment reads back whole."""
    cache = open_cache(**INTERVAL)
    for i in range(5):
        cache.put(f"k{i}", value(i, 1_000))
    (segment,) = list_segments(str(cache_dir / "wal"))
    lsns, end = read_back(segment.path, 1, is_last=True)
    mapped_end = end.end
    assert lsns == [1, 2, 3, 4, 5] and os.stat(segment.path).st_size > mapped_end  # reserved

    reserved = os.stat(segment.path).st_size
    writes: list[tuple[str, int, bytes]] = []  # (file, the offset written at, bytes)

    def recording_write(fd: int, data: bytes) -> int:
        writes.append((os.readlink(f"/proc/self/fd/{fd}"), os.lseek(fd, 0, os.SEEK_CUR),
                       bytes(data)))
        return os.write(fd, data)
    # As the harness does, on the instance; through its __dict__, so that undoing it leaves
    # the class's own `write` showing again (not a copy of it on the instance).
    monkeypatch.setitem(vars(SYSCALLS), "write", recording_write)
    for i in range(5, 10):
        cache.put(f"k{i}", value(i, 1_000))
        assert any(value(i, 1_000) in data for _, _, data in writes), f"k{i} not seen"
    assert {path for path, _, _ in writes} == {segment.path}
    assert writes[0][1] == mapped_end  # where the map had got to, not the file's end
    for (_, before, data), (_, after, _) in zip(writes[:-1], writes[1:], strict=True):
        assert after == before + len(data)  # each right after the one before
    written = b"".join(data for _, _, data in writes)
    assert os.stat(segment.path).st_size == reserved  # over the zeros: nothing added

    monkeypatch.undo()  # the harness is gone: the map is not taken up again
    assert "write" not in vars(SYSCALLS) and SYSCALLS.write is os.write
    fd = cache._sequencer._committer._writer._fd
    for i in range(10, 13):
        cache.put(f"k{i}", value(i, 1_000))
        _, end = read_back(segment.path, 1, is_last=True)
        assert os.lseek(fd, 0, os.SEEK_CUR) == end.end  # written: the offset moved with it

    cache.close()
    data = Path(segment.path).read_bytes()
    assert data[mapped_end:mapped_end + len(written)] == written
    lsns, end = read_back(segment.path, 1, is_last=True)
    assert lsns == list(range(1, 14))
    assert (end.torn_bytes, end.damage) == (0, None) and not any(data[end.end:])
    reopened = open_cache(**INTERVAL)
    assert [reopened.get(f"k{i}") == value(i, 1_000) for i in range(13)] == [True] * 13


def test_a_mark_after_the_harness_replaced_write_is_seen_by_it(
        open_cache: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A sync with no put since the harness replaced `write` retires the map too: its mark
    goes through the harness's `write`, not into the map behind its back."""
    cache = open_cache(**INTERVAL)
    cache.put("a", value(0, 100))
    seen: list[bytes] = []

    def recording_write(fd: int, data: bytes) -> int:
        seen.append(bytes(data))
        return os.write(fd, data)
    monkeypatch.setitem(vars(SYSCALLS), "write", recording_write)
    cache.sync()
    assert any(MARK_MAGIC in data for data in seen), "the mark went through the map"


# ------------------------------------------------------------------ fork

# Opens an interval cache, puts, forks a child that exits at once (0 if its at-fork hooks
# disowned the cache), then puts on, first into the window mapped before the fork (a file
# shrunk by the child would be SIGBUS there), then past it. Reports sizes as JSON.
FORKER = textwrap.dedent("""
    import json, os, random, sys
    import wbcache
    from wbcache.wal import list_segments, read_segment
    from wbcache.wal.reader import drain
    path = sys.argv[1]
    cache = wbcache.open(path, fsync="interval", fsync_interval=3600, flush_interval=3600)
    for i in range(3):
        cache.put(f"before{i}", random.Random(i).randbytes(10_000))
    (segment,) = list_segments(os.path.join(path, "wal"))
    written = drain(read_segment(segment.path, first_lsn=1, is_last=True)).end
    before = os.stat(segment.path).st_size
    pid = os.fork()
    if pid == 0:
        os._exit(0 if cache.closed else 1)  # never back into this script's code
    _, status = os.waitpid(pid, 0)
    after_child = os.stat(segment.path).st_size
    cache.put("after0", random.Random(100).randbytes(10_000))
    for i in range(1, 5):
        cache.put(f"after{i}", random.Random(100 + i).randbytes(300_000))
    cache.close()
    print(json.dumps({"written": written, "before": before, "after_child": after_child,
                      "child_status": status}))
""")


def test_a_forked_child_exiting_leaves_the_parents_map_be(cache_dir: Path) -> None:
    """A child forked from a process with an open interval cache, exiting at once, does not
    cut the parent's active segment (its reserved zeros are the parent's map): the file size
    is what it was, and the parent's later puts, into that window and past it, all land
    (run in a subprocess: were the file cut, the parent would die of SIGBUS)."""
    done = subprocess.run([sys.executable, "-c", FORKER, str(cache_dir)], capture_output=True,
                          text=True, env=child_env(), timeout=CHILD_TIMEOUT)
    assert done.returncode != -signal.SIGBUS, "the parent's map write hit a cut file"
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert os.WIFEXITED(report["child_status"]) and os.WEXITSTATUS(report["child_status"]) == 0
    assert report["before"] > report["written"]  # reserved: there was something to cut
    assert report["after_child"] == report["before"]
    with wbcache.open(cache_dir, **INTERVAL) as cache:
        assert [cache.get(f"before{i}") == value(i, 10_000) for i in range(3)] == [True] * 3
        assert cache.get("after0") == value(100, 10_000)
        assert [cache.get(f"after{i}") == value(100 + i, 300_000)
                for i in range(1, 5)] == [True] * 4


# ------------------------------------------------------------------ sync marks

def test_sync_marks_written_through_the_map_are_read_back(open_cache: Callable[..., Any],
                                                          cache_dir: Path) -> None:
    """`sync()` marks how far the segment is fsync'd, the mark copied through the map like
    the puts after it; a second mark, placed across the first window boundary, is read back
    too, and the reader's `synced_to` is what it says: every byte before it."""
    cache = open_cache(**INTERVAL)
    (segment,) = list_segments(str(cache_dir / "wal"))

    def written() -> int:
        lsns, end = read_back(segment.path, 1, is_last=True)
        assert (end.damage, end.torn_bytes) == (None, 0)
        return end.end

    expected: dict[str, bytes] = {}

    def put(size: int) -> None:
        key = f"k{len(expected):03d}"  # one length: each put costs the same overhead
        expected[key] = b"v" * size  # no byte 0xC1: a mark's magic is found only in marks
        cache.put(key, expected[key])

    for _ in range(3):
        put(100)
    cache.sync()
    first = written() - MARK_BYTES
    # Then puts up to 10 bytes short of the window's end, so that the next mark straddles it.
    # A put of n bytes (256 <= n < 64 KiB, LSN < 128) costs n + overhead: measured.
    before = written()
    put(50_000)
    overhead = written() - before - 50_000
    target = _WINDOW - 10
    while target - written() - overhead > 61_000:
        put(50_000)
    put(target - written() - overhead)
    assert written() == target, "the padding did not land where the mark must straddle"
    assert os.stat(segment.path).st_size == _WINDOW  # the map's first window, reserved
    cache.sync()

    data = Path(segment.path).read_bytes()
    marks = []
    at = data.find(MARK_MAGIC)
    while at != -1:
        marks.append((at, decode_mark(data, at, len(data))))
        at = data.find(MARK_MAGIC, at + 1)
    assert marks == [(first, (first, first + MARK_BYTES)),
                     (target, (target, target + MARK_BYTES))]
    lsns, end = read_back(segment.path, 1, is_last=True)
    assert lsns == list(range(1, len(expected) + 1))
    assert end.synced_to == target and end.end == target + MARK_BYTES
    # The mark's bytes past the boundary had the next window reserved (copied through the
    # map, not written); its zeros read as the clean end.
    assert len(data) > _WINDOW and len(data) > end.end
    cache.close()
    reopened = open_cache(**INTERVAL)
    assert [key for key, held in expected.items() if reopened.get(key) != held] == []


# ------------------------------------------------------------------ limits

def test_a_large_record_is_written_by_a_leader_not_copied_under_the_lock(
        open_cache: Callable[..., Any]) -> None:
    """A record up to MAPPED_RECORD_LIMIT is copied into the map at once (no batch is led); a
    larger one is queued and written by a leader with the sequencer's lock released, so that
    a 64 MiB copy never stalls the other writers."""
    cache = open_cache(**INTERVAL)
    committer = cache._sequencer._committer
    batches = committer.batches
    cache.put("small", value(0, MAPPED_RECORD_LIMIT - 100))
    assert committer.batches == batches
    cache.put("large", value(1, MAPPED_RECORD_LIMIT + 1))
    assert committer.batches == batches + 1
    cache.put("small again", value(2, 10))  # the map again
    assert committer.batches == batches + 1
    cache.close()
    reopened = open_cache(**INTERVAL)
    assert reopened.get("small") == value(0, MAPPED_RECORD_LIMIT - 100)
    assert reopened.get("large") == value(1, MAPPED_RECORD_LIMIT + 1)
    assert reopened.get("small again") == value(2, 10)


def test_no_room_for_the_next_window_fails_the_log_and_keeps_what_was_acknowledged(
        open_cache: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """The next window cannot be reserved (a full disk): that put fails, the log is failed
    for good (writes refused, as after any I/O error), and every put acknowledged before it
    is there after a reopen."""
    reserved: list[int] = []

    def no_space(fd: int, start: int, end: int) -> None:
        if reserved:
            raise OSError(errno.ENOSPC, "injected: no space for the next window")
        reserved.append(end)
        Syscalls.reserve(fd, start, end)
    monkeypatch.setitem(vars(SYSCALLS), "reserve", no_space)
    cache = open_cache(**INTERVAL)
    acknowledged = 0
    with pytest.raises(LogFailedError, match="no space for the next window"):
        while True:
            cache.put(f"k{acknowledged}", value(acknowledged, 10_000))
            acknowledged += 1
    assert reserved == [_WINDOW] and acknowledged >= _WINDOW // 10_100  # up to its end
    with pytest.raises(LogFailedError):
        cache.put("later", 1)
    cache.close()
    monkeypatch.undo()
    reopened = open_cache(**INTERVAL)
    assert [reopened.get(f"k{i}") == value(i, 10_000) for i in range(acknowledged)] == \
        [True] * acknowledged
    assert reopened.get("later") is None


def test_a_file_system_refusing_the_map_gets_the_records_written(
        open_cache: Callable[..., Any], cache_dir: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """FUSE with direct_io refuses a shared writable map (ENODEV): the segment is then
    written as under a retired map, from its start, and nothing else changes."""
    from wbcache.wal import writer as writer_module

    def refused(*args: Any, **kwargs: Any) -> mmap.mmap:
        raise OSError(errno.ENODEV, "No such device")
    monkeypatch.setattr(writer_module.mmap, "mmap", refused)
    cache = open_cache(**INTERVAL)
    assert "the log is written, not mapped" in caplog.text
    fd = cache._sequencer._committer._writer._fd
    for i in range(5):
        cache.put(f"k{i}", value(i, 1_000))
    monkeypatch.undo()  # the reader maps files too; the writer stays retired
    (segment,) = list_segments(str(cache_dir / "wal"))
    lsns, end = read_back(segment.path, 1, is_last=True)
    assert lsns == [1, 2, 3, 4, 5] and os.lseek(fd, 0, os.SEEK_CUR) == end.end  # written
    cache.put("k5", value(5, 1_000))
    assert os.lseek(fd, 0, os.SEEK_CUR) > end.end
    cache.close()
    reopened = open_cache(**INTERVAL)
    assert [reopened.get(f"k{i}") == value(i, 1_000) for i in range(6)] == [True] * 6


def test_a_full_disk_at_open_names_the_segment_it_could_not_reserve(
        cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fallocate's ENOSPC carried no file name: opening an fsync="interval" cache on a full
    disk said only "[Errno 28] No space left on device" (an outside hunt)."""
    def full(fd: int, start: int, end: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(SYSCALLS, "reserve", full)
    with pytest.raises(OSError) as refused:
        wbcache.open(cache_dir, fsync="interval")
    assert refused.value.errno == errno.ENOSPC
    assert refused.value.filename == str(cache_dir / "wal" / "00000000000000000001.log")
    monkeypatch.undo()
    with wbcache.open(cache_dir, fsync="interval") as cache:  # room again: it opens
        cache.put("a", 1)
