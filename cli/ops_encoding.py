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
import json
import math
import struct
from collections.abc import Callable, Iterator
from typing import Any

import msgpack

_TAGS = ("$bytes", "$float", "$map", "$ext")
_NAN_BITS = 0x7FF8000000000000  # float("nan")


def _bits(value: float) -> int:
    return int.from_bytes(struct.pack("<d", value), "little")


def encode_json(value: Any) -> Any:
    """`value` (a key or a decoded value) as a JSON-ready object, per the module docstring.

    With an explicit stack, not recursion: the cache takes values nested 1023 deep (as deep
    as msgpack reads), past Python's recursion limit."""
    pending: list[tuple[Any, Any]] = []
    encoded = _encode_node(value, pending)
    while pending:
        source, target = pending.pop()
        if type(target) is dict:
            for key, item in source.items():
                target[key] = _encode_node(item, pending)
        elif type(source) is dict:  # a $map's pairs
            target.extend([_encode_node(key, pending), _encode_node(item, pending)]
                          for key, item in source.items())
        else:
            target.extend(_encode_node(item, pending) for item in source)
    return encoded


def _encode_node(value: Any, pending: list[tuple[Any, Any]]) -> Any:
    """`value` encoded; a container comes back empty, queued on `pending` to be filled."""
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
    if kind is list or kind is tuple or kind is dict:
        plain = kind is dict and all(type(key) is str and not key.startswith("$")
                                     for key in value)
        target: Any = {} if plain else []
        pending.append((value, target))
        return {"$map": target} if kind is dict and not plain else target
    if kind is msgpack.ExtType:
        return {"$ext": [value.code, base64.b64encode(value.data).decode("ascii")]}
    if kind is msgpack.Timestamp:  # msgpack's own extension type -1
        return {"$ext": [-1, base64.b64encode(value.to_bytes()).decode("ascii")]}
    raise TypeError(f"cannot encode a {kind.__name__} as JSON")


def decode_json(document: Any) -> Any:
    """The inverse of `encode_json` (with an explicit stack too)."""
    pending: list[tuple[Any, Any]] = []
    decoded = _decode_node(document, pending)
    while pending:
        source, target = pending.pop()
        if type(target) is list:
            target.extend(_decode_node(item, pending) for item in source)
        elif type(source) is list:  # a $map's pairs; a key is whole before it is hashed
            for key, item in source:
                target[decode_json(key)] = _decode_node(item, pending)
        else:
            for key, item in source.items():
                target[key] = _decode_node(item, pending)
    return decoded


def _decode_node(document: Any, pending: list[tuple[Any, Any]]) -> Any:
    """`document` decoded; a container comes back empty, queued on `pending` to be filled."""
    if isinstance(document, list):
        target: Any = []
        pending.append((document, target))
        return target
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
        if tag == "$ext":
            data = base64.b64decode(body[1], validate=True)
            if body[0] == -1:  # msgpack's Timestamp; ExtType refuses codes outside 0..127
                return msgpack.Timestamp.from_bytes(data)
            return msgpack.ExtType(body[0], data)
        if tag == "$map":
            target = {}
            pending.append((body, target))
            return target
        if tag.startswith("$"):
            raise ValueError(f"unknown tag {tag!r} (known: {', '.join(_TAGS)})")
    target = {}
    pending.append((document, target))
    return target


def describe(value: Any, width: int) -> str:
    """A one-line, human-readable rendering (Python's repr, so "a" and b"a" differ), cut to
    `width` characters with a trailing "…". Only that much is rendered, and without
    recursion (repr recurses, one level a frame)."""
    text = ""
    for piece in _pieces(value, _repr_piece):
        text += piece
        if len(text) > width:
            return text[: width - 1] + "…"
    return text


def dumps_json(document: Any, indent: int | None = None) -> str:
    """`json.dumps(document, indent=indent)`. json's encoders recurse, one level at least a
    frame, so a value nested near 1023 deep goes past the recursion limit: such a document
    is written by a walk with an explicit stack, to the same text."""
    try:
        return json.dumps(document, indent=indent)
    except RecursionError:
        return "".join(_pieces(document, lambda value, depth: _json_piece(value, depth,
                                                                            indent)))


class _Nested:
    """A value inside a container, to render where it stands among the container's text."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


Rendering = Callable[[Any, int], "str | Iterator[str | _Nested]"]


def _pieces(value: Any, render: Rendering) -> Iterator[str]:
    """The text of `value`, piece by piece, walked with an explicit stack of containers:
    `render(value, depth)` gives a leaf's text, or a container's pieces (text and _Nested)."""
    stack: list[Iterator[str | _Nested]] = [iter((_Nested(value),))]
    while stack:
        for piece in stack[-1]:
            if type(piece) is str:
                yield piece
                continue
            assert isinstance(piece, _Nested)
            rendered = render(piece.value, len(stack) - 1)
            if type(rendered) is str:
                yield rendered
                continue
            stack.append(rendered)
            break
        else:
            stack.pop()


def _repr_piece(value: Any, depth: int) -> str | Iterator[str | _Nested]:
    kind = type(value)
    if kind is list or kind is tuple or kind is dict:
        return _repr_items(value)
    return repr(value)


def _repr_items(value: list[Any] | tuple[Any, ...] | dict[Any, Any]) -> Iterator[str | _Nested]:
    opening, closing = {list: "[]", tuple: "()", dict: "{}"}[type(value)]
    yield opening
    for index, item in enumerate(value.items() if type(value) is dict else value):
        if index:
            yield ", "
        if type(value) is dict:
            yield _Nested(item[0])
            yield ": "
            item = item[1]
        yield _Nested(item)
    if type(value) is tuple and len(value) == 1:
        yield ","
    yield closing


def _json_piece(value: Any, depth: int, indent: int | None) -> str | Iterator[str | _Nested]:
    kind = type(value)
    if (kind is list or kind is tuple or kind is dict) and value:
        return _json_items(value, depth, indent)
    return json.dumps(value)


def _json_items(value: list[Any] | tuple[Any, ...] | dict[str, Any], depth: int,
                indent: int | None) -> Iterator[str | _Nested]:
    """A non-empty container's pieces, as json.dumps separates and indents them."""
    if indent is None:
        before, separator, after = "", ", ", ""
    else:
        before = "\n" + " " * (indent * (depth + 1))
        separator, after = "," + before, "\n" + " " * (indent * depth)
    is_dict = type(value) is dict
    yield "{" if is_dict else "["
    for index, item in enumerate(value.items() if is_dict else value):
        yield separator if index else before
        if is_dict:
            key = item[0]  # as json.dumps writes a key: always a string
            yield json.dumps(key if type(key) is str else json.dumps(key)) + ": "
            item = item[1]
        yield _Nested(item)
    yield after + ("}" if is_dict else "]")
