"""The group commit's write and fdatasync in one C call (wal/_sync.c) against the two Python
calls it replaces.

`write_sync(fd, data)` must do what `write_all(fd, data)` then `os.fdatasync(fd)` do: every
byte written, then the sync, each error raised as the same OSError, a signal's handler run
(and its exception raised) when a write is interrupted. The log writer takes it for the last
write of a batch that fsyncs, and only when nothing must see the two calls apart: no crash
point armed, neither call replaced by the fault-injection harness. It runs where the group
commit is in Python: fsync="interval", the harness, or a build without wal/_pipe.c (the strace
child here sets that, since under fsync="always" wal/_pipe.c's thread writes the log:
tests/test_pipe.py). What reaches the kernel, in what order, is read from strace: each
acknowledgement comes after an fdatasync of the log, begun after the write of its record
returned.
"""

from __future__ import annotations

import errno
import os
import re
import resource
import select
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from built_support import assert_fast_path
from controlled import wait_until
from log_bytes import segment_records

from wbcache.errors import LogFailedError
from wbcache.wal import crashpoints
from wbcache.wal import syscalls as syscalls_module
from wbcache.wal.format import MARK_MAGIC, encode_mark
from wbcache.wal.syscalls import SYSCALLS, Syscalls

FAST = (syscalls_module._write_sync
        if syscalls_module._write_sync is not syscalls_module._write_then_sync else None)
needs_fast = pytest.mark.skipif(FAST is None, reason="covered by test_the_sync_module_is_built")


def test_the_sync_module_is_built() -> None:
    assert_fast_path(FAST, "wbcache.wal._sync", "wal/_sync.c",
                     "a batch's write and fdatasync are two calls, each taking the GIL back")


def write_sync_of(which: str) -> Callable[[int, bytes], None]:
    if which == "python":
        return syscalls_module._write_then_sync  # what runs where wal/_sync.c is not built
    assert FAST is not None
    return FAST  # type: ignore[no-any-return]


@needs_fast
@pytest.mark.parametrize("which", ["c", "python"])
def test_every_byte_is_written_then_synced(tmp_path: Path, which: str) -> None:
    data = os.urandom(3 << 20) + b"end"
    fd = os.open(tmp_path / "log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, b"head")
        write_sync_of(which)(fd, data)
        write_sync_of(which)(fd, memoryview(b"-tail"))  # any bytes-like object
    finally:
        os.close(fd)
    assert (tmp_path / "log").read_bytes() == b"head" + data + b"-tail"


@needs_fast
@pytest.mark.parametrize("which", ["c", "python"])
def test_errors_are_the_same_oserrors(tmp_path: Path, which: str) -> None:
    read_end, write_end = os.pipe()
    try:
        # a pipe takes the bytes, then refuses the sync
        with pytest.raises(OSError) as refused:
            write_sync_of(which)(write_end, b"through the pipe")
        assert refused.value.errno == errno.EINVAL
        assert os.read(read_end, 100) == b"through the pipe"
    finally:
        os.close(read_end)
        os.close(write_end)
    never_open = resource.getrlimit(resource.RLIMIT_NOFILE)[0]  # past the highest descriptor
    with pytest.raises(OSError) as closed:
        write_sync_of(which)(never_open, b"x")
    assert closed.value.errno == errno.EBADF
    for path, flags, expected in (("/dev/full", os.O_WRONLY, errno.ENOSPC),
                                  (tmp_path / "ro", os.O_RDONLY | os.O_CREAT, errno.EBADF)):
        fd = os.open(path, flags, 0o600)
        try:
            with pytest.raises(OSError) as refused:
                write_sync_of(which)(fd, b"x")
            assert refused.value.errno == expected, path
        finally:
            os.close(fd)


@needs_fast
def test_bad_arguments_are_refused() -> None:
    assert FAST is not None
    for args in ((), (1,), (1, b"x", 2)):
        with pytest.raises(TypeError):
            FAST(*args)
    with pytest.raises(TypeError):
        FAST(1, "not bytes")
    with pytest.raises(OSError) as negative:  # as os.write
        FAST(-1, b"x")
    assert negative.value.errno == errno.EBADF
    with pytest.raises(OverflowError):
        FAST(1 << 40, b"x")


class Interrupted(Exception):
    pass


WRITE = {"x86_64": "1", "aarch64": "64"}.get(os.uname().machine)  # write(2)'s number


@pytest.fixture
def full_pipe() -> Iterator[tuple[int, int]]:
    """A pipe whose buffer is full: the next write blocks until its reader drains it."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    try:
        while True:
            os.write(write_end, b"\0" * 65536)
    except BlockingIOError:
        pass
    os.set_blocking(write_end, True)
    try:
        yield read_end, write_end
    finally:
        os.close(write_end)
        os.close(read_end)


def in_write(native_id: int) -> bool:
    """Whether thread `native_id` of this process is blocked in write(2) (/proc says)."""
    with open(f"/proc/self/task/{native_id}/syscall") as status:
        return status.read().split()[0] == WRITE


@needs_fast
@pytest.mark.skipif(WRITE is None, reason=f"write(2)'s number on {os.uname().machine} unknown")
@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="signal handlers run in the main thread only")
@pytest.mark.parametrize("which", ["c", "python"])
@pytest.mark.parametrize("raises", [True, False], ids=["handler-raises", "handler-returns"])
def test_a_write_interrupted_by_a_signal_runs_its_handler(
        full_pipe: tuple[int, int], which: str, raises: bool) -> None:
    """As PEP 475 has it for os.write: the handler runs; if it raises, the call raises that;
    if not, the write goes on. The signal is sent once the main thread is blocked in the write
    (on the full pipe); the pipe is drained once the handler has run, so a write that goes on
    finishes (and one that wrongly goes on after a raising handler finishes too: the test then
    fails instead of hanging)."""
    read_end, write_end = full_pipe
    main, main_native = threading.get_ident(), threading.get_native_id()
    handled, stop = threading.Event(), threading.Event()
    drained: list[bytes] = []

    def handler(signum: int, frame: Any) -> None:
        handled.set()
        if raises:
            raise Interrupted

    def signal_then_drain() -> None:
        try:
            wait_until(lambda: stop.is_set() or in_write(main_native), what="a blocked write")
        except AssertionError:  # never blocked: no signal; drain, so that the test fails, not hangs
            pass
        else:
            if stop.is_set():
                return
            signal.pthread_kill(main, signal.SIGALRM)
            handled.wait(10)
        while not stop.is_set() and not b"".join(drained).endswith(b"after all"):
            if select.select([read_end], [], [], 0.05)[0]:
                drained.append(os.read(read_end, 1 << 20))

    previous = signal.signal(signal.SIGALRM, handler)
    helper = threading.Thread(target=signal_then_drain, daemon=True)
    try:
        helper.start()
        if raises:
            with pytest.raises(Interrupted):
                write_sync_of(which)(write_end, b"after all")
        else:
            with pytest.raises(OSError) as refused:  # the write went on; a pipe cannot sync
                write_sync_of(which)(write_end, b"after all")
            assert refused.value.errno == errno.EINVAL
            helper.join(10)
            assert b"".join(drained).endswith(b"after all")
        assert handled.is_set()
    finally:
        stop.set()
        helper.join(10)
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------ in the log writer


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The descriptors `write_sync` was called with, the real one still doing the work."""
    seen: list[int] = []
    real = Syscalls.write_sync

    def recording(fd: int, data: bytes) -> None:
        seen.append(fd)
        real(fd, data)
    # On the class: an instance attribute is how the harness says it sees the one call.
    monkeypatch.setattr(Syscalls, "write_sync", staticmethod(recording))
    return seen


@needs_fast
def test_each_batch_of_fsync_always_is_one_call(open_cache: Any, calls: list[int]) -> None:
    cache = open_cache()
    for i in range(5):
        cache.put(f"k{i}", i)
    assert len(calls) == 5
    cache.close()
    reopened = open_cache()
    assert [reopened.get(f"k{i}") for i in range(5)] == list(range(5))


@needs_fast
def test_under_interval_a_put_is_no_system_call_and_a_sync_is_then_marked(
        open_cache: Any, calls: list[int], cache_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """fsync="interval" copies each record into the mapped segment (wal/writer.py): neither a
    write nor the one C call; `sync()` fdatasyncs it and then marks how far it is on disk."""
    from wbcache.wal import writer as writer_module
    written: list[int] = []
    real_write_all = writer_module.write_all

    def write_all(fd: int, data: bytes) -> None:
        written.append(len(data))
        real_write_all(fd, data)
    monkeypatch.setattr(writer_module, "write_all", write_all)
    cache = open_cache(fsync="interval", fsync_interval=3600)
    for i in range(5):
        cache.put(f"k{i}", i)
    assert calls == [] and written == []
    segment, = (cache_dir / "wal").glob("*.log")
    assert segment.stat().st_size > 4096  # reserved ahead, read as zeros
    cache.sync()
    assert calls == [] and written == []
    records, end = segment_records(segment)
    end.check()
    assert [record[0] for record in records] == [1, 2, 3, 4, 5]
    data = segment.read_bytes()
    mark = data.index(MARK_MAGIC)
    assert end.synced_to == mark and end.torn_bytes == 0  # all before the mark was fsync'd
    assert not any(data[mark + len(encode_mark(0)):])  # then the reserved zeros: a clean end
    size = segment.stat().st_size
    cache.close()
    assert segment.stat().st_size == size  # never shrunk (a reader may have it mapped)
    reopened = open_cache()
    assert [reopened.get(f"k{i}") for i in range(5)] == list(range(5))


@needs_fast
def test_the_harness_sees_two_calls_when_it_replaces_one(open_cache: Any, calls: list[int],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    cache = open_cache()  # its segment is created (and synced) first
    segment = cache._sequencer._committer._writer._fd
    synced: list[int] = []

    def fdatasync(fd: int) -> None:
        if fd == segment:  # not another thread's (the flusher's, a stray cache's)
            synced.append(fd)
        os.fdatasync(fd)
    monkeypatch.setattr(SYSCALLS, "fdatasync", fdatasync, raising=False)
    cache.put("k", 1)
    assert calls == [] and len(synced) == 1
    monkeypatch.delattr(SYSCALLS, "fdatasync")
    cache.put("k", 2)
    assert len(calls) == 1 and len(synced) == 1
    monkeypatch.setattr(crashpoints, "ARMED", True)  # a crash point may stop between the two
    cache.put("k", 3)
    assert len(calls) == 1
    monkeypatch.setattr(crashpoints, "ARMED", False)
    # A harness that replaces the one call too (LazyFS's worker, the power-loss recorder)
    # sees it: the batch is one call again, through its replacement.
    seen: list[int] = []

    def write_sync(fd: int, data: bytes) -> None:
        seen.append(fd)
        Syscalls.write_sync(fd, data)
    monkeypatch.setattr(SYSCALLS, "fdatasync", fdatasync, raising=False)
    monkeypatch.setattr(SYSCALLS, "write_sync", write_sync, raising=False)
    cache.put("k", 4)
    assert seen == [segment] and len(calls) == 2 and len(synced) == 1
    cache.close()
    assert open_cache().get("k") == 4


@needs_fast
def test_a_failed_call_fails_the_log_and_acknowledges_nothing(
        open_cache: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The write or the fdatasync inside the one call fails (EIO after writing): the put is
    not acknowledged, and the cache refuses writes until it is reopened, as after a failed
    fdatasync of the two calls (the fsyncgate rule, wal/commit.py)."""
    cache = open_cache()
    cache.put("before", 1)
    real = Syscalls.write_sync

    def failing(fd: int, data: bytes) -> None:
        os.write(fd, data)  # the bytes may well be in the file: they are not acknowledged
        raise OSError(errno.EIO, "injected: the fdatasync failed")
    monkeypatch.setattr(Syscalls, "write_sync", staticmethod(failing))
    acknowledged = cache._sequencer._committer.acknowledged_lsn
    with pytest.raises(LogFailedError):
        cache.put("failed", 2)
    assert cache._sequencer._committer.acknowledged_lsn == acknowledged
    monkeypatch.setattr(Syscalls, "write_sync", staticmethod(real))
    with pytest.raises(LogFailedError):
        cache.put("after", 3)  # refused for good, even with the calls working again
    cache.close()
    reopened = open_cache()
    assert reopened.get("before") == 1 and reopened.get("after") is None


STRACE = shutil.which("strace")

CHILD = """
import os, sys, wbcache
import wbcache.wal.commit
wbcache.wal.commit.Pipe = None  # the group commit in Python (tests/test_pipe.py: the pipe's)
cache = wbcache.open(sys.argv[1])
for i in range(8):
    cache.put(f"k{i}", "v" * i)
    os.access(f"/wbcache-ack-{i}", os.F_OK)  # the mark of an acknowledgement, in the trace
cache.close()
"""


@needs_fast
@pytest.mark.skipif(STRACE is None, reason="strace is not installed (.ci/run installs it)")
def test_strace_sees_each_acknowledgement_after_a_write_then_an_fdatasync_of_the_log(
        tmp_path: Path) -> None:
    log = tmp_path / "trace"
    subprocess.run([STRACE or "strace", "-f", "-qq", "-e",
                    "trace=openat,write,fdatasync,access,faccessat,faccessat2",
                    "-o", str(log), sys.executable, "-c", CHILD, str(tmp_path / "c")],
                   check=True, timeout=120)
    segments: set[str] = set()  # descriptors of the log's segments
    written: dict[str, int] = {}  # segment descriptor -> line where its last write returned
    synced: dict[str, tuple[int, int]] = {}  # -> lines where its last fdatasync began, returned
    unfinished: dict[tuple[str, str], tuple[int, str]] = {}  # (pid, call) -> (line, its fd)
    acks: list[int] = []

    def returned(call: str, fd: str, result: str, began: int, done: int) -> None:
        ok = result.lstrip("-").isdigit() and int(result) >= (1 if call == "write" else 0)
        if call == "openat" and ok and "/wal/" in fd:
            segments.add(result)  # for openat, `fd` holds the call's arguments
        elif fd in segments and ok and call == "write":
            written[fd] = done
        elif fd in segments and ok and call == "fdatasync" and result == "0":
            synced[fd] = (began, done)

    def check_ack(line: int) -> None:
        """Since the previous acknowledgement a record was written to a segment, and every
        segment's last write returned before an fdatasync of it began that returned before
        this acknowledgement."""
        since = acks[-1] if acks else -1
        assert any(done > since for done in written.values()), (
            f"acknowledgement {len(acks)} (trace line {line + 1}): no write of the log since "
            f"the acknowledgement before it")
        for fd, done in written.items():
            began, returned_at = synced.get(fd, (-1, -1))
            assert done < began <= returned_at < line, (
                f"acknowledgement {len(acks)} (trace line {line + 1}): the write of segment "
                f"descriptor {fd} (line {done + 1}) is not followed by an fdatasync of it that "
                f"returned before the acknowledgement")
        acks.append(line)

    for number, line in enumerate(log.read_text().splitlines()):
        pid, _, rest = line.partition(" ")
        rest = rest.strip()
        resumed = re.match(r"<\.\.\. (\w+) resumed>.* = (\S+)", rest)
        called = re.match(r"(\w+)\((.*)", rest)
        if resumed and (pid, resumed.group(1)) in unfinished:
            began, argument = unfinished.pop((pid, resumed.group(1)))
            returned(resumed.group(1), argument, resumed.group(2), began, number)
        elif "wbcache-ack-" in rest:
            check_ack(number)
        elif called and called.group(1) in ("write", "fdatasync", "openat"):
            call = called.group(1)
            argument = (called.group(2) if call == "openat"
                        else called.group(2).split(",")[0].split(")")[0])
            if rest.endswith("<unfinished ...>"):
                unfinished[(pid, call)] = (number, argument)
            else:
                returned(call, argument, rest.rsplit("= ", 1)[-1].split()[0], number, number)
    assert len(acks) == 8
