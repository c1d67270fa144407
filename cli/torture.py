"""`wbcache torture`: prove the guarantee on this disk by crashing a cache over and over.

The campaigns live in `wbcache.fault_injection`; this command picks them, sizes them, prints
their progress and the final table, and exits 1 if any check failed.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile

import click

from wbcache.fault_injection.report import verdict
from wbcache.fault_injection.torture import MODES, run_torture


@click.command()
@click.argument("directory", required=False, type=click.Path(file_okay=False))
@click.option("--mode", type=click.Choice((*MODES, "all")), default="all", show_default=True,
              help="kill: SIGKILL a writing worker at random moments; crashpoints: at every "
                   "named crash point, and twice inside recovery; powerloss: rebuild what a "
                   "power cut leaves (unsynced bytes dropped or torn); torn, corruption, fuzz: "
                   "damage the log's bytes; ioerrors: ENOSPC/EIO on the Nth call; all: each.")
@click.option("--cycles", default=50, show_default=True, type=click.IntRange(1),
              help="Size of the run: kills; crash-point runs (at least one per point); "
                   "power-loss states x10; corruption cases x100; fuzz cases x20; torn-tail "
                   "logs and I/O error sweeps /50.")
@click.option("--seed", type=int, default=None,
              help="Seed of every random choice (default: a random one, printed).")
@click.option("--threads", default=4, show_default=True, type=click.IntRange(1, 64),
              help="Writer threads in each worker process.")
@click.option("--seconds", type=click.FloatRange(0, min_open=True), default=None,
              help="Stop starting new cycles after this long (shared evenly by the modes).")
@click.option("--quiet", is_flag=True, help="Print only the final table.")
def torture(directory: str | None, mode: str, cycles: int, seed: int | None, threads: int,
            seconds: float | None, quiet: bool) -> None:
    """Crash caches on purpose and check that no acknowledged write is ever lost.

    Workers write from several threads and report every acknowledgement; they are killed
    (kill -9, at named crash points, or with simulated power loss), and every recovered
    directory is checked: nothing acknowledged lost, no value never written, no batch half
    applied, no hole in any writer's sequence, no counter below an acknowledged value. Logs
    are also torn, corrupted and fuzzed, and I/O calls made to fail. Exits 1 on any violation.

    DIRECTORY (new or empty) holds the scratch work and, on failure, the evidence under
    failures/; without it a temporary directory is used, removed if everything passed.

    Example: wbcache torture --mode all --cycles 50 --seed 1
    """
    if directory is not None and os.path.isdir(directory) and os.listdir(directory):
        raise click.UsageError(f"{directory} is not empty; give a new or empty directory")
    workdir = directory or tempfile.mkdtemp(prefix="wbcache-torture-")
    os.makedirs(workdir, exist_ok=True)
    seed = seed if seed is not None else random.SystemRandom().randrange(1 << 31)
    modes = MODES if mode == "all" else (mode,)
    click.echo(f"wbcache torture: modes {', '.join(modes)}, size {cycles}, seed {seed}, "
               f"{threads} writer threads, scratch {workdir}")
    report = run_torture(workdir, modes=modes, cycles=cycles, seed=seed, threads=threads,
                         seconds=seconds, progress=None if quiet else click.echo)
    click.echo("")
    click.echo(report.table())
    click.echo("")
    click.echo(f"{verdict(report)} ({report.seconds:,.1f} s)")
    if report.ok:
        if directory is None:
            shutil.rmtree(workdir, ignore_errors=True)
        return
    click.echo(f"evidence kept in {os.path.join(workdir, 'failures')}")
    raise click.exceptions.Exit(1)
