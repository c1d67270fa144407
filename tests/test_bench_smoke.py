"""The benchmark starts, runs every row and prints its table (issue #5).

Benchmarks are not tests: these run `--smoke`, where every row runs for milliseconds, and check
the shape of what comes out, never a number.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner
from wbcache.cli import main

REPO = Path(__file__).resolve().parent.parent
# A row may be unavailable on a machine, never broken.
ALLOWED_STATUSES = {"ok", "not available", "not installed", "not installed (redis-py)"}


def test_python_m_bench_smoke_prints_every_row_the_targets_and_a_plot(tmp_path: Path) -> None:
    plot, results = tmp_path / "bench.png", tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--dir", str(tmp_path),
         "--plot", str(plot), "--json", str(results)],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    for expected in ("raw os.write + os.fdatasync loop", "SQLite WAL synchronous=FULL",
                     "Redis appendfsync always", "put, fsync always, 1 thread",
                     "AsyncCache put", "get hit, dict values", "flusher into LMDB",
                     "recovery replay", "memory,", "hot keys", "targets (issue #5)",
                     "SMOKE RUN"):
        assert expected in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    document = json.loads(results.read_text())
    broken = {row["id"]: row["status"] for row in document["rows"]
              if row["status"] not in ALLOWED_STATUSES}
    assert not broken
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
