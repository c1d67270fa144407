"""The record codec (wal/records.py): every operation encodes, validates, folds and describes
in one place, and a record nothing downstream could apply is refused where it is read."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
from log_bytes import frame

import wbcache
from wbcache import codec
from wbcache.codec import added, encode_value
from wbcache.errors import CorruptLogError
from wbcache.wal.format import encode_header
from wbcache.wal.records import (
    OP_BATCH,
    OP_DELETE,
    OP_INCR,
    OP_PUT,
    delete_item,
    describe,
    encode_batch,
    encode_delete,
    encode_incr,
    encode_put,
    fold,
    frame_problem,
    incr_item,
    problem,
    put_item,
)
from wbcache.wal.segments import segment_name

VALUE = msgpack.packb({"a": [1, 2]})


def decoded(encoded: bytes) -> Any:
    return msgpack.unpackb(encoded, strict_map_key=False)


def test_each_operation_encodes_to_the_documented_layout() -> None:
    assert decoded(encode_put(7, "k", VALUE)) == [7, OP_PUT, "k", VALUE]
    assert decoded(encode_delete(8, b"k")) == [8, OP_DELETE, b"k"]
    assert decoded(encode_incr(9, "n", 2, 5)) == [9, OP_INCR, "n", 2, 5]
    items = [put_item("a", VALUE), delete_item("b"), incr_item("n", 1, 6)]
    assert decoded(encode_batch(10, items)) == [10, OP_BATCH, items]


@pytest.mark.parametrize("record", [
    [1, OP_PUT, "k", VALUE], [1, OP_DELETE, b"k"], [1, OP_INCR, "k", -3, 4],
    [1, OP_BATCH, [[OP_PUT, "a", VALUE], [OP_DELETE, "b"], [OP_INCR, "c", 1, 1]]],
], ids=["put", "delete", "incr", "batch"])
def test_records_the_writer_writes_are_usable(record: list[Any]) -> None:
    assert problem(decoded(msgpack.packb(record))) is None
    assert frame_problem([record]) is None


@pytest.mark.parametrize("record, why", [
    ([1, OP_PUT, "", VALUE], "empty key"),
    ([1, OP_PUT, "k" * 600, VALUE], "over the database's limit"),
    ([1, OP_DELETE, b""], "empty key"),
    ([1, OP_INCR, "x" * 512, 1, 1], "over the database's limit"),
    ([1, OP_PUT, "k", b"\xc1"], "does not decode"),
    ([1, OP_PUT, "k", b"\x92\x01"], "does not decode"),  # an array cut short
    ([1, OP_PUT, "k", "not bytes"], "a value of type str"),
    ([1, OP_PUT, 5, VALUE], "a key of type int"),
    ([1, OP_INCR, "k", 1 << 64, 1], "64-bit"),
    ([1, OP_INCR, "k", 1, 2, 3], "wrong length"),
    ([0, OP_PUT, "k", VALUE], "bad LSN"),
    ([1, 99, "k"], "unknown operation"),
    ([1, OP_BATCH, []], "non-empty list"),
    ([1, OP_BATCH, [[OP_PUT, "", VALUE]]], "batch holding an empty key"),
], ids=lambda value: value if isinstance(value, str) else None)
def test_a_record_nothing_downstream_can_apply_is_refused_with_its_reason(
        record: list[Any], why: str) -> None:
    found = problem(record)
    assert found is not None and why in found
    assert frame_problem([record]) is not None


def test_the_key_limit_is_the_databases() -> None:
    record = [1, OP_PUT, "k" * 1000, VALUE]
    assert problem(record, max_key_size=511) is not None
    assert problem(record, max_key_size=2000) is None  # PostgreSQL's limit


def test_folding_leaves_the_state_of_the_prefix_and_the_increments_as_deltas() -> None:
    state: dict[Any, bytes | None] = {}
    deltas: dict[Any, int] = {}
    for record in ([1, OP_INCR, "n", 2, 2], [2, OP_PUT, "p", VALUE], [3, OP_INCR, "n", 3, 5],
                   [4, OP_BATCH, [[OP_DELETE, "p"], [OP_INCR, "m", 1, 1], [OP_PUT, "n", VALUE]]]):
        fold(state, record, deltas)
    assert state == {"n": VALUE, "p": None, "m": msgpack.packb(1)}
    assert deltas == {"m": 1}  # "n" was put after its increments: no longer a pure delta


def test_describe_spells_out_each_operation() -> None:
    described = describe([5, OP_BATCH, [[OP_PUT, "a", VALUE], [OP_INCR, "n", 2, 7]]])
    assert described.lsn == 5 and described.batch
    assert [(op.op, op.key, op.delta) for op in described.ops] == [("put", "a", None),
                                                                   ("incr", "n", 2)]
    assert described.ops[1].value == msgpack.packb(7)


# ---------------------------------------------- unusable records in a log, end to end

@pytest.mark.parametrize("record", [
    [2, OP_PUT, "", VALUE],
    [2, OP_PUT, "k" * 600, VALUE],
    [2, OP_PUT, "k", b"\xc1\xc1"],
], ids=["empty-key", "key-over-lmdb-limit", "undecodable-value"])
def test_opening_refuses_an_unusable_record_naming_segment_and_offset(
        tmp_path: Path, record: list[Any]) -> None:
    """Before, such a record (checksum right) made `open` raise a raw lmdb.BadValsizeError or
    left a value that failed every later read; `verify` called the directory fine."""
    directory = tmp_path / "cache"
    wbcache.open(directory).close()
    wal = directory / "wal"
    for old in wal.iterdir():
        old.unlink()
    first = frame([1, OP_PUT, "ok", VALUE])
    path = wal / segment_name(1)
    path.write_bytes(encode_header() + first + frame(record))
    with pytest.raises(CorruptLogError) as info:
        wbcache.open(directory)
    assert info.value.path == str(path)
    assert info.value.offset == len(encode_header()) + len(first)
    assert path.exists()  # nothing deleted


def _kept_by(action: Callable[[], None]) -> int:
    """Bytes still allocated after `action()` has returned: what a Packer it used would keep."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        action()
        return tracemalloc.get_traced_memory()[0] - before  # type: ignore[no-any-return]
    finally:
        tracemalloc.stop()


def _kept_after(encode: Callable[[], bytes], size: int) -> int:
    """Bytes still allocated after `encode()` (at least `size` bytes long) and its result are
    gone."""
    def action() -> None:
        assert len(encode()) > size
    return _kept_by(action)


def test_a_big_record_leaves_no_big_buffer_behind() -> None:
    """A Packer keeps the largest buffer it ever needed: a record of a 4 MiB value must not be
    packed by the shared one, or 4 MiB or more would stay allocated for good."""
    value = b"x" * (4 << 20)
    assert _kept_after(lambda: encode_put(1, "k", value), len(value)) < 1 << 20


@pytest.fixture
def pool(monkeypatch: pytest.MonkeyPatch) -> list[msgpack.Packer]:
    """The codec's pool of Packers, empty: a test that packs a big value must not find one an
    earlier test grew (reusing it allocates nothing, and `_kept_after` would see nothing)."""
    packers: list[msgpack.Packer] = []
    monkeypatch.setattr(codec, "_packers", packers)
    return packers


@pytest.mark.parametrize("value", [b"x" * (4 << 20), "x" * (4 << 20)], ids=["bytes", "str"])
def test_a_big_value_leaves_no_big_buffer_behind(value: str | bytes,
                                                 pool: list[msgpack.Packer]) -> None:
    """The same for the codec's shared Packer (wbcache/codec.py): a big str or bytes value is
    packed by a Packer of its own, which is not kept."""
    assert _kept_after(lambda: encode_value(value, 1 << 30), len(value)) < 1 << 20
    assert pool == []


@pytest.mark.parametrize("value", [[b"x" * (4 << 20)], {"k": "x" * (4 << 20)}],
                         ids=["list", "dict"])
def test_a_big_list_or_dict_leaves_no_big_buffer_behind(value: Any,
                                                        pool: list[msgpack.Packer]) -> None:
    """The same for the pool of Packers lists and dicts are packed with: one that needed a
    bigger buffer is not kept, and a small value's is."""
    assert _kept_after(lambda: encode_value(value, 1 << 30), 4 << 20) < 1 << 20
    assert pool == []
    encode_value({"small": [1, 2]}, 1 << 20)
    assert len(pool) == 1


def test_a_pack_that_fails_after_growing_its_buffer_keeps_no_packer(
        pool: list[msgpack.Packer]) -> None:
    """A Packer that fails part-way through a big list has already grown its buffer (to twice
    the 4 MiB here): it is dropped, not pooled, or that memory would stay allocated for good."""
    def action() -> None:
        with pytest.raises(TypeError, match="cannot be stored"):
            encode_value([b"x" * (4 << 20), object()], 1 << 30)
    assert _kept_by(action) < 1 << 20
    assert pool == []


class _Reentrant(dict):  # type: ignore[type-arg]
    """A dict whose `items()`, which msgpack calls for a dict subclass, runs `during` first."""

    during: Callable[[], None] = staticmethod(lambda: None)

    def items(self):  # type: ignore[no-untyped-def, override]
        type(self).during()
        return super().items()


def test_a_value_packed_while_another_is_being_packed_gets_its_own_packer() -> None:
    """Packing a list or dict may run Python code (here a dict subclass's `items()`), which may
    pack another value, in this thread or another one: with one shared Packer the two encodings
    would be spliced into each other's buffer."""
    inner = {"inner": list(range(40)), "s": "y" * 100}
    seen: list[bytes] = []
    outer = _Reentrant(outer="x" * 50, n=7)
    helpers: list[threading.Thread] = []
    try:
        _Reentrant.during = staticmethod(lambda: seen.append(encode_value(inner, 1 << 20)))
        encoded = encode_value([outer, "tail"], 1 << 20)
        assert msgpack.unpackb(encoded) == [{"outer": "x" * 50, "n": 7}, "tail"]
        assert [msgpack.unpackb(e) for e in seen] == [inner]

        done = threading.Event()
        other: list[bytes] = []

        def pack_in_another_thread() -> None:
            try:
                other.append(encode_value(inner, 1 << 20))
            finally:
                done.set()

        def during() -> None:  # the GIL is let go while this waits: the other thread packs
            helpers.append(threading.Thread(target=pack_in_another_thread))
            helpers[-1].start()
            assert done.wait(30)

        _Reentrant.during = staticmethod(during)
        encoded = encode_value([outer, "tail"], 1 << 20)
        assert msgpack.unpackb(encoded) == [{"outer": "x" * 50, "n": 7}, "tail"]
        assert [msgpack.unpackb(e) for e in other] == [inner]
    finally:
        _Reentrant.during = staticmethod(lambda: None)
        for helper in helpers:
            helper.join(30)


def test_the_pool_keeps_at_most_its_size(pool: list[msgpack.Packer],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Packs that overlap (here one inside another) each take a Packer of their own; when they
    give them back, no more than `_POOL_SIZE` are kept."""
    monkeypatch.setattr(codec, "_POOL_SIZE", 1)
    monkeypatch.setattr(_Reentrant, "during",
                        staticmethod(lambda: encode_value({"inner": 1}, 1 << 20)))
    assert msgpack.unpackb(encode_value([_Reentrant(outer=2)], 1 << 20)) == [{"outer": 2}]
    assert len(pool) == 1


def test_a_value_that_cannot_be_packed_leaves_the_next_encoding_whole(
        pool: list[msgpack.Packer]) -> None:
    """A pack that fails part-way leaves nothing behind for the next value: its Packer, whatever
    it holds, is not pooled (msgpack's Packers also empty themselves on an error)."""
    with pytest.raises(TypeError, match="cannot be stored"):
        encode_value({"a": "x" * 100, "b": object()}, 1 << 20)
    assert pool == []
    assert msgpack.unpackb(encode_value({"c": [1, 2]}, 1 << 20)) == {"c": [1, 2]}


_SPLICE_CHECK = """
import sys, threading, msgpack
from wbcache.codec import encode_value
from wbcache.wal.records import encode_put
assert msgpack.Packer.__module__ == "msgpack.fallback", msgpack.Packer.__module__
sys.setswitchinterval(1e-6)  # a thread switch between any two bytecodes, nearly
bad = []
checked = []
def decoded(encoded):
    try:
        return msgpack.unpackb(encoded)
    except Exception as exc:  # a spliced encoding: extra data, or too little
        return exc
def run(tag):
    for i in range(3000):
        value = f"{tag}-{i}"
        if decoded(encode_value(value, 1 << 20)) != value:
            bad.append(value)
        if decoded(encode_put(i, value, b"v")) != [i, 1, value, b"v"]:
            bad.append(("record", value))
    checked.append(tag)
threads = [threading.Thread(target=run, args=(t,)) for t in range(4)]
for t in threads: t.start()
for t in threads: t.join()
print(len(bad), len(checked), bad[:3])
"""


def test_the_pure_python_msgpack_gets_no_shared_packer() -> None:
    """The shared Packers (wbcache/codec.py, wal/records.py) are safe because the C Packer packs
    an immutable value or a record without running Python code. msgpack's pure-Python Packer
    (PyPy, MSGPACK_PUREPYTHON=1, an install without the C extension) is Python code: shared,
    two threads spliced their encodings into one buffer, and an immutable value is not decoded
    back before it reaches the log."""
    env = {**os.environ, "MSGPACK_PUREPYTHON": "1"}
    done = subprocess.run([sys.executable, "-c", _SPLICE_CHECK], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no thread died part-way
    assert done.stdout.split()[:2] == ["0", "4"], done.stdout  # none spliced, all 4 done


@pytest.mark.parametrize("size", [0, 1, 14, 15, 255, 256, 65535, 65536, 300_000])
def test_a_lone_record_is_framed_in_one_step_as_a_batch_of_one_is(size: int) -> None:
    """wal/format.py's `encode_one_frame` (the put's hot path) against the general framing,
    over record lengths on each side of the frame's and msgpack's boundaries."""
    from wbcache.wal.format import encode_frame, encode_one_frame, encode_records
    for record in (b"\x01" * size, encode_put(size, "k", b"v" * size)):
        assert encode_one_frame(record) == encode_frame(encode_records([record]))


@pytest.mark.parametrize("stored", [0, 1, -1, 127, 128, -33, 1 << 31, (1 << 63) - 1, -(1 << 63),
                                    (1 << 64) - 1, "x", {"a": 1}, None, 1.5, [1], b"\x05"])
def test_added_counts_a_stored_int_and_anything_else_from_zero(stored: object) -> None:
    base = stored if type(stored) is int else 0
    assert added(msgpack.packb(stored), 5) == min(max(base + 5, -(1 << 63)), (1 << 63) - 1)


def test_added_never_decodes_what_is_not_an_int(monkeypatch: pytest.MonkeyPatch) -> None:
    # A 16 MiB stored dict was decoded (100 MB of objects) to find it was not an int.
    decoded: list[bytes] = []
    real = msgpack.unpackb
    monkeypatch.setattr(msgpack, "unpackb", lambda data, **kw: decoded.append(data) or real(
        data, **kw))
    assert added(msgpack.packb({"big": "x" * 1000}), 2) == 2
    assert added(msgpack.packb(40), 2) == 42
    assert decoded == [msgpack.packb(40)]


def test_a_small_value_that_does_not_decode_is_refused_with_msgpacks_reason() -> None:
    # The C proof answers without a reason; a value up to 64 KiB is asked of msgpack too. A
    # larger one is not decoded (a crafted one can cost 100 times its size).
    assert problem([1, OP_PUT, "k", b"\x81\x80\x01"]) == (
        "a value that does not decode (TypeError: unhashable type: 'dict')")
    from wbcache.wal import records
    big = problem([1, OP_PUT, "k", b"\x81\x80\x01" + bytes(70_000)])
    assert big == "a value that does not decode" if records._decodes else big.startswith(
        "a value that does not decode (ExtraData")
