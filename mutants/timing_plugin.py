"""A pytest plugin for mutants/run.py: one JSON line per test, when it finishes, with its
outcome, its own duration and the seconds since the session started.

Loaded with `-p timing_plugin` (mutants/ on PYTHONPATH); writes to $MUTANT_TIMINGS.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

_STARTED = time.monotonic()
_DURATIONS: dict[str, float] = {}


def pytest_runtest_logreport(report: Any) -> None:
    _DURATIONS[report.nodeid] = _DURATIONS.get(report.nodeid, 0.0) + report.duration
    if report.when == "call" or report.outcome != "passed":
        if report.when != "call" and report.outcome == "skipped" and report.when == "setup":
            outcome = "skipped"
        else:
            outcome = report.outcome
        if report.when == "teardown" and report.outcome == "passed":
            return
        line = {"test": report.nodeid, "outcome": outcome, "phase": report.when,
                "seconds": round(_DURATIONS[report.nodeid], 2),
                "at": round(time.monotonic() - _STARTED, 2),
                "message": _message(report)}
        with open(os.environ["MUTANT_TIMINGS"], "a", encoding="utf-8") as out:
            out.write(json.dumps(line) + "\n")


def _message(report: Any) -> str:
    if report.outcome != "failed":
        return ""
    text = str(report.longrepr)
    lines = [line for line in text.splitlines() if line.startswith("E ")]
    return "\n".join(lines[:6])[:1500]
