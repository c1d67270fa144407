"""fork() while writing: every child must be refused every use of what it inherited, and
change nothing.

`Forker`, a thread of a worker, forks `count` children, about `interval` seconds apart, while
the writers run (the cache lock, the group commit and LMDB transactions are in use at the
moment of the fork). Each child tries every use in `USES` on the inherited `Cache` (and the
`AsyncCache` and the backend, when the worker has them): each must raise `ForkedCacheError`;
then `close()`, which must do nothing. It reports what happened through a pipe of its own and
leaves with `os._exit`. A child never touches the journal: a parent's thread may hold the
journal's lock at the fork, and in the child that lock would stay held forever. The forker
thread journals the report once the child is gone:

    [F, index, child pid, exit code, {use: outcome}]

A child that hangs (on a lock a parent's thread held at the fork) is ended by its own alarm
after `CHILD_ALARM` seconds: exit code -SIGALRM. Every key a child tries to write starts with
`CHILD_PREFIX`: a recovered key with that prefix is a write the child should never have made.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import random
import select
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import msgpack

from wbcache.errors import ForkedCacheError
from wbcache.fault_injection.journal import FORK, Journal
from wbcache.fault_injection.oracle import Tally

CHILD_PREFIX = "forked-child."
CHILD_ALARM = 15  # seconds a child may take before its alarm ends it
USE_TIMEOUT = 1.0  # seconds one use may block in a child before it is reported as blocked
_READ_TIMEOUT = CHILD_ALARM + 10.0
REFUSED = "refused"
CLOSED = "closed"  # close() returned without error, as it must


def _child_key(name: str) -> str:
    return f"{CHILD_PREFIX}{os.getpid()}.{name}"


def _batch(cache: Any) -> None:
    with cache.batch() as batch:
        batch.put(_child_key("batch"), 1)


# Every use a child may try on an inherited Cache; each must raise ForkedCacheError.
USES: dict[str, Callable[[Any], Any]] = {
    "get": lambda cache: cache.get("ctr:0"),
    "getitem": lambda cache: cache[_child_key("getitem")],
    "contains": lambda cache: "ctr:0" in cache,
    "len": lambda cache: len(cache),
    "items": lambda cache: cache.items(),
    "put": lambda cache: cache.put(_child_key("put"), 1),
    "setitem": lambda cache: cache.__setitem__(_child_key("setitem"), 1),
    "incr": lambda cache: cache.incr(_child_key("incr")),
    "delete": lambda cache: cache.delete(_child_key("delete")),
    "pop": lambda cache: cache.pop(_child_key("pop"), None),
    "setdefault": lambda cache: cache.setdefault(_child_key("setdefault"), 1),
    "put_many": lambda cache: cache.put_many({_child_key("put_many"): 1}),
    "update": lambda cache: cache.update({_child_key("update"): 1}),
    "batch": _batch,
    "flush": lambda cache: cache.flush(),
    "sync": lambda cache: cache.sync(),
    "stats": lambda cache: cache.stats(),
}
ASYNC_USES: dict[str, Callable[[Any], Any]] = {
    "async put": lambda acache: acache.put(_child_key("async"), 1),
    "async get": lambda acache: acache.get("ctr:0"),
    "async cache": lambda acache: acache.cache.put(_child_key("async-cache"), 1),
}
BACKEND_USES: dict[str, Callable[[Any], Any]] = {
    "backend get": lambda backend: backend.get("ctr:0"),
    # If this were accepted, the checkpoint would jump past every record in the log.
    "backend apply": lambda backend: backend.apply([(_child_key("backend"), b"\x01")], [],
                                                   1 << 40),
}


class Inherited:
    """What a child inherits: the worker's current cache objects, swapped under `lock` when
    the worker closes and reopens its cache (no fork happens in between), and the database
    (`database`: the library's backend itself, not the harness's wrappers around it, which
    would write to the journal)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.cache: Any = None
        self.acache: Any = None
        self.backend: Any = None  # what the cache was opened with (wrappers included)
        self.database: Any = None


class Forker:
    """Forks `count` children about `interval` seconds apart (see the module docstring)."""

    def __init__(self, inherited: Inherited, journal: Journal, journal_fd: int, *, count: int,
                 interval: float, seed: int) -> None:
        self._inherited = inherited
        self._journal = journal
        self._journal_fd = journal_fd
        self._count = count
        self._interval = interval
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="harness-forker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        for index in range(self._count):
            if self._stop.wait(self._interval * self._rng.uniform(0.5, 1.5)):
                return
            with self._inherited.lock:
                if self._inherited.cache is None:  # between two rounds: try again later
                    continue
                read_end, write_end = os.pipe()
                pid = os.fork()
                if pid == 0:
                    _child(self._inherited, self._journal_fd, read_end, write_end)
            os.close(write_end)
            report = _read_report(read_end)
            exit_code = _reap(pid)
            self._journal.emit(FORK, index, pid, exit_code, report)


def _child(inherited: Inherited, journal_fd: int, read_end: int, write_end: int) -> None:
    """In the child: try every use, report, leave. Never returns."""
    try:
        os.close(read_end)
        os.close(journal_fd)  # the parent's journal (and, as stdout, the harness's pipe)
        signal.alarm(CHILD_ALARM)
        outcome = refusals(inherited.cache, USES)
        if inherited.acache is not None:
            outcome.update(refusals(inherited.acache, ASYNC_USES))
        if inherited.database is not None:
            outcome.update(refusals(inherited.database, BACKEND_USES))
        if all(result == REFUSED for result in outcome.values()):
            outcome["close"] = _close_all(inherited)
        payload = msgpack.packb(outcome, use_bin_type=True)
        view = memoryview(payload)
        while view:
            view = view[os.write(write_end, view):]
    finally:
        os._exit(0)


def _close_all(inherited: Inherited) -> str:
    """close() what the child inherited: allowed, and it must do nothing (neither flush nor
    delete nor unlock). CLOSED, or what went wrong."""
    try:
        for owner in (inherited.cache, inherited.acache):
            if owner is not None:
                result = owner.close()
                if inspect.iscoroutine(result):
                    # AsyncCache.close is a coroutine, the disowned one's too: awaited, it
                    # must do nothing (the directory checks after the cycle see if it did)
                    asyncio.run(result)
    except BaseException as exc:
        return f"raised {type(exc).__name__}: {exc}"[:300]
    return CLOSED


def refusals(owner: Any, uses: Mapping[str, Callable[[Any], Any]]) -> dict[str, str]:
    """Per use: REFUSED if it raised ForkedCacheError, else what happened. Each use runs in a
    thread of its own: one that blocks (on a lock a parent's thread held at the fork, which
    stays held in the child forever) is reported as such after USE_TIMEOUT seconds, and the
    uses after it are not tried (they would block too), so the child still reports."""
    outcome = {}
    for name, use in uses.items():
        result: list[str] = []

        def attempt(use: Callable[[Any], Any] = use, result: list[str] = result) -> None:
            try:
                use(owner)
            except ForkedCacheError:
                result.append(REFUSED)
            except BaseException as exc:
                result.append(f"raised {type(exc).__name__}: {exc}"[:300])
            else:
                result.append("accepted")

        thread = threading.Thread(target=attempt, daemon=True)
        thread.start()
        thread.join(USE_TIMEOUT)
        if not result:
            outcome[name] = f"blocked for {USE_TIMEOUT} s (a lock held at the fork?)"
            break
        outcome[name] = result[0]
    return outcome


def _read_report(fd: int) -> dict[str, str]:
    chunks = []
    deadline = time.monotonic() + _READ_TIMEOUT
    try:
        while True:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return {"report": "none within the timeout"}
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    if not chunks:
        return {"report": "none (the child died before reporting)"}
    try:
        report = msgpack.unpackb(b"".join(chunks), raw=False)
    except Exception as exc:  # a report cut short: say so, the oracle flags it
        return {"report": f"unreadable: {exc}"}
    return report if isinstance(report, dict) else {"report": repr(report)}


def _reap(pid: int) -> int:
    deadline = time.monotonic() + _READ_TIMEOUT
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.005)  # polling a child's exit: there is no event to wait on


def check_forks(events: Iterable[list[Any]], state: Mapping[Any, Any], label: str
                ) -> tuple[Tally, int]:
    """The verdict on a worker's forked children: each must have been refused every use and
    ended cleanly, and no key a child tried to write may be in the recovered `state`.
    Returns the tally and how many children reported."""
    tally = Tally()
    children = 0
    for event in events:
        if event[0] != FORK:
            continue
        children += 1
        _, index, pid, exit_code, report = event
        wrong = {use: outcome for use, outcome in report.items()
                 if outcome not in (REFUSED, CLOSED)}
        if "close" not in report and "report" not in report:
            wrong["close"] = "never reached"
        if wrong or exit_code != 0:
            tally.fork += 1
            tally.note(f"{label}: forked child {index} (pid {pid}) ended with {exit_code}; "
                       f"uses not refused: {dict(list(wrong.items())[:6])}")
    written = [key for key in state if forked_key(key)]
    if written:
        tally.fork += len(written)
        tally.note(f"{label}: writes of forked children were recovered: {written[:6]}")
    return tally, children


def forked_key(key: Any) -> bool:
    text = key.decode("utf-8", "replace") if type(key) is bytes else key
    return type(text) is str and text.startswith(CHILD_PREFIX)
