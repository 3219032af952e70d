"""Latency percentiles and the result records every scenario produces."""

from __future__ import annotations

import statistics
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

# A fan-out rate is "held" when its p99 stays under this and nothing is lost (issue 7).
P99_TARGET_MS = 50.0


@dataclass(frozen=True)
class Percentiles:
    """Milliseconds, nearest-rank percentiles."""

    count: int
    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of_ns(cls, samples: Iterable[int]) -> Percentiles | None:
        ordered = sorted(samples)
        if not ordered:
            return None
        return cls(
            count=len(ordered),
            p50=_rank(ordered, 0.50) / 1e6,
            p90=_rank(ordered, 0.90) / 1e6,
            p99=_rank(ordered, 0.99) / 1e6,
            max=ordered[-1] / 1e6,
        )


def _rank(ordered: Sequence[int], quantile: float) -> int:
    index = max(0, min(len(ordered) - 1, int(len(ordered) * quantile + 0.5) - 1))
    return ordered[index]


def new_samples() -> array[int]:
    """A compact store of nanosecond samples (8 bytes each)."""
    return array("q")


@dataclass
class StepResult:
    """One measured step of one run: a target at one offered load."""

    target: str
    round: int
    label: str
    offered_per_s: float
    duration_s: float
    sent: int
    expected: int
    delivered: int
    lost: int
    late: int
    acks: int
    delivered_per_s: float
    acks_per_s: float | None
    latency_ms: Percentiles | None
    ack_latency_ms: Percentiles | None
    errors: dict[str, int] = field(default_factory=dict)
    closes: dict[str, int] = field(default_factory=dict)
    server_cpu: float | None = None  # cores busy (1.0 = one core)
    server_rss_mib: float | None = None
    generator_cpu: float | None = None
    send_lag_ms: float | None = None  # how late the generator sent, worst case
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def held(self) -> bool:
        """No loss, no error, and p99 within the target."""
        return (
            self.lost == 0
            and not self.errors
            and self.latency_ms is not None
            and self.latency_ms.p99 <= P99_TARGET_MS
        )

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["held"] = self.held
        return data


def median(values: Iterable[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def highest_held(steps: Iterable[StepResult]) -> float | None:
    """The highest offered load held. A lower rate that failed does not void it: on a shared
    machine a single step can fail for reasons of its own, and the rounds show it."""
    held = [step.offered_per_s for step in steps if step.held]
    return max(held) if held else None
