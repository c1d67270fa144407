"""The group commit without the GIL (wal/_pipe.c): a thread of its own writes the log.

Under fsync="always" (and no fault-injection harness), records go to `Pipe`, whose POSIX
thread writes and fdatasyncs them in batches and publishes how far the log is durable. What
these tests hold it to: every byte in LSN order, nothing durable before its fdatasync returned
(the order of the calls is read from strace in tests/test_wal_sync.py, which runs this path),
a failure sticky and refusing writes, segments rotated with nothing in flight, the harness
seeing every call once it replaces one, and an event loop woken through an eventfd with no
thread of ours taking the GIL in between. Kills (tests/test_fault_kill.py) and power cuts of
the default configuration run it too.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from pathlib import Path

import pytest
from built_support import assert_fast_path

import wbcache
from wbcache.errors import LogFailedError
from wbcache.wal import commit as commit_module
from wbcache.wal.syscalls import SYSCALLS

Pipe = commit_module.Pipe
needs_pipe = pytest.mark.skipif(Pipe is None, reason="covered by test_the_pipe_module_is_built")


def test_the_pipe_module_is_built() -> None:
    assert_fast_path(Pipe, "wbcache.wal._pipe", "wal/_pipe.c",
                     "the group commit's leader takes the GIL back between batches")


@needs_pipe
def test_every_byte_reaches_the_file_in_order_from_many_threads(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    pipe = Pipe(fd, 0)
    order = threading.Lock()  # the sequencer's lock: LSNs handed over in order
    next_lsn = 1
    expected: list[bytes] = []

    def writer(name: int) -> None:
        nonlocal next_lsn
        for i in range(500):
            with order:
                lsn = next_lsn
                next_lsn += 1
                data = f"<{name}:{i}:{lsn}>".encode() * (1 + i % 7)
                expected.append(data)
                pipe.submit(data, lsn)
            durable, error, _ = pipe.wait(lsn, 10.0)
            assert error == 0 and durable >= lsn

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    durable, error, batches = pipe.wait(4000, 10.0)
    pipe.close()
    os.close(fd)
    assert (durable, error) == (4000, 0)
    assert 0 < batches <= 4000
    assert (tmp_path / "log").read_bytes() == b"".join(expected)


@needs_pipe
def test_a_failed_write_is_sticky(tmp_path: Path) -> None:
    (tmp_path / "log").write_bytes(b"")
    fd = os.open(tmp_path / "log", os.O_RDONLY)  # every write fails with EBADF
    pipe = Pipe(fd, 7)
    pipe.submit(b"record", 8)
    assert pipe.wait(8, 10.0)[:2] == (7, errno.EBADF)  # not durable, and why
    with pytest.raises(OSError) as raised:
        pipe.submit(b"more", 9)
    assert raised.value.errno == errno.EBADF
    assert pipe.wait(9, 10.0)[:2] == (7, errno.EBADF)  # at once, not after the timeout
    pipe.close()
    os.close(fd)


@needs_pipe
def test_a_cache_whose_log_fails_refuses_writes_and_keeps_the_acknowledged(
        tmp_path: Path) -> None:
    """The segment's descriptor starts pointing at /dev/full under the pipe's thread: its
    next write fails with ENOSPC. The put is not acknowledged, the cache refuses writes until
    reopened, and every write acknowledged before is there after it."""
    cache = wbcache.open(tmp_path / "c")
    committer = cache._sequencer._committer
    assert committer._pipe is not None
    for i in range(20):
        cache.put(f"k{i}", i)
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, committer._writer.fd)
    os.close(full)
    with pytest.raises(LogFailedError, match="No space left"):
        cache.put("lost", 1)
    with pytest.raises(LogFailedError):
        cache.put("refused", 2)
    assert committer.durable_lsn == 20
    cache.close()
    with wbcache.open(tmp_path / "c") as reopened:
        assert [reopened.get(f"k{i}") for i in range(20)] == list(range(20))
        assert reopened.get("refused") is None


@needs_pipe
def test_segments_rotate_under_many_writers_and_every_write_is_reopened(
        tmp_path: Path) -> None:
    cache = wbcache.open(tmp_path / "c", segment_size=4096)
    writer = cache._sequencer._committer._writer
    assert cache._sequencer._committer._pipe is not None
    rotated: list[int] = []
    rotate = writer.rotate_to

    def counting(first_lsn: int) -> None:
        rotated.append(first_lsn)
        rotate(first_lsn)
    writer.rotate_to = counting  # type: ignore[method-assign]

    def put(name: int) -> None:
        for i in range(300):
            cache.put(f"{name}:{i}", "v" * (i % 50))

    threads = [threading.Thread(target=put, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(rotated) > 10 and rotated == sorted(set(rotated))
    cache.close()
    with wbcache.open(tmp_path / "c") as reopened:
        assert all(reopened.get(f"{n}:{i}") == "v" * (i % 50)
                   for n in range(8) for i in range(300))


@needs_pipe
def test_the_harness_replacing_a_call_after_open_sees_every_call_from_then_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = wbcache.open(tmp_path / "c")
    committer = cache._sequencer._committer
    cache.put("piped", 1)
    assert committer._pipe is not None
    segment = committer._writer.fd
    seen: list[int] = []

    def fdatasync(fd: int) -> None:
        if fd == segment:
            seen.append(fd)
        os.fdatasync(fd)
    monkeypatch.setattr(SYSCALLS, "fdatasync", fdatasync, raising=False)
    cache.put("seen", 2)
    assert committer._pipe is None and seen == [segment]
    cache.put("seen too", 3)
    assert seen == [segment, segment]
    cache.close()
    with wbcache.open(tmp_path / "c") as reopened:
        assert (reopened.get("piped"), reopened.get("seen"), reopened.get("seen too")) == (1, 2, 3)


@needs_pipe
def test_an_event_loop_is_woken_by_the_pipe_with_no_commit_thread(tmp_path: Path) -> None:
    async def body() -> tuple[int, int, list[str]]:
        cache = await wbcache.open_async(tmp_path / "c")
        woken = 0
        on_pipe = cache._on_pipe

        def counting() -> None:
            nonlocal woken
            woken += 1
            on_pipe()
        cache._loop.remove_reader(cache._notify_fd)
        cache._loop.add_reader(cache._notify_fd, counting)
        results = await asyncio.gather(*(cache.put(f"k{i}", i) for i in range(500)))
        assert results == list(range(1, 501))
        names = [thread.name for thread in threading.enumerate()]
        batches = (await cache.stats())["log_batches"]
        fd = cache._notify_fd
        await cache.close()
        with pytest.raises(OSError):
            os.fstat(fd)  # closed with the cache
        return woken, batches, names

    woken, batches, names = asyncio.run(body())
    assert "wbcache-commit" not in names  # no thread of ours between the disk and the loop
    assert 0 < woken <= batches
    with wbcache.open(tmp_path / "c") as reopened:
        assert [reopened.get(f"k{i}") for i in range(500)] == list(range(500))


@needs_pipe
def test_fsync_interval_and_the_harness_at_open_commit_in_python(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with wbcache.open(tmp_path / "a", fsync="interval") as cache:
        assert cache._sequencer._committer._pipe is None
    written: list[int] = []

    def write(fd: int, data: bytes) -> int:
        written.append(fd)
        return os.write(fd, data)
    monkeypatch.setattr(SYSCALLS, "write", write, raising=False)
    with wbcache.open(tmp_path / "b") as cache:
        assert cache._sequencer._committer._pipe is None
        cache.put("k", 1)
        assert cache._sequencer._committer._writer.fd in written
    with wbcache.open(tmp_path / "b") as cache:
        assert cache.get("k") == 1
