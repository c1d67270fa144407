"""The PostgreSQL server the `postgres` sections run against: a schema of the run's own, a DSN
that is never printed with its password, and the far link (a delaying proxy) to it.

The server is the user's and outlives the run, so the benchmark touches nothing but the schema
`wbbench_<12 hex digits>` it creates at the first trial that needs it and drops (CASCADE) when
the run ends, whatever happened. psycopg is imported where used (the `bench` extra has it).
"""

from __future__ import annotations

import contextlib
import os
import re
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

_KEYWORD_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)")


def redact_dsn(dsn: str) -> str:
    """`dsn` (a URL or key=value conninfo) with any password replaced by ***."""
    if "://" in dsn:
        parts = urlsplit(dsn)
        if parts.password is not None:
            userinfo, _, host = parts.netloc.rpartition("@")
            dsn = urlunsplit(parts._replace(netloc=f"{userinfo.partition(':')[0]}:***@{host}"))
    return _KEYWORD_PASSWORD.sub(r"\1***", dsn)


class BenchSchema:
    """`table(name)` gives a new, not yet existing table name in the run's schema; the schema
    is created on first use and dropped by the `resources` stack when the run ends."""

    def __init__(self, dsn: str, resources: contextlib.ExitStack) -> None:
        self.dsn = dsn
        self._resources = resources
        self._name: str | None = None
        self._tables = 0

    def table(self, name: str) -> str:
        if self._name is None:
            schema = f"wbbench_{uuid.uuid4().hex[:12]}"
            self.execute(f'CREATE SCHEMA "{schema}"')
            self._resources.callback(self.execute, f'DROP SCHEMA "{schema}" CASCADE')
            self._name = schema
        self._tables += 1
        return f"{self._name}.{name}_{self._tables}"

    def connect(self, dsn: str | None = None) -> Any:
        """An autocommit connection to the server (through `dsn` if given, e.g. the far link)."""
        import psycopg

        return psycopg.connect(dsn or self.dsn, autocommit=True)

    def execute(self, sql: str) -> list[tuple[Any, ...]]:
        """One statement on a connection of its own; its rows, if any."""
        with self.connect() as conn:
            cursor = conn.execute(sql)
            return cursor.fetchall() if cursor.description is not None else []

    def describe(self) -> str:
        """What the write-through row's durability rests on: the server's version and
        commit settings."""
        settings = [self.execute(f"SHOW {name}")[0][0]
                    for name in ("server_version", "fsync", "synchronous_commit")]
        return (f"PostgreSQL {settings[0].split()[0]}, fsync={settings[1]}, "
                f"synchronous_commit={settings[2]}")


@dataclass(frozen=True)
class Link:
    """How a row reaches the server: the DSN to use, what the link is (for the row's note;
    empty for the direct connection), and a reader of the CPU seconds the link itself burns
    (the proxy's; None for the direct connection)."""

    dsn: str
    description: str = ""
    cpu_seconds: Callable[[], float] | None = None


class FarLink:
    """The server behind `bench/delay_proxy.py`, so that every round trip takes `delay`
    seconds longer each way. The proxy process starts at the first `link()` and stops when the
    run ends.

    The proxy's own thread hand-offs add a little to the delay it is told to hold (tens to
    hundreds of µs on a busy machine), which would make the link slower than stated and
    flatter write-back. So the link is calibrated once: the round trip of `SELECT 1` is
    measured directly and through the proxy, and the proxy is restarted with a shorter hold
    until the round trip grows by 2 x `delay` (within 5 %, at most 3 attempts). Every far
    row's note shows the round trips measured."""

    ATTEMPTS = 3

    def __init__(self, schema: BenchSchema, delay: float, resources: contextlib.ExitStack) -> None:
        self._schema = schema
        self._delay = delay
        self._resources = resources
        self._link: Link | None = None
        self._target = _tcp_address(schema.dsn)
        self.unavailable = None if self._target else (
            "not available (the DSN names no TCP host: a Unix socket cannot be proxied)")

    def link(self) -> Link:
        if self._link is None:
            self._link = self._calibrated()
        return self._link

    def _calibrated(self) -> Link:
        from psycopg.conninfo import make_conninfo

        wanted = 2 * self._delay
        hold = self._delay
        for attempt in range(self.ATTEMPTS):
            process, port = self._start(hold)
            dsn = make_conninfo(self._schema.dsn, host="127.0.0.1", hostaddr="127.0.0.1",
                                port=str(port))
            direct, far = self._round_trip(self._schema.dsn), self._round_trip(dsn)
            added = far - direct
            if abs(added - wanted) <= 0.05 * wanted or attempt == self.ATTEMPTS - 1:
                break
            _stop(process)
            hold = max(0.0, hold - (added - wanted) / 2)
        description = (f"link +{self._delay * 1e3:g} ms each way: SELECT 1 round trip "
                       f"{far * 1e3:.2f} ms through the proxy, {direct * 1e3:.2f} ms direct "
                       f"(proxy holds {hold * 1e3:.2f} ms each way, its hand-offs the rest)")
        return Link(dsn, description, lambda: _process_cpu_seconds(process.pid))

    def _start(self, hold: float) -> tuple[subprocess.Popen[str], int]:
        assert self._target is not None
        host, port = self._target
        bench_parent = str(Path(__file__).resolve().parent.parent)
        process = subprocess.Popen(
            [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
             "from bench.delay_proxy import main; main(sys.argv[2:])",
             bench_parent, host, str(port), repr(hold)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self._resources.callback(_stop, process)
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError(f"the delay proxy did not start (exit {process.poll()})")
        return process, int(line)

    def _round_trip(self, dsn: str) -> float:
        """Median seconds of `SELECT 1` on an open connection."""
        with self._schema.connect(dsn) as conn:
            times = []
            for _ in range(100):
                started = time.perf_counter()
                conn.execute("SELECT 1").fetchall()
                times.append(time.perf_counter() - started)
        return statistics.median(times)


def _tcp_address(dsn: str) -> tuple[str, int] | None:
    """(host, port) the DSN connects to over TCP, or None (a Unix socket, or several hosts)."""
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(dsn)
    host = str(params.get("hostaddr") or params.get("host") or "")
    port = str(params.get("port") or "5432")
    if not host or host.startswith("/") or "," in host or "," in port:
        return None
    return host, int(port)


def _process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stop(process: subprocess.Popen[str]) -> None:
    """Stop the proxy (idempotent: the run's cleanup calls it again for every proxy started)."""
    if process.poll() is not None:
        return
    if process.stdin is not None and not process.stdin.closed:
        process.stdin.close()  # the proxy's signal to exit
    try:
        process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
