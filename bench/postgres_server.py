"""The PostgreSQL server the `postgres` section runs against: a schema of the run's own, and a
DSN that is never printed with its password.

The server is the user's and outlives the run, so the benchmark touches nothing but the schema
`wbbench_<12 hex digits>` it creates at the first trial that needs it and drops (CASCADE) when
the run ends, whatever happened. psycopg is imported where used (the `bench` extra has it).
"""

from __future__ import annotations

import contextlib
import re
import uuid
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

    def connect(self) -> Any:
        import psycopg

        return psycopg.connect(self.dsn, autocommit=True)

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
