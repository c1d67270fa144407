"""The group commit's write and fdatasync in one C call (wal/_sync.c) against the two Python
calls it replaces.

`write_sync(fd, data)` must do what `write_all(fd, data)` then `os.fdatasync(fd)` do: every
byte written, then the sync, each error raised as the same OSError, a signal's handler run
(and its exception raised) when a write is interrupted. The log writer takes it for the last
write of a batch that fsyncs, and only when nothing must see the two calls apart: no crash
point armed, neither call replaced by the fault-injection harness. What reaches the kernel, in
what order, is read from strace: each acknowledgement comes after an fdatasync of the log,
begun after the write of its record returned.
"""

from __future__ import annotations

import errno
import os
import re
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
from built_support import assert_built_from
from controlled import wait_until

from wbcache.wal import crashpoints
from wbcache.wal import writer as writer_module
from wbcache.wal.format import encode_mark
from wbcache.wal.syscalls import SYSCALLS, write_all

FAST = writer_module._write_sync
needs_fast = pytest.mark.skipif(FAST is None, reason="covered by test_the_sync_module_is_built")


def test_the_sync_module_is_built() -> None:
    assert FAST is not None, (
        "wbcache.wal._sync is not built: `pip install -e .` compiles wal/_sync.c when a C "
        "compiler and the Python headers are installed; without it a batch's write and "
        "fdatasync are two calls, each taking the GIL back")
    assert_built_from("wbcache.wal._sync", "wal/_sync.c")


def in_python(fd: int, data: bytes) -> None:
    write_all(fd, data)
    os.fdatasync(fd)


BOTH = [pytest.param("c", id="c"), pytest.param("python", id="python")]


def write_sync_of(which: str) -> Callable[[int, bytes], None]:
    if which == "python":
        return in_python
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
    with pytest.raises(OSError) as closed:
        write_sync_of(which)(write_end, b"x")  # closed above
    assert closed.value.errno == errno.EBADF
    readonly = os.open(tmp_path / "ro", os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(OSError) as not_writable:
            write_sync_of(which)(readonly, b"x")
        assert not_writable.value.errno == errno.EBADF
    finally:
        os.close(readonly)


@needs_fast
def test_bad_arguments_are_refused() -> None:
    assert FAST is not None
    for args in ((), (1,), (1, b"x", 2)):
        with pytest.raises(TypeError):
            FAST(*args)
    with pytest.raises(TypeError):
        FAST(1, "not bytes")
    with pytest.raises(ValueError):
        FAST(-1, b"x")


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
    real = writer_module._write_sync

    def recording(fd: int, data: bytes) -> None:
        seen.append(fd)
        real(fd, data)  # type: ignore[misc]
    monkeypatch.setattr(writer_module, "_write_sync", recording)
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
def test_under_interval_a_batch_synced_on_request_is_one_call_then_its_mark(
        open_cache: Any, calls: list[int], cache_dir: Path) -> None:
    cache = open_cache(fsync="interval", fsync_interval=3600)
    for i in range(5):
        cache.put(f"k{i}", i)  # written, not synced
    assert calls == []
    _, key, encoded, held = cache._limits.put_op("last", 1)
    cache._sequencer.put_nowait(key, encoded, held)  # queued; nobody leads (no AsyncCache)
    cache.sync()  # the batch that writes it is asked to fsync: one call, then the sync mark
    assert len(calls) == 1
    segment, = (cache_dir / "wal").glob("*.log")
    data = segment.read_bytes()
    mark = encode_mark(len(data) - len(encode_mark(0)))
    assert data.endswith(mark)  # every byte before the mark is fsync'd, it says
    cache.close()
    reopened = open_cache()
    assert reopened.get("k4") == 4 and reopened.get("last") == 1


@needs_fast
def test_the_harness_sees_two_calls_when_it_replaces_one(open_cache: Any, calls: list[int],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    cache = open_cache()  # its segment is created (and synced) first
    synced: list[int] = []

    def fdatasync(fd: int) -> None:
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
    cache.close()
    assert open_cache().get("k") == 3


STRACE = shutil.which("strace")

CHILD = """
import os, sys, wbcache
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
    last_write_done = last_sync_began = last_sync_done = -1
    acks = 0
    unfinished: dict[tuple[str, str], tuple[int, str]] = {}  # (pid, call) -> (line, fd)

    def returned(call: str, fd: str, result: str, began: int, done: int) -> None:
        nonlocal last_write_done, last_sync_began, last_sync_done
        if fd not in segments:
            return
        if call == "write" and int(result) > 0:
            last_write_done = done
        elif call == "fdatasync" and result == "0":
            last_sync_began, last_sync_done = began, done

    for number, line in enumerate(log.read_text().splitlines()):
        pid, _, rest = line.partition(" ")
        rest = rest.strip()
        opened = re.match(r'openat\(.*"[^"]*/wal/\d+\.log".* = (\d+)$', rest)
        resumed = re.match(r"<\.\.\. (\w+) resumed>.* = (-?\d+)", rest)
        called = re.match(r"(\w+)\((\d*)", rest)
        if opened:
            segments.add(opened.group(1))
        elif resumed and (pid, resumed.group(1)) in unfinished:
            began, fd = unfinished.pop((pid, resumed.group(1)))
            returned(resumed.group(1), fd, resumed.group(2), began, number)
        elif "wbcache-ack-" in rest:
            assert last_write_done < last_sync_began <= last_sync_done < number, (
                f"acknowledgement {acks} (trace line {number + 1}) without a write of the log, "
                f"then an fdatasync of it, before it")
            acks += 1
        elif called and called.group(1) in ("write", "fdatasync"):
            if rest.endswith("<unfinished ...>"):
                unfinished[(pid, called.group(1))] = (number, called.group(2))
            else:
                returned(called.group(1), called.group(2), rest.rsplit("= ", 1)[-1].split()[0],
                         number, number)
    assert acks == 8
