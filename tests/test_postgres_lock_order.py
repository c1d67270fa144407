"""Flushes from several caches into one table lock every row they touch in ONE global order
(by key: deletes, puts and increments alike), so flushes that meet queue instead of
deadlocking -- and stay correct: increments from every cache add up, and a delete and a put
of one key by two caches end as one of them, never as a left-over tombstone."""

from __future__ import annotations

import functools
import random
import threading
from collections.abc import Callable

import psycopg
import pytest
from pg_support import (  # noqa: F401 (fixtures)
    MakeBackend,
    make_backend_fixture,
    pack,
    pg_dsn_fixture,
    pg_schema_fixture,
    query,
    stored_ints,
    value_of,
)

from wbcache.backends.postgres import PostgresBackend, PostgresError

ROUNDS = 100
# Opposite-order flushes of 500 keys each: 25 rounds in the default run (keys locked out of
# order deadlocked within the first few rounds), all 100 with --soak.
DEADLOCK_ROUNDS = [25, pytest.param(ROUNDS, marks=pytest.mark.soak)]


def flush_together(calls: list[Callable[[], None]]) -> list[PostgresError]:
    """Run each call in a thread of its own, all released at once by a barrier; the errors."""
    barrier = threading.Barrier(len(calls))
    errors: list[PostgresError] = []
    lock = threading.Lock()

    def run(call: Callable[[], None]) -> None:
        barrier.wait()
        try:
            call()
        except PostgresError as exc:
            with lock:
                errors.append(exc)

    threads = [threading.Thread(target=run, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def tombstones(dsn: str, backend: PostgresBackend) -> int:
    """Rows holding the empty bytea a flush marks its deletes with (never left behind)."""
    return int(query(dsn, f"SELECT count(*) FROM {backend.table} WHERE value = ''::bytea")[0][0])


@pytest.mark.parametrize("rounds", DEADLOCK_ROUNDS)
def test_opposite_order_deletes_and_puts_from_two_caches_never_deadlock(
        make_backend: MakeBackend, pg_dsn: str, rounds: int) -> None:
    seed, first, second = make_backend("seed"), make_backend("node-a"), make_backend("node-b")
    keys = [f"k{i:04}" for i in range(1000)]
    low, high = keys[:500], keys[500:]
    errors: list[PostgresError] = []
    endings = set()
    for n in range(1, rounds + 1):
        seed.apply([(key, pack(0)) for key in keys], [], n)  # every row exists: deletes lock
        failed = flush_together([
            functools.partial(first.apply, [(key, pack(["a", n])) for key in high], low, n),
            functools.partial(second.apply, [(key, pack(["b", n])) for key in low], high, n)])
        errors += failed
        if not failed:  # both committed: the later one's writes, whole, are what is stored
            stored = dict(seed.items())
            first_last = {key: pack(["a", n]) for key in high}
            second_last = {key: pack(["b", n]) for key in low}
            assert stored in (first_last, second_last), n
            endings.add("a last" if stored == first_last else "b last")
    deadlocks = [exc for exc in errors
                 if isinstance(exc.__cause__, psycopg.errors.DeadlockDetected)]
    assert errors == [], (f"{len(errors)} of {2 * rounds} flushes failed, {len(deadlocks)} "
                          f"of them deadlocked; the first: {errors[0]}")
    assert tombstones(pg_dsn, seed) == 0
    print(f"\n{rounds} rounds, no flush failed; endings seen: {sorted(endings)}")


def test_increments_puts_and_deletes_from_four_caches_at_once_all_count(
        make_backend: MakeBackend, pg_dsn: str) -> None:
    nodes = [make_backend(f"node-{i}") for i in range(4)]
    counters = [f"c{i:02}" for i in range(30)]
    others = [f"p{i:02}" for i in range(30)]
    nodes[0].apply([(key, pack(100)) for key in counters[:10]], [], 1)  # some start at 100
    expected = {key: 100 if i < 10 else 0 for i, key in enumerate(counters)}
    touched = set(counters[:10])
    rng = random.Random(7)
    for n in range(2, 32):
        calls: list[Callable[[], None]] = []
        for i, node in enumerate(nodes):
            deltas = [(key, rng.randint(-5, 20)) for key in rng.sample(counters, 15)]
            for key, delta in deltas:
                expected[key] += delta
                touched.add(key)
            shuffled = rng.sample(others, len(others))
            puts = [(key, pack([i, n])) for key in shuffled[:10]]
            calls.append(functools.partial(node.apply, puts, shuffled[10:20], n, deltas))
        assert flush_together(calls) == []
    assert stored_ints(pg_dsn, nodes[0].table, "c") == {key: expected[key] for key in touched}
    assert tombstones(pg_dsn, nodes[0]) == 0


def test_a_delete_and_a_put_of_one_key_by_two_caches_end_as_one_of_them(
        make_backend: MakeBackend, pg_dsn: str) -> None:
    first, second = make_backend("node-a"), make_backend("node-b")
    # one after the other: the later flush decides
    first.apply([("k", pack("a1"))], [], 1)
    second.apply([], ["k"], 1)
    assert first.get("k") is None
    first.apply([("k", pack("a2"))], [], 2)
    assert value_of(second, "k") == "a2"
    second.apply([], [], 2, [("k", 5)])  # a delta on a non-int counts from 0
    first.apply([], ["k"], 3)
    second.apply([], [], 3, [("k", 2)])  # ... and on a deleted key
    assert value_of(first, "k") == 2
    # at the same moment, both ways round: the key ends as the put or deleted, nothing else
    for n in range(4, 4 + ROUNDS // 2):
        deleter, putter = (first, second) if n % 2 else (second, first)
        assert flush_together([functools.partial(deleter.apply, [], ["k"], n),
                               functools.partial(putter.apply, [("k", pack(n))], [], n)]) == []
        assert first.get("k") in (None, pack(n))
    assert tombstones(pg_dsn, first) == 0
