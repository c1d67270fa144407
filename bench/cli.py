"""`python -m bench`: the benchmark's command line (click).

The benchmark lives in the repository only (it measures peers the package does not depend on,
and is not installed with it), so it is run from a checkout: `python -m bench` from the
repository's root, with the package installed (`pip install -e '.[bench]'`). Nothing in the
`wbcache` package imports it.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from bench.config import SECTIONS, BenchConfig


def _sections(_ctx: click.Context, _param: click.Parameter, value: str | None) -> tuple[str, ...]:
    if value is None:
        return SECTIONS
    chosen = tuple(part.strip() for part in value.split(",") if part.strip())
    unknown = [part for part in chosen if part not in SECTIONS]
    if unknown or not chosen:
        raise click.BadParameter(f"choose from {', '.join(SECTIONS)} (comma-separated), "
                                 f"not {value!r}")
    return chosen


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--quick", is_flag=True, help="Shorter trials, one round, 100,000-record "
              "recovery and memory rows, smaller eviction traces: about 1 to 2 minutes.")
@click.option("--smoke", is_flag=True, help="Every row for milliseconds: checks that the "
              "benchmark runs (CI, under 30 s); the numbers mean nothing.")
@click.option("--only", callback=_sections, metavar="SECTIONS",
              help=f"Comma-separated sections to run: {', '.join(SECTIONS)}. Default: all.")
@click.option("--rounds", type=click.IntRange(1, 20), default=None,
              help="Trials per row, interleaved (default: 3 full, 1 quick).")
@click.option("--seconds", "trial_seconds", type=click.FloatRange(0.01, 60), default=None,
              help="Seconds each trial counts (default: 1.5 full, 0.45 quick).")
@click.option("--dir", "scratch_parent", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Where to put the temporary benchmark files (default: the "
              "temp dir if it is on the repository's filesystem, else bench/.scratch).")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("wbcache-bench.png"), show_default=True,
              help="PNG of durable acks/s against concurrency.")
@click.option("--no-plot", is_flag=True, help="Do not draw the plot.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Also write every row and verdict as JSON.")
@click.option("--pg-dsn", envvar="WBCACHE_BENCH_PG_DSN", default=None, metavar="DSN",
              help="PostgreSQL server of the postgres sections (e.g. postgresql://postgres@"
                   "127.0.0.1:5432/test; env WBCACHE_BENCH_PG_DSN); the run works in a "
                   "schema of its own, dropped at the end. Without it: 'not configured'.")
def bench(quick: bool, smoke: bool, only: tuple[str, ...], rounds: int | None,
          trial_seconds: float | None, scratch_parent: Path | None, plot_path: Path,
          no_plot: bool, json_path: Path | None, pg_dsn: str | None) -> None:
    """Measure wbcache against the raw fsync limit and its peers, on this machine, in one run.

    Prints one table (throughput, ratio to a baseline measured in the same run, p50/p99/p99.9
    acknowledgement latency), judges every target (met / MISSED) and draws a PNG plot. Run it
    from the repository's root with the bench extras installed: pip install -e '.[bench]'.
    Redis rows start a private redis-server (and use redis-benchmark) when they are on PATH;
    PostgreSQL rows need --pg-dsn.

    \b
    Examples:
      python -m bench --quick
      python -m bench --only wbcache,baselines --json /tmp/bench.json
      python -m bench --only postgres --pg-dsn postgresql://postgres@127.0.0.1:5432/test
    """
    if quick and smoke:
        raise click.UsageError("--quick and --smoke exclude each other")
    from bench import runner  # the rows import lmdb, msgpack and the peers: not for --help
    from bench.postgres_server import redact_dsn

    mode = "smoke" if smoke else "quick" if quick else "full"
    config = BenchConfig.for_mode(
        mode, rounds=rounds, trial_seconds=trial_seconds, scratch_parent=scratch_parent,
        only=only, pg_dsn=pg_dsn)
    ctx = click.get_current_context()
    args = sys.argv[1:]
    if pg_dsn:  # the command is printed and saved: never with the server's password
        redacted = redact_dsn(pg_dsn)
        args = [arg.replace(pg_dsn, redacted) for arg in args]
    command = " ".join([ctx.command_path, *map(shlex.quote, args)])
    runner.run(config, command=command, plot_path=None if no_plot else plot_path,
               json_path=json_path, echo=click.echo,
               progress=lambda line: click.echo(line, err=True))
