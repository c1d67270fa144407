"""The LazyFS campaign's worker: kill mode's worker (worker.py), whose journal also reports
every fsync of the log and every segment deletion.

    python -m wbcache.fault_injection.lazyfs_worker '<LazyfsWorkerConfig as JSON>'

It runs with `record="light"` (segment creation and database commits journaled, no data; the
journaled backend needs the directory's layout, so a new directory is laid out first, by an
open and close in this process, where a cut can land too) and adds, through the same journal
and the same `SyscallRecorder` hooks:

    SYNC_BEGIN [g, fd]  an fdatasync/fsync is called: under fsync="interval" a write through
                        the mapped segment (wal/writer.py) may be acknowledged while one runs,
                        so only what was acknowledged before this is sure to be in it;
    SYNC    [f, fd]     that fdatasync/fsync RETURNED (emitted before the library goes on), so
                        every acknowledgement journaled before its SYNC_BEGIN is on disk
                        (also after a batch's write and fdatasync in one call, `write_sync`);
    UNLINK  [u, path]   a segment was deleted (flushes and deletions were in flight).

    SYNCING [Y, n]      fsync="interval", in even cycles: the n-th `cache.sync()` of a thread
    SYNCED  [y, n]      that calls it every `fsync_interval` (the library's promise, not a
                        system call: what was acknowledged before it began is durable once
                        it returned). Not in odd cycles: there the library's own syncer is
                        alone, and the time rule shows it if it stops or falls behind.

Under fsync="interval" the parent needs them: an acknowledged write may be lost by a power
cut only if no log fsync, and no `cache.sync()`, returned after its acknowledgement
(lazyfs_oracle.py, `required_acks`). The second holds even where a bug skipped the first's
system call (mutants/lazyfs/log-fdatasync-skipped.patch): writes through the mapped segment
(wal/writer.py) reach LazyFS only when the kernel writes the map back, so nothing else would
show them lost.
Under fsync="always" it journals no SYNC (every acknowledged write must survive): the log's
fdatasyncs are left alone, so wal/_pipe.c's thread writes it, as outside the harness.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
from dataclasses import dataclass
from typing import ClassVar

import wbcache
from wbcache.fault_injection import worker
from wbcache.fault_injection.journal import SYNC_BEGIN, SYNCED, SYNCING, Journal
from wbcache.fault_injection.trace import SyscallRecorder
from wbcache.wal.syscalls import SYSCALLS


@dataclass
class LazyfsWorkerConfig(worker.WorkerConfig):
    module: ClassVar[str] = "wbcache.fault_injection.lazyfs_worker"

    record: str = "light"


class SyncRecorder(SyscallRecorder):
    """Light recording (segment opens) plus the log's fsyncs and unlinks."""

    # Whether to journal the log's fdatasyncs (SYNC): only fsync="interval" needs them. Under
    # fsync="always" every acknowledged write must survive whatever was journaled, and leaving
    # `fdatasync` and `write_sync` alone keeps the log written by wal/_pipe.c's thread, as
    # outside the harness: the power cuts then land on it.
    syncs = True

    def install(self) -> None:
        super().install()
        # write_sync too: the log's batches are then one call, as outside the harness.
        names = ("fdatasync", "write_sync", "fsync", "unlink") if self.syncs else (
            "fsync", "unlink")
        for name in names:
            setattr(SYSCALLS, name, getattr(self, f"_{name}"))

    def _fdatasync(self, fd: int) -> None:
        self._journal.emit(SYNC_BEGIN, fd)
        super()._fdatasync(fd)

    def _fsync(self, fd: int) -> None:
        self._journal.emit(SYNC_BEGIN, fd)
        super()._fsync(fd)


_SYNC_NUMBERS = itertools.count()  # one sequence for every syncer of the process (all rounds)


def _start_syncer(cache: wbcache.Cache, journal: Journal, interval: float) -> None:
    """A thread calling `cache.sync()` every `interval` s (a pace, not a wait for anything)
    until the cache is closed or the process killed."""
    def sync() -> None:
        paced = threading.Event()
        while not paced.wait(interval):
            number = next(_SYNC_NUMBERS)
            journal.emit(SYNCING, number)
            try:
                cache.sync()
            except Exception:  # closed (the next round opens another), or the log failed
                return
            journal.emit(SYNCED, number)
    threading.Thread(target=sync, name="lazyfs-syncer", daemon=True).start()


def main(argv: list[str]) -> None:
    config = LazyfsWorkerConfig.from_json(argv[1])
    if config.record != "light":
        raise SystemExit(f"lazyfs_worker: record must be 'light', not {config.record!r}")
    if not os.path.isdir(os.path.join(config.directory, "wal")):
        wbcache.open(config.directory).close()
    SyncRecorder.syncs = config.options.get("fsync", "always") != "always"
    if SyncRecorder.syncs and config.cycle % 2 == 0:
        interval = float(config.options.get("fsync_interval", 1.0))
        worker.ON_OPEN = lambda cache, journal: _start_syncer(cache, journal, interval)
    worker.SyscallRecorder = SyncRecorder  # type: ignore[misc]  # what worker.run installs
    worker.run(config)


if __name__ == "__main__":
    main(sys.argv)
