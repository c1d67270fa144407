"""The benchmark starts, runs every row and prints its table (issue #5).

Benchmarks are not tests: these run `--smoke`, where every row runs for milliseconds, and check
the shape of what comes out, never a number. The PostgreSQL rows run against the test server
when WBCACHE_TEST_PG_DSN names one (the write-back row then also reads every acknowledged put
back from PostgreSQL, and fails if one is missing); without it they say "not configured".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from wbcache.cli import main

REPO = Path(__file__).resolve().parent.parent
# A row may be unavailable on a machine, never broken.
ALLOWED_STATUSES = {"ok", "not available", "not installed", "not installed (redis-py)",
                    "not configured"}
PG_DSN = os.environ.get("WBCACHE_TEST_PG_DSN")
PG_ROWS = ("pg_write_through", "pg_write_back", "pg_flush_puts", "pg_flush_incrs")


def test_python_m_bench_smoke_prints_every_row_the_targets_and_a_plot(tmp_path: Path) -> None:
    plot, results = tmp_path / "bench.png", tmp_path / "bench.json"
    env = {name: value for name, value in os.environ.items() if name != "WBCACHE_BENCH_PG_DSN"}
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--dir", str(tmp_path),
         "--plot", str(plot), "--json", str(results),
         *(["--pg-dsn", PG_DSN] if PG_DSN else [])],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    for expected in ("raw os.write + os.fdatasync loop", "SQLite WAL synchronous=FULL",
                     "Redis appendfsync always", "put, fsync always, 1 thread",
                     "AsyncCache put", "get hit, dict values", "flusher into LMDB",
                     "recovery replay", "memory,", "hot keys", "targets (issue #5)",
                     "wbcache over PostgreSQL, put", "1 transaction per put (write-through)",
                     "flusher into PostgreSQL", "SMOKE RUN"):
        assert expected in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    document = json.loads(results.read_text())
    broken = {row["id"]: row["status"] for row in document["rows"]
              if row["status"] not in ALLOWED_STATUSES}
    assert not broken
    postgres = {row["id"]: row for row in document["rows"] if row["section"] == "postgres"}
    assert sorted(postgres) == sorted(PG_ROWS)
    if PG_DSN:
        assert {row["status"] for row in postgres.values()} == {"ok"}
        assert "acknowledged puts read back from PostgreSQL" in postgres["pg_write_back"]["note"]
        assert "write-through" in out.split("wbcache over PostgreSQL, put")[1].splitlines()[0]
    else:
        assert {row["status"] for row in postgres.values()} == {"not configured"}
    assert {target["verdict"].split(" ")[0] for target in document["targets"]} <= {
        "met", "MISSED", "not"}
    assert not list(tmp_path.glob("wbcache-bench-*")), "the scratch directory was left behind"


def test_wbcache_bench_runs_the_same_benchmark_with_the_same_options(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["bench", "--smoke", "--only", "baselines", "--no-plot",
                                       "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "raw os.write + os.fdatasync loop" in result.output
    assert "put, fsync always" not in result.output  # --only baselines was honoured


def test_bench_refuses_quick_and_smoke_together() -> None:
    result = CliRunner().invoke(main, ["bench", "--quick", "--smoke"])
    assert result.exit_code == 2
    assert "exclude each other" in result.output


def test_bench_rejects_an_unknown_section() -> None:
    result = CliRunner().invoke(main, ["bench", "--only", "mongodb"])
    assert result.exit_code == 2
    assert "choose from" in result.output


def test_bench_postgres_rows_say_not_configured_without_a_server(tmp_path: Path) -> None:
    result = CliRunner(env={"WBCACHE_BENCH_PG_DSN": None}).invoke(
        main, ["bench", "--smoke", "--only", "postgres", "--no-plot", "--dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.output.count("not configured") == len(PG_ROWS)
    assert "--pg-dsn or WBCACHE_BENCH_PG_DSN" in result.output


def test_bench_never_prints_the_servers_password(tmp_path: Path) -> None:
    dsn = "postgresql://bench:s3cret@127.0.0.1:1/test?connect_timeout=2"  # nothing listens
    results = tmp_path / "out.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--only", "postgres", "--no-plot",
         "--dir", str(tmp_path), "--pg-dsn", dsn, "--json", str(results)],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    document = json.loads(results.read_text())
    assert {row["status"].split(":")[0] for row in document["rows"]} == {"failed"}
    assert "bench:***@127.0.0.1:1" in done.stdout and "bench:***@" in document["command"]
    assert "s3cret" not in done.stdout + done.stderr + results.read_text()
