"""Validating and encoding keys and values, before anything reaches the log.

Keys are `str` or `bytes` (two distinct key spaces: "a" and b"a" are different keys), non-empty
and at most `max_key_size` bytes (UTF-8 for str). Values are what msgpack encodes natively:
None, bool, int (64-bit), float, str, bytes, list, dict; tuples come back as lists and
bytearrays as bytes. Anything else raises `TypeError`, an out-of-range value `ValueError`,
always before the log sees it (docs/design.md, guarantee 4).

In memory, immutable values (exact str, bytes, int, float, bool, None) are kept as the objects
themselves; everything else is kept as its msgpack bytes in a 1-tuple, `(encoded,)`, and decoded
afresh on every read, so a caller mutating a returned list or dict can never change the cache.
A tuple, because no value is held as one (tuples are encoded, and come back as lists), and
because the garbage collector stops tracking a tuple of bytes at the first collection it
survives. It was a subclass of bytes before, and every instance of a class defined in Python
is tracked: a million cached dicts made each full collection, a pause of the whole process,
walk a million more objects (191.7 ms against 48.6 ms now; docs/bench.md, "Garbage
collection").
"""

from __future__ import annotations

from typing import Any

import msgpack

from wbcache.backends.base import Key
from wbcache.errors import CorruptValueError
from wbcache.wal.records import SHARE_PACKER, UNDECODABLE

IMMUTABLE_TYPES = frozenset({str, bytes, int, float, bool, type(None)})

INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1
# msgpack's int formats: their first byte -> the size of the whole encoding
_INT_SIZES = {**{byte: 1 for byte in range(0x80)}, **{byte: 1 for byte in range(0xE0, 0x100)},
              0xCC: 2, 0xCD: 3, 0xCE: 5, 0xCF: 9, 0xD0: 2, 0xD1: 3, 0xD2: 5, 0xD3: 9}


def added(stored: bytes | None, delta: int) -> int:
    """What a database that adds increments stores for `delta` added to `stored` (the
    encoding it holds, None if none): a stored int plus `delta`, anything else counting from
    0, the sum held to the int64 range (`SharedLmdbBackend`, `PostgresBackend`, and a
    recovery's view of them). Only an int's encoding is decoded: a big value is not decoded
    to find that it is not one."""
    base = 0
    if stored and _INT_SIZES.get(stored[0]) == len(stored):
        base = msgpack.unpackb(stored)
    return min(max(base + delta, INT64_MIN), INT64_MAX)

packb = msgpack.packb
# msgpack.packb builds a Packer per call (about 0.4 us here). Packing an immutable value (an
# exact str, bytes, int, float, bool or None) runs no Python code, so the GIL is never released
# inside it and one Packer serves every thread. A Packer keeps the largest buffer it ever
# needed, so it only packs what fits its initial buffer (256 KiB in msgpack 1.1, 1 MiB in
# 1.0): a str or bytes of under _SMALL characters or bytes (128 KiB of UTF-8 at most). Not with
# msgpack's pure-Python Packer, nor without a GIL (wal/records.py, SHARE_PACKER).
_pack = msgpack.Packer().pack if SHARE_PACKER else packb
_SMALL = 32 * 1024
# A list or dict may run Python code while it is packed (a subclass's `items()`, a finalizer
# the garbage collector calls), and another thread, or this one re-entering, may then pack
# too: so each pack of one takes an idle Packer of its own from this pool (list.pop and
# .append are atomic) and gives it back if its buffer is still the initial one (an encoding of
# at most _POOLED bytes). A thread switch between the pop and the append also takes a second
# one, so with many writing threads the pool fills, to about _POOL_SIZE: 2 MiB of buffers with
# msgpack 1.1's 256 KiB, 8 MiB with 1.0's 1 MiB (the size check and the append are two steps,
# so a switch between them can add one more per writing thread).
_packers: list[msgpack.Packer] = []
_POOLED = 128 * 1024
_POOL_SIZE = 8

try:  # the C proof that an encoding decodes (wal/_walk.c); without it, unpackb decides
    from wbcache.wal._walk import decodes as _decodes
except ImportError:
    def _decodes(encoded: bytes) -> bool:
        return False


def check_key(key: object, max_size: int) -> Key:
    """Return `key` as an exact str or bytes, or raise TypeError/ValueError naming the problem."""
    # `type(key) is` narrows the type, so no `typing.cast` is called (two calls: 60 ns a put)
    if type(key) is str:
        size = len(key) if key.isascii() else _utf8_size(key)
    elif type(key) is bytes:
        size = len(key)
    elif isinstance(key, str):  # a str subclass (e.g. a StrEnum): store the plain string
        return check_key(str.__str__(key), max_size)
    elif isinstance(key, bytes):
        return check_key(bytes(key), max_size)
    else:
        raise TypeError(f"keys must be str or bytes, not {type(key).__name__}")
    if size == 0:
        raise ValueError("keys must not be empty")
    if size > max_size:
        raise ValueError(f"key of {size} bytes exceeds max_key_size ({max_size} bytes)")
    return key


def _utf8_size(key: str) -> int:
    try:
        return len(key.encode())
    except UnicodeEncodeError as exc:
        raise ValueError(f"key {key!r} cannot be encoded as UTF-8: {exc.reason}") from None


def encode_value(value: object, max_size: int, key: object = None) -> bytes:
    """The msgpack encoding of `value`, or TypeError/ValueError naming the problem."""
    kind = type(value)
    immutable = kind in IMMUTABLE_TYPES
    shared = immutable and (kind is not str and kind is not bytes
                            or len(value) < _SMALL)  # type: ignore[arg-type]
    try:
        encoded: bytes = _pack(value) if shared else _pack_pooled(value)
    except TypeError as exc:
        raise TypeError(
            f"value for key {key!r} cannot be stored: {exc} (supported: None, bool, int, "
            f"float, str, bytes, list, dict)"
        ) from None
    except (OverflowError, ValueError, BufferError) as exc:  # Buffer: a strided memoryview
        raise ValueError(f"value for key {key!r} cannot be stored: {exc}") from None
    if len(encoded) > max_size:
        raise ValueError(
            f"value for key {key!r} is {len(encoded)} bytes encoded; "
            f"max_value_size is {max_size} bytes"
        )
    if not immutable and not _decodes(encoded):
        # msgpack encodes a dict keyed by a tuple (as an array) but cannot decode it (a list is
        # not hashable): such a value would poison every later read of the key. `_decodes`
        # proves most encodings decode without building them (0.1 us against 0.5 us for a
        # small dict); what it cannot prove, decoding once here decides exactly.
        try:
            msgpack.unpackb(encoded, strict_map_key=False)
        except msgpack.StackError:  # packed, but deeper than the decoder goes
            raise ValueError(f"value for key {key!r} cannot be stored: it is nested deeper "
                             f"than msgpack decodes (1,024 levels)") from None
        except UNDECODABLE as exc:
            raise TypeError(
                f"value for key {key!r} cannot be read back ({exc}); dict keys must be "
                f"str, bytes, int, float, bool or None"
            ) from None
    return encoded


def _pack_pooled(value: object) -> bytes:
    """`msgpack.packb(value)` with a Packer of the pool (above `encode_value`): about 0.4 us
    less than packb, which builds a Packer (and its 256 KiB buffer) per call."""
    try:
        packer = _packers.pop()
    except IndexError:
        packer = msgpack.Packer()
    encoded: bytes = packer.pack(value)  # on an error the Packer is dropped, not pooled
    if len(encoded) <= _POOLED and len(_packers) < _POOL_SIZE:
        _packers.append(packer)
    return encoded


def check_delta(delta: object) -> int:
    if type(delta) is not int:
        raise TypeError(f"incr delta must be an int, not {type(delta).__name__}")
    return delta


def in_memory(value: object, encoded: bytes) -> Any:
    """What memory keeps for a value: the object itself if immutable, else its encoding."""
    return value if type(value) in IMMUTABLE_TYPES else (encoded,)


def decode_value(encoded: bytes, key: object = None) -> Any:
    """A value from its msgpack encoding (limits follow len(encoded)). Raises
    `CorruptValueError` (never a raw msgpack error) when it does not decode."""
    try:
        return msgpack.unpackb(encoded, strict_map_key=False)
    except UNDECODABLE as exc:
        raise CorruptValueError(
            f"the stored value of key {key!r} cannot be decoded ({type(exc).__name__}: {exc}); "
            f"the database holds bytes wbcache did not write") from None


def from_encoded(encoded: bytes, key: object = None) -> tuple[Any, Any]:
    """(value for the caller, what memory keeps) from an encoding read from the database."""
    value = decode_value(encoded, key)
    return value, in_memory(value, encoded if type(encoded) is bytes else bytes(encoded))


def value_of(held: Any) -> Any:
    """The caller's value of what memory holds: a fresh copy of a mutable one."""
    return msgpack.unpackb(held[0], strict_map_key=False) if type(held) is tuple else held


def check_int64(value: int, what: str) -> int:
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"{what} {value} is outside the signed 64-bit range")
    return value


def increment(key: Key, delta: int, current: Any, absent: Any) -> int:
    """The value of `key` after adding `delta` to `current` (`absent`: counts from 0).
    A non-int raises TypeError, a result outside int64 ValueError."""
    if current is absent:
        current = 0
    elif type(current) is not int:
        raise TypeError(f"incr: the value under {key!r} is a {type(current).__name__}, "
                        f"not an int")
    return check_int64(current + delta, f"incr result for {key!r}")
