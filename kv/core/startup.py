"""How a leader gets back everything acknowledged, and how terms fence old leaders. No I/O.

A leader keeps no promise on its own: without DATA_DIR its memory dies with it,
and with `APPENDFSYNC=everysec` the last second of its log can. What it
acknowledged at quorum W is on at least W followers, so a restarting leader reads
the entries of `STARTUP_QUORUM = N - W + 1` followers before it takes a write:
any W followers and any N - W + 1 followers share at least one, so every write
acknowledged at quorum W is among what it reads.

* :class:`StartupMerge` counts the followers heard from, merges their entries
  into the leader's store, and picks the new term: above the term in DATA_DIR,
  above every term a follower reported, above every version it holds.
* :func:`merge_entries` is the one merge rule, for start-up and for a *late*
  follower (one that answers only after the leader started): per key, the newest
  by (term, version), which is integer order of versions. One exception keeps
  acknowledged writes: an entry from another leader never outranks a write this
  leader made itself (this leader started after every other one, so its writes
  are the later ones); such keys, and keys held under one version with two
  different contents, are *restamped*: written again under a new version, which
  every replica then takes.
* :class:`TermFence` is a follower's memory of the newest term it has seen, and
  the rule that refuses batches from older terms.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from kv.core.records import Entry, term_of
from kv.core.store import StoreView, VersionedStore, fingerprint


@dataclass
class MergeOutcome:
    """What merging one batch of another node's entries into the leader's store did."""

    adopted: list[Entry] = field(default_factory=list)
    """Entries newer than the leader's: now held by the leader, to be sent to every follower."""
    restamp: list[Entry] = field(default_factory=list)
    """The leader's entries to write again under a new version, so that every replica takes
    them over the other node's (an older leader's entry outranked this leader's own write,
    or one version was held with two contents)."""


def merge_entries(
    store: VersionedStore, entries: Iterable[Entry], own_terms: frozenset[int] | set[int]
) -> MergeOutcome:
    """Merge another node's entries into the leader's `store`; see the module docstring."""
    outcome = MergeOutcome()
    for entry in entries:
        store.note_request(entry)  # the key's write, whether or not it is the one kept
        # Versions first: the held entry is made (unpacked) only when it is restamped.
        held = store.held_version(entry.key)
        if held == 0:
            store.maybe_apply(entry)
            outcome.adopted.append(entry)
        elif entry.version > held:
            if term_of(held) in own_terms:
                store.advance_to(entry.version)
                outcome.restamp.append(store.held(entry.key))  # type: ignore[arg-type]
            else:
                store.maybe_apply(entry)
                outcome.adopted.append(entry)
        elif entry.version == held and not store.holds(entry):
            outcome.restamp.append(store.held(entry.key))  # type: ignore[arg-type]
    return outcome


@dataclass(frozen=True, slots=True)
class FollowerReport:
    """What a starting leader keeps of a follower once all its entries were read."""

    node_id: str
    fingerprint: int


class TermTooLowError(Exception):
    """The term etcd granted is not above everything read: a newer one is needed."""

    def __init__(self, granted: int, needed: int) -> None:
        super().__init__(f"term {granted} is not above term {needed - 1}, seen on a follower")
        self.needed = needed


class StartupMerge:
    """The leader's start-up read quorum: who has answered, and what term comes next.

    `granted_term`: a term chosen elsewhere (etcd's counter, for an elected leader), used
    instead of one picked here; it must still be above everything read."""

    def __init__(
        self,
        store: VersionedStore,
        quorum: int,
        persisted_term: int = 0,
        granted_term: int | None = None,
    ) -> None:
        self.store = store
        self.quorum = quorum
        self.persisted_term = persisted_term
        self.granted_term = granted_term
        self.reports: dict[str, FollowerReport] = {}
        # What the merge adopted, as keys: the entries themselves would hold a second copy
        # of a million keys until the end of the read, and leave the heap fragmented after.
        self.adopted_keys: list[str] = []
        self.restamp: list[Entry] = []
        self.chosen_term: int | None = None
        self.claims: set[str] = set()
        self.progressed_at = float("-inf")
        """When the read last moved (a page merged, a follower finished or claimed), on the
        reader's clock: how a stalled read is told from a slow one."""
        self._highest_term = 0
        self._fingerprints: dict[str, int] = {}

    # -- while reading -------------------------------------------------------

    def merge_page(self, url: str, entries: list[Entry]) -> None:
        """Merge one page of a follower's entries (nothing of this leader's exists yet)."""
        outcome = merge_entries(self.store, entries, frozenset())
        self.adopted_keys += [entry.key for entry in outcome.adopted]
        self.restamp += outcome.restamp
        self._fingerprints[url] = self._fingerprints.get(url, 0) ^ fingerprint(entries)

    def adopted(self) -> StoreView:
        """The entries the merge adopted, as the store now holds them, read when used."""
        return self.store.view(self.adopted_keys)

    def abandon(self, url: str) -> None:
        """A follower failed part-way: its pages stay merged (they are real entries), but it
        does not count towards the quorum until read again from the start."""
        self._fingerprints.pop(url, None)

    def observe(self, term: int) -> None:
        """A follower refused our claim: it has seen `term` (from another leader)."""
        self._highest_term = max(self._highest_term, term)

    def forget(self, url: str) -> None:
        """A follower read earlier failed its claim: it must be read (and claimed) again."""
        self.reports.pop(url, None)
        self.claims.discard(url)

    def finish(self, url: str, node_id: str, term: int, last_version: int) -> None:
        """Every page of `url` has been merged: it counts towards the quorum."""
        self.reports[url] = FollowerReport(node_id, self._fingerprints.pop(url, 0))
        if term != self.granted_term:  # the granted term is ours: the read itself fenced it
            self._highest_term = max(self._highest_term, term)
        self.store.advance_to(last_version)

    # -- the decision ----------------------------------------------------------

    @property
    def heard(self) -> int:
        return len(self.reports)

    @property
    def read_enough(self) -> bool:
        """Enough followers read to choose a term and claim it."""
        return self.heard >= self.quorum

    @property
    def ready(self) -> bool:
        """Enough followers read *and* holding the new term: the leader may take writes."""
        return self.read_enough and len(self.claims) >= self.quorum

    def waiting_reason(self, followers: int) -> str:
        if not self.read_enough:
            return (
                f"the leader is starting: it has read the entries of {self.heard} of the "
                f"{self.quorum} follower(s) it needs (STARTUP_QUORUM, of {followers}) before it "
                "takes writes"
            )
        return (
            f"the leader is starting: {len(self.claims)} of the {self.quorum} follower(s) it "
            f"read (STARTUP_QUORUM, of {followers}) have recorded its new term {self.chosen_term}"
        )

    def new_term(self) -> int:
        """Strictly above every term in DATA_DIR, reported by a follower, or in a version held."""
        return (
            max(
                self.persisted_term,
                self._highest_term,
                term_of(self.store.last_version),
                self.store.term,
            )
            + 1
        )

    def choose_term(self) -> int:
        """The term to claim on the followers read. A starting leader records it on them before
        taking writes, so that the next leader to read any of them begins a newer one."""
        term = self.new_term()
        if self.granted_term is not None:
            if self.granted_term < term:
                raise TermTooLowError(self.granted_term, term)
            term = self.granted_term
        if self.chosen_term is not None and self.chosen_term >= term:
            return self.chosen_term  # still newer than everything read: its claims stand
        self.chosen_term = term
        self.claims.clear()
        return term

    def claimed(self, url: str, term: int) -> None:
        if term == self.chosen_term and url in self.reports:
            self.claims.add(url)

    def followers_in_sync(self) -> dict[str, tuple[str, bool]]:
        """Each follower read: its node_id, and whether it held exactly what the leader holds
        after the merge (the store is fingerprinted once, however many were read)."""
        leader_print = self.store.fingerprint()
        return {
            url: (report.node_id, report.fingerprint == leader_print)
            for url, report in self.reports.items()
        }


@dataclass
class TermFence:
    """A follower's memory of the newest term it has seen and which leader began it.

    A batch from an older term is refused, so nothing a dead or paused leader left
    on the wire can overwrite a newer leader's writes. A batch that claims the
    same term from a different leader is refused too: two leaders that picked one
    term could have assigned one version twice, and the newer leader must move to
    a term of its own first.
    """

    term: int = 0
    leader_id: str | None = None

    def check(self, term: int | None, leader_id: str | None) -> str | None:
        """None if a batch from (term, leader_id) may be applied; otherwise the reason."""
        if term is None:
            return None  # a hand-made batch, outside the protocol: not fenced
        if term < self.term:
            return (
                f"batch from term {term} refused: this follower has seen term {self.term}, "
                "so the batch comes from an older leader"
            )
        if term == self.term and leader_id != self.leader_id and self.leader_id is not None:
            return (
                f"batch from term {term} refused: another leader began term {term} on this "
                "follower; the leader must begin a newer term"
            )
        return None

    def claim(self, leader_id: str) -> bool:
        """A starting leader is reading this follower: from now on, batches of the current term
        from any other leader are refused, so nothing the previous leader left on the wire
        lands after the read. True if that changed anything (persist it)."""
        if self.leader_id == leader_id:
            return False
        self.leader_id = leader_id
        return True

    def observe(self, term: int | None, leader_id: str | None) -> bool:
        """Record an accepted batch's term; True if it is newer than any seen (persist it)."""
        if term is None or term <= self.term:
            return False
        self.term = term
        self.leader_id = leader_id
        return True
