"""The final table of a torture run: one column per mode, one row per figure."""

from __future__ import annotations

from typing import TYPE_CHECKING

from wbcache.fault_injection.oracle import Tally

if TYPE_CHECKING:
    from wbcache.fault_injection.campaign import Outcome
    from wbcache.fault_injection.torture import TortureReport

# (row label, Tally field, shown only for modes that run a workload)
ROWS = (
    ("cycles (crashes or cases)", "cycles", False),
    ("operations", "operations", True),
    ("acknowledged", "acknowledged", True),
    ("recovered", "recovered", True),
    ("  unacknowledged, kept", "inflight_kept", True),
    ("counters checked", "counters", True),
    ("lost (must be 0)", "lost", False),
    ("holes (must be 0)", "holes", False),
    ("partial batches (must be 0)", "partial", False),
    ("phantom values (must be 0)", "phantom", False),
    ("counter regressions (must be 0)", "counter_regressions", False),
    ("counter mismatches (must be 0)", "counter_mismatches", False),
    ("inconsistent states (must be 0)", "inconsistent", False),
    ("earlier data changed (must be 0)", "carried", False),
    ("LSN violations (must be 0)", "lsn", False),
    ("not linearizable (must be 0)", "linearizability", False),
    ("forked children not refused (must be 0)", "fork", False),
    ("errors, refusals (must be 0)", "errors", False),
)
_WORKLOAD_MODES = ("kill", "crashpoints", "powerloss", "ioerrors")
# Checked only by a campaign that says so in `Outcome.figures` (the multi-node and the
# interleave ones), or by the modes named here.
_OPT_IN_FIGURES: dict[str, tuple[str, ...]] = {
    "counters": (), "counter_mismatches": (), "linearizability": (), "fork": ("kill",)}


def _cell(value: object) -> str:
    return f"{value:,}" if isinstance(value, int) else str(value)


def _checks(outcome: Outcome, name: str, workload_only: bool) -> bool:
    """Whether `outcome` checks the figure `name`: what it lists in `figures`, or else the
    standard set of its mode."""
    if outcome.figures is not None:
        return name in outcome.figures
    if name in _OPT_IN_FIGURES:
        return outcome.mode in _OPT_IN_FIGURES[name]
    return not workload_only or outcome.mode in _WORKLOAD_MODES


def render(report: TortureReport) -> str:
    outcomes = report.outcomes
    headers = [outcome.mode for outcome in outcomes] + (["total"] if len(outcomes) > 1 else [])
    tallies: list[Tally] = [outcome.tally for outcome in outcomes]
    if len(outcomes) > 1:
        tallies.append(report.total)
    lines: list[list[str]] = []
    for label, name, workload_only in ROWS:
        checked = [_checks(outcome, name, workload_only) for outcome in outcomes]
        if not any(checked):
            continue  # no campaign of this run checks it: the row would say nothing
        if len(outcomes) > 1:
            checked.append(True)  # the total of those that do
        lines.append([label] + [_cell(getattr(tally, name)) if shown else "-"
                                for tally, shown in zip(tallies, checked, strict=True)])
    covered = next((outcome.rows.get("crash points covered") for outcome in outcomes
                    if outcome.mode == "crashpoints"), None)
    if covered is not None:  # a row only where the crashpoints campaign ran: blank otherwise
        lines.append(["crash points covered"] + [
            str(covered) if outcome.mode == "crashpoints" else "-" for outcome in outcomes]
            + ([str(covered)] if len(outcomes) > 1 else []))
    lines.append(["seed", *[""] * (len(headers) - 1), str(report.seed)])
    label_width = max(len(row[0]) for row in lines)
    widths = [max(len(header), *(len(row[i + 1]) for row in lines)) for i, header in
              enumerate(headers)]
    out = ["  " + " " * label_width
           + "".join(f"  {h:>{w}}" for h, w in zip(headers, widths, strict=True))]
    for row in lines:
        out.append("  " + f"{row[0]:<{label_width}}"
                   + "".join(f"  {cell:>{w}}" for cell, w in zip(row[1:], widths, strict=True)))
    extras = [(outcome.mode, label, value) for outcome in outcomes
              for label, value in outcome.rows.items()
              if label not in ("crash points covered", "uncovered")]
    if extras:
        out.append("")
        width = max(len(f"{mode}: {label}") for mode, label, _ in extras)
        for mode, label, value in extras:
            text = f"  {label.strip()}" if label.startswith("  ") else f"{mode}: {label}"
            out.append(f"  {text:<{width}}  {_cell(value)}")
    for outcome in outcomes:
        if outcome.mode == "crashpoints" and outcome.rows.get("uncovered"):
            out.append(f"  crash points never fired: {', '.join(outcome.rows['uncovered'])}")
    messages = report.total.messages
    if messages:
        out.append("")
        out.append(f"  violations (first {len(messages)}):")
        out.extend(f"    {message}" for message in messages)
    return "\n".join(out)


def verdict(report: TortureReport) -> str:
    total = report.total
    if report.ok:
        return (f"verdict: PASS: {total.acknowledged:,} acknowledged writes checked after "
                f"{total.cycles:,} crashes and cases; none lost, no hole, no violation")
    failed = [outcome.mode for outcome in report.outcomes if not outcome.ok]
    return (f"verdict: FAIL in {', '.join(failed)}: {total.violations:,} violation(s), "
            f"{total.lost:,} acknowledged write(s) lost, {total.holes:,} hole(s); "
            f"reproduce with --seed {report.seed}")
