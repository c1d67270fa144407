"""`wbcache demo`: the README's first command, run as a user runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

WBCACHE = os.path.join(os.path.dirname(sys.executable), "wbcache")


def test_demo_kills_a_writer_and_reports_every_acknowledged_write_recovered(
        tmp_path: Path) -> None:
    done = subprocess.run([WBCACHE, "demo", str(tmp_path / "demo"), "--seconds", "1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    figures = {label.strip(): int(value.replace(",", ""))
               for label, value in re.findall(r"^ +(\S.*?) {2,}([\d,]+)$", done.stdout, re.M)}
    acknowledged = figures["writes acknowledged before kill -9"]
    assert acknowledged > 0
    assert figures["recovered after reopening"] == acknowledged
    assert figures["already in the database"] + figures["replayed from the log"] == acknowledged
    assert figures["lost"] == 0
    assert "verdict: no acknowledged write lost" in done.stdout


def test_demo_refuses_a_directory_that_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "something").write_text("mine")
    done = subprocess.run([WBCACHE, "demo", str(tmp_path)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert "not empty" in done.stderr and "Traceback" not in done.stderr
    assert os.listdir(tmp_path) == ["something"]
