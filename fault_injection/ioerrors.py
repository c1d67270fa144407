"""I/O errors: ENOSPC and EIO on the Nth write, fsync, open, directory fsync, unlink or rename
of the log, for every N a short scripted run makes; and database errors during flushes.

`FaultySyscalls` sits on `wbcache.wal.syscalls.SYSCALLS` (in this process). It counts calls,
fails the chosen one (a failing write first writes a random part of its data, as a disk that
fills up mid-write does), and keeps two ledgers that turn the guarantee into checks:

  * durability: per file, how many bytes the last SUCCESSFUL fsync covered, and which LSNs
    every write carried. Each acknowledged write must be covered by then, or already be in
    the database. After a failed fsync nothing more is covered, so this is exactly "no write
    is acknowledged after a failed fsync";
  * truncation: a segment may be deleted only once the database has committed every record
    in it (checked against `ControlledBackend.committed` before each unlink).

The script (single writer, deterministic) opens a cache, writes, flushes, writes, closes, then
does it again (the second open recovers the first's log). Writers stop at their first error,
which must be a `LogFailedError`, and then a probe write must be refused too. Afterwards the
directory is reopened without faults and checked by the oracle: every acknowledged write is
there, the failed one may or may not be. A second sweep runs four writer threads at once with
failing fsyncs and writes; a third fails the database's Nth commit, once, for good, or for
an outage: every commit from the Nth on fails until the phase's writers are done, so a flush
gives up, writes go on, and the close's flush must commit what the failed one held.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import wbcache
from wbcache.fault_injection.backends import ControlledBackend
from wbcache.fault_injection.campaign import Outcome, Settings
from wbcache.fault_injection.logfile import frame_lsns, segment_last_lsn
from wbcache.fault_injection.oracle import Tally, ThreadJournal, check_cycle
from wbcache.fault_injection.workload import ThreadWorkload, cycle_prefix, execute, owner
from wbcache.wal.format import SEGMENT_MAGIC
from wbcache.wal.syscalls import SYSCALLS

KINDS = ("write", "fdatasync", "fsync", "fsync_dir", "open", "unlink", "rename")
ERRNOS = (errno.ENOSPC, errno.EIO)
_OPTIONS = {"segment_size": 4096, "flush_interval": 3600.0, "flush_threshold": 1_000_000,
            "flush_timeout": 0.2}
_DATABASE_FAULTS = {"once": "database commit {} fails once",
                    "always": "database commits from {} on fail",
                    "outage": "database commits from {} fail until the writers are done"}
_OPS_PER_PHASE = 30
_FLUSH_AFTER = 15  # ops into each phase


class InjectedIOError(OSError):
    """The error `FaultySyscalls` raises on purpose."""


class FaultySyscalls:
    """Counts the log's file operations; fails call `nth` of `kind` with `err`; keeps ledgers."""

    def __init__(self, kind: str | None = None, nth: int = 0, err: int = errno.EIO,
                 rng: random.Random | None = None,
                 committed: Callable[[], int] | None = None) -> None:
        self.kind, self.nth, self.err = kind, nth, err
        self.counts = dict.fromkeys(KINDS, 0)
        self.fired = False
        self.violations: list[str] = []
        self._rng = rng or random.Random(0)
        self._committed = committed or (lambda: 0)
        self._lock = threading.Lock()
        self._written: dict[int, int] = {}  # fd -> bytes handed to the OS
        self._paths: dict[int, str] = {}
        self._synced: dict[str, int] = {}  # path -> bytes covered by its last good fsync
        self._lsn_end: dict[int, tuple[str, int]] = {}  # lsn -> (path, end offset)
        self._saved: dict[str, Any] = {}
        self._real: dict[str, Any] = {}

    def install(self) -> None:
        for name in KINDS + ("close",):
            self._real[name] = getattr(SYSCALLS, name)
            if name in vars(SYSCALLS):
                self._saved[name] = vars(SYSCALLS)[name]
        for name in KINDS:
            setattr(SYSCALLS, name, getattr(self, f"_{name}"))

    def uninstall(self) -> None:
        for name in KINDS + ("close",):
            if name in self._saved:
                setattr(SYSCALLS, name, self._saved[name])
            elif name in vars(SYSCALLS):
                delattr(SYSCALLS, name)

    def _due(self, kind: str) -> bool:
        with self._lock:
            self.counts[kind] += 1
            due = kind == self.kind and self.counts[kind] == self.nth
            self.fired = self.fired or due
            return due

    def _fail(self, kind: str) -> InjectedIOError:
        return InjectedIOError(self.err, f"injected {os.strerror(self.err)} on {kind} call "
                                         f"{self.nth}")

    def _open(self, path: str, flags: int, mode: int = 0o777) -> int:
        if self._due("open"):
            raise self._fail("open")
        fd = int(self._real["open"](path, flags, mode))
        with self._lock:
            self._paths[fd], self._written[fd] = path, 0
            self._synced.setdefault(path, 0)
        return fd

    def _write(self, fd: int, data: bytes | memoryview) -> int:
        if self._due("write"):
            part = bytes(data[:self._rng.randint(0, len(data) - 1)]) if len(data) else b""
            if part:
                self._real["write"](fd, part)
            raise self._fail("write")
        written = int(self._real["write"](fd, data))
        chunk = bytes(data[:written])
        with self._lock:
            start = self._written.get(fd, 0)
            self._written[fd] = start + written
            path = self._paths.get(fd)
            if path is not None and not chunk.startswith(SEGMENT_MAGIC):
                for lsn in frame_lsns(chunk):
                    self._lsn_end[lsn] = (path, start + written)
        return written

    def _sync(self, kind: str, fd: int) -> None:
        if self._due(kind):
            with self._lock:  # a failed fsync covers nothing, now or ever (pages may be gone)
                self._paths.pop(fd, None)
            raise self._fail(kind)
        with self._lock:
            covered = self._written.get(fd, 0)  # what was written before the call
        self._real[kind](fd)
        with self._lock:
            path = self._paths.get(fd)
            if path is not None:
                self._synced[path] = max(self._synced.get(path, 0), covered)

    def _fdatasync(self, fd: int) -> None:
        self._sync("fdatasync", fd)

    def _fsync(self, fd: int) -> None:
        self._sync("fsync", fd)

    def _fsync_dir(self, path: str) -> None:
        if self._due("fsync_dir"):
            raise self._fail("fsync_dir")
        self._real["fsync_dir"](path)

    def _unlink(self, path: str) -> None:
        if os.path.basename(path).endswith(".log") and os.path.exists(path):
            last, committed = segment_last_lsn(path), self._committed()
            if last > committed:
                with self._lock:
                    self.violations.append(f"segment {os.path.basename(path)} (records up to "
                                           f"LSN {last}) deleted while the database had only "
                                           f"{committed}")
        if self._due("unlink"):
            raise self._fail("unlink")
        self._real["unlink"](path)

    def _rename(self, src: str, dst: str) -> None:
        if self._due("rename"):
            raise self._fail("rename")
        self._real["rename"](src, dst)

    def check_ack(self, lsn: int, label: str) -> None:
        """Writer `lsn` was just acknowledged: it must be fsync'd or in the database."""
        with self._lock:
            where = self._lsn_end.get(lsn)
            durable = where is not None and self._synced.get(where[0], 0) >= where[1]
        if not durable and lsn > self._committed():
            with self._lock:
                self.violations.append(f"{label}: LSN {lsn} acknowledged before any fsync "
                                       f"covered it")


@dataclass
class ScriptRun:
    journals: dict[int, dict[int, ThreadJournal]] = field(default_factory=dict)  # per cycle
    notes: list[str] = field(default_factory=list)  # violations seen while running


def _writer(cache: wbcache.Cache, faulty: FaultySyscalls, seed: int, cycle: int, thread: int,
            count: int, journal: ThreadJournal, run: ScriptRun,
            flush_after: int | None = None) -> None:
    """Run `count` ops; at the first error check it and probe once more, then stop."""
    workload = ThreadWorkload(seed, cycle, thread)
    for seq in range(count):
        if flush_after is not None and seq == flush_after:
            try:
                cache.flush()
            except wbcache.WbcacheError:
                pass  # allowed (the database may be failing); the log keeps everything
        op = workload.next()
        journal.start(seq)
        try:
            result = execute(cache, op)
        except Exception as exc:  # the op stays started, not acknowledged: it may survive
            if not isinstance(exc, wbcache.LogFailedError):
                run.notes.append(f"cycle {cycle} thread {thread} op {seq} raised "
                                 f"{type(exc).__name__}, not LogFailedError: {exc}")
            try:
                lsn = cache.put(f"probe.{cycle}.{thread}", seq)
            except wbcache.LogFailedError:
                return
            except Exception as probe_exc:
                run.notes.append(f"a write after the failure raised {type(probe_exc).__name__}"
                                 f", not LogFailedError: {probe_exc}")
                return
            run.notes.append(f"cycle {cycle} thread {thread}: a write was acknowledged (LSN "
                             f"{lsn}) after the log failed")
            return
        journal.ack(seq, result)
        if op.returns_lsn:
            faulty.check_ack(result, f"cycle {cycle} thread {thread} op {seq}")


def run_script(directory: str, faulty: FaultySyscalls, backend_of: Callable[[], ControlledBackend],
               seed: int, *, threads: int = 1, outage: _Outage | None = None) -> ScriptRun:
    """Two phases (cycles 0 and 1): open, write, flush, write, (the `outage` ends,) close;
    see the module doc."""
    run = ScriptRun()
    for cycle in (0, 1):
        journals = run.journals.setdefault(cycle, {})
        try:
            backend = backend_of()
        except Exception:  # allowed: an injected error while opening the database
            continue
        faulty._committed = lambda backend=backend: backend.committed  # type: ignore[misc]
        try:
            cache = wbcache.open(directory, backend=backend, **_OPTIONS)
        except Exception:  # allowed: an injected error while creating a segment or recovering
            backend.close()
            continue
        try:
            workers = [threading.Thread(
                target=_writer, args=(cache, faulty, seed, cycle, thread,
                                      _OPS_PER_PHASE, journals.setdefault(thread, ThreadJournal()),
                                      run, _FLUSH_AFTER if threads == 1 else None))
                for thread in range(threads)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
            if outage is not None:
                outage.end()
        finally:
            try:
                cache.close()
            except Exception:  # allowed: the final flush or sync may meet the injected error
                pass
            backend.close()
    return run


def _verify(directory: str, run: ScriptRun, faulty: FaultySyscalls, seed: int,
            label: str) -> Tally:
    tally = Tally(cycles=1)
    for note in run.notes + faulty.violations:
        tally.errors += 1
        tally.note(f"{label}: {note}")
    try:
        with wbcache.open(directory) as cache:
            state = dict(cache.items())
            last = cache.stats()["next_lsn"] - 1
    except Exception as exc:
        tally.errors += 1
        tally.note(f"{label}: reopening without faults failed: {type(exc).__name__}: {exc}")
        return tally
    for key in state:
        if isinstance(key, str) and key.startswith("probe."):
            tally.phantom += 1
            tally.note(f"{label}: a refused probe write {key!r} was recovered")
    for cycle, journals in run.journals.items():
        prefix = cycle_prefix(cycle)
        mine = {key: value for key, value in state.items()
                if (who := owner(key)) is not None and who[0] == cycle}
        verdict = check_cycle(mine, {}, seed=seed, cycle=cycle, journals=journals,
                              recovered_last_lsn=last, label=f"{label} {prefix}")
        verdict.cycles = 0
        tally.add(verdict)
    return tally


class _Outage:
    """The database refuses every commit from the `nth` on (counted per phase, as every
    plan's are) until `end`, called once a phase's writers are done. An outage that had not
    begun by then (the `nth` commit is the close's flush) is not ended: that phase closes
    as under "always", and the next phase's `nth` commit begins it again."""

    def __init__(self, nth: int) -> None:
        self.nth = nth
        self.refused = 0
        self.over = False

    def __call__(self, commit: int) -> bool:
        refuse = commit >= self.nth and not self.over
        self.refused += refuse
        return refuse

    def end(self) -> None:
        self.over = self.refused > 0  # one that has not begun yet begins in a later phase


def _backends(directory: str, database: str | None, nth: int, outage: _Outage | None = None
              ) -> Callable[[], ControlledBackend]:
    """Opens the directory's database, failing its `nth` commit (`database` "once"), every
    commit from the `nth` on ("always"), those `outage` refuses ("outage"), or none."""
    fail_when: Callable[[int], bool] | None = None
    if database == "once":
        fail_when = nth.__eq__
    elif database == "always":
        fail_when = nth.__le__
    elif database == "outage":
        fail_when = outage

    def open_backend() -> ControlledBackend:
        return ControlledBackend(wbcache.LmdbBackend(os.path.join(directory, "db")), fail_when)

    return open_backend


def _fresh(directory: str) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    wbcache.open(directory).close()


def run_ioerrors(settings: Settings) -> Outcome:
    """Sweeps of every N for every kind and errno, ceil(cycles / 50) rounds of workloads."""
    outcome = Outcome("ioerrors")
    directory = settings.path("ioerrors", "cache")
    rounds = max(1, -(-settings.cycles // 50))
    runs = fired = 0
    for round_ in range(rounds):
        if settings.expired():
            break
        seed = settings.seed * 1000 + round_
        plans, baseline = _plans(directory, seed)
        outcome.tally.add(baseline)
        for kind, nth, err, threads, database in plans:
            if settings.expired():
                break
            _fresh(directory)
            rng = random.Random(f"wbcache-torture/ioerrors/{seed}/{kind}/{nth}/{err}")
            faulty = FaultySyscalls(None if database else kind, nth, err, rng)
            outage = _Outage(nth) if database == "outage" else None
            faulty.install()
            try:
                script = run_script(directory, faulty, _backends(directory, database, nth, outage),
                                    seed, threads=threads, outage=outage)
            finally:
                faulty.uninstall()
            what = _DATABASE_FAULTS[database].format(nth) if database else (
                f"{kind} call {nth} fails with {errno.errorcode[err]}")
            tally = _verify(directory, script, faulty, seed,
                            f"I/O errors round {round_} ({what}, {threads} thread(s))")
            outcome.tally.add(tally)
            runs += 1
            fired += faulty.fired or bool(database)
        settings.say(f"I/O errors round {round_ + 1}/{rounds}: {runs:,} injected runs, "
                     f"violations {outcome.tally.violations}")
    outcome.rows["I/O error runs (fired)"] = f"{runs:,} ({fired:,})"
    return outcome


def _plans(directory: str, seed: int) -> tuple[list[tuple[str, int, int, int, str | None]],
                                               Tally]:
    """Count each kind's calls (and the database's commits) in a fault-free run, checked like
    the others, then plan one run per (kind, N, errno), plus threaded fsync/write sweeps and
    database failures."""
    _fresh(directory)
    counting = FaultySyscalls()
    commits: list[ControlledBackend] = []

    def backend_of() -> ControlledBackend:
        backend = ControlledBackend(wbcache.LmdbBackend(os.path.join(directory, "db")))
        commits.append(backend)
        return backend

    counting.install()
    try:
        script = run_script(directory, counting, backend_of, seed)
    finally:
        counting.uninstall()
    baseline = _verify(directory, script, counting, seed, "I/O errors, fault-free run")
    plans: list[tuple[str, int, int, int, str | None]] = []
    for kind in KINDS:
        for nth in range(1, counting.counts[kind] + 1):
            for err in ERRNOS:
                plans.append((kind, nth, err, 1, None))
    for kind in ("fdatasync", "write"):
        for nth in range(1, 25, 3):
            plans.append((kind, nth, errno.EIO, 4, None))
    applies = max(backend.applies for backend in commits) if commits else 0
    for nth in range(1, max(applies, 1) + 1):
        plans.append(("", nth, 0, 1, "once"))
        plans.append(("", nth, 0, 1, "always"))
        plans.append(("", nth, 0, 1, "outage"))
    return plans, baseline
