"""The torture harness over PostgreSQL (`wbcache torture --backend`): nodes SIGKILLed while they
count into shared counters, every counter exact afterwards; the ledger that judges it catching
what it must; and the harness's wrapper backends forwarding what a shared database needs."""

from __future__ import annotations

import os
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from pg_support import pg_dsn_fixture, pg_schema_fixture, query, stored_ints  # noqa: F401
from psycopg.conninfo import conninfo_to_dict

import wbcache
from wbcache.backends.base import CheckpointTokens
from wbcache.backends.postgres import PostgresBackend
from wbcache.cli import main
from wbcache.fault_injection.backends import ControlledBackend, JournaledBackend
from wbcache.fault_injection.counters import counter_of, marker_key, value_key, value_of
from wbcache.fault_injection.journal import Journal
from wbcache.fault_injection.ledger import ThreadLedger, check_final
from wbcache.fault_injection.nodes import TRIGGERS
from wbcache.fault_injection.oracle import Tally
from wbcache.fault_injection.shared_table import SharedTable
from wbcache.fault_injection.torture import run_torture

SEED = int(os.environ.get("WBCACHE_TORTURE_SEED", "4"))


# ------------------------------------------------------------------ the campaign, for real

def test_killed_nodes_sharing_postgresql_count_every_increment_exactly_and_drop_their_table(
        tmp_path: Path, pg_dsn: str) -> None:
    report = run_torture(str(tmp_path), modes=("kill",), cycles=12, seed=SEED, threads=8,
                         backend=pg_dsn)
    [outcome] = report.outcomes
    tally = outcome.tally
    assert report.ok, "\n".join(tally.messages)
    assert tally.cycles == 12  # three kills of each of the four nodes
    assert tally.recovered == tally.acknowledged > 1_000
    assert tally.counters == 100 and tally.counter_mismatches == 0
    assert outcome.rows["nodes x writer threads"] == "4 x 8"
    used = dict(part.split() for part in outcome.rows["kill triggers"].split(", "))
    assert set(used) == set(TRIGGERS) and all(int(count) > 0 for count in used.values())
    replaying, restarts = outcome.rows["  restarts that replayed unflushed writes"].split(" of ")
    assert int(replaying) >= 1  # a kill landed before a flush: recovery had work to do
    table = outcome.rows["shared table (dropped)"]
    assert table.startswith("wbtorture_")
    assert query(pg_dsn, "SELECT tablename FROM pg_tables WHERE tablename LIKE %s",
                 (f"{table}%",)) == []


def test_torture_backend_prints_the_counter_figures_and_passes(tmp_path: Path,
                                                               pg_dsn: str) -> None:
    result = CliRunner().invoke(main, ["torture", str(tmp_path / "work"), "--backend", pg_dsn,
                                       "--cycles", "4", "--seed", "9", "--threads", "2",
                                       "--quiet"])
    assert result.exit_code == 0, result.output
    for row in ("cycles (crashes or cases)", "operations", "acknowledged", "recovered",
                "lost (must be 0)", "counters checked", "counter mismatches (must be 0)"):
        assert row in result.output
    assert "holes (must be 0)" not in result.output  # not what this campaign checks
    assert "verdict: PASS" in result.output
    seed_row = next(line for line in result.output.splitlines() if line.strip().startswith("seed"))
    assert seed_row.split()[-1] == "9"


@pytest.mark.parametrize("mode", ["powerloss", "shared"])
def test_torture_backend_refuses_a_mode_that_cannot_run_there(mode: str) -> None:
    result = CliRunner().invoke(main, ["torture", "--backend", "postgresql://u@h/db",
                                       "--mode", mode])
    assert result.exit_code == 2
    assert (f"--mode {mode} does not run with --backend: only kill and lazyfs do"
            in result.output)


@pytest.mark.parametrize(("url", "message"), [
    ("mysql://u@h/db", "give a postgresql:// URL"),
    ("postgresql://u@h/db?table=mine", "leave table out of the URL"),
])
def test_torture_backend_refuses_a_url_it_cannot_use(url: str, message: str) -> None:
    result = CliRunner().invoke(main, ["torture", "--backend", url])
    assert result.exit_code == 2 and message in result.output


def test_the_campaign_names_its_table_in_the_url_as_written() -> None:
    # The URL was taken apart and joined again by urllib: a URL with no host
    # ("postgresql:///db?host=/run/pg") lost its "//" and was no longer one libpq reads.
    table = SharedTable("postgresql:///db?host=/run/pg&application_name=a%2Bb+c")
    dsn, ours = PostgresBackend.split_url(table.url)
    assert ours == {"table": table.name}
    for given in (dsn, table._libpq):
        params = conninfo_to_dict(given)
        assert (params["host"], params["dbname"], params["application_name"]) == (
            "/run/pg", "db", "a+b+c")


def test_torture_backend_reports_an_unreachable_server_without_a_password_or_traceback(
        tmp_path: Path) -> None:
    url = "postgresql://u:secret@127.0.0.1:1/db?connect_timeout=2"
    result = CliRunner().invoke(main, ["torture", str(tmp_path / "w"), "--backend", url,
                                       "--cycles", "1"])
    assert result.exit_code == 1
    assert "could not run" in result.output and "secret" not in result.output
    assert "Traceback" not in result.output


# ------------------------------------------------------------------ the ledger catches

def _ledger_after(writes_acked: int, in_flight: bool = False) -> tuple[ThreadLedger, Tally]:
    """Thread 0 of node 0: started on a fresh table, `writes_acked` acknowledged (and one
    more started, if `in_flight`)."""
    ledger, tally = ThreadLedger(0, 0), Tally()
    ledger.found(0, tally, "start")
    for n in range(1, writes_acked + 1):
        ledger.start(n)
        ledger.ack(n)
    if in_flight:
        ledger.start(writes_acked + 1)
    return ledger, tally


def _state_for(marker: int) -> dict[Any, Any]:
    """The table once thread 0 of node 0 applied its writes 1..marker and nothing else."""
    state: dict[Any, Any] = {marker_key(0, 0): marker} if marker else {}
    for n in range(1, marker + 1):
        counter = counter_of(0, 0, n)
        state[counter] = state.get(counter, 0) + 1
        if n % 4 == 0:
            state[value_key(0, 0, n)] = value_of(n)
    return state


def test_the_ledger_passes_a_restart_that_kept_the_write_in_flight() -> None:
    ledger, tally = _ledger_after(10, in_flight=True)
    ledger.found(11, tally, "restart")
    assert tally.violations == 0
    assert (tally.acknowledged, tally.recovered, tally.inflight_kept) == (10, 10, 1)


def test_the_ledger_counts_an_acknowledged_write_missing_after_a_restart_as_lost() -> None:
    ledger, tally = _ledger_after(10)
    ledger.found(8, tally, "restart")
    assert (tally.lost, tally.recovered) == (2, 8)


def test_the_ledger_flags_a_marker_nobody_wrote_and_one_that_went_back() -> None:
    ledger, tally = _ledger_after(10)
    ledger.found(12, tally, "restart")
    assert tally.phantom == 1
    ledger.found(5, tally, "restart again")
    assert tally.carried == 1


def test_the_final_check_passes_exact_counters_and_values() -> None:
    ledger, _ = _ledger_after(37, in_flight=True)
    tally = check_final(_state_for(37), [ledger], "final")
    assert tally.violations == 0, tally.messages
    assert (tally.counters, tally.recovered) == (100, 37)


def test_the_final_check_catches_an_increment_applied_twice() -> None:
    ledger, _ = _ledger_after(37)
    state = _state_for(37)
    state[counter_of(0, 0, 5)] += 1
    tally = check_final(state, [ledger], "final")
    assert tally.counter_mismatches == 1 and tally.lost == 0


def test_the_final_check_catches_half_a_batch() -> None:
    ledger, _ = _ledger_after(37)
    state = _state_for(37)
    del state[value_key(0, 0, 36)]  # the batch's marker and increment landed, its put not
    tally = check_final(state, [ledger], "final")
    assert tally.partial == 1


def test_the_final_check_catches_a_key_nobody_wrote() -> None:
    ledger, _ = _ledger_after(3)
    tally = check_final({**_state_for(3), "stray": 1}, [ledger], "final")
    assert tally.phantom == 1


# ------------------------------------------------------------------ the wrappers forward

class _SharedStub:
    """A backend shared by many caches, as far as the wrappers can tell."""

    kind = "shared-stub"
    applies_increments = True
    default_read_ttl = 0.25
    max_key_size = 100

    def __init__(self) -> None:
        self.attached: list[str] = []
        self.applied: list[tuple[Any, ...]] = []

    def attach(self, cache_id: str, tokens: CheckpointTokens | None = None) -> None:
        self.attached.append(cache_id)

    def apply(self, puts: Collection[tuple[Any, bytes]], deletes: Sequence[Any],
              checkpoint: int, increments: Sequence[tuple[Any, int]] = ()) -> None:
        self.applied.append((list(puts), list(deletes), checkpoint, list(increments)))

    def checkpoint(self) -> int:
        return 0


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    fd = os.open(tmp_path / "journal", os.O_WRONLY | os.O_CREAT, 0o600)
    yield Journal(fd)
    os.close(fd)


def _wrappers(inner: Any, journal: Journal) -> list[Any]:
    return [JournaledBackend(inner, journal, with_data=True), ControlledBackend(inner)]


def test_wrappers_forward_attach_increments_read_ttl_and_kind_to_the_backend(
        journal: Journal) -> None:
    inner = _SharedStub()
    for wrapper in _wrappers(inner, journal):
        assert wrapper.applies_increments is True and wrapper.default_read_ttl == 0.25
        assert wrapper.kind == "shared-stub"
        wrapper.attach("node-a")
        wrapper.apply([("k", b"\x01")], [], 7, [("n", 3)])
    assert inner.attached == ["node-a", "node-a"]
    assert inner.applied == [([("k", b"\x01")], [], 7, [("n", 3)])] * 2


def test_wrappers_of_lmdb_add_nothing_it_lacks(tmp_path: Path, journal: Journal) -> None:
    inner = wbcache.LmdbBackend(str(tmp_path / "db"))
    try:
        for wrapper in _wrappers(inner, journal):
            assert wrapper.applies_increments is False and wrapper.default_read_ttl is None
            assert wrapper.kind == getattr(inner, "kind", None)
            wrapper.attach("ignored")  # LMDB has one directory, no id to learn
    finally:
        inner.close()


def test_a_wrapped_postgres_backend_gets_its_cache_id_and_adds_increments(
        tmp_path: Path, pg_dsn: str, pg_schema: str) -> None:
    table = f"{pg_schema}.wbcache"
    for name in ("a", "b"):
        inner = wbcache.PostgresBackend(pg_dsn, table=table)
        wrapped = ControlledBackend(inner)
        try:
            with wbcache.open(tmp_path / name, backend=wrapped) as cache:
                cache.incr("hits", 5)
                cache.flush()
                assert inner.cache_id == cache.cache_id
        finally:
            inner.close()
    assert stored_ints(pg_dsn, table, "hits") == {"hits": 10}  # deltas added, not overwritten
