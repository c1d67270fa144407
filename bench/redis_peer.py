"""Redis against a PRIVATE redis-server: started on a free loopback port with its own
directory, stopped when the run ends. A server the machine already runs (e.g. on 6379) is
never contacted. Two kinds of client, both shown, so that Redis is never shown slower than it
is:

  redis_{mode}_c{N}        redis-py, one connection per client thread, the value encoded with
                           msgpack in the timed call: what a Python application gets (the
                           Python client's own cost is in the number)
  redis_bench_always_c{N}  redis-benchmark, Redis' own C client, N connections, SET of random
                           keys of the same key pool with values of the same size: what the
                           server can do. Its note gives the CPU time of the server plus the
                           client per SET, and the server's voluntary context switches per SET

`appendonly yes` with `appendfsync always`: Redis fsyncs the AOF before it replies, batching
the writes of one event-loop iteration (its own group commit), so an acknowledged SET is
durable. With `everysec` it replies before the fsync: up to a second of acknowledged writes
can be lost in a machine crash, the durability window wbcache exists to close.
"""

from __future__ import annotations

import contextlib
import csv
import os
import resource
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

from bench.config import BenchConfig
from bench.harness import Op, run_threads
from bench.measurement import Measurement, Sample
from bench.peers import cycling_op
from bench.workload import Scratch, Workload

SECTION = "peers"
INSTALL_HINT = "apt-get install redis-server (any 6.x/7.x binary on PATH)"


class PrivateRedis:
    """A redis-server this benchmark starts, owns and stops."""

    def __init__(self, binary: str, directory: Path) -> None:
        self._binary = binary
        self._directory = directory
        self._process: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self) -> None:
        import redis

        last_error = ""
        for _attempt in range(3):  # a free port can be taken between probing and binding
            self.port = _free_loopback_port()
            self._process = subprocess.Popen(
                [self._binary, "--port", str(self.port), "--bind", "127.0.0.1",
                 "--protected-mode", "yes", "--dir", str(self._directory),
                 "--appendonly", "yes", "--appendfsync", "always", "--save", "",
                 "--daemonize", "no", "--logfile", "redis.log"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and self._process.poll() is None:
                try:
                    if redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1).ping():
                        return
                except redis.ConnectionError:
                    time.sleep(0.02)
            last_error = self._log_tail()
            self.stop()
        raise RuntimeError(f"redis-server did not start: {last_error}")

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def client(self) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, single_connection_client=True,
                           socket_timeout=30)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def _log_tail(self) -> str:
        try:
            lines = (self._directory / "redis.log").read_text(errors="replace").splitlines()
        except OSError:
            return "no log"
        return lines[-1] if lines else "empty log"


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def measurements(config: BenchConfig, workload: Workload, scratch: Scratch,
                 resources: contextlib.ExitStack) -> list[Measurement]:
    binary = shutil.which("redis-server")
    missing = None if binary else "not installed"
    try:
        import redis  # noqa: F401
    except ImportError:
        missing = "not installed (redis-py)"
    server: list[PrivateRedis] = []

    def running_server() -> PrivateRedis:
        if not server:  # started at the first Redis trial, stopped when the run ends
            directory = scratch.root / "redis"
            directory.mkdir()
            instance = PrivateRedis(binary or "redis-server", directory)
            resources.callback(instance.stop)
            instance.start()
            server.append(instance)
        return server[0]

    rows = []
    for mode, series, note in (("always", "Redis AOF always, redis-py", ""),
                               ("everysec", "Redis AOF everysec, redis-py (not durable per ack)",
                                "acks before fsync: up to 1 s lost on a machine crash")):
        for clients in config.peer_clients:
            label = f"Redis appendfsync {mode}, {_clients(clients)} via redis-py (Python)"
            trial = None if missing else _trial(config, workload, running_server, mode, clients)
            rows.append(Measurement(f"redis_{mode}_c{clients}", SECTION, label, trial,
                                    baseline="raw_fsync", series=series, concurrency=clients,
                                    unavailable=missing, note=note))
    c_client = shutil.which("redis-benchmark")
    c_missing = missing or (None if c_client else "not installed (redis-benchmark)")
    value_size = len(workload.encoded_values[0])
    for clients in config.redis_benchmark_clients:
        label = f"Redis appendfsync always, {_clients(clients)} via redis-benchmark (C)"
        trial = None if c_missing else _c_client_trial(
            config, c_client or "redis-benchmark", running_server, clients, workload.size,
            value_size)
        rows.append(Measurement(f"redis_bench_always_c{clients}", SECTION, label, trial,
                                baseline="raw_fsync", series="Redis AOF always, redis-benchmark",
                                concurrency=clients, unavailable=c_missing))
    return rows


def _clients(count: int) -> str:
    return f"{count} client" + ("" if count == 1 else "s")


def _c_client_trial(config: BenchConfig, binary: str, running_server: Callable[[], PrivateRedis],
                    clients: int, key_pool: int, value_size: int) -> Callable[[], Sample]:
    # redis-benchmark runs a number of requests, not a time: the first trial guesses, each
    # later one asks for what the previous rate does in `trial_seconds`.
    requests = [max(1_000, int(20_000 * config.trial_seconds))]

    def trial() -> Sample:
        server = running_server()
        admin = server.client()
        try:
            admin.config_set("appendfsync", "always")
        finally:
            admin.close()
        count = requests[0]
        server_before = _process_usage(server.pid)
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run(
            [binary, "-h", "127.0.0.1", "-p", str(server.port), "-c", str(clients),
             "-n", str(count), "-t", "set", "-r", str(key_pool), "-d", str(value_size),
             "--csv"], capture_output=True, text=True, timeout=300, check=False)
        children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        server_after = _process_usage(server.pid)
        rows = [row for row in csv.DictReader(done.stdout.splitlines()) if row.get("rps")]
        if done.returncode != 0 or not rows:
            raise RuntimeError(f"redis-benchmark failed (exit {done.returncode}): "
                               f"{(done.stderr or done.stdout).strip()[-300:]}")
        row = rows[0]
        rate = float(row["rps"])
        requests[0] = max(1_000, int(rate * config.trial_seconds))
        server_cpu = server_after[0] - server_before[0]
        client_cpu = (children_after.ru_utime + children_after.ru_stime
                      - children_before.ru_utime - children_before.ru_stime)
        switches = server_after[1] - server_before[1]
        return Sample(rate, _ms(row.get("p50_latency_ms")), _ms(row.get("p99_latency_ms")),
                      note=f"{count:,} SETs; CPU per SET: server {server_cpu / count * 1e6:.1f} "
                           f"µs + C client {client_cpu / count * 1e6:.1f} µs; server "
                           f"main thread {switches / count:.2f} voluntary switches per SET")
    return trial


def _ms(text: str | None) -> float | None:
    return None if not text else float(text) / 1e3


def _process_usage(pid: int) -> tuple[float, int]:
    """(user + system CPU seconds of every thread, voluntary context switches of the main
    thread: Redis' event loop, which also fsyncs under `always`) of process `pid` so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    switches = 0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("voluntary_ctxt_switches:"):
                switches = int(line.split()[1])
    return cpu, switches


def _trial(config: BenchConfig, workload: Workload, running_server: Callable[[], PrivateRedis],
           mode: str, clients: int) -> Callable[[], Sample]:
    def trial() -> Sample:
        server = running_server()
        admin = server.client()
        try:
            admin.config_set("appendfsync", mode)
            connections = [server.client() for _ in range(clients)]
            packb = msgpack.packb
            ops: list[Op] = []
            for worker, connection in enumerate(connections):
                keys, values = workload.slice_for(worker, clients)
                set_ = connection.set

                def put(key: str, value: Any, set_: Any = set_) -> None:
                    set_(key, packb(value))
                ops.append(cycling_op(put, keys, values))
            try:
                return run_threads(ops, config.trial_seconds, config.warmup_seconds)
            finally:
                for connection in connections:
                    connection.close()
        finally:
            admin.close()
    return trial
