"""Recovery: scan the log, verify it, replay what the database lacks.

Imports `wbcache.wal` and, for typing only, the backend protocol (DESIGN.md, layout).
"""

from __future__ import annotations

from wbcache.recovery.replay import RecoveryReport, apply_changes, apply_record, replay_into
from wbcache.recovery.scan import LogScan, SegmentSummary

__all__ = ["LogScan", "RecoveryReport", "SegmentSummary", "apply_changes", "apply_record",
           "replay_into"]
