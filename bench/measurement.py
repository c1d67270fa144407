"""What a row is: a `Measurement` (how to take one trial), its `Sample`s and its `Result`."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

Unit = Literal["ops/s", "keys/s", "entries/s", "s", "bytes", "fraction"]


@dataclass(frozen=True)
class Usage:
    """What this process spent while a trial counted (getrusage, every thread): CPU seconds
    (user + system) and context switches, and how many operations finished meanwhile."""

    cpu_seconds: float
    voluntary_switches: int
    involuntary_switches: int
    operations: int

    def per_op(self, unit: str = "put") -> str:
        """'27 µs CPU, 0.95 voluntary switches per put'."""
        count = max(self.operations, 1)
        return (f"{self.cpu_seconds / count * 1e6:.1f} µs CPU, "
                f"{self.voluntary_switches / count:.2f} voluntary switches per {unit}")


@dataclass(frozen=True)
class Sample:
    """One trial: `value` in the row's unit; acknowledgement latency percentiles in seconds."""

    value: float
    p50: float | None = None
    p99: float | None = None
    p999: float | None = None
    note: str = ""
    usage: Usage | None = None
    extra: dict[str, float] = field(default_factory=dict)
    """Further numbers a target may judge (e.g. database transactions per client write)."""


@dataclass
class Measurement:
    """One row of the table. `trial()` sets up, measures once and cleans up after itself."""

    id: str
    section: str
    label: str
    trial: Callable[[], Sample] | None
    unit: Unit = "ops/s"
    better: Literal["higher", "lower"] = "higher"
    baseline: str | None = None
    """Row id the ratio column divides by (None: no ratio)."""
    big: bool = False
    """Expensive one-shot row: runs `BenchConfig.big_rounds` trials instead of `rounds`."""
    once: bool = False
    """A row whose result does not depend on the machine's load (a hit ratio): one trial."""
    anchor: bool = False
    """A cheap baseline other rows divide by: measured at the start AND the end of every
    round, so that its best trial (the hardest bar) never comes from one unlucky moment."""
    series: str | None = None
    """Plot series (durable acks/s against concurrency) this row is a point of."""
    concurrency: int | None = None
    unavailable: str | None = None
    """Why the row cannot run here ("not installed", "not available"); then `trial` is None."""
    note: str = ""


@dataclass
class Result:
    measurement: Measurement
    samples: list[Sample] = field(default_factory=list)
    error: str | None = None

    @property
    def id(self) -> str:
        return self.measurement.id

    @property
    def ok(self) -> bool:
        return bool(self.samples) and self.error is None

    @property
    def status(self) -> str:
        if self.measurement.unavailable:
            return self.measurement.unavailable
        if self.error:
            return f"failed: {self.error}"
        return "ok" if self.samples else "not measured"

    @property
    def value(self) -> float | None:
        """The best trial: highest for throughput, lowest for time and memory."""
        if not self.ok:
            return None
        values = [sample.value for sample in self.samples]
        return max(values) if self.measurement.better == "higher" else min(values)

    @property
    def p50(self) -> float | None:
        return self._median_of([s.p50 for s in self.samples if s.p50 is not None])

    @property
    def p99(self) -> float | None:
        return self._median_of([s.p99 for s in self.samples if s.p99 is not None])

    @property
    def p999(self) -> float | None:
        return self._median_of([s.p999 for s in self.samples if s.p999 is not None])

    @property
    def best(self) -> Sample | None:
        """The best trial, the one `value` comes from."""
        if not self.ok:
            return None
        return (max if self.measurement.better == "higher" else min)(
            self.samples, key=lambda sample: sample.value)

    @property
    def usage(self) -> Usage | None:
        """The resource use of the best trial."""
        best = self.best
        return None if best is None else best.usage

    @property
    def note(self) -> str:
        """The row's own note, then the best trial's (so that the note describes the trial
        the value comes from)."""
        best = self.best
        parts = [self.measurement.note] if self.measurement.note else []
        if best is not None and best.note:
            parts.append(best.note)
        return "; ".join(parts)

    def _median_of(self, values: list[float]) -> float | None:
        return statistics.median(values) if values and self.error is None else None
