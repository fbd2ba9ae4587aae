"""A running follower: FollowerCore's rules, with its log and term record on disk around them."""

from __future__ import annotations

import logging

from kv.core.changes import ChangeFeed
from kv.core.records import Entry
from kv.core.stats import ApplyStats
from kv.core.store import VersionedStore
from kv.follower.node import Applied, FollowerCore, Page, Refused
from kv.settings import FollowerSettings
from kv.storage.log import Storage
from kv.web.consistency import VersionGate

log = logging.getLogger("kvstore.follower")


class FollowerService:
    """What follower.py's routes call: apply a batch, read a page; each persisted first."""

    def __init__(self, settings: FollowerSettings) -> None:
        self.settings = settings
        self.storage = Storage(settings.data_dir, settings.appendfsync)
        self.core = FollowerCore(self.storage.store)
        self.stats = ApplyStats()
        self.changes = ChangeFeed(settings.change_feed_entries)
        self.gate = VersionGate()

    @property
    def store(self) -> VersionedStore:
        return self.storage.store

    @property
    def applied_through(self) -> int:
        return self.core.applied_through

    @property
    def leader_url(self) -> str | None:
        return self.settings.leader_url

    @property
    def term(self) -> int:
        return self.core.fence.term

    def open(self) -> None:
        """Replay the log and the newest term seen, if there is a DATA_DIR."""
        self.storage.open()
        self.core.fence.term, self.core.fence.leader_id = self.storage.load_term()
        # What the log replayed was never in the feed; nothing is vouched for until the
        # leader has read this process's entries.
        self.changes.start_at(self.store.last_version, 0)

    async def close(self) -> None:
        await self.storage.close()

    async def replicate(
        self,
        term: int | None,
        leader_id: str | None,
        entries: list[Entry],
        through: int | None = None,
        node_id: str | None = None,
    ) -> Applied | Refused:
        """Apply a batch; answer only once what it changed is in the log (and on disk if
        APPENDFSYNC=always), so a confirmation survives this follower's crash."""
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
        self.gate.notify()
        if self.storage.waits_for_fsync:
            await self.storage.sync()
        return outcome

    def read(
        self, after_version: int, limit: int, term: int | None, leader_id: str | None
    ) -> Page | Refused:
        page = self.core.handle_read(after_version, limit, term, leader_id)
        if isinstance(page, Page) and page.term_changed:
            self._save_term()
        return page

    def _save_term(self) -> None:
        self.storage.save_term(self.core.fence.term, self.core.fence.leader_id)
