"""`ReadGate`: the transactions of one process's LMDB environment, and the moments that need
none open or none starting (wbcache/backends/lmdb.py: resizing the map, a fork, an abort).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from wbcache.wal.commit import Condition

PREFER_RESIZER = 0.1  # s a new transaction waits at most for a waiting resizer
# Read-only transactions open at once in one process. Each holds a slot of LMDB's reader table
# (py-lmdb opens with MDB_NOTLS), which has 126 for every process of the machine unless the
# environment asks for more (lmdb.py asks for MAX_READERS): past it, a read raised
# ReadersFullError. A thread beyond this many waits for a slot instead.
READ_SLOTS = 120
RECHECK = 1.0  # s a wait lasts at most before it looks again (a notify an interrupt skipped)


class ReadGate:
    """Many transactions (at most READ_SLOTS read-only ones) or one resizer (or a fork about
    to happen); and, while a write transaction is aborted, no new transaction.

    Two rules keep threads that read in a loop from starving the rest:
      * a resizer (or a fork) that waits keeps new transactions out, for PREFER_RESIZER at
        most, so that the open ones end and it gets its turn; a thread that already has one
        open is not held off (it would wait for itself), and the limit keeps any other wait
        of that kind finite (a thread scanning a snapshot that waits for another thread's
        read);
      * py-lmdb (3.0) aborts a write transaction only once no other thread is inside an LMDB
        call, which readers in a loop can put off for minutes: an abort keeps new
        transactions out meanwhile, and the calls in flight end by themselves.
    A thread waiting here is never inside an LMDB call, so neither rule can deadlock
    (tests/test_lmdb_readers.py). Nor can the slots: a thread that already has a transaction
    open takes another without waiting for one. A resizer must hold none itself (it would
    wait for itself): lmdb.py's callers do not resize from inside a transaction of theirs.
    """

    def __init__(self) -> None:
        # Entered through its lock, whose `with` is C's, not the Condition's (why:
        # wal/commit.py's `Event`): a reader interrupted there kept the lock, and the
        # flusher's next write waited for good. A skipped notify costs RECHECK at most.
        self._lock = threading.Lock()
        self._cond = Condition(self._lock)
        self._readers = 0
        self._slots = 0  # read-only transactions open (`reading(slot=True)`)
        self._open: dict[int, int] = {}  # thread ident -> transactions it has open here
        self._resizing = False
        self._wanted = 0  # resizers and forks waiting for the transactions to end
        self._aborting = False

    @contextmanager
    def reading(self, slot: bool = True) -> Iterator[None]:
        """Around one transaction; `slot`: a read-only one (it takes a reader slot)."""
        me = threading.get_ident()
        counted = False
        try:
            with self._lock:
                self._wait_to_read(me, slot)
                # No call from here to `counted`: an interrupt lands before or after, whole.
                self._readers += 1
                self._slots += slot
                self._open[me] = self._open[me] + 1 if me in self._open else 1
                counted = True
            yield
        finally:
            if counted:
                with self._lock:
                    self._readers -= 1
                    self._slots -= slot
                    if self._open[me] == 1:
                        del self._open[me]
                    else:
                        self._open[me] -= 1
                    if not self._readers or slot and self._slots == READ_SLOTS - 1:
                        self._cond.notify_all()

    def nested(self) -> bool:
        """Whether this thread, inside `reading`, has another transaction open too."""
        with self._lock:
            return self._open.get(threading.get_ident(), 0) > 1

    def _wait_to_read(self, me: int, slot: bool) -> None:
        """Wait out a resize or an abort, every slot taken, and a waiting resizer for
        PREFER_RESIZER at most (class docstring). Condition held."""
        deadline = None
        while (self._resizing or self._aborting or me not in self._open and (
                self._wanted or slot and self._slots >= READ_SLOTS)):
            if self._resizing or self._aborting or self._slots >= READ_SLOTS and slot:
                self._cond.wait(RECHECK)
                continue
            if deadline is None:
                deadline = time.monotonic() + PREFER_RESIZER
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._cond.wait(remaining)

    def abort(self, txn: Any) -> None:
        """Abort the write transaction `txn` (its thread is inside `reading`) with new
        transactions held off (class docstring)."""
        mine = False
        try:
            with self._lock:
                while self._aborting:  # one writer at a time in LMDB anyway
                    self._cond.wait(RECHECK)
                mine = True  # first: an interrupt must never leave the flag set
                self._aborting = True
            txn.abort()
        finally:
            if mine:
                with self._lock:
                    self._aborting = False
                    self._cond.notify_all()

    @contextmanager
    def resizing(self) -> Iterator[None]:
        self.acquire_exclusive(None)
        try:
            yield
        finally:
            self.release_exclusive()

    def acquire_exclusive(self, timeout: float | None) -> bool:
        """Wait until no transaction is open and keep new ones out; False after `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            try:
                self._wanted += 1  # inside the try: an interrupt cannot leave it counted
                while self._resizing or self._readers:
                    remaining = RECHECK if deadline is None else deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self._cond.wait(min(remaining, RECHECK))
                self._resizing = True
                return True
            finally:
                self._wanted -= 1
                self._cond.notify_all()  # readers held off for us may go (or wait on us)

    def release_exclusive(self) -> None:
        with self._lock:
            self._resizing = False
            self._cond.notify_all()
