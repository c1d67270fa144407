"""A flush's LMDB puts in C (wbcache/backends/_pairs.c) against the Python loop it replaces.

`split(puts)` sorts (key, value) pairs by key type for LMDB's two databases, str keys encoded
as UTF-8, each side in the order given. Both versions must give the same lists for the same
pairs, and refuse what cannot be stored (a str that is not valid Unicode) the same way. Every
other test of the suite flushes through the C one when it is built.
"""

from __future__ import annotations

import gc

import pytest
from built_support import assert_built_from
from hypothesis import given, settings
from hypothesis import strategies as st

from wbcache.backends import lmdb as lmdb_module

FAST = lmdb_module._split if lmdb_module._split is not lmdb_module._split_in_python else None
SLOW = lmdb_module._split_in_python
needs_fast = pytest.mark.skipif(FAST is None, reason="covered by test_the_pairs_module_is_built")


def test_the_pairs_module_is_built() -> None:
    assert FAST is not None, (
        "wbcache.backends._pairs is not built: `pip install -e .` compiles "
        "wbcache/backends/_pairs.c when a C compiler and the Python headers are installed; "
        "without it a flush builds LMDB's puts in Python, about 1.7x slower")
    assert_built_from("wbcache.backends._pairs", "wbcache/backends/_pairs.c")


keys = st.one_of(st.text(min_size=1, max_size=20), st.binary(min_size=1, max_size=20))


@needs_fast
@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(keys, st.binary(max_size=30)), max_size=40))
def test_both_give_the_same_pairs_in_the_same_order(puts: list[tuple[str | bytes, bytes]]
                                                   ) -> None:
    assert FAST is not None
    fast = FAST(puts)
    assert fast == SLOW(puts)
    str_puts, bytes_puts = fast
    assert str_puts == [(key.encode(), value) for key, value in puts if isinstance(key, str)]
    assert bytes_puts == [(key, value) for key, value in puts if isinstance(key, bytes)]


@needs_fast
def test_a_dict_view_of_a_flush_and_non_ascii_keys() -> None:
    assert FAST is not None
    changes = {"a": b"1", b"a": b"2", "é€😀": b"3", b"\xff": b"4", "z" * 500: b""}
    assert FAST(changes.items()) == SLOW(changes.items()) == (
        [(b"a", b"1"), ("é€😀".encode(), b"3"), (b"z" * 500, b"")],
        [(b"a", b"2"), (b"\xff", b"4")])
    assert FAST([]) == ([], [])


@needs_fast
def test_a_key_that_is_not_valid_unicode_is_refused_by_both() -> None:
    assert FAST is not None
    bad = [("ok", b"1"), ("\ud800", b"2")]
    for split in (FAST, SLOW):
        with pytest.raises(UnicodeEncodeError):
            split(bad)


@needs_fast
def test_a_put_that_is_not_a_pair_is_refused() -> None:
    assert FAST is not None
    for bad in ([("k", b"v", b"extra")], [("k",)], [None], [b"kv"]):
        with pytest.raises(TypeError):
            FAST(bad)


@needs_fast
def test_pairs_of_bytes_are_left_out_of_the_garbage_collector() -> None:
    """100,000 pairs per flush: each tracked pair is scanned by every young collection while
    the flush runs. Two bytes cannot form a cycle, so the C leaves them untracked."""
    assert FAST is not None
    str_puts, bytes_puts = FAST([("k", b"v"), (b"k", b"v")])
    assert not gc.is_tracked(str_puts[0]) and not gc.is_tracked(bytes_puts[0])
    value = ["not bytes"]  # what the C keeps tracked: anything else
    assert gc.is_tracked(FAST([("k", value)])[0][0])  # type: ignore[list-item]
