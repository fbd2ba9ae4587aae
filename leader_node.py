"""The leader's state and operations, apart from HTTP: terms, start-up, writes, merging.

leader.py's routes translate HTTP to calls on a :class:`LeaderNode`; the pure
rules it applies live in store.py (versions), startup.py (the start-up read
quorum, the merge rule, fencing) and progress.py (each follower's state).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx

from durability import Storage
from progress import FollowerProgress
from replication import DelayModel
from replicator import Delivery, FollowerLink, Replicator, follower_client
from settings import LeaderSettings
from startup import StartupMerge, merge_entries
from store import Entry, TermExhaustedError, term_of

log = logging.getLogger("kvstore.leader")

ClientFactory = Callable[[str], httpx.AsyncClient]
MAX_IN_FLIGHT_PER_FOLLOWER = 1


class LeaderNode:
    """One leader process: its store and log, its term, and a link to every follower."""

    def __init__(
        self,
        settings: LeaderSettings,
        *,
        client_factory: ClientFactory | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.storage = Storage(settings.data_dir, settings.appendfsync)
        self.store = self.storage.store
        self.leader_id = uuid.uuid4().hex
        self.own_terms: set[int] = set()
        self.delays = DelayModel(
            settings.min_delay_ms, settings.max_delay_ms, rng or random.Random()
        )
        self.make_client = client_factory or (
            lambda url: follower_client(
                url, settings.replication_secret, MAX_IN_FLIGHT_PER_FOLLOWER
            )
        )
        self.replicator = Replicator([])
        self.startup = StartupMerge(self.store, int(settings.startup_quorum or 0))
        self.ready = False
        self.started_at = time.monotonic()
        self.ready_after_s: float | None = None
        self._startup_task: asyncio.Task[None] | None = None

    # -- what LeaderHooks asks of it -------------------------------------------

    @property
    def term(self) -> int:
        return self.store.term

    def observe_term(self, term: int, foreign: bool = False) -> None:
        """A follower has seen `term` (`foreign`: begun by another leader). If ours is not
        newer, begin a term above it, so that nothing we assign can collide with its versions."""
        if term > self.term or (foreign and term >= self.term):
            self.begin_term(max(term, term_of(self.store.last_version)) + 1)

    def merge(self, url: str, entries: list[Entry]) -> None:
        """Merge a page of a late follower's entries; replicate what the leader lacked."""
        outcome = merge_entries(self.store, entries, self.own_terms)
        if outcome.adopted:
            self.storage.record(outcome.adopted)
            now = time.monotonic()
            for entry in outcome.adopted:
                self.replicator.broadcast(entry, now)
            log.info("took %d newer entries from late follower %s", len(outcome.adopted), url)
        self.restamp(outcome.restamp)

    def in_sync(self, print_: int) -> bool:
        return print_ == self.store.fingerprint()

    # -- life cycle --------------------------------------------------------------

    def open(self, clients: dict[str, httpx.AsyncClient]) -> None:
        """Replay the log, and read followers' entries (through `clients`) in the background."""
        self.storage.open()
        persisted, _ = self.storage.load_term()
        self.startup.persisted_term = persisted
        self.replicator.links = [
            FollowerLink(
                url,
                clients[url],
                self.delays,
                FollowerProgress(self.store.entries, self.settings.max_replication_queue),
                leader=self,
                max_in_flight=MAX_IN_FLIGHT_PER_FOLLOWER,
            )
            for url in self.settings.followers
        ]
        self._startup_task = asyncio.create_task(self._start_up(), name="leader-start-up")

    async def _start_up(self) -> None:
        await self.replicator.gather(self.startup, leader_id=self.leader_id)
        merged = self.startup.outcome
        self.storage.record(merged.adopted)
        self.begin_term(self.startup.new_term())
        now = time.monotonic()
        for link in self.replicator.links:
            report = self.startup.reports.get(link.url)
            if report is not None:
                link.progress.adopt(report.node_id, self.startup.in_sync(link.url), now)
        self.restamp(merged.restamp)
        self.ready_after_s = time.monotonic() - self.started_at
        self.ready = True
        self.replicator.start()
        log.info(
            "ready in %.2f s: read %d of %d followers (STARTUP_QUORUM %d), took %d newer "
            "entries; term %d, next version %d",
            self.ready_after_s,
            self.startup.heard,
            len(self.settings.followers),
            self.startup.quorum,
            len(merged.adopted),
            self.term,
            self.store.next_version(),
        )

    async def close(self) -> None:
        if self._startup_task is not None:
            self._startup_task.cancel()
            await asyncio.gather(self._startup_task, return_exceptions=True)
        await self.replicator.close()
        await self.storage.close()

    def begin_term(self, term: int) -> None:
        """Record `term` durably (with DATA_DIR) before assigning a single version in it."""
        self.storage.save_term(term, self.leader_id)
        self.store.begin_term(term)
        self.own_terms.add(term)
        log.info("began term %d", term)

    def not_ready_reason(self) -> str | None:
        if self.ready:
            return None
        return self.startup.waiting_reason(len(self.settings.followers))

    # -- writes --------------------------------------------------------------------

    def put(self, key: str, value: Any, value_json: str) -> Entry:
        """Assign the next version and apply the write, with no await in between."""
        entry = self._assigning(lambda: self.store.put(key, value, value_json))
        self.storage.record([entry])
        return entry

    def delete(self, key: str) -> Entry | None:
        entry = self._assigning(lambda: self.store.delete(key))
        if entry is not None:
            self.storage.record([entry])
        return entry

    def _assigning(self, assign: Callable[[], Any]) -> Any:
        try:
            return assign()
        except TermExhaustedError:
            self.begin_term(term_of(self.store.last_version) + 1)
            return assign()

    def restamp(self, entries: list[Entry]) -> None:
        """Write each entry again under a new version, if the leader still holds it."""
        now = time.monotonic()
        for held in entries:
            if self.store.held(held.key) is not held:
                continue  # written since: that write is newer than anything merged
            entry = self._rewrite(held)
            self.storage.record([entry])
            self.replicator.broadcast(entry, now)
        if entries:
            log.warning(
                "wrote %d key(s) again under term %d to settle them", len(entries), self.term
            )

    def _rewrite(self, held: Entry) -> Entry:
        return self._assigning(lambda: self.store.rewrite(held))

    def replicate(self, entry: Entry, started_at: float) -> list[asyncio.Future[Delivery]]:
        return self.replicator.broadcast(entry, started_at)
