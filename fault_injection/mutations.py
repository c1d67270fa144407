"""Mutations of a sample log for the parser fuzz (fuzz.py): each changes the segments in
place and says what it did, or returns None when it does not apply.

Only `_reframe` forges: it wraps crafted content in a frame with a valid CRC, which the format
cannot tell from real data; every other mutation leaves any changed frame with a wrong CRC.

Frames to mutate are found in the (maybe already damaged) bytes by the reader's own resync
rule (`wbcache.wal.reader.intact_frames`): the frames recovery itself would accept there.
"""

from __future__ import annotations

import random
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import msgpack

from wbcache.fault_injection.logfile import SampleLog
from wbcache.wal.format import (
    FRAME,
    FRAME_MAGIC,
    HEADER,
    HEADER_SIZE,
    MAX_FRAME_PAYLOAD,
    SEGMENT_MAGIC,
)
from wbcache.wal.reader import intact_frames

Segments = list[tuple[str, bytearray]]


@dataclass
class Mutated:
    segments: Segments
    steps: list[str]
    forged: bool  # a frame with a valid CRC around crafted content: data may be invented


def _frames_of(data: bytearray) -> list[tuple[int, int, int]]:
    """(offset, length, first LSN) of every intact frame of a (maybe damaged) segment."""
    return [(at, end - at, lsns[0])
            for at, lsns, end in intact_frames(bytes(data), HEADER_SIZE, len(data))]


def _pick_frame(rng: random.Random, segments: Segments) -> tuple[int, int, int, int] | None:
    """(segment index, offset, length, first LSN) of a random intact frame."""
    choices = [(index, offset, length, lsn) for index, (_, data) in enumerate(segments)
               for offset, length, lsn in _frames_of(data)]
    return rng.choice(choices) if choices else None


def _pick_segment(rng: random.Random, segments: Segments) -> int | None:
    return rng.randrange(len(segments)) if segments else None


def _change_bytes(rng: random.Random, segments: Segments) -> str | None:
    index = _pick_segment(rng, segments)
    if index is None or not segments[index][1]:
        return None
    data = segments[index][1]
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    return f"bytes changed in {segments[index][0]}"


def _insert_bytes(rng: random.Random, segments: Segments) -> str | None:
    index = _pick_segment(rng, segments)
    if index is None:
        return None
    data = segments[index][1]
    at = rng.randint(0, len(data))
    data[at:at] = rng.randbytes(rng.randint(1, 64))
    return f"bytes inserted in {segments[index][0]} at {at}"


def _delete_bytes(rng: random.Random, segments: Segments) -> str | None:
    index = _pick_segment(rng, segments)
    if index is None or not segments[index][1]:
        return None
    data = segments[index][1]
    at = rng.randrange(len(data))
    del data[at:at + rng.randint(1, 200)]
    return f"bytes deleted in {segments[index][0]} at {at}"


def _truncate(rng: random.Random, segments: Segments) -> str | None:
    index = _pick_segment(rng, segments)
    if index is None:
        return None
    data = segments[index][1]
    keep = rng.randint(0, len(data))
    del data[keep:]
    return f"{segments[index][0]} truncated to {keep}"


def _duplicate_frame(rng: random.Random, segments: Segments) -> str | None:
    picked = _pick_frame(rng, segments)
    if picked is None:
        return None
    index, offset, length, _ = picked
    data = segments[index][1]
    data[offset + length:offset + length] = data[offset:offset + length]
    return f"frame at {offset} of {segments[index][0]} duplicated"


def _drop_frame(rng: random.Random, segments: Segments) -> str | None:
    picked = _pick_frame(rng, segments)
    if picked is None:
        return None
    index, offset, length, _ = picked
    del segments[index][1][offset:offset + length]
    return f"frame at {offset} of {segments[index][0]} dropped"


def _swap_frames(rng: random.Random, segments: Segments) -> str | None:
    index = _pick_segment(rng, segments)
    if index is None:
        return None
    data = segments[index][1]
    found = _frames_of(data)
    pairs = zip(found, found[1:], strict=False)
    adjacent = [(a, a_len, b, b_len) for (a, a_len, _), (b, b_len, _) in pairs if a + a_len == b]
    if not adjacent:
        return None
    a, a_len, b, b_len = rng.choice(adjacent)
    data[a:b + b_len] = data[b:b + b_len] + data[a:a + a_len]
    return f"frames at {a} and {b} of {segments[index][0]} swapped"


def _extreme_length(rng: random.Random, segments: Segments) -> str | None:
    picked = _pick_frame(rng, segments)
    if picked is None:
        return None
    index, offset, _, _ = picked
    length = rng.choice([0, 1, 11, MAX_FRAME_PAYLOAD, MAX_FRAME_PAYLOAD + 1, 0xFFFFFFFF,
                         rng.randrange(1 << 32)])
    struct.pack_into("<I", segments[index][1], offset + 4, length)
    return f"frame at {offset} of {segments[index][0]} claims length {length}"


def _crafted_payload(rng: random.Random, lsn: int) -> bytes:
    choice = rng.randrange(9)
    if choice == 0:
        return rng.randbytes(rng.randint(1, 64))
    if choice == 1:
        return b"\x91" * rng.randint(1, 5000)  # deeply nested arrays
    if choice == 2:
        return b"\xdd\xff\xff\xff\xff"  # an array claiming 4 billion items
    if choice == 3:
        return msgpack.packb([[lsn + rng.choice([-1, 1, 2, 1000]), 1, "k", b"\xc0"]])
    if choice == 4:
        return msgpack.packb([[lsn, rng.choice([0, 5, 99, -1]), "k", b"\xc0"]])
    if choice == 5:
        return msgpack.packb([[lsn, 1, rng.choice([1, None, 1.5, [], {}]), b"\xc0"]])
    if choice == 6:
        return msgpack.packb([])
    if choice == 7:
        return msgpack.packb({"not": "a list"})
    return msgpack.packb([[lsn, 4, [[1, "k"]]]])  # a batch item missing its value


def _reframe(rng: random.Random, segments: Segments) -> str | None:
    picked = _pick_frame(rng, segments)
    if picked is None:
        return None
    index, offset, length, lsn = picked
    data = segments[index][1]
    payload = _crafted_payload(rng, lsn)
    frame = FRAME.pack(FRAME_MAGIC, len(payload), zlib.crc32(payload)) + payload
    data[offset:offset + length] = frame
    return f"frame at {offset} of {segments[index][0]} re-framed around crafted content"


def _header_version(rng: random.Random, segments: Segments) -> str | None:
    index = _pick_segment(rng, segments)
    if index is None or len(segments[index][1]) < HEADER_SIZE:
        return None
    version = rng.choice([0, 3, 255, 0xFFFF])
    _, _, flags, size, _ = HEADER.unpack_from(segments[index][1])
    head = struct.pack("<8sHHI", SEGMENT_MAGIC, version, flags, size)
    segments[index][1][:HEADER_SIZE] = HEADER.pack(SEGMENT_MAGIC, version, flags, size,
                                                   zlib.crc32(head))
    return f"{segments[index][0]} claims format version {version}"


def _rename(rng: random.Random, segments: Segments) -> str | None:
    index = _pick_segment(rng, segments)
    if index is None:
        return None
    old = int(segments[index][0][:20])
    new = max(0, old + rng.choice([-5, -1, 1, 3, 1000]))
    name = f"{new:020d}.log"
    if any(existing == name for existing, _ in segments):
        return None
    segments[index] = (name, segments[index][1])
    segments.sort(key=lambda segment: segment[0])
    return f"segment {old} renamed to {new}"


def _remove_segment(rng: random.Random, segments: Segments) -> str | None:
    index = _pick_segment(rng, segments)
    if index is None:
        return None
    name, _ = segments.pop(index)
    return f"{name} removed"


def _add_segment(rng: random.Random, segments: Segments) -> str | None:
    last = int(segments[-1][0][:20]) if segments else 1
    name = f"{last + rng.choice([1, 2, 50]):020d}.log"
    if any(existing == name for existing, _ in segments):
        return None
    header = bytearray(segments[0][1][:HEADER_SIZE]) if segments else bytearray()
    content = rng.choice([bytearray(), header, header + rng.randbytes(rng.randint(1, 300)),
                          bytearray(rng.randbytes(rng.randint(1, 300)))])
    segments.append((name, content))
    segments.sort(key=lambda segment: segment[0])
    return f"{name} added ({len(content)} bytes)"


def _noise_segment(rng: random.Random, segments: Segments) -> str | None:
    index = _pick_segment(rng, segments)
    if index is None:
        return None
    segments[index] = (segments[index][0], bytearray(rng.randbytes(rng.randint(0, 2000))))
    return f"{segments[index][0]} replaced with noise"


MUTATIONS: tuple[tuple[Callable[[random.Random, Segments], str | None], bool], ...] = (
    (_change_bytes, False), (_insert_bytes, False), (_delete_bytes, False), (_truncate, False),
    (_duplicate_frame, False), (_drop_frame, False), (_swap_frames, False),
    (_extreme_length, False), (_reframe, True), (_header_version, False), (_rename, False),
    (_remove_segment, False), (_add_segment, False), (_noise_segment, False),
)


def mutate(sample: SampleLog, rng: random.Random) -> Mutated:
    segments: Segments = [(name, bytearray(data)) for name, data in sample.segments]
    steps: list[str] = []
    forged = False
    while not steps or (len(steps) < 4 and rng.random() < 0.4):
        mutation, forges = rng.choice(MUTATIONS)
        step = mutation(rng, segments)
        if step is not None:
            steps.append(step)
            forged = forged or forges
    return Mutated(segments, steps, forged)
