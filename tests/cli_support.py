"""Shared by the tests of the operating commands (tests/test_cli_*.py, tests/test_maintenance.py);
it holds no tests.

Every command is run two ways: in-process through click's `CliRunner`, and as a real
subprocess of the installed `wbcache` script (the console script beside this interpreter).
Directories are built in known states (hand-written segments, or real writers killed with
SIGKILL: a single-owner one, or the lanes of a shared directory) and compared byte for byte
before and after a command.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import log_bytes
import msgpack
from click.testing import CliRunner
from log_bytes import frame, record_offsets

import wbcache
from wbcache.cli import main
from wbcache.wal.format import (
    encode_header,
)
from wbcache.wal.records import OP_PUT
from wbcache.wal.segments import segment_name

WBCACHE = Path(sys.executable).parent / "wbcache"
DRIVERS = ("runner", "script")
NOBODY = 65534


@dataclass
class Run:
    exit_code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def run(driver: str, *args: str, input: str | None = None, as_nobody: bool = False,
        env: dict[str, str] | None = None) -> Run:
    """Run `wbcache ARGS...` in-process ("runner") or as a subprocess of the script ("script").

    `as_nobody`: as an unprivileged user (uid 65534), for permission errors; the tests run as
    root here, and root passes every permission check. `env`: variables added to the
    command's environment (WBCACHE_BACKEND)."""
    return run_all(driver, [list(args)], input=input, as_nobody=as_nobody, env=env)[0]


def run_all(driver: str, commands: list[list[str]], *, input: str | None = None,
            as_nobody: bool = False, side_by_side: bool = False,
            env: dict[str, str] | None = None) -> list[Run]:
    """`run` for several command lines, one after the other; or, `side_by_side`, the
    subprocesses at once: only for commands refused before they take the directory's lock,
    which could otherwise refuse each other (exit 3)."""
    if driver == "runner":
        with _effective_user(NOBODY if as_nobody else None):
            results = [CliRunner(env=env).invoke(main, args, input=input,
                                                 catch_exceptions=False)
                       for args in commands]
        return [Run(result.exit_code, result.stdout, result.stderr) for result in results]
    assert driver == "script"
    if as_nobody:  # each in a forked child that became nobody (see _run_as_nobody)
        return [_run_as_nobody(args, input, env) for args in commands]
    assert WBCACHE.is_file(), f"the wbcache script is not installed at {WBCACHE}"
    if not side_by_side:
        return [_finish(_start(args, env), input) for args in commands]
    children = [_start(args, env) for args in commands]
    return [_finish(child, input) for child in children]


def _start(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    # surrogateescape: a path that is not UTF-8 is printed as its bytes
    return subprocess.Popen([str(WBCACHE), *args], text=True, errors="surrogateescape",
                            stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, **env} if env else None)


def _finish(child: subprocess.Popen[str], input: str | None) -> Run:
    stdout, stderr = child.communicate(input, timeout=120)
    return Run(child.returncode, stdout, stderr)


def _run_as_nobody(args: list[str], input: str | None,
                   env: dict[str, str] | None) -> Run:
    """The command in a child process that is truly uid 65534 (real and effective, no
    groups): forked from this one, privileges dropped, then the CLI run in it, so nothing is
    exec'd and where the interpreter lives (say under a root-only /root/.pyenv) does not
    matter. Its stdin, stdout and stderr are pipes, as a script's would be."""
    assert os.geteuid() == 0, "permission tests drop from root to uid 65534"
    stdin_r, stdin_w = os.pipe()
    stdout_r, stdout_w = os.pipe()
    stderr_r, stderr_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            for fd, target in ((stdin_r, 0), (stdout_w, 1), (stderr_w, 2)):
                os.dup2(fd, target)
            # pytest's capture replaced the standard streams: use the descriptors themselves
            sys.stdin = open(0, closefd=False)  # noqa: SIM115 (the child exits, not returns)
            sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            os.environ.update(env or {})
            try:
                main(args, prog_name="wbcache")
                code = 0
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    for fd in (stdin_r, stdout_w, stderr_w):
        os.close(fd)
    os.write(stdin_w, (input or "").encode())
    os.close(stdin_w)
    with os.fdopen(stdout_r) as out, os.fdopen(stderr_r) as err:
        stdout, stderr = out.read(), err.read()
    _, status = os.waitpid(pid, 0)
    return Run(os.waitstatus_to_exitcode(status), stdout, stderr)


@contextmanager
def _effective_user(uid: int | None) -> Iterator[None]:
    if uid is None:
        yield
        return
    assert os.geteuid() == 0, "permission tests drop from root to uid 65534"
    os.setegid(uid)
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def assert_one_line_error(result: Run, exit_code: int, *fragments: str) -> None:
    """The documented exit code, one `Error:` line on stderr holding `fragments`, no traceback."""
    assert result.exit_code == exit_code, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


# ------------------------------------------------------------------ directory state


def tree_state(root: Path) -> dict[str, Any]:
    """Everything observable about `root`: every entry's kind, mode, size, mtime and bytes."""
    if not os.path.lexists(root):
        return {}
    if not root.is_dir():
        info = root.stat()
        return {".": ("file", info.st_mode, info.st_mtime_ns, root.read_bytes())}
    state: dict[str, Any] = {".": ("dir", root.stat().st_mode, root.stat().st_mtime_ns)}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        name = str(path.relative_to(root))
        if path.is_dir():
            state[name] = ("dir", info.st_mode, info.st_mtime_ns)
        else:
            state[name] = ("file", info.st_mode, info.st_mtime_ns, path.read_bytes())
    return state


def new_cache_dir(path: Path) -> Path:
    """A real cache directory (LOCK, wal/, db/ with checkpoint 0) whose log is empty."""
    wbcache.open(path).close()
    for segment in (path / "wal").iterdir():
        segment.unlink()
    return path


def put(lsn: int, key: str | bytes, value: Any) -> list[Any]:
    return [lsn, OP_PUT, key, msgpack.packb(value)]


def puts(first_lsn: int, last_lsn: int) -> list[list[Any]]:
    return [put(lsn, f"key-{lsn}", lsn) for lsn in range(first_lsn, last_lsn + 1)]


def write_segment(wal_dir: Path, records: list[list[Any]], *, first_lsn: int | None = None,
                  version: int | None = None) -> Path:
    """A segment of `records`, one frame each (as a lone writer's group commits write them)."""
    path = wal_dir / segment_name(first_lsn if first_lsn is not None else records[0][0])
    header = encode_header() if version is None else encode_header(version=version)
    path.write_bytes(header + b"".join(frame(record) for record in records))
    return path


def frame_offsets(path: Path) -> list[int]:
    """Start offset of every frame of a segment, walked by the length fields."""
    return record_offsets(path.read_bytes())


def flip_byte(path: Path, offset: int) -> None:
    """Invert every bit of one byte."""
    log_bytes.flip_byte(path, offset, 0xFF)


def three_segment_log(path: Path) -> list[Path]:
    """A cache directory whose log holds LSNs 1..100, 101..200, 201..300 (key-N = N), nothing
    flushed."""
    new_cache_dir(path)
    return [write_segment(path / "wal", puts(first, first + 99)) for first in (1, 101, 201)]


# ------------------------------------------------------------------ real processes

# Phase A: `flushed` puts, then flush() (they are in the database), then "flushed". Phase B:
# 4 threads put t<thread>:<seq> = seq with flushing out of reach (so every acknowledged one is
# only in the log when the kill lands), reporting "<thread> <seq>" after each put returned.
WRITER = textwrap.dedent("""
    import os, sys, threading, wbcache
    path, flushed = sys.argv[1], int(sys.argv[2])
    cache = wbcache.open(path, flush_interval=3600, flush_threshold=10**9, max_dirty=10**9,
                         segment_size=16 * 1024)
    for i in range(flushed):
        cache.put(f"a:{i}", i)
    cache.flush()
    os.write(1, b"flushed\\n")
    lock = threading.Lock()
    def write(thread):
        seq = 0
        while True:
            cache.put(f"t{thread}:{seq}", seq)
            with lock:
                os.write(1, f"{thread} {seq}\\n".encode())
            seq += 1
    for thread in range(4):
        threading.Thread(target=write, args=(thread,), daemon=True).start()
    threading.Event().wait()
""")


def kill_writer(path: Path, *, flushed: int, acks: int) -> dict[str, int]:
    """Run WRITER, SIGKILL it after `acks` acknowledged phase-B writes, and return every
    acknowledged write {key: value}, phase A's included."""
    child = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(flushed)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert child.stdout is not None and child.stderr is not None
    assert child.stdout.readline() == b"flushed\n", child.stderr.read().decode()
    acked = {f"a:{i}": i for i in range(flushed)}
    seen = 0
    for line in child.stdout:  # after the kill, what is already in the pipe, to EOF
        thread, seq = map(int, line.split())
        acked[f"t{thread}:{seq}"] = seq
        seen += 1
        if seen == acks:
            child.send_signal(signal.SIGKILL)
    child.wait()
    child.stdout.close()
    child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    return acked


HOLDER = textwrap.dedent("""
    import sys, wbcache
    cache = wbcache.open(sys.argv[1])
    cache.put("held", "by a live cache")
    print("open", flush=True)
    sys.stdin.readline()
    cache.close()
""")


@contextmanager
def live_owner(path: Path) -> Iterator[int]:
    """A live cache holding `path` in another process (py-lmdb refuses a second open of one
    environment in this process); yields its pid. It closes cleanly on exit."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert holder.stdin is not None and holder.stdout is not None
    try:
        assert holder.stdout.readline() == b"open\n"
        yield holder.pid
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
        holder.stdout.close()
    assert holder.returncode == 0


# ------------------------------------------------------------------ shared directories

# A process with the shared directory open, its lane held: `count` puts NAME:i = i, each with
# an incr of "hits", flushed into the database or left in its lane's log; then it waits for a
# line on stdin and closes, or is SIGKILLed. Its flusher and adopter are out of reach, so
# whatever it left in its log stays there, and it adopts no other lane meanwhile.
SHARED_WRITER = textwrap.dedent("""
    import sys, wbcache
    path, name, count, flush = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    cache = wbcache.open(path, shared=True, flush_interval=3600, flush_threshold=10**9,
                         adopt_interval=3600)
    for i in range(count):
        cache.put(f"{name}:{i}", i)
        cache.incr("hits")
    if flush == "flush":
        cache.flush()
    print("ready", flush=True)
    sys.stdin.readline()
    cache.close()
""")


@dataclass
class SharedWriter:
    process: subprocess.Popen[bytes]
    name: str
    count: int

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        assert self.process.returncode == -signal.SIGKILL

    def close(self) -> None:
        """Let it close its cache (which flushes) and exit."""
        assert self.process.stdin is not None
        if self.process.returncode is None:
            self.process.stdin.close()
            self.process.wait(timeout=30)
            assert self.process.returncode == 0


def start_shared_writer(path: Path, name: str, count: int, *, flush: bool) -> SharedWriter:
    """A SHARED_WRITER holding the next free lane of `path`, once it reports ready."""
    process = subprocess.Popen([sys.executable, "-c", SHARED_WRITER, str(path), name,
                                str(count), "flush" if flush else "keep"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert process.stdout is not None
    assert process.stdout.readline() == b"ready\n"
    return SharedWriter(process, name, count)


@contextmanager
def shared_lanes(path: Path, *, dead: tuple[int, ...] = (3, 4),
                 live: int | None = 5) -> Iterator[SharedWriter | None]:
    """A shared directory whose lane 1 is held by a live writer (its `live` puts flushed;
    none if `live` is None) and whose next lanes are orphans: one per entry of `dead`, a writer
    SIGKILLed with that many puts (and increments of "hits") only in its lane's log. Yields the
    live writer, closed on exit."""
    holder = start_shared_writer(path, "live", live, flush=True) if live is not None else None
    try:
        writers = [start_shared_writer(path, f"dead{index}", count, flush=False)
                   for index, count in enumerate(dead, 1)]  # each alive: each its own lane
        for writer in writers:
            writer.kill()
        yield holder
    finally:
        if holder is not None:
            holder.close()


def after_shared_recovery(dead: tuple[int, ...], live: int | None) -> dict[str, int]:
    """What `shared_lanes(dead=..., live=...)` holds once every lane is recovered."""
    expected = {f"live:{i}": i for i in range(live or 0)}
    for index, count in enumerate(dead, 1):
        expected.update({f"dead{index}:{i}": i for i in range(count)})
    expected["hits"] = (live or 0) + sum(dead)
    return expected


# ------------------------------------------------------------------ PostgreSQL


def pg_url(dsn: str, table: str, password: str | None = None) -> str:
    """A postgresql:// URL of the test server for `table` (with `password`, which the local
    server's trust authentication ignores: to check it is never shown)."""
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(dsn)
    user = str(params.get("user", "postgres")) + (f":{password}" if password else "")
    return (f"postgresql://{user}@{params.get('host', '127.0.0.1')}:{params.get('port', 5432)}"
            f"/{params.get('dbname', 'test')}?table={table}")
