"""The operating commands on a directory that flushes into PostgreSQL: the database given by
--backend or WBCACHE_BACKEND (never stored in the directory), refused without it, the
password never printed, `recover` replaying into PostgreSQL. Each test has a fresh schema
(tests/pg_support.py) and runs the command in-process and as a subprocess of the script.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cli_support import DRIVERS, assert_one_line_error, pg_url, run, tree_state
from pg_support import pg_dsn_fixture, pg_schema_fixture, query  # noqa: F401 (fixtures)

import wbcache

SECRET = "Zq7xK9w"  # the URL's password (trust authentication ignores it): never printed

# A cache on a PostgreSQL table: 3 puts and an increment flushed, then 4 puts and 4
# increments of 10 only in its log, and kill -9.
WRITER = textwrap.dedent("""
    import os, signal, sys, wbcache
    cache = wbcache.open(sys.argv[1], backend=sys.argv[2], flush_interval=3600,
                         flush_threshold=10**9)
    for i in range(3):
        cache.put(f"flushed:{i}", i)
    cache.incr("visits")
    cache.flush()
    for i in range(4):
        cache.put(f"logged:{i}", i)
        cache.incr("visits", 10)
    os.kill(os.getpid(), signal.SIGKILL)
""")
AFTER_RECOVERY = {"flushed:0": 0, "flushed:1": 1, "flushed:2": 2, "logged:0": 0, "logged:1": 1,
                  "logged:2": 2, "logged:3": 3, "visits": 41}


@pytest.fixture
def url(pg_dsn: str, pg_schema: str) -> str:
    return pg_url(pg_dsn, f"{pg_schema}.cache", password=SECRET)


@pytest.fixture
def killed(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "cache"
    child = subprocess.run([sys.executable, "-c", WRITER, str(path), url], capture_output=True)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()
    return path


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        assert SECRET not in text, text


@pytest.mark.parametrize("driver", DRIVERS)
def test_every_command_without_the_url_is_refused_in_one_line_saying_how_to_give_it(
        killed: Path, driver: str) -> None:
    before = tree_state(killed)
    for args in (("recover",), ("recover", "--dry-run"), ("inspect",), ("verify",), ("stats",),
                 ("dump",), ("get", "--bytes")):
        result = run(driver, *args, str(killed), *(["visits"] if args[0] == "get" else []))
        assert_one_line_error(result, 2, f"{killed} flushes into a postgresql database",
                              "--backend URL", "WBCACHE_BACKEND")
    assert tree_state(killed) == before


@pytest.mark.parametrize("driver", DRIVERS)
def test_the_read_only_commands_read_through_the_url_and_change_no_byte(
        killed: Path, url: str, driver: str) -> None:
    before = tree_state(killed)

    inspected = run(driver, "inspect", "--json", "--backend", url, str(killed))
    human = run(driver, "inspect", "--backend", url, str(killed))
    dumped = run(driver, "dump", str(killed), env={"WBCACHE_BACKEND": url})
    got = run(driver, "get", "--json", str(killed), "visits", env={"WBCACHE_BACKEND": url})
    stats = run(driver, "stats", "--json", "--backend", url, str(killed))
    verified = run(driver, "verify", "--backend", url, str(killed))

    for result in (inspected, human, dumped, got, stats, verified):
        assert result.exit_code == 0, result.stderr
        assert_no_secret(result.stdout, result.stderr)
    assert tree_state(killed) == before
    document = inspected.json()
    assert (document["database_kind"], document["shared"], document["checkpoint_lsn"],
            document["pending_records"], document["database_file_bytes"]) == (
        "postgresql", False, 4, 8, None)
    assert document["database_url"] == url.replace(SECRET, "***")
    assert url.replace(SECRET, "***") in human.stdout
    assert {json.loads(line)["key"]: json.loads(line)["value"]
            for line in dumped.stdout.splitlines()} == AFTER_RECOVERY
    # the log's 4 increments are added, as deltas, to the 1 the database holds
    assert (got.json()["value"], got.json()["source"]) == (41, "log")
    assert stats.json()["entries_after_recovery"] == len(AFTER_RECOVERY)


@pytest.mark.parametrize("driver", DRIVERS)
def test_recover_replays_into_postgresql_and_keeps_nothing_of_the_url_but_its_table(
        killed: Path, url: str, pg_dsn: str, pg_schema: str, driver: str) -> None:
    result = run(driver, "recover", "--json", str(killed), env={"WBCACHE_BACKEND": url})

    assert result.exit_code == 0, result.stderr
    assert_no_secret(result.stdout, result.stderr)
    report = result.json()
    assert (report["replayed"], report["checkpoint_before"], report["checkpoint_after"]) == (
        8, 4, 12)
    assert os.listdir(killed / "wal") == []
    rows = query(pg_dsn, f"SELECT num FROM {pg_schema}.cache WHERE key = %s", (b"svisits",))
    assert rows == [(41,)]
    for entry in killed.rglob("*"):
        if entry.is_file() and entry.name != "backend":
            assert SECRET.encode() not in entry.read_bytes()
            assert pg_schema.encode() not in entry.read_bytes()  # no part of the URL
    # the table alone, so that no log is replayed into another one
    assert (killed / "backend").read_text() == f"postgresql\ntable={pg_schema}.cache\n"
    with wbcache.open(killed, backend=url) as cache:
        assert cache.recovery.replayed == 0 and dict(cache.items()) == AFTER_RECOVERY


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_url_naming_another_directory_s_table_is_refused_though_the_log_starts_at_lsn_1(
        killed: Path, url: str, pg_dsn: str, pg_schema: str, driver: str) -> None:
    """The killed cache flushed LSNs 1-4, but its log still starts at LSN 1 (segment 1 is
    the one it writes): a table holding no checkpoint for it looked like one it never flushed
    into, and `recover` replayed the log there and deleted it. The right table never had the
    writes, and every later open read them as lost."""
    other = pg_url(pg_dsn, f"{pg_schema}.other", password=SECRET)
    with wbcache.open(killed.parent / "other", backend=other) as cache:
        cache.put("x", 1)
    assert sorted(os.listdir(killed / "wal"))[0] == f"{1:020d}.log"
    before = tree_state(killed)
    rows = f"SELECT key, num, value FROM {pg_schema}.other ORDER BY key"
    written = query(pg_dsn, rows)

    for args in (("recover",), ("recover", "--dry-run"), ("inspect",), ("verify",)):
        result = run(driver, *args, str(killed), env={"WBCACHE_BACKEND": other})
        assert_one_line_error(result, 2, f"{killed} flushes into table {pg_schema}.cache",
                              f"not {pg_schema}.other", f"table={pg_schema}.cache")
        assert_no_secret(result.stdout, result.stderr)
    with pytest.raises(wbcache.InvalidDirectoryError, match=f"not {pg_schema}.other"):
        wbcache.open(killed, backend=other)

    assert tree_state(killed) == before and query(pg_dsn, rows) == written
    with wbcache.open(killed, backend=url) as cache:  # its own table: everything is there
        assert dict(cache.items()) == AFTER_RECOVERY


def test_the_table_is_recorded_as_the_server_resolves_it_and_moves_only_with_an_empty_log(
        tmp_path: Path, pg_dsn: str, pg_schema: str) -> None:
    """An unqualified table= is the table PostgreSQL's search_path finds: recorded as typed,
    one in another schema passed for it (and the same table, qualified, was refused)."""
    other_schema = f"{pg_schema}_b"
    query(pg_dsn, f'CREATE SCHEMA "{other_schema}"')
    try:
        def found_in(schema: str) -> str:  # table=cache, found through search_path
            return f"{pg_url(pg_dsn, 'cache')}&options=-csearch_path%3D{schema}"

        path = tmp_path / "a"
        with wbcache.open(path, backend=found_in(pg_schema)) as cache:
            cache.put("k", 1)
        assert (path / "backend").read_text() == f"postgresql\ntable={pg_schema}.cache\n"
        with wbcache.open(path, backend=pg_url(pg_dsn, f"{pg_schema}.cache")) as cache:
            assert cache.get("k") == 1  # the same table, named with its schema

        with pytest.raises(wbcache.InvalidDirectoryError,
                           match=f"flushes into table {pg_schema}.cache of its"):
            wbcache.open(path, backend=pg_url(pg_dsn, f"{other_schema}.cache"))
        with pytest.raises(wbcache.SchemaMismatchError, match="there is no table cache"):
            wbcache.open(path, backend=found_in(other_schema))  # made for nobody
        assert query(pg_dsn, "SELECT to_regclass(%s)", (f"{other_schema}.cache",)) == [(None,)]
        wbcache.open(tmp_path / "b", backend=pg_url(pg_dsn, f"{other_schema}.cache")).close()
        with pytest.raises(wbcache.InvalidDirectoryError,  # another directory's, resolved
                           match=f"flushes into table {pg_schema}.cache of its"):
            wbcache.open(path, backend=found_in(other_schema))

        # The way to move it: recover into its table (which empties the log), then open.
        assert run("runner", "recover", str(path),
                   env={"WBCACHE_BACKEND": pg_url(pg_dsn, f"{pg_schema}.cache")}).exit_code == 0
        with wbcache.open(path, backend=found_in(other_schema)) as cache:
            cache.put("moved", 2)
        assert (path / "backend").read_text() == f"postgresql\ntable={other_schema}.cache\n"
    finally:
        query(pg_dsn, f'DROP SCHEMA "{other_schema}" CASCADE')


def test_every_statement_names_the_schema_the_table_was_found_in(
        tmp_path: Path, pg_dsn: str, pg_schema: str) -> None:
    """table=cache found in the second schema of search_path; then a table of that name
    appears in the first: the flushes went there (resolved per statement), while
    DIR/backend named the second."""
    first = f"{pg_schema}_a"
    query(pg_dsn, f'CREATE SCHEMA "{first}"')
    wbcache.open(tmp_path / "maker", backend=pg_url(pg_dsn, f"{pg_schema}.cache")).close()
    try:
        url = f"{pg_url(pg_dsn, 'cache')}&options=-csearch_path%3D{first},{pg_schema}"
        with wbcache.open(tmp_path / "c", backend=url, flush_interval=3600) as cache:
            cache.put("k1", 1)
            cache.flush()
            for name in ("cache", "cache_checkpoints"):
                query(pg_dsn, f'CREATE TABLE "{first}".{name} '
                              f'(LIKE "{pg_schema}".{name} INCLUDING ALL)')
            cache.put("k2", 2)
            cache.flush()
        assert (tmp_path / "c" / "backend").read_text() == \
            f"postgresql\ntable={pg_schema}.cache\n"
        assert query(pg_dsn, f'SELECT count(*) FROM "{pg_schema}".cache') == [(2,)]
        assert query(pg_dsn, f'SELECT count(*) FROM "{first}".cache') == [(0,)]
    finally:
        query(pg_dsn, f'DROP SCHEMA "{first}" CASCADE')


def test_a_kind_of_database_with_a_space_in_its_name_reads_back_whole(tmp_path: Path) -> None:
    from wbcache.layout import Layout, record_backend

    (tmp_path / "a").mkdir(mode=0o700)
    layout = Layout(str(tmp_path / "a"))
    record_backend(layout, "my kind")
    assert layout.recorded_backend() == ("my kind", None)
    record_backend(layout, "my kind", "app.cache")
    assert layout.recorded_backend() == ("my kind", "app.cache")


def test_a_directory_recorded_without_its_table_gets_it_at_its_next_open(
        killed: Path, url: str, pg_schema: str) -> None:
    (killed / "backend").write_text("postgresql\n")  # as wbcache before tables were recorded
    with wbcache.open(killed, backend=url) as cache:
        assert dict(cache.items()) == AFTER_RECOVERY
    assert (killed / "backend").read_text() == f"postgresql\ntable={pg_schema}.cache\n"


@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("bad", [
    f"mysql://user:{SECRET}@127.0.0.1/db",
    f"postgresql://user:{SECRET}@127.0.0.1/db?timeout=soon",
])
def test_a_bad_url_is_a_usage_error_in_one_line_without_the_password(
        killed: Path, bad: str, driver: str) -> None:
    before = tree_state(killed)

    result = run(driver, "recover", "--backend", bad, str(killed))
    as_json = run(driver, "inspect", "--json", "--backend", bad, str(killed))

    assert_one_line_error(result, 2, "--backend / WBCACHE_BACKEND: ")
    assert as_json.exit_code == 2 and as_json.json()["error"] == "bad_backend_url"
    assert_no_secret(result.stderr, as_json.stdout, as_json.stderr)
    assert tree_state(killed) == before


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_database_out_of_reach_is_one_line_without_the_password(killed: Path,
                                                                  driver: str) -> None:
    away = f"postgresql://user:{SECRET}@127.0.0.1:1/db?connect_timeout=2"
    before = tree_state(killed)

    result = run(driver, "recover", "--backend", away, str(killed))

    assert_one_line_error(result, 1, "cannot connect")
    assert_no_secret(result.stderr)
    assert tree_state(killed) == before


@pytest.mark.parametrize("driver", DRIVERS)
def test_a_url_is_refused_for_a_directory_of_its_own_lmdb(tmp_path: Path, url: str,
                                                         driver: str) -> None:
    path = tmp_path / "lmdb"
    wbcache.open(path).close()
    before = tree_state(path)

    result = run(driver, "dump", str(path), env={"WBCACHE_BACKEND": url})

    assert_one_line_error(result, 2, "flushes into its own LMDB database", "WBCACHE_BACKEND")
    assert_no_secret(result.stderr)
    assert tree_state(path) == before
