"""Starting a worker, killing it, and reading back what it reported; recovering a copy.

`run_worker` reads the worker's journal from its stdout pipe as it arrives, so a kill can be
timed by what the worker is doing (an acknowledgement count, a flush in progress, a segment
being created) or by the clock. After the kill it reads the pipe to EOF: acknowledgements
already written when the SIGKILL landed still count.

`recover` opens a COPY of the crashed directory with the plain public API (which runs
recovery) and returns every key it holds. The crashed directory itself is left as the crash
left it, for the next worker to recover: that way recovery also runs, and is killed, in the
worker.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import wbcache
from wbcache.fault_injection.journal import EventBuffer, read_events
from wbcache.fault_injection.worker import WorkerConfig

WORKER_TIMEOUT = 120.0  # seconds: a worker still alive this long after start has hung

KillDecision = Callable[[list[Any]], bool]


@dataclass
class WorkerRun:
    events: list[list[Any]]
    returncode: int
    killed: bool  # by the harness (not by a crash point or by itself)
    hung: bool
    stderr: str
    seconds: float

    @property
    def sigkilled(self) -> bool:
        return self.returncode == -signal.SIGKILL


@dataclass
class Recovered:
    """What opening a crashed directory gave."""

    state: dict[Any, Any] = field(default_factory=dict)
    last_lsn: int = 0  # the cache's next LSN - 1 after recovery
    replayed: int = 0
    torn_bytes: int = 0
    error: str | None = None  # the open (or the read) raised: recovery refused


class WorkerSpec(Protocol):
    """What `run_worker` starts: `python -m <module> <to_json()>` (a `WorkerConfig`, or a
    `NodeConfig` of the multi-node campaign)."""

    module: ClassVar[str]

    def to_json(self) -> str: ...


def worker_command(config: WorkerSpec) -> list[str]:
    """`python -m <module> <config>`. Run it in `scratch` (`cwd=`): `-m` puts the working
    directory first on the import path, and a `wbcache` folder there (a checkout of another
    version, or a cache directory so named) would be imported instead of the library."""
    return [sys.executable, "-m", config.module, config.to_json()]


def worker_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without crash-point variables, plus `extra`."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("WBCACHE_CRASH_")}
    env.update(extra or {})
    return env


_EXIT_POLL = 0.5  # seconds: how often a silent worker is checked for having died


def run_worker(config: WorkerSpec, scratch: str, *, kill_on: KillDecision | None = None,
               kill_after_seconds: float | None = None, env: dict[str, str] | None = None,
               timeout: float = WORKER_TIMEOUT) -> WorkerRun:
    """Run a worker until it dies; SIGKILL it when `kill_on(event)` first says so or after
    `kill_after_seconds`. Its stderr goes to a file in `scratch`."""
    os.makedirs(scratch, exist_ok=True)
    stderr_path = os.path.join(scratch, "worker.stderr")
    started = time.monotonic()
    with open(stderr_path, "wb") as stderr:
        child = subprocess.Popen(worker_command(config), stdout=subprocess.PIPE, stderr=stderr,
                                 env=worker_env(env), cwd=scratch)
    assert child.stdout is not None
    fd = child.stdout.fileno()
    buffer = EventBuffer()
    events: list[list[Any]] = []
    killed = hung = False
    kill_at = None if kill_after_seconds is None else started + kill_after_seconds
    while True:
        now = time.monotonic()
        if not killed and kill_at is not None and now >= kill_at:
            killed = _kill(child)
        if now - started > timeout:
            hung = not killed
            killed = _kill(child) or killed
        wait = min(timeout - (now - started), _EXIT_POLL)
        if not killed and kill_at is not None:
            wait = min(wait, kill_at - now)
        ready, _, _ = select.select([fd], [], [], max(wait, 0.0))
        if not ready:
            if child.poll() is not None:
                # Dead, and its journal drained, but no end of file: a process it forked
                # holds the pipe (a child stuck before it closed its copy). Waiting for that
                # end of file would spin forever.
                break
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        for event in buffer.feed(chunk):
            events.append(event)
            if not killed and kill_on is not None and kill_on(event):
                killed = _kill(child)
    child.stdout.close()
    returncode = child.wait()
    with open(stderr_path, encoding="utf-8", errors="replace") as stderr_file:
        stderr_text = stderr_file.read()
    return WorkerRun(events, returncode, killed, hung, stderr_text, time.monotonic() - started)


def run_worker_to_file(config: WorkerConfig, scratch: str, *, env: dict[str, str] | None = None,
                       timeout: float = WORKER_TIMEOUT) -> WorkerRun:
    """Run a worker that journals into `config.journal` (a file) until it dies by itself."""
    os.makedirs(scratch, exist_ok=True)
    stderr_path = os.path.join(scratch, "worker.stderr")
    started = time.monotonic()
    with open(stderr_path, "wb") as stderr:
        child = subprocess.Popen(worker_command(config), stdout=subprocess.DEVNULL,
                                 stderr=stderr, env=worker_env(env), cwd=scratch)
    hung = False
    try:
        returncode = child.wait(timeout)
    except subprocess.TimeoutExpired:
        hung = True
        child.kill()
        returncode = child.wait()
    assert config.journal is not None
    with open(config.journal, "rb") as journal:
        events = list(read_events(journal.read()))
    with open(stderr_path, encoding="utf-8", errors="replace") as stderr_file:
        stderr_text = stderr_file.read()
    return WorkerRun(events, returncode, hung, hung, stderr_text, time.monotonic() - started)


def _kill(child: subprocess.Popen[bytes]) -> bool:
    if child.poll() is None:
        child.send_signal(signal.SIGKILL)
    return True


def recover(directory: str, copy_to: str | None = None) -> Recovered:
    """Open `directory` (or a fresh copy of it at `copy_to`), read every key, close."""
    path = directory
    if not os.path.exists(directory):  # the worker died before it created anything
        return Recovered()
    if copy_to is not None:
        shutil.rmtree(copy_to, ignore_errors=True)
        shutil.copytree(directory, copy_to, symlinks=True)
        path = copy_to
    try:
        with wbcache.open(path) as cache:
            return Recovered(dict(cache.items()), cache.stats()["next_lsn"] - 1,
                             cache.recovery.replayed, cache.recovery.torn_bytes)
    except Exception as exc:  # any refusal is a finding; the caller reports it
        return Recovered(error=f"{type(exc).__name__}: {exc}")


def prepare_directory(directory: str) -> None:
    """Create an empty cache directory (layout and database) by opening and closing it."""
    wbcache.open(directory).close()
