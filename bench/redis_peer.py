"""Redis, driven from Python (redis-py, one connection per client thread), against a PRIVATE
redis-server: started on a free loopback port with its own directory, stopped when the run
ends. A server the machine already runs (e.g. on 6379) is never contacted.

`appendonly yes` with `appendfsync always`: Redis fsyncs the AOF before it replies, batching
the writes of one event-loop iteration (its own group commit), so an acknowledged SET is
durable. With `everysec` it replies before the fsync: up to a second of acknowledged writes
can be lost in a machine crash, the durability window wbcache exists to close.
"""

from __future__ import annotations

import contextlib
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
    for mode, series, note in (("always", "Redis AOF always", ""),
                               ("everysec", "Redis AOF everysec (not durable per ack)",
                                "acks before fsync: up to 1 s lost on a machine crash")):
        for clients in config.peer_clients:
            label = (f"Redis appendfsync {mode}, {clients} client"
                     + ("" if clients == 1 else "s"))
            trial = None if missing else _trial(config, workload, running_server, mode, clients)
            rows.append(Measurement(f"redis_{mode}_c{clients}", SECTION, label, trial,
                                    baseline="raw_fsync", series=series, concurrency=clients,
                                    unavailable=missing, note=note))
    return rows


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
