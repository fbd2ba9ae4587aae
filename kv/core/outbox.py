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
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kv.core.records import Entry
from kv.core.store import StoreView

SNAPSHOT_READ = 64
"""Snapshot entries read from the store at a time while a batch is made."""


def quorum_reached(acks: int, required: int) -> bool:
    return acks >= required


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
        return len(self.entry.wire)


class Outbox:
    """Shipments waiting for one follower, in two parts.

    *Delayed* shipments are still inside their simulated network delay: the
    network has them, not the follower. *Ready* ones have waited out their delay
    (or failed and wait for a retry) and are what the follower has yet to take;
    only those count against MAX_REPLICATION_QUEUE. Ready shipments leave in
    version order.
    """

    def __init__(
        self,
        max_batch_entries: int = 1024,
        max_batch_bytes: int = 4 * 1024 * 1024,
        max_snapshot_batch: int = 1024,
    ):
        if max_batch_entries < 1 or max_batch_bytes < 1 or max_snapshot_batch < 1:
            raise ValueError("batch limits must be positive")
        self.max_batch_entries = max_batch_entries
        self.max_batch_bytes = max_batch_bytes
        self.max_snapshot_batch = max_snapshot_batch
        # A snapshot not yet made into shipments: the entries in version order, from
        # `_snapshot_at` on. A million shipments made at once would stall the event loop
        # for seconds; they are made a batch at a time instead (:meth:`_take_snapshot`).
        self._snapshot: Sequence[Entry] = []
        self._snapshot_at = 0
        self._snapshot_now = 0.0
        # Every snapshot entry not yet made into a shipment has a version above this (see
        # :meth:`add_snapshot`), which is all min_version() needs to know of them.
        self._snapshot_floor = 0
        self._snapshot_top = 0
        self._delayed: list[tuple[float, int, int, Shipment]] = []  # by ready_at
        self._ready: list[tuple[int, int, Shipment]] = []  # by version
        self._sequence = 0  # tie-breaker, so shipments themselves are never compared
        # The versions of every shipment held, delayed or ready: a min-heap with lazy
        # deletion, and how many shipments hold each (a write and its snapshot copy can).
        self._versions: list[int] = []
        self._held: Counter[int] = Counter()

    def __len__(self) -> int:
        return len(self._delayed) + len(self._ready) + self.snapshot_left

    @property
    def snapshot_left(self) -> int:
        """Snapshot entries not yet made into shipments."""
        return len(self._snapshot) - self._snapshot_at

    def add_snapshot(self, entries: Sequence[Entry], now: float) -> int:
        """Ship `entries` (in version order), ready at once, as a snapshot (`resync`).

        A snapshot is of the whole store, so it replaces one still going, whose entries it
        holds too; returns how many entries of that one were dropped unshipped. `entries`
        may be read lazily (a :class:`StoreView`), so an entry can be newer by the time
        it ships than when the snapshot was taken: shipping it is still right (it is what
        the leader holds), and those above the snapshot's `top` are left out of
        min_version()'s bound, since their old versions are gone.
        """
        dropped = self.snapshot_left
        self._snapshot, self._snapshot_at, self._snapshot_now = entries, 0, now
        self._snapshot_floor = 0
        if isinstance(entries, StoreView):
            self._snapshot_top = entries.top
        else:
            self._snapshot_top = entries[-1].version if entries else 0
        return dropped

    def _take_snapshot(self) -> tuple[list[Shipment], int]:
        """The next snapshot batch, made straight from the snapshot, which is in version
        order already: its entries skip the ready heap and its bookkeeping, which were a
        third of the leader's CPU while it shipped a million-entry snapshot. The entries
        are read a few at a time, so a batch of large values stops at the byte limit
        without making the rest. Returns the batch and its size in bytes."""
        batch: list[Shipment] = []
        size = 0
        now = self._snapshot_now
        floor, top = self._snapshot_floor, self._snapshot_top
        at = self._snapshot_at
        end = min(len(self._snapshot), at + self.max_snapshot_batch)
        while at < end:
            for entry in self._snapshot[at : min(end, at + SNAPSHOT_READ)]:
                entry_size = len(entry.wire)
                if batch and size + entry_size > self.max_batch_bytes:
                    end = at  # full: stop here
                    break
                batch.append(Shipment(entry, 0.0, now, now, resync=True))
                size += entry_size
                at += 1
                if floor < entry.version <= top:
                    floor = entry.version  # unchanged since the snapshot: it was in order
        self._snapshot_floor = floor
        self._snapshot_at = at
        if at == len(self._snapshot):
            self._snapshot, self._snapshot_at = [], 0
        return batch, size

    def add(self, shipment: Shipment) -> None:
        self._sequence += 1
        item = (shipment.ready_at, shipment.entry.version, self._sequence, shipment)
        heapq.heappush(self._delayed, item)
        self._hold(shipment.entry.version)

    def min_version(self) -> int | None:
        """The lowest version of any shipment held (not on the wire), or None if empty."""
        while self._versions and self._versions[0] not in self._held:
            heapq.heappop(self._versions)
        lowest = self._versions[0] if self._versions else None
        if self.snapshot_left:
            head = self._snapshot_floor + 1  # at most the next snapshot entry's version
            lowest = head if lowest is None else min(lowest, head)
        return lowest

    def _hold(self, version: int) -> None:
        if version not in self._held:
            heapq.heappush(self._versions, version)
        self._held[version] += 1

    def _release(self, version: int) -> None:
        left = self._held[version] - 1
        if left:
            self._held[version] = left
        else:
            del self._held[version]

    def _promote(self, now: float) -> None:
        while self._delayed and self._delayed[0][0] <= now:
            _, version, sequence, shipment = heapq.heappop(self._delayed)
            heapq.heappush(self._ready, (version, sequence, shipment))

    def next_ready_at(self) -> float | None:
        """When a shipment is next ready: -inf if one is ready now, None if there is none."""
        if self._ready or self.snapshot_left:
            return float("-inf")
        return self._delayed[0][0] if self._delayed else None

    def ready_count(self, now: float) -> int:
        """Shipments past their delay and not yet taken: what the follower has yet to take."""
        self._promote(now)
        return len(self._ready) + self.snapshot_left

    def take_ready(self, now: float) -> list[Shipment]:
        """Remove and return the shipments ready at `now`, within the batch limits.

        A batch always holds at least one ready shipment, however large, so an
        entry bigger than the byte limit still ships (on its own).
        """
        self._promote(now)
        batch: list[Shipment] = []
        size = 0
        # The snapshot goes before the writes made since it was taken (their versions are
        # above it), as version order has it, and they fill what its last batch leaves; a
        # failed snapshot batch, back in the heap, goes before the rest of the snapshot.
        if self.snapshot_left and (not self._ready or self._ready[0][0] > self._snapshot_floor):
            batch, size = self._take_snapshot()
            if self.snapshot_left:
                return batch
        # A snapshot goes in larger batches than writes: each is a round trip.
        resync = bool(batch) or (bool(self._ready) and self._ready[0][2].resync)
        limit = self.max_snapshot_batch if resync else self.max_batch_entries
        while self._ready and len(batch) < limit:
            shipment = self._ready[0][2]
            if batch and size + shipment.size > self.max_batch_bytes:
                break
            heapq.heappop(self._ready)
            self._release(shipment.entry.version)
            batch.append(shipment)
            size += shipment.size
        return batch

    def drain(self) -> list[Shipment]:
        """Remove and return every shipment; a snapshot's entries not yet made into
        shipments are dropped (see snapshot_left, before)."""
        self._snapshot, self._snapshot_at = [], 0
        shipments = [item[3] for item in self._delayed] + [item[2] for item in self._ready]
        self._delayed.clear()
        self._ready.clear()
        self._versions.clear()
        self._held.clear()
        return shipments

    def retry(self, batch: list[Shipment], at: float) -> None:
        """Put a failed batch back: ready (the follower failed to take it), not before `at`."""
        for shipment in batch:
            shipment.attempts += 1
            shipment.ready_at = at
            self._sequence += 1
            heapq.heappush(self._ready, (shipment.entry.version, self._sequence, shipment))
            self._hold(shipment.entry.version)


def encode_batch(
    batch: list[Shipment],
    term: int,
    leader_id: str,
    through: int | None = None,
    node_id: str | None = None,
) -> bytes:
    """The body of one `/replicate` request, built from each entry's cached encoding.

    `through` and `node_id`: once this batch is applied, the follower process `node_id`
    holds every write up to version `through` (see FollowerProgress.sending)."""
    head = b'{"term":%d,"leader_id":"%s",' % (term, leader_id.encode())
    if through is not None and node_id is not None:
        head += b'"through":%d,"node_id":"%s",' % (through, node_id.encode())
    return head + b'"entries":[' + b",".join(s.entry.wire for s in batch) + b"]}"
