"""The LazyFS campaign's worker: kill mode's worker (worker.py), whose journal also reports
every fsync of the log and every segment deletion.

    python -m wbcache.fault_injection.lazyfs_worker '<LazyfsWorkerConfig as JSON>'

It runs with `record="light"` (segment creation and database commits journaled, no data; the
journaled backend needs the directory's layout, so a new directory is laid out first, by an
open and close in this process, where a cut can land too) and adds, through the same journal
and the same `SyscallRecorder` hooks:

    SYNC    [f, fd]     an fdatasync/fsync of a log file RETURNED (emitted before the library
                        goes on), so every acknowledgement journaled before it is on disk
                        (also after a batch's write and fdatasync in one call, `write_sync`);
    UNLINK  [u, path]   a segment was deleted (flushes and deletions were in flight).

Under fsync="interval" the parent needs the first: an acknowledged write may be lost by a power
cut only if no log fsync returned after its acknowledgement (lazyfs.py, `required_acks`).
Under fsync="always" it journals no SYNC (every acknowledged write must survive): the log's
fdatasyncs are left alone, so wal/_pipe.c's thread writes it, as outside the harness.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import ClassVar

import wbcache
from wbcache.fault_injection import worker
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


def main(argv: list[str]) -> None:
    config = LazyfsWorkerConfig.from_json(argv[1])
    if config.record != "light":
        raise SystemExit(f"lazyfs_worker: record must be 'light', not {config.record!r}")
    if not os.path.isdir(os.path.join(config.directory, "wal")):
        wbcache.open(config.directory).close()
    SyncRecorder.syncs = config.options.get("fsync", "always") != "always"
    worker.SyscallRecorder = SyncRecorder  # type: ignore[misc]  # what worker.run installs
    worker.run(config)


if __name__ == "__main__":
    main(sys.argv)
