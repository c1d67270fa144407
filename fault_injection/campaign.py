"""What every campaign shares: its settings, the check after a crash, keeping evidence."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from wbcache.fault_injection.forks import check_forks, forked_key
from wbcache.fault_injection.oracle import Tally, ThreadJournal, check_cycle
from wbcache.fault_injection.runner import Recovered


@dataclass
class Settings:
    """How long and how hard a campaign runs, and where."""

    workdir: str  # scratch space; failures are kept under workdir/failures/
    seed: int
    cycles: int  # crashes to check (cases, for the in-process campaigns)
    threads: int = 4  # writer threads per worker
    seconds: float | None = None  # start no new cycle after this long (None: no limit)
    progress: Callable[[str], None] | None = None
    cycles_per_dir: int = 10  # a fresh cache directory after this many cycles
    backend: str | None = None  # a shared database's URL (nodes.py); None: each cache's LMDB
    fsync: str | None = None  # every worker cache's fsync mode; None: each run picks its own
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        # Workers run in a scratch directory of their own (runner.py), so every path handed
        # to them must not depend on the harness's working directory.
        self.workdir = os.path.abspath(self.workdir)

    def options(self, options: dict[str, Any]) -> dict[str, Any]:
        """A worker's cache `options` (chosen at random) with the fsync mode asked for, if
        any: the random choices stay the same, so a seed gives the same runs otherwise."""
        if self.fsync is not None:
            options["fsync"] = self.fsync
        return options

    def expired(self) -> bool:
        return self.seconds is not None and time.monotonic() - self.started >= self.seconds

    def say(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)

    def path(self, *parts: str) -> str:
        path = os.path.join(self.workdir, *parts)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path


@dataclass
class Outcome:
    """What a campaign found: the oracle's tally plus rows of its own."""

    mode: str
    tally: Tally = field(default_factory=Tally)
    rows: dict[str, Any] = field(default_factory=dict)  # e.g. "power-loss states": 200
    failed: bool = False  # a campaign-level failure (e.g. a crash point never reached)
    figures: tuple[str, ...] | None = None  # the Tally fields it checks (None: report.py's
    #                                         standard set for its mode); the others print "-"

    @property
    def ok(self) -> bool:
        return not self.failed and not self.tally.violations


def check_after_crash(recovered: Recovered, carried: Mapping[Any, Any], *, seed: int, cycle: int,
                      journals: Mapping[int, ThreadJournal], label: str,
                      events: Iterable[list[Any]] = ()) -> Tally:
    """The oracle's verdict on a recovered directory; a refused recovery is a violation.
    `events` (the worker's journal) holds the reports of children it forked, if any: each
    must have been refused every use, and none of their writes may be recovered."""
    if recovered.error is not None:
        tally = Tally(cycles=1, errors=1)
        for journal in journals.values():
            tally.operations += journal.started
            tally.acknowledged += journal.acked
        tally.note(f"{label}: recovery refused: {recovered.error}")
        return tally
    forks, children = check_forks(events, recovered.state, label)
    state = {key: value for key, value in recovered.state.items() if not forked_key(key)}
    tally = check_cycle(state, carried, seed=seed, cycle=cycle, journals=journals,
                        recovered_last_lsn=recovered.last_lsn, label=label)
    tally.add(forks)
    tally.forked += children
    return tally


def keep_evidence(settings: Settings, name: str, *paths: str) -> str:
    """Copy `paths` (files or directories) under workdir/failures/name; return that path."""
    target = settings.path("failures", name)
    os.makedirs(target, exist_ok=True)
    for path in paths:
        if not os.path.exists(path):
            continue
        destination = os.path.join(target, os.path.basename(path.rstrip(os.sep)))
        if os.path.isdir(path):
            shutil.copytree(path, destination, dirs_exist_ok=True, symlinks=True)
        else:
            shutil.copy2(path, destination)
    return target
