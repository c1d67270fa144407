"""Simulated power loss: rebuild the disk as a power cut at any moment of a trace leaves it.

A worker runs with `SyscallRecorder` (trace.py) and `JournaledBackend`, so its journal file
holds, in order, every file operation of the log (with the bytes written), every database
commit (with its data), and every operation's start and acknowledgement. After the worker is
killed, `DiskModel` replays a prefix of that trace (the moment of the power cut) and
`materialize` writes out one disk state power loss could leave at that moment:

  * bytes a file never had fsync'd are dropped, kept, or torn: a random prefix of them is
    kept, optionally followed by garbage or by zeros, or some of their 4 KiB pages reach the
    disk and others do not (the TEAR_MODES);
  * a file whose directory entry was never fsync'd (created, no fsync of its directory
    since) is dropped or kept, at random;
  * an unlink whose directory was not fsync'd since is undone (the file comes back with its
    durable content) or not, at random;
  * the database (LMDB, written by its own C code with sync on) holds every commit that had
    returned; one in progress is kept or not, at random: LMDB commits are atomic and durable
    once they return, and this harness takes that as given instead of modelling LMDB's pages.

The states are then recovered with the public API and checked by the oracle against the
operations acknowledged BEFORE the cut. Every random choice comes from a generator seeded by
(seed, run, state), so a state can be rebuilt from those numbers and the run's trace.
"""

from __future__ import annotations

import math
import os
import random
import shutil
from dataclasses import dataclass, field
from typing import Any

import wbcache
from wbcache.fault_injection.campaign import Outcome, Settings, check_after_crash, keep_evidence
from wbcache.fault_injection.journal import (
    CLOSE,
    DB_BEGIN,
    DB_DONE,
    DIR_SYNC,
    OPEN,
    RENAME,
    SYNC,
    TRUNCATE,
    UNLINK,
    WRITE,
)
from wbcache.fault_injection.oracle import journals_from
from wbcache.fault_injection.runner import prepare_directory, recover, run_worker_to_file
from wbcache.fault_injection.worker import WorkerConfig

TEAR_MODES = (("drop", 20), ("keep", 10), ("prefix", 25), ("garbage", 15), ("zeros", 15),
              ("pages", 15))
PAGE = 4096
# Where power is cut: right after an event of these kinds, or ("" ) anywhere.
_CUT_AFTER_WEIGHTS = ((WRITE, 40), (OPEN, 10), (UNLINK, 15), (DB_BEGIN, 15), ("", 20))
_CUT_AFTER = tuple(tag for tag, _ in _CUT_AFTER_WEIGHTS if tag)


class UnsupportedTrace(Exception):
    """The trace holds a file operation this model does not simulate."""


@dataclass
class _File:
    path: str  # relative to the cache directory
    content: bytearray
    synced: int  # bytes [0, synced) are durable
    created_durable: bool  # its directory entry survives power loss
    removed: bool = False  # unlinked (the unlink may not be durable yet)

    @property
    def directory(self) -> str:
        return os.path.dirname(self.path) or "."


@dataclass
class Choices:
    """The random choices that made one power-loss state."""

    tear: str
    dropped: list[str] = field(default_factory=list)  # created files whose entry was lost
    resurrected: list[str] = field(default_factory=list)  # unlinks undone
    unsynced: list[tuple[str, int, int]] = field(default_factory=list)  # (file, bytes, left)
    commit_in_flight: bool | None = None  # kept / lost / there was none

    def __str__(self) -> str:
        notes = [f"tear={self.tear}"]
        notes += [f"{name}: {count} unsynced bytes, {left} left"
                  for name, count, left in self.unsynced]
        notes += [f"dropped {name}" for name in self.dropped]
        notes += [f"resurrected {name}" for name in self.resurrected]
        if self.commit_in_flight is not None:
            notes.append(f"commit in flight {'kept' if self.commit_in_flight else 'lost'}")
        return "; ".join(notes)


class DiskModel:
    """The log files and database commits as the trace has them so far."""

    def __init__(self, base_files: dict[str, bytes]) -> None:
        self.files = {path: _File(path, bytearray(data), len(data), True)
                      for path, data in base_files.items()}
        self.unlinked: list[_File] = []  # removed, the unlink not yet made durable
        self.fds: dict[int, _File] = {}
        self.commits: list[tuple[int, list[Any], list[Any]]] = []
        self.in_progress: tuple[int, list[Any], list[Any]] | None = None  # begun, not returned

    @classmethod
    def from_directory(cls, root: str) -> DiskModel:
        wal = os.path.join(root, "wal")
        files = {}
        for name in sorted(os.listdir(wal)):
            with open(os.path.join(wal, name), "rb") as file:
                files[f"wal/{name}"] = file.read()
        return cls(files)

    def apply(self, event: list[Any]) -> None:
        tag = event[0]
        if tag == OPEN:
            _, fd, path, created, append = event
            if not append:
                raise UnsupportedTrace(f"{path} opened without O_APPEND")
            if created or path not in self.files:
                if not created:
                    raise UnsupportedTrace(f"{path} opened but unknown to the model")
                self.files[path] = _File(path, bytearray(), 0, False)
            self.fds[fd] = self.files[path]
        elif tag == WRITE:
            self.fds[event[1]].content += event[2]
        elif tag == SYNC:
            file = self.fds[event[1]]
            file.synced = len(file.content)
        elif tag == CLOSE:
            self.fds.pop(event[1], None)
        elif tag == UNLINK:
            file = self.files.pop(event[1])
            file.removed = True
            self.unlinked.append(file)
        elif tag == DIR_SYNC:
            directory = os.path.normpath(event[1])
            for file in self.files.values():
                if file.directory == directory:
                    file.created_durable = True
            self.unlinked = [file for file in self.unlinked if file.directory != directory]
        elif tag == DB_BEGIN:
            if event[2] is None or event[4]:
                raise UnsupportedTrace("a commit without its data, or with increments (the "
                                       "model rebuilds LMDB, which takes values)")
            self.in_progress = (event[1], event[2], event[3])
        elif tag == DB_DONE:
            assert self.in_progress is not None and self.in_progress[0] == event[1]
            self.commits.append(self.in_progress)
            self.in_progress = None
        elif tag in (TRUNCATE, RENAME):
            raise UnsupportedTrace(f"the model does not simulate {event!r}")

    def materialize(self, rng: random.Random, base: str, dest: str,
                    tear: str | None = None) -> Choices:
        """Write one power-loss state into `dest` (a copy of `base` with the log and database
        as of now); return the random choices made. `tear` imposes a TEAR_MODES entry."""
        shutil.copytree(base, dest, symlinks=True)
        wal = os.path.join(dest, "wal")
        for name in os.listdir(wal):
            os.unlink(os.path.join(wal, name))
        choices = Choices(tear or _weighted(rng, TEAR_MODES))
        survivors = []
        for file in self.files.values():
            if file.created_durable or rng.random() < 0.5:
                survivors.append(file)
            else:
                choices.dropped.append(os.path.basename(file.path))
        for file in self.unlinked:
            if (file.created_durable or rng.random() < 0.5) and rng.random() < 0.5:
                survivors.append(file)
                choices.resurrected.append(os.path.basename(file.path))
        for file in survivors:
            unsynced = bytes(file.content[file.synced:])
            data = bytes(file.content[:file.synced]) + _tear(rng, choices.tear, unsynced,
                                                              file.synced)
            if unsynced:
                choices.unsynced.append((os.path.basename(file.path), len(unsynced),
                                         len(data) - file.synced))
            with open(os.path.join(dest, file.path), "wb") as out:
                out.write(data)
        commits = list(self.commits)
        if self.in_progress is not None:
            choices.commit_in_flight = rng.random() < 0.5
            if choices.commit_in_flight:
                commits.append(self.in_progress)
        if commits:
            _commit_all(os.path.join(dest, "db"), commits)
        return choices


def _weighted(rng: random.Random, choices: tuple[tuple[str, int], ...]) -> str:
    roll = rng.randrange(sum(weight for _, weight in choices))
    for name, weight in choices:
        if roll < weight:
            return name
        roll -= weight
    raise AssertionError("unreachable")


def _tear(rng: random.Random, mode: str, unsynced: bytes, at: int) -> bytes:
    """What is left of the `unsynced` bytes that started at file offset `at`."""
    if not unsynced or mode == "drop":
        return b""
    if mode == "keep":
        return unsynced
    kept = unsynced[:rng.randint(0, len(unsynced))]
    if mode == "prefix":
        return kept
    if mode == "pages":  # each page that holds unsynced bytes made it to disk, or holds zeros
        torn = bytearray(unsynced)
        start = 0
        while start < len(torn):
            end = min(len(torn), (at + start) // PAGE * PAGE + PAGE - at)
            if rng.random() < 0.5:
                torn[start:end] = bytes(end - start)
            start = end
        return bytes(torn)
    filler = rng.randint(1, max(1, len(unsynced) - len(kept)) + 64)
    return kept + (rng.randbytes(filler) if mode == "garbage" else bytes(filler))


def _commit_all(db_path: str, commits: list[tuple[int, list[Any], list[Any]]]) -> None:
    """Apply the commits, in order, as one transaction with the last one's checkpoint."""
    state: dict[Any, bytes | None] = {}
    for _, puts, deletes in commits:
        for key, value in puts:
            state[key] = value
        for key in deletes:
            state[key] = None
    backend = wbcache.LmdbBackend(db_path)
    try:
        backend.apply([(key, value) for key, value in state.items() if value is not None],
                      [key for key, value in state.items() if value is None], commits[-1][0])
    finally:
        backend.close()


def choose_cuts(rng: random.Random, events: list[list[Any]], count: int) -> list[int]:
    """`count` moments to cut power, as numbers of trace events that happened; always
    including the real kill (all of them). Most fall right after a write (its bytes not yet
    fsync'd), a segment's creation or deletion (its directory not yet fsync'd) or the start of
    a commit (in flight); the rest anywhere."""
    total = len(events)
    after: dict[str, list[int]] = {tag: [] for tag in _CUT_AFTER}
    for index, event in enumerate(events):
        if event[0] in after:
            after[event[0]].append(index + 1)
    cuts = [total]
    while len(cuts) < count:
        tag = _weighted(rng, _CUT_AFTER_WEIGHTS)
        if after.get(tag):
            cuts.append(rng.choice(after[tag]))
        else:
            cuts.append(rng.randint(0, total))
    return sorted(cuts)


def _options(rng: random.Random) -> dict[str, Any]:
    return {
        "fsync": "always",
        "segment_size": rng.choice([4096, 8192]),
        "flush_interval": rng.choice([0.005, 0.02, 0.1]),
        "flush_threshold": rng.choice([20, 200, 10_000]),
    }


def run_powerloss(settings: Settings, states_per_run: int = 25) -> Outcome:
    """`settings.cycles` power-loss states, `states_per_run` from each worker's trace."""
    rng = random.Random(f"wbcache-torture/powerloss/{settings.seed}")
    outcome = Outcome("powerloss")
    runs = math.ceil(settings.cycles / states_per_run)
    carried: dict[Any, Any] = {}
    base = settings.path("powerloss", "base")
    worker_dir = settings.path("powerloss", "worker")
    state_dir = settings.path("powerloss", "state")
    trace = settings.path("powerloss", "run.trace")
    states = runs_done = 0
    seen = {"unsynced": 0, "torn": 0, "dropped": 0, "resurrected": 0, "kept": 0, "lost": 0}
    for run in range(runs):
        if settings.expired():
            break
        if run % settings.cycles_per_dir == 0:
            shutil.rmtree(base, ignore_errors=True)
            prepare_directory(base)
            carried = {}
        shutil.rmtree(worker_dir, ignore_errors=True)
        shutil.copytree(base, worker_dir, symlinks=True)
        if os.path.exists(trace):
            os.unlink(trace)
        config = WorkerConfig(directory=worker_dir, seed=settings.seed, cycle=run,
                              threads=settings.threads, options=_options(rng), journal=trace,
                              record="full", kill_after_acks=rng.randint(50, 1200),
                              async_tasks=rng.choice([0, 2]))
        worker = run_worker_to_file(config, settings.path("powerloss", "scratch"))
        runs_done += 1
        if not worker.sigkilled:
            outcome.tally.errors += 1
            outcome.tally.note(f"power loss run {run}: the worker ended with "
                               f"{worker.returncode}: {worker.stderr[-2000:]}")
            continue
        count = min(states_per_run, settings.cycles - states)
        cuts = choose_cuts(rng, worker.events, count)
        model = DiskModel.from_directory(base)
        applied = 0
        next_carried: dict[Any, Any] = carried
        for index, cut in enumerate(cuts):
            for event in worker.events[applied:cut]:
                model.apply(event)
            applied = cut
            shutil.rmtree(state_dir, ignore_errors=True)
            choices = model.materialize(random.Random(f"{settings.seed}/{run}/{index}"), base,
                                        state_dir)
            seen["unsynced"] += bool(choices.unsynced)
            seen["torn"] += any(left != count for _, count, left in choices.unsynced)
            seen["dropped"] += len(choices.dropped)
            seen["resurrected"] += len(choices.resurrected)
            if choices.commit_in_flight is not None:
                seen["kept" if choices.commit_in_flight else "lost"] += 1
            last = index == len(cuts) - 1
            if last:  # the next run's worker starts from this crash, and recovers it
                next_base = settings.path("powerloss", "next-base")
                shutil.rmtree(next_base, ignore_errors=True)
                shutil.copytree(state_dir, next_base, symlinks=True)
            label = (f"power loss run {run} state {index} (cut at event {cut} of "
                     f"{len(worker.events)}: {choices})")
            recovered = recover(state_dir)
            tally = check_after_crash(recovered, carried, seed=settings.seed, cycle=run,
                                      journals=journals_from(worker.events[:cut]), label=label)
            if tally.violations:
                where = keep_evidence(settings, f"powerloss-run{run}-state{index}", base, trace)
                tally.note(f"{label}: the run's starting directory and trace are kept in "
                           f"{where}; rebuild the state with seed {settings.seed}")
            outcome.tally.add(tally)
            states += 1
            if last:
                next_carried = recovered.state
        shutil.rmtree(base, ignore_errors=True)
        os.rename(settings.path("powerloss", "next-base"), base)
        carried = next_carried
        settings.say(f"power loss run {run + 1}/{runs}: {len(cuts)} states from "
                     f"{len(worker.events):,} trace events, "
                     f"{outcome.tally.acknowledged:,} acknowledged so far, "
                     f"violations {outcome.tally.violations}")
    outcome.rows["power-loss states (worker runs)"] = f"{states:,} ({runs_done:,})"
    outcome.rows["  states with unsynced bytes (torn)"] = f"{seen['unsynced']:,} ({seen['torn']:,})"
    outcome.rows["  new files dropped / unlinks undone"] = (f"{seen['dropped']:,} / "
                                                           f"{seen['resurrected']:,}")
    outcome.rows["  commit in flight kept / lost"] = f"{seen['kept']:,} / {seen['lost']:,}"
    return outcome
