"""The worker process that the harness starts, kills and checks.

    python -m wbcache.fault_injection.worker '<WorkerConfig as JSON>'

It opens the cache (recovering whatever the last crash left), reports READY, then runs
`threads` writer threads of the workload (workload.py, or with `shared` the shared-key
workload of shared_keys.py), and, with `async_tasks`, as many asyncio tasks writing through
`wbcache.AsyncCache` beside them (each task is one writer to the oracle, numbered after the
threads). Each writer journals START before an operation and ACK with its result after it
returned, each as one unbuffered write, so the journal always holds every acknowledgement the
process made before it died. With `rounds` > 1 the writers stop after `ops_per_thread`
operations each, the cache is closed and opened again (memory cold again: REOPENED), and they
go on. With `forks`, a thread forks children while the writers run (forks.py). The worker is
killed (by the harness, by a crash point, or by itself: after `kill_after_acks`
acknowledgements, or part-way through database apply `kill_in_apply`), or, when its writers
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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import wbcache
from wbcache.fault_injection import shared_keys, workload
from wbcache.fault_injection.backends import JournaledBackend, SlowReads
from wbcache.fault_injection.forks import Forker, Inherited
from wbcache.fault_injection.journal import ACK, ERROR, READY, REOPENED, START, Journal
from wbcache.fault_injection.trace import SyscallRecorder


@dataclass
class WorkerConfig:
    module: ClassVar[str] = "wbcache.fault_injection.worker"

    directory: str
    seed: int
    cycle: int
    threads: int = 4
    ops_per_thread: int = 1_000_000  # per round
    options: dict[str, Any] = field(default_factory=dict)
    journal: str | None = None  # a file to append to; None: standard output (a pipe)
    record: str = "none"  # "light": journal segment creation and database commits (no data);
    #                       "full": every file operation of the log and commit, with data
    kill_after_acks: int | None = None  # SIGKILL itself after this many acknowledgements
    workload: bool = True  # False: open (recover), report READY, leave
    async_tasks: int = 0  # asyncio writers beside the threads (through AsyncCache)
    close_at_end: bool = False  # close the cache once every writer is done
    kill_after_mkdir: str | None = None  # SIGKILL itself once it created a directory so named
    shared: bool = False  # the shared-key workload (shared_keys.py) instead of workload.py's
    rounds: int = 1  # rounds of ops_per_thread operations per writer; between two, the cache
    #                  is closed and opened again, so memory starts cold
    slow_reads: float | None = None  # hold every database read up to this many seconds
    forks: int = 0  # children forked while the writers run (forks.py)
    fork_interval: float = 0.05  # seconds between two forks, about
    kill_in_apply: int | None = None  # SIGKILL itself part-way through this database apply

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> WorkerConfig:
        return cls(**json.loads(text))

    @property
    def wraps_backend(self) -> bool:
        """Whether the worker opens the database itself (to wrap it): the directory's layout
        must then exist before the worker starts (`runner.prepare_directory`)."""
        return (self.record != "none" or self.shared or self.slow_reads is not None
                or self.kill_in_apply is not None)


class _Writer:
    """One writer's workload, kept across rounds; `stopped` once an operation raised."""

    def __init__(self, config: WorkerConfig, number: int) -> None:
        self.number = number
        self.stopped = False
        if config.shared:
            self.ops: Any = shared_keys.SharedWorkload(config.seed, config.cycle, number)
            self.run: Callable[[Any, Any], Any] = shared_keys.execute
            self.run_async: Callable[[Any, Any], Any] = shared_keys.execute_async
        else:
            self.ops = workload.ThreadWorkload(config.seed, config.cycle, number)
            self.run = workload.execute
            self.run_async = workload.execute_async


def run(config: WorkerConfig) -> None:
    fd = 1 if config.journal is None else os.open(
        config.journal, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    journal = Journal(fd)
    if config.kill_after_mkdir is not None:
        _kill_after_mkdir(config.kill_after_mkdir)
    inherited = Inherited()
    inherited.backend, inherited.database = _backend(config, journal)
    forker = (Forker(inherited, journal, fd, count=config.forks, interval=config.fork_interval,
                     seed=config.seed * 1009 + config.cycle) if config.forks else None)
    writers = [_Writer(config, number) for number in range(config.threads + config.async_tasks)]
    if config.async_tasks:
        asyncio.run(_run_async(config, journal, inherited, forker, writers))
    else:
        _run_threads(config, journal, inherited, forker, writers)
    os._exit(0)


def _backend(config: WorkerConfig, journal: Journal) -> tuple[Any, Any]:
    """(the backend the worker's cache uses, wrapped as the config asks; the database inside
    the wrappers). (None, None): the cache opens its own."""
    if not config.wraps_backend:
        return None, None
    if config.record != "none":
        SyscallRecorder(journal, config.directory, light=config.record == "light").install()
    database = wbcache.LmdbBackend(os.path.join(config.directory, "db"))
    backend: Any = JournaledBackend(database, journal, with_data=config.record == "full",
                                    kill_in_apply=config.kill_in_apply,
                                    seed=config.seed * 7919 + config.cycle)
    if config.slow_reads is not None:
        backend = SlowReads(backend, config.slow_reads, seed=config.seed * 31 + config.cycle)
    return backend, database


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


# Called with each cache the worker opens, before its writers start (lazyfs_worker.py's
# syncer); None: nothing.
ON_OPEN: Callable[[wbcache.Cache, Journal], None] | None = None


def _opened(round_: int, cache: wbcache.Cache, acache: Any, journal: Journal,
            inherited: Inherited, forker: Forker | None) -> None:
    with inherited.lock:
        inherited.cache, inherited.acache = cache, acache
    if ON_OPEN is not None:
        ON_OPEN(cache, journal)
    if round_ == 0:
        _ready(cache, journal)
        if forker is not None:
            forker.start()
    else:
        journal.emit(REOPENED, round_)


def _run_threads(config: WorkerConfig, journal: Journal, inherited: Inherited,
                 forker: Forker | None, writers: list[_Writer]) -> None:
    acks = _AckCounter(config.kill_after_acks)
    for round_ in range(config.rounds):
        cache = wbcache.open(config.directory, backend=inherited.backend, **config.options)
        _opened(round_, cache, None, journal, inherited, forker)
        if not config.workload:
            return
        _join(_start_threads(cache, journal, config, writers, acks))
        last = round_ == config.rounds - 1
        if last and forker is not None:
            forker.stop()
        if not last or config.close_at_end:
            with inherited.lock:
                inherited.cache = None
                cache.close()


async def _run_async(config: WorkerConfig, journal: Journal, inherited: Inherited,
                     forker: Forker | None, writers: list[_Writer]) -> None:
    acks = _AckCounter(config.kill_after_acks)
    for round_ in range(config.rounds):
        acache = await wbcache.open_async(config.directory, backend=inherited.backend,
                                          **config.options)
        _opened(round_, acache.cache, acache, journal, inherited, forker)
        if not config.workload:
            return
        threads = _start_threads(acache.cache, journal, config, writers, acks)
        await asyncio.gather(*(_write_async(acache, journal, config, writer, acks)
                               for writer in writers[config.threads:]))
        await asyncio.to_thread(_join, threads)
        last = round_ == config.rounds - 1
        if last and forker is not None:
            await asyncio.to_thread(forker.stop)
        if not last or config.close_at_end:
            with inherited.lock:  # no fork while the cache closes
                inherited.cache = inherited.acache = None
                await acache.close()


def _start_threads(cache: wbcache.Cache, journal: Journal, config: WorkerConfig,
                   writers: list[_Writer], acks: _AckCounter) -> list[threading.Thread]:
    threads = [threading.Thread(target=_write, args=(cache, journal, config, writer, acks),
                                daemon=True) for writer in writers[:config.threads]]
    for thread in threads:
        thread.start()
    return threads


def _join(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.join()


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


def _write(cache: wbcache.Cache, journal: Journal, config: WorkerConfig, writer: _Writer,
           acks: _AckCounter) -> None:
    for _ in range(config.ops_per_thread):
        if writer.stopped:
            return
        op = writer.ops.next()
        journal.emit(START, writer.number, op.seq)
        try:
            result = writer.run(cache, op)
        except Exception as exc:  # reported, then this writer stops: the parent judges it
            journal.emit(ERROR, writer.number, op.seq, type(exc).__name__, str(exc))
            writer.stopped = True
            return
        journal.emit(ACK, writer.number, op.seq, result)
        acks.acked()


async def _write_async(acache: wbcache.AsyncCache, journal: Journal, config: WorkerConfig,
                       writer: _Writer, acks: _AckCounter) -> None:
    for _ in range(config.ops_per_thread):
        if writer.stopped:
            return
        op = writer.ops.next()
        journal.emit(START, writer.number, op.seq)
        try:
            result = await writer.run_async(acache, op)
        except Exception as exc:  # reported, then this writer stops: the parent judges it
            journal.emit(ERROR, writer.number, op.seq, type(exc).__name__, str(exc))
            writer.stopped = True
            return
        journal.emit(ACK, writer.number, op.seq, result)
        acks.acked()


if __name__ == "__main__":
    run(WorkerConfig.from_json(sys.argv[1]))
