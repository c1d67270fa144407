"""Recovery: read the log, verify it, replay what the database lacks, salvage a damaged one.

Imports `wbcache.wal` and, for typing only, the backend protocol (docs/design.md, layers).
"""

from __future__ import annotations

from wbcache.recovery.replay import RecoveryReport, Replay, apply_changes, replay_into
from wbcache.recovery.scan import LogEnd, read_log, walk_log

__all__ = ["LogEnd", "RecoveryReport", "Replay", "apply_changes", "read_log", "replay_into",
           "walk_log"]
