"""The reader's C fast path (wal/_walk.c) against the Python walk it accelerates.

The fast path is sound only if it never accepts a frame the Python walk would refuse, and
gives the very records and batches the Python walk gives; it is worth having only if it takes
the frames a writer really writes. So each test reads the same bytes both ways
(`reader._scan` set and None) and compares everything the walk yields and returns, or asks
the fast path alone whether it takes a value and checks that answer against
`msgpack.unpackb`, the decoder the Python walk (and everything downstream) uses.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest
from built_support import assert_fast_path
from hypothesis import given, settings
from hypothesis import strategies as st

from wbcache.wal import reader
from wbcache.wal.format import (
    MAX_FRAME_PAYLOAD,
    encode_frame,
    encode_header,
    encode_mark,
    encode_records,
)
from wbcache.wal.records import (
    OP_PUT,
    encode_batch,
    encode_delete,
    encode_incr,
    encode_put,
    incr_item,
    put_item,
)

FAST = reader._scan
needs_fast = pytest.mark.skipif(FAST is None, reason="covered by test_the_fast_path_is_built")


def test_the_fast_path_is_built() -> None:
    assert_fast_path(FAST, "wbcache.wal._walk", "wal/_walk.c",
                     "the log is read in Python alone, about 4x slower",
                     headers="the Python and zlib headers",
                     missing="is not built (or was built for another format)")


@contextmanager
def python_only() -> Iterator[None]:
    saved, reader._scan = reader._scan, None
    try:
        yield
    finally:
        reader._scan = saved


def walk(path: Path, *, max_key_size: int = 511, first_lsn: int = 1) -> tuple[Any, ...]:
    """Everything one walk of the segment yields and returns."""
    steps = reader.read_segment(str(path), first_lsn=first_lsn, is_last=True,
                                max_key_size=max_key_size)
    batches = []
    while True:
        try:
            batches.append(next(steps))
        except StopIteration as stop:
            end = stop.value
            break
    return (batches, end.records, end.end, end.last_lsn, end.torn_bytes, end.torn_reason,
            None if end.damage is None else str(end.damage), end.synced_to)


def both_ways(path: Path, **kwargs: Any) -> tuple[Any, ...]:
    """The walk's results, asserted equal with and without the fast path."""
    fast = walk(path, **kwargs)
    with python_only():
        slow = walk(path, **kwargs)
    assert fast == slow
    return fast


def taken(value: bytes, *, key: bytes = b"\xa1k", max_key_size: int = 511) -> bool:
    """Whether the fast path takes a one-put frame of `value` (a raw record, built by hand)."""
    record = b"\x94\x01\x01" + key + msgpack.packb(value)
    data = encode_frame(b"\x91" + record)
    records, end, _ = FAST(data, 0, len(data), 1, max_key_size, MAX_FRAME_PAYLOAD, 1024,
                           1 << 62)
    assert (end == len(data)) == bool(records)
    return bool(records)


def decodes(value: bytes) -> bool:
    try:
        msgpack.unpackb(value, strict_map_key=False)
    except Exception:
        return False
    return True


# ------------------------------------------------------------------ values, one by one

# Values a writer never writes, each of which the Python walk must judge: the fast path has to
# leave every undecodable one alone.
HOSTILE = {
    "empty": b"",
    "never-used type byte": b"\xc1",
    "two objects": b"\x01\x02",
    "array cut short": b"\x92\x01",
    "str of invalid UTF-8": b"\xa2\xff\xfe",
    "str holding a surrogate": b"\xa3\xed\xa0\x80",
    "str over U+10FFFF": b"\xa4\xf4\x90\x80\x80",
    "overlong UTF-8": b"\xa2\xc0\x80",
    "str8 longer than the value": b"\xd9\x10abc",
    "array32 of 4 billion": b"\xdd\xff\xff\xff\xff",
    "map16 short of pairs": b"\xde\x00\x05\x01\x01",
    "map with a list key": b"\x81\x90\x01",
    "map with a map key": b"\x81\x80\x01",
    "float64 cut short": b"\xcb\x00\x00",
    "ext cut short": b"\xd4\x01",
    "timestamp of a bad length": b"\xd5\xff\x00\x00",
    "timestamp64 of 10**9 nanoseconds": b"\xd7\xff" + (10**9 << 34 | 5).to_bytes(8, "big"),
    "timestamp96 of 10**9 nanoseconds": b"\xc7\x0c\xff" + (10**9).to_bytes(4, "big") + bytes(8),
    "ext8 cut short": b"\xc7\x05\x01ab",
    "ext of code -2": b"\xd4\xfe\x00",
    "ext8 of code -128": b"\xc7\x01\x80\x00",
    "nested past msgpack's limit": b"\x91" * 1100 + b"\x01",
    "nested one past msgpack's limit": b"\x91" * 1025 + b"\x01",
    "a list key deep inside": b"\x91" * 100 + b"\x81\x91\x01\x01",
    "bin cut short": b"\xc4\x05ab",
}
# Values that decode: every one is taken (`decodes` is exact; the ones marked False were left
# to Python before, which decoded them to check them: a crafted one cost 100x its size).
DECODABLE = {
    "int": (msgpack.packb(7), True),
    "negative int": (msgpack.packb(-(1 << 63)), True),
    "uint64": (msgpack.packb((1 << 64) - 1), True),
    "float": (msgpack.packb(1.5), True),
    "float32": (b"\xca\x3f\xc0\x00\x00", True),
    "nil, true, false": (msgpack.packb([None, True, False]), True),
    "ASCII str": (msgpack.packb("value"), True),
    "non-ASCII str": (msgpack.packb("é€😀"), True),
    "bin": (msgpack.packb(b"\x00\xff"), True),
    "dict": (msgpack.packb({"a": [1, 2, {"b": None}], "c": "d"}), True),
    "map with bin, int, float, nil keys": (msgpack.packb({b"b": 1, 2: 3, 1.5: 4, None: 5}), True),
    "map with a repeated key": (b"\x82\xa1a\x01\xa1a\x02", True),
    "str16 and array16": (msgpack.packb(["x" * 300] * 20), True),
    "nested 64 deep": (b"\x91" * 64 + b"\x01", True),
    "nested 65 deep": (b"\x91" * 65 + b"\x01", False),
    "nested 1024 deep, msgpack's limit": (b"\x91" * 1024 + b"\x01", False),
    "maps nested 1024 deep": (b"\x81\xc0" * 1023 + b"\x80", False),
    "timestamp": (msgpack.packb(msgpack.Timestamp(1, 2)), False),
    "timestamp32": (b"\xd6\xff\x00\x00\x00\x01", False),
    "timestamp96": (msgpack.packb(msgpack.Timestamp(-(1 << 40), 999_999_999)), False),
    "ext type": (msgpack.packb(msgpack.ExtType(5, b"abc")), False),
    "empty ext": (b"\xc7\x00\x05", False),
    "ext32": (msgpack.packb(msgpack.ExtType(5, b"x" * 70_000)), False),
    "map with ext keys": (msgpack.packb({msgpack.ExtType(1, b"k"): 1,
                                         msgpack.Timestamp(1, 0): 2}), False),
}


@needs_fast
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_value_that_does_not_decode_is_left_to_the_python_walk(name: str,
                                                                 tmp_path: Path) -> None:
    value = HOSTILE[name]
    assert not decodes(value)
    assert not taken(value)
    path = tmp_path / "segment"
    path.write_bytes(encode_header() + encode_frame(encode_records(
        [encode_put(1, "k", msgpack.packb(1)), encode_put(2, "k", value)])))
    results = both_ways(path)
    assert results[0] == [] and "does not decode" in results[6]


@needs_fast
@pytest.mark.parametrize("name", sorted(DECODABLE))
def test_a_value_that_decodes_is_taken(name: str, tmp_path: Path) -> None:
    value, _ = DECODABLE[name]
    assert decodes(value)
    assert taken(value)
    path = tmp_path / "segment"
    path.write_bytes(encode_header() + encode_frame(encode_records(
        [encode_put(1, "k", value)])))
    assert both_ways(path)[0] == [[[1, OP_PUT, "k", value]]]


@needs_fast
def test_every_value_of_one_or_two_bytes_is_taken_exactly_when_it_decodes() -> None:
    values = [bytes([a]) for a in range(256)] + [bytes(pair) for pair in
                                                  itertools.product(range(256), repeat=2)]
    wrong = [value for value in values if taken(value) != decodes(value)]
    assert wrong == []


@needs_fast
def test_the_codecs_proof_is_the_walks() -> None:
    """`decodes` (what wbcache/codec.py asks before it logs a mutable value) answers as the
    walk's own check of a value, on every value above."""
    from wbcache.wal._walk import decodes as proves
    values = [*HOSTILE.values(), *(value for value, _ in DECODABLE.values()),
              *(bytes(pair) for pair in itertools.product(range(256), repeat=2))]
    assert [value for value in values if proves(value) != taken(value)] == []
    assert proves(memoryview(msgpack.packb({"a": 1})))  # any bytes-like object


# Any msgpack object the user can store, as the codec would encode it.
leaves = (st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1)
          | st.floats(allow_nan=False) | st.text(max_size=20) | st.binary(max_size=20)
          | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=20))
          | st.builds(msgpack.Timestamp, st.integers(-(1 << 63), (1 << 63) - 1),
                      st.integers(0, 999_999_999)))
keys = st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(max_size=5) | st.binary(
    max_size=5)
objects = st.recursive(leaves, lambda inner: st.lists(inner, max_size=5)
                       | st.dictionaries(keys, inner, max_size=5), max_leaves=12)


@needs_fast
@settings(max_examples=100, deadline=None)
@given(objects)
def test_any_value_a_user_can_store_is_taken(value: Any) -> None:
    assert taken(msgpack.packb(value))


@needs_fast
@settings(max_examples=300, deadline=None)
@given(st.integers(-128, 127), st.integers(0, 20), st.data())
def test_an_ext_value_of_any_code_and_length_is_taken_exactly_when_it_decodes(
        code: int, length: int, data: st.DataObject) -> None:
    head = {1: b"\xd4", 2: b"\xd5", 4: b"\xd6", 8: b"\xd7", 16: b"\xd8"}.get(length)
    body = data.draw(st.binary(min_size=length, max_size=length))
    value = (head if head else b"\xc7" + bytes([length])) + code.to_bytes(1, "big",
                                                                         signed=True) + body
    assert taken(value) == decodes(value)


@needs_fast
@settings(max_examples=300, deadline=None)
@given(objects, st.data())
def test_a_damaged_value_is_taken_only_if_it_still_decodes(value: Any, data: st.DataObject
                                                           ) -> None:
    packed = bytearray(msgpack.packb(value))
    how = data.draw(st.sampled_from(["flip", "cut", "append", "insert"]))
    at = data.draw(st.integers(0, len(packed) - 1))
    byte = data.draw(st.integers(0, 255))
    if how == "flip":
        packed[at] = byte
    elif how == "cut":
        del packed[at:]
    elif how == "append":
        packed.append(byte)
    else:
        packed.insert(at, byte)
    assert taken(bytes(packed)) == decodes(bytes(packed))  # the proof is exact


# ------------------------------------------------------------------ records and frames

def raw_frame(records: list[bytes]) -> bytes:
    return encode_frame(encode_records(records))


# Frames a writer never writes: a right checksum over records that are not plain puts the
# Python walk accepts as they are.
RECORDS = {
    "LSN 0": b"\x94\x00\x01\xa1k\xc4\x01\x01",
    "LSN out of order": b"\x94\x05\x01\xa1k\xc4\x01\x01",
    "LSN as int8": b"\x94\xd0\x01\x01\xa1k\xc4\x01\x01",
    "op as true": b"\x94\x01\xc3\xa1k\xc4\x01\x01",
    "op as 1.0": b"\x94\x01\xcb" + msgpack.packb(1.0)[1:] + b"\xa1k\xc4\x01\x01",
    "op 2 with a value": b"\x94\x01\x02\xa1k\xc4\x01\x01",
    "empty key": b"\x94\x01\x01\xa0\xc4\x01\x01",
    "int key": b"\x94\x01\x01\x05\xc4\x01\x01",
    "key of invalid UTF-8": b"\x94\x01\x01\xa1\xff\xc4\x01\x01",
    "value as str": b"\x94\x01\x01\xa1k\xa1\x01",
    "value as str8": b"\x94\x01\x01\xa1k\xd9\x01\x01",
    "five fields": b"\x95\x01\x01\xa1k\xc4\x01\x01\x01",
    "three fields": b"\x93\x01\x01\xa1k",
    "array16 record": b"\xdc\x00\x04\x01\x01\xa1k\xc4\x01\x01",
}


@needs_fast
@pytest.mark.parametrize("name", sorted(RECORDS))
def test_a_record_that_is_not_a_plain_put_is_left_to_the_python_walk(name: str,
                                                                     tmp_path: Path) -> None:
    frame = raw_frame([RECORDS[name]])
    assert FAST(frame, 0, len(frame), 1, 511, MAX_FRAME_PAYLOAD, 1024, 1 << 62)[0] == []
    # After a good frame, with its LSN (where it has a plain one) moved on to 2:
    second = raw_frame([RECORDS[name].replace(b"\x94\x01", b"\x94\x02", 1)])
    path = tmp_path / "segment"
    path.write_bytes(encode_header() + raw_frame([encode_put(1, "k", msgpack.packb(1))])
                     + second)
    results = both_ways(path)
    # Judged as the record it is (op true and op 1.0 compare equal to 1 in Python: taken
    # there), never as a torn tail.
    assert results[4] == 0 and results[1] == (2 if name.startswith("op as") else 1)


PUT = encode_put(1, "k", msgpack.packb(1))
# Frame payloads of a right checksum that are not one array of records, consumed exactly.
PAYLOADS = {
    "trailing byte": b"\x91" + PUT + b"\x00",
    "empty array": b"\x90",
    "empty array16": b"\xdc\x00\x00",
    "array claiming two records": b"\x92" + PUT,
    "a map": b"\x81" + PUT + b"\x01",
    "a bare record": PUT,
}


@needs_fast
@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_a_payload_that_is_not_one_array_of_records_is_left_to_the_python_walk(
        name: str, tmp_path: Path) -> None:
    # Frames of LSN 1 and 2 follow: whether or not the bad frame held LSN 1, a fast path that
    # took it would go on taking records.
    data = encode_frame(PAYLOADS[name]) + b"".join(
        raw_frame([encode_put(lsn, "k", msgpack.packb(lsn))]) for lsn in (1, 2))
    assert FAST(data, 0, len(data), 1, 511, MAX_FRAME_PAYLOAD, 1024, 1 << 62)[0] == []
    path = tmp_path / "segment"
    path.write_bytes(encode_header() + data)
    assert both_ways(path)[6] is not None


@needs_fast
@pytest.mark.parametrize("limit", [1, 2, 3, 4, 511])
def test_the_key_limit_counts_utf8_bytes_on_both_paths(limit: int, tmp_path: Path) -> None:
    keys: list[str | bytes] = ["a", "é", "€", "😀", b"\x00\x01\x02", "aaaa", "s" * 40,
                               b"b" * 300]
    path = tmp_path / "segment"
    path.write_bytes(encode_header() + b"".join(
        raw_frame([encode_put(lsn, key, msgpack.packb(lsn))])
        for lsn, key in enumerate(keys, start=1)))
    results = both_ways(path, max_key_size=limit)
    read = {1: 1, 2: 2, 3: 3, 4: 6, 511: 8}[limit]  # up to the first key over the limit
    assert [record[2] for batch in results[0] for record in batch] == keys[:read]


@needs_fast
def test_frames_that_are_not_plain_puts_and_damage_are_judged_the_same(tmp_path: Path) -> None:
    """A segment mixing everything a writer writes, and damage of every kind, read both ways:
    the same batches, the same end, the same judgement."""
    rng = random.Random(20261203)
    for trial in range(300):
        lsn, parts, marks = 1, [], rng.random() < 0.3
        for _ in range(rng.randint(1, 12)):
            kind = rng.choice(["put", "puts", "delete", "incr", "batch", "mark", "junk",
                               "bad-crc", "hostile"])
            if kind == "put":
                parts.append(raw_frame([encode_put(lsn, f"k{lsn}", msgpack.packb(
                    {"n": lsn, "s": "é" * rng.randint(0, 3)}))]))
                lsn += 1
            elif kind == "puts":
                count = rng.randint(2, 40)
                parts.append(raw_frame([encode_put(lsn + i, rng.choice(["k", b"k", "ключ"]),
                                                   msgpack.packb([i] * rng.randint(0, 3)))
                                        for i in range(count)]))
                lsn += count
            elif kind == "delete":
                parts.append(raw_frame([encode_delete(lsn, "k")]))
                lsn += 1
            elif kind == "incr":
                parts.append(raw_frame([encode_incr(lsn, "c", 1, lsn)]))
                lsn += 1
            elif kind == "batch":
                parts.append(raw_frame([encode_batch(lsn, [put_item("a", msgpack.packb(1)),
                                                           incr_item("c", 2, 3)])]))
                lsn += 1
            elif kind == "mark":
                parts.append(encode_mark(len(encode_header(sync_marks=marks))
                                         + sum(map(len, parts))))
            elif kind == "junk":
                parts.append(bytes(rng.randrange(256) for _ in range(rng.randint(1, 30))))
            elif kind == "bad-crc":
                frame = bytearray(raw_frame([encode_put(lsn, "k", msgpack.packb(1))]))
                frame[rng.randrange(len(frame))] ^= 1 << rng.randrange(8)
                parts.append(bytes(frame))
                lsn += 1
            else:
                parts.append(raw_frame([encode_put(lsn, "k", rng.choice(list(HOSTILE.values())))]))
                lsn += 1
        data = encode_header(sync_marks=marks) + b"".join(parts)
        if rng.random() < 0.3:
            data = data[:rng.randint(len(encode_header()), len(data))]
        path = tmp_path / f"segment-{trial}"
        path.write_bytes(data)
        both_ways(path)


@needs_fast
def test_batches_end_where_the_python_walk_ends_them(tmp_path: Path) -> None:
    """Over 1,024 records and over 8 MiB of values, in frames of one and of many records:
    the batches (and so the pages released) are the same both ways."""
    big = msgpack.packb(b"x" * (300 * 1024))
    small = [raw_frame([encode_put(lsn, "k", msgpack.packb(lsn))]) for lsn in range(1, 3001)]
    many = [raw_frame([encode_put(lsn + i, "k", msgpack.packb(i)) for i in range(100)])
            for lsn in range(3001, 6001, 100)]
    large = [raw_frame([encode_put(lsn, "k", big)]) for lsn in range(6001, 6061)]
    path = tmp_path / "segment"
    path.write_bytes(encode_header() + b"".join(small + many + large))
    batches = both_ways(path)[0]
    assert sum(map(len, batches)) == 6060 and len(batches) >= 8


@needs_fast
def test_the_fast_path_stops_at_a_mark_and_at_the_end_of_what_it_is_given() -> None:
    frames = [raw_frame([encode_put(lsn, "k", msgpack.packb(lsn))]) for lsn in (1, 2, 3)]
    data = frames[0] + encode_mark(10) + frames[1] + frames[2]
    records, end, expected = FAST(data, 0, len(data), 1, 511, MAX_FRAME_PAYLOAD, 1024, 1 << 62)
    assert [record[0] for record in records] == [1] and end == len(frames[0]) and expected == 2
    at = len(frames[0]) + len(encode_mark(10))
    records, end, expected = FAST(data, at, len(data), 2, 511, MAX_FRAME_PAYLOAD, 1, 1 << 62)
    assert [record[0] for record in records] == [2] and expected == 3  # max_records
    records, end, _ = FAST(data, at, len(data) - 1, 2, 511, MAX_FRAME_PAYLOAD, 1024, 1 << 62)
    assert end == len(data) - len(frames[2])  # the last frame is cut off at `size`


@needs_fast
@pytest.mark.parametrize("first_lsn", [(1 << 64) - 1, (1 << 64) + 1, 1 << 70])
def test_lsns_at_the_end_of_a_uint64_are_left_to_the_python_walk(first_lsn: int,
                                                                 tmp_path: Path) -> None:
    """A segment named for an LSN a uint64 cannot count past (a planted or damaged name): the
    fast path must neither wrap the LSN around nor read it modulo 2**64."""
    records = [encode_put((1 << 64) - 1, "k", msgpack.packb(1)),
               encode_put(0, "k", msgpack.packb(2)), encode_put(1, "k", msgpack.packb(3))]
    path = tmp_path / "segment"
    path.write_bytes(encode_header() + raw_frame(records[:2]) + raw_frame(records[:1])
                     + raw_frame(records[2:]))
    both_ways(path, first_lsn=first_lsn)
    path.write_bytes(encode_header() + raw_frame(records[:1]))  # the last LSN a uint64 holds
    both_ways(path, first_lsn=first_lsn)
    for data in (raw_frame(records[:1]), raw_frame(records[2:])):
        assert FAST(data, 0, len(data), first_lsn, 511, MAX_FRAME_PAYLOAD, 1024, 1 << 62)[0] == []


@needs_fast
def test_arguments_out_of_range_make_the_fast_path_take_nothing() -> None:
    data = raw_frame([encode_put(1, "k" * 600, msgpack.packb(1))])
    for expected, max_key_size in [(-1, 511), ((1 << 64) + 1, 511), (1, -1), (1, 1 << 64)]:
        records, end, after = FAST(data, 0, len(data), expected, max_key_size,
                                   MAX_FRAME_PAYLOAD, 1024, 1 << 62)
        assert (records, end, after) == ([], 0, expected)


@needs_fast
@pytest.mark.parametrize("lsn", [1, 127, 128, 255, 256, 65_535, 65_536, 1 << 32, 1 << 63])
def test_puts_are_taken_whatever_the_width_of_their_lsn(lsn: int) -> None:
    """The fast path's quick refusal reads past the LSN: a put of any LSN width must pass it
    (a regression here would not be wrong, only silently slow)."""
    data = raw_frame([encode_put(lsn, "k", msgpack.packb(lsn))]) + raw_frame(
        [encode_put(lsn + 1, b"k", msgpack.packb({"n": lsn}))])
    records, end, expected = FAST(data, 0, len(data), lsn, 511, MAX_FRAME_PAYLOAD, 1024,
                                  1 << 62)
    assert [record[0] for record in records] == [lsn, lsn + 1]
    assert (end, expected) == (len(data), lsn + 2)
