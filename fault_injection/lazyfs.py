"""Power loss for real: the whole cache directory on LazyFS, database included.

The `powerloss` mode rebuilds a power cut from a trace of the log's own file operations and
takes a database commit as durable once `apply` returns, so it cannot see the database half of
a cut. Here the directory (log segments AND LMDB's files) lives under a LazyFS mount
(lazyfs_mount.py): every byte not fsync'd sits in LazyFS's own cache, and a cut drops it.

A cycle (its kind, options and faults: lazyfs_plan.py):
  1. mount, with the cycle's LazyFS injections (torn writes, crash points);
  2. a worker (lazyfs_worker.py: kill mode's workload and journal, plus the log's fsyncs and
     segment deletions) writes from several threads, flushing into LMDB and deleting segments;
     its journal comes through a pipe, NOT through LazyFS: it is the ground truth of what was
     acknowledged;
  3. the power goes: the worker is SIGKILLed and LazyFS's cache cleared (after asking LazyFS
     which files held unsynced bytes), or LazyFS crashes itself at an armed fault;
  4. (recovery kinds) mount again and cut the next open's recovery, or `wbcache recover`;
  5. unmount, mount again (no kernel page cache survives), copy the directory out, unmount,
     and open the copy with the public API: the oracle checks it (nothing acknowledged lost,
     no hole, no partial batch, ...; under fsync="interval", lazyfs_oracle.py says what may be
     lost). A refused open is a violation: after a power cut the open needs no person.
The directory itself goes on to the next cycle, whose worker's open recovers it under LazyFS.

LazyFS applies creates, unlinks and renames to the backing directory at once, so it proves the
rules about file CONTENTS (the log's and LMDB's fsyncs); the trace-based `powerloss` mode proves
those about directory entries (directory fsyncs).

(Slightly over 400 lines: a cycle's phases, its check and its counting share the campaign's
state in one class; what can stand alone is in lazyfs_plan, _oracle, _mount and _worker.)
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from wbcache.fault_injection.campaign import Outcome, Settings, check_after_crash, keep_evidence
from wbcache.fault_injection.journal import ACK, DB_BEGIN, DB_DONE, ERROR, READY, UNLINK
from wbcache.fault_injection.lazyfs_config import Injection, locate_lazyfs
from wbcache.fault_injection.lazyfs_mount import LazyfsError, LazyfsMount, Report
from wbcache.fault_injection.lazyfs_oracle import Floor, floor_journals, required_acks
from wbcache.fault_injection.lazyfs_plan import (
    DECISIONS,
    CyclePlan,
    Decision,
    counting,
    never,
    plan_cycle,
)
from wbcache.fault_injection.lazyfs_worker import LazyfsWorkerConfig
from wbcache.fault_injection.oracle import journals_from
from wbcache.fault_injection.runner import recover, run_worker, worker_env

FIGURES = ("cycles", "operations", "acknowledged", "recovered", "inflight_kept", "lost",
           "holes", "partial", "phantom", "counter_regressions", "inconsistent", "carried",
           "lsn", "errors")
FAULT_WAIT = 6.0  # s: a fault not reached by then gives way to a plain cut
TRIGGER_WAIT = 8.0  # s: a trigger not reached by then kills anyway
CRASH_WAIT = 5.0  # s for a LazyFS that stopped answering during a cut to finish dying
# `python -m` puts the working directory first on sys.path: started from a checkout holding
# another `wbcache/` (the lead's, while a mutant runs in a scratch copy), a worker would import
# THAT wbcache and not this interpreter's. Python >= 3.11 then leaves the directory out.
SAFE_PATH = {"PYTHONSAFEPATH": "1"}
ALWAYS_SHOWN = ("power cuts", "cuts that dropped unsynced database bytes (data.mdb)",
                "cuts that dropped unsynced log bytes", "faults not reached (a plain cut instead)",
                "database commits before the cuts", "log segments deleted before the cuts")
Arm = tuple[str, str, str]  # a LazyFS crash fault: (op, path regex, "before" | "after")
DB_CRASH: Arm = ("fsync", "/db/data\\.mdb", "before")  # the next fsync of LMDB's data file


@dataclass
class Phase:
    """One powered stretch: a process under LazyFS, then the power cut."""

    events: list[list[Any]] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # when the parent read each event
    cut_time: float | None = None  # when the parent decided the cut (None: a fault or timer)
    crashed: bool = False  # LazyFS ended itself at an armed fault
    report: Report = field(default_factory=Report)
    returncode: int | None = None
    sigkilled: bool = False
    ready: bool = False  # the process finished its open (recovery) before the cut
    output: str = ""


class _Watch:
    """Called by `run_worker` for each event as it arrives: timestamps it, runs `arm`'s
    action once, at the first event its decision takes, and says when to kill (the trigger
    fired, or LazyFS died under the worker)."""

    def __init__(self, fs: LazyfsMount, decide: Decision,
                 arm: tuple[Decision, Callable[[], None]] | None = None) -> None:
        self.fs, self._decide, self._arm = fs, decide, arm
        self.times: list[float] = []
        self.cut_time: float | None = None
        self.failure: Exception | None = None

    def __call__(self, event: list[Any]) -> bool:
        now = time.monotonic()
        self.times.append(now)
        if self._arm is not None and self._arm[0](event, now):
            action, self._arm = self._arm[1], None
            try:
                action()
            except Exception as exc:  # kill the worker first (run_worker would leave it
                self.failure = exc    # running), raise once it is gone
                return True
        if (event[0] == ERROR or len(self.times) % 256 == 0) and not self.fs.alive():
            return True  # the file system crashed at a fault: stop the worker
        if self._decide(event, now):
            self.cut_time = now
            return True
        return False


def _on_ready(event: list[Any], _now: float) -> bool:
    return bool(event[0] == READY)


def run_lazyfs(settings: Settings) -> Outcome:
    """`settings.cycles` LazyFS cycles (fewer if `settings.seconds` runs out). Finds LazyFS
    through $WBCACHE_LAZYFS (the CLI's --lazyfs sets it); raises `LazyfsUnavailable` if it
    cannot run here."""
    binary = locate_lazyfs(None)
    campaign = _Campaign(settings, LazyfsMount(binary, settings.path("lazyfs", "fs", "")))
    try:
        campaign.run()
    except BaseException:
        keep_evidence(settings, "lazyfs-harness-error", *campaign.fs.evidence())
        raise
    finally:
        campaign.fs.close()  # even when a cycle failed: nothing of ours stays mounted
        if not campaign.fs.mounted:  # never delete through a mount point
            shutil.rmtree(campaign.fs.base, ignore_errors=True)
        shutil.rmtree(campaign.scratch, ignore_errors=True)
    return campaign.outcome


class _Campaign:
    def __init__(self, settings: Settings, fs: LazyfsMount) -> None:
        self.settings, self.fs = settings, fs
        self.rng = random.Random(f"wbcache-torture/lazyfs/{settings.seed}")
        self.outcome = Outcome("lazyfs", figures=FIGURES)
        self.rows: Counter[str] = Counter()
        self.longest_wait = 0.0
        self.peak_usage = 0.0
        self.scratch = settings.path("lazyfs", "scratch", "")
        self.name = ""  # the cache directory, relative to the mount point
        self.next_lsn = 1  # the first LSN of the segment the next open creates
        self.carried: dict[Any, Any] = {}

    @property
    def directory(self) -> str:
        return os.path.join(self.fs.mnt, self.name)

    def run(self) -> None:
        settings = self.settings
        for cycle in range(settings.cycles):
            if settings.expired():
                break
            if cycle % settings.cycles_per_dir == 0:
                self._fresh_directory(cycle)
            plan = plan_cycle(self.rng, cycle)
            if plan.kind != "torn-seq":  # that one tears the log mapped under "interval"
                settings.options(plan.options)
            self.rows[f"kind {plan.kind}"] += 1
            tally = self._cycle(cycle, plan)
            self.outcome.tally.add(tally)
            settings.say(f"lazyfs {cycle + 1}/{settings.cycles} [{plan.describe()}]: "
                         f"{tally.acknowledged:,} acknowledged, {tally.recovered:,} "
                         f"recovered, lost {tally.lost}, violations {tally.violations}")
        self._publish_rows()

    def _fresh_directory(self, cycle: int) -> None:
        if self.name:
            shutil.rmtree(os.path.join(self.fs.root, self.name), ignore_errors=True)
        self.name = f"dir{cycle // self.settings.cycles_per_dir}"
        self.next_lsn, self.carried = 1, {}

    # ------------------------------------------------------------------ one cycle

    def _cycle(self, cycle: int, plan: CyclePlan) -> Any:
        label = f"lazyfs cycle {cycle} [{plan.describe()}]"
        failed_recovery = None
        writer = self._writer_phase(cycle, plan)
        if plan.kind in ("recovery", "recover-cli"):
            second = self._recovery_phase(plan)
            if not (second.crashed or second.sigkilled or second.returncode == 0):
                failed_recovery = second.output[-2000:]
        floor = self._floor(plan, writer)
        copy = self._copy_out()
        recovered = recover(copy)
        journals = floor_journals(journals_from(writer.events), floor,
                                  keep_errors=not writer.crashed)
        tally = check_after_crash(recovered, self.carried, seed=self.settings.seed,
                                  cycle=cycle, journals=journals, label=label)
        if not (writer.sigkilled or writer.crashed):
            tally.errors += 1
            tally.note(f"{label}: the worker was not killed, nor its file system crashed, "
                       f"but it exited with {writer.returncode}: {writer.output[-2000:]}")
        if failed_recovery is not None:
            tally.errors += 1
            tally.note(f"{label}: the recovery under LazyFS failed by itself, before any cut: "
                       f"{failed_recovery}")
        if tally.violations:
            # The directory as the cut left it (the copy was changed by its recovery).
            where = keep_evidence(self.settings, f"lazyfs-cycle{cycle}",
                                  os.path.join(self.fs.root, self.name), self.fs.log_path)
            tally.note(f"{label}: the recovered directory is kept in {where}")
        if recovered.error is not None:
            self._fresh_directory(cycle)  # evidence kept; the next cycles start afresh
        else:
            self.carried = recovered.state
            self.next_lsn = recovered.last_lsn + 1
        shutil.rmtree(copy, ignore_errors=True)
        return tally

    def _floor(self, plan: CyclePlan, writer: Phase) -> Floor:
        options = plan.options
        floor = required_acks(writer.events, writer.times, fsync=options["fsync"],
                              fsync_interval=options["fsync_interval"],
                              cut_time=writer.cut_time)
        self.rows["acknowledged, not yet fsync'd at the cut (interval: may be lost)"] += \
            floor.unsynced
        self.longest_wait = max(self.longest_wait, floor.longest_wait)
        return floor

    def _writer_phase(self, cycle: int, plan: CyclePlan) -> Phase:
        """The writing worker under LazyFS, then the cut: by trigger, fault or timer."""
        injections: list[Injection] = []
        arm: Arm | None = None  # armed at the mount
        arm_later: tuple[Decision, Callable[[], None]] | None = None  # armed as it runs
        decide: Decision = never
        kill_after: float | None = FAULT_WAIT
        segment = self._lazyfs_path("wal", f"{self.next_lsn:020d}.log")
        if plan.kind == "cut":
            if plan.trigger == "startup":
                kill_after = plan.trigger_at
            else:
                decide, kill_after = DECISIONS[plan.trigger](plan.trigger_at), TRIGGER_WAIT
        elif plan.kind == "db-fsync":
            injections.append(_crash_before("fsync", self._lazyfs_path("db", "data.mdb"),
                                            plan.db_fsync))
        elif plan.kind == "log-unlink":
            crash: Arm = ("unlink", "/wal/", plan.unlink_timing)
            if plan.unlink_after_ready:
                arm_later = (_on_ready, lambda: self.fs.arm_crash(*crash))
            else:
                arm = crash
        elif plan.kind in ("torn-op", "torn-seq"):  # the next write once k are acknowledged
            tear = plan.torn_op or plan.torn_seq
            arm_later = (counting(ACK, tear["after_acks"]),
                         lambda: self.fs.arm_torn(segment, tear["parts"], tear["persist"]))
        else:  # recovery kinds: a log-heavy writer, cut after some acknowledgements
            decide, kill_after = counting(ACK, plan.acks_before_cut, after_ready=False), \
                TRIGGER_WAIT
        config = LazyfsWorkerConfig(directory=self.directory, seed=self.settings.seed,
                                    cycle=cycle, threads=self.settings.threads,
                                    options=plan.options, async_tasks=plan.async_tasks)
        phase = self._powered(injections, lambda: self._run_worker(
            config, decide, kill_after, arm_later), arm=arm)
        if plan.kind in ("torn-op", "torn-seq") and phase.crashed and any(
                event[0] == ACK for event in phase.events):
            self.rows["torn writes, after acknowledged writes"] += 1
        self._count_phase(plan.kind, phase, writer=True,
                          expects_crash=plan.kind in ("db-fsync", "log-unlink", "torn-op",
                                                      "torn-seq"))
        return phase

    def _recovery_phase(self, plan: CyclePlan) -> Phase:
        """Power the directory the writer's cut left, and cut again inside its recovery."""
        how = plan.second_cut
        injections: list[Injection] = []
        arm: Arm | None = None
        decide: Decision = never
        kill_after: float | None = FAULT_WAIT
        if how == "db-fsync":
            if plan.second_at == 1:  # LazyFS counts from 0 and refuses 0: arm the first live
                arm = DB_CRASH
            else:
                injections.append(_crash_before("fsync", self._lazyfs_path("db", "data.mdb"),
                                                int(plan.second_at) - 1))
        elif how == "log-unlink":
            arm = ("unlink", "/wal/", plan.unlink_timing)
        elif how == "clock":
            kill_after = plan.second_at
        else:
            tag = {"begin": DB_BEGIN, "done": DB_DONE, "unlink": UNLINK}[how]
            decide = counting(tag, 1, after_ready=False)
        if plan.kind == "recovery":
            config = LazyfsWorkerConfig(directory=self.directory, seed=self.settings.seed,
                                        cycle=-1, threads=0, workload=False,
                                        options=dict(plan.options))
            phase = self._powered(injections, lambda: self._run_worker(
                config, decide, kill_after, None), arm=arm)
        else:
            phase = self._powered(injections, lambda: self._run_recover_cli(kill_after),
                                  arm=arm)
        self._count_phase(plan.kind, phase, writer=False,
                          expects_crash=how in ("db-fsync", "log-unlink"))
        return phase

    # ------------------------------------------------------------------ powered phases

    def _powered(self, injections: list[Injection], body: Callable[[], Phase],
                 arm: Arm | None) -> Phase:
        """Mount with `injections` (and `arm`ed crash fault), run `body`, cut, unmount."""
        self.fs.mount(injections)
        try:
            if arm is not None:
                self.fs.arm_crash(*arm)
            phase = body()
            try:
                if not self.fs.alive():
                    raise LazyfsError("LazyFS ended at a crash fault")
                phase.report = self.fs.cut()
                if phase.report.cache_usage is not None:
                    self.peak_usage = max(self.peak_usage, phase.report.cache_usage)
            except (LazyfsError, OSError):
                # A request the killed process left in flight can still reach an armed fault:
                # LazyFS then dies during the cut, and its own death is the cut.
                if not self.fs.ended_within(CRASH_WAIT):
                    raise
                phase.crashed = True
                phase.report = self.fs.crash_report()
        finally:
            self.fs.unmount()
        return phase

    def _run_worker(self, config: LazyfsWorkerConfig, decide: Decision,
                    kill_after: float | None,
                    arm: tuple[Decision, Callable[[], None]] | None) -> Phase:
        watch = _Watch(self.fs, decide, arm)
        run = run_worker(config, os.path.join(self.scratch, "worker"), kill_on=watch,
                         kill_after_seconds=kill_after, env=SAFE_PATH)
        if watch.failure is not None:
            raise watch.failure
        return Phase(events=run.events, times=watch.times, cut_time=watch.cut_time,
                     returncode=run.returncode, sigkilled=run.sigkilled,
                     ready=any(event[0] == READY for event in run.events), output=run.stderr)

    def _run_recover_cli(self, kill_after: float | None) -> Phase:
        """`wbcache recover DIR` under LazyFS, SIGKILLed after `kill_after` s (or when LazyFS
        crashes under it)."""
        output = os.path.join(self.scratch, "recover.out")
        os.makedirs(self.scratch, exist_ok=True)
        started = time.monotonic()
        with open(output, "wb") as out:
            child = subprocess.Popen([*_wbcache_command(), "recover", self.directory],
                                     stdout=out, stderr=subprocess.STDOUT,
                                     env=worker_env(SAFE_PATH))
        try:
            while child.poll() is None:
                elapsed = time.monotonic() - started
                if (kill_after is not None and elapsed >= kill_after) or not self.fs.alive():
                    child.kill()
                    break
                time.sleep(0.002)  # polling the child and LazyFS: neither can signal us
        finally:
            if child.poll() is None:
                child.kill()
            returncode = child.wait()
        with open(output, encoding="utf-8", errors="replace") as out:
            text = out.read()
        return Phase(returncode=returncode, sigkilled=returncode == -9,
                     ready=returncode == 0, output=text)

    # ------------------------------------------------------------------ the check

    def _copy_out(self) -> str:
        """Mount again (a fresh view: no page cache of before the cut), copy the directory
        out, unmount. The copy is what the oracle opens; the directory goes on."""
        copy = os.path.join(self.scratch, "copy")
        shutil.rmtree(copy, ignore_errors=True)
        self.fs.mount()
        try:
            if os.path.exists(self.directory):
                shutil.copytree(self.directory, copy, symlinks=True)
        finally:
            self.fs.unmount()
        return copy

    def _lazyfs_path(self, *parts: str) -> str:
        return self.fs.lazyfs_path(os.path.join(self.directory, *parts))

    # ------------------------------------------------------------------ counting

    def _count_phase(self, kind: str, phase: Phase, *, writer: bool,
                     expects_crash: bool) -> None:
        rows = self.rows
        rows["power cuts"] += 1
        where = "" if writer else " (in the recovery)"
        if phase.crashed:
            rows[f"LazyFS crash faults fired: {kind}{where}"] += 1
        elif expects_crash:
            rows["faults not reached (a plain cut instead)"] += 1
        files = phase.report.files
        if any(path.endswith(os.sep + os.path.join("db", "data.mdb")) for path in files):
            rows["cuts that dropped unsynced database bytes (data.mdb)"] += 1
        if any(os.sep + "wal" + os.sep in path for path in files):
            rows["cuts that dropped unsynced log bytes"] += 1
        rows["database commits before the cuts"] += sum(1 for event in phase.events
                                                        if event[0] == DB_DONE)
        rows["log segments deleted before the cuts"] += sum(1 for event in phase.events
                                                            if event[0] == UNLINK)
        if not writer:
            tool = "wbcache recover" if kind == "recover-cli" else "the open's recovery"
            when = "after it had finished" if phase.ready else "inside it"
            rows[f"second cuts: {tool}, {when}"] += 1

    def _publish_rows(self) -> None:
        rows = self.outcome.rows
        for label in ALWAYS_SHOWN:
            self.rows[label] += 0  # a zero says something too
        for label in sorted(self.rows):
            rows[label] = self.rows[label]
        rows["longest wait of an acknowledgement for its fsync (interval), ms"] = \
            round(self.longest_wait * 1000)
        rows["LazyFS cache peak usage, %"] = round(self.peak_usage, 2)


def _crash_before(op: str, path: str, occurrence: int) -> Injection:
    """LazyFS kills itself just before call number `occurrence` + 1 of `op` on `path` (its
    `clear-cache` injection with crash=true counts from 0 and refuses 0)."""
    return Injection("clear-cache", (("from", path), ("op", op), ("timing", "before"),
                                     ("occurrence", occurrence), ("crash", True)))


def _wbcache_command() -> list[str]:
    """The `wbcache` command of this interpreter's environment (a scratch copy's, in a
    mutation run), else the same entry point through `python -c`."""
    script = os.path.join(os.path.dirname(sys.executable), "wbcache")
    if os.path.isfile(script) and os.access(script, os.X_OK):
        return [script]
    return [sys.executable, "-c", "import sys; from wbcache.cli import main; "
                                  "sys.argv[0] = 'wbcache'; main()"]
