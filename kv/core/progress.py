"""What the leader knows of one follower, and what it should send next. No I/O.

This is the per-follower state machine of the replication core, after raft's
`Progress`: the delivery loop in replicator.py asks it for the next batch, does
the HTTP, and reports back with :meth:`handle_success` or :meth:`handle_failure`.

Catch-up works in two ways:

* **Redelivery.** Entries a follower has not confirmed stay in its outbox and
  are retried with backoff, so a follower that was frozen or unreachable gets
  everything it missed as soon as it answers.
* **Full resync.** Entries the follower had confirmed are gone if it restarted
  with an empty memory, and a follower that stays away too long would make its
  outbox grow without limit. Both end the same way: the outbox is dropped
  (past `max_backlog`) or kept (after a restart), and a *snapshot* of the
  leader's store, tombstones included, is queued for the follower. Apply-if-newer
  makes that safe in any order and any number of times.

A follower reports a `node_id`, random per process start, with every
confirmation, which is how a restart is noticed. Time is always passed in.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from kv.core.catchup import CommonPrefix
from kv.core.outbox import Outbox, Shipment, retry_backoff
from kv.core.records import Entry


class FollowerState(StrEnum):
    """What the leader knows of a follower, from its last delivery attempts."""

    UP = "up"
    """The last delivery succeeded and nothing is waiting that is ready to ship."""
    LAGGING = "lagging"
    """The last delivery succeeded but ready entries are waiting to ship."""
    DOWN = "down"
    """The last delivery failed; the outbox is retried after a backoff."""
    RESYNCING = "resyncing"
    """Its entries are being read, or a snapshot is on its way (of the whole store after a
    dropped backlog, of what it lacks after a restart)."""


HEARTBEAT_S = 0.5
"""A follower not contacted for this long gets a heartbeat: when idle, and also while a data
batch is on the wire, so a follower that stops answering is noticed within HEARTBEAT_S plus
the heartbeat's own timeout, however long a large batch may take."""


@dataclass(frozen=True, slots=True)
class Confirmation:
    """What a follower said when it confirmed a batch."""

    node_id: str
    last_version: int


class FollowerProgress:
    """What the leader knows of one follower, and what to send it next.

    After raft's ``Progress``. The delivery loop asks :meth:`next_batch`, does the
    HTTP, and reports with one of the ``handle_*`` transitions. Time is passed in.

    Fields (each is the leader's belief, from the follower's last answers):

    * ``outbox``: entries not yet confirmed. Invariant: an entry leaves it only
      when the follower confirmed it, or when it is replaced by a snapshot.
    * ``node_id``: the follower process last heard from (random per start).
    * ``merged_node_id``: the process whose entries the leader has read and
      merged. Invariant: no data is sent to a process known to be new before its
      entries are merged (``needs_pull`` holds while they differ), so a follower
      that holds writes the leader lacks is never overwritten blindly. A process
      is known by its answer: a batch on its way when a follower restarts reaches
      the new process first, which is harmless (apply-if-newer, and what it
      already held is read and merged right after).
    * ``consecutive_failures`` / ``blocked_until``: failures in a row, and the end
      of the backoff they earned. Invariant: state is ``down`` iff failures > 0.
    * ``snapshot_outstanding``: snapshot entries queued or on the wire.
    * ``batches_in_flight`` / ``entries_in_flight``: data batches on the wire.
    * ``heartbeat_in_flight``: at most one heartbeat is on the wire, beside the data.
    * ``heartbeat_rtt``: the last heartbeat's round trip, in seconds.
    * ``last_heard``: when the follower last answered a batch, a heartbeat or a read of its
      entries (what check-quorum counts, kv/core/contact.py).
    * ``follower_last_version``: the newest version the follower reported.
    * counters ``delivered``, ``batches``, ``heartbeats``, ``resyncs`` (and
      ``resync_entries``, the entries they held), ``pulls``.

    Transitions: :meth:`sending`, :meth:`handle_success`, :meth:`handle_failure`,
    :meth:`handle_fenced` (the follower refused an older term),
    :meth:`handle_conflict` (it holds another write under a version sent),
    :meth:`handle_pulled` (its entries are merged), :meth:`adopt` (its entries were
    merged at the leader's start-up), :meth:`queue` and :meth:`resync`.
    """

    def __init__(
        self,
        snapshot: Callable[[], Sequence[Entry]],
        max_backlog: int = 100_000,
        *,
        outbox: Outbox | None = None,
        heartbeat_s: float = HEARTBEAT_S,
    ) -> None:
        if max_backlog < 1:
            raise ValueError("max_backlog must be at least 1")
        self.snapshot = snapshot
        self.max_backlog = max_backlog
        self.heartbeat_s = heartbeat_s
        self.outbox = outbox or Outbox()
        self.batches_in_flight = 0
        self.entries_in_flight = 0
        self._in_flight_lowest: Counter[int] = Counter()  # each data batch's lowest version
        self.heartbeat_in_flight = False
        self.heartbeat_sent_at = 0.0
        self.heartbeat_rtt: float | None = None
        self.consecutive_failures = 0
        self.blocked_until = 0.0
        self.last_attempt = float("-inf")
        self.last_heard = float("-inf")
        self.last_error: str | None = None
        self.node_id: str | None = None
        self.merged_node_id: str | None = None
        # First contact is reading its entries, unless the leader read them at start-up.
        self.needs_pull = True
        self.follower_last_version = 0
        self.snapshot_outstanding = 0
        self.resyncs = 0
        self.resync_entries = 0
        self._resyncs_at_pull = 0
        self.pulls = 0
        self.delivered = 0
        self.batches = 0
        self.heartbeats = 0

    # -- what the leader knows ---------------------------------------------

    def state(self, now: float) -> FollowerState:
        if self.consecutive_failures:
            return FollowerState.DOWN
        if self.snapshot_outstanding or self.needs_pull:
            return FollowerState.RESYNCING
        if self.outbox.ready_count(now):
            return FollowerState.LAGGING
        return FollowerState.UP

    def lag(self, last_version: int) -> int:
        """Versions behind a leader at `last_version`, by the follower's last report."""
        return max(0, last_version - self.follower_last_version)

    def backlog(self, now: float) -> int:
        """Entries the follower has failed to take so far: past their simulated delay but
        unconfirmed, not counting a snapshot. What MAX_REPLICATION_QUEUE caps."""
        not_taken = self.outbox.ready_count(now) + self.entries_in_flight
        return not_taken - self.snapshot_outstanding

    @property
    def pending(self) -> int:
        """Every entry not yet confirmed, delayed, queued, on the wire or in a snapshot."""
        return len(self.outbox) + self.entries_in_flight

    @property
    def can_confirm(self) -> bool:
        """Whether a new write can count on this follower's confirmation soon."""
        return not self.consecutive_failures

    # -- the write path ----------------------------------------------------

    def queue(self, shipment: Shipment) -> list[Shipment]:
        """Queue a shipment; return the shipments that will not be confirmed one by one.

        Usually nothing. Once the follower has failed to take `max_backlog` entries,
        the whole outbox is dropped and replaced by a snapshot of the store (which
        holds the new entry too), so the leader's memory stays bounded however long
        a follower stays away.
        """
        if self.backlog(shipment.enqueued_at) >= self.max_backlog:
            unshipped = self.outbox.snapshot_left
            dropped = self.outbox.drain()
            self.snapshot_outstanding -= unshipped + sum(1 for s in dropped if s.resync)
            self.resync(shipment.enqueued_at)
            return [*dropped, shipment]
        self.outbox.add(shipment)
        return []

    def resync(self, now: float, entries: Sequence[Entry] | None = None) -> None:
        """Queue the leader's whole store (or `entries` of it) for this follower, ready at once."""
        if entries is None:
            entries = self.snapshot()
        replaced = self.outbox.add_snapshot(entries, now)
        self.snapshot_outstanding += len(entries) - replaced
        self.resyncs += 1
        self.resync_entries += len(entries)

    # -- the delivery loop -------------------------------------------------

    def next_batch(self, now: float, max_in_flight: int) -> list[Shipment] | None:
        """The batch to send now; an empty list is a heartbeat; None means wait.

        No data is sent while the follower's entries wait to be pulled: the caller
        pulls them (see :meth:`wants_pull`). Heartbeats carry no data and go out
        regardless, beside any data batch on the wire, so a follower that stops
        answering is seen down even while a batch waits for it.
        """
        if now < self.blocked_until:
            return None
        if not self.needs_pull and self.batches_in_flight < self._in_flight_limit(max_in_flight):
            batch = self.outbox.take_ready(now)
            if batch:
                return batch
        if self._heartbeat_due_at() <= now:
            return []
        return None

    def wants_pull(self, now: float) -> bool:
        """Whether the caller should read the follower's entries now."""
        return self.needs_pull and self.batches_in_flight == 0 and now >= self.blocked_until

    def next_wake(self, now: float, max_in_flight: int) -> float | None:
        """When :meth:`next_batch` may next have something; None: nothing to wait for."""
        if now < self.blocked_until:
            return self.blocked_until
        candidates = [self._heartbeat_due_at()]
        limit = self._in_flight_limit(max_in_flight)
        sendable = not self.needs_pull and self.batches_in_flight < limit
        if sendable and (ready := self.outbox.next_ready_at()) is not None:
            candidates.append(ready)
        wake = min(candidates)
        return None if wake == float("inf") else wake

    def _in_flight_limit(self, max_in_flight: int) -> int:
        """One batch more on the wire while a snapshot is going: the leader then makes the
        next batch while the follower applies the last, instead of each waiting in turn
        (a million-entry snapshot is five hundred batches)."""
        return max_in_flight + 1 if self.snapshot_outstanding else max_in_flight

    def _heartbeat_due_at(self) -> float:
        if self.heartbeat_in_flight:
            return float("inf")
        return self.last_attempt + self.heartbeat_s

    def sending(self, batch: list[Shipment], now: float, last_version: int = 0) -> int:
        """Put `batch` (or a heartbeat) on the wire; return its `through`.

        `through` is the highest version such that, once this batch is applied, the
        follower holds every write up to it: just below the lowest version still held
        back for it (in the outbox, or in another batch on the wire), or the leader's
        `last_version` if none is. Followers answer reads that ask for `min_version`
        with it, and release their change feed in version order up to it.
        """
        held_back = [
            version - 1
            for version in (self.outbox.min_version(), min(self._in_flight_lowest, default=None))
            if version is not None
        ]
        through = min(last_version, *held_back) if held_back else last_version
        if batch:
            self.batches_in_flight += 1
            self.entries_in_flight += len(batch)
            self._in_flight_lowest[min(s.entry.version for s in batch)] += 1
        else:
            self.heartbeat_in_flight = True
            self.heartbeat_sent_at = now
        self.last_attempt = now
        return through

    def handle_success(self, batch: list[Shipment], confirmation: Confirmation, now: float) -> bool:
        """Record a confirmed batch. Returns True if the follower was unreachable until now."""
        recovered = self.consecutive_failures > 0
        self._returned(batch)
        self.last_heard = now
        self.consecutive_failures = 0
        self.last_error = None
        self.delivered += len(batch)
        if batch:
            self.batches += 1
        else:
            self.heartbeats += 1
            self.heartbeat_rtt = now - self.heartbeat_sent_at
        if self.snapshot_outstanding:
            self.snapshot_outstanding -= sum(1 for s in batch if s.resync)
        self.node_id = confirmation.node_id
        self.follower_last_version = confirmation.last_version
        if confirmation.node_id != self.merged_node_id:
            # Met for the first time, or restarted: it may hold writes this leader lacks
            # (it was frozen or partitioned while an earlier leader wrote to it).
            self.needs_pull = True
        return recovered

    def handle_failure(self, batch: list[Shipment], now: float, error: str) -> float:
        """Put a failed batch back behind a backoff; return the backoff in seconds."""
        self._returned(batch)
        self.consecutive_failures += 1
        self.last_error = error
        backoff = retry_backoff(self.consecutive_failures)
        self.blocked_until = now + backoff
        self.outbox.retry(batch, self.blocked_until)
        return backoff

    def handle_fenced(self, batch: list[Shipment], now: float, error: str) -> None:
        """The follower refused the batch's term: it has heard from another leader.

        The batch goes back (the leader's next batch carries its newer term), and
        the follower's entries are pulled before anything else is sent.
        """
        self._returned(batch)
        self.last_error = error
        self.outbox.retry(batch, now)
        self.needs_pull = True
        self.merged_node_id = None

    def handle_conflict(self) -> None:
        """The follower holds another write under a version sent: pull and merge it."""
        self.needs_pull = True
        self.merged_node_id = None

    def begin_pull(self) -> CommonPrefix:
        """The caller reads the follower's entries now; it hands each page to the returned
        prefix, which then says how much of the store the follower needs again."""
        self._resyncs_at_pull = self.resyncs
        return CommonPrefix(self.snapshot())

    def handle_pulled(
        self, node_id: str, in_sync: bool, now: float, prefix: CommonPrefix | None = None
    ) -> None:
        """The follower's entries (of process `node_id`) are merged into the leader's store.

        If they differ from the leader's, the follower gets the leader's entries from the
        first that differs on (`prefix`, read since :meth:`begin_pull`), or the whole store:
        also when its queue overflowed during the read, since the writes dropped with it are
        then in no suffix of a snapshot taken before them."""
        self.pulls += 1
        self.last_heard = now
        self.node_id = self.merged_node_id = node_id
        self.needs_pull = False
        self.consecutive_failures = 0
        self.last_error = None
        if not in_sync:
            overflowed = self.resyncs != self._resyncs_at_pull
            self.resync(now, None if prefix is None or overflowed else prefix.rest())

    def handle_pull_failure(self, now: float, error: str) -> float:
        """Reading its entries failed: back off, as for a failed batch."""
        self.consecutive_failures += 1
        self.last_error = error
        backoff = retry_backoff(self.consecutive_failures)
        self.blocked_until = now + backoff
        return backoff

    def adopt(self, node_id: str, in_sync: bool, now: float) -> None:
        """Its entries were merged at the leader's start-up: no pull needed at first contact."""
        self.merged_node_id = node_id
        self.needs_pull = False
        self.last_heard = now
        if not in_sync:
            self.resync(now)

    def _returned(self, batch: list[Shipment]) -> None:
        if batch:
            self.batches_in_flight -= 1
            self.entries_in_flight -= len(batch)
            lowest = min(s.entry.version for s in batch)
            self._in_flight_lowest[lowest] -= 1
            if not self._in_flight_lowest[lowest]:
                del self._in_flight_lowest[lowest]
        else:
            self.heartbeat_in_flight = False
