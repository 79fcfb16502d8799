"""What ``make tune`` records (export/tools/tune.py searches, export/tools/tune_report.py reports):
a candidate config's knobs, one measured level of it, and the trial of a candidate."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Knobs:
    """The searched part of a classifier config."""

    instances: int
    max_batch_size: int
    max_queue_delay_us: int

    @property
    def label(self) -> str:
        return f"i{self.instances}-b{self.max_batch_size}-d{self.max_queue_delay_us}"


@dataclass
class Point:
    """One measured level of one candidate."""

    concurrency: int
    throughput: float
    p50_ms: float
    p99_ms: float
    server_queue_ms: float
    server_compute_ms: float
    stable: bool


@dataclass
class Trial:
    """A candidate config and what perf_analyzer measured for it."""

    knobs: Knobs
    is_current: bool = False
    points: list[Point] = field(default_factory=list)
    error: str = ""

    def best(self, budget_ms: float) -> Point | None:
        """The highest-throughput level whose p99 is within ``budget_ms``."""
        ok = [p for p in self.points if p.p99_ms <= budget_ms]
        return max(ok, key=lambda p: p.throughput) if ok else None

    def score(self, budget_ms: float) -> float:
        best = self.best(budget_ms)
        return best.throughput if best else 0.0
