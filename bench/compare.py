"""Compare benchmark runs saved with --json: one table, each row's ratio before -> after.

    python -m bench.compare --before b1.json b2.json --after a1.json a2.json [--flag 10]

Each row's ratio is taken within its own run (the row's value over its baseline row's value
in the same run, as the table prints it); with several runs per side, the MEDIAN of those
ratios is compared, and the spread (lowest..highest) is shown so that noise can be told from
a change. Rows without a baseline compare their values. A row whose number moved the wrong
way by more than --flag percent is marked WORSE.

The files are written by the benchmark itself: `python -m bench ... --json FILE` (e.g.
`python -m bench --quick --json a1.json`), once per run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

PROG = "python -m bench.compare"

# What compare() reads of each row of a `python -m bench --json` file: field -> (allowed
# types, what they are called in the error).
ROW_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "id": ((str,), "a string"), "label": ((str,), "a string"), "unit": ((str,), "a string"),
    "value": ((int, float, type(None)), "a number or null"),
    "baseline": ((str, type(None)), "a string or null")}


class BadRunFile(Exception):
    """A --before/--after file that cannot be compared: missing, unreadable, not JSON, or not
    what `python -m bench --json` writes."""


def load(path: Path) -> dict[str, Any]:
    """The document `python -m bench --json` wrote to `path`; BadRunFile naming what is wrong."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BadRunFile(f"{path}: cannot read it: {exc.strerror or exc}") from None
    try:
        document = json.loads(data)
    except ValueError as exc:  # json.JSONDecodeError, or bytes that are not UTF-8
        raise BadRunFile(f"{path}: not JSON ({exc})") from None
    rows = document.get("rows") if isinstance(document, dict) else None
    if not isinstance(rows, list):
        raise BadRunFile(f"{path}: not a benchmark result (no list of \"rows\"; write one "
                         "with python -m bench --json FILE)")
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise BadRunFile(f"{path}: rows[{index}] is not an object")
        for field, (types, called) in ROW_FIELDS.items():
            if field not in row:
                raise BadRunFile(f"{path}: rows[{index}] has no {field!r}")
            if not isinstance(row[field], types) or isinstance(row[field], bool):
                raise BadRunFile(f"{path}: rows[{index}] {field!r} is {json.dumps(row[field]):.60}"
                                 f", not {called}")
    return document


def ratios(document: dict[str, Any]) -> dict[str, tuple[float, str, str]]:
    """row id -> (ratio to its baseline, or the value when it has none; label; better)."""
    rows = {row["id"]: row for row in document["rows"]}
    found = {}
    for row_id, row in rows.items():
        value = row["value"]
        if value is None:
            continue
        base = rows.get(row["baseline"]) if row["baseline"] else None
        better = "lower" if row["unit"] in ("s", "bytes") else "higher"
        if row["id"] in ("hot_keys",):
            better = "lower"
        if base is not None and base["id"] != row_id:
            if not base["value"]:
                continue
            found[row_id] = (value / base["value"], row["label"], better)
        else:
            found[row_id] = (value, row["label"], better)
    return found


def compare(before: list[dict[str, Any]], after: list[dict[str, Any]],
            flag: float) -> list[str]:
    sides = [[ratios(document) for document in side] for side in (before, after)]
    order = [row["id"] for row in after[0]["rows"]]
    order += [row["id"] for row in before[0]["rows"] if row["id"] not in order]
    lines = [f"{'row':<76} {'before':>22} {'after':>22} {'change':>8}"]
    for row_id in order:
        values = [[run[row_id][0] for run in side if row_id in run] for side in sides]
        if not values[0] or not values[1]:
            continue
        label, better = next(run[row_id][1:] for side in sides for run in side if row_id in run)
        has_base = any(row["id"] == row_id and row["baseline"] and row["baseline"] != row_id
                       for row in after[0]["rows"])
        old, new = statistics.median(values[0]), statistics.median(values[1])
        change = (new / old - 1) * 100 if old else 0.0
        worse = change < -flag if better == "higher" else change > flag
        mark = "  WORSE" if worse and has_base else ""
        lines.append(f"{label[:76]:<76} {_cell(values[0], has_base):>22} "
                     f"{_cell(values[1], has_base):>22} {change:+7.0f}%{mark}")
    return lines


def _cell(values: list[float], ratio: bool) -> str:
    middle, low, high = statistics.median(values), min(values), max(values)
    if ratio:
        spread = f" ({low:.2f}..{high:.2f})" if len(values) > 1 else ""
        return f"{middle:.2f}×{spread}"
    return f"{middle:,.4g}"


def main() -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", nargs="+", type=Path, required=True, metavar="FILE",
                        help="runs of the code before, each written by "
                             "python -m bench ... --json FILE")
    parser.add_argument("--after", nargs="+", type=Path, required=True, metavar="FILE",
                        help="runs of the code after, written the same way")
    parser.add_argument("--flag", type=float, default=10.0,
                        help="percent a row may get worse before it is marked (default 10)")
    args = parser.parse_args()
    try:
        before, after = ([load(path) for path in paths] for paths in (args.before, args.after))
    except BadRunFile as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print("\n".join(compare(before, after, args.flag)))


if __name__ == "__main__":
    main()
