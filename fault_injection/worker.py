"""The worker process that the harness starts, kills and checks.

    python -m wbcache.fault_injection.worker '<WorkerConfig as JSON>'

It opens the cache (recovering whatever the last crash left), reports READY, then runs
`threads` writer threads of the workload (workload.py), and, with `async_tasks`, as many
asyncio tasks writing through `wbcache.AsyncCache` beside them (each task is one writer to the
oracle, numbered after the threads). Each writer journals START before an operation and ACK
with its result after it returned, each as one unbuffered write, so the journal always holds
every acknowledgement the process made before it died. The worker is killed (by the harness,
by a crash point, or by itself after `kill_after_acks` acknowledgements), or, when its writers
are done, it closes the cache if `close_at_end` (so crash points on the close path can fire)
and leaves with `os._exit`, which to the cache is a crash like any other.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import wbcache
from wbcache.fault_injection.backends import JournaledBackend
from wbcache.fault_injection.journal import ACK, ERROR, READY, START, Journal
from wbcache.fault_injection.trace import SyscallRecorder
from wbcache.fault_injection.workload import ThreadWorkload, execute, execute_async


@dataclass
class WorkerConfig:
    module: ClassVar[str] = "wbcache.fault_injection.worker"

    directory: str
    seed: int
    cycle: int
    threads: int = 4
    ops_per_thread: int = 1_000_000
    options: dict[str, Any] = field(default_factory=dict)
    journal: str | None = None  # a file to append to; None: standard output (a pipe)
    record: str = "none"  # "light": journal segment creation and database commits (no data);
    #                       "full": every file operation of the log and commit, with data
    kill_after_acks: int | None = None  # SIGKILL itself after this many acknowledgements
    workload: bool = True  # False: open (recover), report READY, leave
    async_tasks: int = 0  # asyncio writers beside the threads (through AsyncCache)
    close_at_end: bool = False  # close the cache once every writer is done
    kill_after_mkdir: str | None = None  # SIGKILL itself once it created a directory so named

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerConfig:
        return cls(**json.loads(text))


def run(config: WorkerConfig) -> None:
    fd = 1 if config.journal is None else os.open(
        config.journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    journal = Journal(fd)
    if config.kill_after_mkdir is not None:
        _kill_after_mkdir(config.kill_after_mkdir)
    backend = None
    if config.record != "none":
        SyscallRecorder(journal, config.directory, light=config.record == "light").install()
        backend = JournaledBackend(wbcache.LmdbBackend(os.path.join(config.directory, "db")),
                                   journal, with_data=config.record == "full")
    if config.async_tasks:
        asyncio.run(_run_async(config, journal, backend))
    else:
        cache = wbcache.open(config.directory, backend=backend, **config.options)
        _ready(cache, journal)
        if config.workload:
            _join(_start_threads(cache, journal, config, _AckCounter(config.kill_after_acks)))
            if config.close_at_end:
                cache.close()
    os._exit(0)


def _kill_after_mkdir(name: str) -> None:
    """Die right after creating a directory called `name`: the library names no crash point
    while it lays a new cache directory out, so the harness makes one of `os.mkdir`."""
    real_mkdir = os.mkdir

    def mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
        real_mkdir(path, *args, **kwargs)
        if os.path.basename(os.fspath(path)) == name:
            os.kill(os.getpid(), signal.SIGKILL)

    os.mkdir = mkdir  # type: ignore[assignment]


def _ready(cache: wbcache.Cache, journal: Journal) -> None:
    report = cache.recovery
    journal.emit(READY, os.getpid(), report.replayed, report.torn_bytes, report.checkpoint_after)


def _start_threads(cache: wbcache.Cache, journal: Journal, config: WorkerConfig,
                   acks: _AckCounter) -> list[threading.Thread]:
    threads = [threading.Thread(target=_write, args=(cache, journal, config, thread, acks),
                                daemon=True) for thread in range(config.threads)]
    for thread in threads:
        thread.start()
    return threads


def _join(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.join()


async def _run_async(config: WorkerConfig, journal: Journal, backend: Any) -> None:
    acache = await wbcache.open_async(config.directory, backend=backend, **config.options)
    _ready(acache.cache, journal)
    if not config.workload:
        return
    acks = _AckCounter(config.kill_after_acks)
    threads = _start_threads(acache.cache, journal, config, acks)
    await asyncio.gather(*(_write_async(acache, journal, config, config.threads + task, acks)
                           for task in range(config.async_tasks)))
    await asyncio.to_thread(_join, threads)
    if config.close_at_end:
        await acache.close()


class _AckCounter:
    def __init__(self, kill_after: int | None) -> None:
        self._kill_after = kill_after
        self._count = 0
        self._lock = threading.Lock()

    def acked(self) -> None:
        if self._kill_after is None:
            return
        with self._lock:
            self._count += 1
            if self._count >= self._kill_after:
                os.kill(os.getpid(), signal.SIGKILL)


def _write(cache: wbcache.Cache, journal: Journal, config: WorkerConfig, thread: int,
           acks: _AckCounter) -> None:
    workload = ThreadWorkload(config.seed, config.cycle, thread)
    for _ in range(config.ops_per_thread):
        op = workload.next()
        journal.emit(START, thread, op.seq)
        try:
            result = execute(cache, op)
        except Exception as exc:  # reported, then this thread stops: the parent judges it
            journal.emit(ERROR, thread, op.seq, type(exc).__name__, str(exc))
            return
        journal.emit(ACK, thread, op.seq, result)
        acks.acked()


async def _write_async(acache: wbcache.AsyncCache, journal: Journal, config: WorkerConfig,
                       writer: int, acks: _AckCounter) -> None:
    workload = ThreadWorkload(config.seed, config.cycle, writer)
    for _ in range(config.ops_per_thread):
        op = workload.next()
        journal.emit(START, writer, op.seq)
        try:
            result = await execute_async(acache, op)
        except Exception as exc:  # reported, then this writer stops: the parent judges it
            journal.emit(ERROR, writer, op.seq, type(exc).__name__, str(exc))
            return
        journal.emit(ACK, writer, op.seq, result)
        acks.acked()


if __name__ == "__main__":
    run(WorkerConfig.from_json(sys.argv[1]))
