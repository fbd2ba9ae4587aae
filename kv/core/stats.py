"""Counters the nodes keep for `/metrics`, updated on the write path at the cost of a few
integer additions. No I/O, no locks (one event loop), no Prometheus types: kv/web/metrics.py
reads these when it is scraped, so a write never pays for the exposition format.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum

LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
"""Upper bounds of the write-latency buckets, in seconds: sub-millisecond writes at W=0
up to the default 5 s quorum timeout."""


class WriteFailure(StrEnum):
    """Why a write was answered 503."""

    NOT_IN_TIME = "not_in_time"
    """Fewer than `w` followers confirmed within the timeout."""
    UNREACHABLE = "unreachable"
    """Fewer than `w` followers were reachable, so the leader did not wait."""
    OVERFLOW = "overflow"
    """A follower's queue passed MAX_REPLICATION_QUEUE and was replaced by a snapshot."""
    STARTING = "starting"
    """The leader had not finished its start-up read (or, elected, held no valid lease)."""
    STEPPED_DOWN = "stepped_down"
    """An elected leader's lease ran out (or was handed over) while the write waited."""


@dataclass
class LatencyHistogram:
    """Observations by bucket (not cumulative; the last bucket is +Inf), their count and sum."""

    bounds: tuple[float, ...] = LATENCY_BUCKETS_S
    counts: list[int] = field(default_factory=list)
    count: int = 0
    total: float = 0.0

    def __post_init__(self) -> None:
        if list(self.bounds) != sorted(self.bounds):
            raise ValueError("bucket bounds must be sorted")
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, seconds: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (Prometheus's `le`).
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.count += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it), ending with (+inf, count)."""
        running, buckets = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            buckets.append((bound, running))
        return buckets


@dataclass
class WriteStats:
    """The leader's writes: latency of acknowledged ones by quorum, and 503s by reason."""

    latency_by_quorum: dict[int, LatencyHistogram] = field(default_factory=dict)
    failures: Counter[WriteFailure] = field(default_factory=Counter)

    def acknowledged(self, quorum: int, seconds: float) -> None:
        histogram = self.latency_by_quorum.get(quorum)
        if histogram is None:
            histogram = self.latency_by_quorum[quorum] = LatencyHistogram()
        histogram.observe(seconds)

    def failed(self, reason: WriteFailure) -> None:
        self.failures[reason] += 1


@dataclass
class ApplyStats:
    """A follower's batches and entries: applied, stale (already held newer), refused."""

    batches: int = 0
    heartbeats: int = 0
    applied: int = 0
    stale: int = 0
    refused_batches: int = 0
