"""A flush's LMDB puts in C (wbcache/backends/_pairs.c) against the Python iterator it
replaces.

`pairs(puts, str_keys)` gives py-lmdb's putmulti the pairs of one of LMDB's two databases,
lazily: (key encoded as UTF-8, value) for the str keys, or (key, value) for the bytes keys,
each in the order given, counting in `other` the keys of the other kind it passed over. Both
versions must give the same pairs and counts for the same puts, and refuse what cannot be
stored (a str that is not valid Unicode) the same way. Every other test of the suite flushes
through the C one when it is built.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest
from built_support import assert_fast_path
from hypothesis import given, settings
from hypothesis import strategies as st

from wbcache.backends import lmdb as lmdb_module
from wbcache.backends.lmdb import LmdbDatabase

SLOW = lmdb_module._PairsInPython
FAST = lmdb_module._pairs if lmdb_module._pairs is not SLOW else None
needs_fast = pytest.mark.skipif(FAST is None, reason="covered by test_the_pairs_module_is_built")
Puts = list[tuple[str | bytes, bytes]]


def test_the_pairs_module_is_built() -> None:
    assert_fast_path(FAST, "wbcache.backends._pairs", "wbcache/backends/_pairs.c",
                     "a flush builds LMDB's puts in Python")


def both_sides(make: type | object, puts: object) -> tuple[list, int, list, int]:
    """(str pairs, bytes keys passed over, bytes pairs, str keys passed over)."""
    str_pairs = make(puts, True)  # type: ignore[operator]
    str_list = list(str_pairs)
    bytes_pairs = make(puts, False)  # type: ignore[operator]
    bytes_list = list(bytes_pairs)
    return str_list, str_pairs.other, bytes_list, bytes_pairs.other


keys = st.one_of(st.text(min_size=1, max_size=20), st.binary(min_size=1, max_size=20))


@needs_fast
@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(keys, st.binary(max_size=30)), max_size=40))
def test_both_give_the_same_pairs_in_the_same_order(puts: Puts) -> None:
    fast = both_sides(FAST, puts)
    assert fast == both_sides(SLOW, puts)
    assert fast == (
        [(key.encode(), value) for key, value in puts if isinstance(key, str)],
        sum(isinstance(key, bytes) for key, _ in puts),
        [(key, value) for key, value in puts if isinstance(key, bytes)],
        sum(isinstance(key, str) for key, _ in puts))


@needs_fast
def test_a_dict_view_of_a_flush_and_non_ascii_keys() -> None:
    changes = {"a": b"1", b"a": b"2", "é€😀": b"3", b"\xff": b"4", "z" * 500: b""}
    assert both_sides(FAST, changes.items()) == both_sides(SLOW, changes.items()) == (
        [(b"a", b"1"), ("é€😀".encode(), b"3"), (b"z" * 500, b"")], 2,
        [(b"a", b"2"), (b"\xff", b"4")], 3)
    assert both_sides(FAST, []) == ([], 0, [], 0)


@needs_fast
def test_pairs_are_built_one_at_a_time_as_putmulti_takes_them() -> None:
    """Lazily: a flush of 100,000 entries does not hold 100,000 pairs at once."""
    taken: list[str | bytes] = []

    def puts() -> Iterator[tuple[str | bytes, bytes]]:
        for key in ("a", b"b", b"c", "d"):
            taken.append(key)
            yield key, b"v"
    for make in (FAST, SLOW):
        taken.clear()
        pairs = make(puts(), True)  # type: ignore[operator]
        assert taken == []
        assert next(pairs) == (b"a", b"v") and taken == ["a"]
        assert next(pairs) == (b"d", b"v") and taken == ["a", b"b", b"c", "d"]
        assert pairs.other == 2


@needs_fast
def test_a_key_that_is_not_valid_unicode_is_refused_by_both() -> None:
    bad = [("ok", b"1"), ("\ud800", b"2")]
    for make in (FAST, SLOW):
        with pytest.raises(UnicodeEncodeError):
            list(make(bad, True))  # type: ignore[operator]


@needs_fast
def test_a_put_that_is_not_a_pair_is_refused() -> None:
    assert FAST is not None
    for bad in ([("k", b"v", b"extra")], [("k",)], [None], [b"kv"]):
        for str_keys in (True, False):
            with pytest.raises(TypeError):
                list(FAST(bad, str_keys))
    with pytest.raises(TypeError):
        FAST([])  # both arguments are needed


@needs_fast
def test_a_bad_put_stops_the_walk_where_it_is() -> None:
    """Its error is raised at once, with the puts after it not taken: not carried along while
    the walk goes on (and LMDB is handed more pairs) with an exception set."""
    taken: list[object] = []

    def puts(bad: object) -> Iterator[object]:
        for put in (("a", b"1"), bad, ("b", b"3"), ("c", b"4")):
            taken.append(put)
            yield put
    for make, bad in ((FAST, ("k",)), (FAST, ("\ud800", b"2")), (SLOW, ("\ud800", b"2"))):
        taken.clear()
        pairs = make(puts(bad), True)  # type: ignore[operator]
        assert next(pairs) == (b"a", b"1")
        with pytest.raises((TypeError, UnicodeEncodeError)):
            next(pairs)
        assert len(taken) == 2, (make, bad)


@needs_fast
def test_an_error_of_the_puts_themselves_reaches_putmulti() -> None:
    def failing() -> Iterator[tuple[str, bytes]]:
        yield "k", b"v"
        raise OSError("the puts failed")
    for make in (FAST, SLOW):
        pairs = make(failing(), True)  # type: ignore[operator]
        assert next(pairs) == (b"k", b"v")
        with pytest.raises(OSError, match="the puts failed"):
            next(pairs)


@needs_fast
def test_pairs_of_bytes_are_left_out_of_the_garbage_collector() -> None:
    """100,000 pairs per flush: each tracked pair is scanned by every young collection while
    the flush runs. Two bytes cannot form a cycle, so the C leaves them untracked."""
    assert FAST is not None
    assert not gc.is_tracked(next(FAST([("k", b"v")], True)))
    assert not gc.is_tracked(next(FAST([(b"k", b"v")], False)))
    value = ["not bytes"]  # what the C keeps tracked: anything else
    assert gc.is_tracked(next(FAST([("k", value)], True)))


def test_a_one_shot_iterator_of_mixed_keys_survives_a_map_full_retry(tmp_path: Path) -> None:
    """The puts are walked once per key type, and again from the start when the map is full
    and grows: a generator given as the puts is taken into a list first, or the bytes keys
    (and, after a retry, every key) would be lost while the checkpoint commits."""
    database = LmdbDatabase(str(tmp_path / "db"), map_size=64 * 1024)
    try:
        puts = ((f"k{i}" if i % 2 else f"k{i}".encode(), b"v" * 1000) for i in range(400))
        database.write(puts, [], [], b"checkpoint", 7)  # about 400 KiB into a 64 KiB map
        assert database.resizes >= 1
        assert database.count() == 400
        assert database.get("k399") == database.get(b"k398") == b"v" * 1000
        assert database.checkpoint(b"checkpoint") == 7
    finally:
        database.close()
