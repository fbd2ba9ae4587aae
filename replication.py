"""The leader's replication bookkeeping, with no I/O and no event loop.

Each follower has an :class:`Outbox` of shipments. A shipment is one log entry
on its way to one follower. It becomes ready once its simulated network delay
has passed, and the follower's delivery loop ships every ready shipment in one
batch (group commit). Failed batches go back into the outbox with a backoff,
so an unreachable follower receives everything it missed once it answers.

Time is always passed in (`now`) and randomness is injected, so the tests drive
this module like a state machine: add, advance the clock, take a batch, ack or
fail it, and look at what is left.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from store import Entry


class FollowerState(StrEnum):
    """What the leader knows of a follower, from its last delivery attempts."""

    UP = "up"
    """The last delivery succeeded and nothing is waiting that is ready to ship."""
    LAGGING = "lagging"
    """The last delivery succeeded but ready entries are waiting to ship."""
    DOWN = "down"
    """The last delivery failed; the outbox is retried after a backoff."""
    RESYNCING = "resyncing"
    """A snapshot of the whole store is on its way, after a restart or a dropped backlog."""


def quorum_reached(acks: int, required: int) -> bool:
    return acks >= required


def failures_tolerated(followers: int, quorum: int) -> int:
    """How many followers may be down while writes at `quorum` still succeed."""
    return followers - quorum


def retry_backoff(consecutive_failures: int, base: float = 0.05, cap: float = 1.0) -> float:
    """Exponential backoff in seconds: 50 ms, 100 ms, 200 ms ... capped at one second."""
    if consecutive_failures <= 0:
        return 0.0
    return min(cap, base * 2 ** (consecutive_failures - 1))


@dataclass(frozen=True, slots=True)
class DelayModel:
    """The simulated network: a delay drawn uniformly per follower and per entry."""

    min_ms: float
    max_ms: float
    rng: random.Random = field(default_factory=random.Random, compare=False)

    def draw_ms(self) -> float:
        if self.max_ms <= self.min_ms:
            return self.min_ms
        return self.rng.uniform(self.min_ms, self.max_ms)

    def expected_kth_fastest_ms(self, k: int, n: int) -> float:
        """The mean of the k-th smallest of n uniform draws: what a quorum of k waits for."""
        return self.min_ms + k / (n + 1) * (self.max_ms - self.min_ms)


@dataclass(slots=True)
class Shipment:
    """One entry on its way to one follower."""

    entry: Entry
    delay_ms: float
    enqueued_at: float
    ready_at: float
    attempts: int = 0
    # Whatever the driver wants back when the shipment is confirmed (a future).
    waiter: Any = None
    resync: bool = False  # part of a snapshot rather than a write

    @property
    def size(self) -> int:
        return len(self.entry.encoded)


class Outbox:
    """Shipments waiting for one follower, ordered by the time they become ready."""

    def __init__(self, max_batch_entries: int = 1024, max_batch_bytes: int = 4 * 1024 * 1024):
        if max_batch_entries < 1 or max_batch_bytes < 1:
            raise ValueError("batch limits must be positive")
        self.max_batch_entries = max_batch_entries
        self.max_batch_bytes = max_batch_bytes
        self._heap: list[tuple[float, int, int, Shipment]] = []
        self._sequence = 0  # tie-breaker, so shipments themselves are never compared

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, shipment: Shipment) -> None:
        self._sequence += 1
        item = (shipment.ready_at, shipment.entry.version, self._sequence, shipment)
        heapq.heappush(self._heap, item)

    def next_ready_at(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def ready_count(self, now: float) -> int:
        return sum(1 for ready_at, *_ in self._heap if ready_at <= now)

    def take_ready(self, now: float) -> list[Shipment]:
        """Remove and return the shipments ready at `now`, within the batch limits.

        A batch always holds at least one ready shipment, however large, so an
        entry bigger than the byte limit still ships (on its own).
        """
        batch: list[Shipment] = []
        size = 0
        while self._heap and self._heap[0][0] <= now and len(batch) < self.max_batch_entries:
            shipment = self._heap[0][3]
            if batch and size + shipment.size > self.max_batch_bytes:
                break
            heapq.heappop(self._heap)
            batch.append(shipment)
            size += shipment.size
        batch.sort(key=lambda s: s.entry.version)
        return batch

    def drain(self) -> list[Shipment]:
        """Remove and return every shipment."""
        shipments = [item[3] for item in self._heap]
        self._heap.clear()
        return shipments

    def retry(self, batch: list[Shipment], at: float) -> None:
        """Put a failed batch back, to become ready again at `at`."""
        for shipment in batch:
            shipment.attempts += 1
            shipment.ready_at = at
            self.add(shipment)


def encode_batch(batch: list[Shipment]) -> bytes:
    """The body of one `/replicate` request, built from each entry's cached encoding."""
    return b'{"entries":[' + b",".join(s.entry.encoded for s in batch) + b"]}"
