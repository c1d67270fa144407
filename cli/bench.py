"""`wbcache bench` (issue #5): the benchmark in the repository's `bench/` folder.

`bench/` is not installed with the package (it measures peers the package does not depend
on), so this command finds it next to the `wbcache` package, which works in a checkout and in
an editable install, and says so clearly anywhere else. `python -m bench` runs this very
command, so the two take the same options.
"""

from __future__ import annotations

import importlib
import importlib.util
import shlex
import sys
from pathlib import Path
from types import ModuleType

import click

import wbcache

SECTIONS = ("baselines", "peers", "redis", "wbcache", "postgres")


def bench_folder() -> Path:
    """The `bench/` folder of the checkout `wbcache` is imported from."""
    return Path(wbcache.__file__).resolve().parent.parent / "bench"


def _load_bench() -> ModuleType:
    """Import the `bench` package from `bench_folder()`, refusing any other `bench`."""
    folder = bench_folder()
    if not (folder / "runner.py").is_file():
        raise click.ClickException(
            f"the benchmark is not installed with the package; run it from a git checkout of "
            f"wbcache (looked for {folder}/runner.py next to {Path(wbcache.__file__).parent})")
    loaded = sys.modules.get("bench")
    if loaded is None:
        spec = importlib.util.spec_from_file_location(
            "bench", folder / "__init__.py", submodule_search_locations=[str(folder)])
        assert spec is not None and spec.loader is not None
        loaded = importlib.util.module_from_spec(spec)
        sys.modules["bench"] = loaded
        spec.loader.exec_module(loaded)
    elif [Path(p).resolve() for p in getattr(loaded, "__path__", [])] != [folder]:
        raise click.ClickException(f"another module named 'bench' is already imported "
                                   f"({getattr(loaded, '__file__', loaded)}), not {folder}")
    return importlib.import_module("bench.runner")


def _sections(_ctx: click.Context, _param: click.Parameter, value: str | None) -> tuple[str, ...]:
    if value is None:
        return SECTIONS
    chosen = tuple(part.strip() for part in value.split(",") if part.strip())
    unknown = [part for part in chosen if part not in SECTIONS]
    if unknown or not chosen:
        raise click.BadParameter(f"choose from {', '.join(SECTIONS)} (comma-separated), "
                                 f"not {value!r}")
    return chosen


@click.command()
@click.option("--quick", is_flag=True, help="Shorter trials, one round, 100,000-record "
              "recovery and memory rows: under a minute.")
@click.option("--smoke", is_flag=True, help="Every row for milliseconds: checks that the "
              "benchmark runs (CI); the numbers mean nothing.")
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
              help="PostgreSQL server of the postgres section (e.g. postgresql://postgres@"
                   "127.0.0.1:5432/test; env WBCACHE_BENCH_PG_DSN); the run works in a "
                   "schema of its own, dropped at the end. Without it: 'not configured'.")
def bench(quick: bool, smoke: bool, only: tuple[str, ...], rounds: int | None,
          trial_seconds: float | None, scratch_parent: Path | None, plot_path: Path,
          no_plot: bool, json_path: Path | None, pg_dsn: str | None) -> None:
    """Measure wbcache against the raw fsync limit and its peers, on this machine, in one run.

    Prints one table (ops/s, ratio to the baseline, p50/p99 acknowledgement latency), judges
    the targets of issue #5 (met / MISSED) and draws a PNG plot. Needs a checkout (the
    bench/ folder) and the bench extras: pip install -e '.[bench]'. Redis rows start a
    private redis-server when one is on PATH; PostgreSQL rows need --pg-dsn.

    Examples: wbcache bench --quick;  python -m bench --only wbcache,baselines;
    python -m bench --only postgres --pg-dsn postgresql://postgres@127.0.0.1:5432/test
    """
    if quick and smoke:
        raise click.UsageError("--quick and --smoke exclude each other")
    runner = _load_bench()
    config_module = importlib.import_module("bench.config")
    mode = "smoke" if smoke else "quick" if quick else "full"
    config = config_module.BenchConfig.for_mode(
        mode, rounds=rounds, trial_seconds=trial_seconds, scratch_parent=scratch_parent,
        only=only, pg_dsn=pg_dsn)
    ctx = click.get_current_context()
    args = sys.argv[1:] if ctx.parent is None else sys.argv[2:]  # after "bench" under wbcache
    if pg_dsn:  # the command is printed and saved: never with the server's password
        redacted = importlib.import_module("bench.postgres_server").redact_dsn(pg_dsn)
        args = [arg.replace(pg_dsn, redacted) for arg in args]
    command = " ".join([ctx.command_path, *map(shlex.quote, args)])
    runner.run(config, command=command, plot_path=None if no_plot else plot_path,
               json_path=json_path, echo=click.echo,
               progress=lambda line: click.echo(line, err=True))
