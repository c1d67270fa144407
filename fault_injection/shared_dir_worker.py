"""One process of the shared-directory campaign: writer threads on a shared directory until killed.

    python -m wbcache.fault_injection.shared_dir_worker '<SharedDirConfig as JSON>'

It opens the directory with `shared=True` (claiming a lane, recovering it, adopting every
orphan lane), reports READY, then runs `threads` writer threads of the shared-directory
workload (shared_dir_workload.py) under node number `node`, and with `forks`, a forker thread
that forks that many children while the writers run. Events, one unbuffered write each (a
journal frame is far below PIPE_BUF, so a child's frames and the parent's never interleave on
the pipe they share):

    [R, pid, records replayed at open]
    [M, node, thread, marker]           the thread read its marker (a fresh node: must be 0)
    [S, node, thread, n]  [A, node, thread, n]     before write n, after it returned
    [E, node, thread, n, type, message] a write (or a read) raised; the thread stops
    [F, node, {use: outcome}]           a child, before its reopen(): every use of the cache it
                                        inherited must have been refused (forks.py)

A child (node `node + k`, k = 1..forks) is the gunicorn post_fork recipe: it tries the cache it
inherited (refused), calls `cache.reopen()` (a lane of its own, and adoption of any orphan),
writes `child_writes` batches from one thread, and closes the cache or, every other child,
just exits (leaving its lane an orphan). It dies with its parent (PR_SET_PDEATHSIG), so a kill
of the parent lands in the child's reopen or writes too. The worker never stops by itself.

`mutation` plants a bug for the tests that prove the campaign catches one (MUTATIONS).
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import signal
import sys
import threading
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import wbcache
from wbcache.fault_injection.counters import marker_key
from wbcache.fault_injection.forks import USES, refusals
from wbcache.fault_injection.journal import ACK, ERROR, FORK, MARKER, READY, START, Journal
from wbcache.fault_injection.shared_dir_workload import write

CHILD_USES = {name: USES[name] for name in ("get", "incr", "put", "batch", "flush")}
UNWRITTEN_AT = 20  # "ack-unwritten": the write of thread 0 acknowledged without being made
_PR_SET_PDEATHSIG = 1


@dataclass
class SharedDirConfig:
    module: ClassVar[str] = "wbcache.fault_injection.shared_dir_worker"

    directory: str
    node: int  # this process's writers are (node, thread); its k-th child is node + k
    threads: int = 4
    options: dict[str, Any] = field(default_factory=dict)
    forks: int = 0  # children to fork while writing (at most 9)
    fork_interval: float = 0.1  # seconds between forks, about
    child_writes: int = 50
    seed: int = 0
    mutation: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SharedDirConfig:
        return cls(**json.loads(text))


def _replay_at_checkpoint() -> None:
    """A lane's checkpoint reads one lower: recovery and adoption replay the record AT the
    checkpoint, which a flush already applied, so its increments (deltas, in a shared
    directory) count twice (mutants/patches/replay-at-checkpoint.patch, for lanes)."""
    from wbcache.backends.lmdb import SharedLmdbBackend

    checkpoint = SharedLmdbBackend.checkpoint

    def one_lower(self: Any) -> int:
        return max(0, checkpoint(self) - 1)

    SharedLmdbBackend.checkpoint = one_lower  # type: ignore[method-assign]


# Bugs planted on purpose (tests/test_fault_shared.py): the campaign must report each.
# ack-unwritten: thread 0 acknowledges its write UNWRITTEN_AT without making it (the oracle
# must see an increment missing); replay-at-checkpoint: see `_replay_at_checkpoint`.
MUTATIONS = ("ack-unwritten", "replay-at-checkpoint")


def run(config: SharedDirConfig) -> None:
    if config.mutation == "replay-at-checkpoint":
        _replay_at_checkpoint()
    journal = Journal(1)
    cache = wbcache.open(config.directory, shared=True, **config.options)
    journal.emit(READY, os.getpid(), cache.recovery.replayed)
    for thread in range(config.threads):
        threading.Thread(target=_write, args=(cache, journal, config, config.node, thread),
                         daemon=True, name=f"writer-{thread}").start()
    if config.forks:
        threading.Thread(target=_fork, args=(cache, config), daemon=True,
                         name="forker").start()
    threading.Event().wait()  # until killed


def _write(cache: wbcache.Cache, journal: Journal, config: SharedDirConfig, node: int,
           thread: int, limit: int | None = None) -> bool:
    """Write until killed (or `limit` writes); False if a write raised (journaled)."""
    try:
        n = cache.get(marker_key(node, thread), 0)
    except Exception as exc:  # reported, then this thread stops: the harness judges it
        journal.emit(ERROR, node, thread, 0, type(exc).__name__, str(exc))
        return False
    journal.emit(MARKER, node, thread, n)
    while limit is None or n < limit:
        n += 1
        journal.emit(START, node, thread, n)
        try:
            if not (config.mutation == "ack-unwritten" and thread == 0 and n == UNWRITTEN_AT):
                with cache.batch() as batch:
                    write(batch, node, thread, n)
        except Exception as exc:  # reported, then this thread stops
            journal.emit(ERROR, node, thread, n, type(exc).__name__, str(exc))
            return False
        journal.emit(ACK, node, thread, n)
    return True


def _fork(cache: wbcache.Cache, config: SharedDirConfig) -> None:
    """The forker thread. It never returns: a child's PR_SET_PDEATHSIG fires when the thread
    that forked it ends, and it must fire only when the process dies."""
    rng = random.Random(f"wbcache-torture/shared-fork/{config.seed}/{config.node}")
    parent = os.getpid()
    for k in range(1, config.forks + 1):
        threading.Event().wait(config.fork_interval * rng.uniform(0.5, 1.5))  # pacing
        pid = os.fork()
        if pid == 0:
            _child(cache, config, config.node + k, parent, close=k % 2 == 1)
        threading.Thread(target=os.waitpid, args=(pid, 0), daemon=True).start()
    threading.Event().wait()


def _child(cache: wbcache.Cache, config: SharedDirConfig, node: int, parent: int,
           close: bool) -> None:
    """In a forked child (see the module docstring). Never returns."""
    code = 0
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl: die as it would have
            os.kill(os.getpid(), signal.SIGKILL)
        journal = Journal(1)  # a lock of its own: a parent's thread may hold the parent's
        journal.emit(FORK, node, refusals(cache, CHILD_USES))
        cache.reopen()
        if not _write(cache, journal, config, node, 0, limit=config.child_writes):
            code = 1
        if close:
            cache.close()
    except BaseException as exc:
        try:
            Journal(1).emit(ERROR, node, 0, 0, type(exc).__name__, str(exc))
        finally:
            code = 1
    finally:
        os._exit(code)


if __name__ == "__main__":
    run(SharedDirConfig.from_json(sys.argv[1]))
