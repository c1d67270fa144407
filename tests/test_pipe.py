"""The group commit without the GIL (wal/_pipe.c).

Under fsync="always" (and no fault-injection harness), records go to `Pipe`: a writer waiting
for its record that finds no batch in flight writes and fdatasyncs everything handed over
itself, GIL released; otherwise its POSIX thread does, the moment the batch in flight ends.
What these tests hold it to: every byte in LSN order, nothing acknowledged before its
fdatasync returned (read from strace over four writer threads, here), a failure sticky and
refusing writes, segments rotated with nothing in flight and nobody admitted meanwhile, the
harness seeing every call once it replaces one, waiters woken by their batch (not the
backstop), and an event loop woken through an eventfd with no thread of ours taking the GIL
in between. Kills of the default configuration (tests/test_fault_kill.py) and the LazyFS
campaigns' fsync="always" cycles run it too (their worker leaves the log's fdatasyncs alone
there); the power-loss recorder and the I/O-error sweep replace calls, so they run the group
commit in Python (wal/commit.py). Over 500 lines: the pipe's every hand-over (writers, its
thread, an event loop, rotation, the harness, fork) sits beside the others, on one set of
helpers. Its batches written as one frame: tests/test_pipe_frames.py.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from built_support import assert_fast_path
from controlled import wait_until

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
    started = time.monotonic()
    assert pipe.wait(9, 30.0)[:2] == (7, errno.EBADF)
    assert time.monotonic() - started < 10.0  # at once, not after the timeout
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

    def counting(first_lsn: int, switch: Any) -> None:
        rotated.append(first_lsn)
        rotate(first_lsn, switch)
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


@needs_pipe
@pytest.mark.parametrize("writers", [1, 8])
def test_writers_are_woken_by_their_batch_not_by_the_backstop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writers: int) -> None:
    """Each put returns when the fdatasync covering it does, whoever led it (the writer
    itself, another, the pipe's thread): a waiter asleep on the wrong batch's condition
    would only wake at the backstop, set here to 30 s (a slow disk takes far less than the
    10 s allowed)."""
    monkeypatch.setattr(commit_module, "FOLLOWER_RECHECK", 30.0)
    slow: list[str] = []
    with wbcache.open(tmp_path / "c") as cache:
        def put(name: int) -> None:
            for i in range(40):
                started = time.monotonic()
                cache.put(f"{name}:{i}", i)
                if time.monotonic() - started > 10.0:
                    slow.append(f"{name}:{i}")
                    return

        threads = [threading.Thread(target=put, args=(n,)) for n in range(writers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert slow == [], f"puts that waited for the backstop: {slow}"


@needs_pipe
def test_a_waiter_is_woken_by_the_batch_the_thread_leads_for_it(tmp_path: Path) -> None:
    """A record handed over and kicked (as asyncio does) is led by the pipe's thread; a writer
    then waiting for it sleeps until that batch ends, and its end must wake it, not the
    backstop (the timeout, 30 s here). 16 MiB makes the batch outlast the look at it."""
    fd = os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    pipe = Pipe(fd, 0)
    pipe.submit(b"x" * (16 << 20), 1)
    pipe.kick()
    wait_until(lambda: pipe.in_flight() == 1 or pipe.poll()[0] == 1,
               what="the thread leading the batch")
    assert pipe.in_flight() == 1, "the batch ended before it could be waited for"
    started = time.monotonic()
    assert pipe.wait(1, 30.0)[:2] == (1, 0)
    assert time.monotonic() - started < 10.0, "woken by the backstop, not by its batch"
    pipe.close()
    os.close(fd)


@needs_pipe
def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT, 0o600)
    pipe = Pipe(fd, 0)
    for timeout in (-1.0, float("nan"), 1e9):
        with pytest.raises(ValueError):
            pipe.wait(1, timeout)
    for bad in (-2, 1 << 40):
        with pytest.raises(ValueError):
            pipe.set_fd(bad)
    with pytest.raises(TypeError):
        pipe.submit("not bytes", 1)
    pipe.close()
    pipe.close()  # twice is fine
    with pytest.raises(ValueError):
        pipe.submit(b"late", 1)
    os.close(fd)


@needs_pipe
def test_every_waiting_task_gets_the_failure(tmp_path: Path) -> None:
    async def body() -> list[BaseException | int]:
        cache = await wbcache.open_async(tmp_path / "c")
        await cache.put("before", 0)
        full = os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, cache.cache._sequencer._committer._writer.fd)
        os.close(full)
        results = await asyncio.wait_for(
            asyncio.gather(*(cache.put(f"k{i}", i) for i in range(200)),
                           return_exceptions=True), 30)
        await cache.close()
        return results

    results = asyncio.run(body())
    assert all(isinstance(result, LogFailedError) for result in results), results[:3]
    with wbcache.open(tmp_path / "c") as reopened:
        assert reopened.get("before") == 0


@needs_pipe
def test_the_harness_arriving_while_threads_write_retires_the_pipe_under_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = wbcache.open(tmp_path / "c")
    committer = cache._sequencer._committer
    started = threading.Barrier(9)
    errors: list[BaseException] = []

    def put(name: int) -> None:
        try:
            for i in range(400):
                cache.put(f"{name}:{i}", i)
                if i == 50:
                    started.wait()
        except BaseException as error:  # noqa: BLE001 - reported by the assert below
            errors.append(error)

    threads = [threading.Thread(target=put, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    started.wait()  # every writer has put 51 through the pipe, and goes on
    seen: list[int] = []

    def fdatasync(fd: int) -> None:
        seen.append(fd)
        os.fdatasync(fd)
    monkeypatch.setattr(SYSCALLS, "fdatasync", fdatasync, raising=False)
    for thread in threads:
        thread.join()
    assert errors == [] and committer._pipe is None and seen
    cache.close()
    with wbcache.open(tmp_path / "c") as reopened:
        assert all(reopened.get(f"{n}:{i}") == i for n in range(8) for i in range(400))


@needs_pipe
def test_an_event_loop_goes_on_when_the_harness_retires_the_pipe(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    problems: list[dict[str, object]] = []

    async def body() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, context:
                                                         problems.append(context))
        cache = await wbcache.open_async(tmp_path / "c")
        await asyncio.gather(*(cache.put(f"a{i}", i) for i in range(300)))
        monkeypatch.setattr(SYSCALLS, "write", _counted_write, raising=False)
        await asyncio.gather(*(cache.put(f"b{i}", i) for i in range(300)))
        assert cache.cache._sequencer._committer._pipe is None
        await cache.close()

    asyncio.run(body())
    assert problems == []
    with wbcache.open(tmp_path / "c") as reopened:
        assert all(reopened.get(f"{p}{i}") == i for p in "ab" for i in range(300))


def _counted_write(fd: int, data: bytes) -> int:
    return os.write(fd, data)


@needs_pipe
def test_an_event_loop_leaves_a_segment_rotation_to_a_worker_thread(tmp_path: Path) -> None:
    """Starting the next segment waits for the batch in flight: the loop never does it."""
    rotated_in: list[int] = []

    async def body() -> int:
        cache = await wbcache.open_async(tmp_path / "c", segment_size=4096)
        writer = cache.cache._sequencer._committer._writer
        rotate = writer.rotate_to

        def spying(first_lsn: int, switch: Any) -> None:
            rotated_in.append(threading.get_ident())
            rotate(first_lsn, switch)
        writer.rotate_to = spying  # type: ignore[method-assign]
        for round_ in range(10):
            await asyncio.gather(*(cache.put(f"{round_}:{i}", "v" * 40) for i in range(100)))
        await cache.close()
        return threading.get_ident()

    loop_thread = asyncio.run(body())
    assert len(rotated_in) > 5 and loop_thread not in rotated_in
    with wbcache.open(tmp_path / "c") as reopened:
        assert all(reopened.get(f"{r}:{i}") == "v" * 40 for r in range(10) for i in range(100))


@needs_pipe
def test_a_forked_child_closes_its_copy_of_the_event_loops_eventfd(tmp_path: Path) -> None:
    async def body() -> int:
        cache = await wbcache.open_async(tmp_path / "c")
        await cache.put("k", 1)
        fd = cache._notify_fd
        pid = os.fork()
        if pid == 0:  # the child: its copy of the eventfd is closed, the cache refused
            code = 0
            try:
                os.fstat(fd)
                code = 1
            except OSError:
                pass
            try:
                cache.cache.put("child", 1)
                code = 2
            except wbcache.ForkedCacheError:
                pass
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        await cache.put("after", 2)  # the parent's pipe and eventfd go on
        await cache.close()
        return os.waitstatus_to_exitcode(status)

    assert asyncio.run(body()) == 0
    with wbcache.open(tmp_path / "c") as reopened:
        assert (reopened.get("k"), reopened.get("after"), reopened.get("child")) == (1, 2, None)


STRACE = shutil.which("strace")

THREADED_CHILD = """
import os, sys, threading, wbcache
cache = wbcache.open(sys.argv[1])
def put(n):
    for i in range(25):
        key = f"<t{n}k{i}>"
        cache.put(key, "v")
        os.access(f"/wbcache-ack-{key}", os.F_OK)  # the mark of its acknowledgement
threads = [threading.Thread(target=put, args=(n,)) for n in range(4)]
for thread in threads: thread.start()
for thread in threads: thread.join()
cache.close()
"""


@needs_pipe
@pytest.mark.skipif(STRACE is None, reason="strace is not installed (.ci/run installs it)")
def test_strace_sees_each_record_written_then_fdatasynced_before_its_acknowledgement(
        tmp_path: Path) -> None:
    """4 writer threads, the pipe's thread batching their records: for every acknowledged
    key, the write that carried it returned before an fdatasync of its segment began, and that
    fdatasync returned before the acknowledgement (a pipe publishing what was handed over
    instead of what it wrote, or before its fdatasync, fails this)."""
    trace = tmp_path / "trace"
    subprocess.run([STRACE or "strace", "-f", "-qq", "-s", "1000000",
                    "-e", "trace=openat,write,fdatasync,access",
                    "-o", str(trace), sys.executable, "-c", THREADED_CHILD,
                    str(tmp_path / "c")], check=True, timeout=120)
    segments: set[str] = set()
    writes: list[tuple[int, str, str]] = []  # (line returned, fd, what it wrote)
    syncs: list[tuple[int, int, str]] = []  # (line begun, line returned, fd)
    acks: dict[str, int] = {}
    pending: dict[tuple[str, str], tuple[int, str]] = {}
    for number, line in enumerate(trace.read_text().splitlines()):
        pid, _, rest = line.strip().partition(" ")
        rest = rest.strip()
        resumed = re.match(r"<\.\.\. (\w+) resumed>.*= (-?\d+)", rest)
        if resumed:
            call, result = resumed.groups()
            began, args = pending.pop((pid, call))
        else:
            called = re.match(r"(\w+)\((.*)", rest)
            if called is None:
                continue
            call, args = called.groups()
            if rest.endswith("<unfinished ...>"):
                pending[(pid, call)] = (number, args)
                continue
            began, result = number, rest.rsplit("= ", 1)[-1].split()[0]
        fd = re.match(r"\w*", args).group()  # type: ignore[union-attr]  # (AT_FDCWD, ...)
        if call == "openat" and "/wal/" in args and int(result) >= 0:
            segments.add(result)
        elif call == "write" and fd in segments and int(result) > 0:
            writes.append((number, fd, args))
        elif call == "fdatasync" and fd in segments and result == "0":
            syncs.append((began, number, fd))
        elif call == "access" and "wbcache-ack-" in args:
            acks[args.split("wbcache-ack-")[1].split('"')[0]] = began
    assert len(acks) == 100
    for key, acked in acks.items():
        carried = [(done, fd) for done, fd, data in writes if key in data]
        assert carried, f"{key}: acknowledged at trace line {acked + 1}, never written"
        written, fd = carried[0]
        assert written < acked and any(
            written < began and done < acked and sync_fd == fd
            for began, done, sync_fd in syncs), (
            f"{key}: written at trace line {written + 1}, acknowledged at {acked + 1} with no "
            f"fdatasync of its segment between the two")


@needs_pipe
def test_a_writer_arriving_while_a_segment_is_started_waits_for_the_pipe_to_have_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The new segment exists (the writer's state says it has room) before the rotation is
    over: a writer admitted in between could hand the pipe a record before it has the new
    descriptor, into the old segment. It is woken by the rotation's end, not the backstop."""
    monkeypatch.setattr(commit_module, "FOLLOWER_RECHECK", 30.0)
    cache = wbcache.open(tmp_path / "c", segment_size=4096)
    committer = cache._sequencer._committer
    writer = committer._writer
    rotate = writer.rotate_to
    late: list[BaseException | int] = []

    def put_late() -> None:
        try:
            late.append(cache.put("late", 1))
        except BaseException as error:  # noqa: BLE001 - asserted below
            late.append(error)

    def rotating(first_lsn: int, switch: Any) -> None:
        rotate(first_lsn, switch)  # the new segment is there; the lock is not yet retaken
        other = threading.Thread(target=put_late)
        other.start()
        wait_until(lambda: len(committer._rotated._waiters) == 1,  # type: ignore[attr-defined]
                   what="the late writer waiting for the rotation")
        assert late == []
        rotating.other = other  # type: ignore[attr-defined]
    writer.rotate_to = rotating  # type: ignore[method-assign]
    i = 0
    while not hasattr(rotating, "other"):
        cache.put(f"k{i}", "v" * 100)
        i += 1
    rotating.other.join(10)  # type: ignore[attr-defined]
    assert not rotating.other.is_alive(), "the rotation's end did not wake its waiter"  # type: ignore[attr-defined]
    assert len(late) == 1 and isinstance(late[0], int)
    cache.close()
    with wbcache.open(tmp_path / "c") as reopened:
        assert reopened.get("late") == 1 and reopened.get(f"k{i - 1}") == "v" * 100


def _fill_until_rotation(cache: Any, rotations: list[int]) -> int:
    """Put until a rotation has begun (`rotations` grows); the puts done."""
    i = 0
    while not rotations:
        cache.put(f"k{i}", "v" * 100)
        i += 1
    return i


@needs_pipe
def test_a_segment_that_cannot_be_created_fails_the_log_and_keeps_what_was_acknowledged(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from wbcache.wal import writer as writer_module
    cache = wbcache.open(tmp_path / "c", segment_size=4096)
    tried: list[int] = []

    def no_space(wal_dir: str, first_lsn: int, header: bytes, *,
                 mappable: bool = False) -> tuple[int, str]:
        tried.append(first_lsn)
        raise OSError(errno.ENOSPC, "injected: no space for a new segment")
    monkeypatch.setattr(writer_module, "create_segment", no_space)
    with pytest.raises(LogFailedError, match="no space for a new segment"):
        _fill_until_rotation(cache, tried)
    acknowledged = tried[0] - 1
    with pytest.raises(LogFailedError):
        cache.put("refused", 1)
    monkeypatch.undo()
    cache.close()
    with wbcache.open(tmp_path / "c") as reopened:
        assert all(reopened.get(f"k{i}") == "v" * 100 for i in range(acknowledged))
        assert reopened.get("refused") is None


class _FailingDrain:
    """A pipe whose wait reports EIO once a rotation drains it (the batch it waits for
    failed); otherwise the real pipe's."""

    def __init__(self, pipe: Any, committer: Any) -> None:
        self._pipe, self._committer = pipe, committer

    def wait(self, lsn: int, timeout: float) -> tuple[int, int, int]:
        durable, error, batches = self._pipe.wait(lsn, timeout)
        if self._committer.rotating:
            return durable, errno.EIO, batches
        return durable, error, batches

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)


@needs_pipe
def test_a_pipe_failing_while_a_rotation_drains_it_fails_the_log_with_no_new_segment(
        tmp_path: Path) -> None:
    cache = wbcache.open(tmp_path / "c", segment_size=4096)
    committer = cache._sequencer._committer
    real = committer._pipe
    committer._pipe = _FailingDrain(real, committer)
    segments = len(list((tmp_path / "c" / "wal").glob("*.log")))
    with pytest.raises(LogFailedError, match="Input/output error"):
        for i in range(1000):
            cache.put(f"k{i}", "v" * 100)
    assert len(list((tmp_path / "c" / "wal").glob("*.log"))) == segments
    with pytest.raises(LogFailedError):
        cache.put("refused", 1)
    committer._pipe = real
    cache.close()
    with wbcache.open(tmp_path / "c") as reopened:
        assert reopened.get("k0") == "v" * 100 and reopened.get("refused") is None


@needs_pipe
def test_close_during_a_rotation_waits_for_it(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(commit_module, "FOLLOWER_RECHECK", 30.0)  # woken by the rotation's end
    cache = wbcache.open(tmp_path / "c", segment_size=4096)
    committer = cache._sequencer._committer
    writer = committer._writer
    rotate = writer.rotate_to
    closer: list[threading.Thread] = []

    def rotating(first_lsn: int, switch: Any) -> None:
        if not closer:
            closer.append(threading.Thread(target=cache.close))
            closer[0].start()
            wait_until(lambda: len(committer._rotated._waiters) == 1,  # type: ignore[attr-defined]
                       what="close waiting for the rotation")
        rotate(first_lsn, switch)
    writer.rotate_to = rotating  # type: ignore[method-assign]
    done = 0
    try:
        while True:
            cache.put(f"k{done}", "v" * 100)
            done += 1
    except wbcache.CacheClosedError:
        pass
    closer[0].join(10)
    assert not closer[0].is_alive() and cache.closed
    with wbcache.open(tmp_path / "c") as reopened:
        assert all(reopened.get(f"k{i}") == "v" * 100 for i in range(done))
