"""The table a multi-node campaign writes into: fresh, uniquely named, dropped at the end.

The campaign runs against a server that outlives it and may hold other data, so it never
touches a table it did not make: it picks `wbtorture_<12 hex digits>`, checks that neither it
nor its `_checkpoints` table exists, lets `PostgresBackend` create both, and drops exactly
those two when done. Reads go through the public API (a cache directory of its own).

psycopg is imported where used (it is the `postgres` extra), as the backend itself does.
"""

from __future__ import annotations

import secrets
from typing import Any

import wbcache
from wbcache.backends.postgres import URL_PREFIXES, PostgresBackend, redact, url_query_at

__all__ = ["SharedTable", "check_url", "redact"]  # redact: for what callers print

_CHOSEN_HERE = ("table", "cache_id")  # the campaign picks these itself


def check_url(url: str) -> None:
    """Raise `ValueError` unless `url` is a postgresql:// URL the campaign can use as given.
    The messages never quote the URL (nor, if it holds a password, what libpq quotes of it);
    a URL that passes is one libpq reads, in which `redact` finds every password."""
    if not url.startswith(URL_PREFIXES):
        raise ValueError("only PostgreSQL backends can be tortured: give a postgresql:// URL")
    try:  # what `wbcache.open` refuses (a raw '@' in the password, what libpq cannot read)
        chosen = [name for name in _CHOSEN_HERE if name in PostgresBackend.split_url(url)[1]]
    except ImportError:
        return  # the run itself says that the backend needs psycopg
    if chosen:
        raise ValueError(f"leave {' and '.join(chosen)} out of the URL: the torture makes a "
                         f"fresh table of its own (and drops it), and each node has its own "
                         f"cache_id")


class SharedTable:
    """`with SharedTable(url) as table:` a new table `table.name`; `table.url` is `url` naming
    it, for the nodes (it may hold a password: pass it on, never print it). Dropped (with its
    checkpoints table) when the block ends."""

    def __init__(self, url: str) -> None:
        check_url(url)
        self.name = f"wbtorture_{secrets.token_hex(6)}"
        # Added as written: a URL taken apart and joined again is not always the one given
        self.url = f"{url}{'&' if url_query_at(url) != -1 else '?'}table={self.name}"
        self._libpq = PostgresBackend.split_url(url)[0]
        self._created = False

    def __enter__(self) -> SharedTable:
        names = (self.name, f"{self.name}_checkpoints")
        with self._connect() as conn:
            found = [name for name in names
                     if conn.execute("SELECT to_regclass(%s)", (name,)).fetchone()[0]]
        if found:  # 48 random bits: never in practice, but never someone else's table either
            raise RuntimeError(f"table {found[0]} already exists; not touching it")
        self._created = True  # from here on the tables may exist: drop them whatever happens
        wbcache.PostgresBackend.from_url(self.url).close()  # creates both tables
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._created:
            self.drop()

    def drop(self) -> None:
        from psycopg import sql

        with self._connect() as conn:
            conn.execute(sql.SQL("DROP TABLE IF EXISTS {}, {}").format(
                sql.Identifier(self.name), sql.Identifier(f"{self.name}_checkpoints")))
        self._created = False

    def contents(self, directory: str) -> dict[Any, Any]:
        """Every key and value in the table, read through a cache directory of its own."""
        with wbcache.open(directory, backend=self.url) as cache:
            return dict(cache.items())

    def _connect(self) -> Any:
        import psycopg

        return psycopg.connect(self._libpq, autocommit=True)
