"""The benchmark starts, runs every row and prints its table; its far link really is far.

Benchmarks are not tests: these run `python -m bench --smoke` from the repository's root (as
a user of a checkout does), where every row runs for milliseconds, and check the shape of what
comes out, never a number. The PostgreSQL rows run against the test server when
WBCACHE_TEST_PG_DSN names one (the write-back rows then also read every acknowledged put back
from PostgreSQL, and fail if one is missing); without it they say "not configured".
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# A row may be unavailable on a machine, never broken.
ALLOWED_STATUSES = {"ok", "not available", "not installed", "not installed (redis-py)",
                    "not installed (redis-benchmark)", "not configured"}
PG_DSN = os.environ.get("WBCACHE_TEST_PG_DSN")
PG_SECTIONS = ("postgres", "postgres-far")


def bench(*args: str, env: dict[str, str] | None = None,
          timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`python -m bench ARGS` from the repository's root."""
    if env is None:
        env = {name: value for name, value in os.environ.items()
               if name != "WBCACHE_BENCH_PG_DSN"}
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_python_m_bench_smoke_prints_every_row_the_targets_and_a_plot(tmp_path: Path) -> None:
    plot, results = tmp_path / "bench.png", tmp_path / "bench.json"
    # About 10 s on an idle machine, but 70-115 s at load 15 on 2 cores (every row starts
    # processes): the timeout is there for a hang, not to judge the speed.
    done = bench("--smoke", "--dir", str(tmp_path), "--plot", str(plot), "--json", str(results),
                 *(["--pg-dsn", PG_DSN] if PG_DSN else []), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    for expected in ("raw os.write + os.fdatasync loop", "SQLite WAL synchronous=FULL",
                     "Redis appendfsync always, 1 client via redis-py",
                     "via redis-benchmark (C)", "put, fsync always, 1 thread",
                     "sys.setswitchinterval(", "AsyncCache put", "get hit, dict values",
                     "flusher into LMDB", "recovery replay", "wbcache recover, peak RSS",
                     "memory,", "hot keys", "hit ratio, exact LRU", "hit ratio, wbcache (CLOCK)",
                     "wbcache over PostgreSQL, put", "1 transaction per put (write-through)",
                     "flusher into PostgreSQL", "far: wbcache over PostgreSQL",
                     "far: wbcache write-back", "put acknowledgement latency",
                     "put, 2 processes x 16 threads, one shared directory",
                     "put, 1 process x 64 threads, one shared directory",
                     "flush into the shared LMDB, 4 lanes at once",
                     "keys another process wrote and flushed",
                     "first get that sees it", "documented bound flush_interval",
                     "targets, each judged on numbers of this run", "SMOKE RUN",
                     "wbcache recover of 5,000 distinct keys: peak RSS"):
        assert expected in out, expected
    assert "issue" not in out.lower()  # targets say what they are, not where they came from
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    document = json.loads(results.read_text())
    broken = {row["id"]: row["status"] for row in document["rows"]
              if row["status"] not in ALLOWED_STATUSES}
    assert not broken
    postgres = {row["id"]: row for row in document["rows"] if row["section"] in PG_SECTIONS}
    assert {"pg_write_through", "pg_write_back", "far_write_back_t1",
            "far_hot_write_back"} <= set(postgres)
    if PG_DSN:
        assert {row["status"] for row in postgres.values()} == {"ok"}
        for row_id in ("pg_write_back", "far_write_back_t1", "far_hot_write_back"):
            assert "acknowledged keys read back from PostgreSQL" in postgres[row_id]["note"]
            assert "database transactions per put" in postgres[row_id]["note"]
        assert "SELECT 1 round trip" in postgres["far_write_back_t1"]["note"]
        assert "write-through" in out.split("wbcache over PostgreSQL, put")[1].splitlines()[0]
    else:
        assert {row["status"] for row in postgres.values()} == {"not configured"}
    assert {target["verdict"].split(" ")[0] for target in document["targets"]} <= {
        "met", "MISSED", "not"}
    assert not list(tmp_path.glob("wbcache-bench-*")), "the scratch directory was left behind"


def test_python_m_bench_help_works_from_the_repository_root() -> None:
    done = bench("--help")
    assert done.returncode == 0, done.stderr
    assert "python -m bench" in done.stdout and "--quick" in done.stdout


def test_bench_runs_only_the_sections_asked_for(tmp_path: Path) -> None:
    done = bench("--smoke", "--only", "baselines", "--no-plot", "--dir", str(tmp_path))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "raw os.write + os.fdatasync loop" in done.stdout
    assert "put, fsync always" not in done.stdout


def test_bench_refuses_quick_and_smoke_together() -> None:
    done = bench("--quick", "--smoke")
    assert done.returncode == 2
    assert "exclude each other" in done.stderr


def test_bench_rejects_an_unknown_section() -> None:
    done = bench("--only", "mongodb")
    assert done.returncode == 2
    assert "choose from" in done.stderr


def test_bench_postgres_rows_say_not_configured_without_a_server(tmp_path: Path) -> None:
    done = bench("--smoke", "--only", "postgres", "--no-plot", "--dir", str(tmp_path),
                 "--json", str(tmp_path / "out.json"))
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads((tmp_path / "out.json").read_text())["rows"]
    assert rows and {row["status"] for row in rows} == {"not configured"}
    assert "--pg-dsn or WBCACHE_BENCH_PG_DSN" in done.stdout


def test_bench_never_prints_the_servers_password(tmp_path: Path) -> None:
    dsn = "postgresql://bench:s3cret@127.0.0.1:1/test?connect_timeout=2"  # nothing listens
    results = tmp_path / "out.json"
    done = bench("--smoke", "--only", "postgres", "--no-plot", "--dir", str(tmp_path),
                 "--pg-dsn", dsn, "--json", str(results))
    assert done.returncode == 0, done.stderr[-2000:]
    document = json.loads(results.read_text())
    assert {row["status"].split(":")[0] for row in document["rows"]} == {"failed"}
    assert "bench:***@127.0.0.1:1" in done.stdout and "bench:***@" in document["command"]
    assert "s3cret" not in done.stdout + done.stderr + results.read_text()


def test_the_far_link_proxy_delays_each_way_and_passes_every_byte() -> None:
    delay = 0.02  # large next to a loopback round trip, so the check cannot pass by accident
    with socket.create_server(("127.0.0.1", 0)) as echo_server:
        threading.Thread(target=_echo_one, args=(echo_server,), daemon=True).start()
        proxy = subprocess.Popen(
            [sys.executable, "-m", "bench.delay_proxy", "127.0.0.1",
             str(echo_server.getsockname()[1]), str(delay)],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert proxy.stdout is not None
            port = int(proxy.stdout.readline())
            payload = os.urandom(3 << 20)  # several chunks each way
            with socket.create_connection(("127.0.0.1", port)) as client:
                started = time.monotonic()
                client.sendall(b"x")
                assert client.recv(1) == b"x"
                round_trip = time.monotonic() - started
                sender = threading.Thread(target=client.sendall, args=(payload,))
                sender.start()
                received = bytearray()
                while len(received) < len(payload):
                    received += client.recv(1 << 16)
                sender.join()
        finally:
            assert proxy.stdin is not None
            proxy.stdin.close()
            proxy.wait(timeout=10)
    assert round_trip >= 2 * delay
    assert bytes(received) == payload
    assert proxy.returncode == 0


def _echo_one(server: socket.socket) -> None:
    connection, _ = server.accept()
    with connection:
        while data := connection.recv(1 << 16):
            connection.sendall(data)


def test_a_call_slower_than_the_whole_window_is_still_measured() -> None:
    """On a loaded machine a --smoke row's call can outlast its window (0.04 s): the window
    widens until a call has ended in it, in every harness, instead of failing the row."""
    import asyncio

    from bench.harness import run_chunks, run_tasks

    def chunk() -> int:
        time.sleep(0.03)
        return 1

    sample = run_chunks(chunk, seconds=0.01, warmup=0.01)
    assert 0 < sample.value < 1 / 0.03 * 1.01  # one chunk or more, each 30 ms

    async def slow() -> None:
        await asyncio.sleep(0.03)

    sample = asyncio.run(run_tasks([slow], seconds=0.01, warmup=0.001))
    assert sample.value > 0 and sample.p50 is not None and sample.p50 >= 0.03


def test_a_shared_worker_scheduled_after_its_window_widens_it_until_a_call_ended(
        tmp_path: Path) -> None:
    """On a loaded machine a shared-directory worker can read "start" after its --smoke window
    (0.04 s) is over: it widens the window until one of its puts (gets) has ended in it,
    instead of reporting that none did (the row then failed)."""
    from bench.shared_pool import OPEN_TIMEOUT, REPORT_TIMEOUT, WorkerPool, working_on

    pool = WorkerPool(tmp_path)
    try:
        with working_on(tmp_path / "shared", pool, 1) as shared:
            worker = shared.open(0, "acks", 2)
            worker.expect("ready", OPEN_TIMEOUT)
            worker.send({"start": time.monotonic() - 0.5, "warmup": 0.0, "seconds": 0.01})
            acks = worker.expect("count", REPORT_TIMEOUT)
            worker.send({"loop": ["a", "b"], "warmup": -0.5, "seconds": 0.01})
            gets = worker.expect("count", REPORT_TIMEOUT)
    finally:
        pool.stop()
    for report in (acks, gets):
        assert report["count"] >= 1 and len(report["latencies"]) == report["count"]
        assert 0.5 <= report["seconds"] < 0.5 + 60


def test_target_labels_name_the_sizes_the_run_measured() -> None:
    from bench.config import BenchConfig
    from bench.targets import TARGETS

    def labels(mode: str) -> list[str]:
        config = BenchConfig.for_mode(mode)
        return [target.label(config) for target in TARGETS]
    assert "wbcache recover of 1,000,000 distinct keys: peak RSS" in labels("full")
    assert "wbcache recover of 100,000 distinct keys: peak RSS" in labels("quick")
    assert "put_many of 100 (keys/s) / raw loop" in labels("smoke")
    assert not [label for label in labels("full") if "{" in label or "}" in label]


def compare(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """`python -m bench.compare ARGS` from the repository's root."""
    return subprocess.run([sys.executable, "-m", "bench.compare", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_bench_compare_names_a_file_it_cannot_compare_in_one_line(tmp_path: Path) -> None:
    row = {"id": "put_t1", "section": "wbcache", "label": "put, 1 thread", "unit": "ops/s",
           "value": 100.0, "baseline": None}
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"rows": [row]}))
    cases = {"missing.json": (None, "No such file or directory"),
             "truncated.json": ('{"rows": [', "not JSON"),
             "list.json": ("[1, 2]", 'no list of "rows"'),
             "shape.json": (json.dumps({"rows": [{**row, "value": "fast"}]}),
                            "rows[0] 'value' is \"fast\", not a number or null")}
    for number, (name, (text, problem)) in enumerate(cases.items()):
        path = tmp_path / name
        if text is not None:
            path.write_text(text)
        sides = ("--before", path, "--after", good) if number % 2 else (
            "--before", good, good, "--after", good, path)
        done = compare(*sides)
        assert done.returncode == 2, (name, done.stderr)
        assert done.stdout == "" and "Traceback" not in done.stderr, (name, done.stderr)
        assert done.stderr.count("\n") == 1, done.stderr
        assert str(path) in done.stderr and problem in done.stderr, done.stderr
    done = compare("--before", good, "--after", good)
    assert done.returncode == 0, done.stderr
    assert "put, 1 thread" in done.stdout and "+0%" in done.stdout
    done = compare("--help")
    assert done.returncode == 0 and "python -m bench ... --json FILE" in done.stdout
