"""How the commands write cache keys and values as JSON, unambiguously, and how to read them back.

JSON has no bytes, no NaN or infinity, and only string object keys, while a cache holds `str`
and `bytes` keys and msgpack values. The encoding (documented in docs/cli.md):

    str, int, bool, None      as JSON                       "a", 42, true, null
    finite float              as JSON, always with . or e   1.0, 2.5e-08
    +/-infinity, NaN          {"$float": "inf" | "-inf" | "nan"}; a NaN other than the
                              usual one keeps its IEEE 754 bits: {"$float": "0xfff8000000000000"}
    bytes                     {"$bytes": "<base64>"}        b"a" -> {"$bytes": "YQ=="}
    list                      JSON array
    dict, all keys str, none starting with "$"      JSON object
    any other dict            {"$map": [[key, value], ...]} (each key and value encoded)
    msgpack extension type    {"$ext": [code, "<base64>"]}
    msgpack.Timestamp         {"$ext": [-1, "<base64>"]}    (msgpack's own extension type -1)

So a JSON object with exactly one member whose name starts with "$" is always one of these
tags, and every other object is a dict: `decode_json(encode_json(v)) == v` for every value a
cache can hold, with the types kept (tests/test_cli_read.py checks it with Hypothesis).
"""

from __future__ import annotations

import base64
import math
import struct
from typing import Any

import msgpack

_TAGS = ("$bytes", "$float", "$map", "$ext")
_NAN_BITS = 0x7FF8000000000000  # float("nan")


def _bits(value: float) -> int:
    return int.from_bytes(struct.pack("<d", value), "little")


def encode_json(value: Any) -> Any:
    """`value` (a key or a decoded value) as a JSON-ready object, per the module docstring."""
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return value
    if kind is float:
        if math.isfinite(value):
            return value
        if math.isinf(value) or _bits(value) == _NAN_BITS:
            return {"$float": repr(value)}
        return {"$float": f"0x{_bits(value):016x}"}
    if kind is bytes:
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    if kind is list or kind is tuple:
        return [encode_json(item) for item in value]
    if kind is dict:
        if all(type(key) is str and not key.startswith("$") for key in value):
            return {key: encode_json(item) for key, item in value.items()}
        return {"$map": [[encode_json(key), encode_json(item)] for key, item in value.items()]}
    if kind is msgpack.ExtType:
        return {"$ext": [value.code, base64.b64encode(value.data).decode("ascii")]}
    if kind is msgpack.Timestamp:  # msgpack's own extension type -1
        return {"$ext": [-1, base64.b64encode(value.to_bytes()).decode("ascii")]}
    raise TypeError(f"cannot encode a {kind.__name__} as JSON")


def decode_json(document: Any) -> Any:
    """The inverse of `encode_json`."""
    if isinstance(document, list):
        return [decode_json(item) for item in document]
    if not isinstance(document, dict):
        return document
    if len(document) == 1:
        (tag, body), = document.items()
        if tag == "$bytes":
            return base64.b64decode(body, validate=True)
        if tag == "$float":
            if body.startswith("0x"):
                return struct.unpack("<d", int(body, 16).to_bytes(8, "little"))[0]
            return float(body)
        if tag == "$map":
            return {decode_json(key): decode_json(item) for key, item in body}
        if tag == "$ext":
            data = base64.b64decode(body[1], validate=True)
            if body[0] == -1:  # msgpack's Timestamp; ExtType refuses codes outside 0..127
                return msgpack.Timestamp.from_bytes(data)
            return msgpack.ExtType(body[0], data)
        if tag.startswith("$"):
            raise ValueError(f"unknown tag {tag!r} (known: {', '.join(_TAGS)})")
    return {key: decode_json(item) for key, item in document.items()}


def describe(value: Any, width: int) -> str:
    """A one-line, human-readable rendering (Python's repr, so "a" and b"a" differ), cut to
    `width` characters with a trailing "…"."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"
