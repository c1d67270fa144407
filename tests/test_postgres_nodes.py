"""Four processes -- four nodes, each with its own cache directory and 8 threads -- increment the
same 100 counters and put other keys into one PostgreSQL table; each is SIGKILLed and restarted
several times mid-run. Afterwards every counter in the database equals, exactly, the number of
increments that the recovered state says were made.

Each increment is made checkable: a thread's n-th write is ONE batch holding the increment of
counter `counter_of(node, thread, n)` and the marker `seq:<node>:<thread> = n`. A batch is all or
nothing, and recovery restores a prefix of the log, so the marker in the database says exactly
which of that thread's increments were applied: 1..n. A restarted thread reads its marker and
goes on from n + 1. So each counter must equal its share of those increments exactly (nothing
lost, nothing counted twice), and each marker must be >= the last write the thread reported as
acknowledged (an in-flight write may or may not have survived its kill; the marker says which).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
from collections import Counter
from pathlib import Path

import msgpack
import pytest
from pg_support import (  # noqa: F401 (fixtures)
    pg_dsn_fixture,
    pg_schema_fixture,
    query,
    stored_ints,
)

NODES = 4
THREADS = 8
COUNTERS = 100
KILLS = 3  # per node, then a last run that stops cleanly
EVERY_OTHER = 4  # every 4th batch also puts v:<node>:<thread>:<n % 16>
RUN_WRITES = 1000  # acknowledged writes before a run is killed: 1x to 2.5x this, staggered
# Half as many in the default run (still 12 kills landing mid-run, every counter hit); the
# full size with --soak.
RUN_SIZES = [RUN_WRITES // 2, pytest.param(RUN_WRITES, marks=pytest.mark.soak)]


def counter_of(node: int, thread: int, n: int) -> str:
    return f"c{(node * 31 + thread * 7 + n) % COUNTERS}"


NODE = textwrap.dedent(f"""
    import os, sys, threading
    import wbcache
    from wbcache.backends.postgres import PostgresBackend
    path, dsn, table, node = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    backend = PostgresBackend(dsn, table=table)
    cache = wbcache.open(path, backend=backend, flush_interval=0.05)
    os.write(1, f"replayed {{cache.recovery.replayed}}\\n".encode())
    stop = threading.Event()
    report = threading.Lock()

    def work(thread):
        n = cache.get(f"seq:{{node}}:{{thread}}", 0)  # what recovery kept of this thread
        while not stop.is_set():
            n += 1
            with cache.batch() as batch:
                batch.incr(f"c{{(node * 31 + thread * 7 + n) % {COUNTERS}}}")
                batch.put(f"seq:{{node}}:{{thread}}", n)
                if n % {EVERY_OTHER} == 0:
                    batch.put(f"v:{{node}}:{{thread}}:{{n % 16}}", {{"n": n, "pad": "x" * 40}})
            with report:  # only after the batch is acknowledged
                os.write(1, f"{{thread}} {{n}}\\n".encode())

    workers = [threading.Thread(target=work, args=(t,), daemon=True) for t in range({THREADS})]
    for worker in workers:
        worker.start()
    sys.stdin.readline()  # the last run is asked to stop; the others are SIGKILLed
    stop.set()
    for worker in workers:
        worker.join()
    cache.close()
    backend.close()
    os.write(1, b"closed\\n")
""")


class Node:
    """Runs one node's cache directory through KILLS killed runs and one clean run, recording
    per thread the highest write reported as acknowledged."""

    def __init__(self, index: int, path: Path, dsn: str, table: str, run_writes: int) -> None:
        self.index = index
        self.run_writes = run_writes
        self.args = [sys.executable, "-c", NODE, str(path), dsn, table, str(index)]
        self.acked = [0] * THREADS
        self.replayed: list[int] = []  # log records each restart's recovery replayed
        self.failures: list[str] = []
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        for run in range(KILLS + 1):
            last = run == KILLS
            # staggered, so the four nodes die and recover at different moments
            target = self.run_writes + self.run_writes // 2 * ((self.index + run) % 4)
            if not self._one_run(target, last):
                return

    def _one_run(self, target: int, last: bool) -> bool:
        child = subprocess.Popen(self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
        assert child.stdout is not None and child.stdin is not None
        seen = 0
        closed = False
        for line in child.stdout:  # after the kill, what was already in the pipe, to EOF
            if line == b"closed\n":
                closed = True
                continue
            if line.startswith(b"replayed "):
                self.replayed.append(int(line.split()[1]))
                continue
            thread, n = map(int, line.split())
            self.acked[thread] = max(self.acked[thread], n)
            seen += 1
            if seen == target:
                if last:
                    child.stdin.write(b"stop\n")
                    child.stdin.flush()
                else:
                    child.send_signal(signal.SIGKILL)
        child.wait()
        stderr = child.stderr.read().decode()  # type: ignore[union-attr]
        child.stdin.close()
        expected = 0 if last else -signal.SIGKILL
        if child.returncode != expected or (last and not closed) or seen < target:
            self.failures.append(f"node {self.index}: exit {child.returncode} after {seen} "
                                 f"writes: {stderr[-2000:]}")
            return False
        return True


@pytest.mark.parametrize("run_writes", RUN_SIZES)
def test_four_nodes_killed_and_restarted_count_every_increment_exactly_once(
        tmp_path: Path, pg_dsn: str, pg_schema: str, run_writes: int) -> None:
    table = f"{pg_schema}.wbcache"
    nodes = [Node(index, tmp_path / f"node{index}", pg_dsn, table, run_writes)
             for index in range(NODES)]
    for node in nodes:
        node.thread.start()
    for node in nodes:
        node.thread.join()
    assert [failure for node in nodes for failure in node.failures] == []

    markers = stored_ints(pg_dsn, table, "seq:")
    counters = stored_ints(pg_dsn, table, "c")
    expected: Counter[str] = Counter()
    for node in nodes:
        for thread in range(THREADS):
            applied = markers[f"seq:{node.index}:{thread}"]
            assert applied >= node.acked[thread], (node.index, thread)  # acknowledged: applied
            for n in range(1, applied + 1):
                expected[counter_of(node.index, thread, n)] += 1
    assert len(expected) == COUNTERS
    assert counters == dict(expected)  # every counter exact: none lost, none twice
    total = sum(markers.values())
    assert total == sum(counters.values()) and total >= NODES * (KILLS + 1) * run_writes
    # the kills landed mid-run: restarts found acknowledged writes the database did not have
    restarts = [count for node in nodes for count in node.replayed[1:]]
    assert len(restarts) == NODES * KILLS and sum(1 for count in restarts if count) >= NODES

    # the other keys hold, exactly, the newest of the applied puts
    puts = {bytes(key)[1:].decode(): msgpack.unpackb(value)["n"] for key, value in query(
        pg_dsn, f"SELECT key, value FROM {table} WHERE key >= 'sv:' AND key < 'sv;'")}
    for node in nodes:
        for thread in range(THREADS):
            applied = markers[f"seq:{node.index}:{thread}"]
            for slot in range(16):
                newest = max((n for n in range(EVERY_OTHER, applied + 1, EVERY_OTHER)
                              if n % 16 == slot), default=None)
                assert puts.get(f"v:{node.index}:{thread}:{slot}") == newest
    assert len(query(pg_dsn, f"SELECT cache_id FROM {table}_checkpoints")) == NODES
