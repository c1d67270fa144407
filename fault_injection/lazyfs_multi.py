"""Power cuts for real under several processes at once: nodes over PostgreSQL, and one shared
directory, on LazyFS; every shared counter exact after every cut.

Two campaigns, one cycle shape (issue 11's last point):

  * `run_lazyfs_nodes`: NODES node processes (node_worker.py), each with its own cache
    directory under the LazyFS mount, count into the same counters of one fresh PostgreSQL
    table (shared_table.py). PostgreSQL itself stays outside LazyFS: its durability is its
    own, so the cut takes only what the nodes' logs had not fsync'd;
  * `run_lazyfs_shared`: PROCESSES processes (shared_node_worker.py) count into one shared
    directory under the mount (a lane each, one LMDB database): the cut takes the lanes' logs
    and the database's unsynced bytes alike.

A cycle:
  1. mount LazyFS; start every process at once (process_group.py), each reopening (recovering) its
     directory or lane as the last cut left it, then counting from `threads` threads;
  2. the power goes, on one trigger: `mid-write` (one process dies between a log write and
     its fsync, at the crash point wal.after_write, and the others with it: so the cut surely
     finds unsynced log bytes, which under fsync="always" are otherwise only there in the
     instant between a group commit's write and its fsync), a number of acknowledgements, a
     flush's transaction begun or returned (nodes), the clock, or `recovery` (a first cut,
     then the processes are started again and cut a second time, early: inside their open's
     replay, into PostgreSQL or the shared LMDB); every process is SIGKILLed at once (by its
     pid) and LazyFS's cache cleared (after asking it which files held unsynced bytes);
  3. mount again (no page cache of before the cut survives) and open every node directory, or
     the shared directory, once, in a child process (lazyfs_multi_check.py): recovery replays
     what the logs kept (a LazyFS error that no real file system makes is told apart there);
  4. read every key (the PostgreSQL table through a reader directory outside LazyFS; the
     shared directory through that open) and judge it with the multi-node ledger (ledger.py):
     each thread's marker says exactly which of its writes survived; none it was told about
     may be missing, and every counter must equal, exactly, the increments of those writes
     (a write lost, or replayed twice into the database, shows there).
The ledgers, the table and the directories go on to the next cycle, so each cycle's check
covers every write of every earlier one.

Every process writes with fsync="always" (the guarantee: acknowledged means durable, power
cut included); flush interval, threshold and segment size vary per process and cycle, so cuts
find flushes, replays and segment deletions in flight. `options` fixes them instead: a
mutation test's way to acknowledge before the log's fsync (fsync="interval" with a huge
interval) while the ledger still owes every acknowledgement.
"""

from __future__ import annotations

import os
import random
import shutil
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from wbcache.fault_injection.campaign import Outcome, Settings, keep_evidence
from wbcache.fault_injection.journal import (
    ACK,
    DB_BEGIN,
    DB_DONE,
    ERROR,
    MARKER,
    READY,
    START,
)
from wbcache.fault_injection.lazyfs_config import locate_lazyfs
from wbcache.fault_injection.lazyfs_mount import LazyfsMount, Report
from wbcache.fault_injection.lazyfs_multi_check import (
    Recovered,
    RecoveryRequest,
    lazyfs_truncate_artefact,
    recover_in_child,
)
from wbcache.fault_injection.ledger import ThreadLedger, check_final
from wbcache.fault_injection.node_worker import URL_VARIABLE, NodeConfig
from wbcache.fault_injection.oracle import Tally
from wbcache.fault_injection.process_group import Decide, GroupRun, after_total, run_group
from wbcache.fault_injection.runner import WorkerSpec
from wbcache.fault_injection.shared_node_worker import SharedDirConfig
from wbcache.fault_injection.shared_table import SharedTable, redact

NODES = 4  # node processes, each with its own directory (run_lazyfs_nodes)
PROCESSES = 4  # processes on the one shared directory (run_lazyfs_shared)
NODE_TRIGGERS = ("mid-write", "recovery", "flush", "acks", "commit", "clock")
SHARED_TRIGGERS = ("mid-write", "recovery", "acks", "clock")
CRASH_VARIABLE = "WBCACHE_CRASH_AT"  # wbcache.wal.crashpoints: SIGKILL self at a point
TRIGGER_WAIT = 10.0  # s after the start: a trigger not reached by then cuts anyway
RECOVERY_ATTEMPTS = 5  # opens of the check, while LazyFS's spurious truncate error stops them
FIGURES = ("cycles", "operations", "acknowledged", "recovered", "inflight_kept", "counters",
           "lost", "partial", "phantom", "counter_mismatches", "carried", "errors")
ALWAYS_SHOWN = ("power cuts", "cuts that dropped unsynced log bytes")


# ---------------------------------------------------------------------- the campaigns


def run_lazyfs_nodes(settings: Settings, *, options: Mapping[str, Any] | None = None
                     ) -> Outcome:
    """`settings.cycles` power cuts under NODES node directories on LazyFS, over a fresh table
    of `settings.backend` (a postgresql:// URL; else $WBCACHE_TEST_PG_DSN), dropped after.
    `options`: every process's cache options, instead of the varied ones. Raises
    `LazyfsUnavailable` if LazyFS cannot run here."""
    url = settings.backend or os.environ.get("WBCACHE_TEST_PG_DSN")
    if not url:
        raise ValueError("the LazyFS nodes campaign needs a database URL (Settings.backend "
                         "or WBCACHE_TEST_PG_DSN)")
    binary = locate_lazyfs(None)
    with SharedTable(url) as table:
        campaign = _NodesCampaign(settings, binary, table, options)
        campaign.execute()
    campaign.outcome.rows["shared table (dropped)"] = table.name
    return campaign.outcome


def run_lazyfs_shared(settings: Settings, *, options: Mapping[str, Any] | None = None
                      ) -> Outcome:
    """`settings.cycles` power cuts under PROCESSES processes sharing one directory on LazyFS.
    `options`: every process's cache options, instead of the varied ones. Raises
    `LazyfsUnavailable` if LazyFS cannot run here."""
    campaign = _SharedCampaign(settings, locate_lazyfs(None), options)
    campaign.execute()
    return campaign.outcome


@dataclass
class Cut:
    """When a powered phase ends: at `decide`'s first yes, or after `kill_after` s; with
    `crash`, (process index, WBCACHE_CRASH_AT) arms that process's crash point, and its death
    is the cut."""

    decide: Decide | None
    kill_after: float
    crash: tuple[int, str] | None = None


class _MultiCampaign:
    """The cycle both campaigns share (module docstring); subclasses say what the processes
    are and how the cut directories are recovered and read."""

    mode = ""
    triggers: tuple[str, ...] = ()
    processes = 0
    journals_commits = False  # the processes journal their database commits (DB_DONE)

    def __init__(self, settings: Settings, binary: str,
                 options: Mapping[str, Any] | None) -> None:
        self.settings = settings
        self.fixed_options = None if options is None else dict(options)
        self.fs = LazyfsMount(binary, settings.path(self.mode, "fs", ""))
        self.scratch = settings.path(self.mode, "scratch", "")
        self.rng = random.Random(f"wbcache-torture/{self.mode}/{settings.seed}")
        self.outcome = Outcome(self.mode, figures=FIGURES)
        self.rows: Counter[str] = Counter()
        self.peak_usage = 0.0
        self.ledgers: dict[tuple[int, int], ThreadLedger] = {}  # (node, thread): its ledger
        self.runs = 0  # powered phases so far

    # ------------------------------------------------------------------ what differs

    def nodes(self) -> list[int]:
        """The node number of each process of the next powered phase (`self.runs` so far)."""
        raise NotImplementedError

    def configs(self, nodes: list[int], options: list[dict[str, Any]]) -> list[WorkerSpec]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return {}

    def recover_and_read(self, tally: Tally, label: str) -> dict[Any, Any] | None:
        """Under the mount: recover the cut directories, return every key (None: refused,
        counted in `tally`)."""
        raise NotImplementedError

    def recover_in_child(self, request: RecoveryRequest, tally: Tally, label: str
                         ) -> Recovered | None:
        """`recover_directories` in a child process, tried again while LazyFS's spurious
        truncate error (not the library's) is what stops it; a refusal is counted."""
        for _ in range(RECOVERY_ATTEMPTS):
            recovered, stderr = recover_in_child(request, self.environment(),
                                                  os.path.join(self.scratch, "check"))
            if recovered is not None:
                return recovered
            if not lazyfs_truncate_artefact(stderr):
                break
            self.rows["opens failed by LazyFS's spurious truncate error (not counted)"] += 1
        tally.errors += 1  # after a power cut the open needs no person
        tally.note(f"{label}: the open after the cut failed: {redact(stderr[-2000:])}")
        return None

    # ------------------------------------------------------------------ the run

    def execute(self) -> None:
        try:
            self.run()
        except BaseException:
            keep_evidence(self.settings, f"{self.mode}-harness-error", *self.fs.evidence())
            raise
        finally:
            self.fs.close()  # even when a cycle failed: nothing of ours stays mounted
            if not self.fs.mounted:  # never delete through a mount point
                shutil.rmtree(self.fs.base, ignore_errors=True)
            shutil.rmtree(self.scratch, ignore_errors=True)

    def run(self) -> None:
        settings = self.settings
        triggers = dict.fromkeys(self.triggers, 0)
        for cycle in range(settings.cycles):
            if settings.expired():
                break
            trigger = (self.triggers[cycle] if cycle < len(self.triggers)
                       else self.rng.choice(self.triggers))
            triggers[trigger] += 1
            tally = self._cycle(cycle, trigger)
            self.outcome.tally.add(tally)
            settings.say(f"{self.mode} {cycle + 1}/{settings.cycles} [{trigger}]: "
                         f"{tally.acknowledged:,} acknowledged, {tally.recovered:,} recovered, "
                         f"{tally.counters} counters checked, lost {tally.lost}, violations "
                         f"{tally.violations}")
            if tally.violations:
                where = keep_evidence(self.settings, f"{self.mode}-cycle{cycle}", self.fs.root,
                                      self.fs.log_path)
                self.outcome.tally.note(f"{self.mode} cycle {cycle}: the directories as the "
                                        f"cut left them, recovered, are kept in {where}")
        rows = self.outcome.rows
        rows["processes x writer threads"] = f"{self.processes} x {settings.threads}"
        rows["cut triggers"] = ", ".join(f"{name} {n}" for name, n in triggers.items())
        for label in ALWAYS_SHOWN:
            self.rows[label] += 0
        for label in sorted(self.rows):
            rows[label] = self.rows[label]
        rows["LazyFS cache peak usage, %"] = round(self.peak_usage, 2)

    def _cycle(self, cycle: int, trigger: str) -> Tally:
        label = f"{self.mode} cycle {cycle} [{trigger}]"
        tally = Tally(cycles=1)
        runs = [self._powered(cycle, self._decision(trigger))]
        if trigger == "recovery":  # power back on, and off again inside the replay
            runs.append(self._powered(cycle, Cut(None, self.rng.uniform(0.05, 0.8))))
            self.rows["second cuts: before every process had opened"] += \
                any(not any(event[0] == READY for event in events) for events in runs[1].events)
        for run in runs:
            self._read(run, tally, label)
        self.fs.mount()
        try:
            state = self.recover_and_read(tally, label)
        finally:
            self.fs.unmount()
        if state is not None:
            tally.add(check_final(state, list(self.ledgers.values()), label))
        return tally

    def _decision(self, trigger: str) -> Cut:
        rng = self.rng
        if trigger == "mid-write":
            # One process dies just after a log write, before its fsync (the crash point
            # wal.after_write), and the power goes with it: that write's bytes are unsynced.
            return Cut(None, TRIGGER_WAIT, crash=(rng.randrange(self.processes),
                                                  f"wal.after_write:{rng.randint(5, 300)}"))
        if trigger == "acks":
            return Cut(after_total(ACK, rng.randint(50, 1500)), TRIGGER_WAIT)
        if trigger == "recovery":  # enough for the second power-on to replay
            return Cut(after_total(ACK, rng.randint(50, 500)), TRIGGER_WAIT)
        if trigger == "flush":  # while a flush's transaction is under way
            return Cut(after_total(DB_BEGIN, rng.randint(1, 3 * self.processes)), TRIGGER_WAIT)
        if trigger == "commit":  # just after one returned: its segments are being deleted
            return Cut(after_total(DB_DONE, rng.randint(1, 3 * self.processes)), TRIGGER_WAIT)
        return Cut(None, rng.uniform(0.3, 2.5))  # clock (early ones land in the opens)

    def _options(self) -> dict[str, Any]:
        if self.fixed_options is not None:
            return dict(self.fixed_options)
        rng = self.rng
        return {"fsync": "always",
                "segment_size": rng.choice([4096, 65536, 1 << 20]),
                "flush_interval": rng.choice([0.005, 0.05, 0.5, 3600.0]),
                "flush_threshold": rng.choice([20, 500, 100_000])}

    def _powered(self, cycle: int, cut: Cut) -> GroupRun:
        """Mount, run every process until the trigger, SIGKILL them all, clear LazyFS's cache
        (the cut), unmount."""
        nodes = self.nodes()
        self.runs += 1
        for node in nodes:
            for thread in range(self.settings.threads):
                self.ledgers.setdefault((node, thread), ThreadLedger(node, thread))
        configs = self.configs(nodes, [self._options() for _ in nodes])
        self.fs.mount()
        try:
            envs = [dict(self.environment()) for _ in nodes]
            if cut.crash is not None:
                envs[cut.crash[0]][CRASH_VARIABLE] = cut.crash[1]
            run = run_group(configs, nodes, os.path.join(self.scratch, f"run{self.runs}"),
                            decide=cut.decide, kill_after=cut.kill_after, envs=envs,
                            cut_on_exit=cut.crash is not None)
            self._count_cut(self.fs.cut(), run)
        finally:
            self.fs.unmount()
        return run

    def _read(self, run: GroupRun, tally: Tally, label: str) -> None:
        """Feed each process's journal to its threads' ledgers; count what must not be."""
        for process, events in enumerate(run.events):
            node = run.nodes[process]
            for event in events:
                tag = event[0]
                try:
                    if tag == MARKER:
                        self.ledgers[(node, event[1])].found(event[2], tally, label)
                    elif tag == START:
                        self.ledgers[(node, event[1])].start(event[2])
                    elif tag == ACK:
                        self.ledgers[(node, event[1])].ack(event[2])
                    elif tag == ERROR:
                        tally.errors += 1
                        tally.note(f"{label}: process {process} thread {event[1]}: write "
                                   f"{event[2]} raised {event[3]}: {redact(str(event[4]))}")
                    elif tag == READY and event[2]:
                        self.rows["process opens that replayed log records"] += 1
                except ValueError as exc:  # the journal contradicts itself
                    tally.errors += 1
                    tally.note(f"{label}: {exc}")
            if not run.sigkilled(process) and lazyfs_truncate_artefact(run.stderr[process]):
                self.rows["opens failed by LazyFS's spurious truncate error (not counted)"] \
                    += 1
            elif not run.sigkilled(process):
                tally.errors += 1
                tally.note(f"{label}: process {process} was not killed but exited with "
                           f"{run.returncodes[process]}{' (hung)' if run.hung else ''}: "
                           f"{redact(run.stderr[process][-2000:])}")

    def _count_cut(self, report: Report, run: GroupRun) -> None:
        rows = self.rows
        rows["power cuts"] += 1
        if any(f"{os.sep}wal{os.sep}" in path for path in report.files):
            rows["cuts that dropped unsynced log bytes"] += 1
        if any(path.endswith(os.path.join(os.sep + "db", "data.mdb"))
               for path in report.files):
            rows["cuts that dropped unsynced database bytes (data.mdb)"] += 1
        if self.journals_commits:
            rows["database commits before the cuts"] += sum(
                event[0] == DB_DONE for events in run.events for event in events)
        rows["acknowledged writes before the cuts"] += sum(
            event[0] == ACK for events in run.events for event in events)
        if report.cache_usage is not None:
            self.peak_usage = max(self.peak_usage, report.cache_usage)


class _NodesCampaign(_MultiCampaign):
    mode = "lazyfs-nodes"
    triggers = NODE_TRIGGERS
    processes = NODES
    journals_commits = True

    def __init__(self, settings: Settings, binary: str, table: SharedTable,
                 options: Mapping[str, Any] | None) -> None:
        super().__init__(settings, binary, options)
        self.table = table
        self.reader = settings.path(self.mode, "reader")  # outside LazyFS

    def directory(self, node: int) -> str:
        return os.path.join(self.fs.mnt, f"node{node}")

    def nodes(self) -> list[int]:
        return list(range(self.processes))  # the same nodes, each reopening its directory

    def configs(self, nodes: list[int], options: list[dict[str, Any]]) -> list[WorkerSpec]:
        # `record`: the backend is journaled (DB_BEGIN, DB_DONE, no data), for the commit
        # trigger and the count of commits before the cuts.
        return [NodeConfig(directory=self.directory(node), url=self.table.url, node=node,
                           threads=self.settings.threads, options=options[index], record=True)
                for index, node in enumerate(nodes)]

    def environment(self) -> dict[str, str]:
        # The URL (it may hold a password) goes in the environment, never on a command line.
        return {URL_VARIABLE: self.table.url}

    def recover_and_read(self, tally: Tally, label: str) -> dict[Any, Any] | None:
        directories = [self.directory(node) for node in range(self.processes)
                       if os.path.exists(self.directory(node))]  # else cut before its mkdir
        recovered = self.recover_in_child(RecoveryRequest(directories), tally, label)
        if recovered is None:
            return None
        self.rows["log records replayed into PostgreSQL after the cuts"] += recovered.replayed
        return self.table.contents(self.reader)


class _SharedCampaign(_MultiCampaign):
    mode = "lazyfs-shared"
    triggers = SHARED_TRIGGERS
    processes = PROCESSES

    @property
    def directory(self) -> str:
        return os.path.join(self.fs.mnt, "shared")

    def nodes(self) -> list[int]:
        # A process reading its own marker back could read it stale: its last writes may sit
        # in a lane another process has claimed and is still recovering (lanes.py), which no
        # open waits for. So every process of every phase writes keys of its own (as
        # tests/shared_worker.py does): marker 0, and the ledger checks each phase's writes.
        return [self.runs * self.processes + process for process in range(self.processes)]

    def configs(self, nodes: list[int], options: list[dict[str, Any]]) -> list[WorkerSpec]:
        return [SharedDirConfig(directory=self.directory, node=node,
                                threads=self.settings.threads, options=options[index])
                for index, node in enumerate(nodes)]

    def recover_and_read(self, tally: Tally, label: str) -> dict[Any, Any] | None:
        if not os.path.exists(self.directory):
            return {}
        # The open adopts every lane (all their processes are dead): each lane's log is
        # replayed into the shared LMDB database.
        recovered = self.recover_in_child(RecoveryRequest([self.directory], shared=True),
                                          tally, label)
        return None if recovered is None else recovered.state
