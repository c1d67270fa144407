"""Compare benchmark runs saved with --json: one table, each row's ratio before -> after.

    python -m bench.compare --before b1.json b2.json --after a1.json a2.json [--flag 10]

Each row's ratio is taken within its own run (the row's value over its baseline row's value
in the same run, as the table prints it); with several runs per side, the MEDIAN of those
ratios is compared, and the spread (lowest..highest) is shown so that noise can be told from
a change. Rows without a baseline compare their values. A row whose number moved the wrong
way by more than --flag percent is marked WORSE.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any


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
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", nargs="+", type=Path, required=True)
    parser.add_argument("--after", nargs="+", type=Path, required=True)
    parser.add_argument("--flag", type=float, default=10.0,
                        help="percent a row may get worse before it is marked (default 10)")
    args = parser.parse_args()
    load = [[json.loads(path.read_text()) for path in paths] for paths in (args.before,
                                                                          args.after)]
    print("\n".join(compare(load[0], load[1], args.flag)))


if __name__ == "__main__":
    main()
