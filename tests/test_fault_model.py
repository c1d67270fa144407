"""Model check: a Hypothesis state machine runs the real cache beside a dict.

Rules put, delete, incr, put_many, batch (and an aborted batch), flush, close-and-reopen and
crash-and-reopen; after every step each key reads the same from the cache as from the model.
A flush must leave the database equal to the model; a clean close must leave nothing to
replay.

A crash is simulated in this process without killing it: under the backend's lock (no commit
in progress) the log files and the LMDB data file are copied, as `kill -9` would leave them,
into a NEW directory, which is then opened (so recovery runs on it). The old cache is closed
afterwards, into its old directory, which is thrown away: LMDB allows one environment per
file per process, and the old cache keeps its lock until it is closed. Every write had
returned before the crash, so the model keeps all of them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import msgpack
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from ram_support import RAM_DIR

import wbcache
from wbcache.fault_injection.backends import ControlledBackend
from wbcache.fault_injection.oracle import same

KEYS = ("a", "b", "c", "é", b"a", b"b", b"\x00k")
INT64 = (-(1 << 63), (1 << 63) - 1)
MISSING: Any = object()

keys = st.sampled_from(KEYS)
scalars = (st.none() | st.booleans() | st.integers(-(1 << 64), 1 << 64)
           | st.floats(allow_nan=False) | st.text(max_size=6) | st.binary(max_size=6))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=3), inner, max_size=3), max_leaves=5)
deltas = st.integers(-1000, 1000) | st.integers(*INT64)
batch_ops = st.lists(st.one_of(st.tuples(st.just("put"), keys, values),
                               st.tuples(st.just("delete"), keys),
                               st.tuples(st.just("incr"), keys, deltas)), max_size=5)


def encodable(value: Any) -> bool:
    try:
        msgpack.packb(value)
    except (OverflowError, ValueError, TypeError):
        return False
    return True


class CacheModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        # In RAM where possible: the crashes are simulated by copying files, not by the disk.
        self.root = tempfile.mkdtemp(prefix="wbcache-model-", dir=RAM_DIR)
        self.generation = 0
        self.model: dict[Any, Any] = {}
        self.cache: wbcache.Cache | None = None
        self.backend: ControlledBackend | None = None
        self.flush_interval = 0.01

    @initialize(flush_interval=st.sampled_from([0.001, 0.01, 0.05, 3600.0]))
    def open_first(self, flush_interval: float) -> None:
        self.flush_interval = flush_interval
        self._open(self._directory())

    def _directory(self) -> str:
        return os.path.join(self.root, f"g{self.generation}")

    def _open(self, path: str) -> None:
        if not os.path.isdir(os.path.join(path, "wal")):
            wbcache.open(path).close()  # lay the directory out (an external backend needs it)
        self.backend = ControlledBackend(wbcache.LmdbBackend(os.path.join(path, "db")))
        self.cache = wbcache.open(path, backend=self.backend, flush_interval=self.flush_interval,
                                  segment_size=4096, flush_threshold=8)

    def _close(self) -> None:
        assert self.cache is not None and self.backend is not None
        self.cache.close()
        self.backend.close()

    # ------------------------------------------------------------------ writes

    @rule(key=keys, value=values)
    def put(self, key: Any, value: Any) -> None:
        assert self.cache is not None
        if not encodable(value):
            try:
                self.cache.put(key, value)
            except (TypeError, ValueError):
                return
            raise AssertionError(f"put of unencodable {value!r} was accepted")
        self.cache.put(key, value)
        self.model[key] = value

    @rule(key=keys)
    def delete(self, key: Any) -> None:
        assert self.cache is not None
        self.cache.delete(key)
        self.model.pop(key, None)

    @rule(key=keys, delta=deltas)
    def incr(self, key: Any, delta: int) -> None:
        assert self.cache is not None
        expected = self._incremented(self.model, key, delta)
        if isinstance(expected, type):
            try:
                self.cache.incr(key, delta)
            except expected:
                return
            raise AssertionError(f"incr({key!r}, {delta}) should raise {expected.__name__}")
        assert self.cache.incr(key, delta) == expected
        self.model[key] = expected

    @staticmethod
    def _incremented(state: dict[Any, Any], key: Any, delta: int) -> Any:
        current = state.get(key, 0)
        if type(current) is not int:
            return TypeError
        result = current + delta
        return result if INT64[0] <= result <= INT64[1] else ValueError

    @rule(entries=st.lists(st.tuples(keys, values), max_size=4))
    def put_many(self, entries: list[tuple[Any, Any]]) -> None:
        assert self.cache is not None
        if not all(encodable(value) for _, value in entries):
            try:
                self.cache.put_many(entries)
            except (TypeError, ValueError):
                return
            raise AssertionError("put_many with an unencodable value was accepted")
        self.cache.put_many(entries)
        self.model.update(entries)

    @rule(ops=batch_ops)
    def batch(self, ops: list[tuple[Any, ...]]) -> None:
        assert self.cache is not None
        after = dict(self.model)
        failure: type[Exception] | None = None
        for op in ops:
            if op[0] == "put":
                if not encodable(op[2]):
                    failure = failure or ValueError
                after[op[1]] = op[2]
            elif op[0] == "delete":
                after.pop(op[1], None)
            else:
                result = self._incremented(after, op[1], op[2])
                if isinstance(result, type):
                    failure = failure or result
                else:
                    after[op[1]] = result
        try:
            with self.cache.batch() as batch:
                for op in ops:
                    getattr(batch, op[0])(*op[1:])
        except (TypeError, ValueError) as exc:
            assert failure is not None, f"batch raised {exc!r}"
            return  # all or nothing: nothing
        assert failure is None, f"batch should have raised {failure.__name__}"
        self.model = after

    @rule(key=keys, value=values.filter(encodable))
    def aborted_batch(self, key: Any, value: Any) -> None:
        assert self.cache is not None
        try:
            with self.cache.batch() as batch:
                batch.put(key, value)
                raise KeyboardInterrupt  # any exception discards the batch
        except KeyboardInterrupt:
            pass

    # ----------------------------------------------------------------- control

    @rule()
    def flush(self) -> None:
        assert self.cache is not None and self.backend is not None
        self.cache.flush()
        stored = {key: msgpack.unpackb(value, strict_map_key=False)
                  for key, value in self.backend.inner.items()}
        assert same(stored, self.model), "after flush() the database must equal the model"

    @rule()
    def close_and_reopen(self) -> None:
        self._close()
        self._open(self._directory())
        assert self.cache is not None
        assert self.cache.recovery.replayed == 0, "a clean close leaves nothing to replay"

    @rule()
    def crash_and_reopen(self) -> None:
        assert self.cache is not None and self.backend is not None
        old = self._directory()
        self.generation += 1
        new = self._directory()
        os.makedirs(os.path.join(new, "wal"))
        os.makedirs(os.path.join(new, "db"))
        with self.backend.frozen():  # no commit in progress while the files are copied
            for name in ("LOCK", "cache_id"):
                if os.path.exists(os.path.join(old, name)):
                    shutil.copy(os.path.join(old, name), os.path.join(new, name))
            for name in os.listdir(os.path.join(old, "wal")):
                try:
                    shutil.copy(os.path.join(old, "wal", name), os.path.join(new, "wal", name))
                except FileNotFoundError:  # deleted by the flusher meanwhile: it was flushed
                    pass
            shutil.copy(os.path.join(old, "db", "data.mdb"), os.path.join(new, "db"))
        try:
            self.cache.close()
        except wbcache.WbcacheError:
            pass
        self.backend.close()
        shutil.rmtree(old, ignore_errors=True)
        self._open(new)

    @rule()
    def views(self) -> None:
        assert self.cache is not None
        assert len(self.cache) == len(self.model)
        assert same(dict(self.cache.items()), self.model)

    @invariant()
    def reads_match_the_model(self) -> None:
        if self.cache is None:
            return
        for key in KEYS:
            got = self.cache.get(key, MISSING)
            expected = self.model.get(key, MISSING)
            assert got is expected if expected is MISSING else same(got, expected), (
                f"{key!r}: cache has {got!r}, model {expected!r}")

    def teardown(self) -> None:
        if self.cache is not None:
            self._close()
        shutil.rmtree(self.root, ignore_errors=True)


# 40 programs of up to 50 steps in the default suite; 1,000 with --soak.
CacheModel.TestCase.settings = settings(deadline=None, max_examples=40)
test_cache_behaves_like_a_dict_through_flushes_closes_and_crashes = CacheModel.TestCase


@pytest.mark.soak
class TestSoakCacheBehavesLikeADict(CacheModel.TestCase):  # type: ignore[misc,valid-type]
    settings = settings(deadline=None, max_examples=1_000)
