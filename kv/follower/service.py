"""A running follower: FollowerCore's rules, with its log and term record on disk around them."""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol

from kv.core.records import Entry
from kv.core.startup import TermFence
from kv.core.stats import ApplyStats
from kv.core.store import VersionedStore
from kv.follower.node import Applied, FollowerCore, Page, Refused, TermUnknown
from kv.settings import FollowerSettings
from kv.storage.heap import TrimAfterBulk
from kv.storage.state import NodeState, node_state

log = logging.getLogger("kvstore.follower")


class Election(Protocol):
    """Who leads, as an HA node knows it from etcd (kv/ha/node.py)."""

    @property
    def leader_url(self) -> str | None: ...

    @property
    def leader_name(self) -> str | None: ...

    def no_leader_reason(self) -> str:
        """Why no leader is known: an election is under way, or etcd cannot be reached."""


class FollowerService:
    """What follower.py's routes call: apply a batch, read a page; each persisted first.

    An HA node passes what it keeps across roles (`shared`), the term fence it held as a
    leader (`fence`), and its `election`, which names the leader writes are redirected to.
    """

    def __init__(
        self,
        settings: FollowerSettings,
        *,
        shared: NodeState | None = None,
        fence: TermFence | None = None,
        election: Election | None = None,
        learn_term: bool = False,
    ) -> None:
        """`learn_term`: the fence was not kept (an HA node without DATA_DIR); batches and
        reads wait (503) until :meth:`learn_term` is called with the term etcd knows."""
        self.settings = settings
        self.owns_storage = shared is None
        if shared is None:
            shared = node_state(settings)
        self.storage, self.changes, self.gate = shared
        self.core = FollowerCore(self.storage.store, fence or TermFence())
        self.stats = ApplyStats()
        self.election = election
        self.trimmer = TrimAfterBulk()
        self.term_unknown: str | None = (
            "this follower restarted without DATA_DIR and has not yet learnt the current term "
            "from etcd; it takes no batch until it has"
            if learn_term
            else None
        )

    @property
    def store(self) -> VersionedStore:
        return self.storage.store

    @property
    def applied_through(self) -> int:
        return self.core.applied_through

    @property
    def leader_url(self) -> str | None:
        if self.election is not None:
            return self.election.leader_url
        return self.settings.leader_url

    @property
    def leader_name(self) -> str | None:
        return None if self.election is None else self.election.leader_name

    @property
    def term(self) -> int:
        return self.core.fence.term

    def learn_term(self, term: int) -> None:
        """The current term, from etcd: raise the fence to it, then take batches again. A
        leader of an older term (one this process never heard of) is refused from now on."""
        if self.term_unknown is None:
            return
        if term > self.core.fence.term:
            self.core.fence.term, self.core.fence.leader_id = term, None
        self.term_unknown = None
        log.info("learnt term %d from etcd; taking batches", self.core.fence.term)

    def open(self) -> None:
        """Replay the log and the newest term seen, if there is a DATA_DIR."""
        if not self.owns_storage:
            return  # the HA node opened it, and set the fence
        self.storage.open()
        self.core.fence.term, self.core.fence.leader_id = self.storage.load_term()
        # What the log replayed was never in the feed; nothing is vouched for until the
        # leader has read this process's entries.
        self.changes.start_at(self.store.last_version, 0)

    async def close(self) -> None:
        if self.owns_storage:
            await self.storage.close()

    async def replicate(
        self,
        term: int | None,
        leader_id: str | None,
        entries: list[Entry],
        through: int | None = None,
        node_id: str | None = None,
    ) -> Applied | Refused | TermUnknown:
        """Apply a batch; answer only once what it changed is in the log (and on disk if
        APPENDFSYNC=always), so a confirmation survives this follower's crash."""
        if self.term_unknown is not None:
            return TermUnknown(self.term_unknown)
        outcome = self.core.handle_replicate(term, leader_id, entries, through, node_id)
        if isinstance(outcome, Refused):
            self.stats.refused_batches += 1
            return outcome
        if entries:
            self.stats.batches += 1
        else:
            self.stats.heartbeats += 1
        self.stats.applied += len(outcome.applied)
        self.stats.stale += outcome.stale
        if outcome.term_changed:
            self._save_term()
            log.info(
                "now in term %d (leader %s)", self.term, (self.core.fence.leader_id or "?")[:8]
            )
        self.storage.record(outcome.applied)
        self.changes.received(entries, self.core.applied_through)
        if self.trimmer.applied(len(outcome.applied)):
            asyncio.get_running_loop().call_later(self.trimmer.delay, self.trimmer.trim)
        self.gate.notify()
        if self.storage.waits_for_fsync:
            await self.storage.sync()
        return outcome

    def read(
        self, after_version: int, limit: int, term: int | None, leader_id: str | None
    ) -> Page | Refused | TermUnknown:
        if self.term_unknown is not None:
            return TermUnknown(self.term_unknown)
        page = self.core.handle_read(after_version, limit, term, leader_id)
        if isinstance(page, Page) and page.term_changed:
            self._save_term()
        return page

    def _save_term(self) -> None:
        self.storage.save_term(self.core.fence.term, self.core.fence.leader_id)
