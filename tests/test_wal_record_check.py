"""wal/_walk.c's check of a frame's records (`unusable`) against records.py's judgement by
decoding, which it stands in for where it is built.

`records.read_frame` asks the check first: a frame it passes is decoded and taken without
`frame_problem`, and only the first record it does not pass is decoded, to say why. So the
check must take exactly the frames `frame_problem` takes, records and all, and point at the
record `frame_problem` would name. Each test reads the same payload both ways (the check
there and `records._unusable` None), over records encoded every way msgpack allows (an int
as a fixint or an int64, op codes as true or 1.0, which Python's == takes), damaged or not.
Given the LSN the frame must start at, the check also finds the first record out of sequence
(the walker's rule: consecutive LSNs, a batch taking one), where every record is usable.

Over 500 lines (some 530): the records' shapes and their LSN order are judged by one pass of
one check, whose cases (and the strategies that build them) must be read together.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wbcache.recovery import walk_log
from wbcache.recovery.verify import survey_log
from wbcache.wal import records
from wbcache.wal.format import encode_frame, encode_header
from wbcache.wal.records import OP_BATCH, OP_DELETE, OP_INCR, OP_PUT, frame_lsns, read_frame
from wbcache.wal.segments import segment_name

needs_check = pytest.mark.skipif(records._unusable is None,
                                 reason="wal/_walk.c is not built (tests/test_wal_fastpath.py)")
Draw = Callable[[st.SearchStrategy[Any]], Any]


@contextmanager
def decoding_only() -> Iterator[None]:
    saved, records._unusable = records._unusable, None
    try:
        yield
    finally:
        records._unusable = saved


def both_ways(payload: bytes, max_key_size: int = 511, expected: int | None = None
              ) -> tuple[Any, Any]:
    """What `read_frame` returns with the check and without, the check asserted to take the
    payload exactly when decoding does (a stricter check is never wrong, only costly)."""
    checked = read_frame(payload, max_key_size, expected)
    with decoding_only():
        decoded = read_frame(payload, max_key_size, expected)
    assert ((records._unusable(payload, max_key_size, 1 << 16, expected) is None)
            == (decoded[1] is None))
    return checked, decoded


# ------------------------------------------------------------------ every encoding

_INTS = [(0xcc, ">B", 0, 255), (0xcd, ">H", 0, 65535), (0xce, ">I", 0, 2**32 - 1),
         (0xcf, ">Q", 0, 2**64 - 1), (0xd0, ">b", -128, 127), (0xd1, ">h", -2**15, 2**15 - 1),
         (0xd2, ">i", -2**31, 2**31 - 1), (0xd3, ">q", -2**63, 2**63 - 1)]


def an_int(draw: Draw, value: int) -> bytes:
    forms = [bytes([code]) + struct.pack(form, value)
             for code, form, low, high in _INTS if low <= value <= high]
    if 0 <= value <= 127 or -32 <= value < 0:
        forms.append(struct.pack(">b" if value < 0 else ">B", value))
    return draw(st.sampled_from(forms))  # type: ignore[no-any-return]


def a_float(draw: Draw, value: float) -> bytes:
    forms = [b"\xcb" + struct.pack(">d", value)]
    if struct.unpack(">f", struct.pack(">f", value))[0] == value:
        forms.append(b"\xca" + struct.pack(">f", value))
    return draw(st.sampled_from(forms))  # type: ignore[no-any-return]


def a_str(draw: Draw, text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text  # bytes: maybe not UTF-8
    forms = [b"\xd9" + struct.pack(">B", len(data))] if len(data) < 256 else []
    forms += [b"\xda" + struct.pack(">H", len(data)), b"\xdb" + struct.pack(">I", len(data))]
    if len(data) < 32:
        forms.append(bytes([0xa0 | len(data)]))
    return draw(st.sampled_from(forms)) + data  # type: ignore[no-any-return]


def a_bin(draw: Draw, data: bytes) -> bytes:
    forms = [b"\xc5" + struct.pack(">H", len(data)), b"\xc6" + struct.pack(">I", len(data))]
    if len(data) < 256:
        forms.append(b"\xc4" + struct.pack(">B", len(data)))
    return draw(st.sampled_from(forms)) + data  # type: ignore[no-any-return]


def an_array(draw: Draw, items: list[bytes]) -> bytes:
    forms = [b"\xdc" + struct.pack(">H", len(items)), b"\xdd" + struct.pack(">I", len(items))]
    if len(items) < 16:
        forms.append(bytes([0x90 | len(items)]))
    return draw(st.sampled_from(forms)) + b"".join(items)  # type: ignore[no-any-return]


# ------------------------------------------------------------------ records, mostly usable

def other(draw: Draw) -> bytes:
    """An object of a type no field takes (or of the wrong value)."""
    return draw(st.sampled_from([  # type: ignore[no-any-return]
        b"\xc0", b"\xc2", b"\xc3", b"\x90", b"\x91\x01", b"\x80", b"\x81\xa1k\x01",
        b"\xd4\x01\x00", b"\xd6\xff\x00\x00\x00\x01", b"\xca\x3f\xc0\x00\x00", b"\xa11",
        b"\xc4\x01\x01", b"\x91" * 70 + b"\x01", b"\xc1"]))


def an_lsn(draw: Draw, lsn: int) -> bytes:
    if draw(st.booleans()):
        return an_int(draw, lsn)
    return draw(st.sampled_from([  # type: ignore[no-any-return]
        an_int(draw, draw(st.sampled_from([lsn, 0, -1, 2**63, 2**64 - 1]))),
        a_float(draw, float(lsn)), other(draw)]))


def an_op(draw: Draw, code: int) -> bytes:
    """`code` as an int, a float or (1) true, which Python's == takes; or something else."""
    forms = [an_int(draw, code), a_float(draw, float(code))] + ([b"\xc3"] * (code == 1))
    if draw(st.integers(0, 9)):
        return draw(st.sampled_from(forms))  # type: ignore[no-any-return]
    return draw(st.sampled_from([  # type: ignore[no-any-return]
        an_int(draw, draw(st.sampled_from([0, 5, -1, 2**64 - 1]))),
        a_float(draw, draw(st.sampled_from([1.5, 4.000001, float("nan"), 0.0]))), other(draw)]))


def a_key(draw: Draw, max_key_size: int) -> bytes:
    text = draw(st.sampled_from(["k", "é", "😀", "€" * 3, "a" * max_key_size,
                                 "a" * (max_key_size + 1), "é" * (max_key_size // 2 + 1), ""]))
    choice = draw(st.integers(0, 9))
    if choice < 5:
        return a_str(draw, text)
    if choice < 9:
        return a_bin(draw, text.encode())
    return draw(st.sampled_from([  # type: ignore[no-any-return]
        a_str(draw, b"\xff\xfe"), a_str(draw, b"\xed\xa0\x80"), an_int(draw, 5), other(draw)]))


def a_value(draw: Draw) -> bytes:
    if draw(st.integers(0, 4)):
        return a_bin(draw, draw(st.sampled_from([
            msgpack.packb(1), msgpack.packb({"a": [1, 2.5]}), b"\xc0", msgpack.packb("é"),
            b"\x91" * 100 + b"\x01"])))
    return draw(st.sampled_from([  # type: ignore[no-any-return]
        a_bin(draw, b"\xc1"), a_bin(draw, b""), a_bin(draw, b"\x01\x02"),
        a_bin(draw, b"\x81\x90\x01"), a_bin(draw, b"\x91" * 1025 + b"\x01"), a_str(draw, "v"),
        other(draw)]))


def a_number(draw: Draw) -> bytes:
    """An increment's delta or result: a 64-bit int, mostly."""
    if draw(st.integers(0, 5)):
        return an_int(draw, draw(st.sampled_from([0, 1, -1, 300, 2**63 - 1, -2**63])))
    return draw(st.sampled_from([  # type: ignore[no-any-return]
        an_int(draw, draw(st.sampled_from([2**63, 2**64 - 1]))), a_float(draw, 1.0),
        other(draw)]))


def an_operation(draw: Draw, max_key_size: int) -> list[bytes]:
    """The fields of an operation, op code first: sometimes one short or one over."""
    code = draw(st.sampled_from([OP_PUT, OP_DELETE, OP_INCR]))
    fields = [an_op(draw, code), a_key(draw, max_key_size)]
    fields += {OP_PUT: lambda: [a_value(draw)], OP_DELETE: lambda: [],
               OP_INCR: lambda: [a_number(draw), a_number(draw)]}[code]()
    change = draw(st.integers(0, 19))
    if change == 0:
        fields.pop()
    elif change == 1:
        fields.append(an_int(draw, 1))
    return fields


@st.composite
def a_record(draw: Draw, lsn: int, max_key_size: int) -> bytes:
    kind = draw(st.integers(0, 19))
    if kind == 0:  # not a record at all
        return other(draw)
    if kind > 6:
        return an_array(draw, [an_lsn(draw, lsn), *an_operation(draw, max_key_size)])
    items = [other(draw) if draw(st.integers(0, 19)) == 0
             else an_array(draw, an_operation(draw, max_key_size))
             for _ in range(draw(st.sampled_from([1, 1, 2, 3, 0])))]
    fields = [an_lsn(draw, lsn), an_op(draw, OP_BATCH), an_array(draw, items)]
    if draw(st.integers(0, 19)) == 0:
        fields.append(an_int(draw, 1))
    return an_array(draw, fields)


@st.composite
def a_frame(draw: Draw, max_key_size: int, count: int) -> bytes:
    payload = an_array(draw, [draw(a_record(lsn, max_key_size))
                              for lsn in range(1, count + 1)])
    return payload + draw(st.sampled_from([b""] * 9 + [b"\x00", b"\xc1", b"\x91"]))


LIMITS = st.sampled_from([511, 511, 1, 3, 2000])
# The LSN a frame must start at (None: not asked); a_frame's records mostly start at 1.
STARTS = st.sampled_from([None, None, 1, 1, 1, 2, 0, 2**64 + 1])


# ------------------------------------------------------------------ the tests

@needs_check
@settings(max_examples=800, deadline=None)
@given(st.tuples(LIMITS, st.integers(1, 3)).flatmap(
    lambda case: st.tuples(st.just(case[0]), a_frame(*case))), STARTS)
def test_a_frame_is_judged_as_decoding_judges_it(case: tuple[int, bytes],
                                                 expected: int | None) -> None:
    max_key_size, payload = case
    checked, decoded = both_ways(payload, max_key_size, expected)
    assert checked[0] == decoded[0] and (checked[1] is None) == (decoded[1] is None)
    if checked[1] != decoded[1]:
        # The first record (or batch operation) that is not usable is named, where decoding
        # the whole frame first failed on bytes after it.
        assert decoded[1].startswith("undecodable frame")


@needs_check
@settings(max_examples=400, deadline=None)
@given(LIMITS.flatmap(lambda limit: st.tuples(st.just(limit), a_frame(limit, 2))),
       STARTS, st.data())
def test_a_damaged_frame_is_taken_exactly_when_decoding_takes_it(
        case: tuple[int, bytes], expected: int | None, data: st.DataObject) -> None:
    max_key_size, payload = case
    damaged = bytearray(payload)
    at = data.draw(st.integers(0, len(damaged) - 1))
    how = data.draw(st.sampled_from(["flip", "cut", "insert"]))
    if how == "flip":
        damaged[at] = data.draw(st.integers(0, 255))
    elif how == "cut":
        del damaged[at + 1:]
    else:
        damaged.insert(at, data.draw(st.integers(0, 255)))
    checked, decoded = both_ways(bytes(damaged), max_key_size, expected)
    assert checked[0] == decoded[0] and (checked[1] is None) == (decoded[1] is None)


def _record(fields: bytes, count: int = 4) -> bytes:
    return bytes([0x90 | count]) + fields


_ONE = b"\xc4\x01\x01"  # a value: the msgpack encoding of 1
_DOUBLE = b"\xcb" + struct.pack(">d", 1.0)
# One record each, at the edge of a rule of records.py's `problem`.
CORNERS = {
    "put": msgpack.packb([1, OP_PUT, "k", msgpack.packb(1)]),
    "delete": msgpack.packb([1, OP_DELETE, b"k"]),
    "increment": msgpack.packb([1, OP_INCR, "k", -(2**63), 2**63 - 1]),
    "batch": msgpack.packb([1, OP_BATCH, [[OP_PUT, "a", _ONE[2:]], [OP_DELETE, "b"],
                                          [OP_INCR, "c", 1, 1]]]),
    "op true": _record(b"\x01\xc3\xa1k" + _ONE),
    "op false": _record(b"\x01\xc2\xa1k" + _ONE),
    "op 1.0": _record(b"\x01" + _DOUBLE + b"\xa1k" + _ONE),
    "op 1.0 as float32": _record(b"\x01\xca\x3f\x80\x00\x00\xa1k" + _ONE),
    "op 1.5": _record(b"\x01\xcb" + struct.pack(">d", 1.5) + b"\xa1k" + _ONE),
    "op 2 as int8": _record(b"\x01\xd0\x02\xa1k", 3),
    "op 2 as uint64": _record(b"\x01\xcf" + (2).to_bytes(8, "big") + b"\xa1k", 3),
    "op 4.0": _record(b"\x01\xcb" + struct.pack(">d", 4.0) + b"\x91\x92\x02\xa1k", 3),
    "op 4 of an operation": msgpack.packb([1, OP_BATCH, [[OP_BATCH, "k"]]]),
    "op 5": msgpack.packb([1, 5, "k"]),
    "LSN as int8": _record(b"\xd0\x01\x02\xa1k", 3),
    "LSN as int64": _record(b"\xd3" + (1).to_bytes(8, "big") + b"\x02\xa1k", 3),
    "LSN 2**64 - 1": msgpack.packb([2**64 - 1, OP_DELETE, "k"]),
    "LSN 0": msgpack.packb([0, OP_DELETE, "k"]),
    "LSN -1": msgpack.packb([-1, OP_DELETE, "k"]),
    "LSN -1 as int8": _record(b"\xd0\xff\x02\xa1k", 3),
    "LSN int64 min": msgpack.packb([-(2**63), OP_DELETE, "k"]),
    "LSN true": _record(b"\xc3\x02\xa1k", 3),
    "LSN 1.0": _record(_DOUBLE + b"\x02\xa1k", 3),
    "delta 2**63": msgpack.packb([1, OP_INCR, "k", 2**63, 1]),
    "result 2**64 - 1": msgpack.packb([1, OP_INCR, "k", 1, 2**64 - 1]),
    "delta -1 as int16": _record(b"\x01\x03\xa1k\xd1\xff\xff\x01", 5),
    "delta true": _record(b"\x01\x03\xa1k\xc3\x01", 5),
    "result 1.0": _record(b"\x01\x03\xa1k\x01" + _DOUBLE, 5),
    "empty batch": msgpack.packb([1, OP_BATCH, []]),
    "batch of an operation of one field": msgpack.packb([1, OP_BATCH, [[OP_DELETE]]]),
    "batch of an empty operation": msgpack.packb([1, OP_BATCH, [[]]]),
    "batch of a delete of three fields": msgpack.packb([1, OP_BATCH, [[OP_DELETE, "k", 1]]]),
    "batch of four fields": msgpack.packb([1, OP_BATCH, [[OP_DELETE, "k"]], 1]),
    "batch of a map": _record(b"\x01\x04\x81\x01\x02", 3),
    "key of 511 bytes": msgpack.packb([1, OP_DELETE, "a" * 511]),
    "key of 512 bytes": msgpack.packb([1, OP_DELETE, "a" * 512]),
    "key of 255 é and an a": msgpack.packb([1, OP_DELETE, "é" * 255 + "a"]),
    "key of 256 é": msgpack.packb([1, OP_DELETE, "é" * 256]),
    "bin key of 512 bytes": msgpack.packb([1, OP_DELETE, b"a" * 512]),
    "key of invalid UTF-8": _record(b"\x01\x02\xa2\xff\xfe", 3),
    "key holding a surrogate": _record(b"\x01\x02\xa3\xed\xa0\x80", 3),
    "empty key": msgpack.packb([1, OP_DELETE, ""]),
    "empty bin key": msgpack.packb([1, OP_DELETE, b""]),
    "int key": msgpack.packb([1, OP_DELETE, 5]),
    "nil key": msgpack.packb([1, OP_DELETE, None]),
    "value as str": msgpack.packb([1, OP_PUT, "k", "v"]),
    "value that does not decode": msgpack.packb([1, OP_PUT, "k", b"\xc1"]),
    "empty value": msgpack.packb([1, OP_PUT, "k", b""]),
    "value nested past msgpack's limit": msgpack.packb([1, OP_PUT, "k", b"\x91" * 1025 + b"\x01"]),
    "put of five fields": msgpack.packb([1, OP_PUT, "k", _ONE[2:], 1]),
    "delete of four fields": msgpack.packb([1, OP_DELETE, "k", 1]),
    "increment of four fields": msgpack.packb([1, OP_INCR, "k", 1]),
    "record of two fields": msgpack.packb([1, OP_DELETE]),
    "record of nil": b"\xc0",
    "record holding a map": msgpack.packb([1, OP_DELETE, {"k": 1}]),
    "record holding an ext": msgpack.packb([1, OP_DELETE, msgpack.ExtType(1, b"k")]),
    "record holding a Timestamp": msgpack.packb([1, OP_DELETE, msgpack.Timestamp(1, 0)]),
}


@needs_check
@pytest.mark.parametrize("name", sorted(CORNERS))
def test_a_record_at_the_edge_of_a_rule_is_judged_as_decoding_judges_it(name: str) -> None:
    for payload in (b"\x91" + CORNERS[name], b"\x92" + CORNERS["put"] + CORNERS[name]):
        checked, decoded = both_ways(payload)
        assert checked == decoded


@needs_check
@pytest.mark.parametrize("record", [
    [1, OP_BATCH, [[OP_DELETE, "k"]], [2, OP_DELETE, "k"]],
    [1, OP_BATCH, [[OP_DELETE, "k", [2, OP_DELETE, "k"]]]],
    [1, OP_DELETE, "k", [2, OP_DELETE, "k"]],
    [1, OP_PUT, "k", _ONE[2:], [2, OP_DELETE, "k"]],
    [1, OP_INCR, "k", 1, 1, [2, OP_DELETE, "k"]],
], ids=["batch", "batch operation", "delete", "put", "increment"])
def test_a_field_too_many_is_never_read_as_the_next_record(record: list[Any]) -> None:
    """A record holding a usable record after the fields it should end with, in an array
    claiming two records: a check that stopped at the last field it expects would read the
    one after as the frame's next record and take a frame that does not even decode."""
    checked, decoded = both_ways(b"\x92" + msgpack.packb(record))
    assert checked[1] is not None and decoded[1] is not None


@needs_check
@pytest.mark.parametrize("payload", [
    b"\x90", b"\xdc\x00\x00", b"\x01", b"\xa1k", b"\x81\x01\x02", b"\xd4\x01\x00",
    b"\xdd\xff\xff\xff\xff", b"\x92" + msgpack.packb([1, OP_DELETE, "k"]),
    b"\x91" + msgpack.packb([1, OP_DELETE, "k"]) + b"\x00", msgpack.packb([1, OP_DELETE, "k"]),
], ids=["empty array", "empty array16", "an int", "a str", "a map", "an ext",
        "array32 of 4 billion", "array claiming two records", "trailing byte", "a bare record"])
def test_a_small_payload_that_is_not_one_array_of_records_is_refused_as_ever(
        payload: bytes) -> None:
    checked, decoded = both_ways(payload)
    assert checked == decoded and checked[1] is not None


@needs_check
def test_a_record_too_big_to_decode_is_refused_without_saying_more() -> None:
    """Decoding the record to say why would build more than _BUILT_FOR_REASON objects."""
    many = b"\xdd" + (1 << 20).to_bytes(4, "big") + b"\x91\x01" * (1 << 20)
    assert read_frame(b"\x91\x93" + many + b"\x02\xa1k") == (
        [], "malformed record: a record that is not usable, too big to decode to say why")
    assert read_frame(b"\x91\x93\x01\x04" + many) == (  # the batch's first operation is named
        [], "malformed record: a batch item that is not an operation")
    assert read_frame(b"\x91\x93\x01\x04\x91\x93\x02\xa1k" + many) == (
        [], "malformed record: a batch holding an operation that is not usable, too big to "
            "decode to say why")
    assert read_frame(b"\x81\xc0" + many) == (
        [], "malformed record: a frame that is not a list of records")


# ------------------------------------------------------------------ LSN order

def a_usable_record(draw: Draw, lsn: int) -> bytes:
    """A usable record of any kind at `lsn`, its LSN in any width that holds it."""
    def op(code: int) -> bytes:  # as an int, a float or (1) true, which Python's == takes
        forms = [an_int(draw, code), a_float(draw, float(code))] + [b"\xc3"] * (code == 1)
        return draw(st.sampled_from(forms))  # type: ignore[no-any-return]

    fields = draw(st.sampled_from([
        [op(OP_PUT), a_str(draw, "k"), _ONE],
        [op(OP_DELETE), a_bin(draw, b"k")],
        [op(OP_INCR), a_str(draw, "k"), an_int(draw, -1), an_int(draw, 2**63 - 1)],
        [op(OP_BATCH), an_array(draw, [an_array(draw, [op(OP_DELETE), a_str(draw, "k")])] * 2)],
    ]))
    return an_array(draw, [an_int(draw, lsn), *fields])


_TOP = 2**64 - 1  # the largest LSN a record can hold


@st.composite
def lsns_near(draw: Draw, expected: int) -> list[int]:
    """LSNs of a frame that must start at `expected`: in sequence, or one skipped, repeated,
    swapped, behind or out of range; every one a usable record's (1..2**64 - 1)."""
    count = draw(st.integers(1, 5))
    lsns = [expected + i for i in range(count)]
    at = draw(st.integers(0, count - 1))
    how = draw(st.sampled_from(["none", "skip", "repeat", "swap", "behind", "top", "one",
                                "shift"]))
    if how == "skip":
        lsns[at:] = [lsn + draw(st.integers(1, 3)) for lsn in lsns[at:]]
    elif how == "repeat" and at > 0:
        lsns[at] = lsns[at - 1]
    elif how == "swap" and at > 0:
        lsns[at - 1], lsns[at] = lsns[at], lsns[at - 1]
    elif how == "behind":
        lsns[at] -= draw(st.integers(1, 3))
    elif how in ("top", "one"):
        lsns[at] = _TOP if how == "top" else 1
    elif how == "shift":  # a frame of another segment: the same order, another start
        lsns = [lsn + draw(st.sampled_from([-1, 1, 2**32, -2**32])) for lsn in lsns]
    return [min(max(lsn, 1), _TOP) for lsn in lsns]


_EXPECTED = st.sampled_from([1, 2, 7, 2**32, 2**63 - 2, 2**63, _TOP - 2, _TOP - 1, _TOP,
                             _TOP + 1, _TOP + 2, 0, -1])


@needs_check
@settings(max_examples=800, deadline=None)
@given(_EXPECTED, st.data())
def test_lsns_out_of_sequence_are_judged_as_decoding_judges_them(expected: int,
                                                                 data: st.DataObject) -> None:
    """The same refusal, naming the same record, with the check and by decoding, for frames
    of usable records of every kind whose LSNs skip, repeat, swap, fall behind, cross the end
    of a uint64 or start elsewhere; sometimes with an unusable record after them, which is
    named first (the records are judged before their order)."""
    lsns = data.draw(lsns_near(expected))
    items = [a_usable_record(data.draw, lsn) for lsn in lsns]
    if data.draw(st.integers(0, 4)) == 0:  # a record that decodes and is not usable
        items.insert(data.draw(st.integers(0, len(items))), data.draw(st.sampled_from(
            [b"\xc0", b"\x91\x01", msgpack.packb([1, OP_DELETE, ""]),
             msgpack.packb([expected % 2**64 or 1, OP_PUT, "k", b"\xc1"])])))
    payload = an_array(data.draw, items)
    checked, decoded = both_ways(payload, 511, expected)
    assert checked == decoded
    if len(items) == len(lsns):  # every record usable
        first_off = next((i for i, lsn in enumerate(lsns) if lsn != expected + i), None)
        assert (checked[1] is None) == (first_off is None)
        if first_off is not None:
            assert checked[1] == (f"record has LSN {lsns[first_off]} where "
                                  f"{expected + first_off} was expected")


@needs_check
@pytest.mark.parametrize("expected, lsns, why", [
    (3, [3, 4, 5], None),
    (3, [4], "record has LSN 4 where 3 was expected"),
    (3, [3, 5, 6], "record has LSN 5 where 4 was expected"),
    (3, [3, 3], "record has LSN 3 where 4 was expected"),
    (3, [4, 3], "record has LSN 4 where 3 was expected"),
    (5, [5, 6, 4], "record has LSN 4 where 7 was expected"),
    (2**63 - 1, [2**63 - 1, 2**63], None),
    (_TOP - 1, [_TOP - 1, _TOP], None),
    (_TOP, [_TOP, _TOP], f"record has LSN {_TOP} where {_TOP + 1} was expected"),
    (_TOP + 1, [1], f"record has LSN 1 where {_TOP + 1} was expected"),
    (_TOP + 2, [1], f"record has LSN 1 where {_TOP + 2} was expected"),
    (0, [1], "record has LSN 1 where 0 was expected"),
], ids=["in sequence", "skipped first", "skipped", "repeated", "swapped", "behind",
        "across int64", "up to the top", "past the top", "expected past a uint64",
        "expected 2**64 + 2", "expected 0"])
@pytest.mark.parametrize("op", [OP_PUT, OP_DELETE, OP_BATCH])
def test_lsns_at_the_edges_of_the_order_are_judged_as_decoding_judges_them(
        expected: int, lsns: list[int], why: str | None, op: int) -> None:
    record = {OP_PUT: lambda lsn: [lsn, OP_PUT, "k", _ONE[2:]],
              OP_DELETE: lambda lsn: [lsn, OP_DELETE, b"k"],
              OP_BATCH: lambda lsn: [lsn, OP_BATCH, [[OP_DELETE, "k"], [OP_PUT, "a", _ONE[2:]]]],
              }[op]
    payload = msgpack.packb([record(lsn) for lsn in lsns])
    checked, decoded = both_ways(payload, 511, expected)
    assert checked == decoded == (([record(lsn) for lsn in lsns], None) if why is None
                                  else ([], why))
    assert read_frame(payload) == ([record(lsn) for lsn in lsns], None)  # order not asked


@needs_check
def test_a_frame_out_of_sequence_is_refused_without_being_decoded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Its records are all usable: the check names the first out of sequence, and nothing of
    the frame is decoded (a crafted one decoded whole cost 11 to 29 times its size)."""
    payload = msgpack.packb([[5, OP_PUT, "k", _ONE[2:]], [3, OP_DELETE, "k"]])

    def no_decoding(payload: bytes) -> None:
        raise AssertionError("decoded")

    monkeypatch.setattr(records, "decode_frame", no_decoding)
    assert read_frame(payload, 511, 5) == ([], "record has LSN 3 where 6 was expected")
    assert read_frame(payload, 511, 4) == ([], "record has LSN 5 where 4 was expected")


@needs_check
@settings(max_examples=400, deadline=None)
@given(_EXPECTED, st.data())
def test_a_frames_lsns_are_found_as_decoding_finds_them(expected: int,
                                                       data: st.DataObject) -> None:
    """`frame_lsns` (the resync rule's question) gives the LSNs decoding gives, in any order,
    and refuses what decoding refuses; records in sequence are not decoded to answer."""
    lsns = data.draw(lsns_near(expected))
    items = [a_usable_record(data.draw, lsn) for lsn in lsns]
    if data.draw(st.integers(0, 4)) == 0:
        items.insert(data.draw(st.integers(0, len(items))), data.draw(st.sampled_from(
            [b"\xc0", b"\x91\x01", msgpack.packb([1, OP_DELETE, ""])])))
    payload = an_array(data.draw, items)
    found = frame_lsns(payload)
    with decoding_only():
        decoded = frame_lsns(payload)
    assert decoded == (lsns if len(items) == len(lsns) else None)
    assert (None if found is None else list(found)) == decoded


@needs_check
def test_a_frame_in_sequence_gives_its_lsns_without_being_decoded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decoding(payload: bytes) -> None:
        raise AssertionError("decoded")

    monkeypatch.setattr(records, "decode_frame", no_decoding)
    payload = msgpack.packb([[7, OP_PUT, "k", _ONE[2:]], [8, OP_DELETE, "k"],
                             [9, OP_BATCH, [[OP_DELETE, "k"]]]])
    assert frame_lsns(payload) == range(7, 10)


def _log_view(wal_dir: Path, checkpoint: int) -> tuple[Any, ...]:
    """What recovery's reading and `wbcache verify`'s survey make of a log: records, ends,
    torn tails, damage (as text)."""
    got: list[Any] = []
    end = walk_log(str(wal_dir), checkpoint, got.extend)
    survey = survey_log(str(wal_dir), checkpoint)
    return (got, [(s.records, s.end, s.last_lsn, s.torn_bytes, s.torn_reason, str(s.damage))
                  for s in end.segments], str(end.problem),
            [(s.records, s.last_lsn, s.pending, s.torn_bytes, str(s.damage))
             for s in survey.segments], [str(problem) for problem in survey.problems])


@needs_check
@settings(max_examples=150, deadline=None)
@given(st.data())
def test_a_log_out_of_sequence_is_read_and_verified_as_decoding_reads_it(
        tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    """Whole logs, the frame out of sequence anywhere (the first frame of a segment, against
    the segment's name; a later frame; the last segment or not; valid frames after it): what
    recovery and `wbcache verify` find, with the check and by decoding, is the same."""
    wal_dir = tmp_path_factory.mktemp("wal")
    first = data.draw(st.sampled_from([1, 1, 100]))
    lsn, segments = first, []
    for _ in range(data.draw(st.integers(1, 2))):
        frames = []
        for _ in range(data.draw(st.integers(1, 4))):
            count = data.draw(st.integers(1, 3))
            frames.append(list(range(lsn, lsn + count)))
            lsn += count
        segments.append(frames)
    names = [segment_name(segment[0][0]) for segment in segments]
    wrong = data.draw(st.sampled_from([frame for segment in segments for frame in segment]))
    at = data.draw(st.integers(0, len(wrong) - 1))  # one LSN put out of sequence
    moved = wrong[at] + data.draw(st.sampled_from([-2, -1, 1, 2]))
    wrong[at] = moved if moved >= 1 else wrong[at] + 1
    kinds = [lambda n: [n, OP_PUT, "k", _ONE[2:]], lambda n: [n, OP_DELETE, "k"],
             lambda n: [n, OP_INCR, "c", 1, 1], lambda n: [n, OP_BATCH, [[OP_DELETE, "k"]]]]
    for name, segment in zip(names, segments, strict=True):
        body = b"".join(encode_frame(msgpack.packb([data.draw(st.sampled_from(kinds))(n)
                                                    for n in lsns]))
                        for lsns in segment)
        (wal_dir / name).write_bytes(encode_header() + body)
    checked = _log_view(wal_dir, first - 1)
    with decoding_only():
        decoded = _log_view(wal_dir, first - 1)
    assert checked == decoded
    assert "was expected" in checked[2]
