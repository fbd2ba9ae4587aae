"""A node's change feed: the entries it applied, released in version order, in a bounded ring.

`GET /watch` streams from here. A follower applies writes out of version order (each has
its own simulated delay), so an entry is held back until the node's `applied_through`
watermark passes it: a client that resumes after version V then misses nothing, because
nothing at or below V can still arrive. The ring keeps the last `capacity` released
entries; a client asking for older ones is told the feed was compacted past them. No I/O,
no event loop: subscribers are plain callbacks, and kv/web/watch.py adapts them to asyncio.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterable

from kv.core.records import BY_VERSION, Entry

Subscriber = Callable[[Entry], None]
DEFAULT_CAPACITY = 10_000
BULK = 50_000
"""Entries in one call past which, with no subscriber, the feed keeps only the newest."""


class ChangeFeed:
    """Applied entries, released in version order up to the watermark."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._ring: deque[Entry] = deque(maxlen=capacity)
        self._held: list[tuple[int, int, Entry]] = []  # received, above the watermark
        self._held_versions: set[int] = set()
        self._sequence = 0
        self.released_through = 0
        """Every entry applied here up to this version has been released."""
        self.compacted_through = 0
        """Entries up to this version may be missing from the ring: evicted, or applied
        before this process started (replayed from the log)."""
        self._subscribers: list[Subscriber] = []

    def start_at(self, compacted_through: int, released_through: int) -> None:
        """After a log replay: what the store holds was never in this ring."""
        self.compacted_through = compacted_through
        self.released_through = released_through

    def received(self, entries: Iterable[Entry], through: int) -> None:
        """Entries this node received (applied, or already superseded here), and its watermark
        after applying them.

        A write that was overwritten before it reached this follower (the newer one had a
        shorter delay) is never applied to the store, but it is still part of the history:
        it goes into the feed, in its place. Repeats (a redelivery, a snapshot copy) do not.
        """
        if isinstance(entries, list) and len(entries) > BULK and not self._subscribers:
            entries = self._received_in_bulk(entries, through)
        for entry in entries:
            version = entry.version
            if version <= self.released_through or version in self._held_versions:
                continue
            self._held_versions.add(version)
            self._sequence += 1
            heapq.heappush(self._held, (version, self._sequence, entry))
        self.release(through)

    def _received_in_bulk(self, entries: list[Entry], through: int) -> list[Entry]:
        """Release a large batch that nobody watches (a starting leader adopting a follower's
        million keys) without ordering all of it: only the newest `capacity` entries the
        watermark releases can stay in the ring, so only they are sorted, and the rest
        counts as compacted. Returns the entries still to hold back (above the watermark)."""
        before = self.released_through
        self.release(through)  # what was held already, up to the new watermark
        watermark = self.released_through
        above, released, versions = [], [], set()
        for entry in entries:
            version = entry.version
            if version > watermark:
                above.append(entry)
            elif version > before and version not in versions:
                versions.add(version)
                released.append(entry)
        capacity = self._ring.maxlen or 1
        newest = heapq.nlargest(capacity + 1, released, key=BY_VERSION)
        if len(newest) > capacity:
            self.compacted_through = max(self.compacted_through, newest.pop().version)
        for entry in reversed(newest):
            self._append(entry)
        return above

    def release_late(self, entries: Iterable[Entry]) -> None:
        """Entries new to this node though below its watermark (a restarted leader adopting a
        late follower's writes): out of version order, but not lost."""
        for entry in entries:
            self._append(entry)

    def release(self, through: int) -> None:
        """Release every held entry up to `through`, lowest version first."""
        self.released_through = max(self.released_through, through)
        while self._held and self._held[0][0] <= self.released_through:
            _, _, entry = heapq.heappop(self._held)
            self._held_versions.discard(entry.version)
            self._append(entry)

    def _append(self, entry: Entry) -> None:
        ring = self._ring
        if len(ring) == ring.maxlen:
            self.compacted_through = max(self.compacted_through, ring[0].version)
        ring.append(entry)
        for subscriber in self._subscribers:
            subscriber(entry)

    def since(self, version: int) -> list[Entry] | None:
        """Released entries above `version`, in the order released; None if the ring no
        longer reaches back that far (compacted)."""
        if version < self.compacted_through:
            return None
        # A full scan: the ring is in release order, which is version order except for
        # the rare adopted entry, so stopping at the first older entry could miss some.
        return [entry for entry in self._ring if entry.version > version]

    @property
    def capacity(self) -> int:
        """How many released entries the ring keeps."""
        return self._ring.maxlen or 1

    def subscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.append(subscriber)

    def unsubscribe(self, subscriber: Subscriber) -> None:
        if subscriber in self._subscribers:
            self._subscribers.remove(subscriber)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)
