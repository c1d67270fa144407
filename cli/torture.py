"""`wbcache torture`: prove the guarantee on this disk by crashing a cache over and over.

The campaigns live in `wbcache.fault_injection`; this command picks them, sizes them, prints
their progress and the final table, and exits 1 if any check failed. With `--backend`, the
caches flush into a shared database instead of their own LMDB, and the one campaign that
applies there runs: several nodes SIGKILLed while they count into the same counters.
`--shared` is `--mode shared`: several processes on one shared directory (`shared=True`).
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile

import click
from click.core import ParameterSource

from wbcache.cli import EXIT_INTERRUPTED, CommandFailed, Seconds, WholeNumber, new_directory
from wbcache.fault_injection.lazyfs_config import LAZYFS_MODES, LazyfsUnavailable, lazyfs_modes
from wbcache.fault_injection.lazyfs_mount import LazyfsError
from wbcache.fault_injection.report import verdict
from wbcache.fault_injection.shared_table import check_url, redact
from wbcache.fault_injection.torture import BACKEND_MODES, MODES, run_torture
from wbcache.options import FSYNC_MODES

THREADS = 4  # writer threads per worker
BACKEND_THREADS = 8  # per node, with --backend: four processes of 8 threads


def _backend(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value is not None:
        try:
            check_url(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


@click.command()
@click.argument("directory", required=False, type=click.Path(file_okay=False))
@click.option("--mode", type=click.Choice((*MODES, "all")), default="all", show_default=True,
              help="kill: SIGKILL a writing worker at random moments (also inside a "
                   "database commit, and while it forks children); interleave: writers "
                   "sharing a few cold keys, killed, checked for linearizability; "
                   "crashpoints: at every "
                   "named crash point, and twice inside recovery; powerloss: rebuild what a "
                   "power cut leaves (unsynced bytes dropped or torn); lazyfs: real power cuts "
                   "on LazyFS, database included (needs --lazyfs); torn, corruption, fuzz: "
                   "damage the log's bytes; ioerrors: ENOSPC/EIO on the Nth call; shared: "
                   "processes on one shared directory (= --shared); lazyfs-shared: power cuts "
                   "under them; all: each. With --backend: kill and lazyfs (cuts under the "
                   "nodes' directories).")
@click.option("--backend", metavar="URL", callback=_backend, default=None,
              help="Torture caches sharing this database (postgresql://user@host/db): four "
                   "nodes, each its own directory, count into the same 100 counters of a "
                   "fresh table (dropped at the end), and are SIGKILLed and restarted; every "
                   "counter must then be exact. Only --mode kill and lazyfs.")
@click.option("--shared", is_flag=True,
              help="Same as --mode shared: four processes on one shared directory "
                   "(shared=True), SIGKILLed and restarted mid-flush, mid-adoption of an "
                   "orphan lane and mid-fork; every counter and register must then be exact.")
@click.option("--cycles", default=50, show_default=True, type=WholeNumber(1),
              help="Size of the run: kills; interleave cycles; crash-point runs (at least "
                   "one per point); "
                   "power-loss states x10; corruption cases x100; fuzz cases x20; torn-tail "
                   "logs and I/O error sweeps /50; shared kills. With --backend: kills, shared "
                   "by the nodes.")
@click.option("--seed", type=int, default=None,
              help="Seed of every random choice (default: a random one, printed).")
@click.option("--threads", type=WholeNumber(1, 64), default=None,
              help=f"Writer threads in each worker process [default: {THREADS}; "
                   f"{BACKEND_THREADS} with --backend].")
@click.option("--seconds", type=Seconds(0, min_open=True), default=None,
              help="Stop starting new cycles after this long (shared evenly by the modes).")
@click.option("--lazyfs", metavar="PATH", envvar="WBCACHE_LAZYFS",
              help="The LazyFS binary, for --mode lazyfs and lazyfs-shared (also in all) "
                   "[env WBCACHE_LAZYFS].")
@click.option("--fsync", type=click.Choice(FSYNC_MODES), default=None,
              help="Every worker's cache in this fsync mode (kill, interleave, shared, lazyfs "
                   "and --backend runs; LazyFS's torn-seq cycles stay \"interval\") "
                   "[default: each run picks one].")
@click.option("--quiet", is_flag=True, help="Print only the final table.")
def torture(directory: str | None, mode: str, backend: str | None, shared: bool, cycles: int,
            seed: int | None, threads: int | None, seconds: float | None, lazyfs: str | None,
            fsync: str | None, quiet: bool) -> None:
    """Crash caches on purpose and check that no acknowledged write is ever lost.

    Workers write from several threads and report every acknowledgement; they are killed
    (kill -9, at named crash points, or with simulated power loss), and every recovered
    directory is checked: nothing acknowledged lost, no value never written, no batch half
    applied, no hole in any writer's sequence, no counter below an acknowledged value.
    Writers that share cold keys are checked for linearizability, and children forked by a
    writing worker must be refused every use of its cache. Logs are also torn, corrupted and
    fuzzed, and I/O calls made to fail. Exits 1 on any violation.

    DIRECTORY (new or empty) holds the scratch work and, on failure, the evidence under
    failures/; without it a temporary directory is used, removed if everything passed
    (kept after a violation or an interruption).

    Examples: wbcache torture --mode all --cycles 50 --seed 1;
    wbcache torture --mode kill --fsync interval --cycles 50;
    wbcache torture --backend postgresql://postgres@127.0.0.1:5432/test --cycles 20;
    wbcache torture --shared --cycles 200
    """
    modes = _modes(_shared_mode(mode, shared, backend), backend)
    given = click.get_current_context().get_parameter_source("lazyfs")
    if given == ParameterSource.COMMANDLINE and not set(modes) & set(LAZYFS_MODES):
        raise click.UsageError(f"--lazyfs is for --mode {' and '.join(LAZYFS_MODES)} (and all); "
                               f"{', '.join(modes)} would not use it")
    try:
        kept, skipped = lazyfs_modes(modes, lazyfs, asked=mode in LAZYFS_MODES)
    except LazyfsUnavailable as exc:
        raise click.UsageError(str(exc)) from None
    if directory is not None:  # refused (not empty) before anything is said about modes
        new_directory(directory)
    if skipped:
        dropped = " and ".join(mode for mode in modes if mode not in kept)
        click.echo(f"skipping {dropped}: {skipped}")
    modes = kept
    workdir = directory or tempfile.mkdtemp(prefix="wbcache-torture-")
    seed = seed if seed is not None else random.SystemRandom().randrange(1 << 31)
    threads = threads or (THREADS if backend is None else BACKEND_THREADS)
    fsync_note = "" if fsync is None else f", fsync={fsync}"
    if backend is None:
        click.echo(f"wbcache torture: modes {', '.join(modes)}, size {cycles}, seed {seed}, "
                   f"{threads} writer threads{fsync_note}, scratch {workdir}")
    else:
        what = {"kill": f"{cycles} kills", "lazyfs": f"{cycles} power-cut cycles"}
        click.echo(f"wbcache torture: {' and '.join(modes)}, caches sharing {redact(backend)}: "
                   f"{', '.join(what[mode] for mode in modes)} of up to 4 nodes of {threads} "
                   f"writer threads{fsync_note}, seed {seed}, scratch {workdir}")
    try:
        report = run_torture(workdir, modes=modes, cycles=cycles, seed=seed, threads=threads,
                             seconds=seconds, progress=None if quiet else click.echo,
                             backend=backend, fsync=fsync)
    except KeyboardInterrupt:
        raise CommandFailed(f"interrupted; the scratch directory is kept: {workdir}",
                            EXIT_INTERRUPTED) from None
    except LazyfsError as exc:  # it would not mount (not LazyFS?), or stopped mid-campaign
        reason = " ".join(str(exc).split())
        raise click.ClickException(f"LazyFS could not run the power cuts: {reason} (scratch "
                                   f"kept in {workdir})") from None
    except Exception as exc:
        if backend is None:
            raise
        if directory is None:  # it could not start: no evidence to keep
            shutil.rmtree(workdir, ignore_errors=True)
        # The database unreachable, the table not creatable, psycopg missing: a message.
        # (Its message may quote what libpq read of the URL: redacted like the URL itself.)
        reason = " ".join(str(exc).split())  # libpq's messages run over several lines
        raise click.ClickException(redact(f"the torture against {backend} could not run: "
                                          f"{type(exc).__name__}: {reason}")) from exc
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


def _shared_mode(mode: str, shared: bool, backend: str | None) -> str:
    """`--shared` is `--mode shared`; it contradicts `--backend` and any other `--mode`."""
    if not shared:
        return mode
    if backend is not None:
        raise click.UsageError(
            "--shared and --backend exclude each other: --shared tortures processes on one "
            "shared directory with its own LMDB database; --backend, caches sharing a "
            "PostgreSQL database")
    given = click.get_current_context().get_parameter_source("mode") != ParameterSource.DEFAULT
    if given and mode != "shared":
        raise click.UsageError(f"--shared means --mode shared; it cannot run with --mode {mode}")
    return "shared"


def _modes(mode: str, backend: str | None) -> tuple[str, ...]:
    """The campaigns to run. With a backend, no --mode means kill, `all` means every mode
    that applies there; asking for another by name is a usage error, not something silently
    skipped."""
    if backend is None:
        return MODES if mode == "all" else (mode,)
    given = click.get_current_context().get_parameter_source("mode") != ParameterSource.DEFAULT
    if not given:
        return ("kill",)
    if mode == "all":
        return BACKEND_MODES
    if mode not in BACKEND_MODES:
        raise click.UsageError(
            f"--mode {mode} does not run with --backend: only {' and '.join(BACKEND_MODES)} "
            f"do (the other modes damage or rebuild a cache's own log and LMDB files)")
    return (mode,)

