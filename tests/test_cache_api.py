"""The public API of `Cache`, call by call, with its errors. One file (over 600 lines) so that
a method without a test shows; the mapping methods are in test_mapping.py."""

from __future__ import annotations

import asyncio
import copy
import os
import pickle
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest

import wbcache
from wbcache import CacheClosedError, CacheLockedError, Options

OpenCache = Callable[..., wbcache.Cache]


def test_put_returns_increasing_lsns_and_get_returns_the_value(open_cache: OpenCache) -> None:
    cache = open_cache()
    first = cache.put("a", 1)
    second = cache.put("b", "two")
    assert second == first + 1
    assert cache.get("a") == 1
    assert cache.get("b") == "two"


def test_get_missing_returns_default_and_getitem_raises_keyerror(open_cache: OpenCache) -> None:
    cache = open_cache()
    assert cache.get("nope") is None
    assert cache.get("nope", 42) == 42
    with pytest.raises(KeyError):
        cache["nope"]


def test_setitem_and_getitem(open_cache: OpenCache) -> None:
    cache = open_cache()
    cache["k"] = {"x": [1, 2]}
    assert cache["k"] == {"x": [1, 2]}


def test_str_and_bytes_keys_are_distinct_and_keep_their_type(open_cache: OpenCache) -> None:
    cache = open_cache()
    cache.put("a", "str key")
    cache.put(b"a", "bytes key")
    assert cache.get("a") == "str key"
    assert cache.get(b"a") == "bytes key"
    cache.flush()
    cache.close()
    reopened = open_cache()
    assert sorted(reopened.keys(), key=repr) == ["a", b"a"]
    assert {type(key) for key in reopened.keys()} == {str, bytes}
    assert reopened.get(b"a") == "bytes key"


@pytest.mark.parametrize("value", [None, True, False, 0, -1, 2**63 - 1, -(2**63), 2**64 - 1,
                                   1.5, float("inf"), "", "héllo", b"\x00\xff", [], {},
                                   [1, "a", b"b", None], {"nested": {"list": [1, 2.5]}},
                                   {1: "int keys"}])
def test_every_msgpack_native_value_round_trips(open_cache: OpenCache, value: object) -> None:
    cache = open_cache()
    cache.put("v", value)
    assert cache.get("v") == value
    cache.flush()
    cache.close()
    assert open_cache().get("v") == value


def test_tuples_come_back_as_lists(open_cache: OpenCache) -> None:
    cache = open_cache()
    cache.put("t", (1, (2, 3)))
    assert cache.get("t") == [1, [2, 3]]


def test_reads_never_alias_mutable_values(open_cache: OpenCache) -> None:
    cache = open_cache()
    original = {"list": [1, 2]}
    cache.put("k", original)
    original["list"].append(99)  # the caller's object is not the cache's
    first = cache.get("k")
    first["list"].append(3)
    first["new"] = True
    assert cache.get("k") == {"list": [1, 2]}
    assert cache.get("k") is not cache.get("k")


def test_contains_len_iter_keys_items_merge_memory_and_database(open_cache: OpenCache) -> None:
    cache = open_cache()
    cache.put_many({"db1": 1, "db2": 2, "gone": 3})
    cache.flush()
    cache.put("mem", 4)
    cache.put("db1", 10)
    cache.delete("gone")
    assert "db2" in cache and "mem" in cache
    assert "gone" not in cache and "never" not in cache
    assert len(cache) == 3
    assert sorted(cache) == ["db1", "db2", "mem"]
    assert sorted(cache.keys()) == ["db1", "db2", "mem"]
    assert sorted(cache.items()) == [("db1", 10), ("db2", 2), ("mem", 4)]


def test_len_counts_database_entries_not_in_memory(open_cache: OpenCache) -> None:
    cache = open_cache(capacity=5)
    cache.put_many({f"k{i}": i for i in range(50)})
    cache.flush()
    assert cache.stats()["cached"] <= 5
    assert len(cache) == 50
    assert cache.get("k0") == 0  # evicted, read back from the database


def test_delete_returns_lsn_and_missing_key_is_not_an_error(open_cache: OpenCache) -> None:
    cache = open_cache()
    lsn = cache.put("k", 1)
    assert cache.delete("k") == lsn + 1
    assert cache.delete("never-existed") == lsn + 2
    assert cache.get("k") is None


def test_del_missing_key_raises_keyerror_and_logs_nothing(open_cache: OpenCache) -> None:
    cache = open_cache()
    cache.put("k", 1)
    del cache["k"]
    assert "k" not in cache
    before = cache.stats()
    with pytest.raises(KeyError):
        del cache["k"]
    assert cache.stats()["next_lsn"] == before["next_lsn"]


def test_del_of_a_key_only_in_the_database(open_cache: OpenCache) -> None:
    cache = open_cache()
    cache.put("k", 1)
    cache.flush()
    cache.close()
    cache = open_cache()
    del cache["k"]
    assert cache.get("k") is None


def test_incr_counts_from_zero_and_returns_the_new_value(open_cache: OpenCache) -> None:
    cache = open_cache()
    assert cache.incr("n") == 1
    assert cache.incr("n", 10) == 11
    assert cache.incr("n", -20) == -9
    assert cache.get("n") == -9


def test_incr_on_a_value_from_the_database(open_cache: OpenCache) -> None:
    cache = open_cache()
    cache.put("n", 40)
    cache.flush()
    cache.close()
    assert open_cache().incr("n", 2) == 42


def test_incr_on_a_non_int_raises_typeerror_and_logs_nothing(open_cache: OpenCache) -> None:
    cache = open_cache()
    cache.put("s", "text")
    cache.put("b", True)
    before = cache.stats()["next_lsn"]
    with pytest.raises(TypeError, match="not an int"):
        cache.incr("s")
    with pytest.raises(TypeError):
        cache.incr("b")
    with pytest.raises(TypeError):
        cache.incr("n", 1.5)  # type: ignore[arg-type]
    assert cache.stats()["next_lsn"] == before
    assert cache.get("s") == "text"


def test_incr_overflow_raises_valueerror(open_cache: OpenCache) -> None:
    cache = open_cache()
    cache.put("n", 2**63 - 1)
    with pytest.raises(ValueError, match="64-bit"):
        cache.incr("n")
    assert cache.get("n") == 2**63 - 1


def test_incr_is_atomic_across_threads(open_cache: OpenCache) -> None:
    cache = open_cache(fsync="interval")

    def work() -> None:
        for _ in range(500):
            cache.incr("counter")

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert cache.get("counter") == 4000


def test_put_many_is_one_record_and_one_fsync(open_cache: OpenCache) -> None:
    cache = open_cache()
    before = cache.stats()
    lsn = cache.put_many({f"k{i}": i for i in range(1000)})
    after = cache.stats()
    assert lsn == before["next_lsn"]
    assert after["next_lsn"] == before["next_lsn"] + 1
    assert after["fsyncs"] == before["fsyncs"] + 1
    assert after["writes"] == before["writes"] + 1000
    assert cache.get("k999") == 999


def test_put_many_accepts_pairs_and_later_duplicates_win(open_cache: OpenCache) -> None:
    cache = open_cache()
    cache.put_many([("a", 1), ("b", 2), ("a", 3)])
    assert cache.get("a") == 3 and cache.get("b") == 2


def test_put_many_with_one_bad_entry_writes_nothing(open_cache: OpenCache) -> None:
    cache = open_cache()
    before = cache.stats()
    with pytest.raises(TypeError):
        cache.put_many({"good": 1, "bad": object()})
    with pytest.raises(TypeError):
        cache.put_many([("a", 1), "not a pair"])  # type: ignore[list-item]
    assert cache.stats()["next_lsn"] == before["next_lsn"]
    assert cache.stats()["wal_bytes"] == before["wal_bytes"]
    assert cache.get("good") is None


def test_put_many_empty_writes_nothing(open_cache: OpenCache) -> None:
    cache = open_cache()
    cache.put("a", 1)
    before = cache.stats()
    assert cache.put_many({}) == before["next_lsn"] - 1
    assert cache.stats()["next_lsn"] == before["next_lsn"]


def test_batch_applies_all_operations_atomically_on_exit(open_cache: OpenCache) -> None:
    cache = open_cache()
    cache.put("old", 1)
    before = cache.stats()
    with cache.batch() as batch:
        batch.put("a", 1)
        batch.incr("a", 5)
        batch.delete("old")
        batch.incr("fresh")
        assert cache.get("a") is None  # nothing visible before exit
    assert batch.lsn == before["next_lsn"]
    assert cache.stats()["next_lsn"] == before["next_lsn"] + 1
    assert cache.get("a") == 6 and cache.get("fresh") == 1 and cache.get("old") is None


def test_batch_writes_nothing_when_the_block_raises(open_cache: OpenCache) -> None:
    cache = open_cache()
    before = cache.stats()
    with pytest.raises(RuntimeError):
        with cache.batch() as batch:
            batch.put("a", 1)
            raise RuntimeError("abort")
    assert cache.get("a") is None
    assert cache.stats()["next_lsn"] == before["next_lsn"]


def test_batch_with_a_failing_incr_writes_nothing(open_cache: OpenCache) -> None:
    cache = open_cache()
    cache.put("s", "text")
    with pytest.raises(TypeError):
        with cache.batch() as batch:
            batch.put("a", 1)
            batch.incr("s")
    assert cache.get("a") is None


def test_batch_cannot_be_reused_after_exit(open_cache: OpenCache) -> None:
    cache = open_cache()
    with cache.batch() as batch:
        batch.put("a", 1)
    with pytest.raises(ValueError):
        batch.put("b", 2)


def test_a_batch_used_without_its_with_block_refuses_every_operation(
        open_cache: OpenCache) -> None:
    """Nothing but the block's exit ever writes a batch: ops added outside it were accepted
    and silently never written."""
    cache = open_cache()
    batch = cache.batch()
    for add in (lambda: batch.put("x", 1), lambda: batch.incr("n"),
                lambda: batch.delete("x")):
        with pytest.raises(ValueError, match="inside `with cache.batch"):
            add()
    with batch:  # entered later, it works as any batch
        batch.put("x", 2)
    assert cache.get("x") == 2 and "n" not in cache


def test_flush_writes_to_the_database_and_leaves_only_the_active_segment(
        open_cache: OpenCache, cache_dir: Path) -> None:
    # no background flush: the segments are all still there when counted
    cache = open_cache(segment_size=4096, flush_interval=3600, flush_threshold=100_000)
    for i in range(2000):
        cache.put(f"key{i}", "x" * 20)
    assert len(os.listdir(cache_dir / "wal")) > 1
    cache.flush()
    assert len(os.listdir(cache_dir / "wal")) == 1
    stats = cache.stats()
    assert stats["wal_segments"] == 1
    assert stats["checkpoint_lsn"] == stats["next_lsn"] - 1
    cache.close()  # LMDB allows one environment per process
    backend = wbcache.LmdbBackend(str(cache_dir / "db"), readonly=True)
    try:
        assert backend.count() == 2000
        assert backend.checkpoint() == stats["checkpoint_lsn"]
    finally:
        backend.close()


def test_coalescing_turns_100_writes_to_one_key_into_one_database_write(
        open_cache: OpenCache) -> None:
    cache = open_cache(flush_interval=3600)
    for i in range(100):
        cache.put("hot", i)
    cache.flush()
    stats = cache.stats()
    assert stats["writes"] == 100
    assert stats["backend_writes"] == 1
    assert stats["coalesced"] == 99
    assert cache.get("hot") == 99


def test_group_commit_shares_fsyncs_between_threads(open_cache: OpenCache) -> None:
    cache = open_cache()
    start = threading.Barrier(16)

    def work(thread: int) -> None:
        start.wait()
        for i in range(200):
            cache.put(f"t{thread}:{i}", i)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats = cache.stats()
    assert stats["writes"] == 3200
    assert stats["fsyncs"] < stats["writes"] / 2


def test_a_lone_writer_gets_one_fsync_per_write(open_cache: OpenCache) -> None:
    cache = open_cache()
    before = cache.stats()["fsyncs"]
    for i in range(10):
        cache.put("k", i)
    assert cache.stats()["fsyncs"] == before + 10


def test_sync_under_interval_mode_fsyncs_acknowledged_writes(open_cache: OpenCache) -> None:
    cache = open_cache(fsync="interval", fsync_interval=3600)
    for i in range(100):
        cache.put(f"k{i}", i)
    stats = cache.stats()
    assert stats["fsyncs"] == 0
    assert stats["durable_lsn"] < stats["next_lsn"] - 1
    cache.sync()
    stats = cache.stats()
    assert stats["fsyncs"] == 1
    assert stats["durable_lsn"] == stats["next_lsn"] - 1


def test_stats_has_every_documented_counter(open_cache: OpenCache) -> None:
    stats = open_cache().stats()
    for name in ("hits", "misses", "writes", "dirty", "cached", "flushes", "flushed_entries",
                 "coalesced", "backend_writes", "wal_bytes", "wal_segments", "fsyncs",
                 "flush_errors", "recovered_records", "last_flush_seconds", "checkpoint_lsn",
                 "next_lsn"):
        assert name in stats, name


def test_hits_and_misses_are_counted(open_cache: OpenCache) -> None:
    cache = open_cache()
    cache.put("a", 1)
    cache.get("a")
    cache.get("a")
    cache.get("missing")
    stats = cache.stats()
    assert stats["hits"] == 2
    assert stats["misses"] == 1


def test_lsns_only_grow_across_reopen(open_cache: OpenCache) -> None:
    cache = open_cache()
    last = 0
    for i in range(5):
        last = cache.put("k", i)
    cache.close()
    cache = open_cache()
    assert cache.put("k", 99) == last + 1


def test_close_is_idempotent_and_every_call_after_it_raises(open_cache: OpenCache) -> None:
    cache = open_cache()
    cache.put("a", 1)
    cache.close()
    cache.close()
    assert cache.closed
    calls = [lambda: cache.put("a", 1), lambda: cache.get("a"), lambda: cache["a"],
             lambda: cache.delete("a"), lambda: cache.incr("n"), lambda: cache.put_many({"a": 1}),
             lambda: cache.batch(), cache.flush, cache.sync, cache.keys, cache.items,
             lambda: len(cache), lambda: "a" in cache, lambda: list(cache)]
    for call in calls:
        with pytest.raises(CacheClosedError):
            call()


def test_close_flushes_everything_to_the_database(open_cache: OpenCache, cache_dir: Path) -> None:
    cache = open_cache(flush_interval=3600)
    cache.put_many({f"k{i}": i for i in range(100)})
    cache.close()
    backend = wbcache.LmdbBackend(str(cache_dir / "db"), readonly=True)
    try:
        assert backend.count() == 100
    finally:
        backend.close()


def test_context_manager_closes(cache_dir: Path) -> None:
    with wbcache.open(cache_dir) as cache:
        cache.put("a", 1)
    assert cache.closed
    with wbcache.open(cache_dir) as cache:
        assert cache.get("a") == 1


def test_second_open_in_the_same_process_is_refused(open_cache: OpenCache,
                                                     cache_dir: Path) -> None:
    cache = open_cache()
    with pytest.raises(CacheLockedError, match=f"already open in this process \\(pid "
                                               f"{os.getpid()}\\): close that cache first"):
        wbcache.open(cache_dir)
    cache.put("still", "usable")
    cache.close()
    assert open_cache().get("still") == "usable"


def test_an_empty_path_or_a_backend_of_the_wrong_type_is_refused_before_any_file_is_made(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # "" was the working directory, made a cache
    with pytest.raises(ValueError, match="the directory path is empty"):
        wbcache.open("")
    with pytest.raises(TypeError, match="backend must be a Backend .* not int"):
        wbcache.open(tmp_path / "cache", backend=42)  # type: ignore[arg-type]

    class BytesPath:  # os.PathLike[bytes]: failed deep in the open, mixing str and bytes
        def __fspath__(self) -> bytes:
            return os.fsencode(tmp_path / "cache")

    for shared in (False, True):
        with pytest.raises(TypeError, match="os.PathLike giving a str, not one giving bytes"):
            wbcache.open(BytesPath(), shared=shared)  # type: ignore[arg-type]
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("key, error", [
    (1, TypeError), (None, TypeError), (1.5, TypeError), (bytearray(b"a"), TypeError),
    (("a",), TypeError), ("", ValueError), (b"", ValueError), ("x" * 512, ValueError),
    ("\ud800", ValueError),
])
def test_bad_keys_are_rejected_before_anything_is_logged(open_cache: OpenCache, key: object,
                                                        error: type[Exception]) -> None:
    cache = open_cache()
    before = cache.stats()
    for call in (lambda: cache.put(key, 1), lambda: cache.delete(key),  # type: ignore[arg-type]
                 lambda: cache.incr(key), lambda: cache.put_many([(key, 1)])):  # type: ignore[arg-type]
        with pytest.raises(error):
            call()
    after = cache.stats()
    assert (after["next_lsn"], after["wal_bytes"]) == (before["next_lsn"], before["wal_bytes"])
    cache.put("ok", 1)  # still usable
    assert cache.get("ok") == 1


@pytest.mark.parametrize("value, error", [
    (object(), TypeError), ({1, 2}, TypeError), (2**64, ValueError), (-(2**63) - 1, ValueError),
    ("x" * 2000, ValueError),
])
def test_bad_values_are_rejected_before_anything_is_logged(open_cache: OpenCache, value: object,
                                                          error: type[Exception]) -> None:
    cache = open_cache(max_value_size=1000)
    before = cache.stats()
    with pytest.raises(error):
        cache.put("k", value)
    with pytest.raises(error):
        with cache.batch() as batch:
            batch.put("k", value)
    after = cache.stats()
    assert (after["next_lsn"], after["wal_bytes"]) == (before["next_lsn"], before["wal_bytes"])
    assert cache.get("k") is None


def test_str_subclass_keys_are_stored_as_plain_str(open_cache: OpenCache) -> None:
    class Name(str):
        pass

    cache = open_cache()
    cache.put(Name("k"), 1)
    assert cache.get("k") == 1
    assert type(list(cache.keys())[0]) is str


@pytest.mark.parametrize("options, error", [
    ({"fsync": "sometimes"}, ValueError), ({"flush_interval": 0}, ValueError),
    ({"capacity": -1}, ValueError), ({"capacity": "10"}, TypeError),
    ({"max_dirty": True}, TypeError), ({"segment_size": 10}, ValueError),
    ({"no_such_option": 1}, TypeError), ({"max_key_size": 4096}, ValueError),
    ({"fsync_interval": float("nan")}, ValueError), ({"max_value_size": 1 << 40}, ValueError),
    # past what the background threads' waits take (OverflowError in them: a dead flusher)
    ({"flush_interval": 1e10}, ValueError), ({"fsync_interval": 1e10}, ValueError),
    ({"flush_timeout": 1e10}, ValueError),
    ({"map_size": 1}, ValueError), ({"map_size": 1 << 70}, ValueError),  # LMDB's errors
])
def test_bad_options_are_rejected_with_the_option_named(cache_dir: Path, options: dict[str, object],
                                                       error: type[Exception]) -> None:
    with pytest.raises(error, match=next(iter(options))):
        wbcache.open(cache_dir, **options)
    # nothing was left locked: a good open works
    wbcache.open(cache_dir).close()


@pytest.mark.parametrize("shared", [False, True])
def test_a_key_limit_past_lmdb_s_is_refused_before_anything_is_made(tmp_path: Path,
                                                                    shared: bool) -> None:
    # It was checked once the database was open: the refused open left a whole new cache
    # directory (LOCK, cache_id, backend, db/, wal/ or lanes/) behind.
    with pytest.raises(ValueError, match="max_key_size .600. exceeds the database's limit"):
        wbcache.open(tmp_path / "new", max_key_size=600, shared=shared)
    assert not (tmp_path / "new").exists()


def test_options_dataclass_is_frozen_and_documents_defaults() -> None:
    options = Options()
    assert options.fsync == "always"
    with pytest.raises(AttributeError):
        options.fsync = "interval"  # type: ignore[misc]


def test_open_refuses_a_file_and_a_foreign_directory(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("hello")
    with pytest.raises(wbcache.InvalidDirectoryError):
        wbcache.open(a_file)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.txt").write_text("mine")
    with pytest.raises(wbcache.InvalidDirectoryError):
        wbcache.open(foreign)
    assert os.listdir(foreign) == ["data.txt"]
    with pytest.raises(TypeError):
        wbcache.open(123)  # type: ignore[arg-type]


def test_directory_and_files_are_private(open_cache: OpenCache, cache_dir: Path) -> None:
    cache = open_cache()
    cache.put("a", 1)
    for path in (cache_dir, cache_dir / "wal", cache_dir / "db"):
        assert path.stat().st_mode & 0o077 == 0, path
    for path in [cache_dir / "LOCK", *(cache_dir / "wal").iterdir()]:
        assert path.stat().st_mode & 0o077 == 0, path


def test_concurrent_mixed_operations_keep_each_threads_view(open_cache: OpenCache) -> None:
    cache = open_cache(capacity=50, flush_threshold=20, max_dirty=100)
    errors: list[BaseException] = []

    def work(thread: int) -> None:
        try:
            for i in range(300):
                key = f"t{thread}:{i % 40}"
                cache.put(key, i)
                assert cache.get(key) == i
                cache.incr(f"t{thread}:n")
                if i % 7 == 0:
                    cache.delete(key)
                    assert key not in cache
                if i % 50 == 0:
                    cache.flush()
        except BaseException as exc:  # reported to the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for thread in range(6):
        assert cache.get(f"t{thread}:n") == 300
        assert cache.get(f"t{thread}:{299 % 40}") == 299


def test_a_dict_keyed_by_a_tuple_is_rejected_because_it_cannot_be_read_back(
        open_cache: OpenCache) -> None:
    cache = open_cache()
    before = cache.stats()
    with pytest.raises(TypeError, match="cannot be read back"):
        cache.put("k", {"outer": {(1, 2): "x"}})
    assert cache.stats()["wal_bytes"] == before["wal_bytes"]
    cache.put("other", 1)
    assert list(cache.items()) == [("other", 1)]


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("value", [
    msgpack.Timestamp(1, 2),  # an ext type: the C proof leaves it to unpackb
    _nested(70),  # deeper than the C proof goes (64): left to unpackb
    "é" * 40_000,  # over the shared Packer's size: packed on its own
    b"\x00" * 200_000,
], ids=["timestamp", "nested-70", "long-str", "long-bytes"])
def test_values_the_fast_checks_leave_to_msgpack_are_stored_and_read_back(
        open_cache: OpenCache, value: Any) -> None:
    cache = open_cache()
    cache.put("k", value)
    assert cache.get("k") == value
    cache.close()
    assert open_cache().get("k") == value


def _lists(depth: int) -> list[Any]:
    """`depth` lists, each in the one before, the last empty."""
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize("value, message", [
    (_lists(1024), None),  # the deepest msgpack decodes: stored
    (_lists(1025), "nested deeper than msgpack decodes (1,024 levels)"),
    (memoryview(b"abcdefgh")[::2], "not C-contiguous"),
    ({"in": [memoryview(b"abcdefgh")[::2]]}, "not C-contiguous"),
], ids=["nested-1024", "nested-1025", "strided-memoryview", "strided-memoryview-inside"])
def test_a_value_msgpack_cannot_take_is_refused_with_a_value_error_that_says_why(
        open_cache: OpenCache, value: Any, message: str | None) -> None:
    """Were refused with a raw BufferError, and with "cannot be read back (); dict keys must
    be ..." for a list one level too deep (an outside hunt of bad input)."""
    cache = open_cache()
    if message is None:
        cache.put("k", value)
        assert msgpack.packb(cache.get("k")) == msgpack.packb(value)  # == recurses too deep
        return
    with pytest.raises(ValueError, match=re.escape(message)):
        cache.put("k", value)
    cache.put("other", 1)  # nothing written, the cache as usable as before
    assert list(cache.items()) == [("other", 1)]


def test_put_many_rejects_strings_as_pairs(open_cache: OpenCache) -> None:
    cache = open_cache()
    with pytest.raises(TypeError, match="pairs"):
        cache.put_many(["ab", "cd"])  # type: ignore[list-item]
    assert cache.get("a") is None


def test_batch_incr_of_a_list_put_earlier_in_the_batch_names_the_type(
        open_cache: OpenCache) -> None:
    cache = open_cache()
    with pytest.raises(TypeError, match="is a list, not an int"):
        with cache.batch() as batch:
            batch.put("L", [1])
            batch.incr("L")
    assert cache.get("L") is None


def test_stats_after_close_raises(open_cache: OpenCache) -> None:
    cache = open_cache()
    cache.close()
    with pytest.raises(CacheClosedError):
        cache.stats()


def test_clear_after_close_raises_cache_closed(open_cache: OpenCache) -> None:
    """It reached the closed LMDB database first: lmdb.Error."""
    cache = open_cache()
    cache.put("k", 1)
    cache.close()
    with pytest.raises(CacheClosedError):
        cache.clear()


def test_pop_of_a_key_that_cannot_be_stored_after_close_raises_cache_closed(
        open_cache: OpenCache) -> None:
    """As get of one does: it returned the default (or raised KeyError) on a closed cache."""
    cache = open_cache()
    cache.close()
    for call in (lambda: cache.pop(1, "d"), lambda: cache.pop(""), lambda: cache.get(1)):
        with pytest.raises(CacheClosedError):
            call()


def test_a_get_hit_gives_its_entry_a_second_chance_at_eviction(open_cache: OpenCache) -> None:
    """The lock-free hit path notes the hit where CLOCK looks: of three clean entries, the one
    read survives the next eviction and the oldest unread one goes."""
    cache = open_cache(capacity=3, flush_interval=3600.0)
    for key in "abc":
        cache.put(key, key)
    cache.flush()  # all clean: evictable
    assert cache.get("a") == "a"
    cache.put("d", "d")  # over capacity: one clean entry is evicted
    before = cache.stats()
    assert before["evictions"] == 1 and before["cached"] == 3
    assert cache.get("a") == "a"  # still in memory: a hit
    assert cache.stats()["hits"] == before["hits"] + 1
    assert cache.get("b") == "b"  # evicted: read back from the database
    assert cache.stats()["misses"] == before["misses"] + 1


def test_eviction_racing_lock_free_reads_never_breaks_a_write(open_cache: OpenCache) -> None:
    """Readers note hits without the lock while writers evict: no write may fail half
    applied (eviction must not iterate the OrderedDict)."""
    import sys

    cache = open_cache(fsync="interval", capacity=50, flush_threshold=100)
    errors: list[BaseException] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            for i in range(0, 400, 7):
                try:
                    cache.get(f"k{i}")
                except BaseException as exc:  # reported below
                    errors.append(exc)

    def write(thread: int) -> None:
        try:
            for round_ in range(60):
                cache.put_many({f"k{i}": (thread, round_) for i in range(thread, 400, 3)})
        except BaseException as exc:  # reported below
            errors.append(exc)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible to widen any race
    try:
        readers = [threading.Thread(target=read) for _ in range(3)]
        writers = [threading.Thread(target=write, args=(t,)) for t in range(2)]
        for thread in readers + writers:
            thread.start()
        for thread in writers:
            thread.join()
        stop.set()
        for thread in readers:
            thread.join()
    finally:
        sys.setswitchinterval(old)
    assert errors == []
    for i in range(400):
        thread = i % 3
        if thread < 2:
            assert cache.get(f"k{i}") == [thread, 59], i


def test_lowering_max_key_size_keeps_longer_stored_keys_readable_and_deletable(
        open_cache: OpenCache) -> None:
    long_key, other = "k" * 400, "x" * 300
    cache = open_cache()
    cache.put_many({long_key: 1, other: 2})
    cache.close()
    cache = open_cache(max_key_size=100)
    assert cache.get(long_key) == 1 and cache[long_key] == 1 and long_key in cache
    assert sorted(cache.keys()) == sorted([long_key, other])
    cache.delete(long_key)
    del cache[other]
    assert long_key not in cache and other not in cache
    with pytest.raises(ValueError, match="max_key_size"):
        cache.put(long_key, 3)  # the limit applies to new writes
    with pytest.raises(ValueError, match="max_key_size"):
        cache.incr(long_key)
    cache.close()
    assert len(open_cache()) == 0


def test_a_path_under_a_file_is_an_invalid_directory_naming_it(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    with pytest.raises(wbcache.InvalidDirectoryError, match="afile/sub.*a parent is a file"):
        wbcache.open(tmp_path / "afile" / "sub")


def test_entering_a_closed_cache_raises_cache_closed(open_cache: OpenCache) -> None:
    cache = open_cache()
    cache.close()
    with pytest.raises(wbcache.CacheClosedError):
        with cache:
            pass


def test_a_subclass_that_overrides_get_is_called(tmp_path: Path) -> None:
    """Each cache binds a closure as its `get` (the hit path); a subclass's own `get` must
    still be the one called, directly and through `[]`, `in`."""
    calls = []

    class Logged(wbcache.Cache):
        def get(self, key: Any, default: Any = None) -> Any:
            calls.append(key)
            return super().get(key, default)

    cache = Logged.open(tmp_path / "c", wbcache.Options())
    try:
        cache.put("k", 1)
        assert cache.get("k") == 1 and cache["k"] == 1 and "k" in cache
        assert calls == ["k", "k", "k"]
    finally:
        cache.close()


def test_cached_containers_add_nothing_for_the_garbage_collector_to_walk(
        open_cache: OpenCache) -> None:
    """A full collection walks every tracked object of the process, and stops it meanwhile:
    what memory holds for 10,000 dict values must not be 10,000 more of them (an instance of a
    bytes subclass, as it once was, is tracked; docs/bench.md, "Garbage collection")."""
    import gc

    cache = open_cache(fsync="interval")
    cache.put("warm", {"n": -1})
    gc.collect()
    before = len(gc.get_objects())
    for start in range(0, 10_000, 1_000):
        cache.put_many({f"k{i}": {"n": [i]} for i in range(start, start + 1_000)})
    gc.collect()
    grown = len(gc.get_objects()) - before
    assert cache.get("k9999") == {"n": [9999]} and len(cache) == 10_001
    assert grown < 1_000, f"{grown:,} more objects tracked for 10,000 cached dicts"


def test_a_cache_sent_to_another_process_is_refused_with_what_to_do(tmp_path: Path) -> None:
    """A pool's task argument is pickled: pickle named py-lmdb's Environment, deep inside,
    and said nothing of what to do (an outside hunt of process pools). Copying is refused
    the same way (a second object over one open directory). The cache goes on."""
    async def main() -> None:
        async with await wbcache.open_async(tmp_path / "async") as async_cache:
            for send in (pickle.dumps, copy.copy):
                with pytest.raises(TypeError, match="wbcache.AsyncCache cannot be pickled"):
                    send(async_cache)
            await async_cache.put("still", 1)

    with wbcache.open(tmp_path / "c", shared=True) as cache:
        for send in (pickle.dumps, copy.copy, lambda c: pickle.dumps([{"cache": c}])):
            with pytest.raises(TypeError, match="Open the directory in the other process"):
                send(cache)
        cache.put("still", 1)
        assert cache.get("still") == 1
    asyncio.run(main())
