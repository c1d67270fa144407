"""Fault injection for wbcache: prove that no acknowledged write is ever lost.

Campaigns (each a module with a `run_*(Settings) -> Outcome`), driven by `wbcache torture`:

    kill.py         random SIGKILLs of a writing worker process (also inside a database
                    commit, and while it forks children: forks.py)
    interleave.py   writers sharing a few cold keys (shared_keys.py), killed, and checked for
                    linearizability (linearizability.py)
    crashpoints.py  SIGKILL at every named crash point, and twice nested inside recovery
    powerloss.py    the disk a power cut leaves, rebuilt from a recorded trace
    torn.py         the log cut at every offset of its last records
    corruption.py   byte changes and bit flips before the tail
    fuzz.py         random and mutated segments (mutations.py)
    ioerrors.py     ENOSPC and EIO on the Nth file operation; database errors
    nodes.py        with a shared database (`--backend postgresql://...`): four node
                    processes counting into the same counters, SIGKILLed and restarted
    shared_dir.py   processes on one shared directory (`shared=True`), SIGKILLed and
                    restarted mid-flush, mid-adoption of an orphan lane and mid-fork

All of them but nodes.py, shared_dir.py and interleave.py judge what recovery gives with one oracle
(oracle.py) over one workload (workload.py), run in worker processes (worker.py, runner.py)
that journal every operation (journal.py), and, for power loss, every file operation
(trace.py). interleave.py runs the same workers with the shared-key workload, judged by
linearizability.py. nodes.py has its own workload (counters.py), worker (node_worker.py),
oracle (ledger.py) and a table of its own on the server (shared_table.py, which needs
psycopg); shared_dir.py reuses that oracle, with a worker (shared_dir_worker.py) and a
register check (shared_dir_workload.py) of its own. Backends that wrap the real one through
the public protocol (to journal, slow down, fail or kill inside a commit) are in backends.py.

Imports the public API, plus the hooks `wbcache.wal` offers a harness: the crash point list
(`wbcache.wal.crashpoints.POINTS`), the replaceable file operations
(`wbcache.wal.syscalls.SYSCALLS`), the frame layout (`wbcache.wal.format`) and the log's own
reader (`wbcache.wal.reader`: the harness finds frames with it, never with a walker of its
own).

The names below are imported on first use, so that a worker process, which imports this
package, does not pay for the campaigns it never runs.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "MODES": "torture",
    "Outcome": "campaign",
    "Settings": "campaign",
    "Tally": "oracle",
    "TortureReport": "torture",
    "check_cycle": "oracle",
    "run_torture": "torture",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
