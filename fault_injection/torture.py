"""`run_torture`: run the chosen campaigns and gather one report (what `wbcache torture` does).

One size, `cycles`, scales every campaign (SCALE): with 50 a run is 50 random kills, 50
cycles of writers sharing cold keys, one pass of every crash point and more, 500 power-loss
states, every torn-tail offset of a sample log, 5,000 corruption cases, 1,000 fuzz cases and
every I/O error of the scripted run; with 1,000 (a soak) it is 1,000 kills, 1,000 interleave
cycles, 10,000 states and 100,000 corruption cases. `shared` is that many kills of processes
on one shared directory, `lazyfs-shared` that many cycles of power cuts under them. With a
shared database (`backend`) it is that many kills of the multi-node campaign (nodes.py) and
cycles of power cuts under the nodes' directories (lazyfs_multi.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from wbcache.fault_injection.campaign import Outcome, Settings
from wbcache.fault_injection.corruption import run_corruption
from wbcache.fault_injection.crashpoints import full_pass, run_crashpoints
from wbcache.fault_injection.fuzz import run_fuzz
from wbcache.fault_injection.interleave import run_interleave
from wbcache.fault_injection.ioerrors import run_ioerrors
from wbcache.fault_injection.kill import run_kills
from wbcache.fault_injection.lazyfs import run_lazyfs
from wbcache.fault_injection.lazyfs_multi import run_lazyfs_nodes, run_lazyfs_shared
from wbcache.fault_injection.nodes import run_node_kills
from wbcache.fault_injection.oracle import Tally
from wbcache.fault_injection.powerloss import run_powerloss
from wbcache.fault_injection.shared_dir import run_shared_dir
from wbcache.fault_injection.torn import run_torn

MODES = ("kill", "interleave", "crashpoints", "powerloss", "lazyfs", "torn", "corruption",
         "fuzz", "ioerrors", "shared", "lazyfs-shared")
CRASH_MODES = ("kill", "interleave", "crashpoints", "powerloss")
# With a shared database (`backend`), only kills apply: the other modes damage or rebuild the
# local log and LMDB files, and a server's own durability is not this harness's to fake.
# LazyFS cuts apply too: the nodes' directories are on LazyFS, the server is not.
BACKEND_MODES: tuple[str, ...] = ("kill", "lazyfs")

CAMPAIGNS: dict[str, Callable[[Settings], Outcome]] = {
    "kill": run_kills,
    "interleave": run_interleave,
    "crashpoints": run_crashpoints,
    "powerloss": run_powerloss,
    "lazyfs": run_lazyfs,  # a power cut on LazyFS (needs it: $WBCACHE_LAZYFS)
    "torn": run_torn,
    "corruption": run_corruption,
    "fuzz": run_fuzz,
    "ioerrors": run_ioerrors,
    "shared": run_shared_dir,  # processes on one shared directory (shared=True)
    "lazyfs-shared": run_lazyfs_shared,  # power cuts under processes on one shared directory
}
BACKEND_CAMPAIGNS: dict[str, Callable[[Settings], Outcome]] = {
    "kill": run_node_kills,
    "lazyfs": run_lazyfs_nodes,  # power cuts under the nodes' directories
}


def scaled(mode: str, cycles: int) -> int:
    """How many of its own cycles `mode` runs for a run of size `cycles` (SCALE)."""
    if mode == "crashpoints":
        return max(cycles, full_pass())  # every point at least once, whatever the size
    if mode == "powerloss":
        return 10 * cycles  # states
    if mode == "torn":
        return math.ceil(cycles / 50)  # sample logs, each cut at every offset
    if mode == "corruption":
        return 100 * cycles
    if mode == "fuzz":
        return 20 * cycles
    # kill, shared: kills; interleave: cycles; ioerrors: ceil(cycles / 50) sweeps
    return cycles


@dataclass
class TortureReport:
    seed: int
    outcomes: list[Outcome] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(outcome.ok for outcome in self.outcomes)

    @property
    def total(self) -> Tally:
        total = Tally()
        for outcome in self.outcomes:
            total.add(outcome.tally)
        return total

    def table(self) -> str:
        from wbcache.fault_injection.report import render

        return render(self)


def run_torture(workdir: str, *, modes: tuple[str, ...], cycles: int, seed: int,
                threads: int = 4, seconds: float | None = None,
                progress: Callable[[str], None] | None = None,
                backend: str | None = None, fsync: str | None = None) -> TortureReport:
    """Run each of `modes` (in MODES order) at size `cycles`; `seconds` is shared evenly
    among them (a mode stops starting cycles when its share is spent). With `backend` (a
    postgresql:// URL), the caches share that database (nodes.py) and only BACKEND_MODES run:
    `cycles` kills. `fsync` ("always" or "interval"): every worker's cache in that mode (the
    kill, interleave, shared, lazyfs and backend campaigns; the others choose none)."""
    campaigns = CAMPAIGNS if backend is None else BACKEND_CAMPAIGNS
    unsupported = [mode for mode in modes if mode not in campaigns]
    if unsupported:
        raise ValueError(f"mode {unsupported[0]} does not run with a backend; only "
                         f"{' and '.join(BACKEND_MODES)} do")
    report = TortureReport(seed)
    started = time.monotonic()
    chosen = [mode for mode in MODES if mode in modes]
    for mode in chosen:
        settings = Settings(workdir=workdir, seed=seed,
                            cycles=cycles if backend else scaled(mode, cycles),
                            threads=threads, progress=progress, backend=backend, fsync=fsync,
                            seconds=None if seconds is None else seconds / len(chosen))
        report.outcomes.append(campaigns[mode](settings))
    report.seconds = time.monotonic() - started
    return report
