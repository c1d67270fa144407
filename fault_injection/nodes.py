"""Many nodes, one database: SIGKILL caches that share PostgreSQL counters (`--backend`).

Four worker processes ("nodes", node_worker.py), each with its own cache directory and
`threads` writer threads (8 from `wbcache torture --backend`), increment the same 100 counters
and put other keys (counters.py) into one fresh table of the database `Settings.backend` names
(shared_table.py). The nodes run at once, and each is SIGKILLed and restarted on its own
schedule, so one node recovers, replaying its log into the table, while the others flush into
it. A kill lands on one trigger:

    acks      after a random number of acknowledged writes
    flush     when a flush (or the recovery's replay) starts its transaction
    commit    when that transaction has returned: the log is being truncated
    clock     after a random time
    startup   very early: during start-up, the open or the recovery

Per run the options vary (fsync mode, segment size, flush interval and threshold). Each
restarted thread reads its marker, which says exactly which of its writes the table holds, and
the ledger (ledger.py) checks it against what the thread was told before the kill. At the end
every node's directory is recovered once more, in this process, and every counter in the table
must equal its exact total: nothing acknowledged lost, nothing applied twice. `cycles` is the
number of kills, shared among the nodes.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from typing import Any

import wbcache
from wbcache.fault_injection.campaign import Outcome, Settings, keep_evidence
from wbcache.fault_injection.journal import ACK, DB_BEGIN, DB_DONE, ERROR, MARKER, READY, START
from wbcache.fault_injection.kill import nth_event, random_options
from wbcache.fault_injection.ledger import ThreadLedger, check_final
from wbcache.fault_injection.node_worker import NodeConfig
from wbcache.fault_injection.oracle import Tally
from wbcache.fault_injection.runner import WorkerRun, run_worker
from wbcache.fault_injection.shared_table import SharedTable, redact

MODE = "postgresql"  # the report's column
NODES = 4
TRIGGERS = ("acks", "flush", "commit", "clock", "startup")
_EVENT_TRIGGER_FALLBACK = 10.0  # seconds: kill anyway if the awaited event never comes
# What this campaign checks (report.py prints "-" for the other figures of the table).
FIGURES = ("cycles", "operations", "acknowledged", "recovered", "inflight_kept", "counters",
           "lost", "partial", "phantom", "counter_mismatches", "carried", "errors")


class Node:
    """One node: its directory, its kills one after the other, and its threads' ledgers."""

    def __init__(self, index: int, settings: Settings, url: str, kills: int) -> None:
        self.index = index
        self.settings = settings
        self.url = url
        self.kills = kills
        self.directory = settings.path("nodes", f"node{index}")
        self.ledgers = [ThreadLedger(index, thread) for thread in range(settings.threads)]
        self.tally = Tally()
        self.triggers = dict.fromkeys(TRIGGERS, 0)
        self.restarts = 0  # runs that opened a directory an earlier run was killed in
        self.replaying = 0  # ... and found acknowledged writes the table did not have yet
        self._rng = random.Random(f"wbcache-torture/nodes/{settings.seed}/{index}")

    def run(self) -> None:
        """Every kill of this node (its harness thread); an error of the harness is counted."""
        try:
            for kill in range(self.kills):
                if self.settings.expired():
                    break
                self._one_run(kill)
        except Exception as exc:  # the harness failed: a finding, never a silent pass
            self.tally.errors += 1
            self.tally.note(redact(f"node {self.index}: harness error {type(exc).__name__}: "
                                   f"{exc}"))

    def _one_run(self, kill: int) -> None:
        rng = self._rng
        trigger = (TRIGGERS[(self.index + kill) % len(TRIGGERS)] if kill < len(TRIGGERS)
                   else rng.choice(TRIGGERS))
        self.triggers[trigger] += 1
        options = self.settings.options(random_options(rng))
        config = NodeConfig(directory=self.directory, url=self.url, node=self.index,
                            threads=self.settings.threads, options=options,
                            record=trigger in ("flush", "commit"))
        kill_on, after = _trigger(rng, trigger)
        run = run_worker(config, self.settings.path("nodes", f"scratch{self.index}"),
                         kill_on=kill_on, kill_after_seconds=after, env=config.environment())
        label = f"node {self.index} kill {kill + 1}/{self.kills} [{trigger}]"
        tally = Tally(cycles=1)
        acks, replayed = self._read(run, tally, label, restart=kill > 0)
        if not run.sigkilled:
            tally.errors += 1
            tally.note(f"{label}: the worker was not killed but exited with {run.returncode}"
                       f"{' (hung)' if run.hung else ''}: {redact(run.stderr[-2000:])}")
        self.tally.add(tally)
        opened = ("killed before its open returned" if replayed is None else
                  f"opened, replaying {replayed:,} log record{'' if replayed == 1 else 's'}")
        # A thread's earlier writes are settled when it reads its marker again, which a run
        # killed early may not have done for every thread: those are settled later.
        self.settings.say(
            f"{MODE} {label}: {opened}; markers read show {tally.recovered:,} of "
            f"{tally.acknowledged:,} earlier acknowledged writes; {acks:,} acknowledged "
            f"before this kill; lost {tally.lost}, violations {tally.violations}")

    def _read(self, run: WorkerRun, tally: Tally, label: str,
              restart: bool) -> tuple[int, int | None]:
        """Feed the run's journal to the ledgers: (acknowledgements, records replayed at
        open, or None if it was killed before it had opened)."""
        acks, replayed = 0, None
        for event in run.events:
            tag = event[0]
            try:
                if tag == READY:
                    replayed = event[2]
                    if restart:
                        self.restarts += 1
                        self.replaying += 1 if replayed else 0
                elif tag == MARKER:
                    self.ledgers[event[1]].found(event[2], tally, label)
                elif tag == START:
                    self.ledgers[event[1]].start(event[2])
                elif tag == ACK:
                    self.ledgers[event[1]].ack(event[2])
                    acks += 1
                elif tag == ERROR:
                    tally.errors += 1
                    tally.note(f"{label}: thread {event[1]}: write {event[2]} raised "
                               f"{event[3]}: {event[4]}")
            except ValueError as exc:  # the journal contradicts itself
                tally.errors += 1
                tally.note(f"{label}: {exc}")
        return acks, replayed

    def recover(self, tally: Tally) -> int:
        """Open the directory in this process (its recovery replays into the table), close
        it; the records replayed."""
        try:
            with wbcache.open(self.directory, backend=self.url) as cache:
                replayed: int = cache.recovery.replayed
                return replayed
        except Exception as exc:  # any refusal is a finding
            tally.errors += 1
            tally.note(f"node {self.index}: the final recovery failed: "
                       f"{type(exc).__name__}: {exc}")
            return 0


def _trigger(rng: random.Random, trigger: str
             ) -> tuple[Callable[[list[Any]], bool] | None, float | None]:
    """(decide on each journal event, seconds after which to kill anyway)."""
    if trigger == "acks":
        return nth_event(ACK, rng.randint(100, 2500)), _EVENT_TRIGGER_FALLBACK
    if trigger == "flush":
        return nth_event(DB_BEGIN, rng.randint(1, 4)), _EVENT_TRIGGER_FALLBACK
    if trigger == "commit":
        return nth_event(DB_DONE, rng.randint(1, 4)), _EVENT_TRIGGER_FALLBACK
    if trigger == "clock":
        return None, rng.uniform(0.5, 2.5)
    return None, rng.uniform(0.0, 0.6)


def run_node_kills(settings: Settings) -> Outcome:
    """`settings.cycles` kills shared among (at most) four nodes writing into a fresh table of
    `settings.backend`, then the exact check of every counter. The table is dropped after."""
    if settings.backend is None:
        raise ValueError("the multi-node campaign needs a database URL (Settings.backend)")
    outcome = Outcome(MODE, figures=FIGURES)
    count = min(NODES, settings.cycles)
    with SharedTable(settings.backend) as table:
        nodes = [Node(index, settings, table.url,
                      settings.cycles // count + (index < settings.cycles % count))
                 for index in range(count)]
        threads = [threading.Thread(target=node.run, name=f"torture-node-{node.index}")
                   for node in nodes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for node in nodes:
            outcome.tally.add(node.tally)
        final = Tally()
        replayed = sum(node.recover(final) for node in nodes)
        state = table.contents(settings.path("nodes", "reader"))
        final.add(check_final(state, [ledger for node in nodes for ledger in node.ledgers],
                              "final check"))
        outcome.tally.add(final)
        settings.say(f"{MODE} final check: {final.counters} counters, "
                     f"{final.counter_mismatches} off their exact total; violations "
                     f"{final.violations}")
    if outcome.tally.violations:
        where = keep_evidence(settings, MODE, settings.path("nodes"))
        outcome.tally.note(f"{MODE}: the node directories are kept in {where} (the table "
                           f"{table.name} is dropped all the same)")
    triggers = {trigger: sum(node.triggers[trigger] for node in nodes) for trigger in TRIGGERS}
    outcome.rows["nodes x writer threads"] = f"{count} x {settings.threads}"
    outcome.rows["kill triggers"] = ", ".join(f"{name} {n}" for name, n in triggers.items())
    outcome.rows["  restarts that replayed unflushed writes"] = (
        f"{sum(node.replaying for node in nodes)} of {sum(node.restarts for node in nodes)}")
    outcome.rows["  log records replayed by the final recovery"] = replayed
    outcome.rows["shared table (dropped)"] = table.name
    return outcome
