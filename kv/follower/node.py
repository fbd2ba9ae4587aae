"""A follower's replication rules, with no I/O: fencing, apply-if-newer, what to confirm, paging.

follower.py translates HTTP to these calls and writes what they return to the
log; the model-based test drives them directly.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from kv.core.records import Entry
from kv.core.startup import TermFence
from kv.core.store import VersionedStore


@dataclass(frozen=True, slots=True)
class Refused:
    """A batch or read from an older term (or another leader of the current one)."""

    reason: str
    follower_term: int
    batch_term: int


@dataclass(frozen=True, slots=True)
class TermUnknown:
    """Not yet: this follower does not know the current term, so it cannot fence (503)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Applied:
    applied: list[Entry]
    stale: int
    unconfirmed: list[int]
    """Versions in the batch this follower does not hold (another write holds that version)."""
    term_changed: bool
    """The fence moved: persist it before answering."""


@dataclass(frozen=True, slots=True)
class Page:
    entries: list[Entry]
    next_after: int | None
    term_changed: bool


@dataclass
class FollowerCore:
    """A follower's store and term fence, and the two messages a leader sends it."""

    store: VersionedStore = field(default_factory=VersionedStore)
    fence: TermFence = field(default_factory=TermFence)
    node_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    applied_through: int = 0
    """Every write up to this version is applied here, as the leader vouched with `through`.
    Below last_version while writes arrive out of order; 0 after a restart until the leader
    has read this process's entries."""

    def handle_replicate(
        self,
        term: int | None,
        leader_id: str | None,
        entries: list[Entry],
        through: int | None = None,
        node_id: str | None = None,
    ) -> Applied | Refused:
        """Apply a batch, each entry only if newer; confirm only entries now held.

        `through` moves applied_through only if meant for this process (`node_id`): a leader
        that has not read a restarted follower's entries cannot vouch for what it holds.
        """
        refusal = self.fence.check(term, leader_id)
        if refusal is not None:
            return Refused(refusal, self.fence.term, term or 0)
        changed = self.fence.observe(term, leader_id)
        result = self.store.apply_batch(entries)
        if through is not None and node_id == self.node_id and through > self.applied_through:
            self.applied_through = through
        unconfirmed = (
            [e.version for e in entries if not self.store.holds(e)] if result.stale else []
        )
        return Applied(result.applied, result.stale, unconfirmed, changed)

    def handle_read(
        self, after_version: int, limit: int, term: int | None, leader_id: str | None
    ) -> Page | Refused:
        """One page of entries, after fencing for the reading leader (see TermFence.claim)."""
        if term is not None:
            refusal = self.fence.check(term, leader_id)
            if refusal is not None:
                return Refused(refusal, self.fence.term, term)
            changed = self.fence.observe(term, leader_id)
        else:
            changed = leader_id is not None and self.fence.claim(leader_id)
        page = self.store.page(after_version, limit)
        next_after = page[-1].version if len(page) == limit else None
        return Page(page, next_after, changed)
