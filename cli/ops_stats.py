"""`wbcache stats`: counts of what a cache directory holds on disk, read-only.

Reads through `wbcache.maintenance.open_snapshot`, as `inspect` does (cli/ops_inspect.py). In a
shared directory the pending counts are the free lanes' (a lane in use belongs to its live
cache), in total and per lane (`lanes`).
"""

from __future__ import annotations

from typing import Any

import click

from wbcache.cli import EXIT_DAMAGE
from wbcache.cli.ops_output import (
    backend_option,
    directory_argument,
    emit_json,
    json_option,
    lane_fields,
    number,
    open_directory,
    owner_fields,
    rows,
    totals,
    warn_if_stale,
)
from wbcache.maintenance import DatabaseCheck, DirectorySnapshot, LogView
from wbcache.recovery.pending import PendingSummary


@click.command()
@directory_argument
@backend_option
@json_option
def stats(directory: str, backend: str | None, as_json: bool) -> None:
    """Count what the directory holds: database entries and sizes, pending log records by kind.

    The counters of a running cache (hits, misses, flushes) live in that process:
    `cache.stats()`. These are the numbers on disk, and `entries_after_recovery` is what
    `len(cache)` will be once the directory is opened. In a shared directory the pending
    records are those of the free lanes (a lane in use belongs to its live cache, which
    flushes it), counted over all of them and per lane.

    \b
    Example:
      wbcache stats --json /var/lib/myapp/cache | jq .pending_records

    \b
    Exit status: 0; 1 when a log is damaged (see `wbcache verify`) or a database value
    cannot be decoded; 2 usage error, not a cache directory, or a PostgreSQL directory
    without --backend.
    """
    with open_directory(directory, backend) as snapshot:
        warn_if_stale(snapshot, reads_live_lanes=False)
        pending = [(log, snapshot.pending_summary(log)) for log in snapshot.replayed_logs]
        database = snapshot.check_database()
        document = _stats_document(snapshot, backend, pending, database)
    if as_json:
        emit_json(document)
    else:
        _print_stats(document)
    for problem in database.problems:
        click.echo(f"DAMAGED: {problem}", err=True)
    if database.problems:
        raise click.exceptions.Exit(EXIT_DAMAGE)


_PENDING_FIELDS = ("wal_segments", "wal_bytes", "torn_bytes", "pending_records", "pending_keys",
                   "pending_puts", "pending_deletes", "pending_incrs", "pending_batches")


def _pending_fields(snapshot: DirectorySnapshot, log: LogView | None,
                    summary: PendingSummary | None) -> dict[str, Any]:
    quarantine = snapshot.quarantine(log) if log is not None else []
    summary = summary or PendingSummary()
    return {"wal_segments": summary.segments, "wal_bytes": summary.wal_bytes,
            "torn_bytes": summary.torn_bytes, "pending_records": summary.records,
            "pending_keys": len(summary.state), "pending_puts": summary.puts,
            "pending_deletes": summary.deletes, "pending_incrs": summary.incrs,
            "pending_batches": summary.batches, "quarantine_files": len(quarantine),
            "quarantine_bytes": sum(item.size for item in quarantine)}


def _stats_document(snapshot: DirectorySnapshot, url: str | None,
                    pending: list[tuple[LogView, PendingSummary]],
                    database: DatabaseCheck) -> dict[str, Any]:
    summaries = dict((id(log), summary) for log, summary in pending)
    lanes = [{**lane_fields(log), "last_lsn": summaries[id(log)].last_lsn
              if id(log) in summaries else None,
              **_pending_fields(snapshot, log, summaries.get(id(log)))}
             for log in snapshot.logs]
    document: dict[str, Any] = {
        "ok": not database.problems,
        "path": snapshot.path,
        **owner_fields(snapshot, url),
        "checkpoint_lsn": None if snapshot.shared else snapshot.checkpoint(),
        "last_lsn": None if snapshot.shared else lanes[0]["last_lsn"],
        "entries_after_recovery": snapshot.entries_after_recovery(
            summary.state for _, summary in pending),
        "database_entries": database.entries,
        "database_str_keys": database.str_keys,
        "database_bytes_keys": database.bytes_keys,
        "database_value_bytes": database.value_bytes,
        "database_largest_value": database.largest_value,
        "database_file_bytes": snapshot.database_file_bytes(),
    }
    # a shared directory's totals are the free lanes' (a pending key counted once per lane);
    # its quarantine is every lane's
    counted = [lane for lane in lanes if not (snapshot.shared and lane["in_use"])]
    document.update(totals(counted, _PENDING_FIELDS))
    document.update(totals(lanes, ("quarantine_files", "quarantine_bytes")))
    if snapshot.shared:
        document["lanes"] = lanes
    return document


def _print_stats(document: dict[str, Any]) -> None:
    click.echo(document["path"])
    shared = "lanes" in document
    file_bytes = document["database_file_bytes"]
    rows([
        ("entries after recovery", number(document["entries_after_recovery"]),
         "len(cache) once opened"),
        ("database entries", number(document["database_entries"]),
         f"{number(document['database_str_keys'])} str keys, "
         f"{number(document['database_bytes_keys'])} bytes keys"),
        ("database value bytes", number(document["database_value_bytes"]),
         f"largest {number(document['database_largest_value'])}"),
        *([("database file bytes", number(file_bytes), "data.mdb")]
          if file_bytes is not None else [("database", document["database_kind"],
                                           document["database_url"] or "")]),
        *([] if shared else [("checkpoint LSN", number(document["checkpoint_lsn"]), "")]),
        *([("lanes", number(len(document["lanes"])),
            f"{number(sum(lane['in_use'] for lane in document['lanes']))} in use by a live "
            f"cache: left out of the pending counts")] if shared else []),
        ("log segments", number(document["wal_segments"]),
         f"{number(document['wal_bytes'])} bytes"),
        ("pending records", number(document["pending_records"]),
         f"{number(document['pending_batches'])} of them batches"),
        ("  puts", number(document["pending_puts"]), ""),
        ("  deletes", number(document["pending_deletes"]), ""),
        ("  increments", number(document["pending_incrs"]), ""),
        ("pending keys", number(document["pending_keys"]), "distinct keys those touch"
         + (" (per lane, summed)" if shared else "")),
        ("torn tail bytes", number(document["torn_bytes"]), ""),
        ("quarantine files", number(document["quarantine_files"]),
         f"{number(document['quarantine_bytes'])} bytes"),
    ])
