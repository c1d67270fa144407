"""`wbcache dump` and `wbcache get`: the data, as the caches would see it after recovery.

Keys and values are written in the JSON encoding of `cli/ops_encoding.py` (bytes as
{"$bytes": base64}, and so on), so "a" and b"a", 1 and 1.0, a dict and a tagged value never
look alike. Reads through `wbcache.maintenance.open_snapshot`: no byte of a single-owner
directory changes. In a shared directory the data is the database with every free lane's
pending records replayed over it, in lane order (`DirectorySnapshot.items`).
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from typing import Any

import click
import msgpack

from wbcache.cli import EXIT_DAMAGE, CommandFailed
from wbcache.cli.ops_encoding import decode_json, describe, dumps_json, encode_json
from wbcache.cli.ops_output import (
    backend_option,
    directory_argument,
    emit_json,
    json_option,
    lane_fields,
    open_directory,
    owner_fields,
    table,
    warn_if_stale,
)
from wbcache.maintenance import DirectorySnapshot, LogView
from wbcache.recovery.pending import LoggedOp, LoggedRecord

_TABLE_WIDTH = 60  # characters of a value shown in a table cell


class _Decoder:
    """Decodes stored values, counting those that cannot be (database damage)."""

    def __init__(self) -> None:
        self.undecodable = 0

    def __call__(self, encoded: bytes) -> Any:
        try:
            return msgpack.unpackb(encoded, strict_map_key=False)  # as the cache decodes
        except Exception:  # msgpack raises several types for bad input
            self.undecodable += 1
            return _Undecodable(encoded)


class _Undecodable(bytes):
    """A stored value that is not valid msgpack: shown as {"$raw": base64} / <undecodable>."""

    def __repr__(self) -> str:
        return f"<undecodable {len(self)} bytes>"


def _encode(value: Any) -> Any:
    if type(value) is _Undecodable:
        return {"$raw": base64.b64encode(value).decode("ascii")}
    return encode_json(value)


def _lanes(snapshot: DirectorySnapshot) -> dict[str, Any]:
    """A shared directory's `lanes` for a JSON document (nothing for a single-owner one)."""
    return {"lanes": [lane_fields(log) for log in snapshot.logs]} if snapshot.shared else {}


@click.command()
@directory_argument
@backend_option
@click.option("--format", "output_format", type=click.Choice(["jsonl", "table"]), default=None,
              help="jsonl (the default): one JSON object per line; table: aligned columns "
                   "for reading, long values cut.")
@click.option("--pending", is_flag=True,
              help="Only the log records not yet in the database, one per record, oldest "
                   "first (what recovery would replay); in a shared directory each free "
                   "lane's, lane by lane, each line naming its \"lane\".")
@json_option
def dump(directory: str, backend: str | None, output_format: str | None, pending: bool,
         as_json: bool) -> None:
    """Print every key and value as the cache would see them after recovery.

    That is the database with the log's pending records replayed over it. In a shared
    directory (many processes, a lane each): the database, plus each free lane's pending
    records in lane order, an increment adding its delta to what is stored; a lane in use
    belongs to its live cache, which flushes it, and is left out (with a warning). For a
    directory that flushes into PostgreSQL, the database is the whole table (every cache's
    entries), sorted in memory.

    \b
    jsonl lines:   {"key": KEY, "value": VALUE}
    with --pending {"lsn": N, "op": "put", "key": KEY, "value": VALUE}
                   {"lsn": N, "op": "delete", "key": KEY}
                   {"lsn": N, "op": "incr", "key": KEY, "delta": D, "value": RESULT}
                   {"lsn": N, "op": "batch", "ops": [{"op": ..., "key": ...}, ...]}
    Keys and values are JSON, with one-member "$" objects for what JSON cannot hold:
    bytes {"$bytes": BASE64}, a dict with non-str keys {"$map": [[K, V], ...]}, NaN and
    infinities {"$float": "nan" | "inf" | "-inf"}, a msgpack extension {"$ext": [CODE,
    BASE64]}. Str keys come first (in UTF-8 order), then bytes keys.

    \b
    Examples:
      wbcache dump /var/lib/myapp/cache > cache.jsonl
      wbcache dump --pending --format table /var/lib/myapp/cache

    \b
    Exit status: 0; 1 when a log is damaged (nothing is printed; with --pending, the
    records before the damage are) or a stored value cannot be decoded ({"$raw": BASE64});
    2 usage error, not a cache directory, or a PostgreSQL directory without --backend.
    """
    if as_json and output_format is not None:
        raise click.UsageError("--json prints one JSON object; it takes no --format")
    decoder = _Decoder()
    with open_directory(directory, backend) as snapshot:
        warn_if_stale(snapshot, reads_live_lanes=False)
        if pending:
            documents = (_record_document(log, record, decoder)
                         for log in snapshot.replayed_logs
                         for record in snapshot.pending_records(log))
        else:
            documents = ({"key": encode_json(key), "value": _encode(decoder(value))}
                         for key, value in snapshot.items())
        if as_json:
            listed = list(documents)
            emit_json({"ok": not decoder.undecodable, "path": snapshot.path,
                        **owner_fields(snapshot, backend), "pending": pending,
                        "count": len(listed), "undecodable": decoder.undecodable,
                        ("records" if pending else "entries"): listed, **_lanes(snapshot)})
        elif output_format == "table":
            _print_table(documents, pending)
        else:
            for document in documents:
                click.echo(dumps_json(document))
    if decoder.undecodable:
        raise CommandFailed(f"{decoder.undecodable} stored values could not be decoded "
                            f"(printed as {{\"$raw\": base64}}); see `wbcache verify`",
                            EXIT_DAMAGE)


def _record_document(log: LogView, record: LoggedRecord, decoder: _Decoder) -> dict[str, Any]:
    lane = {"lane": log.lane} if log.lane is not None else {}
    if record.batch:
        return {**lane, "lsn": record.lsn, "op": "batch",
                "ops": [_op_document(op, decoder) for op in record.ops]}
    return {**lane, "lsn": record.lsn, **_op_document(record.ops[0], decoder)}


def _op_document(op: LoggedOp, decoder: _Decoder) -> dict[str, Any]:
    document: dict[str, Any] = {"op": op.op, "key": encode_json(op.key)}
    if op.delta is not None:
        document["delta"] = op.delta
    if op.value is not None:
        document["value"] = _encode(decoder(op.value))
    return document


def _print_table(documents: Iterator[dict[str, Any]], pending: bool) -> None:
    """Collects the rows to size the columns: for reading, not for a million entries."""

    def cell(document: dict[str, Any], name: str) -> str:
        if name not in document:
            return ""
        raw = document[name]
        if isinstance(raw, dict) and "$raw" in raw and len(raw) == 1:
            return "<undecodable>"
        return describe(decode_json(raw), _TABLE_WIDTH)

    body: list[tuple[str, ...]] = []
    for document in documents:
        if not pending:
            body.append((cell(document, "key"), cell(document, "value")))
            continue
        for op in document.get("ops", [document]):
            kind = f"batch:{op['op']}" if document["op"] == "batch" else op["op"]
            delta = f" (+{op['delta']})" if "delta" in op else ""
            lane = (document["lane"],) if "lane" in document else ()
            body.append((*lane, f"{document['lsn']:,}", kind, cell(op, "key"),
                         cell(op, "value") + delta))
    if pending and body and len(body[0]) == 5:
        table(("lane", "LSN", "op", "key", "value"), body, right={1})
    elif pending:
        table(("LSN", "op", "key", "value"), body, right={0})
    else:
        table(("key", "value"), body, right=set())
    click.echo(f"({len(body):,} {'operations' if pending else 'entries'})")


@click.command()
@directory_argument
@click.argument("key")
@backend_option
@click.option("--bytes", "as_bytes", is_flag=True,
              help="KEY names a bytes key (the bytes of the argument) rather than a str key.")
@click.option("--hex", "as_hex", is_flag=True,
              help="KEY is a bytes key written in hex, e.g. 00ff10.")
@json_option
def get(directory: str, key: str, backend: str | None, as_bytes: bool, as_hex: bool,
        as_json: bool) -> None:
    """Print the value under KEY as the cache would return it after recovery.

    The value is printed as one line of JSON; what JSON cannot hold is a one-member "$"
    object (bytes as {"$bytes": BASE64}; see `wbcache dump --help`). "a" and b"a" are
    different keys: a str KEY by default, --bytes or --hex for a bytes key. In a shared
    directory: the database plus each free lane's pending records in lane order, an
    increment adding its delta to what is stored (a lane in use is left out).

    \b
    Examples:
      wbcache get /var/lib/myapp/cache user:1
      wbcache get --hex /var/lib/myapp/cache 00ff10

    \b
    Exit status: 0 found; 1 not found, or a log is damaged; 2 usage error, not a cache
    directory, or a PostgreSQL directory without --backend.
    """
    if as_bytes and as_hex:
        raise click.UsageError("--bytes and --hex exclude each other")
    lookup: str | bytes = key
    if as_hex:
        try:
            lookup = bytes.fromhex(key)
        except ValueError:
            raise click.BadParameter(f"{key!r} is not hex", param_hint="KEY") from None
    elif as_bytes:
        lookup = os.fsencode(key)  # the argument's own bytes, UTF-8 or not
    decoder = _Decoder()
    with open_directory(directory, backend) as snapshot:
        warn_if_stale(snapshot, reads_live_lanes=False)
        try:
            encoded, source, lane = snapshot.get(lookup)
        except (TypeError, ValueError) as exc:  # empty, too long, a str that is not UTF-8
            hint = " (--bytes or --hex name a key that is not)" if isinstance(lookup, str) \
                and "UTF-8" in str(exc) else ""
            raise click.BadParameter(f"{exc}{hint}", param_hint="KEY") from None
        other = None
        if encoded is None:
            other = lookup.encode() if isinstance(lookup, str) else _as_str(lookup)
            if other is not None and snapshot.get(other).value is None:
                other = None
        document = {"ok": encoded is not None, "path": snapshot.path,
                    **owner_fields(snapshot, backend), "key": encode_json(lookup),
                    "found": encoded is not None, "source": source,
                    **({"lane": lane} if snapshot.shared else {}),
                    "value": _encode(decoder(encoded)) if encoded is not None else None,
                    **_lanes(snapshot)}
    if as_json:
        emit_json(document)
    elif encoded is not None:
        click.echo(dumps_json(document["value"]))
    if encoded is None:
        hint = ""
        if other is not None:
            hint = (" (a str key of that name exists)" if type(other) is str
                    else " (a bytes key of that name exists: use --bytes)")
        click.echo(f"key {lookup!r} not found{hint}", err=True)
        raise click.exceptions.Exit(EXIT_DAMAGE)
    if decoder.undecodable:
        raise CommandFailed("the stored value could not be decoded (printed as "
                            "{\"$raw\": base64}); see `wbcache verify`", EXIT_DAMAGE)


def _as_str(key: bytes) -> str | None:
    try:
        return key.decode()
    except UnicodeDecodeError:
        return None
