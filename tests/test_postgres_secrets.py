"""A password in a DSN or URL is never printed: not in an exception (message or chained
cause, as a traceback shows them), a repr, or the output of `wbcache torture --backend`."""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
from cli_support import DRIVERS, run
from pg_support import pg_dsn_fixture, pg_schema_fixture  # noqa: F401 (fixtures)
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from wbcache.backends.postgres import PostgresBackend, PostgresError

SECRET = "Zq7xK9w"  # appears nowhere else, so any fragment of it in a message is a leak
SPACED = "Zq7x K9w"  # a password libpq cannot parse unquoted: its parts must not leak either
FRAGMENTS = ("Zq7x", "K9w")


def shown(exc: BaseException) -> str:
    """All that a traceback of `exc` would print: every message in its chain, and its repr;
    and every exception chained to it, a `__context__` that `from None` hides from the
    traceback included (it is kept, for whatever walks it: an error reporter, a debugger).
    libpq's complaint about a DSN it cannot parse, password and all, was kept so."""
    seen: list[BaseException] = []
    pending: list[BaseException | None] = [exc]
    while pending:
        link = pending.pop()
        if link is not None and all(link is not other for other in seen):
            seen.append(link)
            pending += [link.__cause__, link.__context__]
    return "".join(traceback.format_exception(exc)) + "".join(map(repr, seen))


def assert_hidden(text: str) -> None:
    for fragment in FRAGMENTS:
        assert fragment not in text, text


@pytest.mark.parametrize(("url", "message"), [
    (f"//user:{SECRET}@127.0.0.1/db", "not a PostgreSQL URL"),
    (f"mysql://user:{SECRET}@127.0.0.1/db", "not a PostgreSQL URL"),
    (f"postgresql://user:{SECRET}@127.0.0.1:1/db?timeout=soon", "is not a float"),
    (f"postgresql://user:{SECRET}@127.0.0.1:1/db?bogus=1", "invalid PostgreSQL DSN"),
    ("postgresql://user:Zq7x%ZZK9w@127.0.0.1:1/db", "invalid PostgreSQL DSN"),
    (f"postgresql://user:{SPACED}@127.0.0.1:1/db", "invalid PostgreSQL DSN"),
    (f"postgresql://user@127.0.0.1:1/db?password={SECRET}&connect_timeout=x",
     "connect_timeout"),
    (f"postgresql://user:{SECRET}@127.0.0.1:notaport/db", "port"),
    # a raw '?' cuts the password short: libpq quoted its second half (its '@' encoded)
    ("postgresql://user:Zq7x?K9w@127.0.0.1:1/db", "an '@' after its host"),
    ("postgresql://user:Zq7x?K9w@127.0.0.1:1/db?table=t", "an '@' after its host"),
    # ... or read as a parameter, the database or the port, and printed as such
    ("postgresql://user:Zq7x?timeout=K9w@127.0.0.1:1/db?table=t", "an '@' after its host"),
    ("postgresql://user:Zq7x/K9w@127.0.0.1:1/db", "an '@' after its host"),
    ("postgresql://user:Zq7x?sslmode=prefer@127.0.0.1:1/db", "an '@' after its host"),
    ("postgresql://user:ab@Zq7x/K9w@127.0.0.1:1/db", "an '@' after its host"),
    # a raw '@': libpq ends the user info at the first, and printed the rest as the host
    ("postgresql://user:Zq7x@K9w@127.0.0.1:1/db", "more than one before it"),
    ("postgresql://Zq7x@K9w@127.0.0.1:1/db?table=t", "more than one before it"),
    # a password parameter with an encoded name: libpq quoted its bad value whole
    (f"postgresql://user@127.0.0.1:1/db?p%61ssword={SECRET}%zz", "invalid PostgreSQL DSN"),
    (f"postgresql://user@127.0.0.1:1/db?sslp%61ssword={SECRET}%00&table=t",
     "invalid PostgreSQL DSN"),
])
def test_a_bad_backend_url_is_refused_without_its_password(url: str, message: str) -> None:
    with pytest.raises((ValueError, PostgresError), match=message) as refused:
        PostgresBackend.from_url(url, connect_timeout=2)
    assert_hidden(shown(refused.value))


@pytest.mark.parametrize("url", ["postgresql://user:Zq7x/K9w@127.0.0.1:1/db",
                                 "postgresql://user:Zq7x@K9w@127.0.0.1:1/db"])
def test_a_url_given_as_the_dsn_is_refused_as_from_url_refuses_it(url: str) -> None:
    # PostgresBackend(url) skipped from_url's check: "PostgreSQL at user:Zq7x database
    # K9w@127.0.0.1:1/db" (the password read as the port), "failed to resolve host 'K9w@..."
    with pytest.raises(ValueError, match="an '@' after its host") as refused:
        PostgresBackend(url, cache_id="x", connect_timeout=2)
    assert_hidden(shown(refused.value))


def test_libpq_reads_the_url_as_written() -> None:
    # '+' went to libpq as a space (parse_qsl's reading; libpq's is '+'), and the URL joined
    # by hand turned "postgresql:db" (no host) into "postgresql://db" (host "db").
    dsn, ours = PostgresBackend.split_url(
        "postgresql://u@h/db?application_name=a+b&password=x+y&table=t")
    assert ours == {"table": "t"}
    assert {key: value for key, value in conninfo_to_dict(dsn).items()
            if key in ("application_name", "password")} == {"application_name": "a+b",
                                                           "password": "x+y"}
    with pytest.raises(ValueError, match="not a PostgreSQL URL"):
        PostgresBackend.split_url("postgresql:db?connect_timeout=2")


@pytest.mark.parametrize(("url", "libpq_reads"), [
    # urllib's reading, rebuilt: the '#' was taken for an empty fragment and dropped
    ("postgresql://u@h/db#", {"dbname": "db#"}),
    ("postgresql://u@h/db?application_name=a#b&table=t", {"application_name": "a#b"}),
    # urlsplit refuses a list of IPv6 hosts (Python >= 3.11.11); libpq takes it
    ("postgresql://[::1]:5432,[::2]:5433/db?table=t", {"host": "::1,::2", "port": "5432,5433"}),
])
def test_the_url_left_for_libpq_is_the_url_as_written(url: str,
                                                     libpq_reads: dict[str, str]) -> None:
    dsn, _ = PostgresBackend.split_url(url)
    params = conninfo_to_dict(dsn)
    assert {key: params.get(key) for key in libpq_reads} == libpq_reads


@pytest.mark.parametrize(("url", "message"), [
    # accepted, and rebuilt into a URL libpq reads otherwise (or as U+FFFD)
    ("POSTGRESQL://h/db", "not a PostgreSQL URL"),
    ("postgresql://h/db?table=t&flag", 'missing key/value separator "=" in URI query parameter'),
    ("postgresql://h/db?table=t%zz", "URL parameter table: not a percent-encoded UTF-8"),
    ("postgresql://h/db?table=t%E9", "URL parameter table: not a percent-encoded UTF-8"),
    ("postgresql://h/db?table=t%00", "URL parameter table: not a percent-encoded UTF-8"),
    ("postgresql://h/d%E9b", "a percent-encoded value is not UTF-8"),  # a UnicodeDecodeError
])
def test_a_url_libpq_would_refuse_is_refused(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as refused:
        PostgresBackend.split_url(url)
    assert type(refused.value) is ValueError


def test_a_url_with_no_host_keeps_its_slashes(pg_dsn: str, pg_schema: str) -> None:
    # urlunsplit dropped the "//": "postgresql:/test?host=..." is no URL libpq reads, so
    # libpq's own form for a socket or a host given as a parameter was refused.
    params = conninfo_to_dict(pg_dsn)
    url = (f"postgresql:///{params['dbname']}?host={params.get('host', '127.0.0.1')}"
           f"&port={params.get('port', 5432)}&user={params.get('user', 'postgres')}"
           f"&table={pg_schema}.hostless")
    backend = PostgresBackend.from_url(url, cache_id="x")
    try:
        assert backend.table == f"{pg_schema}.hostless"
    finally:
        backend.close()


def test_an_unknown_url_parameter_is_named_though_the_url_holds_a_password() -> None:
    # Its name was hidden with every other quoted text ("***"): no clue which one was wrong.
    with pytest.raises(ValueError, match='invalid URI query parameter: "bogus"') as refused:
        PostgresBackend.from_url(f"postgresql://user:{SECRET}@127.0.0.1:1/db?table=t&bogus=1")
    assert_hidden(shown(refused.value))


@pytest.mark.parametrize(("dsn", "message"), [
    (f"host=127.0.0.1 port=1 password={SPACED}", "invalid PostgreSQL DSN"),
    (f"host=127.0.0.1 port=1 password='{SECRET}", "invalid PostgreSQL DSN"),
    (f"host=127.0.0.1 port=x password={SECRET}", "port"),
    (f"host=127.0.0.1 port=x sslpassword={SECRET}", "port"),
])
def test_a_bad_key_value_dsn_is_refused_without_its_password(dsn: str, message: str) -> None:
    with pytest.raises((ValueError, PostgresError), match=message) as refused:
        PostgresBackend(dsn, cache_id="x", connect_timeout=2)
    assert_hidden(shown(refused.value))


@pytest.mark.parametrize("dsn", [
    f"postgresql://user:{SECRET}@127.0.0.1:1/db",
    f"host=127.0.0.1 port=1 user=user password={SECRET}",
    f"host=127.0.0.1 port=1 user=user password='{SPACED}'",
    f"dbname='host=127.0.0.1 port=1 password={SECRET}'",  # libpq expands a dbname like this
])
def test_a_refused_connection_is_reported_without_the_password(dsn: str) -> None:
    with pytest.raises(PostgresError, match="cannot connect") as refused:
        PostgresBackend(dsn, cache_id="x", connect_timeout=2)
    assert_hidden(shown(refused.value))


def test_a_connected_backend_shows_no_password_in_its_repr_or_errors(pg_dsn: str,
                                                                     pg_schema: str) -> None:
    """The test server trusts its clients, so it takes any password; libpq still holds it."""
    dsn = make_conninfo(**{**conninfo_to_dict(pg_dsn), "password": SECRET})
    backend = PostgresBackend(dsn, table=f"{pg_schema}.wbcache", cache_id="x")
    try:
        backend.apply([], [], 2)
        assert backend.checkpoint() == 2
        assert_hidden(repr(backend))
        with pytest.raises(PostgresError) as failed:
            backend.apply([], [], 1)  # a checkpoint that does not grow is refused
        assert_hidden(shown(failed.value))
    finally:
        backend.close()
    with pytest.raises(PostgresError, match="closed") as closed:
        backend.get("k")
    assert_hidden(shown(closed.value))


@pytest.mark.parametrize(("text", "expected"), [
    (f"postgresql://user:{SECRET}@host/db", "postgresql://user:***@host/db"),
    (f"postgres://user:{SECRET}@h1,h2:5433/db?sslmode=require",
     "postgres://user:***@h1,h2:5433/db?sslmode=require"),
    (f"postgresql://user@host/db?password={SECRET}&sslmode=require",
     "postgresql://user@host/db?password=***&sslmode=require"),
    (f"postgresql://user@host/db?password={SPACED}&table=t",  # was "password=*** K9w"
     "postgresql://user@host/db?password=***&table=t"),
    (f"host=h password={SECRET} user=u", "host=h password=*** user=u"),
    (f"host=h password = '{SPACED}' user=u", "host=h password = *** user=u"),
    (f"host=h sslpassword={SECRET}", "host=h sslpassword=***"),
    # libpq percent-decodes a query's names: p%61ssword is password
    (f"postgresql://user@host/db?p%61ssword={SECRET}&table=t",
     "postgresql://user@host/db?p%61ssword=***&table=t"),
    (f"postgresql://user@host/db?sslp%41SSWORD={SECRET}&a=b",
     "postgresql://user@host/db?sslp%41SSWORD=***&a=b"),
    # libpq ends a query value at '&' only: a '#' in a password is part of it
    (f"postgresql://user@host/db?password=ab#{SECRET}&table=t",
     "postgresql://user@host/db?password=***&table=t"),
    ("postgresql://user@host/db", "postgresql://user@host/db"),
    ("host=h user=u", "host=h user=u"),
])
def test_redact_hides_every_form_of_password(text: str, expected: str) -> None:
    from wbcache.backends.postgres import redact

    assert redact(text) == expected
    assert redact(f"could not use {text} at all") == f"could not use {expected} at all"


def test_redact_hides_a_known_secret_wherever_it_appears() -> None:
    from wbcache.backends.postgres import redact

    assert redact(f'database "{SECRET}" does not exist', secrets=[SECRET]) \
        == 'database "***" does not exist'


# ------------------------------------------------------------------ the torture CLI

@pytest.mark.parametrize("driver", DRIVERS)
@pytest.mark.parametrize("url", [
    f"postgresql://user:{SECRET}@127.0.0.1:1/db?connect_timeout=2",
    f"postgresql://user@127.0.0.1:1/db?password={SECRET}&connect_timeout=2",
    f"postgresql://user:{SPACED}@127.0.0.1:1/db",
    f"mysql://user:{SECRET}@127.0.0.1/db",
    f"//user:{SECRET}@127.0.0.1/db",
    f"postgresql://user:{SECRET}@127.0.0.1/db?table=mine",
    "postgresql://user:Zq7x@K9w@127.0.0.1:1/db",  # libpq ends the user info at the first '@'
])
def test_torture_backend_errors_never_show_the_password(driver: str, url: str,
                                                        tmp_path: Path) -> None:
    result = run(driver, "torture", str(tmp_path / "w"), "--backend", url, "--cycles", "1")
    assert result.exit_code in (1, 2), result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert_hidden(result.stdout + result.stderr)
