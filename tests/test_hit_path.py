"""The hit path in C (wbcache/_hit.c) against the closure it replaces (hit_path.py).

Every behaviour test runs twice, once on each (`hit` fixture: the C `Hit`, or `_Hit` set to
None so the cache builds the closure), and asserts the same expected results, so the two stay
one behaviour: values and fresh copies, tombstones, misses read from the database, the
arguments `dict.get` takes and the errors it gives, the hit count, the note for the CLOCK,
`read_ttl`. The C path also gets what only C can get wrong: reference counts, and an entry
dropped by another thread while a hit holds it.
"""

from __future__ import annotations

import inspect
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from built_support import assert_fast_path

import wbcache
from wbcache import hit_path as hit_path_module

FAST = hit_path_module._Hit


def test_the_hit_path_is_built() -> None:
    assert_fast_path(FAST, "wbcache._hit", "wbcache/_hit.c", "a hit runs the Python closure")


@pytest.fixture(params=["c", "python"])
def hit(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Which hit path caches opened in the test use."""
    if request.param == "c":
        if FAST is None:
            pytest.skip("covered by test_the_hit_path_is_built")
    else:
        monkeypatch.setattr(hit_path_module, "_Hit", None)
    return str(request.param)


@pytest.fixture
def cache(hit: str, tmp_path: Path) -> Iterator[wbcache.Cache]:
    with wbcache.open(tmp_path / "c") as opened:
        assert (type(opened.get).__name__ == "Hit") == (hit == "c")
        yield opened


def outcome(call: Callable[[], Any]) -> Any:
    """What a call returns, or the type and message of what it raises."""
    try:
        return ("returned", call())
    except Exception as error:  # noqa: BLE001 - the outcome is what is compared
        return ("raised", type(error).__name__, str(error))


def test_values_come_back_as_stored_and_containers_as_fresh_copies(
        cache: wbcache.Cache) -> None:
    cache.put("s", "text")
    cache.put(b"b", b"raw")
    cache.put("d", {"n": [1, 2]})
    cache.put("none", None)
    assert cache.get("s") == "text"
    assert cache.get(b"b") == b"raw"
    assert cache.get("b") is None  # str and bytes keys are two keys
    assert cache.get("none", "default") is None  # a stored None is a hit, not the default
    first = cache.get("d")
    assert first == {"n": [1, 2]}
    first["n"].append(3)
    assert cache.get("d") == {"n": [1, 2]}  # a fresh copy each time
    assert cache["s"] == "text" and "d" in cache and "x" not in cache


def test_a_deleted_key_gives_the_default_until_and_after_a_flush(cache: wbcache.Cache) -> None:
    cache.put("k", 1)
    cache.delete("k")
    marker = object()
    assert cache.get("k", marker) is marker
    assert cache.get("k") is None
    cache.flush()
    assert cache.get("k", marker) is marker


def test_a_miss_reads_the_database_and_a_key_never_stored_gives_the_default(
        hit: str, tmp_path: Path) -> None:
    with wbcache.open(tmp_path / "c") as cache:
        cache.put("old", [1, "x"])
    with wbcache.open(tmp_path / "c") as cache:  # memory starts empty: a miss
        assert cache.stats()["misses"] == 0
        assert cache.get("old") == [1, "x"]
        assert cache.get("never", 7) == 7
        assert cache.stats()["misses"] >= 1
        assert cache.get(5, "d") == "d"  # a key that cannot be stored is not there
        assert cache.get("", "d") == "d"


def test_arguments_and_errors_are_those_of_dict_get(cache: wbcache.Cache) -> None:
    cache.put("a", 1)
    assert cache.get(key="a") == 1
    assert cache.get("a", default=2) == 1
    assert cache.get(default=2, key="a") == 1
    assert cache.get(key="missing", default=2) == 2
    for bad in (lambda: cache.get(), lambda: cache.get("a", 1, 2),
                lambda: cache.get("a", other=1), lambda: cache.get("a", key="b")):
        result = outcome(bad)
        assert result[:2] == ("raised", "TypeError"), result
    result = outcome(lambda: cache.get(["unhashable"]))  # type: ignore[arg-type]
    assert result[:2] == ("raised", "TypeError"), result


def test_a_key_equal_to_a_held_one_but_not_storable_is_answered_as_on_a_miss(
        cache: wbcache.Cache) -> None:
    """A memoryview hashes and compares as the bytes memory holds, but is no key: absent, as
    when memory does not hold the key (it was found only while held). A str subclass (a
    StrEnum) is a key, stored as its str: a hit."""
    class Name(str):
        pass

    cache.put(b"mv", 1)
    cache.put("name", 2)
    assert memoryview(b"mv") not in cache and cache.get(memoryview(b"mv"), "d") == "d"
    before = cache.stats()
    assert cache.get(Name("name")) == 2 and Name("name") in cache
    after = cache.stats()  # a hit, as for the str itself: no lock, no miss
    assert (after["hits"] - before["hits"], after["misses"] - before["misses"]) == (2, 0)


def test_a_str_subclass_that_overrides_eq_reads_the_key_it_stands_for(
        cache: wbcache.Cache) -> None:
    """A key is stored as the plain str a subclass stands for, but the hit path looked the
    subclass itself up in memory: a case-insensitive str found another key's entry there,
    so `get(CIStr("FOO"))` gave "foo"'s value while `pop` found nothing, and a read's answer
    changed with what memory held (an outside hunt of bad input)."""
    class CIStr(str):
        def __hash__(self) -> int:
            return hash(self.lower())

        def __eq__(self, other: object) -> bool:
            return isinstance(other, str) and self.lower() == other.lower()

    cache.put("foo", "lower")
    assert cache.get(CIStr("FOO"), "absent") == "absent" and CIStr("FOO") not in cache
    cache.put(CIStr("BAR"), "upper")  # stored as "BAR"
    cache.put("bar", "lower")
    assert cache.get(CIStr("BAR")) == "upper" and cache.get(CIStr("bar")) == "lower"
    assert cache.pop(CIStr("BAR")) == "upper" and cache.get(CIStr("BAR")) is None


def test_hits_are_counted_and_noted_for_the_clock(cache: wbcache.Cache) -> None:
    cache.put("a", "x")
    cache.put("d", {"k": 1})
    cache.delete("gone")
    before = cache.stats()["hits"]
    recent = cache._entries.recent
    recent.clear()
    for _ in range(5):
        cache.get("a")
        cache.get("d")
        cache.get("gone")  # a tombstone: noted, not a hit
    assert cache.stats()["hits"] - before == 10
    assert list(recent) == ["a", "d", "gone"] * 5
    assert cache.get.__doc__ == wbcache.Cache.get.__doc__
    parameters = inspect.signature(cache.get).parameters
    assert list(parameters) == ["key", "default"] and parameters["default"].default is None
    assert cache.get.__name__ == "get"


def test_read_ttl_reads_an_old_entry_again(hit: str, tmp_path: Path) -> None:
    with wbcache.open(tmp_path / "c", read_ttl=0.000001) as cache:
        cache.put("k", "v")
        cache.flush()  # clean: past its read_ttl at once
        misses = cache.stats()["misses"]
        assert cache.get("k") == "v"
        assert cache.stats()["misses"] > misses


def test_references_are_not_leaked_or_stolen(hit: str, tmp_path: Path) -> None:
    with wbcache.open(tmp_path / "c") as cache:
        value = "a str no other code holds " * 3
        cache.put("k", value)
        cache.delete("gone")
        default = object()
        cache.put("d", {"a": 1})
        held = cache._entries.map["k"]
        packed = cache._entries.map["d"]
        counts = [sys.getrefcount(held), sys.getrefcount(default), sys.getrefcount(packed),
                  sys.getrefcount(packed[0])]
        for _ in range(1000):
            assert cache.get("k") is held
            assert cache.get("d") == {"a": 1}
            assert cache.get("gone", default) is default
            assert cache.get("never", default) is default
            assert cache.get(key="never", default=default) is default
        assert [sys.getrefcount(held), sys.getrefcount(default), sys.getrefcount(packed),
                sys.getrefcount(packed[0])] == counts


def test_a_hit_racing_writes_and_evictions_returns_its_keys_value(hit: str,
                                                                    tmp_path: Path) -> None:
    """Readers hit keys that a writer keeps rewriting, deleting and evicting (capacity far
    below the keys): every value read must be one written under that key (or the default).
    A hit that borrowed the entry without holding it would read freed memory here."""
    keys = [f"k{i}" for i in range(64)]
    stop = threading.Event()
    wrong: list[Any] = []

    with wbcache.open(tmp_path / "c", capacity=16, fsync="interval") as cache:
        def read() -> None:
            while not stop.is_set():
                for key in keys:
                    value = cache.get(key, None)
                    if value is not None and value.get("key") != key:
                        wrong.append((key, value))

        readers = [threading.Thread(target=read) for _ in range(3)]
        for reader in readers:
            reader.start()
        try:
            for round_ in range(30):
                for key in keys:
                    cache.put(key, {"key": key, "round": round_, "pad": "x" * round_})
                for key in keys[::3]:
                    cache.delete(key)
                cache.flush()  # clean entries: evictable
        finally:
            stop.set()
            for reader in readers:
                reader.join()
        assert wrong == []
        assert cache.get("k1") == {"key": "k1", "round": 29, "pad": "x" * 29}
