"""The cache as a mapping: the dict-like operations wbcache adds are atomic and durable (one
log record, one fsync each), views are snapshots in one order, and a key that cannot be
stored is simply absent for reads, as in dict. (CPython's own suite: test_mapping_protocol.)"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable, KeysView, MutableMapping
from pathlib import Path
from typing import Any

import pytest

import wbcache

OpenCache = Callable[..., wbcache.Cache]


def records_and_fsyncs(cache: wbcache.Cache, action: Callable[[], Any]) -> tuple[int, int]:
    """(log records, fsyncs) that `action` cost."""
    before = cache.stats()
    action()
    after = cache.stats()
    return after["next_lsn"] - before["next_lsn"], after["fsyncs"] - before["fsyncs"]


@pytest.mark.parametrize("action, expected", [
    (lambda c: c.update({"x": 1, "y": 2}, z=3), {"a": 1, "b": 2, "x": 1, "y": 2, "z": 3}),
    (lambda c: c.pop("a"), {"b": 2}),
    (lambda c: c.setdefault("n", [1]), {"a": 1, "b": 2, "n": [1]}),
    (lambda c: c.popitem(), None),
    (lambda c: c.clear(), {}),
], ids=["update", "pop", "setdefault", "popitem", "clear"])
def test_each_dict_operation_is_one_record_and_one_fsync(
        open_cache: OpenCache, action: Callable[[wbcache.Cache], Any],
        expected: dict[str, Any] | None) -> None:
    cache = open_cache(flush_interval=3600)
    cache.put_many({"a": 1, "b": 2})
    cache.flush()  # "a" and "b" in the database; clear must delete those too
    records, fsyncs = records_and_fsyncs(cache, lambda: action(cache))
    assert (records, fsyncs) == (1, 1)
    if expected is not None:
        assert dict(cache.items()) == expected


def test_operations_that_change_nothing_write_nothing(open_cache: OpenCache) -> None:
    cache = open_cache()
    cache.put("a", 1)
    cache.delete("b")  # a fresh key: logged (whether the database has it is not asked)
    assert records_and_fsyncs(cache, lambda: cache.delete("b")) == (0, 0)  # known deleted
    assert records_and_fsyncs(cache, lambda: cache.pop("b", None)) == (0, 0)
    assert records_and_fsyncs(cache, lambda: cache.setdefault("a", 5)) == (0, 0)


def test_pop_and_setdefault_read_a_cold_key_from_the_database(tmp_path: Path) -> None:
    with wbcache.open(tmp_path / "c") as cache:
        cache.put_many({"a": 1, "b": 2})
    with wbcache.open(tmp_path / "c") as cache:  # nothing in memory
        assert cache.pop("a") == 1
        assert cache.setdefault("b", 9) == 2
        assert cache.setdefault("c", 3) == 3
    with wbcache.open(tmp_path / "c") as cache:
        assert dict(cache.items()) == {"b": 2, "c": 3}


def test_setdefault_looks_at_its_default_only_when_the_key_is_missing(tmp_path: Path) -> None:
    """As dict: a held key's value is returned whatever the default; one that cannot be stored
    is refused (nothing written) only when it would be stored. What is returned is what `get`
    then returns (a tuple comes back a list, as msgpack stores it)."""
    with wbcache.open(tmp_path / "c") as cache:
        cache.put_many({"a": 1, "cold": "db"})
    with wbcache.open(tmp_path / "c", max_value_size=1024) as cache:  # "cold": database only
        cache.put("hot", 5)
        before = cache.stats()["next_lsn"]
        assert cache.setdefault("hot", object()) == 5
        assert cache.setdefault("cold", {1, 2}) == "db"
        assert cache.setdefault("a", "x" * 2000) == 1
        with pytest.raises(TypeError):
            cache.setdefault("new", object())
        with pytest.raises(ValueError):
            cache.setdefault("new", "x" * 2000)
        assert cache.stats()["next_lsn"] == before and "new" not in cache
        assert cache.setdefault("t", (1, 2)) == [1, 2] == cache.get("t")


def test_pop_popitem_and_del_raise_key_error_when_missing(open_cache: OpenCache) -> None:
    cache = open_cache()
    with pytest.raises(KeyError):
        cache.pop("nope")
    with pytest.raises(KeyError):
        del cache["nope"]
    with pytest.raises(KeyError, match="empty"):
        cache.popitem()
    assert cache.pop("nope", "d") == "d"


def test_popitem_empties_a_cache_whose_keys_are_only_in_the_database(tmp_path: Path) -> None:
    with wbcache.open(tmp_path / "c") as cache:
        cache.put_many({f"k{i}": i for i in range(20)})
    with wbcache.open(tmp_path / "c") as cache:
        popped = dict(cache.popitem() for _ in range(20))
        assert popped == {f"k{i}": i for i in range(20)} and len(cache) == 0
        with pytest.raises(KeyError):
            cache.popitem()


def test_views_are_snapshots_in_one_order(open_cache: OpenCache) -> None:
    cache = open_cache(flush_interval=3600)
    cache.put_many({"b": 2, b"z": 26})
    cache.flush()
    cache.put_many({"a": 1, b"a": 97})  # only in memory
    keys = cache.keys()
    assert isinstance(keys, KeysView)
    assert list(keys) == ["a", "b", b"a", b"z"]  # str sorted, then bytes sorted
    assert list(cache) == list(keys) and list(cache.values()) == [1, 2, 97, 26]
    cache.put("c", 3)
    assert "c" not in keys  # a snapshot: taken at the call
    assert keys & {"a", "c"} == {"a"}  # set operations, as dict views


def test_equality_follows_mapping(open_cache: OpenCache, tmp_path: Path) -> None:
    cache = open_cache()
    cache.update({"a": [1], "b": {"x": None}})
    assert cache == {"a": [1], "b": {"x": None}}
    assert cache != {"a": [1]}
    other = wbcache.open(tmp_path / "other")
    try:
        other.update(dict(cache.items()))
        assert cache == other
    finally:
        other.close()
    assert isinstance(cache, MutableMapping)


def test_a_key_that_cannot_be_stored_is_absent_for_reads_and_refused_for_writes(
        open_cache: OpenCache) -> None:
    cache = open_cache()
    for key in (1, None, "", "k" * 600):
        assert key not in cache
        assert cache.get(key, "d") == "d"
        with pytest.raises(KeyError):
            cache[key]
        with pytest.raises(KeyError):
            del cache[key]
        assert cache.pop(key, "d") == "d"
    with pytest.raises(TypeError):
        cache[1] = "x"
    with pytest.raises(ValueError):
        cache.put("", "x")
    with pytest.raises(TypeError):
        cache.setdefault(1, "x")


def test_a_popped_key_stays_popped_after_a_crash(tmp_path: Path) -> None:
    """pop is durable when it returns: a SIGKILL right after it does not bring the key back."""
    directory = tmp_path / "c"
    with wbcache.open(directory) as cache:
        cache.put_many({"a": 1, "b": 2})
    script = (f"import os, signal, wbcache; c = wbcache.open({str(directory)!r}, "
              f"flush_interval=3600); c.pop('a'); c.setdefault('n', 7); c.update(x=1); "
              f"os.kill(os.getpid(), signal.SIGKILL)")
    done = subprocess.run([sys.executable, "-c", script])
    assert done.returncode == -signal.SIGKILL
    with wbcache.open(directory) as cache:
        assert dict(cache.items()) == {"b": 2, "n": 7, "x": 1}
